#include "runtime/status.h"

#include <cstring>

namespace blockd {

std::string_view error_class_name(ErrorClass error_class) noexcept {
  switch (error_class) {
    case ErrorClass::kGenericError:
      return "GenericError";
    case ErrorClass::kCommandNotFound:
      return "CommandNotFound";
    case ErrorClass::kDeviceNotActive:
      return "DeviceNotActive";
    case ErrorClass::kDeviceNotFound:
      return "DeviceNotFound";
    case ErrorClass::kKvmMissingCap:
      return "KVMMissingCap";
  }
  return "GenericError";
}

Status Status::with_prefix(std::string_view prefix) const {
  if (is_ok()) return *this;
  std::string text(prefix);
  text += ": ";
  text += message_;
  return Status(error_class_, std::move(text));
}

std::string errno_text(int negative_errno) {
  char buffer[128];
  // GNU strerror_r returns a pointer that may or may not be `buffer`.
  const char* text = strerror_r(-negative_errno, buffer, sizeof buffer);
  return text;
}

}  // namespace blockd
