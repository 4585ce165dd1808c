// ChatTemplate: a model's own chat template rendered by llama.cpp's native Jinja engine
// (common/chat.h), with tools, tool_choice, JSON schema and reasoning; and the output parsed back
// into an OpenAI-shaped message by the parser llama.cpp builds for that very request.

#include "model.h"
#include "pyllama.h"

#include "chat_result.h"
#include "common.h"
#include "grammar.h"
#include "json-schema-to-grammar.h"
#include "large_stack.h"
#include "nlohmann/json.hpp"
#include "render_guard.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

namespace pyllama {

namespace {

constexpr int MAX_INPUT_DEPTH = 64;

using ojson = nlohmann::ordered_json;

}  // namespace

// Templates and json-schema-to-grammar walk messages and schemas recursively, with no recursion
// limit in llama.cpp: bound the nesting of what a request can pass, so that no input can overflow
// the stack. (Iterative, so that this check cannot overflow it either.)
void check_json_depth(const nlohmann::ordered_json & j, const char * what) {
    std::vector<std::pair<const nlohmann::ordered_json *, int>> todo{ { &j, 1 } };
    while (!todo.empty()) {
        auto [node, depth] = todo.back();
        todo.pop_back();
        if (depth > MAX_INPUT_DEPTH) {
            throw invalid_request_error(
                std::string(what) + " is nested deeper than " + std::to_string(MAX_INPUT_DEPTH) + " levels", what);
        }
        if (node->is_structured()) {
            for (const auto & child : *node) {
                todo.emplace_back(&child, depth + 1);
            }
        }
    }
}

// Bounds on JSON schemas (tool parameters, response formats): llama.cpp's converter takes about
// 1 s for one object of 500 properties and grows faster than linearly; its regex converter recurses
// once per group of a pattern.
constexpr size_t kMaxSchemaNodes       = 100000;
constexpr size_t kMaxObjectProperties  = 512;
constexpr size_t kMaxSchemaProperties  = 4096;
constexpr size_t kMaxEnumValues        = 10000;
constexpr size_t kMaxPatternLength     = 4096;
constexpr int    kMaxPatternGroupDepth = 256;

// What llama.cpp's regex converter (json-schema-to-grammar.cpp, _visit_pattern) cannot take: it loops
// for ever on a ']' or '}' that opens nothing, and reads before the start of a sequence for a
// quantifier with nothing to repeat (at the start of the pattern or of a group). Scanned as it scans.
static std::string pattern_fault(const std::string & p) {
    if (p.empty()) {
        return "a pattern of the schema is empty (it must start with '^' and end with '$')";
    }
    if (p.size() < 2 || p.front() != '^' || p.back() != '$') {
        return {};  // llama.cpp refuses it with its own error
    }
    const std::string sub = p.substr(1, p.size() - 2);
    std::vector<bool> has_item{ false };  // per open group: is there something a quantifier can repeat
    const size_t      n = sub.size();
    for (size_t i = 0; i < n;) {
        const char c = sub[i];
        if (c == '\\') {
            i += 2;
            has_item.back() = true;
        } else if (c == '(') {
            if (i + 1 < n && sub[i + 1] == '?' && !(i + 2 < n && sub[i + 2] == ':')) {
                int depth = 1;  // a lookaround: skipped, leaving nothing to repeat
                ++i;
                while (i < n && depth > 0) {
                    if (sub[i] == '\\' && i + 1 < n) {
                        i += 2;
                        continue;
                    }
                    depth += sub[i] == '(' ? 1 : sub[i] == ')' ? -1 : 0;
                    ++i;
                }
                continue;
            }
            i += (i + 2 < n && sub[i + 1] == '?' && sub[i + 2] == ':') ? 3 : 1;
            has_item.push_back(false);
        } else if (c == ')') {
            ++i;
            if (has_item.size() > 1) {
                has_item.pop_back();
            }
            has_item.back() = true;
        } else if (c == '[') {
            ++i;
            while (i < n && sub[i] != ']') {
                i += sub[i] == '\\' ? 2 : 1;
            }
            ++i;
            has_item.back() = true;
        } else if (c == ']' || c == '}') {
            return std::string("a pattern of the schema has a '") + c + "' that closes nothing (escape it as '\\" + c +
                   "')";
        } else if (c == '*' || c == '+' || c == '?' || c == '{') {
            if (!has_item.back()) {
                return std::string("a pattern of the schema has a quantifier ('") + c + "') with nothing to repeat";
            }
            if (c == '{') {
                while (i < n && sub[i] != '}') {
                    ++i;
                }
            }
            ++i;
        } else {
            ++i;  // a literal, '.', '|' (after which a quantifier repeats the '|' itself)
            has_item.back() = true;
        }
    }
    return {};
}

void check_schema_bounds(const nlohmann::ordered_json & schema, const char * what) {
    const auto refuse = [what](const std::string & why) {
        throw invalid_request_error(std::string(what) + ": " + why, what);
    };
    size_t                                      nodes = 0, properties = 0;
    std::vector<const nlohmann::ordered_json *> todo{ &schema };
    while (!todo.empty()) {
        const nlohmann::ordered_json * node = todo.back();
        todo.pop_back();
        if (++nodes > kMaxSchemaNodes) {
            refuse("the schema has more than " + std::to_string(kMaxSchemaNodes) + " JSON values");
        }
        if (node->is_object()) {
            auto props = node->find("properties");
            if (props != node->end() && props->is_object()) {
                if (props->size() > kMaxObjectProperties) {
                    refuse("an object of the schema has " + std::to_string(props->size()) +
                           " properties; the limit is " + std::to_string(kMaxObjectProperties));
                }
                properties += props->size();
                if (properties > kMaxSchemaProperties) {
                    refuse("the schema has more than " + std::to_string(kMaxSchemaProperties) + " properties");
                }
            }
            auto values = node->find("enum");
            if (values != node->end() && values->is_array() && values->size() > kMaxEnumValues) {
                refuse("an enum of the schema has " + std::to_string(values->size()) + " values; the limit is " +
                       std::to_string(kMaxEnumValues));
            }
            auto pattern = node->find("pattern");
            if (pattern != node->end() && pattern->is_string()) {
                const std::string & p = pattern->get_ref<const std::string &>();
                if (p.size() > kMaxPatternLength) {
                    refuse("a pattern of the schema has " + std::to_string(p.size()) + " characters; the limit is " +
                           std::to_string(kMaxPatternLength));
                }
                const std::string fault = pattern_fault(p);
                if (!fault.empty()) {
                    refuse(fault);
                }
                int depth = 0;
                for (size_t i = 0; i < p.size(); ++i) {
                    if (p[i] == '\\') {
                        ++i;
                    } else if (p[i] == '(' && ++depth > kMaxPatternGroupDepth) {
                        refuse("a pattern of the schema nests groups deeper than " +
                               std::to_string(kMaxPatternGroupDepth) + " levels");
                    } else if (p[i] == ')') {
                        --depth;
                    }
                }
            }
        }
        if (node->is_structured()) {
            for (const auto & child : *node) {
                todo.push_back(&child);
            }
        }
    }
}

namespace {

ojson to_ojson(const py::handle & obj, const char * what) {
    std::string text;
    try {
        text = py::module_::import("json").attr("dumps")(obj).cast<std::string>();
    } catch (py::error_already_set & e) {
        if (e.matches(PyExc_RecursionError)) {
            throw invalid_request_error(std::string(what) + " is nested too deeply", what);
        }
        throw invalid_request_error(std::string(what) + " must be JSON-serialisable: " + e.what(), what);
    }
    ojson j = ojson::parse(text);
    check_json_depth(j, what);
    return j;
}

py::dict tool_call_dict(const common_chat_tool_call & tc) {
    py::dict fn;
    fn["name"]      = tc.name;
    fn["arguments"] = tc.arguments;
    py::dict out;
    out["id"]       = tc.id;
    out["type"]     = "function";
    out["function"] = fn;
    return out;
}

// An OpenAI assistant message: content (None when empty and there are tool calls), reasoning_content
// when any, tool_calls when any.
py::dict message_dict(const common_chat_msg & msg) {
    py::dict out;
    out["role"] = msg.role.empty() ? "assistant" : msg.role;
    if (msg.content.empty() && !msg.tool_calls.empty()) {
        out["content"] = py::none();
    } else {
        out["content"] = msg.content;
    }
    if (!msg.reasoning_content.empty()) {
        out["reasoning_content"] = msg.reasoning_content;
    }
    if (!msg.tool_calls.empty()) {
        py::list calls;
        for (const auto & tc : msg.tool_calls) {
            calls.append(tool_call_dict(tc));
        }
        out["tool_calls"] = calls;
    }
    return out;
}

// A streamed delta as llama-server sends it: content, reasoning_content, or one tool-call fragment
// with its index (id, type and name on the first fragment of a call).
py::dict delta_dict(const common_chat_msg_diff & d) {
    py::dict out;
    if (!d.reasoning_content_delta.empty()) {
        out["reasoning_content"] = d.reasoning_content_delta;
    }
    if (!d.content_delta.empty()) {
        out["content"] = d.content_delta;
    }
    if (d.tool_call_index != std::string::npos) {
        py::dict tc;
        tc["index"] = d.tool_call_index;
        py::dict fn;
        if (!d.tool_call_delta.id.empty()) {
            tc["id"]   = d.tool_call_delta.id;
            tc["type"] = "function";
        }
        if (!d.tool_call_delta.name.empty()) {
            fn["name"] = d.tool_call_delta.name;
        }
        fn["arguments"] = d.tool_call_delta.arguments;
        tc["function"]  = fn;
        py::list calls;
        calls.append(tc);
        out["tool_calls"] = calls;
    }
    return out;
}

const char * trigger_type_name(common_grammar_trigger_type t) {
    switch (t) {
        case COMMON_GRAMMAR_TRIGGER_TYPE_TOKEN: return "token";
        case COMMON_GRAMMAR_TRIGGER_TYPE_WORD: return "word";
        case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN: return "pattern";
        case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN_FULL: return "pattern_full";
    }
    return "unknown";
}

}  // namespace

namespace {

// Tool-call ids are pyllama's, the same in a parse and a stream given the same seed: 9 letters and
// digits, which every template accepts (Mistral's insist on exactly that). Ids a model writes into its
// output are not used: in formats that put them after the arguments they are unknown when a streamed
// call starts, and a stream cannot change an id it has sent.
std::string tool_call_id(uint64_t seed, size_t index) {
    static const char alphabet[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    uint64_t          x          = seed + 0x9E3779B97F4A7C15ULL * (index + 1);
    std::string       id;
    for (int i = 0; i < 9; ++i) {
        // splitmix64 steps
        x += 0x9E3779B97F4A7C15ULL;
        uint64_t z = x;
        z          = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z          = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        z ^= z >> 31;
        id += alphabet[z % 62];
    }
    return id;
}

uint64_t id_seed_or_random(const py::object & seed) {
    if (!seed.is_none()) {
        return seed.cast<uint64_t>();
    }
    std::random_device rd;
    return (uint64_t(rd()) << 32) ^ rd();
}

void assign_tool_call_ids(common_chat_msg & msg, uint64_t seed) {
    for (size_t i = 0; i < msg.tool_calls.size(); ++i) {
        msg.tool_calls[i].id = tool_call_id(seed, i);
    }
}

}  // namespace

// Feeds text pieces; yields the deltas between successive parses of the text so far, as
// llama-server streams them.
class ChatStream {
  public:
    explicit ChatStream(std::shared_ptr<const ChatResult> result, uint64_t id_seed) :
        result_(std::move(result)), id_seed_(id_seed) {}

    std::vector<common_chat_msg_diff> feed(const std::string & piece, bool is_final) {
        text_ += piece;
        common_chat_msg next = result_->parse(text_, !is_final);
        if (next.empty() && !is_final) {
            return {};
        }
        assign_tool_call_ids(next, id_seed_);
        std::vector<common_chat_msg_diff> diffs;
        try {
            diffs = common_chat_msg_diff::compute_diffs(msg_, next);
        } catch (const std::exception & e) {
            // the parse of the longer text goes back on what was streamed ("Invalid diff"): to the
            // caller this is output that does not parse as the format, a ValueError like parse()'s
            throw std::invalid_argument(std::string("the output does not parse as this template's format: ") +
                                        e.what());
        }
        msg_ = std::move(next);
        return diffs;
    }

    const common_chat_msg & message() const { return msg_; }

  private:
    std::shared_ptr<const ChatResult> result_;
    uint64_t                          id_seed_;
    std::string                       text_;
    common_chat_msg                   msg_;
};

class ChatTemplate {
  public:
    ChatTemplate(Model * model, const std::string & source, const std::string & bos, const std::string & eos) {
        std::shared_ptr<llama_model> m;
        if (model != nullptr) {
            m      = model->shared();
            model_ = m;
        }
        if (m == nullptr && source.empty()) {
            throw std::invalid_argument("give a model or a template");
        }
        if (source != "chatml" && is_builtin_name(source)) {
            legacy_ = source;  // one of llama_chat_apply_template's own formats
            return;
        }
        log_capture capture;
        try {
            // parsing recurses over the source, and finding the template's capabilities renders it
            tmpls_ = on_large_stack([&] {
                render_scope guard;
                try {
                    return common_chat_templates_init(m.get(), source, bos, eos);
                } catch (const std::exception &) {
                    refuse_if_over(guard, "while its capabilities were probed");
                    throw;
                }
            });
        } catch (const template_error &) {
            throw;
        } catch (const std::bad_alloc &) {
            throw;  // MemoryError
        } catch (const std::exception & e) {
            throw std::invalid_argument(std::string("the chat template does not parse: ") + e.what());
        }
    }

    // The size of what a render is given (it scales the render's time limit).
    static size_t input_bytes(const common_chat_templates_inputs & in) {
        size_t n = in.chat_template_kwargs.size() * 16;
        for (const auto & m : in.messages) {
            n += m.role.size() + m.content.size() + m.reasoning_content.size() + m.tool_name.size() +
                 m.tool_call_id.size();
            for (const auto & part : m.content_parts) {
                n += part.text.size();
            }
            for (const auto & call : m.tool_calls) {
                n += call.name.size() + call.arguments.size() + call.id.size();
            }
        }
        for (const auto & t : in.tools) {
            n += t.name.size() + t.description.size() + t.parameters.size();
        }
        return n;
    }

    // A render that went past a limit of the render guard ends as a TemplateError saying which.
    static void refuse_if_over(const render_scope & guard, const char * when) {
        const std::string over = guard.exceeded();
        if (!over.empty()) {
            throw template_error("the chat template " + over + " " + when + ", and was stopped", "messages");
        }
    }

    // The names llama_chat_apply_template knows ("llama3", "gemma", "mistral-v7", ...).
    static std::vector<std::string> builtin_names() {
        std::vector<const char *> names(llama_chat_builtin_templates(nullptr, 0));
        llama_chat_builtin_templates(names.data(), names.size());
        return { names.begin(), names.end() };
    }

    static bool is_builtin_name(const std::string & s) {
        const auto names = builtin_names();
        return std::find(names.begin(), names.end(), s) != names.end();
    }

    const std::string & legacy() const { return legacy_; }

    std::string source(const std::string & variant) const {
        return legacy_.empty() ? common_chat_templates_source(tmpls_.get(), variant) : legacy_;
    }

    std::map<std::string, bool> caps() const {
        if (legacy_.empty()) {
            return common_chat_templates_get_caps(tmpls_.get());
        }
        // a built-in format: plain chat with a system role, nothing more
        auto caps = common_chat_templates_get_caps(chatml().get());
        for (auto & [k, v] : caps) {
            v = k == "supports_system_role" || k == "supports_string_content";
        }
        return caps;
    }

    bool supports_thinking() const {
        if (!legacy_.empty()) {
            return false;
        }
        render_scope guard;
        try {
            return common_chat_templates_support_enable_thinking(tmpls_.get());
        } catch (const std::exception &) {
            refuse_if_over(guard, "while its thinking support was probed");
            throw;
        }
    }

    // Plain chat through llama_chat_apply_template: no tools, no reasoning; a JSON schema or grammar
    // constrains the whole reply.
    std::shared_ptr<ChatResult> apply_legacy(const common_chat_templates_inputs & in) const {
        if (!in.tools.empty() || in.tool_choice == COMMON_CHAT_TOOL_CHOICE_REQUIRED) {
            throw std::invalid_argument("the built-in template '" + legacy_ +
                                        "' carries no tools: use a Jinja chat template (the model's own, or a "
                                        "template file) for tool calling");
        }
        std::vector<std::string> contents;
        for (const auto & msg : in.messages) {
            if (!msg.tool_calls.empty() || msg.role == "tool") {
                throw std::invalid_argument("the built-in template '" + legacy_ +
                                            "' carries no tool calls or tool results");
            }
            std::string text = msg.content;
            for (const auto & part : msg.content_parts) {
                text += part.text;
            }
            contents.push_back(std::move(text));
        }
        std::vector<llama_chat_message> chat;
        for (size_t i = 0; i < in.messages.size(); ++i) {
            chat.push_back({ in.messages[i].role.c_str(), contents[i].c_str() });
        }
        std::vector<char> buf(1024);
        for (int attempt = 0; attempt < 2; ++attempt) {
            const int32_t n = llama_chat_apply_template(legacy_.c_str(), chat.data(), chat.size(),
                                                        in.add_generation_prompt, buf.data(), (int32_t)buf.size());
            if (n < 0) {
                throw std::invalid_argument("the built-in template '" + legacy_ + "' cannot render these messages");
            }
            if ((size_t)n <= buf.size()) {
                auto result           = std::make_shared<ChatResult>();
                result->params.prompt = std::string(buf.data(), n);
                result->params.format = COMMON_CHAT_FORMAT_CONTENT_ONLY;
                if (!in.json_schema.empty()) {
                    result->params.grammar = json_schema_to_grammar(nlohmann::ordered_json::parse(in.json_schema));
                } else {
                    result->params.grammar = in.grammar;
                }
                result->parser = common_chat_parser_params(result->params);
                return result;
            }
            buf.resize(n);
        }
        throw llama_error("the built-in template changed size while rendering");
    }

    std::shared_ptr<ChatResult> apply(common_chat_templates_inputs inputs,
                                      common_reasoning_format      reasoning_format,
                                      const std::string &          named_tool,
                                      bool                         strict) const {
        render_scope guard(input_bytes(inputs));
        try {
            return apply_guarded(std::move(inputs), reasoning_format, named_tool, strict);
        } catch (const std::exception &) {
            refuse_if_over(guard, "while rendering these messages");
            throw;
        }
    }

    std::shared_ptr<ChatResult> apply_guarded(common_chat_templates_inputs inputs,
                                              common_reasoning_format      reasoning_format,
                                              const std::string &          named_tool,
                                              bool                         strict) const {
        if (!legacy_.empty()) {
            if (inputs.continue_final_message != COMMON_CHAT_CONTINUATION_NONE) {
                throw std::invalid_argument("continue_final_message needs a Jinja chat template, not the built-in '" +
                                            legacy_ + "' format");
            }
            auto result = apply_legacy(inputs);
            finish(*result);
            return result;
        }
        if (!inputs.json_schema.empty()) {
            // a schema that does not compile is the request's, not the template's: say so by type
            try {
                json_schema_to_grammar(nlohmann::ordered_json::parse(inputs.json_schema));
            } catch (const std::exception & e) {
                throw grammar_error(std::string("invalid JSON schema: ") + e.what(), "response_format");
            }
        }
        auto        result = std::make_shared<ChatResult>();
        log_capture capture;
        try {
            result->params = common_chat_templates_apply(tmpls_.get(), inputs);
            if (!named_tool.empty()) {
                // llama.cpp has no "this function" choice: the prompt shows every tool, while the grammar
                // and the parser come from the same request with only that tool, required.
                common_chat_templates_inputs only = inputs;
                only.tools.clear();
                for (const auto & t : inputs.tools) {
                    if (t.name == named_tool) {
                        only.tools.push_back(t);
                    }
                }
                only.tool_choice            = COMMON_CHAT_TOOL_CHOICE_REQUIRED;
                only.parallel_tool_calls    = false;
                common_chat_params narrowed = common_chat_templates_apply(tmpls_.get(), only);
                const std::string  prompt   = result->params.prompt;
                result->params              = std::move(narrowed);
                result->params.prompt       = prompt;
            }
        } catch (const std::bad_alloc &) {
            throw;  // MemoryError, not the template's message
        } catch (const std::exception & e) {
            const std::string logged = capture.problems();
            throw template_error(
                std::string("the chat template failed: ") + e.what() + (logged.empty() ? "" : " (" + logged + ")"),
                "messages");
        }
        if (inputs.tool_choice == COMMON_CHAT_TOOL_CHOICE_REQUIRED && result->params.grammar.empty()) {
            // a template without a tool-call format (Gemma 2, Phi-3.5, ...): nothing could hold the reply to a call
            throw invalid_request_error(
                "tool_choice 'required' cannot be honoured: this chat template has no tool-call format that "
                "llama.cpp can constrain (it does not support tools)",
                "tool_choice");
        }
        if (strict && inputs.tool_choice == COMMON_CHAT_TOOL_CHOICE_REQUIRED) {
            make_strict(*result, inputs, named_tool);
        }
        // The parser of a one-call request is the several-calls one: a reply with more calls than asked
        // parses (and keeps its first call) instead of failing the format.
        const common_chat_params * parse_from = &result->params;
        common_chat_params         several;
        if ((!inputs.parallel_tool_calls || !named_tool.empty()) && !inputs.tools.empty()) {
            make_single_call(*result, inputs, named_tool);
            if (named_tool.empty()) {
                common_chat_templates_inputs par = inputs;
                par.parallel_tool_calls          = true;
                try {
                    several    = common_chat_templates_apply(tmpls_.get(), par);
                    parse_from = &several;
                } catch (const std::exception &) {
                    // the template takes one call only (Llama 3.1): its own parser it is
                }
            }
        }
        result->parser                  = common_chat_parser_params(*parse_from);
        result->parser.reasoning_format = reasoning_format;
        if (!parse_from->parser.empty()) {
            result->parser.parser.load(parse_from->parser);
        }
        finish(*result);
        if (inputs.continue_final_message != COMMON_CHAT_CONTINUATION_NONE) {
            // the prefill is part of the parser's generation prompt: what it parses to alone is not the reply's
            result->parser.is_continuation = true;
            result->prefill                = result->parse("", true);
            result->prefill.tool_calls.clear();
        }
        return result;
    }

  private:
    // What generation needs besides the prompt, so that chat crosses into C++ once: the prompt's
    // tokens (the template may write the BOS itself: one BOS, never two) and the stop strings.
    void finish(ChatResult & result) const {
        result.stops = result.params.additional_stops;
        if (!model_) {
            return;
        }
        const llama_vocab * vocab = llama_model_get_vocab(model_.get());
        result.prompt_tokens      = common_tokenize(vocab, result.params.prompt, true, true);
        const llama_token bos     = llama_vocab_bos(vocab);
        auto &            t       = result.prompt_tokens;
        if (t.size() > 1 && bos != LLAMA_TOKEN_NULL && t[0] == bos && t[1] == bos) {
            t.erase(t.begin());  // the template wrote the BOS already
        }
        for (const auto & s : turn_stops()) {
            if (std::find(result.stops.begin(), result.stops.end(), s) == result.stops.end()) {
                result.stops.push_back(s);
            }
        }
    }

    // The end of an assistant turn as the template writes it, when it is text rather than one
    // end-of-generation token (a ChatML template on a vocabulary without <|im_end|>): generation
    // stops there. Found from the template's own rendering of a reply, once.
    const std::vector<std::string> & turn_stops() const {
        std::call_once(turn_once_, [this] {
            static const char * reply = "pyllama-probe-reply";
            try {
                common_chat_templates_inputs in;
                in.messages.push_back(message("user", "pyllama-probe-question"));
                const std::string with_prompt = render(in);
                in.messages.push_back(message("assistant", reply));
                in.add_generation_prompt = false;
                const std::string full   = render(in);
                const size_t      at     = full.find(reply, with_prompt.size() > 0 ? with_prompt.size() - 1 : 0);
                if (full.compare(0, with_prompt.size(), with_prompt) != 0 || at == std::string::npos) {
                    return;
                }
                std::string end = full.substr(at + std::strlen(reply));
                end.erase(0, end.find_first_not_of(" \t\r\n"));
                end.erase(end.find_last_not_of(" \t\r\n") + 1);
                if (end.empty()) {
                    return;
                }
                const llama_vocab * vocab = llama_model_get_vocab(model_.get());
                const auto          toks  = common_tokenize(vocab, end, false, true);
                if (toks.size() == 1 && llama_vocab_is_eog(vocab, toks[0])) {
                    return;  // the end-of-generation token ends it
                }
                turn_stops_.push_back(end);
            } catch (const std::exception &) {
                // a template that cannot render this probe: no stop beyond the format's
            }
        });
        return turn_stops_;
    }

    static common_chat_msg message(const char * role, const char * content) {
        common_chat_msg m;
        m.role    = role;
        m.content = content;
        return m;
    }

    std::string render(const common_chat_templates_inputs & in) const {
        log_capture  capture;  // a probe's complaints are not the caller's
        render_scope guard;
        return legacy_.empty() ? common_chat_templates_apply(tmpls_.get(), in).prompt : apply_legacy(in)->params.prompt;
    }

    static const common_chat_templates_ptr & chatml() {
        static const common_chat_templates_ptr t = common_chat_templates_init(nullptr, "chatml");
        return t;
    }

    // tool_choice "required" as OpenAI means it: the reply starts with a call (see grammar.cpp).
    void make_strict(ChatResult &                         result,
                     const common_chat_templates_inputs & inputs,
                     const std::string &                  named) const {
        std::vector<std::string> names;
        for (const auto & t : inputs.tools) {
            if (named.empty() || t.name == named) {
                names.push_back(t.name);
            }
        }
        std::string why;
        auto        strict = strict_tool_grammar(result.params.grammar, names, result.params.thinking_start_tag,
                                                 result.params.thinking_end_tags,
                                                 model_ ? llama_model_get_vocab(model_.get()) : nullptr, why);
        if (strict) {
            result.params.grammar = std::move(*strict);
            result.strict         = true;
        } else {
            result.strict_failure = why;
        }
    }

    // parallel_tool_calls=false: at most one call, in the grammar and in what the parser returns.
    void make_single_call(ChatResult &                         result,
                          const common_chat_templates_inputs & inputs,
                          const std::string &                  named) const {
        result.max_calls = 1;
        if (result.params.grammar.empty()) {
            return;
        }
        std::vector<std::string> names;
        for (const auto & t : inputs.tools) {
            if (named.empty() || t.name == named) {
                names.push_back(t.name);
            }
        }
        auto single = single_tool_call_grammar(result.params.grammar, names,
                                               model_ ? llama_model_get_vocab(model_.get()) : nullptr);
        if (single) {
            result.params.grammar = std::move(*single);
        }
    }

    common_chat_templates_ptr        tmpls_;
    std::shared_ptr<llama_model>     model_;
    mutable std::once_flag           turn_once_;
    mutable std::vector<std::string> turn_stops_;
    std::string                      legacy_;
};

namespace {

common_chat_templates_inputs make_inputs(const py::object & messages,
                                         const py::object & tools,
                                         const py::object & tool_choice,
                                         const py::object & parallel_tool_calls,
                                         bool               add_generation_prompt,
                                         const py::object & enable_thinking,
                                         const py::object & chat_template_kwargs,
                                         const py::object & json_schema,
                                         const py::object & grammar,
                                         const py::object & continue_final_message,
                                         std::string &      named_tool) {
    common_chat_templates_inputs in;
    if (!py::isinstance<py::list>(messages) && !py::isinstance<py::tuple>(messages)) {
        throw py::type_error("messages must be a list of dicts");
    }
    try {
        in.messages = common_chat_msgs_parse_oaicompat(to_ojson(messages, "messages"));
        if (!tools.is_none()) {
            ojson tools_json = to_ojson(tools, "tools");
            check_schema_bounds(tools_json, "tools");
            in.tools = common_chat_tools_parse_oaicompat(tools_json);
        }
    } catch (const std::invalid_argument &) {
        throw;
    } catch (const std::exception & e) {
        throw std::invalid_argument(e.what());
    }
    if (!tool_choice.is_none()) {
        if (py::isinstance<py::str>(tool_choice)) {
            in.tool_choice = common_chat_tool_choice_parse_oaicompat(tool_choice.cast<std::string>());
        } else if (py::isinstance<py::dict>(tool_choice)) {
            py::dict tc = tool_choice.cast<py::dict>();
            if (!tc.contains("function") || !py::isinstance<py::dict>(tc["function"]) ||
                !tc["function"].cast<py::dict>().contains("name")) {
                throw std::invalid_argument(
                    "tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'function': {'name': "
                    "...}}");
            }
            named_tool = tc["function"]["name"].cast<std::string>();
            bool found = false;
            for (const auto & t : in.tools) {
                found = found || t.name == named_tool;
            }
            if (!found) {
                throw std::invalid_argument("tool_choice names '" + named_tool + "', which is not among the tools");
            }
            in.tool_choice = COMMON_CHAT_TOOL_CHOICE_REQUIRED;
        } else {
            throw py::type_error("tool_choice must be a str or a dict");
        }
    }
    if (in.tool_choice != COMMON_CHAT_TOOL_CHOICE_NONE && in.tool_choice != COMMON_CHAT_TOOL_CHOICE_AUTO &&
        in.tools.empty()) {
        throw std::invalid_argument("tool_choice 'required' needs tools");
    }
    // OpenAI's default: the model may call several tools in one reply
    in.parallel_tool_calls   = parallel_tool_calls.is_none() ? true : parallel_tool_calls.cast<bool>();
    in.add_generation_prompt = add_generation_prompt;
    if (!continue_final_message.is_none()) {
        if (py::isinstance<py::bool_>(continue_final_message)) {
            in.continue_final_message =
                continue_final_message.cast<bool>() ? COMMON_CHAT_CONTINUATION_AUTO : COMMON_CHAT_CONTINUATION_NONE;
        } else if (py::isinstance<py::str>(continue_final_message)) {
            const auto v = continue_final_message.cast<std::string>();
            if (v != "content" && v != "reasoning_content") {
                throw std::invalid_argument(
                    "continue_final_message must be True, False, 'content' or 'reasoning_content'");
            }
            in.continue_final_message = common_chat_continuation_parse(nlohmann::ordered_json(v));
        } else {
            throw py::type_error("continue_final_message must be a bool or a str");
        }
    }
    if (in.continue_final_message != COMMON_CHAT_CONTINUATION_NONE) {
        if (in.messages.empty() || in.messages.back().role != "assistant") {
            throw std::invalid_argument("continue_final_message: the last message must be the assistant's");
        }
        if (in.messages.size() >= 2 && in.messages[in.messages.size() - 2].role == "assistant") {
            throw std::invalid_argument("continue_final_message: two assistant messages end the list");
        }
        if (!in.messages.back().tool_calls.empty()) {
            throw std::invalid_argument("continue_final_message: the final assistant message has tool calls");
        }
        in.add_generation_prompt = false;
    }
    if (!enable_thinking.is_none()) {
        in.enable_thinking = enable_thinking.cast<bool>();
    }
    if (!chat_template_kwargs.is_none()) {
        for (auto item : chat_template_kwargs.cast<py::dict>()) {
            // values are passed to the template as JSON text, as llama-server does
            in.chat_template_kwargs[item.first.cast<std::string>()] =
                to_ojson(item.second, "chat_template_kwargs").dump();
        }
    }
    if (!json_schema.is_none() && !grammar.is_none()) {
        throw std::invalid_argument("give json_schema or grammar, not both");
    }
    if (!json_schema.is_none()) {
        const py::object schema =
            py::isinstance<py::str>(json_schema) ? py::module_::import("json").attr("loads")(json_schema) : json_schema;
        ojson schema_json = to_ojson(schema, "json_schema");
        check_schema_bounds(schema_json, "json_schema");
        in.json_schema = schema_json.dump();
    }
    if (!grammar.is_none()) {
        in.grammar = grammar.cast<std::string>();
    }
    return in;
}

}  // namespace

void register_chat(py::module_ & m) {
    m.def(
        "template_limits",
        [] {
            const render_limits l = get_render_limits();
            py::dict            out;
            out["seconds"]                 = l.seconds;
            out["memory"]                  = l.bytes;
            out["stack"]                   = l.stack;
            out["active"]                  = render_guard_active();
            out["seconds_per_input_bytes"] = kSecondsPerBytes;
            return out;
        },
        "The limits on one chat-template render: seconds inside Jinja (as many again per\n"
        "seconds_per_input_bytes of messages and tools), bytes allocated and not yet freed inside it, stack\n"
        "depth; active is False where the build cannot enforce them (the guard needs Linux and libstdc++).");
    m.def(
        "set_template_limits",
        [](py::object seconds, py::object memory, py::object stack) {
            render_limits l = get_render_limits();
            if (!seconds.is_none()) {
                const double v = seconds.cast<double>();
                if (!(v > 0)) {
                    throw invalid_request_error("seconds must be > 0", "seconds");
                }
                l.seconds = v;
            }
            if (!memory.is_none()) {
                const auto v = memory.cast<int64_t>();
                if (v < (int64_t{ 1 } << 20)) {
                    throw invalid_request_error("memory must be at least 1 MiB (1048576 bytes)", "memory");
                }
                l.bytes = static_cast<size_t>(v);
            }
            if (!stack.is_none()) {
                const auto v = stack.cast<int64_t>();
                if (v < (int64_t{ 64 } << 10) || v > static_cast<int64_t>(kLargeStackBytes)) {
                    throw invalid_request_error("stack must be from 64 KiB to 256 MiB", "stack");
                }
                l.stack = static_cast<size_t>(v);
            }
            set_render_limits(l);
        },
        py::kw_only(), py::arg("seconds") = py::none(), py::arg("memory") = py::none(), py::arg("stack") = py::none(),
        "Change the limits on chat-template renders, for every template from now on (None keeps a limit).");
    m.def(
        "template_render_peaks",
        [](bool reset) {
            const render_cost c = render_peaks();
            if (reset) {
                reset_render_peaks();
            }
            py::dict out;
            out["seconds"] = c.seconds;
            out["memory"]  = c.bytes;
            out["stack"]   = c.stack;
            return out;
        },
        py::arg("reset") = false,
        "The most any one render has spent of each limit since the last reset (how much room they leave).");
    py::class_<ChatResult, std::shared_ptr<ChatResult>> res(m, "ChatResult",
                                                            "The prompt and constraints of one ChatTemplate.apply.");
    res.def_property_readonly("prompt", [](const ChatResult & r) { return r.params.prompt; });
    res.def_property_readonly("grammar", [](const ChatResult & r) -> py::object {
        if (r.params.grammar.empty()) {
            return py::none();
        }
        return py::str(r.params.grammar);
    });
    res.def_property_readonly("grammar_lazy", [](const ChatResult & r) { return r.params.grammar_lazy; });
    res.def_property_readonly("grammar_triggers", [](const ChatResult & r) {
        py::list out;
        for (const auto & t : r.params.grammar_triggers) {
            py::dict d;
            d["type"]  = trigger_type_name(t.type);
            d["value"] = t.value;
            if (t.type == COMMON_GRAMMAR_TRIGGER_TYPE_TOKEN) {
                d["token"] = t.token;
            }
            out.append(d);
        }
        return out;
    });
    res.def_property_readonly(
        "strict", [](const ChatResult & r) { return r.strict; },
        "True when the grammar of a tool_choice='required' (or named) request was made strict: the reply must "
        "start with the call, after the template's framing and an optional reasoning block.");
    res.def_property_readonly(
        "strict_failure",
        [](const ChatResult & r) -> py::object {
            return r.strict_failure.empty() ? py::object(py::none()) : py::object(py::str(r.strict_failure));
        },
        "Why a strict grammar was asked for and could not be made (llama.cpp's grammar is kept), else None.");
    res.def_property_readonly("preserved_tokens", [](const ChatResult & r) { return r.params.preserved_tokens; });
    res.def_property_readonly("additional_stops", [](const ChatResult & r) { return r.params.additional_stops; });
    res.def_property_readonly(
        "stops", [](const ChatResult & r) { return r.stops; },
        "The stop strings generation needs: the format's, and the template's turn end where it is text.");
    res.def_property_readonly(
        "prompt_tokens", [](const ChatResult & r) { return r.prompt_tokens; },
        "The prompt tokenised for the template's model (special tokens parsed, one BOS); [] without a model.");
    res.def_property_readonly("generation_prompt", [](const ChatResult & r) { return r.params.generation_prompt; });
    res.def_property_readonly("format", [](const ChatResult & r) { return common_chat_format_name(r.params.format); });
    res.def_property_readonly("supports_thinking", [](const ChatResult & r) { return r.params.supports_thinking; });
    res.def_property_readonly("thinking_start_tag", [](const ChatResult & r) { return r.params.thinking_start_tag; });
    res.def_property_readonly("thinking_end_tags", [](const ChatResult & r) { return r.params.thinking_end_tags; });
    res.def(
        "parse",
        [](const ChatResult & r, const std::string & text, bool is_partial, const py::object & id_seed) {
            const uint64_t  seed = id_seed_or_random(id_seed);
            common_chat_msg msg;
            {
                py::gil_scoped_release nogil;
                msg = r.parse(text, is_partial);
                assign_tool_call_ids(msg, seed);
            }
            return message_dict(msg);
        },
        py::arg("text"), py::arg("is_partial") = false, py::kw_only(), py::arg("id_seed") = py::none(),
        "Parse the model's output for this request into an OpenAI assistant message dict: content, "
        "reasoning_content, tool_calls [{id, type: 'function', function: {name, arguments (JSON text)}}]. Tool-call "
        "ids are 9 letters and digits drawn from id_seed (random when None): a parse and a stream with the same "
        "id_seed give the same ids.");
    res.def(
        "stream",
        [](std::shared_ptr<ChatResult> r, const py::object & id_seed) {
            return std::make_unique<ChatStream>(std::move(r), id_seed_or_random(id_seed));
        },
        py::kw_only(), py::arg("id_seed") = py::none(),
        "A streaming parser: feed() it text pieces, it returns OpenAI delta dicts.");
    res.def("__repr__", [](const ChatResult & r) {
        return "<pyllama.ChatResult format='" + std::string(common_chat_format_name(r.params.format)) +
               "' prompt_len=" + std::to_string(r.params.prompt.size()) + ">";
    });

    py::class_<ChatStream> stream(m, "ChatStream", "Streams the parse of a model's output as OpenAI deltas.");
    // feed() and finish(): parse without the GIL, then build the delta dicts.
    const auto             deltas = [](ChatStream & s, const std::string & piece, bool is_final) {
        std::vector<common_chat_msg_diff> diffs;
        {
            py::gil_scoped_release nogil;
            diffs = s.feed(piece, is_final);
        }
        py::list out;
        for (const auto & d : diffs) {
            out.append(delta_dict(d));
        }
        return out;
    };
    stream.def(
        "feed", [deltas](ChatStream & s, const std::string & piece) { return deltas(s, piece, false); },
        py::arg("piece"), "Add generated text; returns the deltas it completes (possibly none).");
    stream.def(
        "finish", [deltas](ChatStream & s) { return deltas(s, "", true); },
        "The output is complete: returns the last deltas.");
    stream.def_property_readonly(
        "message", [](const ChatStream & s) { return message_dict(s.message()); }, "The message parsed so far.");

    py::class_<ChatTemplate> cls(m, "ChatTemplate", R"doc(
A chat template rendered by llama.cpp's native Jinja engine (common/chat.h).

ChatTemplate(model=None, *, template=None, name=None, bos_token="", eos_token="")

With a model and no template: the model's own template (tokenizer.chat_template, or the named
variant such as "tool_use"); a model without one gets ChatML, as in llama.cpp. `template` is the
Jinja source itself, "chatml", or the name of one of llama_chat_apply_template's built-in formats
(ChatTemplate.builtin_names(): "llama3", "gemma", "mistral-v7", ...), which render plain chat only.
)doc");
    cls.def(py::init([](py::object model, py::object tmpl, py::object name, const std::string & bos,
                        const std::string & eos) {
                Model *     mdl = model.is_none() ? nullptr : model.cast<Model *>();
                std::string src = tmpl.is_none() ? std::string() : tmpl.cast<std::string>();
                if (!name.is_none()) {
                    if (mdl == nullptr || !src.empty()) {
                        throw std::invalid_argument(
                            "name selects one of the model's templates: give a model and no "
                            "template");
                    }
                    const std::string n    = name.cast<std::string>();
                    auto              use  = mdl->acquire();
                    const char *      text = llama_model_chat_template(use.model, n.c_str());
                    if (text == nullptr) {
                        throw std::invalid_argument("the model has no chat template named '" + n + "'");
                    }
                    src = text;
                }
                py::gil_scoped_release nogil;
                return std::make_unique<ChatTemplate>(mdl, src, bos, eos);
            }),
            py::arg("model") = py::none(), py::kw_only(), py::arg("template") = py::none(),
            py::arg("name") = py::none(), py::arg("bos_token") = "", py::arg("eos_token") = "");
    cls.def_property_readonly("source", [](const ChatTemplate & t) { return t.source(""); });
    cls.def_property_readonly(
        "builtin",
        [](const ChatTemplate & t) -> py::object {
            return t.legacy().empty() ? py::object(py::none()) : py::object(py::str(t.legacy()));
        },
        "The name of llama_chat_apply_template's built-in format in use, or None for a Jinja template.");
    cls.def_static("builtin_names", &ChatTemplate::builtin_names,
                   "The built-in formats of llama_chat_apply_template, for plain chat without tools.");
    cls.def_property_readonly("caps", &ChatTemplate::caps,
                              "What the template supports: tools, parallel tool calls, system role, thinking, ...");
    cls.def_property_readonly("supports_thinking", &ChatTemplate::supports_thinking);
    cls.def(
        "apply",
        [](const ChatTemplate & t, const py::object & messages, const py::object & tools,
           const py::object & tool_choice, const py::object & parallel_tool_calls, bool add_generation_prompt,
           const py::object & enable_thinking, const std::string & reasoning_format,
           const py::object & chat_template_kwargs, const py::object & json_schema, const py::object & grammar,
           bool strict_tool_choice, const py::object & continue_final_message) {
            std::string                  named;
            common_chat_templates_inputs in =
                make_inputs(messages, tools, tool_choice, parallel_tool_calls, add_generation_prompt, enable_thinking,
                            chat_template_kwargs, json_schema, grammar, continue_final_message, named);
            common_reasoning_format rf = common_reasoning_format_from_name(reasoning_format);
            in.reasoning_format        = rf;
            py::gil_scoped_release nogil;
            return on_large_stack([&] { return t.apply(std::move(in), rf, named, strict_tool_choice); });
        },
        py::arg("messages"), py::kw_only(), py::arg("tools") = py::none(), py::arg("tool_choice") = py::none(),
        py::arg("parallel_tool_calls") = py::none(), py::arg("add_generation_prompt") = true,
        py::arg("enable_thinking") = py::none(), py::arg("reasoning_format") = "auto",
        py::arg("chat_template_kwargs") = py::none(), py::arg("json_schema") = py::none(),
        py::arg("grammar") = py::none(), py::arg("strict_tool_choice") = true,
        py::arg("continue_final_message") = py::none(),
        "Render OpenAI-format messages (and tools) into the prompt; returns a ChatResult with the grammar, its "
        "triggers, preserved tokens, stop strings, the format's name, and parse()/stream() for the output. "
        "continue_final_message=True (or 'content' / 'reasoning_content') ends the prompt inside the final "
        "assistant message, so that the model continues it (prefill); parse() and stream() then give only what "
        "the model adds.");
}

}  // namespace pyllama
