// GBNF utilities over llama.cpp's own grammar engine (src/llama-grammar.h):
//  - grammar_match: does a grammar accept a text, wholly or as a prefix;
//  - strict_tool_grammar: the rewrite that makes tool_choice="required" strict;
//  - single_tool_call_grammar: the rewrite that allows at most one call (parallel_tool_calls=false).
//
// At this commit llama.cpp's generated grammar for "required" lets free text come before the first
// call (for Qwen 2.5: root ::= "<|im_start|>assistant\n" space until-169? tool-calls), so a weak
// model rambles and never calls. OpenAI and vLLM read "required" as: the reply is the call. The
// rewrite works on the structure of the generated root, classifying each part by asking llama.cpp's
// grammar engine what it accepts, never by the generated rule names:
//  - a part "reaches the call" when it (through the rules it uses) spells a declared tool's name;
//  - before the call, a part is "prose" when it accepts ordinary text ("Hello") at its start, and a
//    "reasoning block" when it accepts the format's thinking start tag and no prose;
//  - prose before the call goes: alternatives that carry it are dropped where another alternative
//    reaches the call without it, otherwise nullable prose is left out; reasoning blocks and fixed
//    framing (role headers, whitespace) stay; blocks that are neither are filtered the same way.

#include "grammar.h"

#include "model.h"

#include "large_stack.h"
#include "llama-grammar.h"  // llama.cpp's src/: the grammar engine, linked in statically

#include <algorithm>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace pyllama {

namespace {

// --- UTF-8 -----------------------------------------------------------------------------------------

bool decode_utf8_strict(const std::string & text, std::vector<uint32_t> & out) {
    size_t i = 0;
    while (i < text.size()) {
        const auto c   = static_cast<unsigned char>(text[i]);
        int        len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
        if (len == 0 || i + len > text.size()) {
            return false;
        }
        uint32_t cp = len == 1 ? c : c & (0xFF >> (len + 1));
        for (int k = 1; k < len; ++k) {
            const auto cc = static_cast<unsigned char>(text[i + k]);
            if ((cc & 0xC0) != 0x80) {
                return false;
            }
            cp = (cp << 6) | (cc & 0x3F);
        }
        out.push_back(cp);
        i += len;
    }
    return true;
}

struct grammar_deleter {
    void operator()(llama_grammar * g) const { llama_grammar_free_impl(g); }
};

using grammar_ptr = std::unique_ptr<llama_grammar, grammar_deleter>;

grammar_ptr init_grammar(const std::string & gbnf, const std::string & root, const llama_vocab * vocab) {
    try {
        return grammar_ptr(llama_grammar_init_impl(vocab, gbnf.c_str(), root.c_str(), false, nullptr, 0, nullptr, 0));
    } catch (const std::exception &) {
        return nullptr;
    }
}

grammar_match_result run_match(llama_grammar & g, const std::vector<uint32_t> & cps) {
    for (uint32_t cp : cps) {
        llama_grammar_accept(&g, cp);
        if (g.stacks.empty()) {
            return grammar_match_result::rejected;
        }
    }
    for (const auto & stack : g.stacks) {
        if (stack.empty()) {
            return grammar_match_result::complete;
        }
    }
    return grammar_match_result::partial;
}

// --- GBNF structure --------------------------------------------------------------------------------

struct token {
    enum kind_t { name, define, string, cls, tok, any, open, close, bar, postfix } kind;
    std::string text;
};

std::vector<token> tokenize_gbnf(const std::string & src) {
    std::vector<token> out;
    size_t             i    = 0;
    const size_t       n    = src.size();
    auto               word = [](char c) {
        return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_';
    };
    // reads a quoted run ending at `end`, honouring backslash escapes
    auto quoted = [&](char end) {
        const size_t start = i++;
        while (i < n && src[i] != end) {
            i += src[i] == '\\' ? 2 : 1;
        }
        if (i >= n) {
            throw std::invalid_argument("unterminated literal in grammar");
        }
        ++i;
        return src.substr(start, i - start);
    };
    while (i < n) {
        const char c = src[i];
        if (c == ' ' || c == '\t' || c == '\r' || c == '\n') {
            ++i;
        } else if (c == '#') {
            while (i < n && src[i] != '\n') {
                ++i;
            }
        } else if (src.compare(i, 3, "::=") == 0) {
            out.push_back({ token::define, "::=" });
            i += 3;
        } else if (c == '"') {
            out.push_back({ token::string, quoted('"') });
        } else if (c == '[') {
            out.push_back({ token::cls, quoted(']') });
        } else if (c == '<' || (c == '!' && i + 1 < n && src[i + 1] == '<')) {
            const size_t start = i;
            i                  = src.find('>', i);
            if (i == std::string::npos) {
                throw std::invalid_argument("unterminated token in grammar");
            }
            ++i;
            out.push_back({ token::tok, src.substr(start, i - start) });
        } else if (c == '{') {
            const size_t end = src.find('}', i);
            if (end == std::string::npos) {
                throw std::invalid_argument("unterminated repetition in grammar");
            }
            out.push_back({ token::postfix, src.substr(i, end + 1 - i) });
            i = end + 1;
        } else if (c == '?' || c == '*' || c == '+') {
            out.push_back({ token::postfix, std::string(1, c) });
            ++i;
        } else if (c == '(' || c == ')' || c == '|' || c == '.') {
            out.push_back({ c == '('   ? token::open
                            : c == ')' ? token::close
                            : c == '|' ? token::bar
                                       : token::any,
                            std::string(1, c) });
            ++i;
        } else if (word(c)) {
            const size_t start = i;
            while (i < n && word(src[i])) {
                ++i;
            }
            out.push_back({ token::name, src.substr(start, i - start) });
        } else {
            throw std::invalid_argument(std::string("unexpected character in grammar: ") + c);
        }
    }
    return out;
}

// An expression: alternatives of sequences of items. An item is a primary (a literal, class, token,
// '.', rule reference or parenthesised group) with its postfix operators.
struct expr;

struct item {
    std::string           text;     // the primary as written, unless a group
    std::string           ref;      // the rule it names, if a reference
    std::string           literal;  // the decoded text, if a string literal
    std::shared_ptr<expr> group;
    std::string           postfix;
};

struct expr {
    std::vector<std::vector<item>> alts;
};

std::string decode_literal(const std::string & quoted) {
    std::string out;
    for (size_t i = 1; i + 1 < quoted.size(); ++i) {
        char c = quoted[i];
        if (c != '\\') {
            out += c;
            continue;
        }
        c = quoted[++i];
        switch (c) {
            case 'n': out += '\n'; break;
            case 't': out += '\t'; break;
            case 'r': out += '\r'; break;
            case 'x':
            case 'u':
            case 'U': {
                const int len = c == 'x' ? 2 : c == 'u' ? 4 : 8;
                uint32_t  cp  = std::stoul(quoted.substr(i + 1, len), nullptr, 16);
                i += len;
                // the tool-name search needs only ASCII; other code points are kept as UTF-8
                if (cp < 0x80) {
                    out += static_cast<char>(cp);
                } else if (cp < 0x800) {
                    out += static_cast<char>(0xC0 | (cp >> 6));
                    out += static_cast<char>(0x80 | (cp & 0x3F));
                } else if (cp < 0x10000) {
                    out += static_cast<char>(0xE0 | (cp >> 12));
                    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
                    out += static_cast<char>(0x80 | (cp & 0x3F));
                } else {
                    out += static_cast<char>(0xF0 | (cp >> 18));
                    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
                    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
                    out += static_cast<char>(0x80 | (cp & 0x3F));
                }
                break;
            }
            default: out += c;
        }
    }
    return out;
}

class expr_parser {
  public:
    expr_parser(const std::vector<token> & toks, size_t begin, size_t end) : toks_(toks), pos_(begin), end_(end) {}

    std::shared_ptr<expr> parse_alts() {
        auto e = std::make_shared<expr>();
        e->alts.emplace_back();
        while (pos_ < end_) {
            const token & t = toks_[pos_];
            if (t.kind == token::close) {
                break;
            }
            if (t.kind == token::bar) {
                ++pos_;
                e->alts.emplace_back();
                continue;
            }
            e->alts.back().push_back(parse_item());
        }
        return e;
    }

    size_t pos() const { return pos_; }

  private:
    item parse_item() {
        const token & t = toks_[pos_++];
        item          it;
        switch (t.kind) {
            case token::open:
                it.group = parse_alts();
                if (pos_ >= end_ || toks_[pos_].kind != token::close) {
                    throw std::invalid_argument("unbalanced parentheses in grammar");
                }
                ++pos_;
                break;
            case token::name:
                it.ref  = t.text;
                it.text = t.text;
                break;
            case token::string:
                it.literal = decode_literal(t.text);
                it.text    = t.text;
                break;
            case token::cls:
            case token::tok:
            case token::any: it.text = t.text; break;
            default: throw std::invalid_argument("unexpected '" + t.text + "' in grammar");
        }
        while (pos_ < end_ && toks_[pos_].kind == token::postfix) {
            it.postfix += toks_[pos_++].text;
        }
        return it;
    }

    const std::vector<token> & toks_;
    size_t                     pos_;
    size_t                     end_;
};

std::string print_expr(const expr & e);

std::string print_item(const item & it) {
    return (it.group ? "(" + print_expr(*it.group) + ")" : it.text) + it.postfix;
}

std::string print_seq(const std::vector<item> & seq) {
    std::string out;
    for (const auto & it : seq) {
        out += (out.empty() ? "" : " ") + print_item(it);
    }
    return out;
}

std::string print_expr(const expr & e) {
    std::string out;
    for (size_t i = 0; i < e.alts.size(); ++i) {
        out += (i ? " | " : "") + print_seq(e.alts[i]);
    }
    return out;
}

bool optional_postfix(const std::string & postfix) {
    return postfix == "?" || postfix == "*" || postfix.rfind("{0", 0) == 0;
}

// The rewrite. It keeps the grammar's rules as they are and adds rewritten copies where it must.
class strictifier {
  public:
    strictifier(const std::string &              gbnf,
                const std::vector<std::string> & names,
                std::string                      thinking_start,
                std::vector<std::string>         thinking_ends,
                const llama_vocab *              vocab) :
        gbnf_(gbnf),
        names_(names),
        thinking_start_(std::move(thinking_start)),
        thinking_ends_(std::move(thinking_ends)),
        vocab_(vocab) {
        const auto toks = tokenize_gbnf(gbnf);
        for (size_t i = 0; i + 1 < toks.size(); ++i) {
            if (toks[i].kind == token::name && toks[i + 1].kind == token::define) {
                size_t end = i + 2;
                while (end < toks.size() && !(toks[end].kind == token::name && end + 1 < toks.size() &&
                                              toks[end + 1].kind == token::define)) {
                    ++end;
                }
                expr_parser p(toks, i + 2, end);
                rules_[toks[i].text] = p.parse_alts();
                if (p.pos() != end) {
                    throw std::invalid_argument("unbalanced parentheses in grammar");
                }
                i = end - 1;
            }
        }
        find_calling_rules();
    }

    // The strict grammar, or nullopt (and why) where the root cannot be made strict.
    std::optional<std::string> run(std::string & why) {
        auto it = rules_.find("root");
        if (it == rules_.end()) {
            why = "the grammar has no root rule";
            return std::nullopt;
        }
        auto root = call_level(*it->second);
        if (!root) {
            why = "no alternative of the grammar's root reaches a tool call";
            return std::nullopt;
        }
        std::string out;
        for (const auto & [name, e] : rules_) {
            out += name + " ::= " + print_expr(name == "root" ? **root : *e) + "\n";
        }
        out += extra_;
        return out;
    }

    // At most one call. llama.cpp's formats with a marker per call (Hermes, Qwen 2.5: a
    // <tool_call> block each) repeat the block whatever parallel_tool_calls says, as in
    // `tool-calls ::= (tool-call space)+`. From the root down to the rules that are a call (those
    // that spell a tool's name themselves), a repetition of something that reaches a call is taken
    // once (`+` and `{n,m}` once, `*` as `?`), and a call that may follow another in the same
    // sequence goes. Nullopt when nothing repeats a call.
    std::optional<std::string> run_single() {
        bool changed = false;
        for (const auto & name : order_from_root()) {
            rules_[name] = single(*rules_[name], changed);
        }
        if (!changed) {
            return std::nullopt;
        }
        std::string out;
        for (const auto & [name, e] : rules_) {
            out += name + " ::= " + print_expr(*e) + "\n";
        }
        return out;
    }

  private:
    enum class verdict { keep, remove, drop };

    // --- what an item accepts, asked of llama.cpp's engine ---------------------------------------

    grammar_match_result probe(const item & it, const std::string & text) {
        const std::string key = print_item(it) + '\x01' + text;
        auto              hit = probes_.find(key);
        if (hit != probes_.end()) {
            return hit->second;
        }
        const std::string     gbnf = gbnf_ + "\n" + extra_ + "pyllama-probe ::= " + print_item(it) + "\n";
        auto                  g    = init_grammar(gbnf, "pyllama-probe", vocab_);
        std::vector<uint32_t> cps;
        decode_utf8_strict(text, cps);
        // a grammar the engine cannot build (it names tokens, say) is treated as accepting nothing
        const auto result = g ? run_match(*g, cps) : grammar_match_result::rejected;
        probes_[key]      = result;
        return result;
    }

    bool is_prose(const item & it) { return probe(it, "Hello") != grammar_match_result::rejected; }

    bool is_nullable(const item & it) {
        return optional_postfix(it.postfix) || probe(it, "") == grammar_match_result::complete;
    }

    bool is_reasoning(const item & it) {
        return !thinking_start_.empty() && probe(it, thinking_start_) != grammar_match_result::rejected;
    }

    // --- does an item spell a declared tool's name ----------------------------------------------

    bool names_a_tool(const std::string & literal) const {
        for (const auto & n : names_) {
            if (!n.empty() && literal.find(n) != std::string::npos) {
                return true;
            }
        }
        return false;
    }

    bool reaches_call(const expr & e) {
        for (const auto & seq : e.alts) {
            for (const auto & it : seq) {
                if (reaches_call(it)) {
                    return true;
                }
            }
        }
        return false;
    }

    bool reaches_call(const item & it) {
        if (it.group) {
            return reaches_call(*it.group);
        }
        if (!it.literal.empty()) {
            return names_a_tool(it.literal);
        }
        if (it.ref.empty()) {
            return false;
        }
        if (calling_.count(it.ref)) {
            return true;
        }
        auto added = added_.find(it.ref);  // a rewritten copy: it uses the rules above, no cycle
        return added != added_.end() && reaches_call(*added->second);
    }

    // The rules that reach a call, directly or through others: a fixpoint, so cycles are exact.
    void find_calling_rules() {
        for (bool grew = true; grew;) {
            grew = false;
            for (const auto & [name, body] : rules_) {
                if (!calling_.count(name) && reaches_call(*body)) {
                    calling_.insert(name);
                    grew = true;
                }
            }
        }
    }

    // --- one call ---------------------------------------------------------------------------------

    // A rule that is a call itself: one of its own literals spells a tool's name.
    bool is_call_rule(const expr & e) const {
        for (const auto & seq : e.alts) {
            for (const auto & it : seq) {
                if ((!it.literal.empty() && names_a_tool(it.literal)) || (it.group && is_call_rule(*it.group))) {
                    return true;
                }
            }
        }
        return false;
    }

    // The rules on the way from the root to the calls, not the calls themselves.
    std::vector<std::string> order_from_root() {
        std::vector<std::string>          out;
        std::set<std::string>             seen;
        std::function<void(const expr &)> walk = [&](const expr & e) {
            for (const auto & seq : e.alts) {
                for (const auto & it : seq) {
                    if (it.group) {
                        walk(*it.group);
                    } else if (!it.ref.empty() && calling_.count(it.ref) && seen.insert(it.ref).second) {
                        const auto & body = *rules_.at(it.ref);
                        if (!is_call_rule(body)) {
                            out.push_back(it.ref);
                            walk(body);
                        }
                    }
                }
            }
        };
        if (rules_.count("root") && !is_call_rule(*rules_["root"])) {
            seen.insert("root");
            out.push_back("root");
            walk(*rules_["root"]);
        }
        return out;
    }

    std::shared_ptr<expr> single(const expr & e, bool & changed) {
        auto out = std::make_shared<expr>();
        for (const auto & seq : e.alts) {
            std::vector<item> kept;
            bool              seen_call = false;
            for (item it : seq) {
                const bool calls = reaches_call(it);
                if (it.group && calls && !is_call_rule(*it.group)) {
                    it.group = single(*it.group, changed);
                }
                if (calls) {
                    const bool optional = optional_postfix(it.postfix);
                    if (seen_call && optional) {
                        changed = true;  // a further call: it goes
                        continue;
                    }
                    if (!it.postfix.empty() && it.postfix != "?") {
                        it.postfix = optional ? "?" : "";
                        changed    = true;
                    }
                    seen_call = true;
                }
                kept.push_back(std::move(it));
            }
            out->alts.push_back(std::move(kept));
        }
        return out;
    }

    // --- the rewrite ------------------------------------------------------------------------------

    // Gives a rewritten body its own rule, named after the one it replaces.
    void rebind(item & it, std::shared_ptr<expr> body) {
        if (it.group) {
            it.group = std::move(body);
            return;
        }
        std::string name = it.ref + "-strict";
        for (int k = 2; rules_.count(name) || added_.count(name); ++k) {
            name = it.ref + "-strict" + std::to_string(k);
        }
        added_[name] = body;
        extra_ += name + " ::= " + print_expr(*body) + "\n";
        it.ref  = name;
        it.text = name;
    }

    std::shared_ptr<expr> body_of(const item & it) {
        if (it.group) {
            return it.group;
        }
        auto rule = rules_.find(it.ref);
        if (rule != rules_.end()) {
            return rule->second;
        }
        auto added = added_.find(it.ref);
        return added != added_.end() ? added->second : nullptr;
    }

    // An item before the call. `strict`: prose drops the alternative that carries it; otherwise
    // nullable prose is only left out.
    verdict before_call(item & it, bool strict) {
        if (is_prose(it)) {
            return !strict && is_nullable(it) ? verdict::remove : verdict::drop;
        }
        if (!it.literal.empty() || (!it.group && it.ref.empty())) {
            return verdict::keep;  // fixed framing: a literal, a class, a token
        }
        auto body = body_of(it);
        if (!body) {
            return verdict::keep;
        }
        // a reasoning block; a choice is judged alternative by alternative
        if (body->alts.size() == 1 && is_reasoning(it)) {
            return verdict::keep;
        }
        // a block that starts with markup: filter what it may hold
        if (!it.ref.empty() && !visiting_.insert(it.ref).second) {
            return verdict::keep;
        }
        auto filtered = std::make_shared<expr>();
        bool changed  = false;
        for (auto seq : body->alts) {
            bool ok = is_reasoning_seq(seq, seq.size()) || filter_seq(seq, seq.size(), true, changed);
            if (ok) {
                filtered->alts.push_back(std::move(seq));
            } else {
                changed = true;
            }
        }
        if (!it.ref.empty()) {
            visiting_.erase(it.ref);
        }
        if (filtered->alts.empty()) {
            return optional_postfix(it.postfix) ? verdict::remove : verdict::drop;
        }
        if (changed) {
            rebind(it, filtered);
        }
        return verdict::keep;
    }

    // Whether seq[0..upto) as a whole is a reasoning block: it opens with the thinking tag itself.
    bool is_reasoning_seq(const std::vector<item> & seq, size_t upto) {
        if (upto == 0 || thinking_start_.empty() || seq[0].literal != thinking_start_ || !seq[0].postfix.empty()) {
            return false;
        }
        item whole;
        whole.group = std::make_shared<expr>();
        whole.group->alts.emplace_back(seq.begin(), seq.begin() + upto);
        return !is_prose(whole) && is_reasoning(whole);
    }

    // Applies before_call to seq[0..upto); false when the sequence must go.
    bool filter_seq(std::vector<item> & seq, size_t upto, bool strict, bool & changed) {
        std::vector<item> out;
        for (size_t i = 0; i < seq.size(); ++i) {
            // a reasoning block spelled out in the sequence: the thinking tag, anything, an end tag
            if (i < upto && !thinking_start_.empty() && seq[i].literal == thinking_start_ && seq[i].postfix.empty()) {
                size_t j = i + 1;
                while (j < upto && !(seq[j].postfix.empty() && std::find(thinking_ends_.begin(), thinking_ends_.end(),
                                                                         seq[j].literal) != thinking_ends_.end())) {
                    ++j;
                }
                if (j < upto) {
                    out.insert(out.end(), seq.begin() + i, seq.begin() + j + 1);
                    i = j;
                    continue;
                }
            }
            if (i >= upto) {
                out.push_back(seq[i]);
                continue;
            }
            item       copy = seq[i];
            const auto v    = before_call(copy, strict);
            if (v == verdict::drop) {
                return false;
            }
            if (v == verdict::remove) {
                // the text goes; a little whitespace may stay (a model's newline before its call)
                changed = true;
                item ws;
                ws.text    = "[ \\t\\n]";
                ws.postfix = "{0,4}";
                out.push_back(std::move(ws));
                continue;
            }
            changed = changed || print_item(copy) != print_item(seq[i]);
            out.push_back(std::move(copy));
        }
        seq = std::move(out);
        return true;
    }

    // A rule (or group) on the way to the call: its alternatives that reach the call, each starting
    // with the call (after framing and reasoning). Nullopt when none can.
    std::optional<std::shared_ptr<expr>> call_level(const expr & e) {
        for (bool strict : { true, false }) {
            auto result = std::make_shared<expr>();
            for (auto seq : e.alts) {
                size_t k = 0;
                while (k < seq.size() && !reaches_call(seq[k])) {
                    ++k;
                }
                if (k == seq.size()) {
                    continue;  // no call down this way
                }
                bool changed = false;
                if (!is_reasoning_seq(seq, k) && !filter_seq(seq, k, strict, changed)) {
                    continue;
                }
                // the call item itself may hold prose before the call (a group of alternatives)
                k = 0;
                while (!reaches_call(seq[k])) {
                    ++k;
                }
                // A choice on the way to the call may hold prose before the call in some of its
                // alternatives (text, then a call): judge each. A single sequence is the call itself.
                item & call = seq[k];
                auto   body = body_of(call);
                if (call.literal.empty() && body && body->alts.size() > 1 &&
                    (call.ref.empty() || visiting_.insert(call.ref).second)) {
                    auto inner = body ? call_level(*body) : std::nullopt;
                    if (!call.ref.empty()) {
                        visiting_.erase(call.ref);
                    }
                    if (body && !inner) {
                        continue;
                    }
                    if (inner && print_expr(**inner) != print_expr(*body)) {
                        rebind(call, *inner);
                    }
                }
                result->alts.push_back(std::move(seq));
            }
            if (!result->alts.empty()) {
                return result;
            }
        }
        return std::nullopt;
    }

    const std::string &                          gbnf_;
    const std::vector<std::string> &             names_;
    std::string                                  thinking_start_;
    std::map<std::string, std::shared_ptr<expr>> rules_;
    std::map<std::string, std::shared_ptr<expr>> added_;
    std::string                                  extra_;
    std::set<std::string>                        calling_;
    std::map<std::string, grammar_match_result>  probes_;
    std::set<std::string>                        visiting_;
    std::vector<std::string>                     thinking_ends_;
    const llama_vocab *                          vocab_;
};

}  // namespace

grammar_match_result grammar_match(const std::string & gbnf,
                                   const std::string & text,
                                   const std::string & root,
                                   const llama_vocab * vocab) {
    std::vector<uint32_t> cps;
    if (!decode_utf8_strict(text, cps)) {
        throw std::invalid_argument("text is not valid UTF-8");
    }
    log_capture capture;
    auto        g = init_grammar(gbnf, root, vocab);
    if (!g) {
        const std::string why = capture.problems();
        throw std::invalid_argument("the grammar does not parse" + (why.empty() ? std::string() : ": " + why));
    }
    return run_match(*g, cps);
}

std::optional<std::string> strict_tool_grammar(const std::string &              gbnf,
                                               const std::vector<std::string> & tool_names,
                                               const std::string &              thinking_start_tag,
                                               const std::vector<std::string> & thinking_end_tags,
                                               const llama_vocab *              vocab,
                                               std::string &                    why) {
    log_capture capture;  // the probes' parse messages are ours to drop
    try {
        strictifier s(gbnf, tool_names, thinking_start_tag, thinking_end_tags, vocab);
        auto        out = s.run(why);
        if (out && !init_grammar(*out, "root", vocab)) {
            why = "the rewritten grammar does not build";
            return std::nullopt;
        }
        return out;
    } catch (const std::exception & e) {
        why = e.what();
        return std::nullopt;
    }
}

std::optional<std::string> single_tool_call_grammar(const std::string &              gbnf,
                                                    const std::vector<std::string> & tool_names,
                                                    const llama_vocab *              vocab) {
    log_capture capture;
    try {
        strictifier s(gbnf, tool_names, "", {}, vocab);
        auto        out = s.run_single();
        if (out && !init_grammar(*out, "root", vocab)) {
            return std::nullopt;  // the rewrite does not build: keep llama.cpp's grammar
        }
        return out;
    } catch (const std::exception &) {
        return std::nullopt;
    }
}

// Bounds on GBNF text (llama.cpp's own grammars: at most 1.4 KB, 21 rules, 2 levels of parentheses;
// a schema's grammar: 350 KB and 6,000 rules for 3,000 properties, a nesting level per regex group).
constexpr size_t kMaxGrammarBytes = size_t{ 1 } << 20;
constexpr int    kMaxGrammarDepth = 512;
constexpr size_t kMaxGrammarRules = 20000;

void check_grammar_bounds(const std::string & gbnf, const char * param) {
    if (gbnf.size() > kMaxGrammarBytes) {
        throw grammar_error(std::string(param) + ": the grammar has " + std::to_string(gbnf.size()) +
                                " bytes; the limit is " + std::to_string(kMaxGrammarBytes),
                            param);
    }
    int          depth = 0;
    size_t       rules = 0;
    const size_t n     = gbnf.size();
    for (size_t i = 0; i < n;) {
        const char c = gbnf[i];
        if (c == '#') {  // a comment, to the end of the line
            while (i < n && gbnf[i] != '\n' && gbnf[i] != '\r') {
                ++i;
            }
        } else if (c == '"' || c == '[') {  // a literal or a character class, with its escapes
            const char close = c == '"' ? '"' : ']';
            for (++i; i < n && gbnf[i] != close; i += gbnf[i] == '\\' ? 2 : 1) {
            }
            ++i;
        } else {
            if (c == '(' && ++depth > kMaxGrammarDepth) {
                throw grammar_error(std::string(param) + ": the grammar nests parentheses deeper than " +
                                        std::to_string(kMaxGrammarDepth) + " levels",
                                    param);
            }
            if (c == ')') {
                --depth;
            }
            if (c == ':' && gbnf.compare(i, 3, "::=") == 0 && ++rules > kMaxGrammarRules) {
                throw grammar_error(
                    std::string(param) + ": the grammar has more than " + std::to_string(kMaxGrammarRules) + " rules",
                    param);
            }
            ++i;
        }
    }
}

void register_grammar(py::module_ & m) {
    m.def(
        "grammar_match",
        [](const std::string & grammar, const std::string & text, const std::string & root, py::object model) {
            std::shared_ptr<llama_model> keep;
            if (!model.is_none()) {
                keep = model.cast<Model *>()->shared();
            }
            check_grammar_bounds(grammar, "grammar");
            grammar_match_result r;
            {
                py::gil_scoped_release nogil;
                r = on_large_stack([&] {
                    return grammar_match(grammar, text, root, keep ? llama_model_get_vocab(keep.get()) : nullptr);
                });
            }
            return r == grammar_match_result::complete  ? "complete"
                   : r == grammar_match_result::partial ? "partial"
                                                        : "rejected";
        },
        py::arg("grammar"), py::arg("text"), py::kw_only(), py::arg("root") = "root", py::arg("model") = py::none(),
        "Feed text to a GBNF grammar with llama.cpp's grammar engine: 'complete' (the grammar accepts it), "
        "'partial' (it accepts a continuation of it) or 'rejected'. A model is needed for grammars that name "
        "tokens (<[id]>, <|tag|>).");
}

}  // namespace pyllama
