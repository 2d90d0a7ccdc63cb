// libFuzzer target: arbitrary bytes as a qemu-storage-daemon command-line option value
// (--blockdev, --export, --object, --nbd-server), through the keyval parser and the generated
// visitors' keyval mode (strings converted to the schema's integers, booleans, enums, nested
// structs, unions, alternates and lists). The first byte picks the option; the rest is its text.
// No option is executed: this covers the parsing that qmp_monitor_fuzz never reaches (QMP input
// is JSON, visited in QMP mode).
//
// Invariant checked: options that parse re-encode (to_json) into JSON that the QMP-mode visitor
// accepts and that encodes to the same JSON again.
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

#include "qapi/types.h"
#include "qapi/visit.h"
#include "qmp/keyval.h"

namespace {

namespace qapi = blockd::qapi;

template <typename Options>
void check_options(const nlohmann::json& parsed) {
  Options options;
  if (!qapi::from_json(parsed, options, qapi::InputMode::kKeyval, "")) return;
  const nlohmann::json encoded = qapi::to_json(options);
  Options again;
  if (!qapi::from_json(encoded, again, qapi::InputMode::kQmp, "")) __builtin_trap();
  if (qapi::to_json(again) != encoded) __builtin_trap();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::string_view text(reinterpret_cast<const char*>(data) + 1, size - 1);
  // The implied keys are those of qemu-storage-daemon's options.
  switch (data[0] % 4) {
    case 0:
      if (auto parsed = blockd::qmp::keyval_parse(text, "driver")) {
        check_options<qapi::BlockdevOptions>(*parsed);
      }
      break;
    case 1:
      if (auto parsed = blockd::qmp::keyval_parse(text, "type")) {
        check_options<qapi::BlockExportOptions>(*parsed);
      }
      break;
    case 2:
      if (auto parsed = blockd::qmp::keyval_parse(text, "qom-type")) {
        check_options<qapi::ObjectOptions>(*parsed);
      }
      break;
    default:
      if (auto parsed = blockd::qmp::keyval_parse(text, std::nullopt)) {
        check_options<qapi::NbdServerOptions>(*parsed);
      }
      break;
  }
  return 0;
}
