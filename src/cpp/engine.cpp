// Continuous batching: up to n_parallel requests decode together in one context, a sequence each,
// one llama_decode per step. A worker thread owns the context: it admits queued requests between
// steps (each into the lowest free sequence, or one that holds much more of its prompt), decodes
// the batch in sequence order (llama.cpp's micro-batches take consecutive sequences), evaluates prompts in chunks that
// leave room for the running streams' next tokens, samples each request with its own sampler, grammar and stop rules,
// and hands finished pieces of text to the request. Python only submits requests and receives pieces.

#include "model.h"
#include "pyllama.h"

#include "context.h"
#include "generate.h"
#include "sampler.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#ifndef _WIN32
#include <fcntl.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/eventfd.h>
#endif
#endif

namespace pyllama {

// A file descriptor that an event loop watches (asyncio's add_reader) and the engine's worker
// signals when a request submitted with it has new text or has ended: streams wait on the loop
// instead of each in a thread of its own. An eventfd on Linux, a pipe elsewhere; not on Windows.
class Notifier {
  public:
    Notifier() {
#if defined(_WIN32)
        throw std::runtime_error("Notifier needs a POSIX system");
#elif defined(__linux__)
        rfd_ = wfd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (rfd_ < 0) {
            throw std::runtime_error("eventfd failed");
        }
#else
        int fds[2];
        if (pipe(fds) != 0) {
            throw std::runtime_error("pipe failed");
        }
        rfd_ = fds[0];
        wfd_ = fds[1];
        for (int fd : fds) {
            fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
            fcntl(fd, F_SETFD, FD_CLOEXEC);
        }
#endif
    }

    Notifier(const Notifier &)             = delete;
    Notifier & operator=(const Notifier &) = delete;

    ~Notifier() {
#ifndef _WIN32
        if (wfd_ != rfd_ && wfd_ >= 0) {
            ::close(wfd_);
        }
        if (rfd_ >= 0) {
            ::close(rfd_);
        }
#endif
    }

    int fileno() const { return rfd_; }

    // From any thread; a full pipe or counter already means "wake up".
    void notify() const {
#if defined(__linux__)
        const uint64_t        one = 1;
        [[maybe_unused]] auto n   = ::write(wfd_, &one, sizeof(one));
#elif !defined(_WIN32)
        const char            one = 1;
        [[maybe_unused]] auto n   = ::write(wfd_, &one, 1);
#endif
    }

    // Empties the descriptor (the loop calls this when it wakes).
    void drain() const {
#ifndef _WIN32
        char buf[256];
        while (::read(rfd_, buf, sizeof(buf)) > 0) {
        }
#endif
    }

  private:
    int rfd_ = -1;
    int wfd_ = -1;
};

// One request to the engine. The worker fills it; next() takes the pieces (without the GIL).
class EngineRequest {
  public:
    EngineRequest(std::shared_ptr<Sampler>        sampler,
                  std::vector<llama_token>        prompt,
                  generation_options              opt,
                  std::shared_ptr<const Notifier> notifier) :
        sampler_(std::move(sampler)),
        prompt_(std::move(prompt)),
        opt_(std::move(opt)),
        text_(opt_.stop),
        notifier_(std::move(notifier)) {}

    // The next piece of text; empty at the end. Raises what failed the request.
    std::string next() {
        std::unique_lock<std::mutex> lock(mtx_);
        cv_.wait(lock, [&] { return !pieces_.empty() || done_; });
        if (!pieces_.empty()) {
            std::string out = std::move(pieces_.front());
            pieces_.pop_front();
            return out;
        }
        if (!error_.empty()) {
            const std::string e = error_;
            error_.clear();
            throw llama_error(e);
        }
        return {};
    }

    // Without waiting: false when no piece is ready and the request runs on; else true, with the
    // next piece in `out`, empty at the end. Raises what failed the request.
    bool next_nowait(std::string & out) {
        std::lock_guard<std::mutex> lock(mtx_);
        if (!pieces_.empty()) {
            out = std::move(pieces_.front());
            pieces_.pop_front();
            return true;
        }
        if (!done_) {
            return false;
        }
        if (!error_.empty()) {
            const std::string e = error_;
            error_.clear();
            throw llama_error(e);
        }
        out.clear();
        return true;
    }

    // A piece is waiting, or the request has ended.
    bool ready() const {
        std::lock_guard<std::mutex> lock(mtx_);
        return !pieces_.empty() || done_;
    }

    std::string run() {
        std::string out;
        for (std::string piece = next(); !piece.empty(); piece = next()) {
            out += piece;
        }
        return out;
    }

    void cancel() { cancelled_.store(true); }

    std::string finish_reason() const {
        std::lock_guard<std::mutex> lock(mtx_);
        return done_ ? finish_reason_ : std::string();
    }

    size_t n_prompt() const { return prompt_.size(); }

    size_t n_reused() const { return n_reused_.load(); }

    std::vector<llama_token> completion() const {
        std::lock_guard<std::mutex> lock(mtx_);
        return completion_;
    }

    std::vector<token_logprob> logprobs() const {
        std::lock_guard<std::mutex> lock(mtx_);
        return logprobs_;
    }

  private:
    friend class Engine;

    // --- called by the worker -------------------------------------------------------------
    void push(std::string piece) {
        if (piece.empty()) {
            return;
        }
        bool was_empty = false;
        {
            std::lock_guard<std::mutex> lock(mtx_);
            was_empty = pieces_.empty();  // else the reader has not taken the last one yet
            pieces_.push_back(std::move(piece));
            cv_.notify_all();
        }
        if (notifier_ && was_empty) {
            notifier_->notify();
        }
    }

    void end(const std::string & reason, const std::string & error = {}) {
        std::string rest = text_.release(true);
        {
            std::lock_guard<std::mutex> lock(mtx_);
            if (!rest.empty()) {
                pieces_.push_back(std::move(rest));
            }
            finish_reason_ = reason;
            error_         = error;
            done_          = true;
            cv_.notify_all();
        }
        if (notifier_) {
            notifier_->notify();
        }
    }

    std::shared_ptr<Sampler>        sampler_;
    std::vector<llama_token>        prompt_;
    generation_options              opt_;
    generated_text                  text_;
    std::atomic<bool>               cancelled_{ false };
    std::atomic<size_t>             n_reused_{ 0 };
    std::shared_ptr<const Notifier> notifier_;

    // the worker's bookkeeping
    int32_t     seq_       = -1;  // the sequence it decodes in
    size_t      evaluated_ = 0;   // prompt tokens in the KV memory
    bool        sampling_  = false;
    int32_t     row_       = -1;  // its output row in the current batch, or -1
    size_t      n_prompt_  = 0;   // prompt tokens in the current batch
    llama_token last_      = -1;  // the token sampled last, to decode next

    mutable std::mutex         mtx_;
    std::condition_variable    cv_;
    std::deque<std::string>    pieces_;
    bool                       done_ = false;
    std::string                finish_reason_;
    std::string                error_;
    std::vector<llama_token>   completion_;
    std::vector<token_logprob> logprobs_;
};

class Engine {
  public:
    // Prompt tokens that a request must find cached in a sequence to take it rather than the lowest
    // free one (see admit()); about what prompt evaluation of that many tokens costs against a few
    // steps of decoding with one more pass over the weights.
    static constexpr size_t kReuseWorthAGap = 64;

    Engine(Context & ctx, int32_t n_parallel) : ctx_(ctx) {
        auto u = ctx_.acquire();
        if (n_parallel < 1 || static_cast<uint32_t>(n_parallel) > llama_n_seq_max(u.ctx)) {
            throw std::invalid_argument("n_parallel must be between 1 and the context's n_seq_max (" +
                                        std::to_string(llama_n_seq_max(u.ctx)) + ")");
        }
        if (!llama_get_memory(u.ctx)) {
            throw std::invalid_argument("the context has no KV memory");
        }
        n_ctx_seq_ = llama_n_ctx_seq(u.ctx);
        n_batch_   = std::max<uint32_t>(1, llama_n_batch(u.ctx));
        slots_.resize(n_parallel);
        worker_ = std::thread([this] { loop(); });
    }

    ~Engine() { stop(); }

    std::shared_ptr<EngineRequest> submit(std::shared_ptr<Sampler>        sampler,
                                          std::vector<llama_token>        prompt,
                                          generation_options              opt,
                                          std::shared_ptr<const Notifier> notifier = nullptr) {
        if (prompt.empty()) {
            throw std::invalid_argument("the prompt is empty");
        }
        if (prompt.size() >= n_ctx_seq_) {
            throw std::invalid_argument("the prompt has " + std::to_string(prompt.size()) +
                                        " tokens and a sequence holds " + std::to_string(n_ctx_seq_));
        }
        auto req =
            std::make_shared<EngineRequest>(std::move(sampler), std::move(prompt), std::move(opt), std::move(notifier));
        if (req->opt_.max_tokens == 0) {
            req->end("length");
            return req;
        }
        std::lock_guard<std::mutex> lock(mtx_);
        if (stopping_) {
            throw llama_error("the engine is closed");
        }
        queue_.push_back(req);
        cv_.notify_all();
        return req;
    }

    void stop() {
        {
            std::lock_guard<std::mutex> lock(mtx_);
            if (stopping_ && !worker_.joinable()) {
                return;
            }
            stopping_ = true;
            cv_.notify_all();
        }
        if (worker_.joinable()) {
            worker_.join();
        }
    }

    size_t n_ctx_seq() const { return n_ctx_seq_; }

    size_t n_parallel() const { return slots_.size(); }

    size_t n_active() {
        std::lock_guard<std::mutex> lock(mtx_);
        return active_.size() + queue_.size();
    }

  private:
    struct slot {
        std::vector<llama_token> tokens;  // what its sequence holds
        bool                     busy = false;
    };

    void loop() {
        for (;;) {
            try {
                {
                    std::unique_lock<std::mutex> lock(mtx_);
                    cv_.wait(lock, [&] { return stopping_ || !queue_.empty() || !active_.empty(); });
                    if (stopping_) {
                        break;
                    }
                    admit();
                }
                step();
            } catch (const std::exception & e) {
                fail_all(e.what());
            }
        }
        std::lock_guard<std::mutex> lock(mtx_);
        for (auto & r : active_) {
            r->end("cancelled", "the engine was closed");
        }
        for (auto & r : queue_) {
            r->end("cancelled", "the engine was closed");
        }
        active_.clear();
        queue_.clear();
    }

    // Moves queued requests into free sequences, FIFO. Called with mtx_ held.
    void admit() {
        while (!queue_.empty()) {
            auto req = queue_.front();
            if (req->cancelled_.load()) {
                queue_.pop_front();
                req->end("cancelled");
                continue;
            }
            // The free sequence whose tokens share the longest prefix with the prompt, unless the
            // lowest free one shares nearly as much: a step decodes consecutive sequences in one pass
            // (kv_unified=false), and every gap among the busy ones costs another pass over the weights.
            int32_t best = -1, lowest = -1;
            size_t  lcp = 0, lcp_lowest = 0;
            for (size_t s = 0; s < slots_.size(); ++s) {
                if (slots_[s].busy) {
                    continue;
                }
                const auto & t = slots_[s].tokens;
                size_t       n = 0;
                while (n < t.size() && n < req->prompt_.size() && t[n] == req->prompt_[n]) {
                    ++n;
                }
                if (lowest < 0) {
                    lowest     = static_cast<int32_t>(s);
                    lcp_lowest = n;
                }
                if (best < 0 || n > lcp) {
                    best = static_cast<int32_t>(s);
                    lcp  = n;
                }
            }
            if (best >= 0 && lcp < lcp_lowest + kReuseWorthAGap) {
                best = lowest;
                lcp  = lcp_lowest;
            }
            if (best < 0) {
                return;  // every sequence is busy
            }
            queue_.pop_front();
            if (lcp == req->prompt_.size()) {
                --lcp;  // the last prompt token is evaluated again, for its logits
            }
            {
                auto           u   = ctx_.acquire();
                llama_memory_t mem = llama_get_memory(u.ctx);
                if (!llama_memory_seq_rm(mem, best, static_cast<llama_pos>(lcp), -1)) {
                    llama_memory_seq_rm(mem, best, -1, -1);
                    lcp = 0;
                }
            }
            slots_[best].busy = true;
            slots_[best].tokens.resize(lcp);
            req->seq_       = best;
            req->evaluated_ = lcp;
            req->n_reused_.store(lcp);
            active_.push_back(std::move(req));
        }
    }

    // One decode: the next token of every sampling request, then prompt chunks in the room left.
    void step() {
        std::vector<std::shared_ptr<EngineRequest>> reqs;
        {
            std::lock_guard<std::mutex> lock(mtx_);
            reqs = active_;
        }
        std::vector<std::shared_ptr<EngineRequest>> finished, stepping;
        size_t                                      n_tokens = 0;
        for (auto & r : reqs) {
            r->row_      = -1;
            r->n_prompt_ = 0;
            if (r->cancelled_.load()) {
                finished.push_back(r);
                continue;
            }
            stepping.push_back(r);
            if (r->sampling_) {
                ++n_tokens;  // the next tokens of the running streams come first
            }
        }
        for (auto & r : stepping) {  // then prompt chunks, first come first served, in the room left
            if (!r->sampling_) {
                const size_t room = n_batch_ > n_tokens ? n_batch_ - n_tokens : 0;
                r->n_prompt_      = std::min(room, r->prompt_.size() - r->evaluated_);
                n_tokens += r->n_prompt_;
            }
        }
        // llama.cpp splits a batch over several sequences (kv_unified=false) into micro-batches of
        // consecutive sequence ids with as many tokens each: the batch goes in sequence order, each
        // sequence's tokens together, or one step costs several passes over the weights.
        const auto newest = stepping.empty() ? nullptr : stepping.back();
        std::sort(stepping.begin(), stepping.end(), [](const auto & x, const auto & y) { return x->seq_ < y->seq_; });
        Batch b;
        for (auto & r : stepping) {
            auto & tokens = slots_[r->seq_].tokens;
            if (r->sampling_) {
                r->row_ = static_cast<int32_t>(b.tokens.size());
                b.tokens.push_back(r->last_);
                b.pos.push_back(static_cast<llama_pos>(tokens.size()));
                b.seq_ids.push_back({ r->seq_ });
                b.logits.push_back(1);
                tokens.push_back(r->last_);
                continue;
            }
            for (size_t j = 0; j < r->n_prompt_; ++j) {
                const size_t k = r->evaluated_ + j;
                b.tokens.push_back(r->prompt_[k]);
                b.pos.push_back(static_cast<llama_pos>(k));
                b.seq_ids.push_back({ r->seq_ });
                const bool last = k + 1 == r->prompt_.size();
                b.logits.push_back(last ? 1 : 0);
                if (last) {
                    r->row_ = static_cast<int32_t>(b.tokens.size()) - 1;
                }
                tokens.push_back(r->prompt_[k]);
            }
            r->evaluated_ += r->n_prompt_;
        }
        for (auto & r : finished) {
            release(r, "cancelled");
        }
        if (b.tokens.empty()) {
            return;
        }
        std::string reason;
        const auto  rc = ctx_.decode_nogil(b, false, reason);
        if (rc != 0) {
            // the decode was rolled back: put the sequences' token lists back as they were
            for (auto & r : stepping) {
                if (r->row_ >= 0 || !r->sampling_) {
                    resync(r);
                }
            }
            if (rc == 1) {
                // no room in the KV memory: the newest request gives way
                release(newest, "length", "the context is full (no KV slot for this request)");
                return;
            }
            Context::raise_decode_error(rc, reason, false);
        }
        const llama_vocab * vocab = llama_model_get_vocab(ctx_.model());
        for (auto & r : stepping) {
            if (r->row_ < 0 || r->cancelled_.load()) {
                continue;
            }
            try {
                sample(r, vocab);
            } catch (const std::exception & e) {
                release(r, "stop", e.what());
            }
        }
    }

    // After a failed decode, a sequence's token list follows what its KV memory holds.
    void resync(const std::shared_ptr<EngineRequest> & r) {
        auto &          tokens = slots_[r->seq_].tokens;
        auto            u      = ctx_.acquire();
        const llama_pos max    = llama_memory_seq_pos_max(llama_get_memory(u.ctx), r->seq_);
        tokens.resize(static_cast<size_t>(std::max<llama_pos>(0, max + 1)));
        if (!r->sampling_) {
            r->evaluated_ = std::min(r->evaluated_, tokens.size());
        }
    }

    void sample(const std::shared_ptr<EngineRequest> & r, const llama_vocab * vocab) {
        r->sampling_          = true;
        const llama_token tok = r->sampler_->sample(ctx_, r->row_);
        token_logprob     lp;
        if (r->opt_.logprobs >= 0) {
            auto u = ctx_.acquire();
            lp     = logprob_of(u.ctx, ctx_.check_output(r->row_, "logprobs"), vocab, tok, r->opt_.logprobs);
        }
        r->sampler_->accept(tok, true);
        if (!r->opt_.ignore_eos && llama_vocab_is_eog(vocab, tok)) {
            release(r, "stop");
            return;
        }
        std::string piece = r->text_.append(vocab, tok, r->sampler_->preserves(tok));
        {
            std::lock_guard<std::mutex> lock(r->mtx_);
            r->completion_.push_back(tok);
            if (r->opt_.logprobs >= 0) {
                lp.piece = std::move(piece);
                r->logprobs_.push_back(std::move(lp));
            }
        }
        r->last_            = tok;
        const size_t n_done = r->completion_.size();
        if (r->text_.check_stop()) {
            release(r, "stop");
        } else if (r->opt_.max_tokens >= 0 && n_done >= static_cast<size_t>(r->opt_.max_tokens)) {
            release(r, "length");
        } else if (slots_[r->seq_].tokens.size() + 1 >= n_ctx_seq_) {
            release(r, "length");  // the next token would not fit its sequence
        } else {
            r->push(r->text_.release(false));
        }
    }

    // The request is over: its sequence keeps its tokens for the next prompt that shares them.
    void release(const std::shared_ptr<EngineRequest> & r, const std::string & reason, const std::string & error = {}) {
        {
            std::lock_guard<std::mutex> lock(mtx_);
            auto                        it = std::find(active_.begin(), active_.end(), r);
            if (it == active_.end()) {
                return;
            }
            active_.erase(it);
        }
        slots_[r->seq_].busy = false;
        r->row_              = -1;
        r->end(r->cancelled_.load() ? "cancelled" : reason, error);
    }

    // Something failed beyond one request (the context was closed, a decode error): every request
    // ends with the error, and the sequences are forgotten.
    void fail_all(const std::string & why) {
        std::vector<std::shared_ptr<EngineRequest>> reqs;
        {
            std::lock_guard<std::mutex> lock(mtx_);
            reqs = active_;
            for (auto & r : queue_) {
                r->end("stop", why);
            }
            queue_.clear();
        }
        for (auto & r : reqs) {
            release(r, "stop", why);
        }
        for (auto & s : slots_) {
            s.tokens.clear();
        }
        try {
            auto u = ctx_.acquire();
            llama_memory_clear(llama_get_memory(u.ctx), true);
        } catch (const std::exception &) {
            // a closed context: nothing to clear
        }
    }

    Context &                                   ctx_;
    size_t                                      n_ctx_seq_ = 0;
    size_t                                      n_batch_   = 1;
    std::vector<slot>                           slots_;
    std::mutex                                  mtx_;
    std::condition_variable                     cv_;
    std::deque<std::shared_ptr<EngineRequest>>  queue_;
    std::vector<std::shared_ptr<EngineRequest>> active_;
    bool                                        stopping_ = false;
    std::thread                                 worker_;
};

void register_engine(py::module_ & m) {
    py::class_<Engine, std::shared_ptr<Engine>> eng(m, "Engine", R"doc(
Continuous batching over one Context: Engine(ctx, n_parallel).

Up to n_parallel requests decode together, a sequence each (the Context needs n_seq_max >=
n_parallel), one llama_decode per step, in a worker thread. Requests beyond n_parallel wait, FIFO,
and join between steps; prompts are evaluated in chunks that leave room for the running requests'
next tokens. A request takes the lowest free sequence, unless another free one holds at least 64
more of its prompt's tokens, and evaluates only what the sequence does not hold.
)doc");
    eng.def(py::init([](Context & ctx, int32_t n_parallel) {
                py::gil_scoped_release nogil;
                return std::make_shared<Engine>(ctx, n_parallel);
            }),
            py::arg("ctx"), py::arg("n_parallel"), py::keep_alive<1, 2>());
    eng.def(
        "submit",
        [](Engine & e, std::vector<llama_token> prompt, std::shared_ptr<Sampler> sampler, int32_t max_tokens,
           std::vector<std::string> stop, int32_t logprobs, bool ignore_eos, std::shared_ptr<Notifier> notifier) {
            generation_options opt;
            opt.max_tokens = max_tokens;
            opt.stop       = std::move(stop);
            opt.logprobs   = logprobs;
            opt.ignore_eos = ignore_eos;
            py::gil_scoped_release nogil;
            return e.submit(std::move(sampler), std::move(prompt), std::move(opt), std::move(notifier));
        },
        py::arg("prompt"), py::arg("sampler"), py::kw_only(), py::arg("max_tokens") = -1,
        py::arg("stop") = std::vector<std::string>(), py::arg("logprobs") = -1, py::arg("ignore_eos") = false,
        py::arg("notifier") = py::none(),
        "Queue a generation; returns an EngineRequest, which behaves as a Generation. With a Notifier, its\n"
        "descriptor becomes readable whenever the request has new text or has ended (see next_nowait).");
    eng.def(
        "close",
        [](Engine & e) {
            py::gil_scoped_release nogil;
            e.stop();
        },
        "Stop the worker: requests still running end with an error.");
    eng.def_property_readonly("n_parallel", &Engine::n_parallel);
    eng.def_property_readonly("n_ctx_seq", &Engine::n_ctx_seq, "The tokens one sequence holds.");
    eng.def_property_readonly("n_active", &Engine::n_active, "Requests running or queued.");

    py::class_<EngineRequest, std::shared_ptr<EngineRequest>> r(m, "EngineRequest",
                                                                "A request to an Engine; iterate it for text pieces.");
    bind_generation(r);
    r.def(
        "next_nowait",
        [](EngineRequest & self) -> py::object {
            std::string piece;
            if (!self.next_nowait(piece)) {
                return py::none();
            }
            return utf8_lenient(piece);
        },
        "The next piece without waiting: None while none is ready, '' at the end.");
    r.def_property_readonly("ready", &EngineRequest::ready, "A piece is waiting, or the request has ended.");

    py::class_<Notifier, std::shared_ptr<Notifier>> n(m, "Notifier", R"doc(
A wake-up for an event loop: Engine.submit(..., notifier=n) makes n.fileno() readable whenever
that request has new text or has ended. Watch it with loop.add_reader and call drain() when woken.
Linux and macOS (an eventfd or a pipe); the descriptor closes when the Notifier and every request
submitted with it are gone.
)doc");
    n.def(py::init<>());
    n.def("fileno", &Notifier::fileno);
    n.def("drain", &Notifier::drain, "Empty the descriptor.");
}

}  // namespace pyllama
