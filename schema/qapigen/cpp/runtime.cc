// Scalar readers reproducing QEMU 7.2's QObject input visitor (see runtime.h).
#include "qapi/runtime.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <limits>

namespace blockd::qapi::detail {
namespace {

std::string quoted(std::string_view path) { return path.empty() ? "<anonymous>" : std::string(path); }

Status expects(std::string_view path, std::string_view what) {
  return Status::generic("Parameter '" + quoted(path) + "' expects " + std::string(what));
}

// In keyval mode a scalar must be a string; an object or array where a scalar belongs means the
// user wrote sub-keys under a scalar member.
Status keyval_text(const nlohmann::json& in, std::string_view path, const std::string*& out) {
  if (in.is_string()) {
    out = in.get_ptr<const std::string*>();
    return Status::ok();
  }
  if (in.is_object() || in.is_array()) {
    return Status::generic("Parameters '" + quoted(path) + ".*' are unexpected");
  }
  return invalid_type(path, "string");
}

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r'; }

// Parses digits of `base` (0: auto) from `text` starting at `pos`; returns false on overflow or
// no digits.  Sets `pos` past the digits.
bool parse_digits(std::string_view text, size_t& pos, int base, uint64_t& value) {
  if (base == 0) {
    if (pos + 1 < text.size() && text[pos] == '0' && (text[pos + 1] == 'x' || text[pos + 1] == 'X')) {
      // strtoull treats "0x" without hex digits as "0" followed by junk.
      if (pos + 2 < text.size() && std::isxdigit(static_cast<unsigned char>(text[pos + 2]))) {
        base = 16;
        pos += 2;
      } else {
        base = 10;
      }
    } else if (pos < text.size() && text[pos] == '0') {
      base = 8;
    } else {
      base = 10;
    }
  } else if (base == 16 && pos + 1 < text.size() && text[pos] == '0' &&
             (text[pos + 1] == 'x' || text[pos + 1] == 'X') && pos + 2 < text.size() &&
             std::isxdigit(static_cast<unsigned char>(text[pos + 2]))) {
    pos += 2;
  }
  size_t start = pos;
  bool overflow = false;
  value = 0;
  while (pos < text.size()) {
    char c = text[pos];
    int d;
    if (c >= '0' && c <= '9') {
      d = c - '0';
    } else if (c >= 'a' && c <= 'z') {
      d = c - 'a' + 10;
    } else if (c >= 'A' && c <= 'Z') {
      d = c - 'A' + 10;
    } else {
      break;
    }
    if (d >= base) break;
    if (value > (std::numeric_limits<uint64_t>::max() - static_cast<uint64_t>(d)) /
                    static_cast<uint64_t>(base)) {
      overflow = true;
    }
    value = value * static_cast<uint64_t>(base) + static_cast<uint64_t>(d);
    ++pos;
  }
  return pos > start && !overflow;
}

// strtoull-like: leading space, optional sign; sets `negative`.
bool parse_unsigned_prefix(std::string_view text, size_t& pos, int base, uint64_t& value,
                           bool& negative) {
  pos = 0;
  while (pos < text.size() && is_space(text[pos])) ++pos;
  negative = false;
  if (pos < text.size() && (text[pos] == '+' || text[pos] == '-')) {
    negative = text[pos] == '-';
    ++pos;
  }
  return parse_digits(text, pos, base, value);
}

int64_t suffix_multiplier(char c) {
  switch (c) {
    case 'B': case 'b': return 1;
    case 'K': case 'k': return int64_t{1} << 10;
    case 'M': case 'm': return int64_t{1} << 20;
    case 'G': case 'g': return int64_t{1} << 30;
    case 'T': case 't': return int64_t{1} << 40;
    case 'P': case 'p': return int64_t{1} << 50;
    case 'E': case 'e': return int64_t{1} << 60;
    default: return -1;
  }
}

}  // namespace

std::string member_path(std::string_view path, std::string_view name) {
  if (path.empty()) return std::string(name);
  std::string out(path);
  out += '.';
  out += name;
  return out;
}

std::string element_path(std::string_view path, size_t index, InputMode mode) {
  std::string out(path);
  if (mode == InputMode::kKeyval) {
    out += '.' + std::to_string(index);
  } else {
    out += '[' + std::to_string(index) + ']';
  }
  return out;
}

std::string short_name(std::string_view path) {
  if (path.empty() || path.back() == ']') return "null";
  size_t dot = path.rfind('.');
  std::string_view last = dot == std::string_view::npos ? path : path.substr(dot + 1);
  bool digits = !last.empty();
  for (char c : last) digits = digits && c >= '0' && c <= '9';
  return digits ? "null" : std::string(last);
}

Status missing(std::string_view path) {
  return Status::generic("Parameter '" + quoted(path) + "' is missing");
}

Status invalid_type(std::string_view path, std::string_view expected) {
  return Status::generic("Invalid parameter type for '" + quoted(path) + "', expected: " +
                         std::string(expected));
}

Status bad_enum_value(std::string_view path, std::string_view value) {
  return Status::generic("Parameter '" + short_name(path) + "' does not accept value '" +
                         std::string(value) + "'");
}

Status check_object(const nlohmann::json& in, std::string_view path) {
  if (!in.is_object()) return invalid_type(path, "object");
  return Status::ok();
}

Status check_array(const nlohmann::json& in, std::string_view path) {
  if (!in.is_array()) return invalid_type(path, "array");
  return Status::ok();
}

Status check_unexpected(const nlohmann::json& in, std::string_view path,
                        std::span<const std::string_view> known,
                        std::span<const std::string_view> more_known) {
  for (const auto& item : in.items()) {
    const std::string& key = item.key();
    bool found = false;
    for (std::string_view k : known) found = found || k == key;
    for (std::string_view k : more_known) found = found || k == key;
    if (!found) return Status::generic("Parameter '" + member_path(path, key) + "' is unexpected");
  }
  return Status::ok();
}

Status read_str(const nlohmann::json& in, std::string& out, InputMode mode, std::string_view path) {
  if (mode == InputMode::kKeyval) {
    const std::string* text = nullptr;
    BLOCKD_RETURN_IF_ERROR(keyval_text(in, path, text));
    out = *text;
    return Status::ok();
  }
  if (!in.is_string()) return invalid_type(path, "string");
  out = in.get<std::string>();
  return Status::ok();
}

Status read_bool(const nlohmann::json& in, bool& out, InputMode mode, std::string_view path) {
  if (mode == InputMode::kKeyval) {
    const std::string* text = nullptr;
    BLOCKD_RETURN_IF_ERROR(keyval_text(in, path, text));
    if (!parse_keyval_bool(*text, out)) return expects(path, "'on' or 'off'");
    return Status::ok();
  }
  if (!in.is_boolean()) return invalid_type(path, "boolean");
  out = in.get<bool>();
  return Status::ok();
}

Status read_int(const nlohmann::json& in, int64_t& out, InputMode mode, std::string_view path,
                int64_t min, int64_t max, std::string_view type_name) {
  int64_t value = 0;
  if (mode == InputMode::kKeyval) {
    const std::string* text = nullptr;
    BLOCKD_RETURN_IF_ERROR(keyval_text(in, path, text));
    if (!parse_keyval_int64(*text, value)) return expects(path, "integer");
  } else if (in.is_number_integer() && !in.is_number_unsigned()) {
    value = in.get<int64_t>();
  } else if (in.is_number_unsigned() &&
             in.get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    value = static_cast<int64_t>(in.get<uint64_t>());
  } else {
    return invalid_type(path, "integer");
  }
  if (value < min || value > max) {
    return Status::generic("Parameter '" + short_name(path) + "' expects " + std::string(type_name));
  }
  out = value;
  return Status::ok();
}

Status read_uint(const nlohmann::json& in, uint64_t& out, InputMode mode, std::string_view path,
                 uint64_t max, std::string_view type_name) {
  uint64_t value = 0;
  if (mode == InputMode::kKeyval) {
    const std::string* text = nullptr;
    BLOCKD_RETURN_IF_ERROR(keyval_text(in, path, text));
    if (!parse_keyval_uint64(*text, value)) return expects(path, "integer");
  } else if (in.is_number_unsigned()) {
    value = in.get<uint64_t>();
  } else if (in.is_number_integer()) {
    // QEMU accepts negative numbers for unsigned members and wraps them.
    value = static_cast<uint64_t>(in.get<int64_t>());
  } else {
    return expects(path, "uint64");
  }
  if (value > max) {
    return Status::generic("Parameter '" + short_name(path) + "' expects " + std::string(type_name));
  }
  out = value;
  return Status::ok();
}

Status read_size(const nlohmann::json& in, uint64_t& out, InputMode mode, std::string_view path) {
  if (mode == InputMode::kKeyval) {
    const std::string* text = nullptr;
    BLOCKD_RETURN_IF_ERROR(keyval_text(in, path, text));
    if (!parse_keyval_size(*text, out)) return expects(path, "size");
    return Status::ok();
  }
  return read_uint(in, out, mode, path, std::numeric_limits<uint64_t>::max(), "uint64");
}

Status read_number(const nlohmann::json& in, double& out, InputMode mode, std::string_view path) {
  if (mode == InputMode::kKeyval) {
    const std::string* text = nullptr;
    BLOCKD_RETURN_IF_ERROR(keyval_text(in, path, text));
    const char* begin = text->c_str();
    char* end = nullptr;
    errno = 0;
    double v = std::strtod(begin, &end);
    if (text->empty() || *end != '\0' || errno == ERANGE || !std::isfinite(v)) {
      return expects(path, "number");
    }
    out = v;
    return Status::ok();
  }
  if (!in.is_number()) return invalid_type(path, "number");
  out = in.get<double>();
  return Status::ok();
}

Status read_null(const nlohmann::json& in, std::nullptr_t& out, InputMode /*mode*/,
                 std::string_view path) {
  if (!in.is_null()) return invalid_type(path, "null");
  out = nullptr;
  return Status::ok();
}

bool parse_keyval_int64(std::string_view text, int64_t& out) {
  size_t pos = 0;
  uint64_t magnitude = 0;
  bool negative = false;
  if (!parse_unsigned_prefix(text, pos, 0, magnitude, negative) || pos != text.size()) return false;
  if (negative) {
    if (magnitude > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) + 1) return false;
    out = magnitude == 0 ? 0 : static_cast<int64_t>(0 - magnitude);
  } else {
    if (magnitude > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return false;
    out = static_cast<int64_t>(magnitude);
  }
  return true;
}

bool parse_keyval_uint64(std::string_view text, uint64_t& out) {
  size_t pos = 0;
  uint64_t magnitude = 0;
  bool negative = false;
  if (!parse_unsigned_prefix(text, pos, 0, magnitude, negative) || pos != text.size()) return false;
  out = negative ? 0 - magnitude : magnitude;
  return true;
}

bool parse_keyval_bool(std::string_view text, bool& out) {
  if (text == "on" || text == "yes" || text == "true" || text == "y") {
    out = true;
    return true;
  }
  if (text == "off" || text == "no" || text == "false" || text == "n") {
    out = false;
    return true;
  }
  return false;
}

bool parse_keyval_size(std::string_view text, uint64_t& out) {
  // The integral part is decimal; "0x..." switches to hex without fraction.
  size_t pos = 0;
  uint64_t value = 0;
  bool negative = false;
  if (!parse_unsigned_prefix(text, pos, 10, value, negative) || negative) return false;
  uint64_t fraction = 0;  // 0.64 fixed point
  if (value == 0 && pos < text.size() && (text[pos] == 'x' || text[pos] == 'X')) {
    pos = 0;
    if (!parse_unsigned_prefix(text, pos, 16, value, negative) || negative) return false;
    if (pos < text.size() && (text[pos] == '.' || suffix_multiplier(text[pos]) > 1)) {
      // A fraction is never valid in hex; a hex multiplier is only deprecated in QEMU 7.2.
      if (text[pos] == '.') return false;
    }
  } else if (pos < text.size() && text[pos] == '.') {
    size_t start = pos++;
    size_t digits = pos;
    while (pos < text.size() && text[pos] >= '0' && text[pos] <= '9') ++pos;
    if (pos < text.size() && (text[pos] == 'e' || text[pos] == 'E') && pos + 1 < text.size() &&
        (std::isdigit(static_cast<unsigned char>(text[pos + 1])) || text[pos + 1] == '+' ||
         text[pos + 1] == '-')) {
      return false;  // an exponent makes the whole input invalid
    }
    if (pos > digits) {
      double f = std::strtod(std::string(text.substr(start, pos - start)).c_str(), nullptr);
      fraction = static_cast<uint64_t>(std::ldexp(f, 64));
    }
  }
  uint64_t multiplier = 1;
  if (pos < text.size() && suffix_multiplier(text[pos]) > 0) {
    multiplier = static_cast<uint64_t>(suffix_multiplier(text[pos]));
    ++pos;
  }
  if (pos != text.size()) return false;
  if (multiplier == 1) {
    if (fraction != 0) return false;  // a fraction needs a scale
    out = value;
    return true;
  }
  unsigned __int128 whole = static_cast<unsigned __int128>(value) * multiplier;
  unsigned __int128 part = static_cast<unsigned __int128>(fraction) * multiplier;
  // part is 64.64 fixed point: add its integer half, rounding 0.5 up.
  whole += part >> 64;
  whole += (static_cast<uint64_t>(part) >> 63) & 1;
  if (whole > std::numeric_limits<uint64_t>::max()) return false;
  out = static_cast<uint64_t>(whole);
  return true;
}

}  // namespace blockd::qapi::detail
