// Sampler: llama.cpp's common_sampler (common/sampling.h) with pyllama's guards; shared by
// sampler.cpp (its Python binding) and generate.cpp (the token loop).
#pragma once

#include "pyllama.h"

#include "common.h"
#include "context.h"
#include "sampling.h"

#include <cmath>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace pyllama {

struct grammar_spec {
    std::string              text;  // GBNF, root rule "root"
    bool                     lazy = false;
    std::vector<std::string> patterns;  // regexes, as common_sampler_init builds them
    std::vector<llama_token> tokens;
    std::vector<llama_token> prefill;  // the generation prompt, accepted up front (non-lazy chat grammars)
};

class Sampler {
  public:
    Sampler(std::shared_ptr<llama_model> model, common_params_sampling params, grammar_spec grammar) :
        model_(std::move(model)), params_(std::move(params)), grammar_(std::move(grammar)) {
        const llama_vocab * vocab = llama_model_get_vocab(model_.get());
        argmax_                   = picks_argmax(params_, grammar_);
        log_capture capture;
        try {
            smpl_ = common_sampler_init(model_.get(), params_);
        } catch (const std::exception & e) {
            const std::string logged = capture.problems();
            throw std::invalid_argument(std::string("invalid sampler: ") + e.what() +
                                        (logged.empty() ? "" : ": " + logged));
        }
        if (smpl_ == nullptr) {
            throw std::invalid_argument("invalid sampler: " + capture.problems());
        }
        if (!grammar_.text.empty()) {
            // A second grammar sampler that follows the same tokens: it answers whether the grammar
            // can end now, which llama.cpp checks with an abort() when an end-of-generation token is
            // accepted too early.
            shadow_ = make_grammar(vocab);
            for (llama_token t : grammar_.prefill) {
                llama_sampler_accept(shadow_, t);
            }
        }
    }

    Sampler(const Sampler & other) :
        model_(other.model_), params_(other.params_), grammar_(other.grammar_), argmax_(other.argmax_) {
        smpl_ = common_sampler_clone(other.smpl_);
        if (other.shadow_ != nullptr) {
            shadow_ = llama_sampler_clone(other.shadow_);
        }
    }

    ~Sampler() {
        common_sampler_free(smpl_);
        if (shadow_ != nullptr) {
            llama_sampler_free(shadow_);
        }
    }

    llama_token sample(Context & ctx, int32_t idx) {
        if (ctx.model() != model_.get()) {
            throw std::invalid_argument("this Sampler was built for another model than the Context's");
        }
        auto                        u = ctx.acquire();
        std::lock_guard<std::mutex> lock(mtx_);
        const int32_t               j = ctx.check_output(idx, "sample");
        if (llama_get_logits_ith(u.ctx, j) == nullptr) {
            throw std::out_of_range("sample: no logits for index " + std::to_string(idx));
        }
        if (argmax_) {
            return argmax(llama_get_logits_ith(u.ctx, j), llama_vocab_n_tokens(llama_model_get_vocab(model_.get())));
        }
        try {
            return common_sampler_sample(smpl_, u.ctx, j, false);
        } catch (const std::exception & e) {
            throw llama_error(std::string("sampling failed: ") + e.what());
        }
    }

    void accept(llama_token token, bool accept_grammar) {
        std::lock_guard<std::mutex> lock(mtx_);
        const llama_vocab *         vocab = llama_model_get_vocab(model_.get());
        Model::check_token(vocab, token);
        if (accept_grammar && shadow_ != nullptr) {
            if (llama_vocab_is_eog(vocab, token) && !grammar_can_end()) {
                throw std::invalid_argument("token " + std::to_string(token) +
                                            " ends generation but the grammar is not complete");
            }
            try {
                llama_sampler_accept(shadow_, token);
            } catch (const std::exception & e) {
                throw std::invalid_argument(std::string("the grammar does not accept token ") + std::to_string(token) +
                                            ": " + e.what());
            }
        }
        try {
            common_sampler_accept(smpl_, token, accept_grammar);
        } catch (const std::exception & e) {
            throw llama_error(std::string("accept failed: ") + e.what());
        }
    }

    // A fresh chain from the same parameters: common_sampler_reset() leaves the grammar where it is,
    // so the grammar, the history and the RNG all start over this way.
    void reset() {
        std::lock_guard<std::mutex> lock(mtx_);
        common_sampler *            fresh = common_sampler_init(model_.get(), params_);
        if (fresh == nullptr) {
            throw llama_error("reset failed to rebuild the sampler");
        }
        common_sampler_free(smpl_);
        smpl_ = fresh;
        if (shadow_ != nullptr) {
            llama_sampler_free(shadow_);
            shadow_ = make_grammar(llama_model_get_vocab(model_.get()));
            for (llama_token t : grammar_.prefill) {
                llama_sampler_accept(shadow_, t);
            }
        }
    }

    std::vector<std::string> chain() const {
        std::vector<std::string> out;
        llama_sampler *          ch = common_sampler_get(smpl_);
        for (int i = 0; i < llama_sampler_chain_n(ch); ++i) {
            out.emplace_back(llama_sampler_name(llama_sampler_chain_get(ch, i)));
        }
        return out;
    }

    uint32_t seed() const { return common_sampler_get_seed(smpl_); }

    // Whether a token is one the chat format needs to see as text (a tool-call marker, say).
    bool preserves(llama_token t) const { return params_.preserved_tokens.count(t) > 0; }

    const llama_model * model() const { return model_.get(); }

    std::mutex & mutex() { return mtx_; }

  private:
    std::shared_ptr<llama_model> model_;
    common_params_sampling       params_;
    grammar_spec                 grammar_;
    common_sampler *             smpl_   = nullptr;
    llama_sampler *              shadow_ = nullptr;
    bool                         argmax_ = false;
    std::mutex                   mtx_;

    // Whether the chain can only ever pick the most likely token: greedy (temperature <= 0, kept
    // in the chain) with nothing that changes logits or removes the top token first. Such a
    // chain's pick is the argmax of the logits, found directly instead of through llama.cpp's
    // candidate array of n_vocab entries, top-k sort and the other samplers (0.5 ms a token with
    // a 262k vocabulary). Whatever else is asked for takes common_sampler_sample.
    static bool picks_argmax(const common_params_sampling & p, const grammar_spec & g) {
        bool has_temp = false;
        for (auto t : p.samplers) {
            has_temp = has_temp || t == COMMON_SAMPLER_TYPE_TEMPERATURE;
        }
        const bool penalties =
            p.penalty_last_n != 0 && (p.penalty_repeat != 1.0f || p.penalty_freq != 0.0f || p.penalty_present != 0.0f);
        return has_temp && p.temp <= 0.0f && p.dynatemp_range <= 0.0f && p.mirostat == 0 && !penalties &&
               p.dry_multiplier == 0.0f && p.xtc_probability <= 0.0f && p.adaptive_target < 0.0f &&
               p.logit_bias.empty() && p.logit_bias_eog.empty() && p.grammar.grammar.empty() && g.text.empty() &&
               p.reasoning_budget_start.empty() && !p.reasoning_control && !p.backend_sampling;
    }

    // The first index of the largest value, in two passes the compiler vectorizes: the maximum
    // over 16 independent lanes (a > b ? a : b is exactly maxps), then the first index that has it.
    static llama_token argmax(const float * logits, int32_t n) {
        constexpr int32_t lanes = 16;
        float             lane[lanes];
        for (int32_t k = 0; k < lanes; ++k) {
            lane[k] = -INFINITY;
        }
        int32_t i = 0;
        for (; i + lanes <= n; i += lanes) {
            for (int32_t k = 0; k < lanes; ++k) {
                lane[k] = logits[i + k] > lane[k] ? logits[i + k] : lane[k];
            }
        }
        float max = -INFINITY;
        for (int32_t k = 0; k < lanes; ++k) {
            max = lane[k] > max ? lane[k] : max;
        }
        for (; i < n; ++i) {
            max = logits[i] > max ? logits[i] : max;
        }
        for (int32_t j = 0; j < n; ++j) {
            if (logits[j] == max) {
                return j;
            }
        }
        return 0;  // every logit NaN: llama.cpp's chain would fail; the first token is as good
    }

    llama_sampler * make_grammar(const llama_vocab * vocab) const {
        if (!grammar_.lazy) {
            return llama_sampler_init_grammar(vocab, grammar_.text.c_str(), "root");
        }
        std::vector<const char *> pats;
        for (const auto & p : grammar_.patterns) {
            pats.push_back(p.c_str());
        }
        return llama_sampler_init_grammar_lazy_patterns(vocab, grammar_.text.c_str(), "root", pats.data(), pats.size(),
                                                        grammar_.tokens.data(), grammar_.tokens.size());
    }

    // Whether the grammar lets generation end now: apply it to a candidate list holding only an
    // end-of-generation token and see whether that token survives.
    bool grammar_can_end() const {
        const llama_vocab * vocab = llama_model_get_vocab(model_.get());
        llama_token         eog   = llama_vocab_eos(vocab);
        if (eog == LLAMA_TOKEN_NULL) {
            eog = llama_vocab_eot(vocab);
        }
        if (eog == LLAMA_TOKEN_NULL) {
            return true;
        }
        llama_token_data       data  = { eog, 0.0f, 0.0f };
        llama_token_data_array cur_p = { &data, 1, -1, false };
        llama_sampler_apply(shadow_, &cur_p);
        return std::isfinite(data.logit);
    }
};

}  // namespace pyllama
