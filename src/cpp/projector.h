// Projector, Media and Chunk: RAII over libmtmd (llama.cpp's tools/mtmd), which turns images and audio
// into embeddings a text model takes in place of tokens.
#pragma once

#include "model.h"
#include "pyllama.h"

#include "context.h"
#include "mtmd.h"

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace pyllama {

// An image or a piece of audio, decoded (stb_image, miniaudio) and ready for a projector.
struct Media {
    std::shared_ptr<mtmd_bitmap> bitmap;
    std::string                  id;  // FNV-1a of the file's bytes, as llama-server names media

    bool        is_audio() const { return mtmd_bitmap_is_audio(bitmap.get()); }
    std::string kind() const { return is_audio() ? "audio" : "image"; }
};

// One piece of a tokenised prompt: text tokens, or an image or audio clip (its preprocessed input,
// which a projector encodes into n_tokens embeddings). Owns its copy of mtmd's chunk.
struct Chunk {
    std::shared_ptr<mtmd_input_chunk> chunk;

    mtmd_input_chunk_type    type() const { return mtmd_input_chunk_get_type(chunk.get()); }
    std::string              type_name() const;
    size_t                   n_tokens() const { return mtmd_input_chunk_get_n_tokens(chunk.get()); }
    llama_pos                n_pos() const { return mtmd_input_chunk_get_n_pos(chunk.get()); }
    std::string              id() const;  // "" for text
    std::vector<llama_token> tokens() const;
};

class Projector {
  public:
    // Loads the projector file for `model` (ModelLoadError when it cannot: not a projector, another
    // model's embedding width, ...). n_threads <= 0: the CPU cores.
    Projector(Model &             model,
              const std::string & path,
              bool                use_gpu,
              int                 n_threads,
              int                 image_min_tokens,
              int                 image_max_tokens,
              bool                warmup);
    ~Projector();

    Projector(const Projector &)             = delete;
    Projector & operator=(const Projector &) = delete;

    // A locked use of the mtmd context (call without the GIL); LlamaError when closed.
    struct use {
        std::unique_lock<std::mutex> lock;
        mtmd_context *               ctx;
    };

    use  acquire();
    void close();
    bool closed() const { return ctx_ == nullptr; }

    // Decodes an image (JPEG, PNG, BMP, GIF, ...) or audio (WAV, MP3, FLAC) file's bytes; ValueError
    // for bytes that are neither, for audio or images this projector does not take, and for an image
    // larger than max_pixels (checked from its header, before anything is decoded).
    Media media(const std::string & bytes, uint64_t max_pixels);

    // Splits text holding one marker per media into chunks (mtmd_tokenize).
    std::vector<Chunk> tokenize(const std::string &        text,
                                const std::vector<Media> & media,
                                bool                       add_special,
                                bool                       parse_special);

    // Runs the encoder on a media chunk: n_tokens x n_embd floats (call without the GIL).
    std::vector<float> encode(const Chunk & chunk);

    // Evaluates the chunks into sequence seq_id of ctx from position n_past, in pieces of n_batch,
    // with the last text token's logits when logits_last; returns the next position (call without the
    // GIL). The KV memory is rolled back to n_past on failure.
    llama_pos eval(Context &                  ctx,
                   const std::vector<Chunk> & chunks,
                   llama_pos                  n_past,
                   llama_seq_id               seq_id,
                   int32_t                    n_batch,
                   bool                       logits_last);

    // Decodes one media chunk's embeddings (from encode) into seq_id at n_past, with logits for its
    // last position when `logits_last` (returns that output's index in the last decode, else -1);
    // non-causal where the model wants it (call without the GIL).
    int32_t decode_media(Context &                  ctx,
                         const Chunk &              chunk,
                         const std::vector<float> & embd,
                         llama_pos                  n_past,
                         llama_seq_id               seq_id,
                         int32_t                    n_batch,
                         bool                       logits_last);

    bool                supports_vision() const { return vision_; }
    bool                supports_audio() const { return audio_; }
    int                 audio_sample_rate() const { return sample_rate_; }
    bool                uses_mrope() const { return mrope_; }
    int32_t             n_embd() const { return n_embd_; }
    uint64_t            n_encoded() const { return n_encoded_.load(); }
    const std::string & path() const { return path_; }
    const llama_model * model() const { return model_.get(); }

  private:
    std::shared_ptr<llama_model> model_;
    mtmd_context *               ctx_ = nullptr;
    std::mutex                   mtx_;
    std::string                  path_;
    bool                         vision_      = false;
    bool                         audio_       = false;
    bool                         mrope_       = false;
    int                          sample_rate_ = -1;
    int32_t                      n_embd_      = 0;
    std::atomic<uint64_t>        n_encoded_{ 0 };
};

void register_projector(py::module_ & m);

}  // namespace pyllama
