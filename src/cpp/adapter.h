// LoraAdapter: RAII over llama_adapter_lora (a LoRA or aLoRA file loaded for one model), the adapter
// sets that requests and contexts apply, and control vectors read from their GGUF files.
#pragma once

#include "model.h"
#include "pyllama.h"

#include "llama.h"

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace pyllama {

class LoraAdapter {
  public:
    // Loads `path` for `model` (call without the GIL): FileNotFoundError when it does not exist,
    // ModelLoadError when it is not a LoRA adapter of this model (another architecture, tensors the
    // model lacks or of other shapes, a file cut short), with llama.cpp's reason.
    LoraAdapter(Model & model, const std::string & path);
    ~LoraAdapter();

    LoraAdapter(const LoraAdapter &)             = delete;
    LoraAdapter & operator=(const LoraAdapter &) = delete;

    llama_adapter_lora *               get() const { return adapter_; }
    const std::string &                path() const { return path_; }
    const llama_model *                model() const { return model_.get(); }
    // Unique among the adapters this process loads (never reused, unlike an address).
    uint64_t                           serial() const { return serial_; }
    // aLoRA: the tokens whose last occurrence in a prompt switches the adapter on (empty for a LoRA).
    const std::vector<llama_token> &   invocation_tokens() const { return invocation_; }
    bool                               is_alora() const { return !invocation_.empty(); }
    std::map<std::string, std::string> meta() const;

  private:
    std::shared_ptr<llama_model> model_;  // llama.cpp frees a model's adapters with it: it outlives them
    llama_adapter_lora *         adapter_ = nullptr;
    std::string                  path_;
    uint64_t                     serial_ = 0;
    std::vector<llama_token>     invocation_;
};

struct lora_entry {
    std::shared_ptr<LoraAdapter> adapter;
    float                        scale = 1.0f;
};

// The adapters a computation runs with. Canonical (lora_canonical): no zero scales, ordered by serial,
// so that two sets that compute the same are equal.
using lora_set = std::vector<lora_entry>;

// Checks each adapter belongs to `model` (InvalidRequestError naming `param` otherwise) and that the
// scales are finite; drops zero scales, sums an adapter given twice, orders by serial.
lora_set lora_canonical(const lora_set & set, const llama_model * model, const char * param);
bool     lora_equal(const lora_set & a, const lora_set & b);
// Applies the set to a context (llama_set_adapters_lora; the context's lock held).
void     lora_apply(llama_context * ctx, const lora_set & set);

// llama-server's aLoRA rule, for a canonical set and a prompt: when every adapter of the set is an
// aLoRA there must be one (InvalidRequestError otherwise), and it applies from the last occurrence of
// its invocation tokens in the prompt; the tokens before it are computed without it. Returns that
// index (0: the whole set applies from the start); when the prompt lacks the invocation, the set is
// emptied (the adapter stays off), as llama-server does.
size_t lora_alora_start(lora_set & set, const std::vector<llama_token> & prompt);

// Control vectors (llama.cpp's cvector-generator format: F32 tensors direction.<layer>, layers from
// 1), each scaled by its strength and summed; n_embd x n_layer floats from layer 1. Each file is
// checked against `model` before llama.cpp reads it: FileNotFoundError, or InvalidRequestError
// (param "control_vectors") for a file that is not one of this model's control vectors.
struct control_vector {
    int32_t            n_embd = 0;
    std::vector<float> data;
};

control_vector control_vector_load(const llama_model * model, const std::vector<std::pair<std::string, float>> & files);

}  // namespace pyllama

// A lora_entry is a (LoraAdapter, scale) pair in Python.
namespace pybind11::detail {
template <>
struct type_caster<pyllama::lora_entry> {
    PYBIND11_TYPE_CASTER(pyllama::lora_entry, const_name("tuple[LoraAdapter, float]"));

    bool load(handle src, bool convert) {
        if (!isinstance<sequence>(src) || isinstance<str>(src)) {
            return false;
        }
        auto pair = reinterpret_borrow<sequence>(src);
        if (pair.size() != 2) {
            return false;
        }
        make_caster<std::shared_ptr<pyllama::LoraAdapter>> adapter;
        make_caster<float>                                 scale;
        if (!adapter.load(pair[0], convert) || !scale.load(pair[1], convert)) {
            return false;
        }
        value.adapter = cast_op<std::shared_ptr<pyllama::LoraAdapter>>(adapter);
        value.scale   = cast_op<float>(scale);
        return value.adapter != nullptr;
    }

    static handle cast(const pyllama::lora_entry & e, return_value_policy, handle) {
        return pybind11::make_tuple(e.adapter, e.scale).release();
    }
};
}  // namespace pybind11::detail
