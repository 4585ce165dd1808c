// Model: loading, metadata, vocabulary and tokenizer.

#include "model.h"

#include "gguf.h"
#include "rpc.h"

#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <optional>
#include <string_view>

namespace pyllama {

namespace {

std::string type_name(const py::handle & h) {
    return py::str(py::type::of(h).attr("__name__"));
}

bool interpreter_finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
    return Py_IsFinalizing() != 0;
#else
    return _Py_IsFinalizing() != 0;
#endif
}

llama_split_mode parse_split_mode(const std::string & s) {
    if (s == "none") {
        return LLAMA_SPLIT_MODE_NONE;
    }
    if (s == "layer") {
        return LLAMA_SPLIT_MODE_LAYER;
    }
    if (s == "row") {
        return LLAMA_SPLIT_MODE_ROW;
    }
    if (s == "tensor") {
        return LLAMA_SPLIT_MODE_TENSOR;
    }
    throw std::invalid_argument("split_mode must be 'none', 'layer', 'row' or 'tensor', not '" + s + "'");
}

llama_load_mode load_mode_for(const py::object & use_mmap, bool use_mlock) {
    if (use_mmap.is_none()) {
        return use_mlock ? LLAMA_LOAD_MODE_MMAP_MLOCK : LLAMA_LOAD_MODE_AUTO;
    }
    const bool mmap = use_mmap.cast<bool>();
    if (mmap) {
        return use_mlock ? LLAMA_LOAD_MODE_MMAP_MLOCK : LLAMA_LOAD_MODE_MMAP;
    }
    return use_mlock ? LLAMA_LOAD_MODE_MLOCK : LLAMA_LOAD_MODE_NONE;
}

std::vector<llama_model_kv_override> parse_kv_overrides(const py::dict & overrides) {
    std::vector<llama_model_kv_override> out;
    for (auto item : overrides) {
        if (!py::isinstance<py::str>(item.first)) {
            throw std::invalid_argument("kv_overrides keys must be str (GGUF metadata keys)");
        }
        const std::string key = item.first.cast<std::string>();
        if (key.empty() || key.size() >= sizeof(llama_model_kv_override::key)) {
            throw std::invalid_argument("kv_overrides key '" + key + "' must be 1 to 127 bytes long");
        }
        llama_model_kv_override kv{};
        std::memcpy(kv.key, key.data(), key.size());
        py::handle v = item.second;
        if (py::isinstance<py::bool_>(v)) {
            kv.tag      = LLAMA_KV_OVERRIDE_TYPE_BOOL;
            kv.val_bool = v.cast<bool>();
        } else if (py::isinstance<py::int_>(v)) {
            kv.tag = LLAMA_KV_OVERRIDE_TYPE_INT;
            try {
                kv.val_i64 = v.cast<int64_t>();
            } catch (const py::cast_error &) {
                throw std::invalid_argument("kv_overrides['" + key + "'] does not fit in a 64-bit integer");
            }
        } else if (py::isinstance<py::float_>(v)) {
            kv.tag     = LLAMA_KV_OVERRIDE_TYPE_FLOAT;
            kv.val_f64 = v.cast<double>();
        } else if (py::isinstance<py::str>(v)) {
            const std::string s = v.cast<std::string>();
            if (s.size() >= sizeof(kv.val_str)) {
                throw std::invalid_argument("kv_overrides['" + key + "'] is longer than 127 bytes");
            }
            kv.tag = LLAMA_KV_OVERRIDE_TYPE_STR;
            std::memcpy(kv.val_str, s.data(), s.size());
        } else {
            throw std::invalid_argument("kv_overrides['" + key + "'] must be a bool, int, float or str, not " +
                                        type_name(v));
        }
        out.push_back(kv);
    }
    if (!out.empty()) {
        out.push_back(llama_model_kv_override{});  // terminator: empty key
    }
    return out;
}

struct progress_state {
    py::object                             fn;
    std::unique_ptr<py::error_already_set> error;
    bool                                   cancelled = false;
};

bool progress_trampoline(float progress, void * user_data) {
    auto *                 st = static_cast<progress_state *>(user_data);
    py::gil_scoped_acquire gil;
    if (st->error || st->cancelled) {
        return false;
    }
    try {
        py::object r = st->fn(progress);
        if (!r.is_none() && PyObject_IsTrue(r.ptr()) == 0) {
            st->cancelled = true;
            return false;
        }
        return true;
    } catch (py::error_already_set & e) {
        st->error = std::make_unique<py::error_already_set>(std::move(e));
        return false;
    }
}

void check_gguf_file(const std::string & path) {
    namespace fs = std::filesystem;
    std::error_code ec;
    const auto      st = fs::status(path, ec);
    if (!fs::exists(st)) {
        throw file_not_found_error("model file not found: '" + path + "'");
    }
    if (fs::is_directory(st)) {
        throw model_load_error("'" + path + "' is a directory, not a GGUF model file");
    }
    FILE * f = std::fopen(path.c_str(), "rb");
    if (f == nullptr) {
        throw model_load_error("cannot open model file '" + path + "': " + std::strerror(errno));
    }
    char         magic[4] = {};
    const size_t n        = std::fread(magic, 1, sizeof(magic), f);
    std::fclose(f);
    if (n < sizeof(magic) || std::memcmp(magic, "GGUF", 4) != 0) {
        throw model_load_error("'" + path + "' is not a GGUF file (it does not start with the GGUF magic)");
    }
}

// llama.cpp's loader guards some of the file's metadata with GGML_ASSERT, which aborts the process
// (src/llama-model.cpp load_hparams, src/llama-vocab.cpp load). A model file is untrusted input, so
// those preconditions are checked here first, on the metadata as the loader will see it: the file's
// values with the caller's kv_overrides applied. A file gguf cannot parse is left to the loader,
// which reports why.
class gguf_precheck {
  public:
    gguf_precheck(const std::string & path, const std::vector<llama_model_kv_override> & overrides) :
        overrides_(overrides) {
        gguf_init_params params = { /*no_alloc =*/true, /*ctx =*/nullptr };
        ctx_                    = gguf_init_from_file(path.c_str(), params);
    }

    ~gguf_precheck() {
        if (ctx_ != nullptr) {
            gguf_free(ctx_);
        }
    }

    // Throws llama_error naming the first problem.
    void run(bool vocab_only) const {
        if (ctx_ == nullptr) {
            return;
        }
        check_tokens();
        if (vocab_only) {
            return;
        }
        const int64_t ia = gguf_find_key(ctx_, "general.architecture");
        if (ia < 0 || gguf_get_kv_type(ctx_, ia) != GGUF_TYPE_STRING) {
            return;  // the loader refuses this itself
        }
        const std::string arch = gguf_get_val_str(ctx_, ia);
        const auto        key  = [&](const char * suffix) {
            return arch + "." + suffix;
        };

        const auto n_layer = get_int(key("block_count"));
        if (n_layer && (*n_layer <= 0 || *n_layer > LLAMA_MAX_LAYERS_)) {
            fail(key("block_count") + " is " + std::to_string(*n_layer) + "; it must be in 1.." +
                 std::to_string(LLAMA_MAX_LAYERS_));
        }
        int64_t n_expert   = get_int(key("expert_count")).value_or(0);
        int64_t n_used     = get_int(key("expert_used_count")).value_or(0);
        int64_t n_groups   = get_int(key("expert_group_count")).value_or(0);
        int64_t n_grp_used = get_int(key("expert_group_used_count")).value_or(0);
        if ((arch == "hunyuan-vl" || arch == "hunyuan-dense") && n_expert <= 1) {
            n_expert = n_used = 0;
        }
        if (n_expert < 0 || n_expert > LLAMA_MAX_EXPERTS_) {
            fail(key("expert_count") + " is " + std::to_string(n_expert) + "; it must be in 0.." +
                 std::to_string(LLAMA_MAX_EXPERTS_));
        }
        if (n_used < 0 || n_used > n_expert) {
            fail(key("expert_used_count") + " is " + std::to_string(n_used) + "; it must be in 0.." +
                 std::to_string(n_expert) + " (the expert count)");
        }
        if (n_expert > 0) {
            if (n_used == 0) {
                fail(key("expert_used_count") + " is 0 for a model with experts");
            }
            if (n_groups < 0 || n_groups >= n_expert) {
                fail(key("expert_group_count") + " must be smaller than the expert count");
            }
            if (n_groups > 1 && (n_expert % n_groups != 0 || n_grp_used <= 0 || n_grp_used >= n_groups)) {
                fail(key("expert_group_count") + " and " + key("expert_group_used_count") + " are inconsistent");
            }
        } else if (n_used != 0 || n_groups != 0) {
            fail(key("expert_used_count") + " and " + key("expert_group_count") + " must be 0 without experts");
        }
        if (const auto posnet = get_int(key("posnet.block_count"))) {
            if (n_layer && *posnet > *n_layer) {
                fail(key("posnet.block_count") + " is larger than " + key("block_count"));
            }
        }
        if (const auto convnext = get_int(key("convnext.block_count"))) {
            if (n_layer && *convnext > *n_layer) {
                fail(key("convnext.block_count") + " is larger than " + key("block_count"));
            }
        }
        if (const auto scaling = get_str(key("rope.scaling.type"))) {
            if (*scaling != "none" && *scaling != "linear" && *scaling != "yarn" && *scaling != "longrope") {
                fail(key("rope.scaling.type") + " is '" + *scaling + "'; llama.cpp knows none, linear, yarn, longrope");
            }
        }
    }

  private:
    static constexpr int64_t LLAMA_MAX_LAYERS_  = 512;   // src/llama-hparams.h at the pinned commit
    static constexpr int64_t LLAMA_MAX_EXPERTS_ = 1024;  // idem

    gguf_context *                               ctx_ = nullptr;
    const std::vector<llama_model_kv_override> & overrides_;

    [[noreturn]] static void fail(const std::string & why) { throw model_load_error("invalid model metadata: " + why); }

    const llama_model_kv_override * override_for(const std::string & key) const {
        for (const auto & kv : overrides_) {
            if (kv.key[0] != '\0' && key == kv.key) {
                return &kv;
            }
        }
        return nullptr;
    }

    std::optional<int64_t> get_int(const std::string & key) const {
        if (const auto * kv = override_for(key)) {
            if (kv->tag == LLAMA_KV_OVERRIDE_TYPE_INT) {
                return kv->val_i64;
            }
        }
        const int64_t i = gguf_find_key(ctx_, key.c_str());
        if (i < 0) {
            return std::nullopt;
        }
        switch (gguf_get_kv_type(ctx_, i)) {
            case GGUF_TYPE_UINT8: return gguf_get_val_u8(ctx_, i);
            case GGUF_TYPE_INT8: return gguf_get_val_i8(ctx_, i);
            case GGUF_TYPE_UINT16: return gguf_get_val_u16(ctx_, i);
            case GGUF_TYPE_INT16: return gguf_get_val_i16(ctx_, i);
            case GGUF_TYPE_UINT32: return gguf_get_val_u32(ctx_, i);
            case GGUF_TYPE_INT32: return gguf_get_val_i32(ctx_, i);
            case GGUF_TYPE_UINT64: {
                const uint64_t v = gguf_get_val_u64(ctx_, i);
                return v > static_cast<uint64_t>(INT64_MAX) ? INT64_MAX : static_cast<int64_t>(v);
            }
            case GGUF_TYPE_INT64: return gguf_get_val_i64(ctx_, i);
            default: return std::nullopt;  // a wrong type is refused by the loader itself
        }
    }

    std::optional<std::string> get_str(const std::string & key) const {
        if (const auto * kv = override_for(key)) {
            if (kv->tag == LLAMA_KV_OVERRIDE_TYPE_STR) {
                return std::string(kv->val_str);
            }
        }
        const int64_t i = gguf_find_key(ctx_, key.c_str());
        if (i < 0 || gguf_get_kv_type(ctx_, i) != GGUF_TYPE_STRING) {
            return std::nullopt;
        }
        return std::string(gguf_get_val_str(ctx_, i));
    }

    // The vocabulary loader keys its text->id map by each token's text read as a C string (an
    // empty one becomes "[EMPTY_<id>]") and asserts that no two tokens share a text.
    void check_tokens() const {
        const int64_t i = gguf_find_key(ctx_, "tokenizer.ggml.tokens");
        if (i < 0 || gguf_get_kv_type(ctx_, i) != GGUF_TYPE_ARRAY || gguf_get_arr_type(ctx_, i) != GGUF_TYPE_STRING) {
            return;
        }
        const size_t                                 n = gguf_get_arr_n(ctx_, i);
        std::unordered_map<std::string_view, size_t> seen;
        std::vector<std::string>                     empties;
        seen.reserve(n);
        for (size_t t = 0; t < n; ++t) {
            std::string_view word(gguf_get_arr_str(ctx_, i, t));
            if (word.empty()) {
                empties.push_back("[EMPTY_" + std::to_string(t) + "]");
                continue;
            }
            const auto [it, inserted] = seen.emplace(word, t);
            if (!inserted) {
                fail("tokens " + std::to_string(it->second) + " and " + std::to_string(t) +
                     " of tokenizer.ggml.tokens have the same text");
            }
        }
        for (const auto & e : empties) {
            if (seen.count(e) != 0) {
                fail("token text '" + e + "' collides with the name given to an empty token");
            }
        }
    }
};

// Checks that bytes from Python are UTF-8 before a tokenizer sees them.
void check_utf8(const char * s, size_t n) {
    size_t i = 0;
    while (i < n) {
        const auto c   = static_cast<unsigned char>(s[i]);
        size_t     len = 0;
        uint32_t   cp  = 0;
        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xE0) == 0xC0) {
            len = 2;
            cp  = c & 0x1F;
        } else if ((c & 0xF0) == 0xE0) {
            len = 3;
            cp  = c & 0x0F;
        } else if ((c & 0xF8) == 0xF0) {
            len = 4;
            cp  = c & 0x07;
        } else {
            throw std::invalid_argument("text is not valid UTF-8 (bad byte 0x" + std::to_string(c) + " at offset " +
                                        std::to_string(i) + ")");
        }
        if (i + len > n) {
            throw std::invalid_argument("text is not valid UTF-8 (truncated character at offset " + std::to_string(i) +
                                        ")");
        }
        for (size_t k = 1; k < len; ++k) {
            const auto cc = static_cast<unsigned char>(s[i + k]);
            if ((cc & 0xC0) != 0x80) {
                throw std::invalid_argument("text is not valid UTF-8 (bad continuation byte at offset " +
                                            std::to_string(i + k) + ")");
            }
            cp = (cp << 6) | (cc & 0x3F);
        }
        const bool overlong = (len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000);
        if (overlong || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
            throw std::invalid_argument("text is not valid UTF-8 (invalid code point at offset " + std::to_string(i) +
                                        ")");
        }
        i += len;
    }
}

// The UTF-8 bytes of a str, or the bytes of a bytes-like object (checked to be UTF-8).
std::string text_arg(const py::handle & text) {
    if (py::isinstance<py::str>(text)) {
        Py_ssize_t   n = 0;
        const char * s = PyUnicode_AsUTF8AndSize(text.ptr(), &n);
        if (s == nullptr) {
            throw py::error_already_set();
        }
        return std::string(s, static_cast<size_t>(n));
    }
    if (py::isinstance<py::bytes>(text) || py::isinstance<py::bytearray>(text)) {
        std::string s = py::isinstance<py::bytes>(text) ? std::string(text.cast<py::bytes>())
                                                        : std::string(text.cast<py::bytearray>());
        check_utf8(s.data(), s.size());
        return s;
    }
    throw py::type_error("text must be str or bytes, not " + type_name(text));
}

std::vector<llama_token> tokens_arg(const py::handle & tokens, const llama_vocab * vocab) {
    std::vector<llama_token> out;
    for (auto t : tokens) {
        int64_t v;
        try {
            v = t.cast<int64_t>();
        } catch (const py::cast_error &) {
            throw py::type_error("tokens must be integers");
        }
        if (v < INT32_MIN || v > INT32_MAX) {
            throw std::invalid_argument("token id " + std::to_string(v) + " is out of range");
        }
        Model::check_token(vocab, static_cast<llama_token>(v));
        out.push_back(static_cast<llama_token>(v));
    }
    return out;
}

py::object token_or_none(llama_token t) {
    if (t == LLAMA_TOKEN_NULL) {
        return py::none();
    }
    return py::int_(t);
}

std::string meta_string(const llama_model * model, int32_t i, bool key) {
    std::string buf(256, '\0');
    for (int attempt = 0; attempt < 2; ++attempt) {
        const int32_t n = key ? llama_model_meta_key_by_index(model, i, buf.data(), buf.size())
                              : llama_model_meta_val_str_by_index(model, i, buf.data(), buf.size());
        if (n < 0) {
            return {};
        }
        if (static_cast<size_t>(n) < buf.size()) {
            buf.resize(static_cast<size_t>(n));
            return buf;
        }
        buf.assign(static_cast<size_t>(n) + 1, '\0');
    }
    return {};
}

const char * vocab_type_name(enum llama_vocab_type t) {
    switch (t) {
        case LLAMA_VOCAB_TYPE_NONE: return "none";
        case LLAMA_VOCAB_TYPE_SPM: return "spm";
        case LLAMA_VOCAB_TYPE_BPE: return "bpe";
        case LLAMA_VOCAB_TYPE_WPM: return "wpm";
        case LLAMA_VOCAB_TYPE_UGM: return "ugm";
        case LLAMA_VOCAB_TYPE_RWKV: return "rwkv";
        case LLAMA_VOCAB_TYPE_PLAMO2: return "plamo2";
    }
    return "unknown";
}

}  // namespace

py::str utf8_lenient(const std::string & s) {
    PyObject * o = PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "replace");
    if (o == nullptr) {
        throw py::error_already_set();
    }
    return py::reinterpret_steal<py::str>(o);
}

Model::Model(const std::string &              path,
             int                              n_gpu_layers,
             const std::string &              split_mode,
             int                              main_gpu,
             const std::vector<float> &       tensor_split,
             py::object                       use_mmap,
             bool                             use_mlock,
             bool                             vocab_only,
             bool                             check_tensors,
             const py::dict &                 kv_overrides,
             py::object                       progress_callback,
             bool                             repack,
             const std::vector<std::string> & rpc_servers) :
    path_(path) {
    backend_ensure_init();

    llama_model_params params                     = llama_model_default_params();
    params.n_gpu_layers                           = n_gpu_layers;
    params.split_mode                             = parse_split_mode(split_mode);
    params.load_mode                              = load_mode_for(use_mmap, use_mlock);
    params.vocab_only                             = vocab_only;
    params.check_tensors                          = check_tensors;
    params.use_extra_bufts                        = repack;
    // RPC workers first, then the local GPUs (ModelLoadError for a worker that cannot be reached)
    const std::vector<ggml_backend_dev_t> devices = model_devices(rpc_servers);
    if (!devices.empty()) {
        params.devices = const_cast<ggml_backend_dev_t *>(devices.data());
    }

    if (main_gpu < 0) {
        throw std::invalid_argument("main_gpu must be >= 0, not " + std::to_string(main_gpu));
    }
    params.main_gpu = main_gpu;

    std::vector<float> split(llama_max_devices(), 0.0f);
    if (!tensor_split.empty()) {
        if (tensor_split.size() > split.size()) {
            throw std::invalid_argument("tensor_split has " + std::to_string(tensor_split.size()) +
                                        " entries but this build supports at most " + std::to_string(split.size()) +
                                        " devices");
        }
        for (size_t i = 0; i < tensor_split.size(); ++i) {
            if (!std::isfinite(tensor_split[i]) || tensor_split[i] < 0.0f) {
                throw std::invalid_argument("tensor_split entries must be finite and >= 0");
            }
            split[i] = tensor_split[i];
        }
        params.tensor_split = split.data();
    }

    std::vector<llama_model_kv_override> overrides = parse_kv_overrides(kv_overrides);
    if (!overrides.empty()) {
        params.kv_overrides = overrides.data();
    }

    progress_state progress;
    if (!progress_callback.is_none()) {
        if (!PyCallable_Check(progress_callback.ptr())) {
            throw py::type_error("progress_callback must be callable");
        }
        progress.fn                        = progress_callback;
        params.progress_callback           = progress_trampoline;
        params.progress_callback_user_data = &progress;
    }

    check_gguf_file(path);
    {
        py::gil_scoped_release nogil;
        gguf_precheck(path, overrides).run(vocab_only);
    }

    llama_model * raw = nullptr;
    std::string   reason;
    {
        py::gil_scoped_release nogil;
        log_capture            capture;
        try {
            raw = llama_model_load_from_file(path.c_str(), params);
        } catch (const std::exception & e) {
            raw    = nullptr;
            reason = e.what();
        }
        if (raw == nullptr && reason.empty()) {
            reason = capture.problems();
        }
    }
    if (progress.error) {
        if (raw != nullptr) {
            py::gil_scoped_release nogil;
            llama_model_free(raw);
        }
        py::error_already_set e = *progress.error;
        progress.error.reset();
        throw e;
    }
    if (raw == nullptr) {
        if (progress.cancelled) {
            throw cancelled_error("loading '" + path + "' was cancelled by the progress callback");
        }
        throw model_load_error("failed to load model '" + path + "': " + (reason.empty() ? "unknown reason" : reason));
    }
    model_ = std::shared_ptr<llama_model>(raw, [](llama_model * m) {
        if (!model_failed(m)) {  // a model whose RPC worker went away is leaked (freeing it would abort)
            llama_model_free(m);
        }
    });
}

Model::~Model() {
    if (!model_) {
        return;
    }
    if (PyGILState_Check() && !interpreter_finalizing()) {
        py::gil_scoped_release              nogil;
        std::unique_lock<std::shared_mutex> lock(mtx_);
        model_.reset();
    } else {
        model_.reset();
    }
}

Model::use Model::acquire() const {
    std::shared_lock<std::shared_mutex> lock(mtx_);
    if (!model_) {
        throw llama_error("this Model is closed");
    }
    llama_model * m = model_.get();
    return use{ std::move(lock), m, llama_model_get_vocab(m) };
}

std::shared_ptr<llama_model> Model::shared() const {
    std::shared_lock<std::shared_mutex> lock(mtx_);
    if (!model_) {
        throw llama_error("this Model is closed");
    }
    return model_;
}

void Model::close() {
    bool was_open = false;
    {
        py::gil_scoped_release       nogil;
        std::shared_ptr<llama_model> doomed;
        {
            std::unique_lock<std::shared_mutex> lock(mtx_);
            was_open = static_cast<bool>(model_);
            doomed   = std::move(model_);
        }
        doomed.reset();  // frees the model unless a Context still holds it
    }
    if (!was_open) {
        throw llama_error("this Model is already closed");
    }
}

bool Model::closed() const {
    std::shared_lock<std::shared_mutex> lock(mtx_);
    return !model_;
}

void Model::check_token(const llama_vocab * vocab, llama_token token, const char * param) {
    const int32_t n_vocab = llama_vocab_n_tokens(vocab);
    if (token < 0 || token >= n_vocab) {
        throw invalid_request_error(std::string(*param != 0 ? param : "token") + ": token id " + std::to_string(token) +
                                        " is out of range: the vocabulary has ids 0 to " + std::to_string(n_vocab - 1),
                                    param);
    }
}

void register_model(py::module_ & m) {
    py::class_<Model> cls(m, "Model", R"doc(
A GGUF model loaded by llama.cpp.

Model(path, *, n_gpu_layers=-1, split_mode="layer", main_gpu=0, tensor_split=None,
      use_mmap=None, use_mlock=False, vocab_only=False, check_tensors=False,
      kv_overrides=None, progress_callback=None, repack=True, rpc_servers=None)

n_gpu_layers=-1 offloads every layer when a GPU backend is present (llama.cpp's default).
use_mmap=None lets llama.cpp choose how to load the file; True or False forces memory-mapping on
or off. progress_callback(progress: float) is called while loading; returning False cancels the
load (LlamaError). The GIL is released while loading. repack=False keeps the weights as the file
has them (llama.cpp's --no-repack): the CPU backend otherwise repacks some quantised types into
layouts for faster kernels, whose rounding depends on the batch's shape. rpc_servers=["host:port",
...] puts layers on llama.cpp RPC workers (pyllama.rpc_serve, llama.cpp's rpc-server) before the
local GPUs, as llama.cpp's --rpc does, for this model only; ModelLoadError when one cannot be reached.
)doc");

    cls.def(py::init<const std::string &, int, const std::string &, int, const std::vector<float> &, py::object, bool,
                     bool, bool, const py::dict &, py::object, bool, const std::vector<std::string> &>(),
            py::arg("path"), py::kw_only(), py::arg("n_gpu_layers") = -1, py::arg("split_mode") = "layer",
            py::arg("main_gpu") = 0, py::arg("tensor_split") = std::vector<float>{}, py::arg("use_mmap") = py::none(),
            py::arg("use_mlock") = false, py::arg("vocab_only") = false, py::arg("check_tensors") = false,
            py::arg("kv_overrides") = py::dict(), py::arg("progress_callback") = py::none(), py::arg("repack") = true,
            py::arg("rpc_servers") = std::vector<std::string>());

    cls.def("close", &Model::close,
            "Free the model now (a Context that uses it keeps it until the Context is freed). "
            "Closing a closed model raises LlamaError.");
    cls.def_property_readonly("closed", &Model::closed);
    cls.def_property_readonly("path", &Model::path);
    cls.def("__enter__", [](py::object self) { return self; });
    cls.def("__exit__", [](Model & self, py::args) {
        if (!self.closed()) {
            self.close();
        }
    });
    cls.def("__repr__", [](const Model & self) {
        if (self.closed()) {
            return "<pyllama.Model (closed) path='" + self.path() + "'>";
        }
        auto use = self.acquire();
        char desc[256];
        llama_model_desc(use.model, desc, sizeof(desc));
        return "<pyllama.Model '" + std::string(desc) + "' path='" + self.path() + "'>";
    });

    // --- metadata -------------------------------------------------------------------------------
    cls.def_property_readonly(
        "metadata",
        [](const Model & self) {
            auto          use = self.acquire();
            py::dict      out;
            const int32_t n = llama_model_meta_count(use.model);
            for (int32_t i = 0; i < n; ++i) {
                out[utf8_lenient(meta_string(use.model, i, true))] = utf8_lenient(meta_string(use.model, i, false));
            }
            return out;
        },
        "All scalar GGUF metadata as a dict of str to str (arrays such as the vocabulary are not included).");
    cls.def_property_readonly("description", [](const Model & self) {
        auto use = self.acquire();
        char buf[256];
        llama_model_desc(use.model, buf, sizeof(buf));
        return std::string(buf);
    });
    cls.def_property_readonly("architecture", [](const Model & self) -> py::object {
        auto use = self.acquire();
        char buf[128];
        if (llama_model_meta_val_str(use.model, "general.architecture", buf, sizeof(buf)) < 0) {
            return py::none();
        }
        return py::str(buf);
    });
    cls.def_property_readonly("name", [](const Model & self) -> py::object {
        auto          use = self.acquire();
        std::string   buf(512, '\0');
        const int32_t n = llama_model_meta_val_str(use.model, "general.name", buf.data(), buf.size());
        if (n < 0) {
            return py::none();
        }
        buf.resize(std::min<size_t>(static_cast<size_t>(n), buf.size() - 1));
        return utf8_lenient(buf);
    });
    cls.def_property_readonly(
        "size", [](const Model & self) { return llama_model_size(self.acquire().model); },
        "Total size of the weights in bytes.");
    cls.def_property_readonly("n_params",
                              [](const Model & self) { return llama_model_n_params(self.acquire().model); });
    cls.def_property_readonly("n_ctx_train",
                              [](const Model & self) { return llama_model_n_ctx_train(self.acquire().model); });
    cls.def_property_readonly("n_embd", [](const Model & self) { return llama_model_n_embd(self.acquire().model); });
    cls.def_property_readonly("n_layer", [](const Model & self) { return llama_model_n_layer(self.acquire().model); });
    cls.def_property_readonly("n_head", [](const Model & self) { return llama_model_n_head(self.acquire().model); });
    cls.def_property_readonly("n_head_kv",
                              [](const Model & self) { return llama_model_n_head_kv(self.acquire().model); });
    cls.def_property_readonly("n_swa", [](const Model & self) { return llama_model_n_swa(self.acquire().model); });
    cls.def_property_readonly("has_encoder",
                              [](const Model & self) { return llama_model_has_encoder(self.acquire().model); });
    cls.def_property_readonly("has_decoder",
                              [](const Model & self) { return llama_model_has_decoder(self.acquire().model); });
    cls.def_property_readonly("is_recurrent",
                              [](const Model & self) { return llama_model_is_recurrent(self.acquire().model); });
    cls.def_property_readonly("is_hybrid",
                              [](const Model & self) { return llama_model_is_hybrid(self.acquire().model); });
    cls.def_property_readonly("is_diffusion",
                              [](const Model & self) { return llama_model_is_diffusion(self.acquire().model); });
    cls.def_property_readonly("decoder_start_token", [](const Model & self) {
        return token_or_none(llama_model_decoder_start_token(self.acquire().model));
    });

    // --- chat templates -------------------------------------------------------------------------
    cls.def_property_readonly(
        "chat_template",
        [](const Model & self) -> py::object {
            auto         use  = self.acquire();
            const char * tmpl = llama_model_chat_template(use.model, nullptr);
            if (tmpl == nullptr) {
                return py::none();
            }
            return utf8_lenient(tmpl);
        },
        "The model's default chat template (tokenizer.chat_template), or None.");
    cls.def_property_readonly(
        "chat_templates",
        [](const Model & self) {
            auto              use = self.acquire();
            py::dict          out;
            const std::string prefix = "tokenizer.chat_template.";
            const int32_t     n      = llama_model_meta_count(use.model);
            if (const char * tmpl = llama_model_chat_template(use.model, nullptr)) {
                out["default"] = utf8_lenient(tmpl);
            }
            for (int32_t i = 0; i < n; ++i) {
                const std::string key = meta_string(use.model, i, true);
                if (key.compare(0, prefix.size(), prefix) == 0) {
                    const std::string name = key.substr(prefix.size());
                    if (const char * tmpl = llama_model_chat_template(use.model, name.c_str())) {
                        out[py::str(name)] = utf8_lenient(tmpl);
                    }
                }
            }
            return out;
        },
        "Every chat template of the model by name: 'default' and named variants such as 'tool_use'.");
    cls.def(
        "get_chat_template",
        [](const Model & self, py::object name) -> py::object {
            auto              use  = self.acquire();
            const std::string n    = name.is_none() ? std::string() : name.cast<std::string>();
            const char *      tmpl = llama_model_chat_template(use.model, name.is_none() ? nullptr : n.c_str());
            if (tmpl == nullptr) {
                return py::none();
            }
            return utf8_lenient(tmpl);
        },
        py::arg("name") = py::none(), "The chat template with this name (None: the default), or None.");

    // --- vocabulary -----------------------------------------------------------------------------
    cls.def_property_readonly("n_vocab", [](const Model & self) { return llama_vocab_n_tokens(self.acquire().vocab); });
    cls.def_property_readonly(
        "vocab_type",
        [](const Model & self) { return std::string(vocab_type_name(llama_vocab_type(self.acquire().vocab))); },
        "'spm', 'bpe', 'wpm', 'ugm', 'rwkv', 'plamo2' or 'none'.");
#define PYLLAMA_SPECIAL_TOKEN(name, fn) \
    cls.def_property_readonly(name, [](const Model & self) { return token_or_none(fn(self.acquire().vocab)); })
    PYLLAMA_SPECIAL_TOKEN("token_bos", llama_vocab_bos);
    PYLLAMA_SPECIAL_TOKEN("token_eos", llama_vocab_eos);
    PYLLAMA_SPECIAL_TOKEN("token_eot", llama_vocab_eot);
    PYLLAMA_SPECIAL_TOKEN("token_sep", llama_vocab_sep);
    PYLLAMA_SPECIAL_TOKEN("token_nl", llama_vocab_nl);
    PYLLAMA_SPECIAL_TOKEN("token_pad", llama_vocab_pad);
    PYLLAMA_SPECIAL_TOKEN("token_fim_pre", llama_vocab_fim_pre);
    PYLLAMA_SPECIAL_TOKEN("token_fim_suf", llama_vocab_fim_suf);
    PYLLAMA_SPECIAL_TOKEN("token_fim_mid", llama_vocab_fim_mid);
    PYLLAMA_SPECIAL_TOKEN("token_fim_pad", llama_vocab_fim_pad);
    PYLLAMA_SPECIAL_TOKEN("token_fim_rep", llama_vocab_fim_rep);
    PYLLAMA_SPECIAL_TOKEN("token_fim_sep", llama_vocab_fim_sep);
#undef PYLLAMA_SPECIAL_TOKEN
    cls.def_property_readonly("add_bos",
                              [](const Model & self) { return llama_vocab_get_add_bos(self.acquire().vocab); });
    cls.def_property_readonly("add_eos",
                              [](const Model & self) { return llama_vocab_get_add_eos(self.acquire().vocab); });
    cls.def_property_readonly("add_sep",
                              [](const Model & self) { return llama_vocab_get_add_sep(self.acquire().vocab); });

    cls.def(
        "token_get_text",
        [](const Model & self, llama_token token) {
            auto use = self.acquire();
            Model::check_token(use.vocab, token);
            return utf8_lenient(llama_vocab_get_text(use.vocab, token));
        },
        py::arg("token"), "The token's text as stored in the vocabulary (e.g. '▁Hello' for SentencePiece).");
    cls.def(
        "token_get_score",
        [](const Model & self, llama_token token) {
            auto use = self.acquire();
            Model::check_token(use.vocab, token);
            return llama_vocab_get_score(use.vocab, token);
        },
        py::arg("token"));
    cls.def(
        "token_get_attr",
        [](const Model & self, llama_token token) {
            auto use = self.acquire();
            Model::check_token(use.vocab, token);
            return static_cast<int>(llama_vocab_get_attr(use.vocab, token));
        },
        py::arg("token"), "The token's attribute flags (see pyllama.TokenAttr).");
    cls.def(
        "token_is_eog",
        [](const Model & self, llama_token token) {
            auto use = self.acquire();
            Model::check_token(use.vocab, token);
            return llama_vocab_is_eog(use.vocab, token);
        },
        py::arg("token"), "Whether the token ends generation (EOS, EOT, ...).");
    cls.def(
        "token_is_control",
        [](const Model & self, llama_token token) {
            auto use = self.acquire();
            Model::check_token(use.vocab, token);
            return llama_vocab_is_control(use.vocab, token);
        },
        py::arg("token"));
    cls.def(
        "token_id",
        [](const Model & self, const std::string & text) {
            auto use = self.acquire();
            std::call_once(self.piece_index_once_, [&] {
                const int32_t n = llama_vocab_n_tokens(use.vocab);
                self.piece_index_.reserve(static_cast<size_t>(n));
                for (llama_token t = 0; t < n; ++t) {
                    self.piece_index_.emplace(llama_vocab_get_text(use.vocab, t), t);
                }
            });
            auto it = self.piece_index_.find(text);
            if (it == self.piece_index_.end()) {
                throw py::key_error("no token with the text '" + text + "' in the vocabulary");
            }
            return it->second;
        },
        py::arg("text"), "The id of the token whose vocabulary text is exactly `text` (KeyError if none).");

    // --- tokenizer ------------------------------------------------------------------------------
    cls.def(
        "tokenize",
        [](const Model & self, const py::object & text, bool add_special, bool parse_special) {
            const std::string s = text_arg(text);
            if (s.size() > static_cast<size_t>(INT32_MAX) - 16) {
                throw std::invalid_argument("text is too long to tokenize (" + std::to_string(s.size()) +
                                            " bytes; the limit is 2 GiB)");
            }
            std::vector<llama_token> out;
            std::string              error;
            {
                py::gil_scoped_release nogil;
                auto                   use = self.acquire();
                try {
                    out.resize(s.size() + 8);
                    int32_t n = llama_tokenize(use.vocab, s.data(), static_cast<int32_t>(s.size()), out.data(),
                                               static_cast<int32_t>(out.size()), add_special, parse_special);
                    if (n < 0 && n != INT32_MIN) {
                        out.resize(static_cast<size_t>(-static_cast<int64_t>(n)));
                        n = llama_tokenize(use.vocab, s.data(), static_cast<int32_t>(s.size()), out.data(),
                                           static_cast<int32_t>(out.size()), add_special, parse_special);
                    }
                    if (n < 0) {
                        error = "the text gives more tokens than fit in 32 bits";
                        out.clear();
                    } else {
                        out.resize(static_cast<size_t>(n));
                    }
                } catch (const std::exception & e) {
                    error = e.what();
                }
            }
            if (!error.empty()) {
                throw llama_error("tokenize failed: " + error);
            }
            return out;
        },
        py::arg("text"), py::arg("add_special") = true, py::arg("parse_special") = false,
        "Token ids of `text` (str, or UTF-8 bytes). add_special adds BOS/EOS as the model asks; "
        "parse_special turns special-token text such as '<|im_start|>' into those tokens.");

    cls.def(
        "detokenize",
        [](const Model & self, const py::object & tokens, bool remove_special, bool unparse_special) {
            std::vector<llama_token> toks;
            {
                auto use = self.acquire();
                toks     = tokens_arg(tokens, use.vocab);
            }
            if (toks.size() > static_cast<size_t>(INT32_MAX)) {
                throw std::invalid_argument("too many tokens");
            }
            std::string out;
            {
                py::gil_scoped_release nogil;
                auto                   use = self.acquire();
                out.resize(toks.size() * 8 + 16);
                int32_t n = llama_detokenize(use.vocab, toks.data(), static_cast<int32_t>(toks.size()), out.data(),
                                             static_cast<int32_t>(std::min<size_t>(out.size(), INT32_MAX)),
                                             remove_special, unparse_special);
                if (n < 0) {
                    out.resize(static_cast<size_t>(-static_cast<int64_t>(n)));
                    n = llama_detokenize(use.vocab, toks.data(), static_cast<int32_t>(toks.size()), out.data(),
                                         static_cast<int32_t>(out.size()), remove_special, unparse_special);
                }
                out.resize(n < 0 ? 0 : static_cast<size_t>(n));
            }
            return utf8_lenient(out);
        },
        py::arg("tokens"), py::arg("remove_special") = false, py::arg("unparse_special") = false,
        "The text of `tokens` (a str; bytes that are not UTF-8 become U+FFFD). remove_special drops "
        "BOS/EOS; unparse_special renders special tokens as their text.");

    cls.def(
        "token_to_piece",
        [](const Model & self, llama_token token, bool special, int lstrip) {
            auto use = self.acquire();
            Model::check_token(use.vocab, token);
            if (lstrip < 0) {
                throw std::invalid_argument("lstrip must be >= 0");
            }
            std::string buf(64, '\0');
            int32_t     n =
                llama_token_to_piece(use.vocab, token, buf.data(), static_cast<int32_t>(buf.size()), lstrip, special);
            if (n < 0) {
                buf.resize(static_cast<size_t>(-n));
                n = llama_token_to_piece(use.vocab, token, buf.data(), static_cast<int32_t>(buf.size()), lstrip,
                                         special);
            }
            buf.resize(n < 0 ? 0 : static_cast<size_t>(n));
            return py::bytes(buf);
        },
        py::arg("token"), py::arg("special") = false, py::arg("lstrip") = 0,
        "The bytes one token renders to (may be part of a UTF-8 character). special renders control tokens.");

    py::enum_<llama_token_attr>(m, "TokenAttr", py::arithmetic(), "Token attribute flags of llama.cpp.")
        .value("UNDEFINED", LLAMA_TOKEN_ATTR_UNDEFINED)
        .value("UNKNOWN", LLAMA_TOKEN_ATTR_UNKNOWN)
        .value("UNUSED", LLAMA_TOKEN_ATTR_UNUSED)
        .value("NORMAL", LLAMA_TOKEN_ATTR_NORMAL)
        .value("CONTROL", LLAMA_TOKEN_ATTR_CONTROL)
        .value("USER_DEFINED", LLAMA_TOKEN_ATTR_USER_DEFINED)
        .value("BYTE", LLAMA_TOKEN_ATTR_BYTE)
        .value("NORMALIZED", LLAMA_TOKEN_ATTR_NORMALIZED)
        .value("LSTRIP", LLAMA_TOKEN_ATTR_LSTRIP)
        .value("RSTRIP", LLAMA_TOKEN_ATTR_RSTRIP)
        .value("SINGLE_WORD", LLAMA_TOKEN_ATTR_SINGLE_WORD);
}

}  // namespace pyllama
