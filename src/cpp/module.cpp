// pyllama._core: the extension module. One register_* function per concept.

#include "pyllama.h"

#include <cstring>

PYBIND11_MODULE(_core, m) {
    m.doc() = "pyllama's native core: llama.cpp compiled in, wrapped as RAII objects.";

    static py::exception<pyllama::llama_error> llama_error_type(m, "LlamaError", PyExc_RuntimeError);
    llama_error_type.doc() = "An error reported by llama.cpp or the engine, with its reason.";

    // The hierarchy of pyllama.errors (see there). The caller's mistakes are ValueErrors as well.
    const auto make_type = [&m](const char * name, py::handle bases, const char * doc, bool has_param) {
        py::dict attrs;
        if (has_param) {
            attrs["param"] = py::none();
        }
        PyObject * t =
            PyErr_NewExceptionWithDoc((std::string("pyllama.") + name).c_str(), doc, bases.ptr(), attrs.ptr());
        if (t == nullptr) {
            throw py::error_already_set();
        }
        m.add_object(name, py::handle(t));  // the module takes a reference; ours is never released
        return t;
    };
    static PyObject * model_load_type =
        make_type("ModelLoadError", llama_error_type,
                  "The model file cannot be loaded (not GGUF, invalid metadata, ...).", false);
    static PyObject * cancelled_type = make_type(
        "CancelledError", llama_error_type,
        "The work was stopped before it finished: the engine or Llama was closed, or a load cancelled.", false);
    static PyObject * invalid_type = make_type(
        "InvalidRequestError", py::make_tuple(llama_error_type, py::handle(PyExc_ValueError)).release(),
        "The caller's mistake: a request or argument that cannot be honoured. `param` names the parameter at fault "
        "(OpenAI's path, e.g. 'messages[2].role'), or is None.",
        true);
    static PyObject * context_length_type =
        make_type("ContextLengthError", py::handle(invalid_type),
                  "The prompt (with max_tokens) does not fit the context or the sequence.", false);
    static PyObject * template_type =
        make_type("TemplateError", py::handle(invalid_type),
                  "A chat template was refused, or refused to render these messages.", false);
    static PyObject * grammar_type =
        make_type("GrammarError", py::handle(invalid_type), "A grammar or JSON schema that does not compile.", false);
    make_type("RequestTooComplexError", py::handle(invalid_type),
              "Preparing a request (its template, schemas, grammar, sampler) took longer than the time limit a "
              "server sets (prepare_timeout).",
              false);

    // One translator for the glue's exceptions. Messages often quote llama.cpp's log or the input
    // (a state's bytes, a file's metadata), which need not be UTF-8: decode them leniently, so that
    // the exception is the intended one and not a UnicodeDecodeError.
    py::register_exception_translator([](std::exception_ptr p) {
        const auto raise = [](PyObject * type, const char * what, const std::string * param = nullptr) {
            PyObject * msg = PyUnicode_DecodeUTF8(what, static_cast<Py_ssize_t>(std::strlen(what)), "replace");
            if (param == nullptr) {
                PyErr_SetObject(type, msg);
                Py_XDECREF(msg);
                return;
            }
            PyObject * exc = PyObject_CallOneArg(type, msg);
            Py_XDECREF(msg);
            if (exc == nullptr) {
                return;  // the call's own error stands
            }
            PyObject * value =
                param->empty() ? Py_NewRef(Py_None)
                               : PyUnicode_DecodeUTF8(param->data(), static_cast<Py_ssize_t>(param->size()), "replace");
            PyObject_SetAttrString(exc, "param", value);
            Py_XDECREF(value);
            PyErr_SetObject(type, exc);
            Py_DECREF(exc);
        };
        try {
            if (p) {
                std::rethrow_exception(p);
            }
        } catch (const pyllama::model_load_error & e) {
            raise(model_load_type, e.what());
        } catch (const pyllama::cancelled_error & e) {
            raise(cancelled_type, e.what());
        } catch (const pyllama::llama_error & e) {
            raise(llama_error_type.ptr(), e.what());
        } catch (const pyllama::file_not_found_error & e) {
            raise(PyExc_FileNotFoundError, e.what());
        } catch (const pyllama::context_length_error & e) {
            raise(context_length_type, e.what(), &e.param);
        } catch (const pyllama::template_error & e) {
            raise(template_type, e.what(), &e.param);
        } catch (const pyllama::grammar_error & e) {
            raise(grammar_type, e.what(), &e.param);
        } catch (const pyllama::invalid_request_error & e) {
            raise(invalid_type, e.what(), &e.param);
        } catch (const std::invalid_argument & e) {
            const std::string none;
            raise(invalid_type, e.what(), &none);
        } catch (const std::out_of_range & e) {
            raise(PyExc_IndexError, e.what());
        }
    });

    pyllama::register_backend(m);
    pyllama::register_model(m);
    pyllama::register_adapter(m);
    pyllama::register_rpc(m);
    pyllama::register_context(m);
    pyllama::register_sampler(m);
    pyllama::register_chat(m);
    pyllama::register_grammar(m);
    pyllama::register_engine(m);
    pyllama::register_projector(m);
}
