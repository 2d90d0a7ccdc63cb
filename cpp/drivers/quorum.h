// The quorum driver: a node that keeps the same data on several children and outvotes the ones
// that fail or return different data.
//
// Implements QEMU 7.2's "quorum" (BlockdevOptionsQuorum) as qemu-storage-daemon 7.2 behaves:
//  - Reads, read-pattern "quorum": every child is read. Child 0 reads into the caller's buffer.
//    When every child's range lies in a host file in memory (Node::map_file: file or raw over
//    file on tmpfs), the children are compared there, without a request to their nodes: reads
//    from 32 KiB on whose ranges every child keeps mapped and in the page cache are compared in
//    those mappings in one pass that also copies child 0's bytes to the caller; others are read
//    with pread, piece by piece (64 KiB), each piece of the other children compared with child
//    0's while still in the cache. Reads from 256 KiB on compare in place on a worker thread
//    (the loop serves other requests meanwhile; a caller that cannot wait, Node::map_file, has
//    the second half done by a worker while it does the first). Any difference, error or fault
//    (a child's file shrunk behind the engine's back) ends this fast path without a report and
//    the children are read again through their nodes, as follows. When child 0 answers without
//    waiting (e.g. blkdebug over a file in memory), the other children are read one after another
//    in pieces of up to 64 KiB through one small buffer, each piece compared with the caller's
//    buffer; otherwise all children are read in parallel. When all successful reads agree the data
//    is returned. Otherwise (children from the first that differs on are then read whole) each
//    successful child's data is hashed over the whole request and the children are grouped by equal
//    data; the largest group (ties: the group whose data was first seen on the highest-numbered
//    child, as QEMU) wins if it has at least vote-threshold members; its data is returned, every
//    other successful child is reported bad and, with rewrite-corrupted, rewritten with the winning
//    data before the read completes. Fewer than vote-threshold successful reads, or no group large
//    enough, fails the read (QUORUM_FAILURE). A caller that can send a range straight from a file
//    (Node::map_file or map_file_async, the NBD export's sendfile) gets child 0's range for reads
//    from 32 KiB on in quorum mode, once the children were compared in place and all agree;
//    otherwise none, and it reads.
//  - Reads, read-pattern "fifo": children are read in order until one succeeds.
//  - Writes and write-zeroes go to every child in parallel and succeed when at least vote-threshold
//    children did (else QUORUM_FAILURE); flush likewise, without QUORUM_FAILURE. Writes from 256
//    KiB on (without FUA) to children that are all files in memory (Node::map_file) are written
//    into the files by a pool worker while the loop serves other requests.
//  - A failing child request is reported (QUORUM_REPORT_BAD with its error text) in every mode.
//  - blkverify: two children, threshold 2; a mismatch fails the read with EIO and is reported as
//    a quorum failure. (QEMU prints the offset and exits the process; blockd may run inside a
//    Python process, so it never exits.)
//  - Block status merges the children: data if any child reports data, else zero for the shortest
//    zero run.
//  - x-blockdev-change adds a child named "children.N" with the next index and removes one, never
//    below the threshold (QEMU's messages).
// Events carry sector numbers in 512-byte units covering the request (flush: 0 and 0).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "block/node.h"
#include "runtime/loop.h"
#include "runtime/status.h"

namespace blockd::drivers {

// A QUORUM_REPORT_BAD or QUORUM_FAILURE event, as the driver reports it.
struct QuorumEvent {
  enum class Kind { kReportBad, kFailure };
  enum class Op { kRead, kWrite, kFlush };
  Kind kind = Kind::kReportBad;
  Op op = Op::kRead;                 // kReportBad only
  std::optional<std::string> error;  // kReportBad only: the child's error text, when it failed
  std::string node_name;  // kReportBad: the bad child; kFailure: the quorum node ("reference")
  int64_t sector_num = 0;
  int64_t sectors_count = 0;
};

// Called on the node's loop thread for every event; must not block.
using QuorumEventSink = std::function<void(const QuorumEvent&)>;

// Options of QEMU's BlockdevOptionsQuorum (besides the children, passed separately). Optionals
// not given by the user stay out of the node's file name.
struct QuorumOptions {
  enum class ReadPattern { kQuorum, kFifo };
  int64_t vote_threshold = 1;
  std::optional<bool> blkverify;          // default false
  std::optional<bool> rewrite_corrupted;  // default false
  std::optional<ReadPattern> read_pattern;  // default kQuorum
  QuorumEventSink events;                   // may be empty: events are dropped
};

// Checks the options against the number of children before any child is opened, in QEMU's order
// and words (GenericError):
//   "Number of provided children must be 1 or more"
//   "Parameter 'vote-threshold' expects a value >= 1"
//   "threshold may not exceed children count"
//   "blkverify=on can only be set if there are exactly two files and vote-threshold is 2"
//   "rewrite-corrupted=on cannot be used with blkverify=on"
Status validate_quorum_options(const QuorumOptions& options, size_t children);

// Opens a quorum node over `children` (opened or looked up by the caller) on `loop`. Main loop.
// Errors: those of validate_quorum_options, permission errors from attaching a child, and
// "Could not refresh total sector count: Input/output error" when the children differ in size.
Expected<std::shared_ptr<block::Node>> open_quorum_node(
    block::NodeOptions common, QuorumOptions options,
    std::vector<std::shared_ptr<block::Node>> children, Loop& loop);

}  // namespace blockd::drivers
