#include "drivers/qemu_json.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <utility>
#include <vector>

namespace blockd::drivers {
namespace {

// QDict's bucket count and string hash: the iteration order of a QDict is the bucket order, so
// these two facts decide the key order of every "json:" file name.
constexpr uint32_t kQdictBuckets = 512;

uint32_t qdict_bucket(const std::string& key) {
  uint32_t value = 0x238F13AFu * static_cast<uint32_t>(key.size());
  for (size_t i = 0; i < key.size(); ++i) {
    value += static_cast<uint32_t>(static_cast<unsigned char>(key[i])) << (i * 5 % 24);
  }
  return (1103515243u * value + 12345u) % kQdictBuckets;
}

// Decodes one UTF-8 sequence starting at text[i]; returns -1 for malformed input (printed as
// U+FFFD, as QEMU does) and advances i past what was consumed.
int32_t next_code_point(const std::string& text, size_t& i) {
  const auto byte = [&](size_t at) { return static_cast<unsigned char>(text[at]); };
  const unsigned char lead = byte(i++);
  if (lead < 0x80) return lead;
  int extra;
  int32_t code;
  if ((lead & 0xE0) == 0xC0) {
    extra = 1;
    code = lead & 0x1F;
  } else if ((lead & 0xF0) == 0xE0) {
    extra = 2;
    code = lead & 0x0F;
  } else if ((lead & 0xF8) == 0xF0) {
    extra = 3;
    code = lead & 0x07;
  } else {
    return -1;
  }
  for (int k = 0; k < extra; ++k) {
    if (i >= text.size() || (byte(i) & 0xC0) != 0x80) return -1;
    code = (code << 6) | (byte(i++) & 0x3F);
  }
  return code;
}

void append_string(std::string& out, const std::string& text) {
  out += '"';
  char escaped[16];
  for (size_t i = 0; i < text.size();) {
    int32_t code = next_code_point(text, i);
    switch (code) {
      case '"':
        out += "\\\"";
        continue;
      case '\\':
        out += "\\\\";
        continue;
      case '\b':
        out += "\\b";
        continue;
      case '\f':
        out += "\\f";
        continue;
      case '\n':
        out += "\\n";
        continue;
      case '\r':
        out += "\\r";
        continue;
      case '\t':
        out += "\\t";
        continue;
      default:
        break;
    }
    if (code < 0) code = 0xFFFD;
    if (code > 0xFFFF) {
      std::snprintf(escaped, sizeof escaped, "\\u%04X\\u%04X", 0xD800 + ((code - 0x10000) >> 10),
                    0xDC00 + ((code - 0x10000) & 0x3FF));
      out += escaped;
    } else if (code < 0x20 || code >= 0x7F) {
      std::snprintf(escaped, sizeof escaped, "\\u%04X", static_cast<unsigned>(code));
      out += escaped;
    } else {
      out += static_cast<char>(code);
    }
  }
  out += '"';
}

void append_value(std::string& out, const nlohmann::json& value) {
  switch (value.type()) {
    case nlohmann::json::value_t::object: {
      std::vector<std::pair<uint32_t, const std::string*>> keys;
      for (const auto& item : value.items()) {
        keys.emplace_back(qdict_bucket(item.key()), &item.key());
      }
      // Keys sharing a bucket are rare; their relative order depends on insertion order in QEMU,
      // which a json object does not keep, so they are ordered by name.
      std::sort(keys.begin(), keys.end(), [](const auto& a, const auto& b) {
        return a.first != b.first ? a.first < b.first : *a.second < *b.second;
      });
      out += '{';
      bool first = true;
      for (const auto& [bucket, key] : keys) {
        if (!first) out += ", ";
        first = false;
        append_string(out, *key);
        out += ": ";
        append_value(out, value.at(*key));
      }
      out += '}';
      return;
    }
    case nlohmann::json::value_t::array: {
      out += '[';
      bool first = true;
      for (const auto& element : value) {
        if (!first) out += ", ";
        first = false;
        append_value(out, element);
      }
      out += ']';
      return;
    }
    case nlohmann::json::value_t::string:
      append_string(out, value.get_ref<const std::string&>());
      return;
    default:
      out += value.dump();  // numbers, booleans and null print the same in both
      return;
  }
}

}  // namespace

std::string qemu_json_text(const nlohmann::json& value) {
  std::string out;
  append_value(out, value);
  return out;
}

std::string json_filename(const nlohmann::json& options) {
  return "json:" + qemu_json_text(options);
}

}  // namespace blockd::drivers
