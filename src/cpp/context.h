// Context and Batch: RAII over llama_context, and a validated batch of tokens or embeddings.
#pragma once

#include "model.h"
#include "pyllama.h"

#include "adapter.h"

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace pyllama {

// Tokens (or embeddings) with positions, sequence ids and per-token output flags. Plain vectors:
// a llama_batch view onto them is made for each decode.
struct Batch {
    std::vector<llama_token>               tokens;
    std::vector<float>                     embd;  // n_tokens x n_embd when the batch holds embeddings
    int32_t                                n_embd = 0;
    std::vector<llama_pos>                 pos;
    std::vector<std::vector<llama_seq_id>> seq_ids;
    std::vector<int8_t>                    logits;

    size_t size() const { return pos.size(); }
    bool   is_embd() const { return n_embd > 0; }
    void   clear();
};

class Context {
  public:
    Context(Model & model, const py::kwargs & kwargs);
    ~Context();

    Context(const Context &)             = delete;
    Context & operator=(const Context &) = delete;

    // Runs `batch` through the model (decoder, or encoder when encode is true). Validates it first;
    // on failure rolls the KV memory back to its state before the call and raises.
    void decode(const Batch & batch, bool encode);

    // The same without the GIL (the caller released it): returns llama.cpp's code (0 on success,
    // 2 when cancelled) and the reason of a failure; raise_decode_error() turns it into an exception.
    // `non_causal`: this batch only is decoded with non-causal attention (a Gemma 3 image's embeddings).
    int32_t     decode_nogil(const Batch & batch, bool encode, std::string & reason, bool non_causal = false);
    static void raise_decode_error(int32_t rc, const std::string & reason, bool encode);

    // Loads a state from llama_state_seq_get_data into sequence dst (call without the GIL);
    // raises when it does not fit the model and context.
    void seq_state_load(const std::string & data, llama_seq_id dst);

    // A locked use of the context: the mutex is taken after the GIL was released.
    struct use {
        std::unique_lock<std::mutex> lock;
        llama_context *              ctx;
    };

    use  acquire();  // call without the GIL
    // After a decode made outside decode_nogil with acquire() held (libmtmd's helper): no output rows.
    void outputs_lost_locked() {
        output_rows_.clear();
        n_outputs_ = 0;
    }
    void close();
    bool closed() const { return ctx_ == nullptr; }
    void cancel() { abort_.store(true); }

    // Checks that row i (llama.cpp's convention: >= 0 a batch index, < 0 counted back from the last
    // output) has outputs from the last decode; returns the index to pass to llama.cpp.
    int32_t check_output(int32_t i, const char * what) const;

    const llama_model * model() const { return model_.get(); }
    int32_t             n_vocab() const;

    // The LoRA adapters the next decodes run with (a canonical set, see lora_canonical): applied when
    // they differ from the context's, and kept alive while the context may use them. Call without
    // the GIL; apply_lora_locked with acquire() held.
    void             apply_lora(const lora_set & set);
    void             apply_lora_locked(llama_context * ctx, const lora_set & set);
    const lora_set & lora() const { return lora_; }

    // A control vector (control_vector_load) added to the output of layers il_start..il_end
    // (inclusive; <= 0: layer 1 and the last), or none when `cv` is empty. Call without the GIL.
    void set_control_vector(const control_vector & cv, int32_t il_start, int32_t il_end);

  private:
    std::shared_ptr<llama_model> model_;
    llama_context *              ctx_ = nullptr;
    std::mutex                   mtx_;
    std::atomic<bool>            abort_{ false };    // cancel(): stop the decode in progress
    std::atomic<bool>            closing_{ false };  // close(): stop whatever runs, then free
    bool                         causal_ = true;
    lora_set                     lora_;  // what the context runs with (llama.cpp keeps raw pointers)

    // Outputs of the last successful decode: for each batch index, its output row or -1.
    std::vector<int32_t> output_rows_;
    int32_t              n_outputs_ = 0;

    static bool abort_callback(void * data);
    void        validate(const Batch & batch, bool encode, bool non_causal = false) const;

    friend void register_context(py::module_ & m);
};

void register_context(py::module_ & m);

}  // namespace pyllama
