// Context: llama_context with validated decode, numpy logits/embeddings, KV memory and state.
// Batch: tokens or embeddings with positions, sequence ids and output flags.

#include "context.h"
#include <pybind11/numpy.h>

#include "common.h"

#include <algorithm>
#include <cmath>
#include <csignal>
#include <cstring>
#include <map>
#include <thread>

namespace pyllama {

namespace {

// --- Ctrl-C during a decode ------------------------------------------------------------------------
// Python's SIGINT handler only records the signal; the interpreter acts on it when the main thread
// returns to it. While the main thread is inside a decode we chain a handler that also raises the
// context's abort flag, which ggml's CPU backend reads between graph nodes; then the decode returns
// "aborted" and the pending KeyboardInterrupt is raised. The handler only stores to atomics.
std::atomic<std::atomic<bool> *> g_sigint_target{ nullptr };
struct sigaction                 g_sigint_previous;

extern "C" void sigint_chain(int sig) {
    if (std::atomic<bool> * flag = g_sigint_target.load()) {
        flag->store(true);
    }
    if ((g_sigint_previous.sa_flags & SA_SIGINFO) == 0 && g_sigint_previous.sa_handler != SIG_DFL &&
        g_sigint_previous.sa_handler != SIG_IGN) {
        g_sigint_previous.sa_handler(sig);
    }
}

class sigint_guard {
  public:
    explicit sigint_guard(std::atomic<bool> & flag) {
#ifndef _WIN32
        if (!is_main_thread()) {
            return;
        }
        struct sigaction current;
        if (sigaction(SIGINT, nullptr, &current) != 0 || (current.sa_flags & SA_SIGINFO) != 0 ||
            current.sa_handler == SIG_DFL || current.sa_handler == SIG_IGN) {
            return;  // no Python handler to chain to
        }
        g_sigint_previous = current;
        g_sigint_target.store(&flag);
        struct sigaction chained = current;
        chained.sa_handler       = sigint_chain;
        installed_               = sigaction(SIGINT, &chained, nullptr) == 0;
        if (!installed_) {
            g_sigint_target.store(nullptr);
        }
#endif
    }

    ~sigint_guard() {
#ifndef _WIN32
        if (installed_) {
            sigaction(SIGINT, &g_sigint_previous, nullptr);
            g_sigint_target.store(nullptr);
        }
#endif
    }

  private:
    bool installed_ = false;

    static bool is_main_thread() { return main_thread_id() == std::this_thread::get_id(); }

  public:
    static std::thread::id & main_thread_id() {
        static std::thread::id id;
        return id;
    }
};

uint32_t kw_u32(const py::kwargs & kwargs, const char * name, uint32_t fallback, uint32_t min_value) {
    const int64_t v = kwarg<int64_t>(kwargs, "Context", name, fallback);
    if (v < static_cast<int64_t>(min_value) || v > static_cast<int64_t>(UINT32_MAX)) {
        throw std::invalid_argument(std::string(name) + " must be >= " + std::to_string(min_value) + ", not " +
                                    std::to_string(v));
    }
    return static_cast<uint32_t>(v);
}

// The KV cache types llama.cpp's tools accept (common/arg.cpp's list): the one table, also given
// to Python as kv_cache_types() (compat's enum values, the default context's memory estimate).
const ggml_type kv_cache_types[] = {
    GGML_TYPE_F32,  GGML_TYPE_F16,    GGML_TYPE_BF16, GGML_TYPE_Q8_0, GGML_TYPE_Q4_0,
    GGML_TYPE_Q4_1, GGML_TYPE_IQ4_NL, GGML_TYPE_Q5_0, GGML_TYPE_Q5_1,
};

ggml_type parse_cache_type(const char * param, const std::string & name) {
    std::string names;
    for (ggml_type t : kv_cache_types) {
        if (name == ggml_type_name(t)) {
            return t;
        }
        names += (names.empty() ? "'" : ", '") + std::string(ggml_type_name(t)) + "'";
    }
    throw invalid_request_error(std::string(param) + ": unknown KV cache type '" + name + "' (one of " + names + ")",
                                param);
}

template <typename E>
E parse_choice(const char * what, const std::string & s, const std::map<std::string, E> & choices) {
    auto it = choices.find(s);
    if (it == choices.end()) {
        std::string names;
        for (const auto & c : choices) {
            names += (names.empty() ? "'" : ", '") + c.first + "'";
        }
        throw std::invalid_argument(std::string(what) + " must be one of " + names + ", not '" + s + "'");
    }
    return it->second;
}

bool model_is_causal(const llama_model * model) {
    char arch[64] = {};
    if (llama_model_meta_val_str(model, "general.architecture", arch, sizeof(arch)) < 0) {
        return true;
    }
    char        val[16] = {};
    std::string key     = std::string(arch) + ".attention.causal";
    if (llama_model_meta_val_str(model, key.c_str(), val, sizeof(val)) < 0) {
        return true;
    }
    return std::string(val) != "false";
}

py::array_t<float> float_array(std::vector<py::ssize_t> shape) {
    return py::array_t<float>(shape);
}

void check_out_array(const py::array & out, size_t n, const char * what) {
    if (!py::isinstance<py::array_t<float>>(out) || out.dtype().kind() != 'f' || out.itemsize() != 4) {
        throw py::type_error(std::string(what) + ": out must be a float32 numpy array");
    }
    if (static_cast<size_t>(out.size()) != n || !(out.flags() & py::array::c_style) || !out.writeable()) {
        throw std::invalid_argument(std::string(what) + ": out must be a writable C-contiguous float32 array of " +
                                    std::to_string(n) + " elements");
    }
}

}  // namespace

void Batch::clear() {
    tokens.clear();
    embd.clear();
    pos.clear();
    seq_ids.clear();
    logits.clear();
}

Context::Context(Model & model, const py::kwargs & kwargs) : model_(model.shared()) {
    backend_ensure_init();
    static const std::vector<std::string> known = { "n_ctx",
                                                    "n_batch",
                                                    "n_ubatch",
                                                    "n_seq_max",
                                                    "n_threads",
                                                    "n_threads_batch",
                                                    "flash_attn",
                                                    "type_k",
                                                    "type_v",
                                                    "embeddings",
                                                    "pooling_type",
                                                    "attention_type",
                                                    "rope_scaling_type",
                                                    "rope_freq_base",
                                                    "rope_freq_scale",
                                                    "yarn_ext_factor",
                                                    "yarn_attn_factor",
                                                    "yarn_beta_fast",
                                                    "yarn_beta_slow",
                                                    "yarn_orig_ctx",
                                                    "offload_kqv",
                                                    "op_offload",
                                                    "swa_full",
                                                    "kv_unified",
                                                    "no_perf" };
    for (auto item : kwargs) {
        const std::string k = item.first.cast<std::string>();
        if (std::find(known.begin(), known.end(), k) == known.end()) {
            throw py::type_error("Context() got an unexpected keyword argument '" + k + "'");
        }
    }

    llama_context_params p     = llama_context_default_params();
    p.n_ctx                    = kw_u32(kwargs, "n_ctx", p.n_ctx, 0);
    p.n_batch                  = kw_u32(kwargs, "n_batch", p.n_batch, 1);
    p.n_ubatch                 = kw_u32(kwargs, "n_ubatch", p.n_ubatch, 1);
    p.n_seq_max                = kw_u32(kwargs, "n_seq_max", p.n_seq_max, 1);
    constexpr uint32_t max_seq = 256;  // LLAMA_MAX_SEQ in src/llama-cparams.h at the pinned commit
    if (p.n_seq_max > max_seq) {
        throw std::invalid_argument("n_seq_max must be at most " + std::to_string(max_seq));
    }
    const int32_t threads = common_cpu_get_num_math();
    p.n_threads           = static_cast<int32_t>(kw_u32(kwargs, "n_threads", threads, 1));
    p.n_threads_batch     = static_cast<int32_t>(kw_u32(kwargs, "n_threads_batch", p.n_threads, 1));
    // Refused here, before llama.cpp asserts on them: more threads than ggml's thread pool holds (or
    // than one process can sensibly start), and more sequences than a batch holds outputs for.
    const uint32_t most_threads =
        std::min<uint32_t>(GGML_MAX_N_THREADS, 8 * std::max(1u, std::thread::hardware_concurrency()));
    for (const auto & [name, value] :
         { std::pair<const char *, int32_t>{ "n_threads", p.n_threads }, { "n_threads_batch", p.n_threads_batch } }) {
        if (static_cast<uint32_t>(value) > most_threads) {
            throw invalid_request_error(std::string(name) + " must be at most " + std::to_string(most_threads) +
                                            " (8 per CPU of this machine, and ggml's limit of " +
                                            std::to_string(GGML_MAX_N_THREADS) + ")",
                                        name);
        }
    }
    if (p.n_seq_max > p.n_batch) {
        throw invalid_request_error("n_seq_max (" + std::to_string(p.n_seq_max) + ") must be at most n_batch (" +
                                        std::to_string(p.n_batch) + "): a batch holds one output per sequence",
                                    "n_seq_max");
    }

    if (kwargs.contains("flash_attn") && !kwargs["flash_attn"].is_none()) {
        py::handle fa = kwargs["flash_attn"];
        if (py::isinstance<py::bool_>(fa)) {
            p.flash_attn_type = fa.cast<bool>() ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
        } else {
            p.flash_attn_type = parse_choice<llama_flash_attn_type>(
                "flash_attn", kwarg<std::string>(kwargs, "Context", "flash_attn", "auto"),
                { { "auto", LLAMA_FLASH_ATTN_TYPE_AUTO },
                  { "on", LLAMA_FLASH_ATTN_TYPE_ENABLED },
                  { "off", LLAMA_FLASH_ATTN_TYPE_DISABLED } });
        }
    }
    if (kwargs.contains("type_k") && !kwargs["type_k"].is_none()) {
        p.type_k = parse_cache_type("type_k", kwarg<std::string>(kwargs, "Context", "type_k", "f16"));
    }
    if (kwargs.contains("type_v") && !kwargs["type_v"].is_none()) {
        p.type_v = parse_cache_type("type_v", kwarg<std::string>(kwargs, "Context", "type_v", "f16"));
    }
    p.embeddings = kwarg<bool>(kwargs, "Context", "embeddings", p.embeddings);
    if (kwargs.contains("pooling_type") && !kwargs["pooling_type"].is_none()) {
        p.pooling_type = parse_choice<enum llama_pooling_type>(
            "pooling_type", kwarg<std::string>(kwargs, "Context", "pooling_type", ""),
            { { "none", LLAMA_POOLING_TYPE_NONE },
              { "mean", LLAMA_POOLING_TYPE_MEAN },
              { "cls", LLAMA_POOLING_TYPE_CLS },
              { "last", LLAMA_POOLING_TYPE_LAST },
              { "rank", LLAMA_POOLING_TYPE_RANK } });
    }
    if (kwargs.contains("attention_type") && !kwargs["attention_type"].is_none()) {
        p.attention_type = parse_choice<llama_attention_type>(
            "attention_type", kwarg<std::string>(kwargs, "Context", "attention_type", ""),
            { { "causal", LLAMA_ATTENTION_TYPE_CAUSAL }, { "non_causal", LLAMA_ATTENTION_TYPE_NON_CAUSAL } });
    }
    if (kwargs.contains("rope_scaling_type") && !kwargs["rope_scaling_type"].is_none()) {
        p.rope_scaling_type = parse_choice<llama_rope_scaling_type>(
            "rope_scaling_type", kwarg<std::string>(kwargs, "Context", "rope_scaling_type", ""),
            { { "none", LLAMA_ROPE_SCALING_TYPE_NONE },
              { "linear", LLAMA_ROPE_SCALING_TYPE_LINEAR },
              { "yarn", LLAMA_ROPE_SCALING_TYPE_YARN },
              { "longrope", LLAMA_ROPE_SCALING_TYPE_LONGROPE } });
    }
    p.rope_freq_base   = kwarg<float>(kwargs, "Context", "rope_freq_base", p.rope_freq_base);
    p.rope_freq_scale  = kwarg<float>(kwargs, "Context", "rope_freq_scale", p.rope_freq_scale);
    p.yarn_ext_factor  = kwarg<float>(kwargs, "Context", "yarn_ext_factor", p.yarn_ext_factor);
    p.yarn_attn_factor = kwarg<float>(kwargs, "Context", "yarn_attn_factor", p.yarn_attn_factor);
    p.yarn_beta_fast   = kwarg<float>(kwargs, "Context", "yarn_beta_fast", p.yarn_beta_fast);
    p.yarn_beta_slow   = kwarg<float>(kwargs, "Context", "yarn_beta_slow", p.yarn_beta_slow);
    p.yarn_orig_ctx    = kw_u32(kwargs, "yarn_orig_ctx", p.yarn_orig_ctx, 0);
    p.offload_kqv      = kwarg<bool>(kwargs, "Context", "offload_kqv", p.offload_kqv);
    p.op_offload       = kwarg<bool>(kwargs, "Context", "op_offload", p.op_offload);
    p.swa_full         = kwarg<bool>(kwargs, "Context", "swa_full", p.swa_full);
    p.kv_unified       = kwarg<bool>(kwargs, "Context", "kv_unified", p.kv_unified);
    p.no_perf          = kwarg<bool>(kwargs, "Context", "no_perf", false);  // performance counters on by default
    if (p.rope_freq_base < 0 || p.rope_freq_scale < 0) {
        throw std::invalid_argument("rope_freq_base and rope_freq_scale must be >= 0 (0: from the model)");
    }

    p.abort_callback      = abort_callback;
    p.abort_callback_data = this;

    const bool non_causal = !model_is_causal(model_.get()) || p.attention_type == LLAMA_ATTENTION_TYPE_NON_CAUSAL;
    causal_               = !non_causal;

    std::string reason;
    {
        py::gil_scoped_release nogil;
        log_capture            capture;
        try {
            ctx_ = llama_init_from_model(model_.get(), p);
        } catch (const std::exception & e) {
            ctx_   = nullptr;
            reason = e.what();
        }
        if (ctx_ == nullptr && reason.empty()) {
            reason = capture.problems();
        }
    }
    if (ctx_ == nullptr) {
        throw llama_error("failed to create the context: " + (reason.empty() ? "unknown reason" : reason));
    }
}

Context::~Context() {
    if (ctx_ == nullptr) {
        return;
    }
    // a context whose model failed inside llama.cpp (an RPC worker that went away) is leaked: freeing
    // it would ask the dead worker to free its buffers, and llama.cpp aborts when that fails
    if (PyGILState_Check()) {
        py::gil_scoped_release      nogil;
        std::lock_guard<std::mutex> lock(mtx_);
        if (!model_failed(model_.get())) {
            llama_free(ctx_);
        }
        ctx_ = nullptr;
    } else {
        if (!model_failed(model_.get())) {
            llama_free(ctx_);
        }
        ctx_ = nullptr;
    }
    model_.reset();
}

bool Context::abort_callback(void * data) {
    const auto * self = static_cast<Context *>(data);
    return self->abort_.load(std::memory_order_relaxed) || self->closing_.load(std::memory_order_relaxed);
}

Context::use Context::acquire() {
    std::unique_lock<std::mutex> lock(mtx_);
    if (ctx_ == nullptr) {
        throw llama_error("this Context is closed");
    }
    std::string why;
    if (model_failed(model_.get(), &why)) {
        throw llama_error("this model cannot be used any more (load it again): " + why);
    }
    return use{ std::move(lock), ctx_ };
}

void Context::close() {
    py::gil_scoped_release nogil;
    closing_.store(true);  // a decode in progress stops at its next check
    std::lock_guard<std::mutex> lock(mtx_);
    closing_.store(false);
    if (ctx_ != nullptr) {
        if (!model_failed(model_.get())) {
            llama_free(ctx_);  // else leaked, as in the destructor
        }
        ctx_ = nullptr;
    }
    lora_.clear();
}

void Context::apply_lora(const lora_set & set) {
    auto u = acquire();
    apply_lora_locked(u.ctx, set);
}

void Context::apply_lora_locked(llama_context * ctx, const lora_set & set) {
    if (lora_equal(lora_, set)) {
        return;
    }
    lora_apply(ctx, set);
    lora_ = set;  // the previous adapters may go now: llama.cpp no longer points at them
}

void Context::set_control_vector(const control_vector & cv, int32_t il_start, int32_t il_end) {
    auto          u       = acquire();
    const int32_t n_layer = llama_model_n_layer(model_.get());
    if (cv.data.empty()) {
        llama_set_adapter_cvec(u.ctx, nullptr, 0, llama_model_n_embd(model_.get()), -1, -1);
        return;
    }
    if (cv.n_embd != llama_model_n_embd(model_.get()) || cv.data.size() % static_cast<size_t>(cv.n_embd) != 0) {
        throw invalid_request_error("the control vector is not of this model's width", "control_vectors");
    }
    il_start = il_start <= 0 ? 1 : il_start;
    il_end   = il_end <= 0 ? n_layer : il_end;
    if (il_start > il_end || il_end > n_layer) {
        throw invalid_request_error(
            "control_vector_layer_range must be 1 <= start <= end <= " + std::to_string(n_layer),
            "control_vector_layer_range");
    }
    log_capture capture;
    if (llama_set_adapter_cvec(u.ctx, cv.data.data(), cv.data.size(), cv.n_embd, il_start, il_end) != 0) {
        throw llama_error("llama.cpp refused the control vector: " + capture.problems());
    }
}

int32_t Context::n_vocab() const {
    return llama_vocab_n_tokens(llama_model_get_vocab(model_.get()));
}

void Context::validate(const Batch & b, bool encode, bool non_causal) const {
    const size_t n = b.size();
    if (n == 0) {
        throw std::invalid_argument("the batch is empty");
    }
    if (b.seq_ids.size() != n || b.logits.size() != n ||
        (b.is_embd() ? b.embd.size() != n * b.n_embd : b.tokens.size() != n)) {
        throw std::invalid_argument("the batch is inconsistent");
    }
    const uint32_t n_batch  = llama_n_batch(ctx_);
    const uint32_t n_ubatch = llama_n_ubatch(ctx_);
    if (n > n_batch) {
        throw std::invalid_argument("the batch has " + std::to_string(n) + " tokens but n_batch is " +
                                    std::to_string(n_batch) +
                                    ": split it, or create the Context with a larger n_batch");
    }
    if ((encode || !causal_ || non_causal) && n > n_ubatch) {
        throw std::invalid_argument("the batch has " + std::to_string(n) + " tokens but n_ubatch is " +
                                    std::to_string(n_ubatch) + " and " +
                                    (encode ? "an encoder" : "non-causal attention") +
                                    " needs the whole batch in one micro-batch: raise n_ubatch");
    }
    if (b.is_embd()) {
        const int32_t n_embd = llama_model_n_embd_inp(model_.get());
        if (b.n_embd != n_embd) {
            throw std::invalid_argument("the batch's embeddings have " + std::to_string(b.n_embd) +
                                        " values per token but the model takes " + std::to_string(n_embd));
        }
    } else {
        const int32_t nv = n_vocab();
        for (size_t i = 0; i < n; ++i) {
            if (b.tokens[i] < 0 || b.tokens[i] >= nv) {
                throw std::invalid_argument("batch token " + std::to_string(i) + " has id " +
                                            std::to_string(b.tokens[i]) + ", out of range for a vocabulary of " +
                                            std::to_string(nv));
            }
        }
    }
    const int64_t n_ctx_seq = llama_n_ctx_seq(ctx_);
    const int64_t n_seq_max = llama_n_seq_max(ctx_);
    for (size_t i = 0; i < n; ++i) {
        if (b.pos[i] < 0 || b.pos[i] >= n_ctx_seq) {
            throw std::invalid_argument("batch token " + std::to_string(i) + " has position " +
                                        std::to_string(b.pos[i]) + ", outside the context's 0.." +
                                        std::to_string(n_ctx_seq - 1) +
                                        " (n_ctx per sequence): create the Context with a larger n_ctx");
        }
        if (b.seq_ids[i].empty()) {
            throw std::invalid_argument("batch token " + std::to_string(i) + " has no sequence id");
        }
        for (llama_seq_id s : b.seq_ids[i]) {
            if (s < 0 || s >= n_seq_max) {
                throw std::invalid_argument("batch token " + std::to_string(i) + " has sequence id " +
                                            std::to_string(s) + ", outside 0.." + std::to_string(n_seq_max - 1) +
                                            " (n_seq_max)");
            }
        }
    }
}

void Context::decode(const Batch & b, bool encode) {
    if (PyErr_CheckSignals() != 0) {
        throw py::error_already_set();  // a Ctrl-C that came before the call does not start a long decode
    }
    int32_t     rc = 0;
    std::string reason;
    {
        py::gil_scoped_release nogil;
        rc = decode_nogil(b, encode, reason);
    }
    if (rc == 2 && PyErr_CheckSignals() != 0) {
        throw py::error_already_set();
    }
    raise_decode_error(rc, reason, encode);
}

int32_t Context::decode_nogil(const Batch & b, bool encode, std::string & reason, bool non_causal) {
    // The llama_batch view; seq_id pointers into the batch's own vectors.
    std::vector<int32_t>        n_seq_id(b.size());
    std::vector<llama_seq_id *> seq_ptrs(b.size());
    for (size_t i = 0; i < b.size(); ++i) {
        n_seq_id[i] = static_cast<int32_t>(b.seq_ids[i].size());
        seq_ptrs[i] = const_cast<llama_seq_id *>(b.seq_ids[i].data());
    }
    llama_batch lb{};
    lb.n_tokens = static_cast<int32_t>(b.size());
    lb.token    = b.is_embd() ? nullptr : const_cast<llama_token *>(b.tokens.data());
    lb.embd     = b.is_embd() ? const_cast<float *>(b.embd.data()) : nullptr;
    lb.pos      = const_cast<llama_pos *>(b.pos.data());
    lb.n_seq_id = n_seq_id.data();
    lb.seq_id   = seq_ptrs.data();
    lb.logits   = const_cast<int8_t *>(b.logits.data());

    int32_t rc = 0;
    {
        auto u = acquire();
        validate(b, encode, non_causal);
        abort_.store(false);  // cancel() stops the decode in progress, not one that has not started
        const bool switch_causal = non_causal && causal_;
        if (switch_causal) {
            llama_set_causal_attn(ctx_, false);
        }
        struct causal_back {
            llama_context * ctx;
            bool            on;
            ~causal_back() {
                if (on) {
                    llama_set_causal_attn(ctx, true);
                }
            }
        } back{ ctx_, switch_causal };

        // Where each sequence of the batch ends in the KV memory now, to roll back a failure.
        std::map<llama_seq_id, llama_pos> pos_before;
        llama_memory_t                    mem = llama_get_memory(ctx_);
        if (!encode && mem != nullptr) {
            for (const auto & ids : b.seq_ids) {
                for (llama_seq_id s : ids) {
                    if (pos_before.count(s) == 0) {
                        pos_before[s] = llama_memory_seq_pos_max(mem, s);
                    }
                }
            }
        }

        {
            sigint_guard sig(abort_);
            log_capture  capture;
            try {
                ggml_abort_scope scope(model_.get());  // an RPC worker that goes away: an error, not an abort
                rc = encode ? llama_encode(ctx_, lb) : llama_decode(ctx_, lb);
                if (rc == 0) {
                    llama_synchronize(ctx_);  // the work is done when decode returns, and counted
                }
            } catch (const std::exception & e) {
                rc     = -3;
                reason = e.what();
            }
            if (rc != 0 && reason.empty()) {
                reason = capture.problems();
            }
        }
        abort_.store(false);

        if (rc == 0) {
            output_rows_.assign(b.size(), -1);
            n_outputs_ = 0;
            for (size_t i = 0; i < b.size(); ++i) {
                if (b.logits[i] != 0) {
                    output_rows_[i] = n_outputs_++;
                }
            }
        } else {
            output_rows_.clear();
            n_outputs_ = 0;
            if (mem != nullptr && (rc == 2 || rc < -1)) {
                // llama.cpp keeps the micro-batches that were processed before the failure.
                for (const auto & [s, p] : pos_before) {
                    llama_memory_seq_rm(mem, s, p + 1, -1);
                }
            }
        }
    }
    return rc;
}

void Context::raise_decode_error(int32_t rc, const std::string & reason, bool encode) {
    if (rc == 0) {
        return;
    }
    const std::string what = encode ? "encode" : "decode";
    if (rc == 2) {
        throw llama_error(what + " was cancelled; the KV memory is as it was before the call");
    }
    if (rc == 1) {
        throw llama_error(what + " found no free KV slot for the batch" +
                          (reason.empty() ? std::string(" (the context is full)") : ": " + reason) +
                          ". Use a smaller batch, remove old tokens, or create the Context with a larger n_ctx");
    }
    if (rc == -1) {
        throw std::invalid_argument("llama.cpp refused the batch: " + (reason.empty() ? "invalid batch" : reason));
    }
    throw llama_error(what + " failed (code " + std::to_string(rc) + "): " + reason +
                      "; the KV memory is as it was before the call");
}

int32_t Context::check_output(int32_t i, const char * what) const {
    if (n_outputs_ == 0) {
        throw std::out_of_range(std::string(what) + ": the last decode produced no outputs");
    }
    if (i < 0) {
        if (-static_cast<int64_t>(i) > n_outputs_) {
            throw std::out_of_range(std::string(what) + ": index " + std::to_string(i) + " but the last decode has " +
                                    std::to_string(n_outputs_) + " outputs");
        }
        return i;
    }
    if (static_cast<size_t>(i) >= output_rows_.size()) {
        throw std::out_of_range(std::string(what) + ": index " + std::to_string(i) + " is past the last batch (" +
                                std::to_string(output_rows_.size()) + " tokens)");
    }
    if (output_rows_[static_cast<size_t>(i)] < 0) {
        throw std::out_of_range(std::string(what) + ": batch token " + std::to_string(i) +
                                " was not an output (set its logits flag)");
    }
    return i;
}

namespace {

std::vector<llama_seq_id> seq_list(const py::handle & h) {
    if (py::isinstance<py::int_>(h)) {
        return { h.cast<llama_seq_id>() };
    }
    std::vector<llama_seq_id> out;
    for (auto s : h) {
        out.push_back(s.cast<llama_seq_id>());
    }
    return out;
}

llama_pos pos_arg(int64_t p) {
    if (p < 0 || p > INT32_MAX) {
        throw std::invalid_argument("position " + std::to_string(p) + " is out of range");
    }
    return static_cast<llama_pos>(p);
}

// llama.cpp sizes buffers by a sequence state's cell count before it checks that count against the
// KV cache (llama_kv_cache::state_read_meta), so a corrupt count can exhaust memory. For KV-cache
// memories the layout starts with: magic u32, seq_id u32, n_stream u32, then per stream a cell count
// u32 (zero for every stream but the sequence's own, whose cells follow). Check the first non-zero
// count against the context size and against the bytes that could hold its cells.
void check_seq_state(const llama_model * model, llama_context * ctx, const std::string & data) {
    if (llama_model_is_recurrent(model) || llama_model_is_hybrid(model)) {
        return;  // another layout; llama.cpp checks it
    }
    auto u32_at = [&](size_t off, uint32_t & v) {
        if (off + 4 > data.size()) {
            return false;
        }
        std::memcpy(&v, data.data() + off, 4);
        return true;
    };
    uint32_t magic = 0, n_stream = 0;
    if (!u32_at(0, magic) || magic != 0xaf143cd8u || !u32_at(8, n_stream)) {
        return;  // not this layout: llama.cpp refuses it itself
    }
    if (n_stream == 0 || n_stream > llama_n_seq_max(ctx)) {
        throw llama_error("invalid sequence state: it has " + std::to_string(n_stream) + " KV streams");
    }
    for (uint32_t st = 0; st < n_stream; ++st) {
        uint32_t cells = 0;
        if (!u32_at(12 + 4 * static_cast<size_t>(st), cells)) {
            throw llama_error("invalid sequence state: truncated");
        }
        if (cells == 0) {
            continue;
        }
        const size_t room = (data.size() - 16 - 4 * static_cast<size_t>(st)) / 8;  // >= 8 bytes per cell
        if (cells > llama_n_ctx(ctx) || cells > room) {
            throw llama_error("invalid sequence state: " + std::to_string(cells) + " cells, more than the context (" +
                              std::to_string(llama_n_ctx(ctx)) + ") or the data can hold");
        }
        return;
    }
}

py::dict perf_dict(const llama_perf_context_data & d) {
    py::dict out;
    out["t_start_ms"]  = d.t_start_ms;
    out["t_load_ms"]   = d.t_load_ms;
    out["t_p_eval_ms"] = d.t_p_eval_ms;
    out["t_eval_ms"]   = d.t_eval_ms;
    out["n_p_eval"]    = d.n_p_eval;
    out["n_eval"]      = d.n_eval;
    out["n_reused"]    = d.n_reused;
    return out;
}

}  // namespace

void Context::seq_state_load(const std::string & data, llama_seq_id dst) {
    size_t      n = 0;
    std::string reason;
    {
        auto u = acquire();
        check_seq_state(model(), u.ctx, data);
        log_capture capture;
        try {
            n = llama_state_seq_set_data(u.ctx, reinterpret_cast<const uint8_t *>(data.data()), data.size(), dst);
        } catch (const std::exception & e) {
            reason = e.what();
        }
        if (n == 0) {
            reason = reason.empty() ? capture.problems() : reason;
        }
    }
    if (n == 0) {
        throw llama_error("could not load the sequence state: " + reason);
    }
}

void register_context(py::module_ & m) {
    sigint_guard::main_thread_id() = std::this_thread::get_id();  // the module is imported on the main thread

    m.def(
        "kv_cache_types",
        [] {
            py::dict out;
            for (ggml_type t : kv_cache_types) {
                py::dict entry;
                entry["id"]                = static_cast<int>(t);
                entry["bytes_per_element"] = static_cast<double>(ggml_type_size(t)) / ggml_blck_size(t);
                out[ggml_type_name(t)]     = entry;
            }
            return out;
        },
        "The KV cache types a Context takes (type_k, type_v), as llama.cpp's tools list them: name -> "
        "{'id': ggml_type, 'bytes_per_element': float}.");

    // --- Batch ----------------------------------------------------------------------------------
    py::class_<Batch> batch(m, "Batch", "Tokens (or embeddings) with positions, sequence ids and output flags.");
    batch.def(py::init<>());
    batch.def_static(
        "from_tokens",
        [](const std::vector<int64_t> & tokens, int64_t pos0, const py::object & seq_id, bool logits_last) {
            Batch                           b;
            const std::vector<llama_seq_id> seqs = seq_list(seq_id);
            for (size_t i = 0; i < tokens.size(); ++i) {
                if (tokens[i] < INT32_MIN || tokens[i] > INT32_MAX) {
                    throw std::invalid_argument("token id " + std::to_string(tokens[i]) + " is out of range");
                }
                b.tokens.push_back(static_cast<llama_token>(tokens[i]));
                b.pos.push_back(pos_arg(pos0 + static_cast<int64_t>(i)));
                b.seq_ids.push_back(seqs);
                b.logits.push_back(0);
            }
            if (logits_last && !b.logits.empty()) {
                b.logits.back() = 1;
            }
            return b;
        },
        py::arg("tokens"), py::arg("pos0") = 0, py::arg("seq_id") = 0, py::arg("logits_last") = true,
        "A batch of consecutive tokens of one sequence (or of several: seq_id may be a list), from position "
        "pos0; only the last token is an output unless logits_last is False.");
    batch.def_static(
        "from_embeddings",
        [](const py::array_t<float, py::array::c_style | py::array::forcecast> & embd, int64_t pos0,
           const py::object & seq_id, bool logits_last) {
            if (embd.ndim() != 2) {
                throw std::invalid_argument("embeddings must be a 2-D array (n_tokens, n_embd)");
            }
            Batch b;
            b.n_embd                             = static_cast<int32_t>(embd.shape(1));
            const std::vector<llama_seq_id> seqs = seq_list(seq_id);
            b.embd.assign(embd.data(), embd.data() + embd.size());
            for (py::ssize_t i = 0; i < embd.shape(0); ++i) {
                b.pos.push_back(pos_arg(pos0 + i));
                b.seq_ids.push_back(seqs);
                b.logits.push_back(0);
            }
            if (logits_last && !b.logits.empty()) {
                b.logits.back() = 1;
            }
            return b;
        },
        py::arg("embeddings"), py::arg("pos0") = 0, py::arg("seq_id") = 0, py::arg("logits_last") = true);
    batch.def(
        "add",
        [](Batch & b, int64_t token, int64_t pos, const py::object & seq_id, bool logits) {
            if (b.is_embd()) {
                throw std::invalid_argument("this batch holds embeddings, not tokens");
            }
            if (token < INT32_MIN || token > INT32_MAX) {
                throw std::invalid_argument("token id " + std::to_string(token) + " is out of range");
            }
            b.tokens.push_back(static_cast<llama_token>(token));
            b.pos.push_back(pos_arg(pos));
            b.seq_ids.push_back(seq_list(seq_id));
            b.logits.push_back(logits ? 1 : 0);
        },
        py::arg("token"), py::arg("pos"), py::arg("seq_id") = 0, py::arg("logits") = false,
        "Append one token at position pos of sequence seq_id (an int or a list of ints).");
    batch.def("clear", &Batch::clear);
    batch.def("__len__", &Batch::size);
    batch.def_property_readonly("n_tokens", &Batch::size);
    batch.def_property_readonly("tokens", [](const Batch & b) { return b.tokens; });
    batch.def_property_readonly("positions", [](const Batch & b) { return b.pos; });
    batch.def_property_readonly("seq_ids", [](const Batch & b) { return b.seq_ids; });
    batch.def_property_readonly("logits", [](const Batch & b) {
        std::vector<bool> out(b.logits.begin(), b.logits.end());
        return out;
    });
    batch.def(
        "set_logits",
        [](Batch & b, py::ssize_t i, bool on) {
            if (i < 0) {
                i += static_cast<py::ssize_t>(b.size());
            }
            if (i < 0 || static_cast<size_t>(i) >= b.size()) {
                throw std::out_of_range("batch index out of range");
            }
            b.logits[static_cast<size_t>(i)] = on ? 1 : 0;
        },
        py::arg("i"), py::arg("on") = true, "Mark token i (negative: from the end) as an output or not.");
    batch.def("__repr__", [](const Batch & b) {
        return "<pyllama.Batch n_tokens=" + std::to_string(b.size()) + (b.is_embd() ? " (embeddings)>" : ">");
    });

    // --- Context --------------------------------------------------------------------------------
    py::class_<Context> cls(m, "Context", R"doc(
A llama.cpp context over a Model: the KV memory and the compute buffers.

Context(model, *, n_ctx=512, n_batch=2048, n_ubatch=512, n_seq_max=1, n_threads=None,
        n_threads_batch=None, flash_attn="auto", type_k="f16", type_v="f16", embeddings=False,
        pooling_type=None, attention_type=None, rope_scaling_type=None, rope_freq_base=0,
        rope_freq_scale=0, yarn_ext_factor=-1, yarn_attn_factor=-1, yarn_beta_fast=-1,
        yarn_beta_slow=-1, yarn_orig_ctx=0, offload_kqv=True, op_offload=True, swa_full=True,
        kv_unified=False, no_perf=False)

Defaults are llama.cpp's (llama_context_default_params); n_ctx=0 takes the model's training
context; n_threads=None uses the number of physical cores. The Context keeps its Model's weights
alive. One thread at a time: concurrent calls are serialised.
)doc");
    cls.def(py::init([](Model & model, const py::kwargs & kwargs) { return new Context(model, kwargs); }),
            py::arg("model"));
    cls.def("close", &Context::close, "Free the context now (waits for a decode in progress to stop).");
    cls.def_property_readonly("closed", &Context::closed);
    cls.def("__enter__", [](py::object self) { return self; });
    cls.def("__exit__", [](Context & self, py::args) { self.close(); });
    cls.def("cancel", &Context::cancel,
            "Ask a decode in progress (in another thread) to stop; it raises LlamaError and the KV memory is "
            "rolled back. Thread-safe.");

#define PYLLAMA_CTX_U32(name, fn)                        \
    cls.def_property_readonly(name, [](Context & self) { \
        py::gil_scoped_release nogil;                    \
        return fn(self.acquire().ctx);                   \
    })
    PYLLAMA_CTX_U32("n_ctx", llama_n_ctx);
    PYLLAMA_CTX_U32("n_ctx_seq", llama_n_ctx_seq);
    PYLLAMA_CTX_U32("n_batch", llama_n_batch);
    PYLLAMA_CTX_U32("n_ubatch", llama_n_ubatch);
    PYLLAMA_CTX_U32("n_seq_max", llama_n_seq_max);
    PYLLAMA_CTX_U32("n_threads", llama_n_threads);
    PYLLAMA_CTX_U32("n_threads_batch", llama_n_threads_batch);
#undef PYLLAMA_CTX_U32
    cls.def_property_readonly("n_vocab", &Context::n_vocab);
    cls.def_property_readonly("n_embd", [](Context & self) { return llama_model_n_embd_out(self.model()); });
    cls.def_property_readonly("pooling_type", [](Context & self) {
        py::gil_scoped_release nogil;
        switch (llama_pooling_type(self.acquire().ctx)) {
            case LLAMA_POOLING_TYPE_NONE: return "none";
            case LLAMA_POOLING_TYPE_MEAN: return "mean";
            case LLAMA_POOLING_TYPE_CLS: return "cls";
            case LLAMA_POOLING_TYPE_LAST: return "last";
            case LLAMA_POOLING_TYPE_RANK: return "rank";
            default: return "unspecified";
        }
    });
    cls.def(
        "set_n_threads",
        [](Context & self, int32_t n_threads, int32_t n_threads_batch) {
            if (n_threads < 1 || n_threads_batch < 1) {
                throw std::invalid_argument("thread counts must be >= 1");
            }
            py::gil_scoped_release nogil;
            llama_set_n_threads(self.acquire().ctx, n_threads, n_threads_batch);
        },
        py::arg("n_threads"), py::arg("n_threads_batch"));
    cls.def(
        "set_embeddings",
        [](Context & self, bool on) {
            py::gil_scoped_release nogil;
            llama_set_embeddings(self.acquire().ctx, on);
        },
        py::arg("embeddings"));
    cls.def(
        "set_causal_attn",
        [](Context & self, bool on) {
            py::gil_scoped_release nogil;
            auto                   u = self.acquire();
            llama_set_causal_attn(u.ctx, on);
            self.causal_ = on;
        },
        py::arg("causal"),
        "Causal (each token sees those before it) or non-causal attention for the decodes that follow: "
        "Gemma 3 decodes an image's embeddings non-causally. A non-causal batch must fit one n_ubatch.");
    cls.def(
        "set_lora",
        [](Context & self, const lora_set & lora) {
            const lora_set         set = lora_canonical(lora, self.model(), "lora");
            py::gil_scoped_release nogil;
            self.apply_lora(set);
        },
        py::arg("lora"),
        "The LoRA adapters the decodes that follow run with: [(LoraAdapter, scale), ...] (an empty list: "
        "none). A scale of 0 leaves an adapter out. An Engine over this Context sets each batch's own "
        "adapters (Engine.submit's lora=) and overrides this.");
    cls.def_property_readonly(
        "lora", [](Context & self) { return self.lora(); },
        "The [(LoraAdapter, scale), ...] the context runs with now.");
    cls.def(
        "set_control_vector",
        [](Context & self, const py::object & data, int32_t layer_start, int32_t layer_end) {
            control_vector cv;
            if (!data.is_none()) {
                const auto a = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(data);
                if (!a || a.ndim() != 2) {
                    throw invalid_request_error("a control vector is a 2-D array: n_layer rows of n_embd",
                                                "control_vectors");
                }
                const int32_t n_embd  = llama_model_n_embd(self.model());
                const int32_t n_layer = llama_model_n_layer(self.model());
                if (a.shape(1) != n_embd || a.shape(0) < 1 || a.shape(0) > n_layer) {
                    throw invalid_request_error("a control vector for this model has up to " + std::to_string(n_layer) +
                                                    " rows of " + std::to_string(n_embd) + " values",
                                                "control_vectors");
                }
                cv.n_embd = n_embd;
                cv.data.assign(a.data(), a.data() + a.size());
                for (float v : cv.data) {
                    if (!std::isfinite(v)) {
                        throw invalid_request_error("a control vector's values must be finite", "control_vectors");
                    }
                }
            }
            py::gil_scoped_release nogil;
            self.set_control_vector(cv, layer_start, layer_end);
        },
        py::arg("data"), py::arg("layer_start") = -1, py::arg("layer_end") = -1,
        "Add a control vector to the output of layers layer_start..layer_end (inclusive; by default layer 1 to "
        "the last) in the decodes that follow: data has a row of n_embd per layer from layer 1 "
        "(pyllama.load_control_vectors reads llama.cpp's files); None removes it. As in llama.cpp, the last "
        "layer's row is not applied.");

    cls.def(
        "decode", [](Context & self, const Batch & b) { self.decode(b, false); }, py::arg("batch"),
        "Run the batch through the model (GIL released). Raises ValueError for an invalid batch, "
        "LlamaError when no KV slot is free or the decode fails, KeyboardInterrupt on Ctrl-C; on failure "
        "the KV memory is rolled back to its state before the call.");
    cls.def(
        "encode", [](Context & self, const Batch & b) { self.decode(b, true); }, py::arg("batch"),
        "Run the batch through the encoder (encoder-decoder models) or without KV memory (embeddings).");

    // --- outputs as numpy -------------------------------------------------------------------------
    cls.def(
        "logits",
        [](Context & self, int32_t i, py::object out) -> py::object {
            const size_t n = static_cast<size_t>(self.n_vocab());
            py::array    arr;
            if (out.is_none()) {
                arr = float_array({ static_cast<py::ssize_t>(n) });
            } else {
                arr = py::reinterpret_borrow<py::array>(out);
                check_out_array(arr, n, "logits");
            }
            float * dst = static_cast<float *>(arr.mutable_data());
            {
                py::gil_scoped_release nogil;
                auto                   u   = self.acquire();
                const int32_t          j   = self.check_output(i, "logits");
                const float *          src = llama_get_logits_ith(u.ctx, j);
                if (src == nullptr) {
                    throw std::out_of_range("logits: no logits for index " + std::to_string(i));
                }
                std::memcpy(dst, src, n * sizeof(float));
            }
            return std::move(arr);
        },
        py::arg("i") = -1, py::arg("out") = py::none(),
        "The logits of output i of the last decode (i >= 0: batch index; -1: the last output), a fresh "
        "float32 array of n_vocab values, or written into `out`.");
    cls.def(
        "logits_all",
        [](Context & self) {
            py::array_t<float> arr;
            {
                // Shape first (needs the lock), then the copy.
                int32_t n_out = 0;
                {
                    py::gil_scoped_release nogil;
                    auto                   u = self.acquire();
                    n_out                    = self.n_outputs_;
                }
                arr = float_array({ n_out, static_cast<py::ssize_t>(self.n_vocab()) });
            }
            float * dst = arr.mutable_data();
            {
                py::gil_scoped_release nogil;
                auto                   u = self.acquire();
                if (arr.shape(0) != self.n_outputs_) {
                    throw llama_error("logits_all: the context was decoded by another thread meanwhile");
                }
                if (self.n_outputs_ > 0) {
                    const float * src = llama_get_logits(u.ctx);
                    if (src == nullptr) {
                        throw llama_error("logits_all: no logits");
                    }
                    std::memcpy(dst, src, static_cast<size_t>(arr.size()) * sizeof(float));
                }
            }
            return arr;
        },
        "The logits of every output of the last decode, shape (n_outputs, n_vocab).");
    cls.def(
        "embeddings",
        [](Context & self, int32_t i) {
            const size_t       n   = static_cast<size_t>(llama_model_n_embd_out(self.model()));
            py::array_t<float> arr = float_array({ static_cast<py::ssize_t>(n) });
            float *            dst = arr.mutable_data();
            {
                py::gil_scoped_release nogil;
                auto                   u   = self.acquire();
                const int32_t          j   = self.check_output(i, "embeddings");
                const float *          src = llama_get_embeddings_ith(u.ctx, j);
                if (src == nullptr) {
                    throw std::out_of_range("embeddings: none for index " + std::to_string(i) +
                                            " (create the Context with embeddings=True)");
                }
                std::memcpy(dst, src, n * sizeof(float));
            }
            return arr;
        },
        py::arg("i") = -1, "The embedding of output i of the last decode (embeddings=True, pooling 'none').");
    cls.def(
        "embeddings_seq",
        [](Context & self, llama_seq_id seq_id) {
            // rank pooling (a reranker) gives n_cls_out scores per sequence, not an embedding
            bool rank = false;
            {
                py::gil_scoped_release nogil;
                rank = llama_pooling_type(self.acquire().ctx) == LLAMA_POOLING_TYPE_RANK;
            }
            const size_t       n = static_cast<size_t>(rank ? std::max<uint32_t>(1, llama_model_n_cls_out(self.model()))
                                                            : llama_model_n_embd_out(self.model()));
            py::array_t<float> arr = float_array({ static_cast<py::ssize_t>(n) });
            float *            dst = arr.mutable_data();
            {
                py::gil_scoped_release nogil;
                auto                   u = self.acquire();
                if (seq_id < 0 || seq_id >= static_cast<llama_seq_id>(llama_n_seq_max(u.ctx))) {
                    throw std::invalid_argument("seq_id out of range");
                }
                if (llama_pooling_type(u.ctx) == LLAMA_POOLING_TYPE_NONE) {
                    throw std::invalid_argument("embeddings_seq needs a pooling type other than 'none'");
                }
                const float * src = llama_get_embeddings_seq(u.ctx, seq_id);
                if (src == nullptr) {
                    throw std::out_of_range("embeddings_seq: no pooled embedding for sequence " +
                                            std::to_string(seq_id));
                }
                std::memcpy(dst, src, n * sizeof(float));
            }
            return arr;
        },
        py::arg("seq_id"),
        "The pooled embedding of a sequence (embeddings=True with a pooling type); with pooling_type='rank' "
        "(a reranker), its n_cls_out scores.");

    // --- KV memory --------------------------------------------------------------------------------
    auto mem_seq = [](Context & self, llama_seq_id s, bool allow_all) {
        const auto n_seq = static_cast<llama_seq_id>(llama_n_seq_max(self.ctx_));
        if (!((allow_all && s == -1) || (s >= 0 && s < n_seq))) {
            throw std::invalid_argument("seq_id " + std::to_string(s) + " is outside 0.." + std::to_string(n_seq - 1) +
                                        (allow_all ? " (or -1 for all)" : ""));
        }
    };
    cls.def(
        "memory_clear",
        [](Context & self, bool data) {
            py::gil_scoped_release nogil;
            auto                   u = self.acquire();
            llama_memory_clear(llama_get_memory(u.ctx), data);
        },
        py::arg("data") = true, "Empty the KV memory of every sequence.");
    cls.def(
        "seq_rm",
        [mem_seq](Context & self, llama_seq_id s, llama_pos p0, llama_pos p1) {
            py::gil_scoped_release nogil;
            auto                   u = self.acquire();
            mem_seq(self, s, true);
            return llama_memory_seq_rm(llama_get_memory(u.ctx), s, p0, p1);
        },
        py::arg("seq_id"), py::arg("p0") = -1, py::arg("p1") = -1,
        "Remove positions [p0, p1) of a sequence (-1: all sequences; p0/p1 < 0: open ends). Returns False when "
        "the memory cannot remove part of a sequence (recurrent models).");
    cls.def(
        "seq_cp",
        [mem_seq](Context & self, llama_seq_id src, llama_seq_id dst, llama_pos p0, llama_pos p1) {
            py::gil_scoped_release nogil;
            auto                   u = self.acquire();
            mem_seq(self, src, false);
            mem_seq(self, dst, false);
            llama_memory_seq_cp(llama_get_memory(u.ctx), src, dst, p0, p1);
        },
        py::arg("src"), py::arg("dst"), py::arg("p0") = -1, py::arg("p1") = -1);
    cls.def(
        "seq_keep",
        [mem_seq](Context & self, llama_seq_id s) {
            py::gil_scoped_release nogil;
            auto                   u = self.acquire();
            mem_seq(self, s, false);
            // llama.cpp's seq_keep clears only the kept sequence's own buffer when sequences have
            // separate buffers (kv_unified=False); removing every other sequence is the same
            // operation in both layouts.
            llama_memory_t mem   = llama_get_memory(u.ctx);
            const auto     n_seq = static_cast<llama_seq_id>(llama_n_seq_max(u.ctx));
            for (llama_seq_id other = 0; other < n_seq; ++other) {
                if (other != s) {
                    llama_memory_seq_rm(mem, other, -1, -1);
                }
            }
        },
        py::arg("seq_id"), "Remove every sequence but this one.");
    cls.def(
        "seq_add",
        [mem_seq](Context & self, llama_seq_id s, llama_pos p0, llama_pos p1, llama_pos delta) {
            py::gil_scoped_release nogil;
            auto                   u = self.acquire();
            mem_seq(self, s, false);
            if (!llama_memory_can_shift(llama_get_memory(u.ctx))) {
                throw llama_error("this model's memory cannot shift positions");
            }
            llama_memory_seq_add(llama_get_memory(u.ctx), s, p0, p1, delta);
        },
        py::arg("seq_id"), py::arg("p0"), py::arg("p1"), py::arg("delta"),
        "Add delta to the positions [p0, p1) of a sequence (context shifting).");
    cls.def(
        "seq_div",
        [mem_seq](Context & self, llama_seq_id s, llama_pos p0, llama_pos p1, int d) {
            if (d < 1) {
                throw std::invalid_argument("seq_div: d must be >= 1");
            }
            py::gil_scoped_release nogil;
            auto                   u = self.acquire();
            mem_seq(self, s, false);
            if (!llama_memory_can_shift(llama_get_memory(u.ctx))) {
                throw llama_error("this model's memory cannot shift positions");
            }
            llama_memory_seq_div(llama_get_memory(u.ctx), s, p0, p1, d);
        },
        py::arg("seq_id"), py::arg("p0"), py::arg("p1"), py::arg("d"));
    cls.def(
        "seq_pos_min",
        [mem_seq](Context & self, llama_seq_id s) {
            py::gil_scoped_release nogil;
            auto                   u = self.acquire();
            mem_seq(self, s, false);
            return llama_memory_seq_pos_min(llama_get_memory(u.ctx), s);
        },
        py::arg("seq_id"), "The smallest position of a sequence in the KV memory, or -1 when it is empty.");
    cls.def(
        "seq_pos_max",
        [mem_seq](Context & self, llama_seq_id s) {
            py::gil_scoped_release nogil;
            auto                   u = self.acquire();
            mem_seq(self, s, false);
            return llama_memory_seq_pos_max(llama_get_memory(u.ctx), s);
        },
        py::arg("seq_id"), "The largest position of a sequence in the KV memory, or -1 when it is empty.");
    cls.def_property_readonly("can_shift", [](Context & self) {
        py::gil_scoped_release nogil;
        auto                   u = self.acquire();
        return llama_memory_can_shift(llama_get_memory(u.ctx));
    });

    // --- state ------------------------------------------------------------------------------------
    cls.def(
        "state_get",
        [](Context & self) {
            std::string data;
            {
                py::gil_scoped_release nogil;
                auto                   u = self.acquire();
                data.resize(llama_state_get_size(u.ctx));
                const size_t n = llama_state_get_data(u.ctx, reinterpret_cast<uint8_t *>(data.data()), data.size());
                data.resize(n);
            }
            return py::bytes(data);
        },
        "The whole context state (KV memory, last outputs, RNG) as bytes.");
    cls.def(
        "state_set",
        [](Context & self, const py::bytes & state) {
            const std::string data = state;
            size_t            n    = 0;
            std::string       reason;
            {
                py::gil_scoped_release nogil;
                auto                   u = self.acquire();
                log_capture            capture;
                try {
                    n = llama_state_set_data(u.ctx, reinterpret_cast<const uint8_t *>(data.data()), data.size());
                } catch (const std::exception & e) {
                    reason = e.what();
                }
                if (n == 0) {
                    reason = reason.empty() ? capture.problems() : reason;
                    llama_memory_clear(llama_get_memory(u.ctx), true);
                }
                self.output_rows_.clear();
                self.n_outputs_ = 0;
            }
            if (n == 0) {
                throw llama_error("could not load the state (the KV memory was cleared): " + reason);
            }
        },
        py::arg("state"),
        "Restore a state from state_get(): the KV memory and the RNG. The outputs of the last decode are not part "
        "of a state: decode the next token to get logits.");
    cls.def(
        "seq_state_get",
        [mem_seq](Context & self, llama_seq_id s) {
            std::string data;
            {
                py::gil_scoped_release nogil;
                auto                   u = self.acquire();
                mem_seq(self, s, false);
                data.resize(llama_state_seq_get_size(u.ctx, s));
                data.resize(llama_state_seq_get_data(u.ctx, reinterpret_cast<uint8_t *>(data.data()), data.size(), s));
            }
            return py::bytes(data);
        },
        py::arg("seq_id"), "The KV memory of one sequence as bytes.");
    cls.def(
        "seq_state_set",
        [mem_seq](Context & self, const py::bytes & state, llama_seq_id dst) {
            const std::string      data = state;
            py::gil_scoped_release nogil;
            {
                auto u = self.acquire();
                mem_seq(self, dst, false);
            }
            self.seq_state_load(data, dst);
        },
        py::arg("state"), py::arg("seq_id"), "Load a sequence state from seq_state_get() into sequence seq_id.");
    cls.def(
        "state_save_file",
        [](Context & self, const std::string & path, const std::vector<llama_token> & tokens) {
            bool ok;
            {
                py::gil_scoped_release nogil;
                auto                   u = self.acquire();
                ok                       = llama_state_save_file(u.ctx, path.c_str(), tokens.data(), tokens.size());
            }
            if (!ok) {
                throw llama_error("could not save the state to '" + path + "'");
            }
        },
        py::arg("path"), py::arg("tokens") = std::vector<llama_token>{},
        "Save the state and the tokens it holds to a file.");
    cls.def(
        "state_load_file",
        [](Context & self, const std::string & path) {
            std::vector<llama_token> tokens;
            bool                     ok = false;
            std::string              reason;
            {
                py::gil_scoped_release nogil;
                auto                   u = self.acquire();
                tokens.resize(llama_n_ctx(u.ctx));
                size_t      n = 0;
                log_capture capture;
                ok = llama_state_load_file(u.ctx, path.c_str(), tokens.data(), tokens.size(), &n);
                tokens.resize(ok ? n : 0);
                if (!ok) {
                    reason = capture.problems();
                    llama_memory_clear(llama_get_memory(u.ctx), true);
                }
                self.output_rows_.clear();
                self.n_outputs_ = 0;
            }
            if (!ok) {
                throw llama_error("could not load the state from '" + path + "': " + reason);
            }
            return tokens;
        },
        py::arg("path"), "Load a state saved by state_save_file; returns its tokens.");

    // --- performance ------------------------------------------------------------------------------
    cls.def(
        "perf",
        [](Context & self) {
            llama_perf_context_data d;
            {
                py::gil_scoped_release nogil;
                d = llama_perf_context(self.acquire().ctx);
            }
            return perf_dict(d);
        },
        "llama.cpp's performance counters: prompt and generation token counts and times (ms).");
    cls.def("perf_reset", [](Context & self) {
        py::gil_scoped_release nogil;
        llama_perf_context_reset(self.acquire().ctx);
    });
}

}  // namespace pyllama
