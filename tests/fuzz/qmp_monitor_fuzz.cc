// libFuzzer target: arbitrary bytes into a QMP monitor session of a live engine. Exercises the JSON
// stream splitter, the JSON parser, negotiation, the request envelope checks and the generated
// argument validation of every command. The engine must answer each input and never crash.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string_view>

#include "qmp/engine.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // One engine for the whole run, deliberately never destroyed: its shutdown at process exit
  // would race with the fuzzer's own exit-time leak check.
  static blockd::qmp::Engine* engine = [] {
    auto created = blockd::qmp::Engine::create();
    if (!created) __builtin_trap();
    return std::move(created).value().release();
  }();
  auto monitor = engine->open_monitor();
  // The first half of the inputs negotiate first so that commands get past negotiation.
  if (size > 0 && (data[0] & 1)) (void)monitor->feed("{\"execute\":\"qmp_capabilities\"}");
  // A quit would stop the engine for every later input; the fuzzer must not reach it.
  std::string_view input(reinterpret_cast<const char*>(data), size);
  if (input.find("quit") != std::string_view::npos) return 0;
  (void)monitor->feed(input);
  return 0;
}
