// on_large_stack(fn): runs fn on a thread with a large stack of known size and returns its result
// (or rethrows its exception) on the calling thread.
//
// llama.cpp's GBNF parser, its grammar checks, json-schema-to-grammar, the Jinja renderer and the
// tool-call parsers recurse over their input with no depth limit. Input bounds (grammar.cpp,
// chat.cpp) keep that depth far below what this stack holds, whatever stack the caller's thread
// has (8 MiB on Linux's main thread, 512 KiB on a macOS secondary thread). No pybind11 here: fn must
// not touch Python objects (the caller releases the GIL around the call when it holds it).
#pragma once

#include <cstddef>
#include <exception>
#include <optional>
#include <stdexcept>
#include <type_traits>
#include <utility>

#ifndef _WIN32
#include <pthread.h>
#else
#include <thread>
#endif

namespace pyllama {

// Reserved address space, not memory: pages are committed only as deep recursion touches them.
constexpr size_t kLargeStackBytes = size_t{ 256 } << 20;

template <typename F>
auto on_large_stack(F && fn) -> std::invoke_result_t<F &> {
    using R = std::invoke_result_t<F &>;
    struct job {
        F *                                                           fn;
        std::conditional_t<std::is_void_v<R>, bool, std::optional<R>> result{};
        std::exception_ptr                                            error;

        void run() {
            try {
                if constexpr (std::is_void_v<R>) {
                    (*fn)();
                    result = true;
                } else {
                    result.emplace((*fn)());
                }
            } catch (...) {
                error = std::current_exception();
            }
        }
    } j{ &fn };
#ifndef _WIN32
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, kLargeStackBytes);
    pthread_t  thread;
    const auto entry = [](void * arg) -> void * {
        static_cast<job *>(arg)->run();
        return nullptr;
    };
    const int rc = pthread_create(&thread, &attr, entry, &j);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
        throw std::runtime_error("could not start a thread for a deep parse");
    }
    pthread_join(thread, nullptr);
#else
    std::thread([&j] { j.run(); }).join();  // MSVC's default stack; the input bounds still hold
#endif
    if (j.error) {
        std::rethrow_exception(j.error);
    }
    if constexpr (!std::is_void_v<R>) {
        return std::move(*j.result);
    }
}

}  // namespace pyllama
