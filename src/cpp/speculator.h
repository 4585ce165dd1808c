// Speculative decoding for the generation core: drafts that the target model verifies in one decode.
//
//   Speculator   llama.cpp's common_speculative (common/speculative.h) over the engine's sequences:
//                the n-gram types (drafting from the sequence's own tokens) and draft-simple (a small
//                draft model over the same vocabulary, in a Context of its own, whose sequences are
//                brought level with the engine's before each draft)
//   prediction   OpenAI's predicted outputs: drafts taken from a text the caller expects back,
//                followed while the reply follows it and found again after it departs
//
// The scheduler verifies a draft token by token with the request's own sampler, so that grammars,
// stop strings, logprobs and max_tokens stay exact; what the target rejects leaves the KV memory.
#pragma once

#include "context.h"
#include "llama.h"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

struct common_speculative;

namespace pyllama {

struct speculative_params {
    std::vector<std::string> types;                // llama.cpp's names ("ngram-simple", "draft-simple", ...)
    int32_t                  n_max          = -1;  // < 0: llama.cpp's defaults
    int32_t                  n_min          = -1;
    float                    p_min          = -1.0f;
    int32_t                  ngram_size_n   = -1;
    int32_t                  ngram_size_m   = -1;
    int32_t                  ngram_min_hits = -1;
};

class Speculator {
  public:
    // `draft`: the draft model's Context (draft-simple), with n_seq_max >= n_seq; nullptr for the
    // n-gram types. Raises invalid_argument for an unknown type or one this build cannot drive.
    Speculator(Context & target, Context * draft, const speculative_params & params, uint32_t n_seq);
    ~Speculator();

    Speculator(const Speculator &)             = delete;
    Speculator & operator=(const Speculator &) = delete;

    struct job {
        int32_t                          seq     = 0;
        const std::vector<llama_token> * history = nullptr;  // what the sequence holds, before `last`
        llama_token                      last    = -1;       // the token sampled last (not evaluated yet)
        int32_t                          n_max   = 0;        // the most tokens this draft may have
        bool                             begin   = false;    // the first draft of a generation
        bool                             text    = true;     // the history holds no media
        std::vector<llama_token> *       out     = nullptr;  // the draft (filled; maybe empty)
    };

    // Drafts for every job, the draft model's sequences batched (call with the scheduler's step lock).
    void draft(std::vector<job> & jobs);
    // The target accepted n of the last draft of `seq`.
    void accept(int32_t seq, uint16_t n);
    // The draft model's view of `seq` is forgotten (the engine's sequence was reset).
    void forget(int32_t seq);

    int32_t             n_max() const { return n_max_; }
    const std::string & types() const { return types_; }
    bool                uses_draft_model() const { return draft_ != nullptr; }

  private:
    void sync_draft(const std::vector<job *> & jobs);

    common_speculative *                  spec_ = nullptr;
    Context &                             target_;
    Context *                             draft_ = nullptr;
    std::vector<std::vector<llama_token>> draft_tokens_;  // what each of the draft context's sequences holds
    int32_t                               n_max_         = 0;
    int32_t                               n_batch_draft_ = 1;
    std::string                           types_;
};

// Predicted outputs: the next tokens of `prediction` after the reply so far (`completion`, whose last
// token is not evaluated yet), at most n_max; `cursor` is where the reply stands in the prediction
// (updated: the index of the token expected after the last one).
std::vector<llama_token> prediction_draft(const std::vector<llama_token> & prediction,
                                          size_t &                         cursor,
                                          const std::vector<llama_token> & completion,
                                          int32_t                          n_max);

}  // namespace pyllama
