#include "qmp/json_stream.h"

namespace blockd::qmp {
namespace {
bool is_space(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }
bool is_structural(char c) { return c == '{' || c == '}' || c == '[' || c == ']' || c == ','; }
}  // namespace

void JsonStream::finish_value(std::vector<Item>& out) {
  if (!skipping_) out.push_back(Item{true, std::move(buffer_)});
  buffer_.clear();
  depth_ = 0;
  in_value_ = in_string_ = escaped_ = scalar_ = skipping_ = false;
}

void JsonStream::fail(std::string message, std::vector<Item>& out) {
  out.push_back(Item{false, std::move(message)});
  buffer_.clear();
  buffer_.shrink_to_fit();
  skipping_ = true;
}

void JsonStream::feed(std::string_view bytes, std::vector<Item>& out) {
  for (size_t i = 0; i < bytes.size(); ++i) {
    const char c = bytes[i];
    if (skipping_ && c == '\n') {
      // Recovery after a broken value ends at a line break: clients send one request per line,
      // so the next line is parsed afresh.
      finish_value(out);
      continue;
    }
    if (!in_value_) {
      if (is_space(c)) continue;
      in_value_ = true;
      if (c == '{' || c == '[') {
        depth_ = 1;
      } else if (c == '"') {
        in_string_ = true;
      } else if (c == '}' || c == ']' || c == ',' || c == ':') {
        // A stray structural character is a complete (invalid) value on its own.
        buffer_.push_back(c);
        finish_value(out);
        continue;
      } else {
        scalar_ = true;
      }
      buffer_.push_back(c);
      continue;
    }
    if (scalar_) {
      if (is_space(c) || is_structural(c) || c == '"') {
        finish_value(out);
        --i;  // this character starts the next value
        continue;
      }
    } else if (in_string_) {
      if (escaped_) {
        escaped_ = false;
      } else if (c == '\\') {
        escaped_ = true;
      } else if (c == '"') {
        in_string_ = false;
        if (depth_ == 0) {
          if (!skipping_) buffer_.push_back(c);
          finish_value(out);
          continue;
        }
      }
    } else if (c == '"') {
      in_string_ = true;
    } else if (c == '{' || c == '[') {
      if (++depth_ > kMaxNesting && !skipping_) fail("JSON nesting depth limit exceeded", out);
    } else if (c == '}' || c == ']') {
      if (--depth_ == 0) {
        if (!skipping_) buffer_.push_back(c);
        finish_value(out);
        continue;
      }
    }
    if (skipping_) continue;
    buffer_.push_back(c);
    if (buffer_.size() > kMaxValueBytes) fail("JSON token size limit exceeded", out);
  }
}

}  // namespace blockd::qmp
