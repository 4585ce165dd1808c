// Backend: one-time initialisation, devices, system information and log routing.
//
// llama.cpp and ggml log through a callback that may run on any native thread (loader threads,
// CPU worker threads). That callback never touches Python: it assembles lines and puts them on a
// bounded queue. A Python thread (started by pyllama/_logging.py) waits on the queue with the GIL
// released and hands the lines to the `pyllama` logger. common/'s own logger does not go through
// llama_log_set: on ELF platforms its entry point is redirected here at link time (--wrap).

#include "pyllama.h"

#include "ggml-backend.h"
#include "llama.h"
#include "log.h"
#include "mtmd-helper.h"
#include "rpc.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <mutex>
#ifdef PYLLAMA_BACKEND_DL
#include <dlfcn.h>
#endif

namespace pyllama {

namespace {

// Python's logging levels.
constexpr int PY_DEBUG   = 10;
constexpr int PY_INFO    = 20;
constexpr int PY_WARNING = 30;
constexpr int PY_ERROR   = 40;

constexpr size_t LOG_QUEUE_MAX = 10000;

struct log_state {
    std::mutex                              mtx;
    std::condition_variable                 cv;
    std::deque<std::pair<int, std::string>> queue;
    size_t                                  dropped = 0;
    bool                                    closed  = false;
};

log_state &      g_log = *new log_state;  // never destroyed: native threads may log at exit
std::atomic<int> g_log_min_level{ PY_WARNING };

thread_local log_capture * t_capture = nullptr;
thread_local std::string   t_pending;
thread_local int           t_pending_level = PY_INFO;

int py_level(ggml_log_level level) {
    switch (level) {
        case GGML_LOG_LEVEL_DEBUG: return PY_DEBUG;
        case GGML_LOG_LEVEL_WARN: return PY_WARNING;
        case GGML_LOG_LEVEL_ERROR: return PY_ERROR;
        default: return PY_INFO;
    }
}

void log_emit(int level, std::string line) {
    while (!line.empty() && (line.back() == '\n' || line.back() == '\r')) {
        line.pop_back();
    }
    if (line.empty()) {
        return;
    }
    log_capture_add(level, line);
    if (level < g_log_min_level.load(std::memory_order_relaxed)) {
        return;
    }
    {
        std::lock_guard<std::mutex> lock(g_log.mtx);
        if (g_log.closed) {
            return;
        }
        if (g_log.queue.size() >= LOG_QUEUE_MAX) {
            g_log.queue.pop_front();
            g_log.dropped++;
        }
        g_log.queue.emplace_back(level, std::move(line));
    }
    g_log.cv.notify_one();
}

void log_callback(ggml_log_level level, const char * text, void * /*user_data*/) {
    if (text == nullptr) {
        return;
    }
    if (level != GGML_LOG_LEVEL_CONT) {
        if (!t_pending.empty()) {
            log_emit(t_pending_level, std::move(t_pending));
            t_pending.clear();
        }
        t_pending_level = py_level(level);
    }
    t_pending += text;
    if (!t_pending.empty() && t_pending.back() == '\n') {
        log_emit(t_pending_level, std::move(t_pending));
        t_pending.clear();
    }
}

// common/'s logger verbosity follows the Python threshold, so that its debug lines are formatted
// only when someone listens.
void sync_common_verbosity(int min_level) {
#ifdef PYLLAMA_WRAP_COMMON_LOG
    common_log_set_verbosity_thold(min_level <= PY_DEBUG ? LOG_LEVEL_DEBUG : LOG_LEVEL_INFO);
#else
    // Without the link-time redirection common/ would print to the terminal itself: keep it quiet.
    (void)min_level;
    common_log_set_verbosity_thold(-1);
#endif
}

py::list log_wait(double timeout_s) {
    std::vector<std::pair<int, std::string>> lines;
    size_t                                   dropped = 0;
    {
        py::gil_scoped_release       release;
        std::unique_lock<std::mutex> lock(g_log.mtx);
        g_log.cv.wait_for(lock, std::chrono::duration<double>(timeout_s),
                          [] { return g_log.closed || !g_log.queue.empty(); });
        lines.assign(std::make_move_iterator(g_log.queue.begin()), std::make_move_iterator(g_log.queue.end()));
        g_log.queue.clear();
        dropped       = g_log.dropped;
        g_log.dropped = 0;
    }
    py::list out;
    if (dropped > 0) {
        out.append(py::make_tuple(PY_WARNING, std::to_string(dropped) + " log lines dropped (queue full)"));
    }
    for (auto & l : lines) {
        out.append(py::make_tuple(l.first, py::bytes(l.second).attr("decode")("utf-8", "replace")));
    }
    return out;
}

void log_close() {
    {
        std::lock_guard<std::mutex> lock(g_log.mtx);
        g_log.closed = true;
        g_log.queue.clear();
    }
    g_log.cv.notify_all();
}

bool log_is_closed() {
    std::lock_guard<std::mutex> lock(g_log.mtx);
    return g_log.closed;
}

void log_set_level(int level) {
    g_log_min_level.store(level, std::memory_order_relaxed);
    sync_common_verbosity(level);
}

py::list devices() {
    py::list                        out;
    std::vector<ggml_backend_dev_t> all;
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        all.push_back(ggml_backend_dev_get(i));
    }
    for (auto * dev : rpc_known_devices()) {  // the RPC workers' devices, kept out of ggml's registry
        all.push_back(dev);
    }
    for (size_t i = 0; i < all.size(); ++i) {
        ggml_backend_dev_t dev      = all[i];
        size_t             free_mem = 0, total_mem = 0;
        bool               reachable = true;
        try {
            ggml_abort_scope scope(nullptr);  // an RPC worker that went away
            ggml_backend_dev_memory(dev, &free_mem, &total_mem);
        } catch (const ggml_abort_error &) {
            reachable = false;
        }
        const char * type = "cpu";
        switch (ggml_backend_dev_type(dev)) {
            case GGML_BACKEND_DEVICE_TYPE_CPU: type = "cpu"; break;
            case GGML_BACKEND_DEVICE_TYPE_GPU: type = "gpu"; break;
            case GGML_BACKEND_DEVICE_TYPE_IGPU: type = "igpu"; break;
            case GGML_BACKEND_DEVICE_TYPE_ACCEL: type = "accel"; break;
            case GGML_BACKEND_DEVICE_TYPE_META: type = "meta"; break;
        }
        py::dict d;
        d["index"]        = i;
        d["name"]         = ggml_backend_dev_name(dev);
        d["description"]  = ggml_backend_dev_description(dev);
        d["type"]         = type;
        d["memory_free"]  = free_mem;
        d["memory_total"] = total_mem;
        d["backend"]      = ggml_backend_reg_name(ggml_backend_dev_backend_reg(dev));
        if (!reachable) {
            d["reachable"] = false;
        }
        out.append(d);
    }
    return out;
}

// --- ggml aborts ---------------------------------------------------------------------------------

thread_local int                             t_abort_depth = 0;
thread_local const llama_model *             t_abort_model = nullptr;
std::mutex &                                 g_failed_mtx  = *new std::mutex;
std::map<const llama_model *, std::string> & g_failed      = *new std::map<const llama_model *, std::string>;

void on_ggml_abort(const char * message) {
    if (t_abort_depth > 0) {
        // ggml writes "file:line: message": the source path says nothing to the caller
        std::string  what  = message;
        const size_t colon = what.find(": ");
        if (colon != std::string::npos && colon > 0 && what.find_last_of("0123456789", colon) == colon - 1) {
            what = what.substr(colon + 2);
        }
        if (t_abort_model != nullptr) {
            std::lock_guard<std::mutex> lock(g_failed_mtx);
            g_failed.emplace(t_abort_model, what);
        }
        throw ggml_abort_error("llama.cpp failed: " + what);
    }
    fprintf(stderr, "%s\n", message);  // ggml's own report; it aborts when this returns
}

}  // namespace

ggml_abort_scope::ggml_abort_scope(const llama_model * model) : outer_(t_abort_model) {
    ++t_abort_depth;
    if (model != nullptr) {
        t_abort_model = model;
    }
}

ggml_abort_scope::~ggml_abort_scope() {
    --t_abort_depth;
    t_abort_model = outer_;
}

bool model_failed(const llama_model * model, std::string * why) {
    std::lock_guard<std::mutex> lock(g_failed_mtx);
    auto                        it = g_failed.find(model);
    if (it == g_failed.end()) {
        return false;
    }
    if (why != nullptr) {
        *why = it->second;
    }
    return true;
}

void log_capture_add(int level, const std::string & line) {
    for (log_capture * c = t_capture; c != nullptr; c = c->outer_) {
        c->lines_.emplace_back(level, line);
    }
}

log_capture::log_capture() : outer_(t_capture) {
    t_capture = this;
}

log_capture::~log_capture() {
    t_capture = outer_;
}

std::string log_capture::problems() const {
    std::string out;
    for (const auto & l : lines_) {
        if (l.first < PY_WARNING) {
            continue;
        }
        if (!out.empty()) {
            out += "; ";
        }
        out += l.second;
    }
    return out;
}

void backend_ensure_init() {
    static std::once_flag once;
    std::call_once(once, [] {
        // ggml's abort path would otherwise try to attach gdb to print a backtrace.
        setenv("GGML_NO_BACKTRACE", "1", 0);
        llama_log_set(log_callback, nullptr);
        mtmd_helper_log_set(log_callback, nullptr);  // libmtmd and clip log through their own setter
        ggml_set_abort_callback(on_ggml_abort);
#ifdef PYLLAMA_BACKEND_DL
        // a portable build: the backends (the CPU variant that suits this CPU best, RPC) are libraries
        // beside this module, which ggml scores and loads
        Dl_info info{};
        if (dladdr(reinterpret_cast<void *>(&backend_ensure_init), &info) != 0 && info.dli_fname != nullptr) {
            std::string dir = info.dli_fname;
            dir             = dir.substr(0, dir.find_last_of('/') == std::string::npos ? 0 : dir.find_last_of('/'));
            ggml_backend_load_all_from_path(dir.empty() ? "." : dir.c_str());
        }
#endif
        sync_common_verbosity(g_log_min_level.load());
        llama_backend_init();
    });
}

void register_backend(py::module_ & m) {
    backend_ensure_init();

    m.def(
        "system_info", [] { return std::string(llama_print_system_info()); },
        "llama.cpp's system information line: the CPU features and backends compiled in.");
    m.def("devices", &devices,
          "The compute devices ggml found: a list of dicts with index, name, description, type "
          "('cpu', 'gpu', 'igpu', 'accel'), memory_free and memory_total in bytes.");
    m.def("supports_gpu_offload", &llama_supports_gpu_offload,
          "Whether this build can offload layers to a GPU (a GPU backend is compiled in and found).");
    m.def("supports_mmap", &llama_supports_mmap, "Whether models can be memory-mapped on this platform.");
    m.def("supports_mlock", &llama_supports_mlock, "Whether models can be locked in RAM on this platform.");
    m.def("max_devices", &llama_max_devices, "The most devices a model can be split across.");

    m.def("_log_wait", &log_wait, py::arg("timeout_s"),
          "Wait up to timeout_s for log lines and return them as (python_level, text) tuples.");
    m.def("_log_set_level", &log_set_level, py::arg("level"),
          "Drop log lines below this Python logging level before they are queued.");
    m.def("_log_close", &log_close, "Stop queueing log lines and wake the waiting thread (at exit).");
    m.def("_log_is_closed", &log_is_closed);

#ifdef PYLLAMA_BACKEND_DL
    m.attr("PORTABLE") = true;  // CPU backend variants loaded at run time (PYLLAMA_PORTABLE)
#else
    m.attr("PORTABLE") = false;
#endif
    m.attr("LLAMA_CPP_COMMIT") = PYLLAMA_LLAMA_CPP_COMMIT;
    m.attr("__version__")      = PYLLAMA_VERSION;
}

}  // namespace pyllama

#ifdef PYLLAMA_WRAP_COMMON_LOG
// common_log_add, redirected here by `-Wl,--wrap` (see CMakeLists.txt): common/'s messages join
// llama.cpp's in the `pyllama` logger instead of being printed by common/'s own worker thread.
extern "C" void PYLLAMA_WRAP_COMMON_LOG(struct common_log * /*log*/, enum ggml_log_level level, const char * fmt, ...) {
    char    buf[1024];
    va_list args;
    va_start(args, fmt);
    va_list args_copy;
    va_copy(args_copy, args);
    const int n = vsnprintf(buf, sizeof(buf), fmt, args);
    va_end(args);
    if (n < 0) {
        va_end(args_copy);
        return;
    }
    if (static_cast<size_t>(n) < sizeof(buf)) {
        va_end(args_copy);
        pyllama::log_callback(level == GGML_LOG_LEVEL_NONE ? GGML_LOG_LEVEL_INFO : level, buf, nullptr);
        return;
    }
    std::string big(static_cast<size_t>(n) + 1, '\0');
    vsnprintf(big.data(), big.size(), fmt, args_copy);
    va_end(args_copy);
    big.resize(static_cast<size_t>(n));
    pyllama::log_callback(level == GGML_LOG_LEVEL_NONE ? GGML_LOG_LEVEL_INFO : level, big.c_str(), nullptr);
}
#endif
