#include "speculator.h"

#include "pyllama.h"

#include "common.h"
#include "speculative.h"  // llama.cpp's common/speculative.h

#include <algorithm>
#include <stdexcept>

namespace pyllama {

namespace {

// What this build drives: the n-gram types and a draft model. The others need heads in the target's
// file (MTP, Eagle3, DFlash) and a context of llama.cpp's own making.
bool drivable(common_speculative_type t) {
    switch (t) {
        case COMMON_SPECULATIVE_TYPE_DRAFT_SIMPLE:
        case COMMON_SPECULATIVE_TYPE_NGRAM_SIMPLE:
        case COMMON_SPECULATIVE_TYPE_NGRAM_MAP_K:
        case COMMON_SPECULATIVE_TYPE_NGRAM_MAP_K4V:
        case COMMON_SPECULATIVE_TYPE_NGRAM_MOD:
        case COMMON_SPECULATIVE_TYPE_NGRAM_CACHE: return true;
        default: return false;
    }
}

}  // namespace

Speculator::Speculator(Context & target, Context * draft, const speculative_params & p, uint32_t n_seq) :
    target_(target), draft_(draft) {
    common_params_speculative params;
    params.types.clear();
    if (p.types.empty()) {
        throw invalid_request_error("speculative: give at least one type", "speculative");
    }
    bool wants_draft = false;
    for (const auto & name : p.types) {
        const auto t = common_speculative_type_from_name(name);
        if (t == COMMON_SPECULATIVE_TYPE_COUNT || t == COMMON_SPECULATIVE_TYPE_NONE) {
            throw invalid_request_error(
                "speculative: unknown type '" + name + "' (one of: " + common_speculative_all_types_str() + ")",
                "speculative");
        }
        if (!drivable(t)) {
            throw invalid_request_error("speculative: type '" + name +
                                            "' needs heads in the model file that this version does not drive; use "
                                            "draft-simple with a draft_model, or an n-gram type",
                                        "speculative");
        }
        if (std::find(params.types.begin(), params.types.end(), t) == params.types.end()) {
            params.types.push_back(t);
        }
        wants_draft = wants_draft || t == COMMON_SPECULATIVE_TYPE_DRAFT_SIMPLE;
    }
    if (wants_draft != (draft != nullptr)) {
        throw invalid_request_error(wants_draft ? "speculative: draft-simple needs a draft_model"
                                                : "speculative: a draft_model is used by the type draft-simple only",
                                    wants_draft ? "draft_model" : "speculative");
    }
    auto & d = params.draft;
    if (p.n_max >= 0) {
        d.n_max                    = p.n_max;
        params.ngram_mod.n_max     = p.n_max;
        params.ngram_simple.size_m = params.ngram_map_k.size_m = params.ngram_map_k4v.size_m =
            static_cast<uint16_t>(p.n_max);
    }
    if (p.n_min >= 0) {
        d.n_min                = p.n_min;
        params.ngram_mod.n_min = std::min(p.n_min, params.ngram_mod.n_max);
    }
    if (p.p_min >= 0.0f) {
        d.p_min = p.p_min;
    }
    if (p.ngram_size_n > 0) {
        params.ngram_simple.size_n = params.ngram_map_k.size_n = params.ngram_map_k4v.size_n =
            static_cast<uint16_t>(p.ngram_size_n);
    }
    if (p.ngram_size_m > 0) {
        params.ngram_simple.size_m = params.ngram_map_k.size_m = params.ngram_map_k4v.size_m =
            static_cast<uint16_t>(p.ngram_size_m);
    }
    if (p.ngram_min_hits > 0) {
        params.ngram_simple.min_hits = params.ngram_map_k.min_hits = params.ngram_map_k4v.min_hits =
            static_cast<uint16_t>(p.ngram_min_hits);
    }
    n_max_ = std::max<int32_t>(1, common_speculative_n_max(&params));
    {
        auto ut   = target_.acquire();
        d.ctx_tgt = ut.ctx;
        log_capture capture;
        if (draft_ != nullptr) {
            auto ud = draft_->acquire();
            if (llama_n_seq_max(ud.ctx) < n_seq) {
                throw invalid_request_error("the draft model's context has fewer sequences than the engine",
                                            "draft_model");
            }
            d.ctx_dft      = ud.ctx;
            n_batch_draft_ = static_cast<int32_t>(std::max<uint32_t>(1, llama_n_batch(ud.ctx)));
            try {
                spec_ = common_speculative_init(params, n_seq);
            } catch (const std::exception & e) {
                throw invalid_request_error(std::string("the draft model cannot draft for this model: ") + e.what(),
                                            "draft_model");
            }
        } else {
            try {
                spec_ = common_speculative_init(params, n_seq);
            } catch (const std::exception & e) {
                throw invalid_request_error(std::string("speculative: ") + e.what(), "speculative");
            }
        }
    }
    if (spec_ == nullptr) {
        throw invalid_request_error("speculative: no type could be set up", "speculative");
    }
    types_ = common_speculative_type_name_str(params.types);
    draft_tokens_.resize(n_seq);
}

Speculator::~Speculator() {
    common_speculative_free(spec_);
}

void Speculator::forget(int32_t seq) {
    if (draft_ == nullptr || seq < 0 || static_cast<size_t>(seq) >= draft_tokens_.size()) {
        return;
    }
    draft_tokens_[seq].clear();
    try {
        auto u = draft_->acquire();
        llama_memory_seq_rm(llama_get_memory(u.ctx), seq, -1, -1);
    } catch (const std::exception &) {
        // a closed draft context holds nothing
    }
}

void Speculator::sync_draft(const std::vector<job *> & jobs) {
    // Each drafting sequence of the draft model is brought level with the engine's: what they share
    // stays, the rest goes, and what is missing is evaluated (only new tokens, after the first time).
    Batch b;
    auto  flush = [&]() {
        if (b.tokens.empty()) {
            return;
        }
        std::string reason;
        const auto  rc = draft_->decode_nogil(b, false, reason);
        if (rc != 0) {
            // the draft model could not follow: its view of these sequences is dropped, they draft nothing
            for (const auto * j : jobs) {
                forget(j->seq);
            }
            b.clear();
            throw llama_error("the draft model failed to evaluate the prompt: " + reason);
        }
        b.clear();
    };
    for (const auto * j : jobs) {
        auto &       held = draft_tokens_[j->seq];
        const auto & h    = *j->history;
        size_t       lcp  = 0;
        while (lcp < held.size() && lcp < h.size() && held[lcp] == h[lcp]) {
            ++lcp;
        }
        if (lcp < held.size()) {
            auto u = draft_->acquire();
            if (!llama_memory_seq_rm(llama_get_memory(u.ctx), j->seq, static_cast<llama_pos>(lcp), -1)) {
                llama_memory_seq_rm(llama_get_memory(u.ctx), j->seq, -1, -1);
                lcp = 0;
            }
            held.resize(lcp);
        }
        for (size_t i = lcp; i < h.size(); ++i) {
            b.tokens.push_back(h[i]);
            b.pos.push_back(static_cast<llama_pos>(i));
            b.seq_ids.push_back({ j->seq });
            b.logits.push_back(0);
            held.push_back(h[i]);
            if (static_cast<int32_t>(b.tokens.size()) >= n_batch_draft_) {
                flush();
            }
        }
    }
    flush();
}

void Speculator::draft(std::vector<job> & jobs) {
    for (auto & j : jobs) {
        j.out->clear();
    }
    for (int32_t s = 0; s < static_cast<int32_t>(draft_tokens_.size()); ++s) {
        common_speculative_get_draft_params(spec_, s).drafting = false;
    }
    std::vector<job *> drafting;
    for (auto & j : jobs) {
        if (j.n_max <= 0 || (draft_ != nullptr && !j.text)) {
            continue;  // the draft model sees text only
        }
        drafting.push_back(&j);
    }
    if (drafting.empty()) {
        return;
    }
    if (draft_ != nullptr) {
        sync_draft(drafting);
    }
    for (auto * j : drafting) {
        if (j->begin) {
            common_speculative_begin(spec_, j->seq, *j->history);
        }
        auto & dp   = common_speculative_get_draft_params(spec_, j->seq);
        dp.drafting = true;
        dp.n_max    = j->n_max;
        dp.n_past   = static_cast<llama_pos>(j->history->size());
        dp.id_last  = j->last;
        dp.prompt   = j->history;
        dp.result   = j->out;
    }
    if (draft_ != nullptr) {
        auto u = draft_->acquire();
        common_speculative_draft(spec_);
        draft_->outputs_lost_locked();
        // what the draft model evaluated while drafting stays in its memory: the last token and the
        // start of the draft, which the target keeps when it accepts them
        llama_memory_t mem = llama_get_memory(u.ctx);
        for (auto * j : drafting) {
            auto &       held  = draft_tokens_[j->seq];
            const auto   n     = static_cast<llama_pos>(j->history->size());
            const auto   max   = llama_memory_seq_pos_max(mem, j->seq);
            const size_t extra = max >= n ? static_cast<size_t>(max - n + 1) : 0;
            if (extra == 0) {
                continue;
            }
            if (extra <= 1 + j->out->size()) {
                held.push_back(j->last);
                held.insert(held.end(), j->out->begin(), j->out->begin() + static_cast<std::ptrdiff_t>(extra - 1));
            } else {
                llama_memory_seq_rm(mem, j->seq, n, -1);
            }
        }
    } else {
        common_speculative_draft(spec_);
    }
    const int32_t n_vocab = target_.n_vocab();
    for (auto * j : drafting) {
        auto & out = *j->out;
        auto   bad = std::find_if(out.begin(), out.end(), [&](llama_token t) { return t < 0 || t >= n_vocab; });
        out.erase(bad, out.end());
        if (static_cast<int32_t>(out.size()) > j->n_max) {
            out.resize(j->n_max);
        }
    }
}

void Speculator::accept(int32_t seq, uint16_t n) {
    common_speculative_accept(spec_, seq, n);
}

std::vector<llama_token> prediction_draft(const std::vector<llama_token> & prediction,
                                          size_t &                         cursor,
                                          const std::vector<llama_token> & completion,
                                          int32_t                          n_max) {
    std::vector<llama_token> out;
    if (completion.empty() || n_max <= 0 || prediction.empty()) {
        return out;
    }
    const size_t npos = static_cast<size_t>(-1);
    size_t       next = npos;  // where the draft starts in the prediction
    if (cursor < prediction.size() && prediction[cursor] == completion.back()) {
        next = cursor + 1;  // the reply follows the prediction
    } else {
        // Found again: the longest run of the reply's last tokens (up to 8, at least 2 once the reply
        // has them) that the prediction holds, the first such place at or after the cursor, else the
        // first one before it.
        const size_t most  = std::min<size_t>(8, completion.size());
        const size_t least = completion.size() == 1 ? 1 : 2;
        for (size_t k = most; k >= least && next == npos; --k) {
            if (k > prediction.size()) {
                continue;
            }
            const auto * tail  = completion.data() + completion.size() - k;
            size_t       found = npos;
            for (size_t j = 0; j + k <= prediction.size(); ++j) {
                if (std::equal(tail, tail + k, prediction.begin() + static_cast<std::ptrdiff_t>(j))) {
                    if (j + k >= cursor) {
                        found = j;
                        break;
                    }
                    if (found == npos) {
                        found = j;
                    }
                }
            }
            if (found != npos) {
                next = found + k;
            }
        }
    }
    if (next == npos || next >= prediction.size()) {
        return out;
    }
    cursor         = next;
    const size_t n = std::min(static_cast<size_t>(n_max), prediction.size() - next);
    out.assign(prediction.begin() + static_cast<std::ptrdiff_t>(next),
               prediction.begin() + static_cast<std::ptrdiff_t>(next + n));
    return out;
}

}  // namespace pyllama
