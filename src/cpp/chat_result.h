// ChatResult: the outcome of one ChatTemplate.apply, shared by chat.cpp and sampler.cpp.
#pragma once

#include "pyllama.h"

#include "chat.h"  // llama.cpp's common/chat.h

#include <string>

namespace pyllama {

// The result of one apply: the prompt, the constraints for sampling, and this request's parser.
class ChatResult {
  public:
    common_chat_params        params;
    common_chat_parser_params parser;
    bool                      strict = false;  // the "required" grammar was made strict
    std::string               strict_failure;  // why it could not be, when asked

    common_chat_msg parse(const std::string & text, bool is_partial) const {
        log_capture capture;
        try {
            return common_chat_parse(text, is_partial, parser);
        } catch (const std::exception & e) {
            throw std::invalid_argument(std::string("the output does not parse as this template's format: ") +
                                        e.what());
        }
    }
};

}  // namespace pyllama
