// Projector, Media and Chunk over libmtmd; see projector.h.

#include "projector.h"
#include <pybind11/numpy.h>

#include "mtmd-helper.h"
#include "scheduler.h"      // media_token
#include "stb/stb_image.h"  // stbi_info_from_memory (the implementation is compiled into mtmd-helper)

#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <thread>

namespace pyllama {

namespace {

// What mtmd-helper takes for audio (its own test, mtmd-helper.cpp): WAV, MP3, FLAC.
bool looks_like_audio(const std::string & b) {
    if (b.size() < 12) {
        return false;
    }
    const auto * u = reinterpret_cast<const unsigned char *>(b.data());
    return (std::memcmp(u, "RIFF", 4) == 0 && std::memcmp(u + 8, "WAVE", 4) == 0) || std::memcmp(u, "ID3", 3) == 0 ||
           (u[0] == 0xFF && (u[1] & 0xE0) == 0xE0) || std::memcmp(u, "fLaC", 4) == 0;
}

void check_projector_file(const std::string & path) {
    std::error_code ec;
    const auto      st = std::filesystem::status(path, ec);
    if (!std::filesystem::exists(st)) {
        throw file_not_found_error("projector file not found: '" + path + "'");
    }
    std::ifstream f(path, std::ios::binary);
    char          magic[4] = {};
    if (std::filesystem::is_directory(st) || !f.read(magic, sizeof(magic)) || std::memcmp(magic, "GGUF", 4) != 0) {
        throw model_load_error("'" + path + "' is not a GGUF projector file");
    }
}

// stb_image decodes a truncated JPEG without complaint (the missing rows come out gray): a JPEG must
// end its scan data with the end-of-image marker.
bool truncated_jpeg(const std::string & b) {
    if (b.size() < 3 || static_cast<unsigned char>(b[0]) != 0xFF || static_cast<unsigned char>(b[1]) != 0xD8) {
        return false;
    }
    const size_t sos = b.find("\xFF\xDA", 2);
    const size_t eoi = b.rfind("\xFF\xD9");
    return sos == std::string::npos || eoi == std::string::npos || eoi < sos;
}

size_t count_markers(const std::string & text) {
    const std::string marker = mtmd_default_marker();
    size_t            n      = 0;
    for (size_t at = text.find(marker); at != std::string::npos; at = text.find(marker, at + marker.size())) {
        ++n;
    }
    return n;
}

}  // namespace

std::string Chunk::type_name() const {
    switch (type()) {
        case MTMD_INPUT_CHUNK_TYPE_IMAGE: return "image";
        case MTMD_INPUT_CHUNK_TYPE_AUDIO: return "audio";
        default: return "text";
    }
}

std::string Chunk::id() const {
    const char * id = mtmd_input_chunk_get_id(chunk.get());
    return id == nullptr ? std::string() : std::string(id);
}

std::vector<llama_token> Chunk::tokens() const {
    size_t              n = 0;
    const llama_token * t = mtmd_input_chunk_get_tokens_text(chunk.get(), &n);
    return t == nullptr ? std::vector<llama_token>() : std::vector<llama_token>(t, t + n);
}

Projector::Projector(Model &             model,
                     const std::string & path,
                     bool                use_gpu,
                     int                 n_threads,
                     int                 image_min_tokens,
                     int                 image_max_tokens,
                     bool                warmup) :
    model_(model.shared()), path_(path) {
    backend_ensure_init();
    check_projector_file(path);
    mtmd_context_params p = mtmd_context_params_default();
    p.use_gpu             = use_gpu;
    p.print_timings       = false;
    p.n_threads = n_threads > 0 ? n_threads : static_cast<int>(std::max(1U, std::thread::hardware_concurrency()));
    p.warmup    = warmup;
    p.image_min_tokens = image_min_tokens;
    p.image_max_tokens = image_max_tokens;
    std::string reason;
    {
        py::gil_scoped_release nogil;
        log_capture            capture;
        try {
            ctx_ = mtmd_init_from_file(path.c_str(), model_.get(), p);
        } catch (const std::exception & e) {
            ctx_   = nullptr;
            reason = e.what();
        }
        if (ctx_ == nullptr && reason.empty()) {
            reason = capture.problems();
        }
    }
    if (ctx_ == nullptr) {
        throw model_load_error("cannot load the projector '" + path + "'" + (reason.empty() ? "" : ": " + reason));
    }
    vision_      = mtmd_support_vision(ctx_);
    audio_       = mtmd_support_audio(ctx_);
    mrope_       = mtmd_decode_use_mrope(ctx_);
    sample_rate_ = mtmd_get_audio_sample_rate(ctx_);
    n_embd_      = llama_model_n_embd_inp(model_.get());
}

Projector::~Projector() {
    if (ctx_ != nullptr) {
        mtmd_free(ctx_);
    }
}

Projector::use Projector::acquire() {
    std::unique_lock<std::mutex> lock(mtx_);
    if (ctx_ == nullptr) {
        throw llama_error("this Projector is closed");
    }
    return use{ std::move(lock), ctx_ };
}

void Projector::close() {
    py::gil_scoped_release      nogil;
    std::lock_guard<std::mutex> lock(mtx_);
    if (ctx_ != nullptr) {
        mtmd_free(ctx_);
        ctx_ = nullptr;
    }
}

Media Projector::media(const std::string & bytes, uint64_t max_pixels) {
    if (bytes.empty()) {
        throw std::invalid_argument("the media file is empty");
    }
    const bool audio = looks_like_audio(bytes);
    if (audio && !audio_) {
        throw std::invalid_argument("this projector takes no audio (the model has no audio encoder)");
    }
    const auto * buf = reinterpret_cast<const unsigned char *>(bytes.data());
    if (!audio) {
        int nx = 0, ny = 0, nc = 0;
        if (bytes.size() > static_cast<size_t>(INT32_MAX) ||
            stbi_info_from_memory(buf, static_cast<int>(bytes.size()), &nx, &ny, &nc) == 0) {
            throw std::invalid_argument(
                "not an image or audio file pyllama can decode (images: JPEG, PNG, BMP, GIF, TGA, PSD, HDR, PNM; "
                "audio: WAV, MP3, FLAC)");
        }
        if (!vision_) {
            throw std::invalid_argument("this projector takes no images (the model has no vision encoder)");
        }
        if (truncated_jpeg(bytes)) {
            throw std::invalid_argument("the JPEG image is truncated (it has no end-of-image marker after its data)");
        }
        if (nx <= 0 || ny <= 0 || static_cast<uint64_t>(nx) * static_cast<uint64_t>(ny) > max_pixels) {
            throw std::invalid_argument("the image is " + std::to_string(nx) + " x " + std::to_string(ny) +
                                        " pixels, more than the " + std::to_string(max_pixels) +
                                        " allowed (max_pixels)");
        }
    }
    mtmd_helper_bitmap_wrapper w{};
    std::string                reason;
    {
        py::gil_scoped_release nogil;
        auto                   u = acquire();
        log_capture            capture;
        try {
            w = mtmd_helper_bitmap_init_from_buf(u.ctx, buf, bytes.size(), false);
        } catch (const std::bad_alloc &) {
            reason = "not enough memory to decode it";
        }
        if (w.bitmap == nullptr && reason.empty()) {
            reason = capture.problems();
        }
    }
    if (w.bitmap == nullptr) {
        throw std::invalid_argument(std::string("the ") + (audio ? "audio" : "image") + " cannot be decoded" +
                                    (reason.empty() ? "" : ": " + reason));
    }
    Media m;
    m.bitmap.reset(w.bitmap, mtmd_bitmap_free);
    const char * id = mtmd_bitmap_get_id(w.bitmap);
    m.id            = id == nullptr ? std::string() : std::string(id);
    return m;
}

std::vector<Chunk> Projector::tokenize(const std::string &        text,
                                       const std::vector<Media> & media,
                                       bool                       add_special,
                                       bool                       parse_special) {
    const size_t n_markers = count_markers(text);
    if (n_markers != media.size()) {
        throw invalid_request_error("the text has " + std::to_string(n_markers) + " media markers ('" +
                                        mtmd_default_marker() + "') for " + std::to_string(media.size()) +
                                        " media: one marker per image or audio",
                                    "media");
    }
    std::vector<const mtmd_bitmap *> bitmaps;
    for (const auto & m : media) {
        bitmaps.push_back(m.bitmap.get());
    }
    std::unique_ptr<mtmd_input_chunks, decltype(&mtmd_input_chunks_free)> chunks(mtmd_input_chunks_init(),
                                                                                 mtmd_input_chunks_free);
    mtmd_input_text in{ text.c_str(), text.size(), add_special, parse_special };
    int32_t         rc = 0;
    std::string     reason;
    {
        py::gil_scoped_release nogil;
        auto                   u = acquire();
        log_capture            capture;
        try {
            rc = mtmd_tokenize(u.ctx, chunks.get(), &in, bitmaps.data(), bitmaps.size());
        } catch (const std::exception & e) {
            rc     = -1;
            reason = e.what();
        }
        if (rc != 0 && reason.empty()) {
            reason = capture.problems();
        }
    }
    if (rc != 0) {
        throw std::invalid_argument("the prompt's media cannot be prepared" + (reason.empty() ? "" : ": " + reason));
    }
    std::vector<Chunk> out;
    for (size_t i = 0; i < mtmd_input_chunks_size(chunks.get()); ++i) {
        Chunk c;
        c.chunk.reset(mtmd_input_chunk_copy(mtmd_input_chunks_get(chunks.get(), i)), mtmd_input_chunk_free);
        out.push_back(std::move(c));
    }
    return out;
}

std::vector<float> Projector::encode(const Chunk & chunk) {
    if (chunk.type() == MTMD_INPUT_CHUNK_TYPE_TEXT) {
        throw std::invalid_argument("a text chunk has no media to encode");
    }
    auto        u = acquire();
    log_capture capture;
    int32_t     rc = 0;
    std::string reason;
    try {
        rc = mtmd_encode_chunk(u.ctx, chunk.chunk.get());
    } catch (const std::exception & e) {
        rc     = -1;
        reason = e.what();
    }
    if (rc != 0) {
        throw llama_error(
            "encoding the " + chunk.type_name() + " failed" +
            (reason.empty() ? capture.problems().empty() ? "" : ": " + capture.problems() : ": " + reason));
    }
    const float *      e = mtmd_get_output_embd(u.ctx);
    const size_t       n = chunk.n_tokens() * static_cast<size_t>(n_embd_);
    std::vector<float> out(e, e + n);
    n_encoded_.fetch_add(1);
    return out;
}

int32_t Projector::decode_media(Context &                  ctx,
                                const Chunk &              chunk,
                                const std::vector<float> & embd,
                                llama_pos                  n_past,
                                llama_seq_id               seq_id,
                                int32_t                    n_batch,
                                bool                       logits_last) {
    const size_t n = chunk.n_tokens();
    if (embd.size() != n * static_cast<size_t>(n_embd_)) {
        throw std::invalid_argument("the embeddings do not match the chunk");
    }
    if (mrope_) {
        // M-RoPE positions (2-D for an image) as llama.cpp's helper lays them out; it asks for no logits
        if (logits_last) {
            throw invalid_request_error(
                "on a model with M-RoPE positions a prompt cannot end with an image or audio: put text after it",
                "prompt");
        }
        auto             p    = acquire();
        auto             u    = ctx.acquire();
        llama_pos        next = n_past;
        log_capture      capture;
        ggml_abort_scope scope(ctx.model());
        const auto       rc =
            mtmd_helper_decode_image_chunk(p.ctx, u.ctx, chunk.chunk.get(), const_cast<float *>(embd.data()), n_past,
                                           seq_id, n_batch, &next, nullptr, nullptr);
        ctx.outputs_lost_locked();
        if (rc != 0) {
            llama_memory_seq_rm(llama_get_memory(u.ctx), seq_id, n_past, -1);
            throw llama_error("decoding the " + chunk.type_name() + " failed (code " + std::to_string(rc) + ")" +
                              (capture.problems().empty() ? "" : ": " + capture.problems()));
        }
        return -1;
    }
    bool non_causal = false;
    {
        auto u     = acquire();
        non_causal = mtmd_decode_use_non_causal(u.ctx, chunk.chunk.get());
    }
    for (size_t start = 0; start < n; start += static_cast<size_t>(n_batch)) {
        const size_t len = std::min(n - start, static_cast<size_t>(n_batch));
        Batch        b;
        b.n_embd = n_embd_;
        b.embd.assign(embd.begin() + static_cast<std::ptrdiff_t>(start * n_embd_),
                      embd.begin() + static_cast<std::ptrdiff_t>((start + len) * n_embd_));
        for (size_t i = 0; i < len; ++i) {
            b.pos.push_back(n_past + static_cast<llama_pos>(start + i));
            b.seq_ids.push_back({ seq_id });
            b.logits.push_back(logits_last && start + i + 1 == n ? 1 : 0);
        }
        std::string reason;
        const auto  rc = ctx.decode_nogil(b, false, reason, non_causal);
        Context::raise_decode_error(rc, reason, false);
        if (start + len == n) {
            return logits_last ? static_cast<int32_t>(len) - 1 : -1;
        }
    }
    return -1;
}

llama_pos Projector::eval(Context &                  ctx,
                          const std::vector<Chunk> & chunks,
                          llama_pos                  n_past,
                          llama_seq_id               seq_id,
                          int32_t                    n_batch,
                          bool                       logits_last) {
    if (ctx.model() != model_.get()) {
        throw std::invalid_argument("the Context is of another model than this Projector");
    }
    if (n_batch <= 0) {
        throw std::invalid_argument("n_batch must be positive");
    }
    const llama_pos start = n_past;
    try {
        for (size_t c = 0; c < chunks.size(); ++c) {
            const bool last = logits_last && c + 1 == chunks.size();
            if (chunks[c].type() == MTMD_INPUT_CHUNK_TYPE_TEXT) {
                const auto tokens = chunks[c].tokens();
                for (size_t s = 0; s < tokens.size(); s += static_cast<size_t>(n_batch)) {
                    const size_t len = std::min(tokens.size() - s, static_cast<size_t>(n_batch));
                    Batch        b;
                    for (size_t i = 0; i < len; ++i) {
                        b.tokens.push_back(tokens[s + i]);
                        b.pos.push_back(n_past + static_cast<llama_pos>(s + i));
                        b.seq_ids.push_back({ seq_id });
                        b.logits.push_back(last && s + i + 1 == tokens.size() ? 1 : 0);
                    }
                    std::string reason;
                    const auto  rc = ctx.decode_nogil(b, false, reason);
                    Context::raise_decode_error(rc, reason, false);
                }
            } else {
                decode_media(ctx, chunks[c], encode(chunks[c]), n_past, seq_id, n_batch, last);
            }
            n_past += chunks[c].n_pos();
        }
    } catch (...) {
        try {
            auto u = ctx.acquire();
            llama_memory_seq_rm(llama_get_memory(u.ctx), seq_id, start, -1);
        } catch (...) {
        }
        throw;
    }
    return n_past;
}

// --- registration ------------------------------------------------------------------------------------

void register_projector(py::module_ & m) {
    constexpr uint64_t default_max_pixels = 8192ULL * 8192ULL;

    py::class_<Media>(m, "Media", R"doc(
An image or a piece of audio, decoded and ready for a Projector (from Projector.media()).
)doc")
        .def_property_readonly("kind", &Media::kind, "'image' or 'audio'.")
        .def_property_readonly(
            "id", [](const Media & self) { return self.id; },
            "A hash of the file's bytes: the same file gives the same id (prefix reuse compares it).")
        .def_property_readonly(
            "nx", [](const Media & self) { return self.is_audio() ? 0U : mtmd_bitmap_get_nx(self.bitmap.get()); },
            "The image's width in pixels (0 for audio).")
        .def_property_readonly(
            "ny", [](const Media & self) { return self.is_audio() ? 0U : mtmd_bitmap_get_ny(self.bitmap.get()); },
            "The image's height in pixels (0 for audio).")
        .def_property_readonly(
            "n_samples",
            [](const Media & self) {
                return self.is_audio() ? mtmd_bitmap_get_n_bytes(self.bitmap.get()) / sizeof(float) : 0;
            },
            "The audio's samples at the projector's sample rate (0 for an image).")
        .def("__repr__", [](const Media & self) {
            return self.is_audio()
                       ? "<Media audio, " + std::to_string(mtmd_bitmap_get_n_bytes(self.bitmap.get()) / sizeof(float)) +
                             " samples>"
                       : "<Media image " + std::to_string(mtmd_bitmap_get_nx(self.bitmap.get())) + "x" +
                             std::to_string(mtmd_bitmap_get_ny(self.bitmap.get())) + ">";
        });

    py::class_<Chunk>(m, "Chunk", R"doc(
One piece of a prompt tokenised by Projector.tokenize(): text tokens, or an image or audio clip that
becomes n_tokens embeddings.
)doc")
        .def_property_readonly("type", &Chunk::type_name, "'text', 'image' or 'audio'.")
        .def_property_readonly("n_tokens", &Chunk::n_tokens, "The KV cells it takes.")
        .def_property_readonly("n_pos", &Chunk::n_pos, "The positions it advances.")
        .def_property_readonly(
            "id",
            [](const Chunk & self) -> py::object {
                return self.type() == MTMD_INPUT_CHUNK_TYPE_TEXT ? py::object(py::none()) : py::str(self.id());
            },
            "The media's id (Media.id), None for text.")
        .def_property_readonly(
            "tokens",
            [](const Chunk & self) -> py::object {
                return self.type() == MTMD_INPUT_CHUNK_TYPE_TEXT ? py::object(py::cast(self.tokens()))
                                                                 : py::object(py::none());
            },
            "The text tokens, None for media.")
        .def_property_readonly(
            "core_tokens",
            [](const Chunk & self) {
                if (self.type() == MTMD_INPUT_CHUNK_TYPE_TEXT) {
                    return self.tokens();
                }
                std::vector<llama_token> out;
                const auto               id = self.id();
                for (size_t i = 0; i < self.n_tokens(); ++i) {
                    out.push_back(media_token(id, i));
                }
                return out;
            },
            "What the generation core holds for it: the text tokens, or for media n_tokens negative stand-ins "
            "derived from its id (Engine.tokens() shows them where a sequence holds media).")
        .def("__repr__", [](const Chunk & self) {
            return "<Chunk " + self.type_name() + ", " + std::to_string(self.n_tokens()) + " tokens>";
        });

    py::class_<Projector, std::shared_ptr<Projector>> cls(m, "Projector", R"doc(
A multimodal projector (an "mmproj" GGUF file) for a Model: llama.cpp's libmtmd, which turns images and
audio into embeddings the model takes in place of tokens.

Projector(model, path, *, use_gpu=True, n_threads=None, image_min_tokens=None, image_max_tokens=None,
          warmup=False)

    media = proj.media(open("cat.jpg", "rb").read())      # or proj.media_from_file("cat.jpg")
    chunks = proj.tokenize(f"Describe {pyllama.Projector.default_marker()} briefly.", [media])
    n_past = proj.eval(ctx, chunks)                        # the prompt is in ctx; ctx.logits() is next

ModelLoadError for a file that is not a projector or belongs to a model of another embedding width.
)doc");
    cls.def(py::init([](Model & model, const std::string & path, bool use_gpu, py::object n_threads,
                        py::object image_min_tokens, py::object image_max_tokens, bool warmup) {
                const auto opt = [](const py::object & o, const char * name) {
                    if (o.is_none()) {
                        return -1;
                    }
                    const int v = o.cast<int>();
                    if (v <= 0) {
                        throw std::invalid_argument(std::string(name) + " must be positive");
                    }
                    return v;
                };
                return std::make_shared<Projector>(model, path, use_gpu, opt(n_threads, "n_threads"),
                                                   opt(image_min_tokens, "image_min_tokens"),
                                                   opt(image_max_tokens, "image_max_tokens"), warmup);
            }),
            py::arg("model"), py::arg("path"), py::kw_only(), py::arg("use_gpu") = true,
            py::arg("n_threads") = py::none(), py::arg("image_min_tokens") = py::none(),
            py::arg("image_max_tokens") = py::none(), py::arg("warmup") = false, py::keep_alive<1, 2>());
    cls.def_static(
        "capabilities",
        [](const std::string & path) {
            check_projector_file(path);
            mtmd_caps caps{};
            {
                py::gil_scoped_release nogil;
                log_capture            capture;
                caps = mtmd_get_cap_from_file(path.c_str());
            }
            py::dict d;
            d["vision"] = caps.inp_vision;
            d["audio"]  = caps.inp_audio;
            return d;
        },
        py::arg("path"),
        "What a projector file takes, read from its metadata without loading it: {'vision', 'audio'}.");
    cls.def_static(
        "default_marker", [] { return std::string(mtmd_default_marker()); },
        "The text that stands for one image or audio clip in a prompt given to tokenize().");
    cls.def(
        "media",
        [](Projector & self, py::bytes data, uint64_t max_pixels) { return self.media(std::string(data), max_pixels); },
        py::arg("data"), py::kw_only(), py::arg("max_pixels") = default_max_pixels,
        "Decodes an image (JPEG, PNG, ...) or audio (WAV, MP3, FLAC) file's bytes. ValueError for anything else, "
        "for media this projector does not take, and for an image of more than max_pixels pixels (read from its "
        "header, before it is decoded).");
    cls.def(
        "media_from_file",
        [](Projector & self, const std::string & path, uint64_t max_pixels) {
            std::ifstream f(path, std::ios::binary);
            if (!f) {
                throw file_not_found_error("media file not found: '" + path + "'");
            }
            std::string data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
            return self.media(data, max_pixels);
        },
        py::arg("path"), py::kw_only(), py::arg("max_pixels") = default_max_pixels, "media() of a file's bytes.");
    cls.def("tokenize", &Projector::tokenize, py::arg("text"), py::arg("media") = std::vector<Media>{}, py::kw_only(),
            py::arg("add_special") = true, py::arg("parse_special") = true,
            "Splits text with one default_marker() per media into chunks: text tokens and media. "
            "InvalidRequestError when the markers and media do not match in number.");
    cls.def(
        "encode",
        [](Projector & self, const Chunk & chunk) {
            std::vector<float> e;
            {
                py::gil_scoped_release nogil;
                e = self.encode(chunk);
            }
            py::array_t<float> out(
                { static_cast<py::ssize_t>(chunk.n_tokens()), static_cast<py::ssize_t>(self.n_embd()) });
            std::memcpy(out.mutable_data(), e.data(), e.size() * sizeof(float));
            return out;
        },
        py::arg("chunk"), "Runs the encoder on an image or audio chunk: its embeddings, (n_tokens, n_embd) float32.");
    cls.def(
        "eval",
        [](Projector & self, Context & ctx, const std::vector<Chunk> & chunks, llama_pos n_past, llama_seq_id seq_id,
           py::object n_batch, bool logits_last) {
            int32_t nb = 0;
            {
                auto u = ctx.acquire();
                nb     = static_cast<int32_t>(llama_n_batch(u.ctx));
            }
            if (!n_batch.is_none()) {
                nb = n_batch.cast<int32_t>();
            }
            if (n_past < 0) {
                throw std::invalid_argument("n_past must be 0 or more");
            }
            py::gil_scoped_release nogil;
            return self.eval(ctx, chunks, n_past, seq_id, nb, logits_last);
        },
        py::arg("ctx"), py::arg("chunks"), py::kw_only(), py::arg("n_past") = 0, py::arg("seq_id") = 0,
        py::arg("n_batch") = py::none(), py::arg("logits_last") = true,
        "Evaluates chunks into sequence seq_id of ctx from position n_past (text decoded in pieces of n_batch, "
        "default the Context's; each media encoded, then its embeddings decoded, non-causally where the model "
        "wants it); returns the next position. With logits_last, ctx.logits() then holds the last position's. "
        "On failure the sequence is cut back to n_past.");
    cls.def_property_readonly("supports_vision", &Projector::supports_vision, "Whether it takes images.");
    cls.def_property_readonly("supports_audio", &Projector::supports_audio, "Whether it takes audio.");
    cls.def_property_readonly(
        "audio_sample_rate",
        [](const Projector & self) -> py::object {
            return self.supports_audio() ? py::object(py::int_(self.audio_sample_rate())) : py::object(py::none());
        },
        "The sample rate audio is resampled to, None without audio.");
    cls.def_property_readonly("n_embd", &Projector::n_embd, "The width of its embeddings (the model's).");
    cls.def_property_readonly("n_encoded", &Projector::n_encoded, "How many media chunks it has encoded.");
    cls.def_property_readonly("path", &Projector::path);
    cls.def_property_readonly("closed", &Projector::closed);
    cls.def("close", &Projector::close, "Frees the projector now (waits for a use in progress).");
    cls.def("__enter__", [](py::object self) { return self; });
    cls.def("__exit__", [](Projector & self, py::args) { self.close(); });
}

}  // namespace pyllama
