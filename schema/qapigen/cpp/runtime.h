// Support code for the QAPI-generated marshalling (copied verbatim into the generated tree).
//
// Holds what every generated file needs and that does not depend on the schema: the input mode,
// the Box wrapper that breaks recursive types, and the scalar readers that reproduce the
// validation and error messages of QEMU 7.2's QObject input visitor (strict QMP and keyval).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>

#include <nlohmann/json.hpp>

#include "runtime/status.h"

namespace blockd::qapi {

// How input JSON is typed.
//   kQmp:    strict JSON typing, as a QMP command's arguments.
//   kKeyval: every scalar arrives as a string (from key=value,... option syntax) and is
//            converted per the schema type: integers in decimal/hex/octal, booleans as
//            on/off/yes/no/true/false/y/n, sizes with k/M/G/T/P/E suffixes.
enum class InputMode { kQmp, kKeyval };

// A heap-allocated value with value semantics: copying deep-copies. Used where a type contains
// itself (BlockdevOptions -> ... -> BlockdevRef -> BlockdevOptions). Never null except after
// being moved from.
template <typename T>
class Box {
 public:
  Box() : ptr_(std::make_unique<T>()) {}
  Box(T value) : ptr_(std::make_unique<T>(std::move(value))) {}  // NOLINT: implicit on purpose
  Box(const Box& other) : ptr_(std::make_unique<T>(*other.ptr_)) {}
  Box(Box&& other) noexcept = default;
  Box& operator=(const Box& other) {
    if (this != &other) ptr_ = std::make_unique<T>(*other.ptr_);
    return *this;
  }
  Box& operator=(Box&& other) noexcept = default;
  ~Box() = default;

  T& operator*() { return *ptr_; }
  const T& operator*() const { return *ptr_; }
  T* operator->() { return ptr_.get(); }
  const T* operator->() const { return ptr_.get(); }
  T& get() { return *ptr_; }
  const T& get() const { return *ptr_; }

  friend bool operator==(const Box& a, const Box& b) { return *a.ptr_ == *b.ptr_; }

 private:
  std::unique_ptr<T> ptr_;
};

// Helpers called by generated code. Paths follow QEMU's naming of members in error messages:
// "a.b" for members, "a[0]" for list elements in QMP mode and "a.0" in keyval mode, "" for the
// top level.
namespace detail {

// The path of member `name` of the object at `path`.
std::string member_path(std::string_view path, std::string_view name);
// The path of element `index` of the list at `path`.
std::string element_path(std::string_view path, size_t index, InputMode mode);
// The name QEMU uses where it reports the bare member name: the last member of `path`, or
// "null" for list elements and the top level.
std::string short_name(std::string_view path);

Status missing(std::string_view path);     // "Parameter 'X' is missing"
Status invalid_type(std::string_view path, std::string_view expected);
Status bad_enum_value(std::string_view path, std::string_view value);

// Fails unless `in` is an object (or an array, for check_array).
Status check_object(const nlohmann::json& in, std::string_view path);
Status check_array(const nlohmann::json& in, std::string_view path);
// Fails with "Parameter 'X' is unexpected" for the first member of `in` not in any of `known`.
Status check_unexpected(const nlohmann::json& in, std::string_view path,
                        std::span<const std::string_view> known,
                        std::span<const std::string_view> more_known = {});

// Scalar readers.  `type_name` is what a range error names ("int32_t", "uint16_t").
Status read_str(const nlohmann::json& in, std::string& out, InputMode mode, std::string_view path);
Status read_bool(const nlohmann::json& in, bool& out, InputMode mode, std::string_view path);
Status read_int(const nlohmann::json& in, int64_t& out, InputMode mode, std::string_view path,
                int64_t min, int64_t max, std::string_view type_name);
Status read_uint(const nlohmann::json& in, uint64_t& out, InputMode mode, std::string_view path,
                 uint64_t max, std::string_view type_name);
Status read_size(const nlohmann::json& in, uint64_t& out, InputMode mode, std::string_view path);
Status read_number(const nlohmann::json& in, double& out, InputMode mode, std::string_view path);
Status read_null(const nlohmann::json& in, std::nullptr_t& out, InputMode mode,
                 std::string_view path);

// Typed wrappers over read_int/read_uint for each integer width.
template <typename T>
Status read_integer(const nlohmann::json& in, T& out, InputMode mode, std::string_view path,
                    std::string_view type_name) {
  if constexpr (std::is_signed_v<T>) {
    int64_t v = 0;
    BLOCKD_RETURN_IF_ERROR(read_int(in, v, mode, path, std::numeric_limits<T>::min(),
                                    std::numeric_limits<T>::max(), type_name));
    out = static_cast<T>(v);
  } else {
    uint64_t v = 0;
    BLOCKD_RETURN_IF_ERROR(
        read_uint(in, v, mode, path, std::numeric_limits<T>::max(), type_name));
    out = static_cast<T>(v);
  }
  return Status::ok();
}

// String conversions of QEMU's keyval input (exposed for tests).
// Integers: optional sign, base 0 (decimal, 0x hex, 0 octal), whole string.
bool parse_keyval_int64(std::string_view text, int64_t& out);
// Like strtoull with base 0: a leading '-' negates modulo 2^64.
bool parse_keyval_uint64(std::string_view text, uint64_t& out);
// Sizes: decimal with optional fraction and a B/K/M/G/T/P/E suffix (powers of 1024), or hex.
bool parse_keyval_size(std::string_view text, uint64_t& out);
// Booleans: on/yes/true/y and off/no/false/n.
bool parse_keyval_bool(std::string_view text, bool& out);

}  // namespace detail
}  // namespace blockd::qapi
