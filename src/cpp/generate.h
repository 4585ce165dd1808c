// What the token loop (generate.cpp) and the batched engine (engine.cpp) share: the options of a
// generation, the text that grows token by token (UTF-8-safe release, stop strings held back) and
// logprobs from the raw logits.
#pragma once

#include "pyllama.h"

#include "llama.h"

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace pyllama {

struct generation_options {
    int32_t                  max_tokens = -1;  // < 0: until the context is full
    std::vector<std::string> stop;
    int32_t                  logprobs   = -1;  // < 0: none; else the number of alternatives per token
    bool                     ignore_eos = false;
};

struct token_logprob {
    llama_token                                token;
    std::string                                piece;
    float                                      logprob;
    std::vector<std::pair<llama_token, float>> top;
};

// How many bytes at the end of `s` (from `from`) are an incomplete but possibly valid UTF-8
// character, which the next token may complete.
size_t incomplete_utf8_tail(const std::string & s, size_t from);

// Decodes as UTF-8, replacing what is not (the GIL must be held).
py::str utf8_lenient(const std::string & s);

// OpenAI's logprob of `tok`: the log-softmax of the raw logits of output row j, before any sampler,
// with the n_top best alternatives.
token_logprob logprob_of(llama_context * ctx, int32_t j, const llama_vocab * vocab, llama_token tok, int32_t n_top);

// The text of a generation: pieces are appended as tokens come; stop strings cut it; release()
// gives what can go out (complete UTF-8, and not the start of a stop string).
class generated_text {
  public:
    explicit generated_text(const std::vector<std::string> & stop);

    // Appends the piece of `tok` (special tokens as text when `special`); returns its bytes.
    std::string append(const llama_vocab * vocab, llama_token tok, bool special);

    // True when a stop string appeared: the text is cut before it.
    bool check_stop();

    std::string release(bool all);

  private:
    const std::vector<std::string> & stop_;
    size_t                           max_stop_ = 0;
    std::string                      text_;
    size_t                           released_ = 0;
    size_t                           scanned_  = 0;
};

// The Python face of a generation (the token loop's Generation and the engine's EngineRequest):
// iteration over text pieces, run(), cancel(), the finish reason, counts and logprobs.
template <class G>
void bind_generation(py::class_<G, std::shared_ptr<G>> & g) {
    g.def("__iter__", [](std::shared_ptr<G> self) { return self; });
    g.def("__next__", [](G & self) {
        std::string piece;
        {
            py::gil_scoped_release nogil;
            piece = self.next();
        }
        if (piece.empty()) {
            throw py::stop_iteration();
        }
        return utf8_lenient(piece);
    });
    g.def(
        "run",
        [](G & self) {
            std::string text;
            {
                py::gil_scoped_release nogil;
                text = self.run();
            }
            return utf8_lenient(text);
        },
        "Run to the end; returns the remaining text.");
    g.def("cancel", &G::cancel, "Stop at the next token (from any thread).");
    g.def_property_readonly(
        "finish_reason",
        [](const G & self) -> py::object {
            const std::string f = self.finish_reason();
            return f.empty() ? py::object(py::none()) : py::object(py::str(f));
        },
        "None while running; then 'stop' (end of generation or a stop string), 'length' or 'cancelled'.");
    g.def_property_readonly("n_prompt", &G::n_prompt);
    g.def_property_readonly("n_reused", &G::n_reused, "Prompt tokens taken from the cache instead of evaluated.");
    g.def_property_readonly(
        "n_completion", [](const G & self) { return self.completion().size(); },
        "Tokens generated (the end-of-generation token is not counted).");
    g.def_property_readonly("completion_tokens", [](const G & self) { return self.completion(); });
    g.def_property_readonly(
        "logprobs",
        [](const G & self) {
            py::list out;
            for (const auto & lp : self.logprobs()) {
                py::list top;
                for (const auto & [t, v] : lp.top) {
                    top.append(py::make_tuple(t, v));
                }
                out.append(py::make_tuple(lp.token, py::bytes(lp.piece), lp.logprob, top));
            }
            return out;
        },
        "Per generated token: (token, piece bytes, logprob, [(token, logprob), ...]).");
}

}  // namespace pyllama
