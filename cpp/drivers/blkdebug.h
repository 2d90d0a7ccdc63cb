// The blkdebug driver: a filter that passes requests to its "image" child and fails the ones its
// rules select (fault injection for tests).
//
// Implements the rule model of QEMU 7.2's blkdebug (BlockdevOptionsBlkdebug inject-error and
// set-state): a rule is armed when its event happens while the node is in the rule's state (any
// state when 0; the node starts in state 1); an armed inject-error rule fails every later request
// of its iotypes (default: read, write, write-zeroes, discard, block-status; not flush) that
// touches its sector (any request when no sector is given) with its errno (default EIO), and with
// once=true only the first. An event that arms inject-error rules disarms the ones armed before,
// as in QEMU. set-state rules switch the state when their event happens.
//
// QEMU raises events from the format drivers above blkdebug; blockd raises them from blkdebug's
// own requests, which is where a raw format layer raises them in QEMU:
//   read: read_aio;  write: write_aio, then pwritev;  write-zeroes: pwritev_zero;
//   flush: flush_to_os, then flush_to_disk.
// Each request's events happen before its rules are checked. Other events never happen in blockd,
// so rules naming them are accepted and never armed. The legacy config file and the alignment,
// limit and permission options are refused with a message naming them.
#pragma once

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "block/node.h"
#include "runtime/loop.h"
#include "runtime/status.h"

namespace blockd::drivers {

// Request kinds, in the order of QEMU's BlkdebugIOType.
enum class BlkdebugIoType { kRead, kWrite, kWriteZeroes, kDiscard, kFlush, kBlockStatus };

struct BlkdebugInjectError {
  std::string event;                      // a BlkdebugEvent name ("read_aio", ...)
  int64_t state = 0;                      // 0: any state
  std::optional<BlkdebugIoType> iotype;   // unset: the default set above
  int64_t error = 5;                      // errno (EIO); 0 injects nothing
  int64_t sector = -1;                    // -1: any request
  bool once = false;
  bool immediately = false;
};

struct BlkdebugSetState {
  std::string event;
  int64_t state = 0;  // 0: any state
  int64_t new_state = 0;
};

struct BlkdebugOptions {
  std::vector<BlkdebugInjectError> inject_error;
  std::vector<BlkdebugSetState> set_state;
  // The user's options for the node's "json:" file name (inject-error and set-state as given).
  nlohmann::json given_rules = nlohmann::json::object();
};

// Opens a blkdebug node over `image` on `loop`. Main loop.
// Errors: permission errors from attaching the image (the QMP layer refuses unsupported options).
Expected<std::shared_ptr<block::Node>> open_blkdebug_node(block::NodeOptions common,
                                                          BlkdebugOptions options,
                                                          std::shared_ptr<block::Node> image,
                                                          Loop& loop);

}  // namespace blockd::drivers
