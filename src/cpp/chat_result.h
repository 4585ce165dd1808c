// ChatResult: the outcome of one ChatTemplate.apply, shared by chat.cpp and sampler.cpp.
#pragma once

#include "pyllama.h"

#include "chat.h"  // llama.cpp's common/chat.h
#include "large_stack.h"

#include <algorithm>
#include <string>
#include <vector>

namespace pyllama {

// The result of one apply: the prompt, the constraints for sampling, and this request's parser.
class ChatResult {
  public:
    common_chat_params        params;
    common_chat_parser_params parser;
    bool                      strict = false;  // the "required" grammar was made strict
    std::string               strict_failure;  // why it could not be, when asked
    common_chat_msg           prefill;         // continue_final_message: the message the prompt ends inside
    size_t                    max_calls = 0;   // 1 for parallel_tool_calls=false; 0: no limit
    std::vector<llama_token>  prompt_tokens;   // the prompt tokenised for the model (one BOS), when it has one
    std::vector<std::string>  stops;           // stop strings: the format's, and a turn end that is text

    // llama.cpp's tool-call parsers recurse over the JSON they parse: output nesting brackets deeper
    // than this (which a client can provoke) is not given to them, and comes back as content.
    static constexpr int kMaxOutputDepth = 256;

    // Up to this depth the parse runs on the caller's stack (any thread's holds it); deeper, on a large one.
    static constexpr int kShallowDepth = 32;

    common_chat_msg parse(const std::string & text, bool is_partial) const {
        int depth = 0, deepest = 0;
        for (char c : text) {  // an upper bound of the JSON nesting: brackets inside strings count too
            depth += (c == '{' || c == '[') ? 1 : (c == '}' || c == ']') ? -1 : 0;
            deepest = std::max(deepest, depth);
            if (depth > kMaxOutputDepth) {
                throw std::invalid_argument(
                    "the output does not parse as this template's format: it nests "
                    "brackets deeper than " +
                    std::to_string(kMaxOutputDepth) + " levels");
            }
        }
        if (deepest <= kShallowDepth) {
            return parse_unbounded(text, is_partial);  // the common case: no thread per streamed piece
        }
        return on_large_stack([&] { return parse_unbounded(text, is_partial); });
    }

  private:
    common_chat_msg parse_unbounded(const std::string & text, bool is_partial) const {
        log_capture capture;
        try {
            common_chat_msg msg = common_chat_parse(text, is_partial, parser);
            if (parser.is_continuation) {
                strip_prefix(msg.content, prefill.content);
                strip_prefix(msg.reasoning_content, prefill.reasoning_content);
            }
            if (max_calls > 0 && msg.tool_calls.size() > max_calls) {
                msg.tool_calls.resize(max_calls);  // the format's parser takes any number of calls
            }
            return msg;
        } catch (const std::exception & e) {
            throw std::invalid_argument(std::string("the output does not parse as this template's format: ") +
                                        e.what());
        }
    }

    static void strip_prefix(std::string & s, const std::string & prefix) {
        if (!prefix.empty() && s.compare(0, prefix.size(), prefix) == 0) {
            s.erase(0, prefix.size());
        }
    }
};

}  // namespace pyllama
