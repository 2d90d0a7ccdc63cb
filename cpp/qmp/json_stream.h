// JsonStream: splits a QMP byte stream into complete JSON values.
//
// QMP clients may send values back to back, split across reads, with or without newlines. The
// stream tracks strings and nesting to find where each top-level value ends, and enforces limits so
// that hostile input cannot make the daemon allocate without bound: nesting deeper than 1024 levels
// or a value larger than 16 MiB is reported as an error and the rest of it skipped, up to the end
// of the value or the next line break, whichever comes first; then the stream carries on. Parsing
// the JSON text of each value is left to the caller.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

namespace blockd::qmp {

class JsonStream {
 public:
  static constexpr size_t kMaxNesting = 1024;
  static constexpr size_t kMaxValueBytes = 16u << 20;

  struct Item {
    bool ok;  // true: `text` is one complete JSON value; false: `text` is an error message
    std::string text;
  };

  // Consumes `bytes` and appends every value (or error) completed by them to `out`.
  void feed(std::string_view bytes, std::vector<Item>& out);

  // Bytes held for an incomplete value.
  size_t pending_bytes() const noexcept { return buffer_.size(); }

 private:
  void finish_value(std::vector<Item>& out);
  void fail(std::string message, std::vector<Item>& out);

  std::string buffer_;
  size_t depth_ = 0;
  bool in_value_ = false;
  bool in_string_ = false;
  bool escaped_ = false;
  bool scalar_ = false;    // a top-level bare token (number, keyword)
  bool skipping_ = false;  // discarding the rest of a value that broke a limit
};

}  // namespace blockd::qmp
