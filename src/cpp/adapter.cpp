// LoRA adapters, adapter sets and control vectors (see adapter.h).

#include "adapter.h"
#include <pybind11/numpy.h>

#include "common.h"
#include "gguf.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

namespace pyllama {

namespace {

std::atomic<uint64_t> g_next_serial{ 1 };

// A GGUF file's metadata and tensor table (no data), freed with it.
struct gguf_meta {
    gguf_context * gguf = nullptr;
    ggml_context * ggml = nullptr;

    explicit gguf_meta(const std::string & path) {
        gguf_init_params p{ /*no_alloc =*/true, /*ctx =*/&ggml };
        gguf = gguf_init_from_file(path.c_str(), p);
    }

    ~gguf_meta() {
        if (gguf != nullptr) {
            gguf_free(gguf);
        }
        if (ggml != nullptr) {
            ggml_free(ggml);
        }
    }

    gguf_meta(const gguf_meta &)             = delete;
    gguf_meta & operator=(const gguf_meta &) = delete;
};

// The file's size, after checking it exists and is a file (FileNotFoundError otherwise).
uintmax_t existing_file(const std::string & path, const char * what) {
    std::error_code ec;
    const auto      st = std::filesystem::status(path, ec);
    if (!std::filesystem::exists(st)) {
        throw file_not_found_error(std::string(what) + " file not found: '" + path + "'");
    }
    if (std::filesystem::is_directory(st)) {
        throw file_not_found_error(std::string(what) + " file not found: '" + path + "' is a directory");
    }
    return std::filesystem::file_size(path, ec);
}

// Every tensor's data lies inside the file: llama.cpp allocates what the table declares before it
// reads, so a table that lies would ask for any amount of memory.
bool tensors_within(const gguf_meta & m, uintmax_t file_size) {
    const size_t base = gguf_get_data_offset(m.gguf);
    for (int64_t i = 0; i < gguf_get_n_tensors(m.gguf); ++i) {
        const size_t off  = gguf_get_tensor_offset(m.gguf, i);
        const size_t size = gguf_get_tensor_size(m.gguf, i);
        if (base > file_size || off > file_size - base || size > file_size - base - off) {
            return false;
        }
    }
    return true;
}

}  // namespace

LoraAdapter::LoraAdapter(Model & model, const std::string & path) : model_(model.shared()), path_(path) {
    backend_ensure_init();
    const uintmax_t size = existing_file(path, "LoRA adapter");
    std::string     reason;
    {
        gguf_meta m(path);
        if (m.gguf == nullptr) {
            throw model_load_error("'" + path + "' is not a GGUF file (a LoRA adapter was expected)");
        }
        if (!tensors_within(m, size)) {
            throw model_load_error("the LoRA adapter '" + path +
                                   "' is cut short or corrupt: its tensors lie past its end");
        }
    }
    {
        log_capture capture;
        try {
            adapter_ = llama_adapter_lora_init(model_.get(), path.c_str());
        } catch (const std::exception & e) {
            adapter_ = nullptr;
            reason   = e.what();
        }
        if (adapter_ == nullptr && reason.empty()) {
            reason = capture.problems();
        }
    }
    if (adapter_ == nullptr) {
        throw model_load_error("cannot load the LoRA adapter '" + path + "' for this model" +
                               (reason.empty() ? "" : ": " + reason));
    }
    serial_          = g_next_serial.fetch_add(1);
    const uint64_t n = llama_adapter_get_alora_n_invocation_tokens(adapter_);
    if (n > 0) {
        const llama_token * t = llama_adapter_get_alora_invocation_tokens(adapter_);
        invocation_.assign(t, t + n);
        const llama_vocab * vocab = llama_model_get_vocab(model_.get());
        for (llama_token tok : invocation_) {
            if (tok < 0 || tok >= llama_vocab_n_tokens(vocab)) {
                llama_adapter_lora_free(adapter_);
                adapter_ = nullptr;
                throw model_load_error("the aLoRA adapter '" + path + "' has an invocation token (" +
                                       std::to_string(tok) + ") outside the model's vocabulary");
            }
        }
    }
}

LoraAdapter::~LoraAdapter() {
    if (adapter_ != nullptr && !model_failed(model_.get())) {
        llama_adapter_lora_free(adapter_);
    }
}

std::map<std::string, std::string> LoraAdapter::meta() const {
    std::map<std::string, std::string> out;
    const int32_t                      n = llama_adapter_meta_count(adapter_);
    for (int32_t i = 0; i < n; ++i) {
        std::string key(256, '\0'), value(256, '\0');
        for (auto * s : { &key, &value }) {
            const auto get = [&](char * buf, size_t len) {
                return s == &key ? llama_adapter_meta_key_by_index(adapter_, i, buf, len)
                                 : llama_adapter_meta_val_str_by_index(adapter_, i, buf, len);
            };
            const int32_t len = get(s->data(), s->size());
            if (len < 0) {
                s->clear();
                continue;
            }
            if (static_cast<size_t>(len) >= s->size()) {
                s->assign(static_cast<size_t>(len) + 1, '\0');
                get(s->data(), s->size());
            }
            s->resize(static_cast<size_t>(len));
        }
        out.emplace(std::move(key), std::move(value));
    }
    return out;
}

lora_set lora_canonical(const lora_set & set, const llama_model * model, const char * param) {
    lora_set out;
    for (const auto & e : set) {
        if (!e.adapter) {
            throw invalid_request_error("a LoRA adapter is missing", param);
        }
        if (e.adapter->model() != model) {
            throw invalid_request_error("the LoRA adapter '" + e.adapter->path() + "' was loaded for another model",
                                        param);
        }
        if (!std::isfinite(e.scale)) {
            throw invalid_request_error("a LoRA scale must be a finite number", param);
        }
        auto same = std::find_if(out.begin(), out.end(),
                                 [&](const lora_entry & o) { return o.adapter->serial() == e.adapter->serial(); });
        if (same != out.end()) {
            same->scale += e.scale;
        } else {
            out.push_back(e);
        }
    }
    out.erase(std::remove_if(out.begin(), out.end(), [](const lora_entry & e) { return e.scale == 0.0f; }), out.end());
    std::sort(out.begin(), out.end(),
              [](const lora_entry & a, const lora_entry & b) { return a.adapter->serial() < b.adapter->serial(); });
    return out;
}

bool lora_equal(const lora_set & a, const lora_set & b) {
    if (a.size() != b.size()) {
        return false;
    }
    for (size_t i = 0; i < a.size(); ++i) {
        if (a[i].adapter->serial() != b[i].adapter->serial() || a[i].scale != b[i].scale) {
            return false;
        }
    }
    return true;
}

void lora_apply(llama_context * ctx, const lora_set & set) {
    std::vector<llama_adapter_lora *> adapters;
    std::vector<float>                scales;
    for (const auto & e : set) {
        adapters.push_back(e.adapter->get());
        scales.push_back(e.scale);
    }
    llama_set_adapters_lora(ctx, adapters.empty() ? nullptr : adapters.data(), adapters.size(),
                            scales.empty() ? nullptr : scales.data());
}

size_t lora_alora_start(lora_set & set, const std::vector<llama_token> & prompt) {
    if (set.empty() ||
        !std::all_of(set.begin(), set.end(), [](const lora_entry & e) { return e.adapter->is_alora(); })) {
        return 0;
    }
    if (set.size() != 1) {
        throw invalid_request_error("one aLoRA adapter at a time: a request cannot switch on several", "lora");
    }
    const auto & inv = set[0].adapter->invocation_tokens();
    if (prompt.size() >= inv.size()) {
        for (size_t i = prompt.size() - inv.size() + 1; i-- > 0;) {
            if (std::equal(inv.begin(), inv.end(), prompt.begin() + static_cast<std::ptrdiff_t>(i))) {
                return i;
            }
        }
    }
    set.clear();  // the prompt does not invoke it: it stays off
    return 0;
}

control_vector control_vector_load(const llama_model *                                model,
                                   const std::vector<std::pair<std::string, float>> & files) {
    const int32_t                                n_embd  = llama_model_n_embd(model);
    const int32_t                                n_layer = llama_model_n_layer(model);
    std::vector<common_control_vector_load_info> infos;
    for (const auto & [path, strength] : files) {
        if (!std::isfinite(strength)) {
            throw invalid_request_error("a control vector's strength must be a finite number", "control_vectors");
        }
        const uintmax_t size = existing_file(path, "control vector");
        gguf_meta       m(path);
        const auto      bad = [&](const std::string & why) {
            return invalid_request_error("'" + path + "' is not a control vector of this model: " + why,
                                         "control_vectors");
        };
        if (m.gguf == nullptr) {
            throw bad("not a GGUF file");
        }
        if (!tensors_within(m, size)) {
            throw bad("its tensors lie past its end");
        }
        const int64_t n = gguf_get_n_tensors(m.gguf);
        if (n == 0) {
            throw bad("it holds no direction tensors");
        }
        for (int64_t i = 0; i < n; ++i) {
            const std::string name  = gguf_get_tensor_name(m.gguf, i);
            const std::string head  = "direction.";
            long              layer = -1;
            if (name.compare(0, head.size(), head) == 0 && name.size() > head.size() &&
                name.size() - head.size() <= 6 &&
                std::all_of(name.begin() + static_cast<std::ptrdiff_t>(head.size()), name.end(),
                            [](char c) { return c >= '0' && c <= '9'; })) {
                layer = std::stol(name.substr(head.size()));
            }
            if (layer < 1 || layer > n_layer) {
                throw bad("a tensor '" + name + "' that is not direction.<layer> for a layer 1.." +
                          std::to_string(n_layer));
            }
            const ggml_tensor * t = ggml_get_tensor(m.ggml, name.c_str());
            if (t == nullptr || t->type != GGML_TYPE_F32 || ggml_n_dims(t) != 1 || t->ne[0] != n_embd) {
                throw bad("its tensor '" + name + "' is not " + std::to_string(n_embd) + " F32 values");
            }
        }
        infos.push_back({ strength, path });
    }
    control_vector out;
    if (infos.empty()) {
        return out;
    }
    common_control_vector_data d;
    {
        log_capture capture;
        d = common_control_vector_load(infos);
        if (d.n_embd != n_embd) {
            const auto why = capture.problems();
            throw invalid_request_error("cannot load the control vectors" + (why.empty() ? "" : ": " + why),
                                        "control_vectors");
        }
    }
    out.n_embd = d.n_embd;
    out.data   = std::move(d.data);
    out.data.resize(static_cast<size_t>(n_embd) * n_layer, 0.0f);
    return out;
}

void register_adapter(py::module_ & m) {
    py::class_<LoraAdapter, std::shared_ptr<LoraAdapter>> cls(m, "LoraAdapter", R"doc(
A LoRA adapter loaded for one model: LoraAdapter(model, path).

Requests and contexts apply it with a scale ([(adapter, scale), ...]: Engine.submit(lora=...),
Context.set_lora). An aLoRA (an activated LoRA, whose file names invocation tokens) switches on at
the last occurrence of those tokens in a prompt. FileNotFoundError for a missing file, ModelLoadError
for a file that is not a LoRA adapter of this model (another architecture, tensors the model lacks
or of other shapes, a file cut short). The adapter keeps its model alive; it is freed when nothing
uses it any more.
)doc");
    cls.def(py::init([](Model & model, const std::string & path) {
                auto                   use = model.acquire();  // LlamaError when the model is closed
                py::gil_scoped_release nogil;
                return std::make_shared<LoraAdapter>(model, path);
            }),
            py::arg("model"), py::arg("path"));
    cls.def_property_readonly("path", &LoraAdapter::path, "The file it was loaded from.");
    cls.def_property_readonly("is_alora", &LoraAdapter::is_alora, "Whether it is an activated LoRA (aLoRA).");
    cls.def_property_readonly("invocation_tokens", &LoraAdapter::invocation_tokens,
                              "An aLoRA's invocation tokens (empty for a LoRA).");
    cls.def_property_readonly("meta", &LoraAdapter::meta, "The file's metadata (GGUF keys, arrays left out).");
    cls.def("__repr__", [](const LoraAdapter & self) {
        return std::string(self.is_alora() ? "<LoraAdapter aLoRA " : "<LoraAdapter ") + self.path() + ">";
    });

    m.def(
        "load_control_vectors",
        [](Model & model, const std::vector<std::pair<std::string, float>> & files) {
            auto           use = model.acquire();
            control_vector cv;
            {
                py::gil_scoped_release nogil;
                cv = control_vector_load(use.model, files);
            }
            const auto         n_embd  = static_cast<py::ssize_t>(cv.n_embd);
            const auto         n_layer = n_embd == 0 ? 0 : static_cast<py::ssize_t>(cv.data.size()) / n_embd;
            py::array_t<float> out({ n_layer, n_embd });
            if (!cv.data.empty()) {
                std::memcpy(out.mutable_data(), cv.data.data(), cv.data.size() * sizeof(float));
            }
            return out;
        },
        py::arg("model"), py::arg("files"),
        "Control vectors from llama.cpp's cvector-generator files [(path, strength), ...], each scaled by its\n"
        "strength and summed, as llama.cpp loads them: a float32 array of n_layer rows (layers 1 to n_layer) of\n"
        "n_embd (for Context.set_control_vector). FileNotFoundError for a missing file; InvalidRequestError for a\n"
        "file that is not a control vector of this model.");
}

}  // namespace pyllama
