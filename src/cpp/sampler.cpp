// Sampler: llama.cpp's common_sampler (common/sampling.h) — the usual chain of samplers, with
// grammar and JSON-schema constraints, lazy grammar triggers and preserved tokens.

#include <pybind11/numpy.h>

#include "pyllama.h"

#include "chat_result.h"
#include "common.h"
#include "context.h"
#include "json-schema-to-grammar.h"
#include "large_stack.h"
#include "nlohmann/json.hpp"
#include "pyllama_json_gbnf.h"
#include "sampler.h"
#include "sampling.h"

#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <regex>
#include <tuple>

#ifndef _WIN32
#include <unistd.h>
#endif

namespace pyllama {

namespace {

std::string schema_to_grammar(const py::handle & schema) {
    std::string text;
    if (py::isinstance<py::str>(schema)) {
        text = schema.cast<std::string>();
    } else {
        try {
            text = py::module_::import("json").attr("dumps")(schema).cast<std::string>();
        } catch (py::error_already_set & e) {
            if (e.matches(PyExc_RecursionError)) {
                throw invalid_request_error("json_schema is nested too deeply", "json_schema");
            }
            throw;
        }
    }
    nlohmann::ordered_json schema_json;
    try {
        schema_json = nlohmann::ordered_json::parse(text);
    } catch (const std::exception & e) {
        throw grammar_error(std::string("invalid JSON schema: ") + e.what(), "json_schema");
    }
    check_json_depth(schema_json, "json_schema");
    check_schema_bounds(schema_json, "json_schema");
    try {
        py::gil_scoped_release nogil;
        return on_large_stack([&] { return json_schema_to_grammar(schema_json); });
    } catch (const std::exception & e) {
        throw grammar_error(std::string("invalid JSON schema: ") + e.what(), "json_schema");
    }
}

// llama.cpp's GBNF parser prints its syntax errors with fprintf(stderr) rather than through its
// log. While a grammar is checked, file descriptor 2 is pointed at a temporary file so that the
// message can become the exception's. (Anything another thread writes to stderr in that instant
// lands there too, and is echoed back afterwards.)
class stderr_capture {
  public:
    stderr_capture() {
#ifndef _WIN32
        lock_ = std::unique_lock<std::mutex>(mutex());
        std::fflush(stderr);
        tmp_   = std::tmpfile();
        saved_ = tmp_ != nullptr ? dup(2) : -1;
        if (saved_ >= 0 && dup2(fileno(tmp_), 2) < 0) {
            close(saved_);
            saved_ = -1;
        }
#endif
    }

    // Restores stderr and returns what was written meanwhile.
    std::string finish() {
        std::string out;
#ifndef _WIN32
        if (saved_ >= 0) {
            std::fflush(stderr);
            dup2(saved_, 2);
            close(saved_);
            saved_ = -1;
            std::rewind(tmp_);
            char   buf[4096];
            size_t n;
            while ((n = std::fread(buf, 1, sizeof(buf), tmp_)) > 0) {
                out.append(buf, n);
            }
        }
        if (tmp_ != nullptr) {
            std::fclose(tmp_);
            tmp_ = nullptr;
        }
#endif
        return out;
    }

    ~stderr_capture() { finish(); }

  private:
    static std::mutex & mutex() {
        static std::mutex m;
        return m;
    }

    std::unique_lock<std::mutex> lock_;
    std::FILE *                  tmp_   = nullptr;
    int                          saved_ = -1;
};

// Checks a GBNF grammar with llama.cpp's parser; its message becomes the ValueError's.
void parse_grammar(const llama_vocab * vocab, const std::string & text) {
    if (text.rfind("%llguidance", 0) == 0) {
        throw std::invalid_argument("llguidance grammars are not supported by this build");
    }
    log_capture     capture;
    llama_sampler * g = nullptr;
    std::string     printed;
    {
        stderr_capture err;
        try {
            g = llama_sampler_init_grammar(vocab, text.c_str(), "root");
        } catch (const std::exception & e) {
            printed = err.finish();
            throw grammar_error(std::string("invalid grammar: ") + e.what(), "grammar");
        }
        printed = err.finish();
    }
    if (g != nullptr) {
        llama_sampler_free(g);
        if (!printed.empty()) {
            std::fputs(printed.c_str(), stderr);  // not ours: give it back
        }
        return;
    }
    // "llama_grammar_parser::parse: error parsing grammar: <reason>\n\n<grammar>": keep the reason.
    std::string why;
    const auto  at = printed.find("error parsing grammar: ");
    if (at != std::string::npos) {
        const auto start = at + std::strlen("error parsing grammar: ");
        why              = printed.substr(start, printed.find("\n\n", start) - start);
    }
    const std::string logged = capture.problems();
    if (why.empty()) {
        why = logged.empty() ? "parse error" : logged;
    }
    throw grammar_error("invalid grammar: " + why, "grammar");
}

// The grammar's bounds, then llama.cpp's parser on a large stack with the GIL released.
void check_grammar(const llama_vocab * vocab, const std::string & text, const char * param) {
    check_grammar_bounds(text, param);
    py::gil_scoped_release nogil;
    on_large_stack([&] { parse_grammar(vocab, text); });
}

// A Sampler's construction parses its grammar again (common_sampler_init): also on a large stack.
std::unique_ptr<Sampler> build_sampler(std::shared_ptr<llama_model> model, common_params_sampling p, grammar_spec g) {
    py::gil_scoped_release nogil;
    return on_large_stack([&] { return std::make_unique<Sampler>(std::move(model), std::move(p), std::move(g)); });
}

constexpr size_t kMaxDryBreakers     = 128;  // llama.cpp's default list has 4
constexpr size_t kMaxDryBreakerBytes = 256;
constexpr size_t kMaxSamplerNames    = 64;  // llama.cpp's chain has 12 kinds

float finite(const char * name, float v) {
    if (!std::isfinite(v)) {
        throw invalid_request_error(std::string(name) + " must be finite", name);
    }
    return v;
}

// The constraints of a ChatTemplate.apply, as llama-server turns them into sampling parameters:
// preserved tokens that are single tokens, a trigger word that is one (preserved) token becomes a
// token trigger, "full" patterns are anchored, and the generation prompt prefills the grammar.
void apply_chat(const ChatResult & cr, const llama_vocab * vocab, common_params_sampling & p, grammar_spec & g) {
    for (const auto & s : cr.params.preserved_tokens) {
        const auto ids = common_tokenize(vocab, s, false, true);
        if (ids.size() == 1) {
            p.preserved_tokens.insert(ids[0]);
        }
    }
    if (cr.params.grammar.empty()) {
        return;
    }
    g.text = cr.params.grammar;
    check_grammar(vocab, g.text, "grammar");
    p.grammar      = common_grammar(COMMON_GRAMMAR_TYPE_TOOL_CALLS, g.text);
    p.grammar_lazy = g.lazy = cr.params.grammar_lazy;
    for (const auto & t : cr.params.grammar_triggers) {
        switch (t.type) {
            case COMMON_GRAMMAR_TRIGGER_TYPE_WORD: {
                const auto ids = common_tokenize(vocab, t.value, false, true);
                if (ids.size() == 1 && p.preserved_tokens.count(ids[0]) != 0) {
                    p.grammar_triggers.push_back({ COMMON_GRAMMAR_TRIGGER_TYPE_TOKEN, t.value, ids[0] });
                    g.tokens.push_back(ids[0]);
                } else {
                    p.grammar_triggers.push_back(t);
                    g.patterns.push_back(regex_escape(t.value));
                }
                break;
            }
            case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN:
                p.grammar_triggers.push_back(t);
                g.patterns.push_back(t.value);
                break;
            case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN_FULL: {
                p.grammar_triggers.push_back(t);
                std::string anchored = "^$";
                if (!t.value.empty()) {
                    anchored = (t.value.front() != '^' ? "^" : "") + t.value + (t.value.back() != '$' ? "$" : "");
                }
                g.patterns.push_back(anchored);
                break;
            }
            case COMMON_GRAMMAR_TRIGGER_TYPE_TOKEN:
                p.grammar_triggers.push_back(t);
                g.tokens.push_back(t.token);
                break;
        }
    }
    if (g.lazy && p.grammar_triggers.empty()) {
        throw std::invalid_argument("the chat result has a lazy grammar without triggers");
    }
    p.generation_prompt = cr.params.generation_prompt;
    if (!g.lazy && !p.generation_prompt.empty()) {
        // as common_sampler_init prefills its grammar
        const auto tokens = common_tokenize(vocab, p.generation_prompt, false, true);
        for (size_t i = 0; i < tokens.size(); ++i) {
            const std::string piece = common_token_to_piece(vocab, tokens[i], true);
            if (i == 0 && !piece.empty() && std::isspace(static_cast<unsigned char>(piece[0])) &&
                !std::isspace(static_cast<unsigned char>(p.generation_prompt[0]))) {
                continue;
            }
            g.prefill.push_back(tokens[i]);
        }
    }
}

std::unique_ptr<Sampler> make_sampler(Model & model, const py::kwargs & kw) {
    static const std::vector<std::string> known = {
        "seed",
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "typical_p",
        "dynatemp_range",
        "dynatemp_exponent",
        "xtc_probability",
        "xtc_threshold",
        "top_n_sigma",
        "mirostat",
        "mirostat_tau",
        "mirostat_eta",
        "repeat_penalty",
        "frequency_penalty",
        "presence_penalty",
        "penalty_last_n",
        "dry_multiplier",
        "dry_base",
        "dry_allowed_length",
        "dry_penalty_last_n",
        "dry_sequence_breakers",
        "logit_bias",
        "min_keep",
        "samplers",
        "grammar",
        "json_schema",
        "grammar_lazy",
        "trigger_words",
        "trigger_patterns",
        "trigger_tokens",
        "preserved_tokens",
        "n_prev",
        "greedy",
        "chat",
    };
    for (auto item : kw) {
        const std::string k = item.first.cast<std::string>();
        if (std::find(known.begin(), known.end(), k) == known.end()) {
            throw py::type_error("Sampler() got an unexpected keyword argument '" + k + "'");
        }
    }
    std::shared_ptr<llama_model> shared  = model.shared();
    const llama_vocab *          vocab   = llama_model_get_vocab(shared.get());
    const int32_t                n_vocab = llama_vocab_n_tokens(vocab);

    common_params_sampling p;
    p.no_perf = false;
    if (kw.contains("seed") && !kw["seed"].is_none()) {
        const int64_t seed = kwarg<int64_t>(kw, "Sampler", "seed", 0);
        if (seed < 0 || seed > static_cast<int64_t>(UINT32_MAX)) {
            throw invalid_request_error("seed must be in 0..2**32-1", "seed");
        }
        p.seed = static_cast<uint32_t>(seed);
    }
    p.temp           = finite("temperature", kwarg<float>(kw, "Sampler", "temperature", p.temp));
    p.top_k          = kwarg<int32_t>(kw, "Sampler", "top_k", p.top_k);
    p.top_p          = finite("top_p", kwarg<float>(kw, "Sampler", "top_p", p.top_p));
    p.min_p          = finite("min_p", kwarg<float>(kw, "Sampler", "min_p", p.min_p));
    p.typ_p          = finite("typical_p", kwarg<float>(kw, "Sampler", "typical_p", p.typ_p));
    p.dynatemp_range = finite("dynatemp_range", kwarg<float>(kw, "Sampler", "dynatemp_range", p.dynatemp_range));
    p.dynatemp_exponent =
        finite("dynatemp_exponent", kwarg<float>(kw, "Sampler", "dynatemp_exponent", p.dynatemp_exponent));
    p.xtc_probability = finite("xtc_probability", kwarg<float>(kw, "Sampler", "xtc_probability", p.xtc_probability));
    p.xtc_threshold   = finite("xtc_threshold", kwarg<float>(kw, "Sampler", "xtc_threshold", p.xtc_threshold));
    p.top_n_sigma     = finite("top_n_sigma", kwarg<float>(kw, "Sampler", "top_n_sigma", p.top_n_sigma));
    p.mirostat        = kwarg<int32_t>(kw, "Sampler", "mirostat", p.mirostat);
    p.mirostat_tau    = finite("mirostat_tau", kwarg<float>(kw, "Sampler", "mirostat_tau", p.mirostat_tau));
    p.mirostat_eta    = finite("mirostat_eta", kwarg<float>(kw, "Sampler", "mirostat_eta", p.mirostat_eta));
    p.penalty_repeat  = kwarg<float>(kw, "Sampler", "repeat_penalty", p.penalty_repeat);
    p.penalty_freq    = finite("frequency_penalty", kwarg<float>(kw, "Sampler", "frequency_penalty", p.penalty_freq));
    p.penalty_present = finite("presence_penalty", kwarg<float>(kw, "Sampler", "presence_penalty", p.penalty_present));
    p.penalty_last_n  = kwarg<int32_t>(kw, "Sampler", "penalty_last_n", p.penalty_last_n);
    p.dry_multiplier  = finite("dry_multiplier", kwarg<float>(kw, "Sampler", "dry_multiplier", p.dry_multiplier));
    p.dry_base        = finite("dry_base", kwarg<float>(kw, "Sampler", "dry_base", p.dry_base));
    p.dry_allowed_length = kwarg<int32_t>(kw, "Sampler", "dry_allowed_length", p.dry_allowed_length);
    p.dry_penalty_last_n = kwarg<int32_t>(kw, "Sampler", "dry_penalty_last_n", p.dry_penalty_last_n);
    p.min_keep           = kwarg<int32_t>(kw, "Sampler", "min_keep", p.min_keep);
    p.n_prev             = kwarg<int32_t>(kw, "Sampler", "n_prev", p.n_prev);
    p.dry_sequence_breakers =
        kwarg<std::vector<std::string>>(kw, "Sampler", "dry_sequence_breakers", p.dry_sequence_breakers);
    if (p.mirostat < 0 || p.mirostat > 2) {
        throw invalid_request_error("mirostat must be 0 (off), 1 or 2", "mirostat");
    }
    for (const auto & [name, value, lowest] :
         { std::tuple<const char *, int32_t, int32_t>{ "penalty_last_n", p.penalty_last_n, -1 },
           { "dry_penalty_last_n", p.dry_penalty_last_n, -1 },
           { "min_keep", p.min_keep, 0 },
           { "dry_allowed_length", p.dry_allowed_length, 0 } }) {
        if (value < lowest) {
            throw invalid_request_error(std::string(name) + " must be >= " + std::to_string(lowest), name);
        }
    }
    // Lengths llama.cpp allocates ring buffers of, at once: at most the model's training context
    // (a window cannot look back further than a context holds), and a bounded number of DRY breakers
    // (each is tokenised against the whole vocabulary) and sampler names.
    const int64_t longest = std::max<int64_t>(4096, llama_model_n_ctx_train(shared.get()));
    for (const auto & [name, value] : { std::pair<const char *, int32_t>{ "penalty_last_n", p.penalty_last_n },
                                        { "dry_penalty_last_n", p.dry_penalty_last_n },
                                        { "n_prev", p.n_prev },
                                        { "dry_allowed_length", p.dry_allowed_length },
                                        { "min_keep", p.min_keep } }) {
        if (value > longest) {
            throw invalid_request_error(
                std::string(name) + " must be at most " + std::to_string(longest) + " (the model's training context)",
                name);
        }
    }
    if (p.dry_sequence_breakers.size() > kMaxDryBreakers) {
        throw invalid_request_error("dry_sequence_breakers: at most " + std::to_string(kMaxDryBreakers) +
                                        " breakers, not " + std::to_string(p.dry_sequence_breakers.size()),
                                    "dry_sequence_breakers");
    }
    for (const auto & b : p.dry_sequence_breakers) {
        if (b.size() > kMaxDryBreakerBytes) {
            throw invalid_request_error("dry_sequence_breakers: a breaker has " + std::to_string(b.size()) +
                                            " bytes; the limit is " + std::to_string(kMaxDryBreakerBytes),
                                        "dry_sequence_breakers");
        }
    }
    if (kwarg<bool>(kw, "Sampler", "greedy", false)) {
        p.temp = 0.0f;
    }
    if (kw.contains("samplers") && !kw["samplers"].is_none()) {
        // llama.cpp's own names and aliases ("top_k", "top-k", "topk", "temp", ...); it logs and skips
        // a name it does not know, which becomes the error here.
        std::vector<std::string> names = kwarg<std::vector<std::string>>(kw, "Sampler", "samplers", {});
        if (names.size() > kMaxSamplerNames) {
            throw invalid_request_error("samplers: at most " + std::to_string(kMaxSamplerNames) + " names", "samplers");
        }
        for (auto & n : names) {
            if (n == "typical_p" || n == "typical") {
                n = "typ_p";  // the keyword argument's spelling
            }
        }
        log_capture capture;
        p.samplers = common_sampler_types_from_names(names);
        if (p.samplers.size() != names.size()) {
            throw invalid_request_error("unknown sampler name: " + capture.problems(), "samplers");
        }
    }
    if (kw.contains("logit_bias") && !kw["logit_bias"].is_none()) {
        for (auto item : kw["logit_bias"].cast<py::dict>()) {
            const int64_t t = py::int_(py::reinterpret_borrow<py::object>(item.first)).cast<int64_t>();
            if (t < 0 || t >= n_vocab) {
                throw invalid_request_error("logit_bias: token id " + std::to_string(t) + " is out of range",
                                            "logit_bias");
            }
            const float bias = item.second.cast<float>();
            if (!std::isfinite(bias)) {
                throw invalid_request_error("logit_bias values must be finite (use e.g. -100 to ban a token)",
                                            "logit_bias");
            }
            p.logit_bias.push_back({ static_cast<llama_token>(t), bias });
        }
    }

    grammar_spec g;
    if (kw.contains("chat") && !kw["chat"].is_none()) {
        for (const char * k : { "grammar", "json_schema", "grammar_lazy", "trigger_words", "trigger_patterns",
                                "trigger_tokens", "preserved_tokens" }) {
            if (kw.contains(k) && !kw[k].is_none()) {
                throw std::invalid_argument(
                    std::string("chat= brings its own grammar and triggers; do not also give ") + k);
            }
        }
        apply_chat(kw["chat"].cast<const ChatResult &>(), vocab, p, g);
        return build_sampler(std::move(shared), std::move(p), std::move(g));
    }
    const bool has_grammar = kw.contains("grammar") && !kw["grammar"].is_none();
    const bool has_schema  = kw.contains("json_schema") && !kw["json_schema"].is_none();
    if (has_grammar && has_schema) {
        throw invalid_request_error("give grammar or json_schema, not both", "grammar");
    }
    if (has_grammar) {
        g.text = kwarg<std::string>(kw, "Sampler", "grammar", "");
        if (g.text == "json") {
            g.text = PYLLAMA_JSON_GBNF;
        }
    } else if (has_schema) {
        g.text = schema_to_grammar(kw["json_schema"]);
    }
    g.lazy = kwarg<bool>(kw, "Sampler", "grammar_lazy", false);
    if (!g.text.empty()) {
        check_grammar(vocab, g.text, has_schema ? "json_schema" : "grammar");
        p.grammar = common_grammar(has_schema ? COMMON_GRAMMAR_TYPE_OUTPUT_FORMAT : COMMON_GRAMMAR_TYPE_USER, g.text);
        p.grammar_lazy = g.lazy;
        for (const auto & w : kwarg<std::vector<std::string>>(kw, "Sampler", "trigger_words", {})) {
            p.grammar_triggers.push_back({ COMMON_GRAMMAR_TRIGGER_TYPE_WORD, w });
            g.patterns.push_back(regex_escape(w));
        }
        for (const auto & pat : kwarg<std::vector<std::string>>(kw, "Sampler", "trigger_patterns", {})) {
            try {
                std::regex check(pat);
            } catch (const std::regex_error & e) {
                throw std::invalid_argument("invalid trigger pattern '" + pat + "': " + e.what());
            }
            p.grammar_triggers.push_back({ COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN, pat });
            g.patterns.push_back(pat);
        }
        for (int64_t t : kwarg<std::vector<int64_t>>(kw, "Sampler", "trigger_tokens", {})) {
            if (t < 0 || t >= n_vocab) {
                throw std::invalid_argument("trigger token " + std::to_string(t) + " is out of range");
            }
            common_grammar_trigger trig{ COMMON_GRAMMAR_TRIGGER_TYPE_TOKEN, "", static_cast<llama_token>(t) };
            p.grammar_triggers.push_back(trig);
            g.tokens.push_back(static_cast<llama_token>(t));
        }
        if (g.lazy && p.grammar_triggers.empty()) {
            throw std::invalid_argument("a lazy grammar needs trigger_words, trigger_patterns or trigger_tokens");
        }
    } else if (g.lazy || kw.contains("trigger_words") || kw.contains("trigger_patterns") ||
               kw.contains("trigger_tokens")) {
        throw std::invalid_argument("grammar_lazy and triggers need a grammar");
    }
    for (int64_t t : kwarg<std::vector<int64_t>>(kw, "Sampler", "preserved_tokens", {})) {
        if (t < 0 || t >= n_vocab) {
            throw std::invalid_argument("preserved token " + std::to_string(t) + " is out of range");
        }
        p.preserved_tokens.insert(static_cast<llama_token>(t));
    }
    if (!g.text.empty()) {
        g.lazy = p.grammar_lazy;
    }
    return build_sampler(std::move(shared), std::move(p), std::move(g));
}

}  // namespace

void register_sampler(py::module_ & m) {
    py::class_<Sampler, std::shared_ptr<Sampler>> cls(m, "Sampler", R"doc(
A chain of samplers built by llama.cpp's common/sampling, with llama.cpp's usual order:
penalties, DRY, top-n-sigma, top-k, typical, top-p, min-p, XTC, temperature, then a random draw
(or mirostat). temperature <= 0 (or greedy=True) picks the most likely token.

Sampler(model, *, seed=None, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, typical_p=1.0,
        dynatemp_range=0, dynatemp_exponent=1, xtc_probability=0, xtc_threshold=0.1,
        top_n_sigma=-1, mirostat=0, mirostat_tau=5, mirostat_eta=0.1, repeat_penalty=1.0,
        frequency_penalty=0, presence_penalty=0, penalty_last_n=64, dry_multiplier=0,
        dry_base=1.75, dry_allowed_length=2, dry_penalty_last_n=-1, dry_sequence_breakers=None,
        logit_bias=None, min_keep=0, samplers=None, greedy=False,
        grammar=None, json_schema=None, grammar_lazy=False, trigger_words=(),
        trigger_patterns=(), trigger_tokens=(), preserved_tokens=())

grammar is GBNF text with a `root` rule, or "json" for llama.cpp's JSON grammar; json_schema (a
dict or a JSON string) is turned into a grammar by llama.cpp's json-schema-to-grammar. A lazy
grammar applies from the first trigger on.
)doc");
    cls.def(py::init(
                [](Model & model, const py::kwargs & kw) { return std::shared_ptr<Sampler>(make_sampler(model, kw)); }),
            py::arg("model"));
    cls.def(
        "sample",
        [](Sampler & self, Context & ctx, int32_t idx) {
            py::gil_scoped_release nogil;
            return self.sample(ctx, idx);
        },
        py::arg("ctx"), py::arg("idx") = -1,
        "Sample a token from output idx of the context's last decode (GIL released). Does not accept it.");
    cls.def(
        "accept",
        [](Sampler & self, llama_token token, bool accept_grammar) {
            py::gil_scoped_release nogil;
            self.accept(token, accept_grammar);
        },
        py::arg("token"), py::arg("accept_grammar") = true,
        "Record a token as generated: it advances the grammar and the repetition penalties.");
    cls.def("reset", [](Sampler & self) {
        py::gil_scoped_release nogil;
        self.reset();
    });
    cls.def(
        "clone",
        [](Sampler & self) {
            py::gil_scoped_release      nogil;
            std::lock_guard<std::mutex> lock(self.mutex());
            return std::make_shared<Sampler>(self);
        },
        "An independent copy with the same state (grammar position, history, RNG).");
    cls.def_property_readonly("chain", &Sampler::chain, "The names of the llama.cpp samplers in the chain, in order.");
    cls.def_property_readonly("seed", &Sampler::seed);

    m.attr("JSON_GRAMMAR") = PYLLAMA_JSON_GBNF;
    m.def(
        "json_schema_to_grammar", [](const py::object & schema) { return schema_to_grammar(schema); },
        py::arg("schema"), "The GBNF grammar llama.cpp derives from a JSON schema (dict or JSON string).");
}

}  // namespace pyllama
