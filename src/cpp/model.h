// Model: RAII owner of one llama_model, shared with the objects that use it.
#pragma once

#include "pyllama.h"

#include "llama.h"

#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <unordered_map>

namespace pyllama {

class Model {
  public:
    // A use of the model: holds a shared lock, so close() waits until every use has ended.
    struct use {
        std::shared_lock<std::shared_mutex> lock;
        llama_model *                       model;
        const llama_vocab *                 vocab;
    };

    Model(const std::string &              path,
          int                              n_gpu_layers,
          const std::string &              split_mode,
          int                              main_gpu,
          const std::vector<float> &       tensor_split,
          py::object                       use_mmap,
          bool                             use_mlock,
          bool                             vocab_only,
          bool                             check_tensors,
          const py::dict &                 kv_overrides,
          py::object                       progress_callback,
          bool                             repack      = true,
          const std::vector<std::string> & rpc_servers = {});
    ~Model();

    Model(const Model &)             = delete;
    Model & operator=(const Model &) = delete;

    // Takes the shared lock; throws llama_error if the model is closed. Call without the GIL only
    // when the caller will not need the GIL until the use ends.
    use acquire() const;

    // The llama_model, kept alive by the returned pointer even after close() (for Context).
    std::shared_ptr<llama_model> shared() const;

    void                close();
    bool                closed() const;
    const std::string & path() const { return path_; }

    // Vocabulary checks shared by every file that takes token ids from Python.
    // InvalidRequestError naming `param` (when given) for an id outside the vocabulary.
    static void check_token(const llama_vocab * vocab, llama_token token, const char * param = "");

  private:
    std::shared_ptr<llama_model>                         model_;
    std::string                                          path_;
    mutable std::shared_mutex                            mtx_;
    mutable std::once_flag                               piece_index_once_;
    mutable std::unordered_map<std::string, llama_token> piece_index_;

    friend void register_model(py::module_ & m);
};

}  // namespace pyllama
