// Control-path error values.
//
// Status carries a QMP error class and a human-readable message; Expected<T> is either a value or a
// Status. They are used on the control path (QMP handlers, option parsing, opening images). The
// data path returns plain negative errno values instead and never allocates for an error.
#pragma once

#include <cassert>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace blockd {

// The error classes QMP defines (qapi/error.json). Almost every error is kGenericError.
enum class ErrorClass {
  kGenericError,
  kCommandNotFound,
  kDeviceNotActive,
  kDeviceNotFound,
  kKvmMissingCap,
};

// The wire name of an error class, e.g. "GenericError".
std::string_view error_class_name(ErrorClass error_class) noexcept;

// The result of an operation that returns nothing: either ok or an error class and message.
// Cheap to move; an ok Status holds no allocation.
class [[nodiscard]] Status {
 public:
  Status() = default;  // ok

  static Status ok() { return {}; }
  static Status error(ErrorClass error_class, std::string message) {
    return Status(error_class, std::move(message));
  }
  // The common case: a GenericError.
  static Status generic(std::string message) {
    return Status(ErrorClass::kGenericError, std::move(message));
  }

  bool is_ok() const noexcept { return !failed_; }
  explicit operator bool() const noexcept { return !failed_; }
  ErrorClass error_class() const noexcept { return error_class_; }
  const std::string& message() const noexcept { return message_; }

  // Returns this error with `prefix` put before its message ("prefix: message").
  Status with_prefix(std::string_view prefix) const;

 private:
  Status(ErrorClass error_class, std::string message)
      : failed_(true), error_class_(error_class), message_(std::move(message)) {}

  bool failed_ = false;
  ErrorClass error_class_ = ErrorClass::kGenericError;
  std::string message_;
};

// Either a T or a failed Status.
template <typename T>
class [[nodiscard]] Expected {
 public:
  Expected(T value) : state_(std::in_place_index<0>, std::move(value)) {}        // NOLINT: implicit
  Expected(Status status) : state_(std::in_place_index<1>, std::move(status)) {  // NOLINT
    assert(!std::get<1>(state_).is_ok() && "Expected built from an ok Status");
  }

  bool has_value() const noexcept { return state_.index() == 0; }
  explicit operator bool() const noexcept { return has_value(); }

  T& value() & { return std::get<0>(state_); }
  const T& value() const& { return std::get<0>(state_); }
  T&& value() && { return std::get<0>(std::move(state_)); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

  const Status& status() const& { return std::get<1>(state_); }
  Status status() && { return std::get<1>(std::move(state_)); }

 private:
  std::variant<T, Status> state_;
};

// Returns early from the enclosing function with the error if `expr` (a Status) failed.
#define BLOCKD_RETURN_IF_ERROR(expr)            \
  do {                                          \
    ::blockd::Status blockd_status_ = (expr);   \
    if (!blockd_status_) return blockd_status_; \
  } while (0)

// The same inside a coroutine returning Task<Status> (`expr` may contain co_await).
#define BLOCKD_CO_RETURN_IF_ERROR(expr)            \
  do {                                             \
    ::blockd::Status blockd_status_ = (expr);      \
    if (!blockd_status_) co_return blockd_status_; \
  } while (0)

// Describes a negative errno value as strerror does ("No such file or directory").
std::string errno_text(int negative_errno);

}  // namespace blockd
