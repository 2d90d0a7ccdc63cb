// The raw format driver: a node that shows its "file" child's bytes as they are, optionally a
// window of them.
//
// Implements QEMU 7.2's "raw" format (BlockdevOptionsRaw): options offset and size select the
// window [offset, offset + size) of the child; requests are shifted by offset and passed to the
// child, as are flush, discard, write_zeroes and block_status. Open errors and the reported file
// name ("json:{...}" as soon as offset or size is given) follow QEMU.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>

#include "block/node.h"
#include "runtime/loop.h"
#include "runtime/status.h"

namespace blockd::drivers {

// Options of QEMU's BlockdevOptionsRaw (besides "file", passed separately). An unset optional was
// not given by the user; a given one, even 0, appears in the node's file name and open options.
struct RawOptions {
  std::optional<uint64_t> offset;  // start of the window in the child; default 0
  std::optional<uint64_t> size;    // length of the window; default: to the end of the child
};

// Opens a raw node over `file` (already opened or looked up by the caller) whose I/O runs on
// `loop`. The node adds a "file" child edge that keeps `file` alive. Main loop.
//
// Errors (GenericError), as QEMU:
//   "Offset (O) cannot be greater than size of the containing file (S)"
//   "The sum of offset (O) and size (N) has to be smaller or equal to the  actual size of the
//    containing file (S)"  (sic: two spaces)
//   "Specified size is not multiple of 512"
// and any permission error from attaching the child.
Expected<std::shared_ptr<block::Node>> open_raw_node(block::NodeOptions common,
                                                     const RawOptions& options,
                                                     std::shared_ptr<block::Node> file, Loop& loop);

}  // namespace blockd::drivers
