// The token loop in C++: prompt evaluation with prefix reuse in n_batch chunks, sampling,
// incremental detokenisation that never splits a UTF-8 character, stop strings held back while
// they may still match, end-of-generation tokens and max_tokens. Python receives finished pieces;
// the GIL is released while the loop runs.

#include "generate.h"

#include "model.h"
#include "pyllama.h"

#include "common.h"
#include "context.h"
#include "sampler.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace pyllama {

size_t incomplete_utf8_tail(const std::string & s, size_t from) {
    const size_t n = s.size();
    for (size_t back = 1; back <= 3 && back <= n - from; ++back) {
        const auto c = static_cast<unsigned char>(s[n - back]);
        if ((c & 0xC0) == 0x80) {
            continue;  // a continuation byte: look further back for its lead
        }
        const size_t need = (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 1;
        return need > back ? back : 0;
    }
    return 0;
}

py::str utf8_lenient(const std::string & s) {
    PyObject * o = PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "replace");
    if (o == nullptr) {
        throw py::error_already_set();
    }
    return py::reinterpret_steal<py::str>(o);
}

token_logprob logprob_of(llama_context * ctx, int32_t j, const llama_vocab * vocab, llama_token tok, int32_t n_top) {
    const float * logits = llama_get_logits_ith(ctx, j);
    const int32_t n      = llama_vocab_n_tokens(vocab);
    float         mx     = -INFINITY;
    for (int32_t i = 0; i < n; ++i) {
        mx = std::max(mx, logits[i]);
    }
    double sum = 0.0;
    for (int32_t i = 0; i < n; ++i) {
        sum += std::exp(static_cast<double>(logits[i] - mx));
    }
    const float   lse = mx + static_cast<float>(std::log(sum));
    token_logprob lp{ tok, {}, logits[tok] - lse, {} };
    if (n_top > 0) {
        std::vector<int32_t> idx(n);
        for (int32_t i = 0; i < n; ++i) {
            idx[i] = i;
        }
        const int32_t k = std::min(n_top, n);
        std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                          [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
        for (int32_t i = 0; i < k; ++i) {
            lp.top.emplace_back(idx[i], logits[idx[i]] - lse);
        }
    }
    return lp;
}

generated_text::generated_text(const std::vector<std::string> & stop) : stop_(stop) {
    for (const auto & s : stop_) {
        if (s.empty()) {
            throw std::invalid_argument("stop strings must not be empty");
        }
        max_stop_ = std::max(max_stop_, s.size());
    }
}

std::string generated_text::append(const llama_vocab * vocab, llama_token tok, bool special) {
    char    buf[256];
    int32_t n = llama_token_to_piece(vocab, tok, buf, sizeof(buf), 0, special);
    if (n < 0) {
        std::string big(static_cast<size_t>(-n), '\0');
        n = llama_token_to_piece(vocab, tok, big.data(), -n, 0, special);
        big.resize(std::max(0, n));
        text_ += big;
        return big;
    }
    text_.append(buf, n);
    return std::string(buf, n);
}

bool generated_text::check_stop() {
    if (max_stop_ == 0) {
        return false;
    }
    const size_t from  = scanned_ > max_stop_ ? scanned_ - max_stop_ : 0;
    size_t       first = std::string::npos;
    for (const auto & s : stop_) {
        first = std::min(first, text_.find(s, from));
    }
    scanned_ = text_.size();
    if (first != std::string::npos) {
        text_.resize(first);
        return true;
    }
    return false;
}

std::string generated_text::release(bool all) {
    size_t end = text_.size();
    if (!all) {
        end -= incomplete_utf8_tail(text_, released_);
        for (const auto & s : stop_) {
            // the longest tail of the text that begins this stop string
            for (size_t k = std::min(s.size() - 1, end - released_); k > 0; --k) {
                if (text_.compare(end - k, k, s, 0, k) == 0) {
                    end -= k;
                    break;
                }
            }
        }
    }
    if (end <= released_) {
        return {};
    }
    std::string out = text_.substr(released_, end - released_);
    released_       = end;
    return out;
}

// The KV memory of sequence 0 of one Context and the tokens it holds, so that each call evaluates
// only what follows the longest common prefix with what is cached.
class Generator {
  public:
    explicit Generator(Context & ctx) : ctx_(ctx) {}

    std::vector<llama_token> & tokens() { return tokens_; }

    std::mutex & mutex() { return mtx_; }

    uint64_t begin() { return ++generation_; }

    bool current(uint64_t g) const { return generation_ == g; }

    // Evaluates `prompt` after what the cache already holds of it; the last token's logits are
    // the output. Returns how many tokens were reused. Call without the GIL.
    size_t evaluate(const std::vector<llama_token> & prompt, const std::atomic<bool> & cancelled) {
        if (prompt.empty()) {
            throw std::invalid_argument("the prompt is empty");
        }
        size_t lcp = 0;
        while (lcp < tokens_.size() && lcp < prompt.size() && tokens_[lcp] == prompt[lcp]) {
            ++lcp;
        }
        if (lcp == prompt.size()) {
            --lcp;  // the last token is evaluated again, for its logits
        }
        {
            auto           u   = ctx_.acquire();
            llama_memory_t mem = llama_get_memory(u.ctx);
            if (mem != nullptr && !llama_memory_seq_rm(mem, 0, static_cast<llama_pos>(lcp), -1)) {
                // a recurrent model cannot cut its state at a position: start over
                llama_memory_seq_rm(mem, 0, -1, -1);
                lcp = 0;
            }
        }
        tokens_.resize(lcp);
        const size_t n_batch = std::max<uint32_t>(1, llama_n_batch(ctx_.acquire().ctx));
        for (size_t start = lcp; start < prompt.size(); start += n_batch) {
            if (cancelled.load()) {
                throw llama_error("cancelled");
            }
            const size_t end = std::min(prompt.size(), start + n_batch);
            Batch        b;
            for (size_t i = start; i < end; ++i) {
                b.tokens.push_back(prompt[i]);
                b.pos.push_back(static_cast<llama_pos>(i));
                b.seq_ids.push_back({ 0 });
                b.logits.push_back(i + 1 == prompt.size() ? 1 : 0);
            }
            decode(b);
            tokens_.insert(tokens_.end(), prompt.begin() + start, prompt.begin() + end);
        }
        return lcp;
    }

    void decode_one(llama_token tok) {
        Batch b;
        b.tokens = { tok };
        b.pos    = { static_cast<llama_pos>(tokens_.size()) };
        b.seq_ids.push_back({ 0 });
        b.logits = { 1 };
        decode(b);
        tokens_.push_back(tok);
    }

    Context & context() { return ctx_; }

  private:
    void decode(const Batch & b) {
        std::string reason;
        const auto  rc = ctx_.decode_nogil(b, false, reason);
        Context::raise_decode_error(rc, reason, false);
    }

    Context &                ctx_;
    std::vector<llama_token> tokens_;
    std::mutex               mtx_;
    uint64_t                 generation_ = 0;
};

// One generation: next() runs the loop until a piece of text is ready.
class Generation {
  public:
    Generation(std::shared_ptr<Generator> gen,
               std::shared_ptr<Sampler>   sampler,
               std::vector<llama_token>   prompt,
               generation_options         opt) :
        gen_(std::move(gen)),
        sampler_(std::move(sampler)),
        prompt_(std::move(prompt)),
        opt_(std::move(opt)),
        text_(opt_.stop) {
        id_ = gen_->begin();
        if (opt_.max_tokens == 0) {
            finish("length");  // nothing to generate, nothing to evaluate
        }
    }

    // The next piece of text; empty when the generation has ended. Call without the GIL.
    std::string next() {
        std::lock_guard<std::mutex> lock(gen_->mutex());
        if (!gen_->current(id_)) {
            finish("cancelled");
            throw llama_error("a newer generation on the same context replaced this one");
        }
        while (finish_reason_.empty()) {
            if (cancelled_.load()) {
                finish("cancelled");
                break;
            }
            step();
            std::string out = text_.release(false);
            if (!out.empty()) {
                return out;
            }
        }
        return text_.release(true);
    }

    // The whole generation at once. Call without the GIL.
    std::string run() {
        std::string out;
        for (std::string piece = next(); !piece.empty(); piece = next()) {
            out += piece;
        }
        return out;
    }

    void cancel() {
        cancelled_.store(true);
        gen_->context().cancel();
    }

    const std::string &                finish_reason() const { return finish_reason_; }
    size_t                             n_prompt() const { return prompt_.size(); }
    size_t                             n_reused() const { return n_reused_; }
    const std::vector<llama_token> &   completion() const { return completion_; }
    const std::vector<token_logprob> & logprobs() const { return logprobs_; }

  private:
    void finish(const char * reason) {
        if (finish_reason_.empty()) {
            finish_reason_ = reason;
        }
    }

    void step() {
        Context &           ctx   = gen_->context();
        const llama_vocab * vocab = llama_model_get_vocab(ctx.model());
        if (!started_) {
            started_  = true;
            n_reused_ = gen_->evaluate(prompt_, cancelled_);
        } else {
            gen_->decode_one(completion_.back());
        }
        const uint32_t n_ctx = llama_n_ctx(ctx.acquire().ctx);
        llama_token    tok   = sampler_->sample(ctx, -1);
        if (opt_.logprobs >= 0) {
            auto u = ctx.acquire();
            logprobs_.push_back(logprob_of(u.ctx, -1, vocab, tok, opt_.logprobs));
        }
        sampler_->accept(tok, true);
        if (!opt_.ignore_eos && llama_vocab_is_eog(vocab, tok)) {
            if (opt_.logprobs >= 0) {
                logprobs_.pop_back();
            }
            finish("stop");
            return;
        }
        completion_.push_back(tok);
        std::string piece = text_.append(vocab, tok, sampler_->preserves(tok));
        if (opt_.logprobs >= 0) {
            logprobs_.back().piece = std::move(piece);
        }
        if (text_.check_stop()) {
            finish("stop");
        }
        if (opt_.max_tokens >= 0 && completion_.size() >= static_cast<size_t>(opt_.max_tokens)) {
            finish("length");
        } else if (gen_->tokens().size() + 1 >= n_ctx) {
            finish("length");  // the next token would not fit
        }
    }

    std::shared_ptr<Generator> gen_;
    std::shared_ptr<Sampler>   sampler_;
    std::vector<llama_token>   prompt_;
    generation_options         opt_;
    generated_text             text_;
    uint64_t                   id_ = 0;

    bool                       started_  = false;
    size_t                     n_reused_ = 0;
    std::vector<llama_token>   completion_;
    std::string                finish_reason_;
    std::vector<token_logprob> logprobs_;
    std::atomic<bool>          cancelled_{ false };
};

void register_generate(py::module_ & m) {
    py::class_<Generator, std::shared_ptr<Generator>> gen(m, "Generator", R"doc(
The token loop over sequence 0 of a Context, with prompt-prefix reuse.

Generator(ctx) remembers the tokens the context's KV memory holds, so that each generate() call
evaluates only what follows the longest common prefix with them.
)doc");
    gen.def(py::init([](Context & ctx) { return std::make_shared<Generator>(ctx); }), py::arg("ctx"),
            py::keep_alive<1, 2>());
    gen.def_property_readonly(
        "tokens", [](Generator & g) { return g.tokens(); }, "The tokens the KV memory holds, in order.");
    gen.def(
        "reset",
        [](Generator & g) {
            py::gil_scoped_release      nogil;
            std::lock_guard<std::mutex> lock(g.mutex());
            g.begin();
            auto           u   = g.context().acquire();
            llama_memory_t mem = llama_get_memory(u.ctx);
            if (mem != nullptr) {
                llama_memory_seq_rm(mem, 0, -1, -1);
            }
            g.tokens().clear();
        },
        "Forget the cached tokens and clear sequence 0.");
    gen.def(
        "adopt",
        [](Generator & g, std::vector<llama_token> tokens) {
            const llama_vocab * vocab = llama_model_get_vocab(g.context().model());
            for (llama_token t : tokens) {
                Model::check_token(vocab, t);
            }
            py::gil_scoped_release      nogil;
            std::lock_guard<std::mutex> lock(g.mutex());
            g.begin();
            auto           u   = g.context().acquire();
            llama_memory_t mem = llama_get_memory(u.ctx);
            const auto     n   = mem == nullptr ? -1 : llama_memory_seq_pos_max(mem, 0) + 1;
            if (n != static_cast<llama_pos>(tokens.size())) {
                if (mem != nullptr) {
                    llama_memory_seq_rm(mem, 0, -1, -1);
                }
                g.tokens().clear();
                throw std::invalid_argument("sequence 0 holds " + std::to_string(n) + " positions, not the " +
                                            std::to_string(tokens.size()) + " tokens given (sequence 0 was cleared)");
            }
            g.tokens() = std::move(tokens);
        },
        py::arg("tokens"),
        "Declare which tokens sequence 0 holds, after its state was loaded with Context.seq_state_set(state, 0): "
        "the next generate() then reuses them. Their number must match what the sequence holds.");
    gen.def(
        "generate",
        [](std::shared_ptr<Generator> g, std::vector<llama_token> prompt, std::shared_ptr<Sampler> sampler,
           int32_t max_tokens, std::vector<std::string> stop, int32_t logprobs, bool ignore_eos) {
            if (sampler->model() != g->context().model()) {
                throw std::invalid_argument("the Sampler was built for another model than the Context's");
            }
            const llama_vocab * vocab = llama_model_get_vocab(g->context().model());
            for (llama_token t : prompt) {
                Model::check_token(vocab, t);
            }
            generation_options opt;
            opt.max_tokens = max_tokens;
            opt.stop       = std::move(stop);
            opt.logprobs   = logprobs;
            opt.ignore_eos = ignore_eos;
            return std::make_shared<Generation>(std::move(g), std::move(sampler), std::move(prompt), std::move(opt));
        },
        py::arg("prompt"), py::arg("sampler"), py::kw_only(), py::arg("max_tokens") = -1,
        py::arg("stop") = std::vector<std::string>(), py::arg("logprobs") = -1, py::arg("ignore_eos") = false,
        "Start a generation from prompt tokens: iterate it for text pieces, or call run(). max_tokens < 0 runs "
        "until the context is full; stop strings end it and are not part of the text; logprobs >= 0 records "
        "each token's log-probability and that many alternatives.");

    py::class_<Generation, std::shared_ptr<Generation>> g(m, "Generation",
                                                          "One generation; iterate it for text pieces.");
    bind_generation(g);
}

}  // namespace pyllama
