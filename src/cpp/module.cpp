// pyllama._core: the extension module. One register_* function per concept.

#include "pyllama.h"

#include <cstring>

PYBIND11_MODULE(_core, m) {
    m.doc() = "pyllama's native core: llama.cpp compiled in, wrapped as RAII objects.";

    static py::exception<pyllama::llama_error> llama_error_type(m, "LlamaError", PyExc_RuntimeError);
    llama_error_type.doc() = "An error reported by llama.cpp, with its reason.";
    // One translator for the glue's exceptions. Messages often quote llama.cpp's log or the input
    // (a state's bytes, a file's metadata), which need not be UTF-8: decode them leniently, so that
    // the exception is the intended one and not a UnicodeDecodeError.
    py::register_exception_translator([](std::exception_ptr p) {
        const auto raise = [](PyObject * type, const char * what) {
            PyObject * msg = PyUnicode_DecodeUTF8(what, static_cast<Py_ssize_t>(std::strlen(what)), "replace");
            PyErr_SetObject(type, msg);
            Py_XDECREF(msg);
        };
        try {
            if (p) {
                std::rethrow_exception(p);
            }
        } catch (const pyllama::llama_error & e) {
            raise(llama_error_type.ptr(), e.what());
        } catch (const pyllama::file_not_found_error & e) {
            raise(PyExc_FileNotFoundError, e.what());
        } catch (const std::invalid_argument & e) {
            raise(PyExc_ValueError, e.what());
        } catch (const std::out_of_range & e) {
            raise(PyExc_IndexError, e.what());
        }
    });

    pyllama::register_backend(m);
    pyllama::register_model(m);
    pyllama::register_context(m);
    pyllama::register_sampler(m);
    pyllama::register_chat(m);
    pyllama::register_grammar(m);
    pyllama::register_engine(m);
}
