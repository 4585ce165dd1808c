// llama.cpp's RPC backend: client devices for models, and the worker (see rpc.h).

#include "rpc.h"

#include "common.h"
#include "ggml-rpc.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>

namespace pyllama {

namespace {

// The workers' registry entries, by endpoint. They are not added to ggml's registry, as llama.cpp's
// --rpc does: every later model load, and libmtmd's choice of a GPU for a projector, would take the
// workers' devices (a worker that has gone away then crashes them).
std::mutex &                                g_rpc_mtx  = *new std::mutex;
std::map<std::string, ggml_backend_reg_t> & g_rpc_regs = *new std::map<std::string, ggml_backend_reg_t>;

// ggml-rpc's functions, looked up in its registry entry as llama.cpp's tools do (the backend may be
// linked in or loaded at run time); LlamaError when this build has no RPC backend.
template <typename F>
F rpc_function(const char * name) {
    ggml_backend_reg_t reg = ggml_backend_reg_by_name("RPC");
    void *             fn  = reg == nullptr ? nullptr : ggml_backend_reg_get_proc_address(reg, name);
    if (fn == nullptr) {
        throw llama_error("this build of pyllama has no RPC backend (it was built with -DPYLLAMA_RPC=OFF)");
    }
    return reinterpret_cast<F>(fn);
}

bool is_rpc(ggml_backend_dev_t dev) {
    return std::strcmp(ggml_backend_reg_name(ggml_backend_dev_backend_reg(dev)), "RPC") == 0;
}

void check_endpoint(const std::string & endpoint) {
    const auto colon = endpoint.rfind(':');
    bool       ok    = colon != std::string::npos && colon > 0 && colon + 1 < endpoint.size() &&
                       endpoint.find_first_of(" \t\r\n,") == std::string::npos;
    if (ok) {
        const std::string port = endpoint.substr(colon + 1);
        ok = port.size() <= 5 && port.find_first_not_of("0123456789") == std::string::npos && std::stoi(port) >= 1 &&
             std::stoi(port) <= 65535;
    }
    if (!ok) {
        throw invalid_request_error("an RPC server is 'host:port', not '" + endpoint + "'", "rpc_servers");
    }
}

// The devices of the worker at `endpoint` (pyllama.devices() lists them from then on).
std::vector<ggml_backend_dev_t> rpc_server_devices(const std::string & endpoint) {
    check_endpoint(endpoint);
    ggml_backend_reg_t reg = nullptr;
    {
        log_capture capture;
        try {
            ggml_abort_scope scope(nullptr);  // a worker that answers but not as one
            reg = rpc_function<decltype(&ggml_backend_rpc_add_server)>("ggml_backend_rpc_add_server")(endpoint.c_str());
        } catch (const ggml_abort_error & e) {
            throw model_load_error("the RPC server " + endpoint + " did not answer as one: " + e.what());
        }
        if (reg == nullptr) {
            // llama.cpp skips such a server without a word: a model would load without it
            const auto why = capture.problems();
            throw model_load_error(
                "cannot reach the RPC server " + endpoint +
                (why.empty() ? std::string(" (is `pyllama rpc-server` running there?)") : ": " + why));
        }
    }
    {
        std::lock_guard<std::mutex> lock(g_rpc_mtx);
        g_rpc_regs.emplace(endpoint, reg);
    }
    std::vector<ggml_backend_dev_t> out;
    for (size_t i = 0; i < ggml_backend_reg_dev_count(reg); ++i) {
        out.push_back(ggml_backend_reg_dev_get(reg, i));
    }
    return out;
}

}  // namespace

std::vector<ggml_backend_dev_t> rpc_known_devices() {
    std::lock_guard<std::mutex>     lock(g_rpc_mtx);
    std::vector<ggml_backend_dev_t> out;
    for (const auto & [endpoint, reg] : g_rpc_regs) {
        for (size_t i = 0; i < ggml_backend_reg_dev_count(reg); ++i) {
            out.push_back(ggml_backend_reg_dev_get(reg, i));
        }
    }
    return out;
}

std::vector<ggml_backend_dev_t> model_devices(const std::vector<std::string> & rpc_servers) {
    std::vector<ggml_backend_dev_t> devs;
    for (const auto & endpoint : rpc_servers) {
        for (auto * dev : rpc_server_devices(endpoint)) {
            devs.push_back(dev);
        }
    }
    if (rpc_servers.empty()) {
        return {};  // llama.cpp's own choice (the workers are not in ggml's registry)
    }
    // then the local GPUs, as llama.cpp picks them (integrated ones only without discrete ones)
    std::vector<ggml_backend_dev_t> gpus, igpus;
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        if (is_rpc(dev)) {
            continue;
        }
        if (ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_GPU) {
            gpus.push_back(dev);
        } else if (ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_IGPU &&
                   (igpus.empty() || ggml_backend_dev_backend_reg(dev) == ggml_backend_dev_backend_reg(igpus.back()))) {
            igpus.push_back(dev);
        }
    }
    devs.insert(devs.end(), gpus.begin(), gpus.end());
    if (gpus.empty()) {
        devs.insert(devs.end(), igpus.begin(), igpus.end());
    }
    devs.push_back(nullptr);
    return devs;
}

void rpc_serve(const std::string & endpoint, const std::vector<std::string> & names, int n_threads, bool cache) {
    backend_ensure_init();
    const auto colon = endpoint.rfind(':');
    if (colon == std::string::npos) {
        throw std::invalid_argument("the endpoint is 'host:port'");
    }
    std::vector<ggml_backend_dev_t> devices;
    for (const auto & name : names) {
        ggml_backend_dev_t dev = ggml_backend_dev_by_name(name.c_str());
        if (dev == nullptr || is_rpc(dev)) {
            std::string known;
            for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
                if (!is_rpc(ggml_backend_dev_get(i))) {
                    known += std::string(known.empty() ? "" : ", ") + ggml_backend_dev_name(ggml_backend_dev_get(i));
                }
            }
            throw invalid_request_error("no device '" + name + "' here (devices: " + known + ")", "device");
        }
        devices.push_back(dev);
    }
    if (devices.empty()) {  // rpc-server's choice: the accelerators, else the CPU
        for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
            ggml_backend_dev_t dev = ggml_backend_dev_get(i);
            if (ggml_backend_dev_type(dev) != GGML_BACKEND_DEVICE_TYPE_CPU && !is_rpc(dev)) {
                devices.push_back(dev);
            }
        }
        if (devices.empty()) {
            devices.push_back(ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU));
        }
    }
    std::string cache_dir;
    if (cache) {
        cache_dir = fs_get_cache_directory() + "rpc" + DIRECTORY_SEPARATOR;
        if (!fs_create_directory_with_parents(cache_dir)) {
            throw llama_error("cannot create the RPC cache directory " + cache_dir);
        }
    }
    const size_t threads =
        n_threads > 0 ? static_cast<size_t>(n_threads) : std::max<size_t>(1, std::thread::hardware_concurrency() / 2);
    const auto start = rpc_function<decltype(&ggml_backend_rpc_start_server)>("ggml_backend_rpc_start_server");
    start(endpoint.c_str(), cache ? cache_dir.c_str() : nullptr, threads, devices.size(), devices.data());
    throw llama_error("the RPC server at " + endpoint + " could not start (is the port in use?)");
}

void register_rpc(py::module_ & m) {
    m.def(
        "rpc_serve",
        [](const std::string & host, int port, const std::vector<std::string> & devices, int n_threads, bool cache) {
            if (port < 1 || port > 65535) {
                throw invalid_request_error("port must be 1 to 65535", "port");
            }
            if (host.empty() || host.find_first_of(" \t\r\n:") != std::string::npos) {
                throw invalid_request_error("host must be an address or a name without a port", "host");
            }
            py::gil_scoped_release nogil;
            rpc_serve(host + ":" + std::to_string(port), devices, n_threads, cache);
        },
        py::arg("host") = "127.0.0.1", py::arg("port") = 50052, py::kw_only(),
        py::arg("devices") = std::vector<std::string>(), py::arg("n_threads") = 0, py::arg("cache") = false,
        "Serve this machine's devices to llama.cpp RPC clients (Model/Llama rpc_servers=, llama.cpp's --rpc) until\n"
        "the process ends, as llama.cpp's rpc-server: devices by name (pyllama.devices()), by default the\n"
        "accelerators, else the CPU; cache keeps tensors the clients send in llama.cpp's cache directory. The\n"
        "protocol has no authentication: bind to 127.0.0.1 (the default) or a trusted network only.\n"
        "Raises LlamaError when it cannot start (the port is in use, say).");
}

}  // namespace pyllama
