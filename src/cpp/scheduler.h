// The generation core: every generation, for one sequence or many, goes through one Scheduler.
//
//   sequence   a sequence id of the context and the tokens its KV cells hold (longest-prefix reuse)
//   request    one generation: its options and sampler, the text that grows token by token
//              (UTF-8-safe release, stop strings held back), logprobs, counters, finish reason;
//              its prompt may hold media (images, audio), which stand in the token list as
//              media_token()s and are encoded and decoded one per step
//   scheduler  admission into free sequences, batches filled up to n_batch from every running
//              stream and every waiting prompt, decode, sampling; on a worker thread (threaded) or
//              inline, stepped by whichever caller waits for text (one sequence: Ctrl-C then
//              interrupts a long prompt on the main thread)
//
// Nothing here touches Python: the binding (engine.cpp) converts arguments and releases the GIL.
#pragma once

#include "adapter.h"
#include "context.h"
#include "llama.h"
#include "projector.h"
#include "sampler.h"
#include "speculator.h"

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace pyllama {

struct generation_options {
    int32_t                  max_tokens = -1;  // < 0: until the sequence is full
    std::vector<std::string> stop;
    int32_t                  logprobs    = -1;  // < 0: none; else the number of alternatives per token
    bool                     ignore_eos  = false;
    bool                     speculative = true;  // draft with the engine's Speculator, when it has one
    std::vector<llama_token> prediction;          // predicted outputs: the tokens the reply is expected to repeat
    lora_set                 lora;                // the LoRA adapters it runs with (canonical, see lora_canonical)
};

// Which adapters computed a sequence's cells: tokens [0, from) without any, the rest with `set` (an
// aLoRA switches on at its invocation; a LoRA applies from 0). Prefixes are shared only where their
// cells were computed alike.
struct lora_key {
    lora_set set;
    size_t   from = 0;

    // The first token computed with adapters (SIZE_MAX: none is).
    size_t start() const { return set.empty() ? SIZE_MAX : from; }
};

// A media chunk of a prompt: it stands at prompt[start, start + n_tokens) as media_token()s.
struct media_span {
    size_t                     start = 0;
    Chunk                      chunk;
    std::shared_ptr<Projector> projector;

    size_t end() const { return start + chunk.n_tokens(); }
};

// The i-th stand-in token of the media chunk with id `id`: negative, never LLAMA_TOKEN_NULL, the same
// run for the same id, so that prefix matching counts a media chunk by its content (mtmd's id).
llama_token media_token(const std::string & id, size_t i);
inline bool is_media_token(llama_token t) {
    return t < -1;
}

// A prompt of chunks (Projector::tokenize) as the core takes it: the tokens, media as media_token()s,
// and where each media chunk stands.
void prompt_from_chunks(const std::vector<Chunk> &         chunks,
                        const std::shared_ptr<Projector> & projector,
                        std::vector<llama_token> &         prompt,
                        std::vector<media_span> &          media);

struct token_logprob {
    llama_token                                token = -1;
    std::string                                piece;
    float                                      logprob = 0.0f;
    std::vector<std::pair<llama_token, float>> top;
};

// How many bytes at the end of `s` (from `from`) are an incomplete but possibly valid UTF-8
// character, which the next token may complete.
size_t incomplete_utf8_tail(const std::string & s, size_t from);

// OpenAI's logprob of `tok`: the log-softmax of the raw logits of output row j, before any sampler,
// with the n_top best alternatives.
token_logprob logprob_of(llama_context * ctx, int32_t j, const llama_vocab * vocab, llama_token tok, int32_t n_top);

// The text of a generation: pieces are appended as tokens come; stop strings cut it; release()
// gives what can go out (complete UTF-8, and not the start of a stop string).
class generated_text {
  public:
    explicit generated_text(const std::vector<std::string> & stop);

    // Appends the piece of `tok` (special tokens as text when `special`); returns its bytes.
    std::string append(const llama_vocab * vocab, llama_token tok, bool special);

    // True when a stop string appeared: the text is cut before it, and matched() names it (the one
    // that begins first; the longest of those that begin there).
    bool                check_stop();
    const std::string & matched() const { return matched_; }

    std::string release(bool all);

  private:
    const std::vector<std::string> & stop_;
    size_t                           max_stop_ = 0;
    std::string                      text_;
    size_t                           released_ = 0;
    size_t                           scanned_  = 0;
    std::string                      matched_;
};

// A file descriptor that an event loop watches (asyncio's add_reader) and a threaded scheduler
// signals when a request submitted with it has new text or has ended: streams wait on the loop
// instead of each in a thread of its own. An eventfd on Linux, a pipe elsewhere; not on Windows.
class Notifier {
  public:
    Notifier();
    Notifier(const Notifier &)             = delete;
    Notifier & operator=(const Notifier &) = delete;
    ~Notifier();

    int  fileno() const { return rfd_; }
    void notify() const;  // from any thread; a full pipe or counter already means "wake up"
    void drain() const;   // empties the descriptor (the loop calls this when it wakes)

  private:
    int rfd_ = -1;
    int wfd_ = -1;
};

class Scheduler;

// One generation. The scheduler fills it; next() takes the pieces (call without the GIL).
class Request {
  public:
    Request(std::shared_ptr<Sampler>        sampler,
            std::vector<llama_token>        prompt,
            generation_options              opt,
            std::shared_ptr<const Notifier> notifier,
            std::weak_ptr<Scheduler>        scheduler,
            bool                            drives);

    // The next piece of text; empty at the end. Raises what failed the request. With an inline
    // scheduler, the caller's thread runs the steps until a piece is ready.
    std::string next();

    // Without waiting (and without stepping): false when no piece is ready and the request runs on;
    // else true, with the next piece in `out`, empty at the end. Raises what failed the request.
    bool next_nowait(std::string & out);

    bool        ready() const;  // a piece is waiting, or the request has ended
    std::string run();          // to the end; the text not taken yet
    void        cancel();       // from any thread: ends at the next step (a sole prompt's decode stops now)

    std::string                finish_reason() const;  // empty while running
    std::string                stop_word() const;      // the stop string that ended it, else empty
    size_t                     n_prompt() const { return prompt_.size(); }
    size_t                     n_reused() const { return n_reused_.load(); }
    size_t                     n_drafted() const { return n_drafted_.load(); }    // draft tokens verified
    size_t                     n_accepted() const { return n_accepted_.load(); }  // ... that the model kept
    std::vector<llama_token>   completion() const;
    std::vector<token_logprob> logprobs() const;

  private:
    friend class Scheduler;

    void push(std::string piece);
    void end(const std::string & reason, std::exception_ptr error = nullptr);
    bool take(std::string & out);  // with mtx_ held: a piece, or the end (raises the error)

    std::shared_ptr<Sampler>        sampler_;
    std::vector<llama_token>        prompt_;
    std::vector<media_span>         media_;  // in prompt order
    generation_options              opt_;
    generated_text                  text_;
    std::atomic<bool>               cancelled_{ false };
    std::atomic<size_t>             n_reused_{ 0 };
    std::atomic<size_t>             n_drafted_{ 0 };
    std::atomic<size_t>             n_accepted_{ 0 };
    std::shared_ptr<const Notifier> notifier_;
    std::weak_ptr<Scheduler>        scheduler_;
    bool                            drives_ = false;  // the caller's next() steps the scheduler (inline)

    // the scheduler's bookkeeping (its step lock held)
    int32_t                  seq_       = -1;  // the sequence it decodes in
    size_t                   evaluated_ = 0;   // prompt tokens in the KV memory
    bool                     sampling_  = false;
    int32_t                  row_       = -1;         // its output row in the current batch, or -1
    size_t                   n_prompt_  = 0;          // prompt tokens in the current batch
    llama_token              last_      = -1;         // the token sampled last, to decode next
    std::vector<llama_token> draft_;                  // drafted after last_, in the current batch
    bool                     draft_spec_  = false;    // draft_ came from the Speculator (else from the prediction)
    const Speculator *       spec_seen_   = nullptr;  // the Speculator that has seen this generation's prompt
    size_t                   pred_cursor_ = 0;        // where the reply stands in opt_.prediction

    mutable std::mutex         mtx_;
    std::condition_variable    cv_;
    std::deque<std::string>    pieces_;
    bool                       done_ = false;
    std::string                finish_reason_;
    std::string                stop_word_;
    std::exception_ptr         error_;  // what failed the request, raised once by next()
    std::vector<llama_token>   completion_;
    std::vector<token_logprob> logprobs_;

    // the adapters its prompt and reply are computed with (an aLoRA's tokens before its invocation
    // without), and the steps it had work but another adapter set had the batch (the scheduler's)
    lora_key lora_;
    size_t   lora_waited_ = 0;
};

class Scheduler : public std::enable_shared_from_this<Scheduler> {
  public:
    // Prompt tokens that a request must find cached in a sequence to take it rather than the lowest
    // free one (see admit()); about what prompt evaluation of that many tokens costs against a few
    // steps of decoding with one more pass over the weights.
    static constexpr size_t  kReuseWorthAGap  = 64;
    // The most tokens drafted at once from a prediction, when the engine has no Speculator to say.
    static constexpr int32_t kPredictionDraft = 16;

    // Make it with std::make_shared: requests refer to it weakly.
    Scheduler(Context & ctx, int32_t n_parallel, bool threaded);
    ~Scheduler();

    Scheduler(const Scheduler &)             = delete;
    Scheduler & operator=(const Scheduler &) = delete;

    std::shared_ptr<Request> submit(std::shared_ptr<Sampler>        sampler,
                                    std::vector<llama_token>        prompt,
                                    generation_options              opt,
                                    std::shared_ptr<const Notifier> notifier = nullptr,
                                    std::vector<media_span>         media    = {});
    void                     stop();  // requests still running end with an error

    // Inline: steps until `r` has a piece or has ended (one caller steps at a time).
    void drive(Request & r);

    // A request's decode alone in the batch stops now (Request::cancel).
    void interrupt_if_alone(const Request * r);

    // The sequences, for states and caches. Each takes the step lock; a sequence a request is
    // using is refused (reset and adopt raise, snapshot returns false).
    std::vector<llama_token> tokens(int32_t seq);
    bool                     busy(int32_t seq);   // a request is using it
    void                     reset(int32_t seq);  // seq < 0: every sequence
    void                     adopt(int32_t seq, std::vector<llama_token> tokens);
    // A sequence's tokens, its state and the adapters its cells were computed with.
    bool snapshot(int32_t seq, std::vector<llama_token> & tokens, std::vector<uint8_t> & state, lora_key & lora);
    void restore(int32_t                          seq,
                 const std::vector<llama_token> & tokens,
                 const std::vector<uint8_t> &     state,
                 const lora_key &                 lora = {});

    // The host-memory prompt cache (llama-server's --cache-ram): when a sequence gives up a prefix
    // of kReuseWorthAGap tokens or more that no other sequence holds, its state is kept in RAM, within
    // `budget` bytes (least recently used dropped first), and loaded back into a sequence when a
    // prompt starts with more of it than any sequence holds. 0 bytes: off (what it holds is dropped).
    struct host_cache_stats {
        size_t budget = 0, bytes = 0, entries = 0, n_saved = 0, n_loaded = 0;
    };
    void             set_host_cache(size_t budget);
    host_cache_stats host_cache();
    void             clear_host_cache();

    // Speculative decoding for every request that does not turn it off (nullptr: none). Waits for
    // the step in progress; the drafts of the next step use it.
    void                        set_speculator(std::shared_ptr<Speculator> spec);
    std::shared_ptr<Speculator> speculator();

    Context & context() { return ctx_; }
    bool      threaded() const { return threaded_; }
    size_t    n_ctx_seq() const { return n_ctx_seq_; }
    size_t    n_parallel() const { return slots_.size(); }
    size_t    n_active();

  private:
    struct slot {
        std::vector<llama_token> tokens;  // what its sequence holds
        bool                     busy    = false;
        bool                     copying = false;  // forked: llama.cpp copies its buffers at the next decode
        // M-RoPE: (end of a media chunk, its positions minus its tokens), where positions and indices part
        std::vector<std::pair<size_t, int32_t>> shifts;
        lora_key                                lora;  // the adapters its cells were computed with
    };

    struct host_entry {
        std::vector<llama_token>                tokens;
        std::vector<uint8_t>                    state;  // llama_state_seq_get_data of a sequence holding `tokens`
        std::vector<std::pair<size_t, int32_t>> shifts;
        lora_key                                lora;
    };

    // With the step lock held; `keep` (an entry about to be loaded, or end()) is never dropped.
    void host_save(int32_t seq, std::list<host_entry>::const_iterator keep);
    // Drops the least recently used entries but `keep` until `room` more bytes fit the budget.
    void host_trim(size_t room, std::list<host_entry>::const_iterator keep);

    std::unique_lock<std::mutex> lock_step();  // the step lock for a sequence call, before the worker's next step
    void                         loop();
    bool                         has_work();  // admits what it can; true when a step has something to do
    void                         step();
    void   step_media(const std::vector<std::shared_ptr<Request>> & reqs);  // one media chunk, after the batch
    void   admit();                                                         // with mtx_ held
    void   resync(const std::shared_ptr<Request> & r);
    void   sample(const std::shared_ptr<Request> & r, const llama_vocab * vocab);
    // Drafts for the running streams that speculate, at most `room` tokens in all (with the step lock).
    size_t make_drafts(const std::vector<std::shared_ptr<Request>> & stepping, size_t room);
    // After the decode: samples r's row and, while its sampler agrees with the draft, the rows of the
    // draft; the rest of the draft leaves the sequence.
    void   verify(const std::shared_ptr<Request> & r, const llama_vocab * vocab);
    void   release(const std::shared_ptr<Request> & r, const std::string & reason, std::exception_ptr error = nullptr);
    void   fail_all(std::exception_ptr why);
    void   purge_cancelled();  // with the step lock held
    void   check_idle(int32_t seq, const char * what);
    void   check_idle_range(int32_t seq) const;  // invalid_argument outside 0..n_parallel-1
    // The adapters r's token at index `next` of prompt and reply runs with (SIZE_MAX: the reply's next).
    static const lora_set & next_lora(const Request & r, size_t next);

    Context &                             ctx_;
    const bool                            threaded_;
    bool                                  generates_ = true;  // the model has a decoder and the context KV memory
    size_t                                n_ctx_seq_ = 0;
    size_t                                n_batch_   = 1;
    int32_t                               n_swa_     = 0;     // the model's sliding window, 0 for none
    bool                                  can_draft_ = true;  // the memory can drop a sequence's last cells
    std::shared_ptr<Speculator>           spec_;
    std::vector<slot>                     slots_;
    std::list<host_entry>                 host_;  // least recently used first (the step lock)
    size_t                                host_budget_ = 0, host_bytes_ = 0, host_saved_ = 0, host_loaded_ = 0;
    std::mutex                            step_mtx_;  // held by whoever steps, and by the sequence calls
    std::mutex                            waiters_mtx_;
    std::condition_variable               waiters_cv_;
    int                                   step_waiters_ = 0;  // sequence calls waiting for step_mtx_ (lock_step)
    std::mutex                            mtx_;               // the queue and the active list
    std::condition_variable               cv_;
    std::deque<std::shared_ptr<Request>>  queue_;
    std::vector<std::shared_ptr<Request>> active_;
    bool                                  stopping_ = false;
    std::atomic<const Request *>          alone_{ nullptr };  // the one request of the decode in progress
    std::thread                           worker_;
};

}  // namespace pyllama
