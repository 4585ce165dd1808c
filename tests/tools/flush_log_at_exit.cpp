// Linked into the tests' llama-mtmd-cli (CMakeLists.txt, PYLLAMA_TEST_TOOLS). The tool prints its reply
// through common/log's worker thread, which the process can leave before everything is written (the
// logger is never destroyed); draining it at exit lets the tests read the whole reply.
#include "log.h"

#include <cstdlib>

namespace {

struct flush_log_at_exit {
    flush_log_at_exit() {
        std::atexit([] { common_log_pause(common_log_main()); });
    }
} g_flush_log_at_exit;

}  // namespace
