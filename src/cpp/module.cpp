// pyllama._core: the extension module. One register_* function per concept.

#include "pyllama.h"

PYBIND11_MODULE(_core, m) {
    m.doc() = "pyllama's native core: llama.cpp compiled in, wrapped as RAII objects.";

    static py::exception<pyllama::llama_error> llama_error_type(m, "LlamaError", PyExc_RuntimeError);
    llama_error_type.doc() = "An error reported by llama.cpp, with its reason.";
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) {
                std::rethrow_exception(p);
            }
        } catch (const pyllama::llama_error & e) {
            py::set_error(llama_error_type, e.what());
        } catch (const pyllama::file_not_found_error & e) {
            py::set_error(PyExc_FileNotFoundError, e.what());
        }
    });

    pyllama::register_backend(m);
    pyllama::register_model(m);
    pyllama::register_context(m);
    pyllama::register_sampler(m);
}
