// The generation core (see scheduler.h): one scheduler for one sequence or many. Each step admits
// queued requests into free sequences (the lowest free one, or one that holds much more of the
// prompt), then decodes one batch in sequence order (llama.cpp's micro-batches take consecutive
// sequences): the next token of every running stream first, then prompt chunks of every waiting
// request, first come first served, up to n_batch. Each request samples with its own sampler,
// grammar and stop rules and receives finished pieces of text.

#include "scheduler.h"

#include "model.h"
#include "pyllama.h"

#include <algorithm>
#include <cmath>
#include <new>

#ifndef _WIN32
#include <fcntl.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/eventfd.h>
#endif
#endif

namespace pyllama {

// --- text ------------------------------------------------------------------------------------------

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

// Each generated token is checked against every stop string, over the last max_stop_ bytes.
constexpr size_t kMaxStops     = 128;
constexpr size_t kMaxStopBytes = 4096;

generated_text::generated_text(const std::vector<std::string> & stop) : stop_(stop) {
    if (stop_.size() > kMaxStops) {
        throw invalid_request_error(
            "stop: " + std::to_string(stop_.size()) + " stop strings; the limit is " + std::to_string(kMaxStops),
            "stop");
    }
    for (const auto & s : stop_) {
        if (s.empty()) {
            throw invalid_request_error("stop strings must not be empty", "stop");
        }
        if (s.size() > kMaxStopBytes) {
            throw invalid_request_error("stop: a stop string has " + std::to_string(s.size()) +
                                            " bytes; the limit is " + std::to_string(kMaxStopBytes),
                                        "stop");
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
        const size_t at = text_.find(s, from);
        if (at < first || (at == first && at != std::string::npos && s.size() > matched_.size())) {
            first    = at;
            matched_ = s;
        }
    }
    scanned_ = text_.size();
    if (first != std::string::npos) {
        text_.resize(first);
        return true;
    }
    matched_.clear();
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

// --- Notifier ----------------------------------------------------------------------------------------

Notifier::Notifier() {
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

Notifier::~Notifier() {
#ifndef _WIN32
    if (wfd_ != rfd_ && wfd_ >= 0) {
        ::close(wfd_);
    }
    if (rfd_ >= 0) {
        ::close(rfd_);
    }
#endif
}

void Notifier::notify() const {
#if defined(__linux__)
    const uint64_t        one = 1;
    [[maybe_unused]] auto n   = ::write(wfd_, &one, sizeof(one));
#elif !defined(_WIN32)
    const char            one = 1;
    [[maybe_unused]] auto n   = ::write(wfd_, &one, 1);
#endif
}

void Notifier::drain() const {
#ifndef _WIN32
    char buf[256];
    while (::read(rfd_, buf, sizeof(buf)) > 0) {
    }
#endif
}

// --- Request -----------------------------------------------------------------------------------------

llama_token media_token(const std::string & id, size_t i) {
    uint64_t h = 0xcbf29ce484222325ULL;  // FNV-1a of the id, then a different value per position
    for (unsigned char c : id) {
        h = (h ^ c) * 0x100000001b3ULL;
    }
    h += static_cast<uint64_t>(i) * 0x9E3779B97F4A7C15ULL;
    h ^= h >> 31;
    return -2 - static_cast<llama_token>(h >> 34);  // -2 .. -(2 + 2^30 - 1)
}

void prompt_from_chunks(const std::vector<Chunk> &         chunks,
                        const std::shared_ptr<Projector> & projector,
                        std::vector<llama_token> &         prompt,
                        std::vector<media_span> &          media) {
    for (const auto & c : chunks) {
        if (c.type() == MTMD_INPUT_CHUNK_TYPE_TEXT) {
            const auto t = c.tokens();
            prompt.insert(prompt.end(), t.begin(), t.end());
            continue;
        }
        if (!projector) {
            throw invalid_request_error("the prompt holds " + c.type_name() + " but no projector was given", "prompt");
        }
        media_span m;
        m.start       = prompt.size();
        m.chunk       = c;
        m.projector   = projector;
        const auto id = c.id();
        for (size_t i = 0; i < c.n_tokens(); ++i) {
            prompt.push_back(media_token(id, i));
        }
        media.push_back(std::move(m));
    }
}

Request::Request(std::shared_ptr<Sampler>        sampler,
                 std::vector<llama_token>        prompt,
                 generation_options              opt,
                 std::shared_ptr<const Notifier> notifier,
                 std::weak_ptr<Scheduler>        scheduler,
                 bool                            drives) :
    sampler_(std::move(sampler)),
    prompt_(std::move(prompt)),
    opt_(std::move(opt)),
    text_(opt_.stop),
    notifier_(std::move(notifier)),
    scheduler_(std::move(scheduler)),
    drives_(drives) {}

bool Request::take(std::string & out) {
    if (!pieces_.empty()) {
        out = std::move(pieces_.front());
        pieces_.pop_front();
        return true;
    }
    if (!done_) {
        return false;
    }
    if (error_) {
        std::exception_ptr e = error_;
        error_               = nullptr;
        std::rethrow_exception(e);
    }
    out.clear();
    return true;
}

std::string Request::next() {
    if (drives_) {
        if (auto s = scheduler_.lock()) {
            s->drive(*this);
        }
    }
    std::unique_lock<std::mutex> lock(mtx_);
    cv_.wait(lock, [&] { return !pieces_.empty() || done_; });
    std::string out;
    take(out);
    return out;
}

bool Request::next_nowait(std::string & out) {
    std::lock_guard<std::mutex> lock(mtx_);
    return take(out);
}

bool Request::ready() const {
    std::lock_guard<std::mutex> lock(mtx_);
    return !pieces_.empty() || done_;
}

std::string Request::run() {
    std::string out;
    for (std::string piece = next(); !piece.empty(); piece = next()) {
        out += piece;
    }
    return out;
}

void Request::cancel() {
    cancelled_.store(true);
    if (auto s = scheduler_.lock()) {
        s->interrupt_if_alone(this);
    }
}

std::string Request::finish_reason() const {
    std::lock_guard<std::mutex> lock(mtx_);
    return done_ ? finish_reason_ : std::string();
}

std::string Request::stop_word() const {
    std::lock_guard<std::mutex> lock(mtx_);
    return done_ ? stop_word_ : std::string();
}

std::vector<llama_token> Request::completion() const {
    std::lock_guard<std::mutex> lock(mtx_);
    return completion_;
}

std::vector<token_logprob> Request::logprobs() const {
    std::lock_guard<std::mutex> lock(mtx_);
    return logprobs_;
}

void Request::push(std::string piece) {
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

void Request::end(const std::string & reason, std::exception_ptr error) {
    std::string rest = text_.release(true);
    {
        std::lock_guard<std::mutex> lock(mtx_);
        if (done_) {
            return;
        }
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

// --- Scheduler ---------------------------------------------------------------------------------------

Scheduler::Scheduler(Context & ctx, int32_t n_parallel, bool threaded) : ctx_(ctx), threaded_(threaded) {
    auto u = ctx_.acquire();
    if (n_parallel < 1 || static_cast<uint32_t>(n_parallel) > llama_n_seq_max(u.ctx)) {
        throw std::invalid_argument("n_parallel must be between 1 and the context's n_seq_max (" +
                                    std::to_string(llama_n_seq_max(u.ctx)) + ")");
    }
    // an encoder alone (a BERT embedding model or reranker) has no KV memory and generates nothing: the
    // engine exists (a Llama over it embeds and reranks) and refuses requests
    generates_ = llama_get_memory(u.ctx) != nullptr && llama_model_has_decoder(ctx_.model());
    n_ctx_seq_ = llama_n_ctx_seq(u.ctx);
    n_batch_   = std::max<uint32_t>(1, llama_n_batch(u.ctx));
    n_swa_     = std::max<int32_t>(0, llama_model_n_swa(ctx_.model()));
    // a recurrent state cannot give back the cells of a rejected draft (llama-server checkpoints it)
    can_draft_ = generates_ && !llama_model_is_recurrent(ctx_.model()) && !llama_model_is_hybrid(ctx_.model());
    slots_.resize(n_parallel);
    if (threaded_) {
        worker_ = std::thread([this] { loop(); });
    }
}

Scheduler::~Scheduler() {
    stop();
}

std::shared_ptr<Request> Scheduler::submit(std::shared_ptr<Sampler>        sampler,
                                           std::vector<llama_token>        prompt,
                                           generation_options              opt,
                                           std::shared_ptr<const Notifier> notifier,
                                           std::vector<media_span>         media) {
    if (!generates_) {
        throw invalid_request_error(
            "this model generates no text (an encoder without a decoder, such as an embedding model or a "
            "reranker): use embed() or rerank()",
            "model");
    }
    if (prompt.empty()) {
        throw invalid_request_error("the prompt is empty", "prompt");
    }
    if (prompt.size() >= n_ctx_seq_) {
        throw context_length_error("the prompt has " + std::to_string(prompt.size()) + " tokens and a sequence holds " +
                                   std::to_string(n_ctx_seq_));
    }
    auto req    = std::make_shared<Request>(std::move(sampler), std::move(prompt), std::move(opt), std::move(notifier),
                                            weak_from_this(), !threaded_);
    req->media_ = std::move(media);
    req->lora_.set  = req->opt_.lora;
    req->lora_.from = lora_alora_start(req->lora_.set, req->prompt_);
    if (req->opt_.max_tokens == 0) {
        req->end("length");
        return req;
    }
    std::lock_guard<std::mutex> lock(mtx_);
    if (stopping_) {
        throw cancelled_error("the engine is closed");
    }
    queue_.push_back(req);
    cv_.notify_all();
    return req;
}

void Scheduler::stop() {
    {
        std::lock_guard<std::mutex> lock(mtx_);
        stopping_ = true;
        cv_.notify_all();
    }
    if (worker_.joinable()) {
        worker_.join();
    }
    std::lock_guard<std::mutex>           step_lock(step_mtx_);  // an inline step in progress ends first
    std::vector<std::shared_ptr<Request>> reqs;
    {
        std::lock_guard<std::mutex> lock(mtx_);
        reqs.assign(active_.begin(), active_.end());
        reqs.insert(reqs.end(), queue_.begin(), queue_.end());
        active_.clear();
        queue_.clear();
    }
    const auto closed = std::make_exception_ptr(cancelled_error("the engine was closed"));
    for (auto & r : reqs) {
        r->end("cancelled", closed);
    }
    for (auto & s : slots_) {
        s.busy = false;
    }
}

size_t Scheduler::n_active() {
    std::lock_guard<std::mutex> lock(mtx_);
    return active_.size() + queue_.size();
}

void Scheduler::loop() {
    for (;;) {
        {
            std::unique_lock<std::mutex> lock(mtx_);
            cv_.wait(lock, [&] { return stopping_ || !queue_.empty() || !active_.empty(); });
            if (stopping_) {
                return;
            }
        }
        {
            // a sequence call waiting for the step lock (a state saved, say) gets it before the next
            // step: the mutex alone is not fair, and a running stream would hold it off to its end
            std::unique_lock<std::mutex> w(waiters_mtx_);
            waiters_cv_.wait(w, [&] { return step_waiters_ == 0; });
        }
        std::lock_guard<std::mutex> step_lock(step_mtx_);
        try {
            if (has_work()) {
                step();
            }
        } catch (const std::exception &) {
            fail_all(std::current_exception());
        }
    }
}

void Scheduler::drive(Request & r) {
    std::lock_guard<std::mutex> step_lock(step_mtx_);
    while (!r.ready()) {
        if (!has_work()) {
            return;  // stopped: stop() ends the request
        }
        try {
            step();
        } catch (const std::exception &) {
            fail_all(std::current_exception());
        }
    }
}

bool Scheduler::has_work() {
    std::lock_guard<std::mutex> lock(mtx_);
    if (stopping_) {
        return false;
    }
    admit();
    return !active_.empty();
}

void Scheduler::interrupt_if_alone(const Request * r) {
    if (alone_.load() == r) {
        ctx_.cancel();
    }
}

// Positions where media take fewer positions than cells (M-RoPE: an image of h x w tokens advances
// max(h, w)): the position of the token at index i, the shifts of the media chunks before it added.
static llama_pos pos_at(const std::vector<std::pair<size_t, int32_t>> & shifts, size_t i) {
    int64_t p = static_cast<int64_t>(i);
    for (const auto & [end, delta] : shifts) {
        if (end <= i) {
            p += delta;
        }
    }
    return static_cast<llama_pos>(p);
}

static void cut_shifts(std::vector<std::pair<size_t, int32_t>> & shifts, size_t n) {
    shifts.erase(std::remove_if(shifts.begin(), shifts.end(), [n](const auto & s) { return s.first > n; }),
                 shifts.end());
}

// How many tokens hold the positions below p (the inverse of pos_at, at chunk ends).
static size_t index_at_pos(const std::vector<std::pair<size_t, int32_t>> & shifts, llama_pos p) {
    int64_t sum = 0;
    for (const auto & [end, delta] : shifts) {
        if (static_cast<int64_t>(end) + sum + delta > p) {
            break;
        }
        sum += delta;
    }
    return static_cast<size_t>(std::max<int64_t>(0, p - sum));
}

static size_t common_prefix(const std::vector<llama_token> & a, const std::vector<llama_token> & b) {
    size_t n = 0;
    while (n < a.size() && n < b.size() && a[n] == b[n]) {
        ++n;
    }
    return n;
}

// The longest common prefix whose cells were (or will be) computed alike: the same tokens under the
// same adapters. Cells computed with one LoRA set are no use to a request that runs with another.
static size_t shared_prefix(const std::vector<llama_token> & a,
                            const lora_key &                 ka,
                            const std::vector<llama_token> & b,
                            const lora_key &                 kb) {
    const size_t n  = common_prefix(a, b);
    const size_t fa = ka.start(), fb = kb.start();
    if (fa == fb && (fa == SIZE_MAX || lora_equal(ka.set, kb.set))) {
        return n;
    }
    return std::min(n, std::min(fa, fb));  // before both starts, both ran without adapters
}

static const lora_set kNoLora;

const lora_set & Scheduler::next_lora(const Request & r, size_t next) {
    return next < r.lora_.start() ? kNoLora : r.lora_.set;
}

void Scheduler::admit() {
    for (auto it = queue_.begin(); it != queue_.end();) {
        auto req = *it;
        if (req->cancelled_.load()) {
            it = queue_.erase(it);
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
            const size_t n = shared_prefix(slots_[s].tokens, slots_[s].lora, req->prompt_, req->lora_);
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
        // A longer prefix held by another sequence, busy or free, is copied into the chosen one rather
        // than evaluated again (the lowest free sequence takes it: no gap). A copy between per-sequence
        // streams takes the whole stream (llama.cpp copies the buffers at the next decode), and the
        // tail past the prefix is then cut.
        int32_t src     = -1;
        size_t  lcp_src = 0;
        for (size_t s = 0; s < slots_.size(); ++s) {
            const size_t n = static_cast<int32_t>(s) == best
                                 ? 0
                                 : shared_prefix(slots_[s].tokens, slots_[s].lora, req->prompt_, req->lora_);
            if (n > lcp_src) {
                src     = static_cast<int32_t>(s);
                lcp_src = n;
            }
        }
        // The host cache may hold still more of it: a prefix some sequence gave up earlier.
        auto   hit      = host_.end();
        size_t lcp_host = 0;
        for (auto h = host_.begin(); h != host_.end(); ++h) {
            const size_t n = shared_prefix(h->tokens, h->lora, req->prompt_, req->lora_);
            if (n > lcp_host) {
                hit      = h;
                lcp_host = n;
            }
        }
        // A request that is evaluating a longer common prefix right now (requests that came together
        // with one system prompt) will hold it in a step or a few: this one waits for it, then forks,
        // so that the prefix is evaluated once. Requests behind it that do not wait go first.
        const size_t have = std::max({ lcp, lcp_src, lcp_host });
        bool         wait = false;
        for (const auto & r : active_) {
            if (!r->sampling_ && r->evaluated_ < r->prompt_.size()) {
                const size_t shared = shared_prefix(r->prompt_, r->lora_, req->prompt_, req->lora_);
                if (shared >= have + kReuseWorthAGap && r->evaluated_ < shared) {
                    wait = true;
                    break;
                }
            }
        }
        if (wait) {
            ++it;
            continue;
        }
        it          = queue_.erase(it);
        bool forked = false, loaded = false;
        if (src >= 0 && lcp_src >= lcp + kReuseWorthAGap) {
            forked = true;
        }
        if (hit != host_.end() && lcp_host >= (forked ? lcp_src : lcp) + kReuseWorthAGap) {
            forked = false;
            loaded = true;
        }
        const int32_t dst  = forked || loaded ? lowest : best;
        const size_t  kept = forked || loaded ? 0 : lcp;
        // what the destination gives up goes to the host cache first (never dropping the state to load)
        if (host_budget_ > 0 && !slots_[dst].copying && slots_[dst].tokens.size() >= kept + kReuseWorthAGap) {
            host_save(dst, hit);
        }
        best = dst;
        lcp  = forked ? lcp_src : loaded ? lcp_host : lcp;
        if (lcp == req->prompt_.size()) {
            --lcp;  // the last prompt token is evaluated again, for its logits
        }
        for (const auto & m : req->media_) {
            if (m.start < lcp && lcp < m.end()) {
                lcp = m.start;  // a media chunk is decoded whole (its embeddings come from one encode)
            }
        }
        {
            auto           u   = ctx_.acquire();
            llama_memory_t mem = llama_get_memory(u.ctx);
            if (forked) {
                llama_memory_seq_rm(mem, best, -1, -1);
                llama_memory_seq_cp(mem, src, best, -1, -1);
                slots_[best].tokens.assign(slots_[src].tokens.begin(), slots_[src].tokens.begin() + lcp);
                slots_[best].shifts = slots_[src].shifts;
                cut_shifts(slots_[best].shifts, lcp);
                slots_[best].copying = true;
            } else if (loaded) {
                // llama.cpp clears the sequence first; 0 when the state does not fit (no room)
                if (llama_state_seq_set_data(u.ctx, hit->state.data(), hit->state.size(), best) == hit->state.size() &&
                    llama_memory_seq_pos_max(mem, best) + 1 == pos_at(hit->shifts, hit->tokens.size())) {
                    slots_[best].tokens = hit->tokens;
                    slots_[best].shifts = hit->shifts;
                    host_.splice(host_.end(), host_, hit);  // the most recently used now
                    ++host_loaded_;
                } else {
                    llama_memory_seq_rm(mem, best, -1, -1);
                    slots_[best].tokens.clear();
                    slots_[best].shifts.clear();
                    host_bytes_ -= hit->state.size();
                    host_.erase(hit);
                    lcp = 0;
                }
            }
            const llama_pos p_lcp = pos_at(slots_[best].shifts, lcp);
            if (!llama_memory_seq_rm(mem, best, p_lcp, -1)) {
                // a recurrent model cannot cut its state at a position: start over
                llama_memory_seq_rm(mem, best, -1, -1);
                lcp = 0;
            } else if (lcp > 0 && n_swa_ > 0) {
                // Sliding-window layers keep only the last n_swa positions unless the context has
                // swa_full (llama.cpp's default): the next token must still see every position its
                // window reaches back to, or its attention differs from a fresh evaluation's.
                const llama_pos pos_min = llama_memory_seq_pos_min(mem, best);
                // (position p sees p - n_swa + 1 .. p; llama.cpp's chunked and symmetric windows see less)
                const llama_pos needed  = std::max<llama_pos>(0, p_lcp - n_swa_ + 1);
                if (pos_min < 0 || pos_min > needed) {
                    llama_memory_seq_rm(mem, best, -1, -1);
                    lcp = 0;
                }
            }
        }
        slots_[best].busy = true;
        slots_[best].tokens.resize(lcp);
        slots_[best].lora = req->lora_;  // the kept prefix was computed as the request computes it
        cut_shifts(slots_[best].shifts, lcp);
        req->seq_       = best;
        req->evaluated_ = lcp;
        req->n_reused_.store(lcp);
        active_.push_back(std::move(req));
    }
}

void Scheduler::step() {
    std::vector<std::shared_ptr<Request>> reqs;
    {
        std::lock_guard<std::mutex> lock(mtx_);
        reqs = active_;
    }
    std::vector<std::shared_ptr<Request>> finished, stepping;
    size_t                                n_tokens = 0;
    for (auto & r : reqs) {
        r->row_      = -1;
        r->n_prompt_ = 0;
        if (r->cancelled_.load()) {
            finished.push_back(r);
            continue;
        }
        stepping.push_back(r);
    }
    const auto fifo = stepping;
    // llama.cpp runs a whole batch with one set of LoRA adapters: the requests whose next tokens run
    // with another set wait for a step of theirs. The set of the request that waited longest (the
    // first to come among equals) has the batch, so that sets take turns.
    lora_set   batch_lora;
    if (!stepping.empty()) {
        const Request * pick = stepping.front().get();
        for (const auto & r : stepping) {
            if (r->lora_waited_ > pick->lora_waited_) {
                pick = r.get();
            }
        }
        batch_lora = next_lora(*pick, pick->sampling_ ? SIZE_MAX : pick->evaluated_);
        std::vector<std::shared_ptr<Request>> in;
        for (auto & r : stepping) {
            if (lora_equal(next_lora(*r, r->sampling_ ? SIZE_MAX : r->evaluated_), batch_lora)) {
                r->lora_waited_ = 0;
                in.push_back(r);
            } else {
                ++r->lora_waited_;
            }
        }
        stepping.swap(in);
    }
    for (auto & r : stepping) {
        if (r->sampling_) {
            ++n_tokens;  // the next tokens of the running streams come first
        }
    }
    // then the drafts of the streams that speculate, then prompt chunks, first come first served, in
    // the room left
    n_tokens += make_drafts(stepping, n_batch_ > n_tokens ? n_batch_ - n_tokens : 0);
    for (auto & r : stepping) {
        if (!r->sampling_) {
            const size_t room = n_batch_ > n_tokens ? n_batch_ - n_tokens : 0;
            size_t       upto = r->prompt_.size();  // text up to the next media chunk (step_media's)
            for (const auto & m : r->media_) {
                if (m.end() > r->evaluated_) {
                    upto = m.start;
                    break;
                }
            }
            if (r->evaluated_ < r->lora_.start()) {
                upto = std::min(upto, r->lora_.start());  // an aLoRA's invocation starts a batch of its own
            }
            r->n_prompt_ = std::min(room, upto - std::min(upto, r->evaluated_));
            n_tokens += r->n_prompt_;
        }
    }
    for (auto & r : finished) {
        release(r, "cancelled");
    }
    // llama.cpp splits a batch over several sequences (kv_unified=false) into micro-batches of
    // consecutive sequence ids with as many tokens each: the batch goes in sequence order, each
    // sequence's tokens together, or one step costs several passes over the weights.
    const auto newest = stepping.empty() ? nullptr : stepping.back();
    std::sort(stepping.begin(), stepping.end(), [](const auto & x, const auto & y) { return x->seq_ < y->seq_; });
    Batch           b;
    const Request * sole = nullptr;
    size_t          n_in = 0;
    for (auto & r : stepping) {
        auto & tokens = slots_[r->seq_].tokens;
        if (r->sampling_) {
            r->row_ = static_cast<int32_t>(b.tokens.size());
            b.tokens.push_back(r->last_);
            b.pos.push_back(pos_at(slots_[r->seq_].shifts, tokens.size()));
            b.seq_ids.push_back({ r->seq_ });
            b.logits.push_back(1);
            tokens.push_back(r->last_);
            for (llama_token t : r->draft_) {  // each with its row: verify() samples them in turn
                b.tokens.push_back(t);
                b.pos.push_back(pos_at(slots_[r->seq_].shifts, tokens.size()));
                b.seq_ids.push_back({ r->seq_ });
                b.logits.push_back(1);
                tokens.push_back(t);
            }
            sole = r.get();
            ++n_in;
            continue;
        }
        if (r->n_prompt_ > 0) {
            sole = r.get();
            ++n_in;
        }
        for (size_t j = 0; j < r->n_prompt_; ++j) {
            const size_t k = r->evaluated_ + j;
            b.tokens.push_back(r->prompt_[k]);
            b.pos.push_back(pos_at(slots_[r->seq_].shifts, k));
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
    if (b.tokens.empty()) {
        step_media(fifo);
        return;
    }
    // a cancel() of the only request in the batch stops the decode itself (a long prompt)
    alone_.store(n_in == 1 ? sole : nullptr);
    ctx_.apply_lora(batch_lora);
    std::string reason;
    const auto  rc = ctx_.decode_nogil(b, false, reason);
    alone_.store(nullptr);
    if (rc >= 0) {  // the decode began with llama.cpp's pending copies: forked sequences hold their data
        for (auto & s : slots_) {
            s.copying = false;
        }
    }
    if (rc != 0) {
        // the decode was rolled back: put the sequences' token lists back as they were
        bool any_cancelled = false;
        for (auto & r : stepping) {
            r->draft_.clear();
            if (r->row_ >= 0 || !r->sampling_) {
                resync(r);
            }
            any_cancelled = any_cancelled || r->cancelled_.load();
        }
        if (rc == 1) {
            // no room in the KV memory: the newest request gives way
            release(newest, "length",
                    std::make_exception_ptr(llama_error("the context is full (no KV slot for this request)")));
            return;
        }
        if (rc == 2 && any_cancelled) {
            for (auto & r : stepping) {
                if (r->cancelled_.load()) {
                    release(r, "cancelled");
                }
            }
            return;
        }
        Context::raise_decode_error(rc, reason, false);
    }
    const llama_vocab * vocab = llama_model_get_vocab(ctx_.model());
    for (auto & r : stepping) {
        if (r->row_ < 0 || r->cancelled_.load()) {
            continue;
        }
        verify(r, vocab);
    }
    step_media(fifo);
}

size_t Scheduler::make_drafts(const std::vector<std::shared_ptr<Request>> & stepping, size_t room) {
    std::vector<Speculator::job> jobs;
    std::vector<Request *>       who;
    size_t                       used = 0;
    for (const auto & r : stepping) {
        r->draft_.clear();
        r->draft_spec_ = false;
        if (!r->sampling_ || !can_draft_ || used >= room) {
            continue;
        }
        const auto & slot = slots_[r->seq_];
        // k drafts give up to k + 1 tokens; the sequence holds the last token and the drafts
        int64_t      n    = static_cast<int64_t>(room - used);
        if (r->opt_.max_tokens >= 0) {
            n = std::min<int64_t>(
                n, static_cast<int64_t>(r->opt_.max_tokens) - static_cast<int64_t>(r->completion_.size()) - 1);
        }
        n = std::min<int64_t>(n, static_cast<int64_t>(n_ctx_seq_) - static_cast<int64_t>(slot.tokens.size()) - 2);
        if (n <= 0) {
            continue;
        }
        if (!r->opt_.prediction.empty()) {
            const int32_t most = spec_ ? spec_->n_max() : kPredictionDraft;
            r->draft_          = prediction_draft(r->opt_.prediction, r->pred_cursor_, r->completion_,
                                                  static_cast<int32_t>(std::min<int64_t>(n, most)));
            if (!r->draft_.empty()) {
                used += r->draft_.size();
                continue;
            }
        }
        if (spec_ && r->opt_.speculative) {
            Speculator::job j;
            j.seq         = r->seq_;
            j.history     = &slot.tokens;
            j.last        = r->last_;
            j.n_max       = static_cast<int32_t>(std::min<int64_t>(n, spec_->n_max()));
            j.begin       = r->spec_seen_ != spec_.get();
            j.text        = std::none_of(slot.tokens.begin(), slot.tokens.end(), is_media_token);
            j.out         = &r->draft_;
            r->spec_seen_ = spec_.get();
            used += static_cast<size_t>(j.n_max);  // reserved: the drafts come back at most this long
            jobs.push_back(j);
            who.push_back(r.get());
        }
    }
    if (!jobs.empty()) {
        try {
            spec_->draft(jobs);
        } catch (const std::exception &) {
            // a draft model that failed drafts nothing this step; the generation goes on without
            for (auto & j : jobs) {
                j.out->clear();
            }
        }
        for (auto * r : who) {
            r->draft_spec_ = true;
        }
    }
    size_t n_drafts = 0;
    for (const auto & r : stepping) {
        n_drafts += r->draft_.size();
    }
    return n_drafts;
}

void Scheduler::verify(const std::shared_ptr<Request> & r, const llama_vocab * vocab) {
    auto &                         slot  = slots_[r->seq_];
    const std::vector<llama_token> draft = std::move(r->draft_);
    r->draft_.clear();
    slot.tokens.resize(slot.tokens.size() - draft.size());  // the drafts come back as they are accepted
    size_t             n_ok = 0;
    std::exception_ptr error;
    try {
        sample(r, vocab);
        while (n_ok < draft.size() && r->row_ >= 0 && r->last_ == draft[n_ok]) {
            slot.tokens.push_back(draft[n_ok]);  // its cells hold what the next row was computed from
            ++n_ok;
            ++r->row_;
            sample(r, vocab);
        }
    } catch (const std::exception &) {
        error = std::current_exception();
    }
    if (!draft.empty()) {
        {
            auto u = ctx_.acquire();
            llama_memory_seq_rm(llama_get_memory(u.ctx), r->seq_, pos_at(slot.shifts, slot.tokens.size()), -1);
        }
        r->n_drafted_.fetch_add(draft.size());
        r->n_accepted_.fetch_add(n_ok);
        if (r->draft_spec_ && spec_) {
            spec_->accept(r->seq_, static_cast<uint16_t>(n_ok));
        } else {
            r->pred_cursor_ += n_ok;
        }
    }
    if (error) {
        release(r, "stop", error);
    }
}

void Scheduler::set_speculator(std::shared_ptr<Speculator> spec) {
    if (spec && !can_draft_) {
        throw invalid_request_error(
            "speculative decoding needs a model whose memory can drop its last cells (not a recurrent or hybrid "
            "model)",
            "speculative");
    }
    auto step_lock = lock_step();
    spec_          = std::move(spec);
}

std::shared_ptr<Speculator> Scheduler::speculator() {
    auto step_lock = lock_step();
    return spec_;
}

void Scheduler::step_media(const std::vector<std::shared_ptr<Request>> & reqs) {
    // The first request (in arrival order) whose prompt has come to a media chunk: the chunk is
    // encoded and its embeddings decoded now, one chunk per step, so that the running streams wait
    // for one encode at most between their tokens.
    for (const auto & r : reqs) {
        if (r->sampling_ || r->cancelled_.load()) {
            continue;
        }
        const media_span * m = nullptr;
        for (const auto & span : r->media_) {
            if (span.start == r->evaluated_) {
                m = &span;
                break;
            }
        }
        if (m == nullptr) {
            continue;
        }
        {
            std::lock_guard<std::mutex> lock(mtx_);
            if (std::find(active_.begin(), active_.end(), r) == active_.end()) {
                continue;  // released in this step
            }
        }
        const bool      last  = m->end() == r->prompt_.size();
        auto &          slot  = slots_[r->seq_];
        const llama_pos first = pos_at(slot.shifts, m->start);
        try {
            ctx_.apply_lora(next_lora(*r, m->start));
            const auto embd = m->projector->encode(m->chunk);
            r->row_ =
                m->projector->decode_media(ctx_, m->chunk, embd, first, r->seq_, static_cast<int32_t>(n_batch_), last);
        } catch (const std::exception &) {
            // what was decoded of it goes, and the request ends with the error
            try {
                auto u = ctx_.acquire();
                llama_memory_seq_rm(llama_get_memory(u.ctx), r->seq_, first, -1);
            } catch (const std::exception &) {
            }
            slot.tokens.resize(std::min(slot.tokens.size(), m->start));
            cut_shifts(slot.shifts, slot.tokens.size());
            r->evaluated_ = m->start;
            release(r, "stop", std::current_exception());
            return;
        }
        for (size_t i = m->start; i < m->end(); ++i) {
            slot.tokens.push_back(r->prompt_[i]);
        }
        const auto delta = static_cast<int32_t>(m->chunk.n_pos()) - static_cast<int32_t>(m->chunk.n_tokens());
        if (delta != 0) {
            slot.shifts.emplace_back(m->end(), delta);  // M-RoPE: the text after it takes fewer positions
        }
        r->evaluated_ = m->end();
        if (last) {
            try {
                sample(r, llama_model_get_vocab(ctx_.model()));
            } catch (const std::exception &) {
                release(r, "stop", std::current_exception());
            }
        }
        return;
    }
}

void Scheduler::resync(const std::shared_ptr<Request> & r) {
    auto &          tokens = slots_[r->seq_].tokens;
    auto            u      = ctx_.acquire();
    const llama_pos max    = llama_memory_seq_pos_max(llama_get_memory(u.ctx), r->seq_);
    tokens.resize(std::min(tokens.size(), index_at_pos(slots_[r->seq_].shifts, std::max<llama_pos>(0, max + 1))));
    cut_shifts(slots_[r->seq_].shifts, tokens.size());
    if (!r->sampling_) {
        r->evaluated_ = std::min(r->evaluated_, tokens.size());
    }
}

void Scheduler::sample(const std::shared_ptr<Request> & r, const llama_vocab * vocab) {
    r->sampling_          = true;
    const llama_token tok = r->sampler_->sample(ctx_, r->row_);
    token_logprob     lp;
    if (r->opt_.logprobs >= 0) {
        auto u = ctx_.acquire();
        lp     = logprob_of(u.ctx, ctx_.check_output(r->row_, "logprobs"), vocab, tok, r->opt_.logprobs);
    }
    try {
        r->sampler_->accept(tok, true);
    } catch (const std::invalid_argument & e) {
        // the token drawn is one the grammar refuses: the grammar allows no token the model has here
        throw grammar_error(std::string("the grammar cannot be satisfied: ") + e.what());
    }
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
        {
            std::lock_guard<std::mutex> lock(r->mtx_);
            r->stop_word_ = r->text_.matched();
        }
        release(r, "stop");
    } else if (r->opt_.max_tokens >= 0 && n_done >= static_cast<size_t>(r->opt_.max_tokens)) {
        release(r, "length");
    } else if (slots_[r->seq_].tokens.size() + 1 >= n_ctx_seq_) {
        release(r, "length");  // the next token would not fit its sequence
    } else {
        r->push(r->text_.release(false));
    }
}

void Scheduler::release(const std::shared_ptr<Request> & r, const std::string & reason, std::exception_ptr error) {
    {
        std::lock_guard<std::mutex> lock(mtx_);
        auto                        it = std::find(active_.begin(), active_.end(), r);
        if (it == active_.end()) {
            return;
        }
        active_.erase(it);
    }
    auto & slot = slots_[r->seq_];
    slot.busy   = false;
    if (slot.copying) {
        // ended before any decode: the copy of its prefix is still pending, so it holds nothing yet
        slot.copying = false;
        slot.tokens.clear();
        slot.shifts.clear();
        slot.lora = {};
        try {
            auto u = ctx_.acquire();
            llama_memory_seq_rm(llama_get_memory(u.ctx), r->seq_, -1, -1);
        } catch (const std::exception &) {
            // a closed context: nothing to forget
        }
    }
    r->row_ = -1;
    r->end(r->cancelled_.load() ? "cancelled" : reason, error);
}

void Scheduler::fail_all(std::exception_ptr why) {
    std::vector<std::shared_ptr<Request>> reqs;
    {
        std::lock_guard<std::mutex> lock(mtx_);
        reqs = active_;
    }
    for (auto & r : reqs) {
        release(r, "stop", why);
    }
    for (auto & s : slots_) {
        s.tokens.clear();
        s.shifts.clear();
        s.lora    = {};
        s.copying = false;
    }
    try {
        auto u = ctx_.acquire();
        llama_memory_clear(llama_get_memory(u.ctx), true);
    } catch (const std::exception &) {
        // a closed context: nothing to clear
    }
}

// --- the sequences -----------------------------------------------------------------------------------

void Scheduler::purge_cancelled() {
    std::vector<std::shared_ptr<Request>> reqs;
    {
        std::lock_guard<std::mutex> lock(mtx_);
        reqs = active_;
    }
    for (auto & r : reqs) {
        if (r->cancelled_.load()) {
            release(r, "cancelled");
        }
    }
}

void Scheduler::check_idle(int32_t seq, const char * what) {
    purge_cancelled();  // a cancelled request gives its sequence back now, not at the next step
    if (seq < 0 || static_cast<size_t>(seq) >= slots_.size()) {
        throw std::invalid_argument(std::string(what) + ": sequence " + std::to_string(seq) + " is outside 0.." +
                                    std::to_string(slots_.size() - 1));
    }
    if (slots_[seq].busy) {
        throw llama_error(std::string(what) + ": sequence " + std::to_string(seq) + " is in use by a generation");
    }
}

void Scheduler::check_idle_range(int32_t seq) const {
    if (seq < 0 || static_cast<size_t>(seq) >= slots_.size()) {
        throw std::invalid_argument("sequence " + std::to_string(seq) + " is outside 0.." +
                                    std::to_string(slots_.size() - 1));
    }
}

std::unique_lock<std::mutex> Scheduler::lock_step() {
    {
        std::lock_guard<std::mutex> w(waiters_mtx_);
        ++step_waiters_;
    }
    std::unique_lock<std::mutex> lock(step_mtx_);
    {
        std::lock_guard<std::mutex> w(waiters_mtx_);
        --step_waiters_;
    }
    waiters_cv_.notify_all();
    return lock;
}

std::vector<llama_token> Scheduler::tokens(int32_t seq) {
    auto step_lock = lock_step();
    check_idle_range(seq);
    return slots_[seq].tokens;
}

bool Scheduler::busy(int32_t seq) {
    auto step_lock = lock_step();
    check_idle_range(seq);
    purge_cancelled();
    return slots_[seq].busy;
}

void Scheduler::reset(int32_t seq) {
    auto         step_lock = lock_step();
    const size_t from      = seq < 0 ? 0 : static_cast<size_t>(seq);
    const size_t to        = seq < 0 ? slots_.size() : from + 1;
    for (size_t s = from; s < to; ++s) {
        check_idle(static_cast<int32_t>(s), "reset");
    }
    auto           u   = ctx_.acquire();
    llama_memory_t mem = llama_get_memory(u.ctx);
    for (size_t s = from; s < to; ++s) {
        llama_memory_seq_rm(mem, static_cast<llama_seq_id>(s), -1, -1);
        slots_[s].tokens.clear();
        slots_[s].shifts.clear();
        slots_[s].lora = {};
    }
}

void Scheduler::adopt(int32_t seq, std::vector<llama_token> tokens) {
    auto step_lock = lock_step();
    check_idle(seq, "adopt");
    auto           u   = ctx_.acquire();
    llama_memory_t mem = llama_get_memory(u.ctx);
    const auto     n   = llama_memory_seq_pos_max(mem, seq) + 1;
    if (n != static_cast<llama_pos>(tokens.size())) {
        llama_memory_seq_rm(mem, seq, -1, -1);
        slots_[seq].tokens.clear();
        slots_[seq].shifts.clear();
        throw std::invalid_argument("sequence " + std::to_string(seq) + " holds " + std::to_string(n) +
                                    " positions, not the " + std::to_string(tokens.size()) +
                                    " tokens given (the sequence was cleared)");
    }
    slots_[seq].tokens = std::move(tokens);
    slots_[seq].shifts.clear();  // not known from tokens alone: M-RoPE media then do not match
    slots_[seq].lora = {};       // computed without adapters, as the caller's low-level decodes are
}

bool Scheduler::snapshot(int32_t                    seq,
                         std::vector<llama_token> & tokens,
                         std::vector<uint8_t> &     state,
                         lora_key &                 lora) {
    auto step_lock = lock_step();
    purge_cancelled();
    if (seq < 0 || static_cast<size_t>(seq) >= slots_.size() || slots_[seq].busy || slots_[seq].copying) {
        return false;
    }
    tokens = slots_[seq].tokens;
    lora   = slots_[seq].lora;
    state.clear();
    if (!tokens.empty()) {
        auto u = ctx_.acquire();
        state.resize(llama_state_seq_get_size(u.ctx, seq));
        state.resize(llama_state_seq_get_data(u.ctx, state.data(), state.size(), seq));
    }
    return true;
}

void Scheduler::restore(int32_t                          seq,
                        const std::vector<llama_token> & tokens,
                        const std::vector<uint8_t> &     state,
                        const lora_key &                 lora) {
    auto step_lock = lock_step();
    check_idle(seq, "restore");
    {
        auto u = ctx_.acquire();
        llama_memory_seq_rm(llama_get_memory(u.ctx), seq, -1, -1);
    }
    slots_[seq].tokens.clear();
    slots_[seq].shifts.clear();
    slots_[seq].lora = {};
    if (tokens.empty()) {
        return;
    }
    ctx_.seq_state_load(std::string(state.begin(), state.end()), seq);
    auto       u   = ctx_.acquire();
    auto       mem = llama_get_memory(u.ctx);
    const auto n   = llama_memory_seq_pos_max(mem, seq) + 1;
    if (n != static_cast<llama_pos>(tokens.size())) {
        llama_memory_seq_rm(mem, seq, -1, -1);
        throw std::invalid_argument("the state holds " + std::to_string(n) + " positions, not the " +
                                    std::to_string(tokens.size()) + " tokens given (the sequence was cleared)");
    }
    slots_[seq].tokens = tokens;
    slots_[seq].shifts.clear();
    slots_[seq].lora = lora;
}

// --- the host cache ----------------------------------------------------------------------------------

void Scheduler::host_trim(size_t room, std::list<host_entry>::const_iterator keep) {
    for (auto h = host_.begin(); h != host_.end() && host_bytes_ + room > host_budget_;) {
        if (h == keep) {
            ++h;
            continue;
        }
        host_bytes_ -= h->state.size();
        h = host_.erase(h);
    }
}

void Scheduler::host_save(int32_t seq, std::list<host_entry>::const_iterator keep) {
    const auto & tokens = slots_[seq].tokens;
    const auto & key    = slots_[seq].lora;
    for (size_t s = 0; s < slots_.size(); ++s) {
        if (static_cast<int32_t>(s) != seq &&
            shared_prefix(slots_[s].tokens, slots_[s].lora, tokens, key) == tokens.size() && !slots_[s].copying) {
            return;  // another sequence still holds all of it
        }
    }
    for (auto h = host_.begin(); h != host_.end(); ++h) {
        if (shared_prefix(h->tokens, h->lora, tokens, key) == tokens.size()) {
            host_.splice(host_.end(), host_, h);  // already kept: now the most recently used
            return;
        }
    }
    host_entry e;
    {
        auto         u = ctx_.acquire();
        const size_t n = llama_state_seq_get_size(u.ctx, seq);
        if (n == 0 || n > host_budget_) {
            return;
        }
        // entries this one supersedes (prefixes of it) go first, then the least recently used
        for (auto h = host_.begin(); h != host_.end();) {
            if (h != keep && shared_prefix(h->tokens, h->lora, tokens, key) == h->tokens.size()) {
                host_bytes_ -= h->state.size();
                h = host_.erase(h);
            } else {
                ++h;
            }
        }
        host_trim(n, keep);
        if (host_bytes_ + n > host_budget_) {
            return;  // only the state about to be loaded is left, and both do not fit
        }
        try {
            e.state.resize(n);
        } catch (const std::bad_alloc &) {
            return;  // the budget is more than the machine has: this prefix is evaluated again later
        }
        e.state.resize(llama_state_seq_get_data(u.ctx, e.state.data(), e.state.size(), seq));
    }
    if (e.state.empty()) {
        return;
    }
    e.tokens = tokens;
    e.shifts = slots_[seq].shifts;
    e.lora   = key;
    host_bytes_ += e.state.size();
    host_.push_back(std::move(e));
    ++host_saved_;
}

void Scheduler::set_host_cache(size_t budget) {
    auto step_lock = lock_step();
    host_budget_   = budget;
    host_trim(0, host_.end());
}

Scheduler::host_cache_stats Scheduler::host_cache() {
    auto step_lock = lock_step();
    return { host_budget_, host_bytes_, host_.size(), host_saved_, host_loaded_ };
}

void Scheduler::clear_host_cache() {
    auto step_lock = lock_step();
    host_.clear();
    host_bytes_ = 0;
}

}  // namespace pyllama
