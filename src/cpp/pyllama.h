// pyllama: shared declarations of the glue between Python and llama.cpp.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "nlohmann/json_fwd.hpp"

#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

struct llama_model;  // llama.h's

namespace pyllama {

// Exceptions thrown by the glue, one per Python type. They are translated once, in module.cpp:
//   llama_error            -> pyllama.LlamaError (a RuntimeError): the engine failed
//   model_load_error       -> pyllama.ModelLoadError: a model file that cannot be loaded
//   cancelled_error        -> pyllama.CancelledError: stopped (closed, or cancelled while loading)
//   invalid_request_error  -> pyllama.InvalidRequestError (also a ValueError), naming `param`
//   context_length_error   -> pyllama.ContextLengthError
//   template_error         -> pyllama.TemplateError
//   grammar_error          -> pyllama.GrammarError
//   std::invalid_argument  -> pyllama.InvalidRequestError without a param
//   file_not_found_error   -> FileNotFoundError, std::out_of_range -> IndexError
struct llama_error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct model_load_error : llama_error {
    using llama_error::llama_error;
};

struct cancelled_error : llama_error {
    using llama_error::llama_error;
};

struct invalid_request_error : std::invalid_argument {
    explicit invalid_request_error(const std::string & what, std::string param = {}) :
        std::invalid_argument(what), param(std::move(param)) {}

    std::string param;  // the request parameter at fault, or empty
};

struct context_length_error : invalid_request_error {
    using invalid_request_error::invalid_request_error;
};

struct template_error : invalid_request_error {
    using invalid_request_error::invalid_request_error;
};

struct grammar_error : invalid_request_error {
    using invalid_request_error::invalid_request_error;
};

struct file_not_found_error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// --- backend.cpp -------------------------------------------------------------------------------

// Initialises llama.cpp's backends and installs the log callback; safe to call many times.
void backend_ensure_init();

// Adds a log line to the captures active on this thread (called by the log callback).
void log_capture_add(int level, const std::string & line);

// Collects the log lines llama.cpp and ggml write on this thread while it lives, so that a failed
// call can say why it failed (many reasons exist only as log lines). Nests.
class log_capture {
  public:
    log_capture();
    ~log_capture();
    log_capture(const log_capture &)             = delete;
    log_capture & operator=(const log_capture &) = delete;

    // The captured lines at WARNING level and above, joined with "; " (or "" when there are none).
    std::string problems() const;

  private:
    std::vector<std::pair<int, std::string>> lines_;
    log_capture *                            outer_;
    friend void                              log_capture_add(int level, const std::string & line);
};

// ggml reports some failures by aborting the process (GGML_ABORT): an RPC worker that crashed or
// went away is one. While a ggml_abort_scope lives on a thread, such an abort throws ggml_abort_error
// on that thread instead, and the scope's model is marked failed: its later uses raise LlamaError, and
// freeing it (or its contexts and adapters) leaks the memory instead of asking the dead worker.
// Elsewhere the process aborts as llama.cpp would.
struct ggml_abort_error : llama_error {
    using llama_error::llama_error;
};

class ggml_abort_scope {
  public:
    explicit ggml_abort_scope(const llama_model * model);
    ~ggml_abort_scope();
    ggml_abort_scope(const ggml_abort_scope &)             = delete;
    ggml_abort_scope & operator=(const ggml_abort_scope &) = delete;

  private:
    const llama_model * outer_;
};

// Whether a ggml abort was turned into an exception while `model` was in use (and why).
bool model_failed(const llama_model * model, std::string * why = nullptr);

// --- keyword arguments -----------------------------------------------------------------------

// The keyword argument `name` of a call to `what` (a class), cast to T; `fallback` when it is absent
// or None; TypeError naming the keyword for a value of the wrong type. The one kwargs helper.
template <typename T>
T kwarg(const py::kwargs & kwargs, const char * what, const char * name, T fallback) {
    if (kwargs.contains(name) && !kwargs[name].is_none()) {
        try {
            return kwargs[name].cast<T>();
        } catch (const py::cast_error &) {
            throw py::type_error(std::string(what) + ": wrong type for " + name);
        }
    }
    return fallback;
}

// --- model.cpp ---------------------------------------------------------------------------------

// Decodes as UTF-8, replacing what is not (text from a model or the input; the GIL must be held).
py::str utf8_lenient(const std::string & s);

// --- chat.cpp ----------------------------------------------------------------------------------

// Raises ValueError when JSON from a request nests deeper than llama.cpp's recursive code can take.
void check_json_depth(const nlohmann::ordered_json & j, const char * what);

// Raises InvalidRequestError (param `what`) for a JSON schema larger than llama.cpp's converter can
// take in reasonable time: too many nodes, properties of one object or enum values, or a `pattern`
// regex that nests too deeply or is too long. The limits are in chat.cpp and docs/errors.md.
void check_schema_bounds(const nlohmann::ordered_json & schema, const char * what);

// --- grammar.cpp -------------------------------------------------------------------------------

// Raises GrammarError (param `param`) for GBNF text over the size, nesting or rule-count limit, before
// llama.cpp's recursive parser sees it.
void check_grammar_bounds(const std::string & gbnf, const char * param);

// --- registration, one per concept ---------------------------------------------------------------

void register_backend(py::module_ & m);
void register_model(py::module_ & m);
void register_rpc(py::module_ & m);
void register_adapter(py::module_ & m);
void register_context(py::module_ & m);
void register_sampler(py::module_ & m);
void register_chat(py::module_ & m);
void register_grammar(py::module_ & m);
void register_engine(py::module_ & m);
void register_projector(py::module_ & m);

}  // namespace pyllama
