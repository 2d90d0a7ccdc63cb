// The null-co and null-aio drivers: a device that stores nothing.
//
// Writes succeed and are dropped; reads return zeroes; flush succeeds. Used for benchmarks (to
// measure the overhead of everything above the driver) and for tests. Behaviour follows QEMU 7.2's
// BlockdevOptionsNull, with one deliberate difference: QEMU leaves the read buffer untouched when
// read-zeroes is false, exposing whatever memory the caller had; blockd always zeroes it, so no
// uninitialised memory ever reaches a client. read-zeroes still changes what block_status reports
// (zero vs. unallocated), as in QEMU.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>

#include "block/node.h"
#include "runtime/loop.h"
#include "runtime/status.h"

namespace blockd::drivers {

// Options of QEMU's BlockdevOptionsNull. Unset optionals were not given by the user; they take the
// defaults below and are left out of the node's "json:" file name, as in QEMU.
struct NullOptions {
  std::optional<int64_t> size;      // bytes; default 1 GiB; rounded up to 512 for the node size
  int64_t latency_ns = 0;           // delay before each request completes; default 0
  std::optional<bool> read_zeroes;  // default false (affects block_status only, see above)
  bool aio = false;                 // false: driver "null-co"; true: driver "null-aio"
};

// Opens a null node on `loop` (the loop that will run its I/O). Main loop.
// Errors (GenericError): "size is invalid" for a negative size, "latency-ns is invalid" for a
// negative latency.
Expected<std::shared_ptr<block::Node>> open_null_node(block::NodeOptions common,
                                                      const NullOptions& options, Loop& loop);

}  // namespace blockd::drivers
