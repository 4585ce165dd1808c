// llama.cpp's RPC backend (ggml-rpc): layers of a model on other machines' devices, and the worker
// that serves this machine's devices to them.
#pragma once

#include "pyllama.h"

#include "ggml-backend.h"

#include <string>
#include <vector>

namespace pyllama {

// The devices a model loads onto, as llama.cpp chooses them by default but with the devices of the
// given RPC workers ("host:port") first: ModelLoadError when a worker cannot be reached or does not
// answer as one (llama.cpp would skip it silently). Empty (llama.cpp's own choice, which never holds
// a worker's device: they stay out of ggml's registry) when no worker is given. Ends with nullptr
// when not empty.
std::vector<ggml_backend_dev_t> model_devices(const std::vector<std::string> & rpc_servers);

// The devices of the workers models have used in this process.
std::vector<ggml_backend_dev_t> rpc_known_devices();

// Serves this machine's devices (by name; all accelerators, else the CPU, when empty) to RPC clients
// at "host:port" until the process ends (call without the GIL). Returns only when it cannot start.
void rpc_serve(const std::string & endpoint, const std::vector<std::string> & devices, int n_threads, bool cache);

}  // namespace pyllama
