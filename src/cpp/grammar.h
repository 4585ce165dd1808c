// GBNF utilities over llama.cpp's own grammar engine (see grammar.cpp).
#pragma once

#include "pyllama.h"

#include <optional>
#include <string>
#include <vector>

struct llama_vocab;

namespace pyllama {

enum class grammar_match_result { rejected, partial, complete };

// Feeds `text` to the grammar: rejected, partial (a prefix of something it accepts) or complete.
// Raises ValueError when the grammar does not parse or the text is not UTF-8.
grammar_match_result grammar_match(const std::string & gbnf,
                                   const std::string & text,
                                   const std::string & root  = "root",
                                   const llama_vocab * vocab = nullptr);

// The grammar of a tool_choice="required" request rewritten so that the reply starts with a call
// (after framing and a reasoning block); nullopt, with the reason in `why`, where it cannot be.
std::optional<std::string> strict_tool_grammar(const std::string &              gbnf,
                                               const std::vector<std::string> & tool_names,
                                               const std::string &              thinking_start_tag,
                                               const std::vector<std::string> & thinking_end_tags,
                                               const llama_vocab *              vocab,
                                               std::string &                    why);

// The grammar of a parallel_tool_calls=false request rewritten so that it holds at most one call;
// nullopt where it already does (or the rewrite would not build).
std::optional<std::string> single_tool_call_grammar(const std::string &              gbnf,
                                                    const std::vector<std::string> & tool_names,
                                                    const llama_vocab *              vocab);

}  // namespace pyllama
