// The Python face of the generation core (scheduler.h): Engine, EngineRequest and Notifier. This
// file converts arguments, releases the GIL and raises a pending Ctrl-C; the logic is the core's.

#include "model.h"
#include "pyllama.h"

#include "scheduler.h"

#include <exception>
#include <memory>
#include <string>
#include <vector>

namespace pyllama {

namespace {

// Runs f without the GIL. A failure caused by Ctrl-C (an inline step on the main thread) comes back
// as the KeyboardInterrupt Python has pending, not as the decode's error.
template <class F>
auto without_gil(F && f) -> decltype(f()) {
    std::exception_ptr err;
    decltype(f())      out{};
    {
        py::gil_scoped_release nogil;
        try {
            out = f();
        } catch (...) {
            err = std::current_exception();
        }
    }
    if (err) {
        if (PyErr_CheckSignals() != 0) {
            throw py::error_already_set();
        }
        std::rethrow_exception(err);
    }
    return out;
}

}  // namespace

void register_engine(py::module_ & m) {
    py::class_<Scheduler, std::shared_ptr<Scheduler>> eng(m, "Engine", R"doc(
The generation core over one Context: Engine(ctx, n_parallel=1, *, threaded=None).

Every generation goes through it, for one sequence or many. Up to n_parallel requests decode
together, a sequence each (the Context needs n_seq_max >= n_parallel), one llama_decode per step:
the next token of every running request, then prompt chunks of the waiting ones, up to n_batch.
Requests beyond n_parallel wait, FIFO. A request takes the lowest free sequence, unless another free
one holds at least 64 more of its prompt's tokens, and evaluates only what the sequence does not hold.

threaded (default: n_parallel > 1) runs the steps on a worker thread; otherwise they run inline, on
the thread that waits for a request's text (Ctrl-C then interrupts a long prompt on the main thread).
)doc");
    eng.def(py::init([](Context & ctx, int32_t n_parallel, const py::object & threaded) {
                const bool             t = threaded.is_none() ? n_parallel > 1 : threaded.cast<bool>();
                py::gil_scoped_release nogil;
                return std::make_shared<Scheduler>(ctx, n_parallel, t);
            }),
            py::arg("ctx"), py::arg("n_parallel") = 1, py::kw_only(), py::arg("threaded") = py::none(),
            py::keep_alive<1, 2>());
    eng.def(
        "submit",
        [](Scheduler & e, const py::object & prompt_in, std::shared_ptr<Sampler> sampler, int32_t max_tokens,
           std::vector<std::string> stop, int32_t logprobs, bool ignore_eos, std::shared_ptr<Notifier> notifier,
           std::shared_ptr<Projector> projector, bool speculative, std::vector<llama_token> prediction,
           const lora_set & lora) {
            if (sampler->model() != e.context().model()) {
                throw std::invalid_argument("the Sampler was built for another model than the Context's");
            }
            if (projector && projector->model() != e.context().model()) {
                throw std::invalid_argument("the Projector is for another model than the Context's");
            }
            // token ids, or the chunks of Projector.tokenize (text and media)
            std::vector<llama_token> prompt;
            std::vector<media_span>  media;
            const bool chunks = py::isinstance<py::sequence>(prompt_in) && !py::isinstance<py::str>(prompt_in) &&
                                py::len(prompt_in) > 0 && py::isinstance<Chunk>(prompt_in[py::int_(0)]);
            if (chunks) {
                prompt_from_chunks(prompt_in.cast<std::vector<Chunk>>(), projector, prompt, media);
            } else {
                prompt = prompt_in.cast<std::vector<llama_token>>();
            }
            const llama_vocab * vocab = llama_model_get_vocab(e.context().model());
            for (llama_token t : prompt) {
                if (!(chunks && is_media_token(t))) {
                    Model::check_token(vocab, t, "prompt");
                }
            }
            for (llama_token t : prediction) {
                Model::check_token(vocab, t, "prediction");
            }
            generation_options opt;
            opt.lora        = lora_canonical(lora, e.context().model(), "lora");
            opt.speculative = speculative;
            opt.prediction  = std::move(prediction);
            opt.max_tokens  = max_tokens;
            opt.stop        = std::move(stop);
            opt.logprobs    = logprobs;
            opt.ignore_eos  = ignore_eos;
            py::gil_scoped_release nogil;
            return e.submit(std::move(sampler), std::move(prompt), std::move(opt), std::move(notifier),
                            std::move(media));
        },
        py::arg("prompt"), py::arg("sampler"), py::kw_only(), py::arg("max_tokens") = -1,
        py::arg("stop") = std::vector<std::string>(), py::arg("logprobs") = -1, py::arg("ignore_eos") = false,
        py::arg("notifier") = py::none(), py::arg("projector") = py::none(), py::arg("speculative") = true,
        py::arg("prediction") = std::vector<llama_token>(), py::arg("lora") = lora_set(),
        "Queue a generation from prompt tokens, or from the chunks of projector.tokenize() (text and media:\n"
        "each media chunk is encoded and decoded in a step of its own; n_prompt counts its tokens, and a\n"
        "prefix reused from a sequence is not encoded again); returns an EngineRequest: iterate it for text pieces, or "
        "call\n"
        "run(). max_tokens < 0 runs until the sequence is full; stop strings end it and are not part of the\n"
        "text; logprobs >= 0 records each token's log-probability and that many alternatives. With a Notifier\n"
        "(threaded engines), its descriptor becomes readable whenever the request has new text or has ended.\n"
        "speculative=False: no drafts from the engine's speculator for this request. prediction: tokens the\n"
        "reply is expected to repeat (OpenAI's predicted outputs), drafted from where the reply stands in them.\n"
        "lora: [(LoraAdapter, scale), ...], the adapters it runs with (requests with other sets decode in\n"
        "batches of their own; a prefix is reused only where it was computed with the same adapters). An aLoRA\n"
        "switches on at the last occurrence of its invocation tokens in the prompt (it stays off without one).");
    eng.def(
        "set_speculative",
        [](Scheduler & e, const py::object & types_in, Context * draft, int32_t n_max, int32_t n_min, float p_min,
           int32_t ngram_size_n, int32_t ngram_size_m, int32_t ngram_min_hits) {
            if (types_in.is_none()) {
                py::gil_scoped_release nogil;
                e.set_speculator(nullptr);
                return;
            }
            speculative_params p;
            if (py::isinstance<py::str>(types_in)) {
                const std::string all  = types_in.cast<std::string>();
                size_t            from = 0;
                while (from <= all.size()) {
                    const size_t comma = std::min(all.find(',', from), all.size());
                    std::string  name  = all.substr(from, comma - from);
                    name.erase(0, name.find_first_not_of(" \t"));
                    name.erase(name.find_last_not_of(" \t") + 1);
                    if (!name.empty()) {
                        p.types.push_back(name);
                    }
                    from = comma + 1;
                }
            } else {
                p.types = types_in.cast<std::vector<std::string>>();
            }
            for (const auto & [name, v] : { std::pair<const char *, int32_t>{ "n_max", n_max },
                                            { "ngram_size_n", ngram_size_n },
                                            { "ngram_size_m", ngram_size_m },
                                            { "ngram_min_hits", ngram_min_hits } }) {
                if (v == 0 || v > 1024) {
                    throw invalid_request_error(std::string("speculative: ") + name + " must be 1 to 1024",
                                                "speculative");
                }
            }
            if (n_min > 1024 || (n_max > 0 && n_min > n_max)) {
                throw invalid_request_error("speculative: n_min must be at most n_max", "speculative");
            }
            if (!(p_min <= 1.0f)) {
                throw invalid_request_error("speculative: p_min must be at most 1", "speculative");
            }
            p.n_max          = n_max;
            p.n_min          = n_min;
            p.p_min          = p_min;
            p.ngram_size_n   = ngram_size_n;
            p.ngram_size_m   = ngram_size_m;
            p.ngram_min_hits = ngram_min_hits;
            if (draft != nullptr && draft == &e.context()) {
                throw invalid_request_error("the draft model needs a Context of its own", "draft_model");
            }
            py::gil_scoped_release nogil;
            e.set_speculator(
                std::make_shared<Speculator>(e.context(), draft, p, static_cast<uint32_t>(e.n_parallel())));
        },
        py::arg("types"), py::kw_only(), py::arg("draft") = nullptr, py::arg("n_max") = -1, py::arg("n_min") = -1,
        py::arg("p_min") = -1.0f, py::arg("ngram_size_n") = -1, py::arg("ngram_size_m") = -1,
        py::arg("ngram_min_hits") = -1, py::keep_alive<1, 3>(),
        "Speculative decoding for every request (llama.cpp's common_speculative): types are llama.cpp's names,\n"
        "a list or comma-separated ('ngram-simple', 'ngram-map-k', 'ngram-map-k4v', 'ngram-mod', 'ngram-cache',\n"
        "'draft-simple' with draft=, a Context over the draft model with n_seq_max == n_parallel); the first that\n"
        "drafts wins. n_max/n_min/p_min and the n-gram sizes as llama.cpp's --spec-* options (< 0: its defaults).\n"
        "None turns it off. Each draft is verified with the request's own sampler: the output is what decoding\n"
        "without drafts gives.");
    eng.def_property_readonly(
        "speculative",
        [](Scheduler & e) -> py::object {
            std::shared_ptr<Speculator> s;
            {
                py::gil_scoped_release nogil;
                s = e.speculator();
            }
            if (!s) {
                return py::none();
            }
            py::dict d;
            d["types"]       = s->types();
            d["n_max"]       = s->n_max();
            d["draft_model"] = s->uses_draft_model();
            return d;
        },
        "The speculative decoding in use: {'types', 'n_max', 'draft_model'}, or None.");
    eng.def(
        "close",
        [](Scheduler & e) {
            py::gil_scoped_release nogil;
            e.stop();
        },
        "Stop: requests still running end with an error.");
    eng.def(
        "tokens",
        [](Scheduler & e, int32_t seq) {
            py::gil_scoped_release nogil;
            return e.tokens(seq);
        },
        py::arg("seq") = 0, "The tokens a sequence's KV memory holds, in order.");
    eng.def(
        "busy",
        [](Scheduler & e, int32_t seq) {
            py::gil_scoped_release nogil;
            return e.busy(seq);
        },
        py::arg("seq"), "A request is using the sequence now.");
    eng.def(
        "reset",
        [](Scheduler & e, int32_t seq) {
            py::gil_scoped_release nogil;
            e.reset(seq);
        },
        py::arg("seq") = -1, "Forget what a sequence holds (seq < 0: every sequence). LlamaError while it is in use.");
    eng.def(
        "adopt",
        [](Scheduler & e, std::vector<llama_token> tokens, int32_t seq) {
            const llama_vocab * vocab = llama_model_get_vocab(e.context().model());
            for (llama_token t : tokens) {
                if (!is_media_token(t)) {  // a sequence that holds media
                    Model::check_token(vocab, t);
                }
            }
            py::gil_scoped_release nogil;
            e.adopt(seq, std::move(tokens));
        },
        py::arg("tokens"), py::arg("seq") = 0,
        "Declare which tokens a sequence holds, after its state was loaded with Context.seq_state_set: the\n"
        "next request then reuses them. Their number must match what the sequence holds (else it is cleared).");
    eng.def(
        "snapshot",
        [](Scheduler & e, int32_t seq) -> py::object {
            std::vector<llama_token> tokens;
            std::vector<uint8_t>     state;
            lora_key                 lora;
            bool                     ok = false;
            {
                py::gil_scoped_release nogil;
                ok = e.snapshot(seq, tokens, state, lora);
            }
            if (!ok) {
                return py::none();
            }
            return py::make_tuple(tokens, py::bytes(reinterpret_cast<const char *>(state.data()), state.size()),
                                  py::make_tuple(py::cast(lora.set), lora.set.empty() ? 0 : lora.from));
        },
        py::arg("seq") = 0,
        "(tokens, state bytes, (lora, lora_from)) of a sequence, taken between steps; None while a request uses it.\n"
        "lora: the [(LoraAdapter, scale), ...] its cells were computed with, from token lora_from on (an aLoRA's\n"
        "invocation; the tokens before it without adapters).");
    eng.def(
        "restore",
        [](Scheduler & e, std::vector<llama_token> tokens, const py::bytes & state, int32_t seq, const lora_set & lora,
           size_t lora_from) {
            const std::string    data = state;
            std::vector<uint8_t> bytes(data.begin(), data.end());
            const llama_vocab *  vocab = llama_model_get_vocab(e.context().model());
            for (llama_token t : tokens) {
                if (!is_media_token(t)) {  // a sequence that holds media
                    Model::check_token(vocab, t);
                }
            }
            lora_key key;
            key.set  = lora_canonical(lora, e.context().model(), "lora");
            key.from = lora_from;
            py::gil_scoped_release nogil;
            e.restore(seq, tokens, bytes, key);
        },
        py::arg("tokens"), py::arg("state"), py::arg("seq") = 0, py::kw_only(), py::arg("lora") = lora_set(),
        py::arg("lora_from") = 0,
        "Load a snapshot() into a sequence (LlamaError while a request uses it, or when the state does not fit);\n"
        "lora and lora_from say which adapters its cells were computed with (snapshot()'s third item).");
    eng.def(
        "set_host_cache",
        [](Scheduler & e, int64_t budget) {
            if (budget < 0) {
                throw std::invalid_argument("the host cache budget must be >= 0 bytes");
            }
            py::gil_scoped_release nogil;
            e.set_host_cache(static_cast<size_t>(budget));
        },
        py::arg("budget"),
        "Keep the states of prefixes the sequences give up in RAM, within budget bytes (llama-server's\n"
        "--cache-ram), and load them back when a prompt starts with one; 0 turns it off and drops them.");
    eng.def(
        "host_cache",
        [](Scheduler & e) {
            Scheduler::host_cache_stats st;
            {
                py::gil_scoped_release nogil;
                st = e.host_cache();
            }
            py::dict d;
            d["budget"]   = st.budget;
            d["bytes"]    = st.bytes;
            d["entries"]  = st.entries;
            d["n_saved"]  = st.n_saved;
            d["n_loaded"] = st.n_loaded;
            return d;
        },
        "The host cache: budget and bytes held, entries, states saved and loaded so far.");
    eng.def(
        "clear_host_cache",
        [](Scheduler & e) {
            py::gil_scoped_release nogil;
            e.clear_host_cache();
        },
        "Drop every state the host cache holds.");
    eng.def_property_readonly("n_parallel", &Scheduler::n_parallel);
    eng.def_property_readonly("threaded", &Scheduler::threaded, "Steps run on a worker thread (else inline).");
    eng.def_property_readonly("n_ctx_seq", &Scheduler::n_ctx_seq, "The tokens one sequence holds.");
    eng.def_property_readonly(
        "n_active",
        [](Scheduler & e) {
            py::gil_scoped_release nogil;
            return e.n_active();
        },
        "Requests running or queued.");

    py::class_<Request, std::shared_ptr<Request>> r(m, "EngineRequest",
                                                    "One generation of an Engine; iterate it for text pieces.");
    r.def("__iter__", [](std::shared_ptr<Request> self) { return self; });
    r.def("__next__", [](Request & self) {
        const std::string piece = without_gil([&] { return self.next(); });
        if (piece.empty()) {
            throw py::stop_iteration();
        }
        return utf8_lenient(piece);
    });
    r.def(
        "run", [](Request & self) { return utf8_lenient(without_gil([&] { return self.run(); })); },
        "Run to the end; returns the text not taken yet.");
    r.def(
        "next_nowait",
        [](Request & self) -> py::object {
            std::string piece;
            if (!self.next_nowait(piece)) {
                return py::none();
            }
            return utf8_lenient(piece);
        },
        "The next piece without waiting (or stepping): None while none is ready, '' at the end.");
    r.def_property_readonly("ready", &Request::ready, "A piece is waiting, or the request has ended.");
    r.def("cancel", &Request::cancel, "Stop at the next step (from any thread).");
    r.def_property_readonly(
        "finish_reason",
        [](const Request & self) -> py::object {
            const std::string f = self.finish_reason();
            return f.empty() ? py::object(py::none()) : py::object(py::str(f));
        },
        "None while running; then 'stop' (end of generation or a stop string), 'length' or 'cancelled'.");
    r.def_property_readonly(
        "stop_word",
        [](const Request & self) -> py::object {
            const std::string w = self.stop_word();
            return w.empty() ? py::object(py::none()) : py::object(utf8_lenient(w));
        },
        "The stop string that ended the generation (llama-server's stopping_word), else None.");
    r.def_property_readonly("n_prompt", &Request::n_prompt);
    r.def_property_readonly("n_reused", &Request::n_reused, "Prompt tokens taken from the cache instead of evaluated.");
    r.def_property_readonly("n_drafted", &Request::n_drafted,
                            "Draft tokens the model verified (speculative decoding).");
    r.def_property_readonly("n_accepted", &Request::n_accepted, "Draft tokens the model accepted.");
    r.def_property_readonly(
        "n_completion", [](const Request & self) { return self.completion().size(); },
        "Tokens generated (the end-of-generation token is not counted).");
    r.def_property_readonly("completion_tokens", [](const Request & self) { return self.completion(); });
    r.def_property_readonly(
        "logprobs",
        [](const Request & self) {
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

    py::class_<Notifier, std::shared_ptr<Notifier>> n(m, "Notifier", R"doc(
A wake-up for an event loop: Engine.submit(..., notifier=n) makes n.fileno() readable whenever
that request has new text or has ended. Watch it with loop.add_reader and call drain() when woken.
Linux and macOS (an eventfd or a pipe); the descriptor closes when the Notifier and every request
submitted with it are gone.
)doc");
    n.def(py::init<>());
    n.def("fileno", &Notifier::fileno);
    n.def("drain", &Notifier::drain, "Empty the descriptor.");
}

}  // namespace pyllama
