// Limits on what a chat template may spend while llama.cpp's Jinja engine renders it: time,
// memory and recursion depth. The engine has none of its own, and a template is code from a model
// file: one that loops, recurses or allocates only when a message holds some word passes any vetting
// on sample messages, then ends the process (or never ends) in the chat that holds the word.
//
// A render_scope on the calling thread holds every Jinja execution under it to the limits. On ELF
// platforms (Linux) the linker routes llama.cpp's entry into the Jinja engine
// (jinja::statement::execute, called from chat.cpp and caps.cpp) and the allocations of the code in
// this module (operator new and libstdc++'s string growth) through render_guard.cpp; a crossed limit
// makes the next allocation inside Jinja throw, and every one after it until the render has unwound,
// so the render ends with an exception whatever the template catches. Elsewhere the guard is off
// (render_guard_active() is false) and only the vetting at load and the large stack remain.
#pragma once

#include <cstddef>
#include <string>

namespace pyllama {

struct render_limits {
    double seconds = 10.0;                  // time inside Jinja per apply(), and as much per 32 KiB of input
    size_t bytes   = size_t{ 1024 } << 20;  // memory allocated inside Jinja and not yet freed
    size_t stack   = size_t{ 64 } << 20;    // stack depth of a Jinja execution (recursion)
};

struct render_cost {
    double seconds = 0;
    size_t bytes   = 0;
    size_t stack   = 0;
};

constexpr size_t kSecondsPerBytes = 32 * 1024;  // the time limit grows by itself per this many input bytes

render_limits get_render_limits();
void          set_render_limits(const render_limits & limits);
bool          render_guard_active();  // built with the linker's routing (Linux)
render_cost   render_peaks();         // the most any one scope has spent since the last reset
void          reset_render_peaks();

// While alive, Jinja executions on this thread count against the limits, together. Scopes nest: an
// inner one shares the outer one's account. input_bytes (the messages and tools) scales the time limit.
class render_scope {
  public:
    explicit render_scope(size_t input_bytes = 0);
    ~render_scope();
    render_scope(const render_scope &)             = delete;
    render_scope & operator=(const render_scope &) = delete;

    // Empty, or which limit was crossed, as a sentence for the error ("took longer than 10 s").
    std::string exceeded() const;

  private:
    void * state_;
    bool   owner_;
};

}  // namespace pyllama
