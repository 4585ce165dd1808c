// The render guard (see render_guard.h): an account per render_scope, charged by the wrappers below
// that the linker puts in front of llama.cpp's Jinja entry point and of the allocations of this
// module's code (CMakeLists.txt: --wrap, on ELF platforms with libstdc++).
#include "render_guard.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <string>

#if defined(__linux__)
#include <malloc.h>
#include <pthread.h>
#endif

namespace jinja {
struct statement;
struct context;
struct value_t;
using value = std::shared_ptr<value_t>;
}  // namespace jinja

namespace pyllama {
namespace {

using clock = std::chrono::steady_clock;

struct account {
    render_limits     limits;
    int               depth = 0;  // nesting of Jinja executions: the outermost is timed and measured
    clock::time_point entered;
    double            seconds    = 0;        // the time limit, scaled to the input
    double            spent      = 0;        // seconds inside Jinja so far
    size_t            used       = 0;        // bytes allocated inside Jinja and not freed yet
    size_t            most       = 0;        // the most `used` has been
    size_t            deepest    = 0;        // the deepest stack seen inside Jinja
    char *            stack_top  = nullptr;  // the frame of the outermost Jinja execution
    char *            stack_low  = nullptr;  // the lowest address of this thread's stack, if known
    size_t            stack_room = 0;
    unsigned          tick       = 0;
    const char *      exceeded   = nullptr;  // "time", "memory" or "recursion" once crossed
};

thread_local account * current = nullptr;

// Scopes alive in any thread: while none is, every wrapper returns after one relaxed load of this,
// without touching thread-local storage (a call of __tls_get_addr in a loaded module).
std::atomic<int> scopes_alive{ 0 };

inline account * active_account() {
    return scopes_alive.load(std::memory_order_relaxed) == 0 ? nullptr : current;
}

std::mutex    limits_mtx;
render_limits limits_now;
render_cost   peaks;

struct limit_exceeded : std::bad_alloc {
    const char * what() const noexcept override { return "the chat template went past a render limit"; }
};

double seconds_in(const account & a) {
    return a.spent + (a.depth > 0 ? std::chrono::duration<double>(clock::now() - a.entered).count() : 0.0);
}

[[noreturn]] void trip(account & a, const char * which) {
    a.exceeded = which;
    throw limit_exceeded();
}

// Every allocation inside Jinja comes here first.
inline void charge(size_t n) {
    account * a = active_account();
    if (a == nullptr || a->depth == 0) {
        return;
    }
    if (a->exceeded != nullptr) {
        if (std::uncaught_exceptions() == 0) {  // never while unwinding: a destructor's allocation would terminate
            throw limit_exceeded();
        }
        return;
    }
    a->used += n;
    if (a->used > a->most) {
        a->most = a->used;
        if (a->used > a->limits.bytes) {
            trip(*a, "memory");
        }
    }
    char * here = static_cast<char *>(__builtin_frame_address(0));
    if (here < a->stack_top) {
        const auto depth = static_cast<size_t>(a->stack_top - here);
        if (depth > a->deepest) {
            a->deepest = depth;
            if (depth > a->stack_room) {
                trip(*a, "recursion");
            }
        }
    }
    if ((++a->tick & 127) == 0 && seconds_in(*a) > a->seconds) {
        trip(*a, "time");
    }
}

// Every deallocation inside Jinja: what it frees no longer counts (memory allocated before the render
// and freed in it, or grown inside libstdc++, is credited without having been charged: never below 0).
inline void credit(size_t n) {
    account * a = active_account();
    if (a == nullptr || a->depth == 0) {
        return;
    }
    a->used = a->used > n ? a->used - n : 0;
}

char * lowest_stack_address() {
#if defined(__linux__)
    pthread_attr_t attr;
    if (pthread_getattr_np(pthread_self(), &attr) == 0) {
        void * addr = nullptr;
        size_t size = 0;
        pthread_attr_getstack(&attr, &addr, &size);
        pthread_attr_destroy(&attr);
        return static_cast<char *>(addr);
    }
#endif
    return nullptr;
}

}  // namespace

render_limits get_render_limits() {
    std::lock_guard<std::mutex> lock(limits_mtx);
    return limits_now;
}

void set_render_limits(const render_limits & limits) {
    std::lock_guard<std::mutex> lock(limits_mtx);
    limits_now = limits;
}

bool render_guard_active() {
#if defined(PYLLAMA_RENDER_GUARD)
    return true;
#else
    return false;
#endif
}

render_cost render_peaks() {
    std::lock_guard<std::mutex> lock(limits_mtx);
    return peaks;
}

void reset_render_peaks() {
    std::lock_guard<std::mutex> lock(limits_mtx);
    peaks = render_cost{};
}

render_scope::render_scope(size_t input_bytes) : state_(current), owner_(current == nullptr) {
    if (owner_) {
        auto * a     = new account;
        a->limits    = get_render_limits();
        // a long conversation takes longer to render (Gemma 4's template takes time quadratic in it);
        // a runaway loop on a short one is stopped soon
        a->seconds   = a->limits.seconds * (1.0 + static_cast<double>(input_bytes) / kSecondsPerBytes);
        a->stack_low = lowest_stack_address();
        state_       = a;
        current      = a;
        scopes_alive.fetch_add(1, std::memory_order_relaxed);
    }
}

render_scope::~render_scope() {
    if (!owner_) {
        return;
    }
    auto * a = static_cast<account *>(state_);
    current  = nullptr;
    scopes_alive.fetch_sub(1, std::memory_order_relaxed);
    {
        std::lock_guard<std::mutex> lock(limits_mtx);
        peaks.seconds = std::max(peaks.seconds, a->spent);
        peaks.bytes   = std::max(peaks.bytes, a->most);
        peaks.stack   = std::max(peaks.stack, a->deepest);
    }
    delete a;
}

std::string render_scope::exceeded() const {
    const auto * a = static_cast<const account *>(state_);
    if (a == nullptr || a->exceeded == nullptr) {
        return {};
    }
    const std::string which = a->exceeded;
    if (which == "time") {
        return "took longer than " + std::to_string(static_cast<int64_t>(a->seconds * 1000)) + " ms";
    }
    if (which == "memory") {
        return "allocated more than " + std::to_string(a->limits.bytes >> 20) + " MiB";
    }
    return "recursed deeper than " + std::to_string(a->stack_room >> 20) + " MiB of stack";
}

namespace {

// Entering and leaving Jinja (called by the wrapper of jinja::statement::execute).
void jinja_enter(char * frame) {
    account * a = current;
    if (a == nullptr) {
        return;
    }
    if (a->exceeded != nullptr) {
        throw limit_exceeded();
    }
    if (a->depth++ == 0) {
        a->entered   = clock::now();
        a->stack_top = frame;
        size_t room  = a->limits.stack;
        if (a->stack_low != nullptr && frame > a->stack_low) {
            // what the thread has left, less a margin for the frames between two allocations
            const auto left   = static_cast<size_t>(frame - a->stack_low);
            const auto usable = left - left / 8 - std::min(left / 8, size_t{ 256 } << 10);
            room              = std::min(room, usable);
        }
        a->stack_room = room;
    }
}

void jinja_leave() {
    account * a = current;
    if (a == nullptr) {
        return;
    }
    if (--a->depth == 0) {
        a->spent += std::chrono::duration<double>(clock::now() - a->entered).count();
    }
}

}  // namespace
}  // namespace pyllama

#if defined(PYLLAMA_RENDER_GUARD)

// The linker's --wrap=SYMBOL sends every reference to SYMBOL in the objects linked into this module
// to __wrap_SYMBOL; __real_SYMBOL is the original. Member functions are called as functions whose
// first argument is `this` (after the address of a returned class, as jinja::value is).
extern "C" {

jinja::value __real__ZN5jinja9statement7executeERNS_7contextE(jinja::statement * self, jinja::context & ctx);

jinja::value __wrap__ZN5jinja9statement7executeERNS_7contextE(jinja::statement * self, jinja::context & ctx) {
    if (pyllama::active_account() == nullptr) {
        return __real__ZN5jinja9statement7executeERNS_7contextE(self, ctx);
    }
    pyllama::jinja_enter(static_cast<char *>(__builtin_frame_address(0)));
    struct leave {
        ~leave() { pyllama::jinja_leave(); }
    } on_exit;
    return __real__ZN5jinja9statement7executeERNS_7contextE(self, ctx);
}

void * __real__Znwm(size_t n);
void * __real__Znam(size_t n);
void * __real__ZnwmSt11align_val_t(size_t n, std::align_val_t al);
void * __real__ZnwmRKSt9nothrow_t(size_t n, const std::nothrow_t & tag) noexcept;

void * __wrap__Znwm(size_t n) {
    pyllama::charge(n);
    return __real__Znwm(n);
}

void * __wrap__Znam(size_t n) {
    pyllama::charge(n);
    return __real__Znam(n);
}

void * __wrap__ZnwmSt11align_val_t(size_t n, std::align_val_t al) {
    pyllama::charge(n);
    return __real__ZnwmSt11align_val_t(n, al);
}

void __real__ZdlPv(void * p) noexcept;
void __real__ZdlPvm(void * p, size_t n) noexcept;
void __real__ZdaPv(void * p) noexcept;
void __real__ZdaPvm(void * p, size_t n) noexcept;
void __real__ZdlPvSt11align_val_t(void * p, std::align_val_t al) noexcept;
void __real__ZdlPvmSt11align_val_t(void * p, size_t n, std::align_val_t al) noexcept;

void __wrap__ZdlPv(void * p) noexcept {
    if (p != nullptr && pyllama::active_account() != nullptr) {
        pyllama::credit(malloc_usable_size(p));
    }
    __real__ZdlPv(p);
}

void __wrap__ZdlPvm(void * p, size_t n) noexcept {
    pyllama::credit(n);
    __real__ZdlPvm(p, n);
}

void __wrap__ZdaPv(void * p) noexcept {
    if (p != nullptr && pyllama::active_account() != nullptr) {
        pyllama::credit(malloc_usable_size(p));
    }
    __real__ZdaPv(p);
}

void __wrap__ZdaPvm(void * p, size_t n) noexcept {
    pyllama::credit(n);
    __real__ZdaPvm(p, n);
}

void __wrap__ZdlPvSt11align_val_t(void * p, std::align_val_t al) noexcept {
    if (p != nullptr && pyllama::active_account() != nullptr) {
        pyllama::credit(malloc_usable_size(p));
    }
    __real__ZdlPvSt11align_val_t(p, al);
}

void __wrap__ZdlPvmSt11align_val_t(void * p, size_t n, std::align_val_t al) noexcept {
    pyllama::credit(n);
    __real__ZdlPvmSt11align_val_t(p, n, al);
}

void * __wrap__ZnwmRKSt9nothrow_t(size_t n, const std::nothrow_t & tag) noexcept {
    try {
        pyllama::charge(n);
    } catch (...) {
        return nullptr;
    }
    return __real__ZnwmRKSt9nothrow_t(n, tag);
}

// std::string's out-of-line members that grow a string (libstdc++ instantiates them in its own
// library, so their allocations never pass through operator new here): append, insert, replace,
// resize and construction from a count. A Jinja loop that only appends ('x' * n) comes through here.
void * __real__ZNSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEE9_M_appendEPKcm(void *       self,
                                                                                   const char * s,
                                                                                   size_t       n);
void * __real__ZNSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEE14_M_replace_auxEmmmc(
    void * self, size_t pos, size_t n1, size_t n2, char c);
void * __real__ZNSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEE10_M_replaceEmmPKcm(
    void * self, size_t pos, size_t n1, const char * s, size_t n2);
void __real__ZNSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEE9_M_mutateEmmPKcm(
    void * self, size_t pos, size_t n1, const char * s, size_t n2);
char * __real__ZNSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEE9_M_createERmm(void *   self,
                                                                                  size_t & capacity,
                                                                                  size_t   old_capacity);

void * __wrap__ZNSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEE9_M_appendEPKcm(void *       self,
                                                                                   const char * s,
                                                                                   size_t       n) {
    pyllama::charge(n);
    return __real__ZNSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEE9_M_appendEPKcm(self, s, n);
}

void * __wrap__ZNSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEE14_M_replace_auxEmmmc(
    void * self, size_t pos, size_t n1, size_t n2, char c) {
    pyllama::charge(n2);
    return __real__ZNSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEE14_M_replace_auxEmmmc(self, pos, n1, n2, c);
}

void * __wrap__ZNSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEE10_M_replaceEmmPKcm(
    void * self, size_t pos, size_t n1, const char * s, size_t n2) {
    pyllama::charge(n2);
    return __real__ZNSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEE10_M_replaceEmmPKcm(self, pos, n1, s, n2);
}

void __wrap__ZNSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEE9_M_mutateEmmPKcm(
    void * self, size_t pos, size_t n1, const char * s, size_t n2) {
    pyllama::charge(n2);
    __real__ZNSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEE9_M_mutateEmmPKcm(self, pos, n1, s, n2);
}

char * __wrap__ZNSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEE9_M_createERmm(void *   self,
                                                                                  size_t & capacity,
                                                                                  size_t   old_capacity) {
    pyllama::charge(capacity);
    return __real__ZNSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEE9_M_createERmm(self, capacity, old_capacity);
}

}  // extern "C"

#endif  // PYLLAMA_RENDER_GUARD
