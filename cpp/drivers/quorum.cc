// The quorum driver; see quorum.h. Behaviour follows QEMU 7.2's block/quorum (not its code).
//
// Reads in quorum mode try three ways, cheapest first; each falls back to the next without a
// report, and only the last one votes, reports and repairs:
//  1. In place (from kInPlaceThreshold): every child keeps the range in its read-only mapping of
//     a file in memory (FileRange::memory) and mincore says all of it is in the page cache (a
//     read fault in a hole of a tmpfs file would allocate it). One loop reads each child's byte
//     once, XORs the others against child 0 in 32-byte lanes (AVX2 where the CPU has it) and
//     stores child 0's bytes to the caller. From kSplitThreshold on this runs on a pool worker
//     while the loop serves other requests (read, map_file_async); a caller that cannot wait
//     (map_file) has it done whole on its own thread. A child's
//     file may shrink behind the engine's back and take pages from under the mapping: the
//     comparison runs under run_fault_guarded, and the SIGBUS becomes a difference. map_file and
//     map_file_async grant child 0's range on the same comparison, so that the NBD export sends
//     it with sendfile like a single file's.
//  2. By pread (files in memory, smaller reads or ranges not resident): child 0 into the caller's
//     buffer, the others piece by piece into a scratch buffer and compared.
//  3. Through the children's nodes: compared piece by piece while they answer without waiting,
//     else read in parallel; on disagreement hashed, grouped and voted (QuorumNode::vote).
#include "drivers/quorum.h"

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <functional>

#include <sys/mman.h>
#include <unistd.h>

#include "drivers/qemu_json.h"
#include "drivers/thread_pool.h"
#include "runtime/fault_guard.h"
#include "runtime/fd_io.h"
#include "runtime/join.h"

namespace blockd::drivers {
namespace {

using block::BlockStatus;
using block::Node;

constexpr uint64_t kSectorSize = 512;
constexpr size_t kBufferAlignment = 4096;
// Scratch buffers kept for reuse between reads (beyond these, buffers are freed after use).
constexpr size_t kMaxPooledBuffers = 64;
// The piece of a request that the compare path reads from one child at a time: small enough that
// the scratch copy is still in the CPU cache when it is compared, large enough that the extra
// system calls of children in memory cost little.
constexpr uint64_t kCompareChunk = 64 << 10;
// Reads of children in memory from this size on are split in two halves, the second read and
// compared on a worker thread while the loop does the first: the copies from the page cache are
// what such a read costs, and a second core halves its latency.
constexpr uint64_t kSplitThreshold = 256 << 10;
// Reads from this size on, of children that all keep their range mapped and in the page cache,
// are compared in place in the mappings; and only from this size on does the node grant a
// mapping of itself (map_file). Below it, the system calls around an in-place comparison (the
// residency check, the fault guard) cost more than the copies they save.
constexpr uint64_t kInPlaceThreshold = 32 << 10;

// A heap buffer aligned for O_DIRECT children.
struct ScratchBuffer {
  struct Free {
    void operator()(char* p) const noexcept { std::free(p); }
  };
  std::unique_ptr<char, Free> data;
  size_t capacity = 0;
};

// A hash of the whole buffer, 64-bit words mixed one after another (the tail byte-wise). Groups
// are confirmed with memcmp, so a collision can never merge different data.
uint64_t hash_bytes(const char* data, size_t length) noexcept {
  uint64_t hash = 0x9e3779b97f4a7c15ull ^ length;
  size_t i = 0;
  for (; i + 8 <= length; i += 8) {
    uint64_t word;
    std::memcpy(&word, data + i, 8);
    hash = (hash ^ word) * 0xff51afd7ed558ccdull;
    hash ^= hash >> 32;
  }
  for (; i < length; ++i) hash = (hash ^ static_cast<unsigned char>(data[i])) * 0x100000001b3ull;
  return hash;
}

// The children of a read that all lie in host files in memory (Node::map_file), and compares them
// there: child 0 is read into `buffer`, the others piece by piece into `chunk` (chunk_size bytes),
// each piece compared at once while it is in the cache. `start` is relative to the request (and
// its buffer). True when every child read without error and agreed with child 0. Any thread: only
// system calls on the files and the buffers.
bool compare_mapped(const block::FileRange* ranges, size_t count, uint64_t start, uint64_t length,
                    char* buffer, char* chunk, uint64_t chunk_size) noexcept {
  for (uint64_t done = start; done < start + length;) {
    const uint64_t piece = std::min(chunk_size, start + length - done);
    if (read_whole(ranges[0].fd, buffer + done, piece, ranges[0].offset + done) != 0) return false;
    for (size_t i = 1; i < count; ++i) {
      if (read_whole(ranges[i].fd, chunk, piece, ranges[i].offset + done) != 0 ||
          std::memcmp(buffer + done, chunk, piece) != 0) {
        return false;
      }
    }
    done += piece;
  }
  return true;
}

// compare_mapped on a worker thread; `agreed` holds its answer.
Task<void> compare_mapped_in_thread(Loop& loop, const block::FileRange* ranges, size_t count,
                                    uint64_t start, uint64_t length, char* buffer, char* chunk,
                                    uint64_t chunk_size, bool& agreed) {
  agreed = co_await RunInThread(loop, [=]() noexcept -> int64_t {
    return compare_mapped(ranges, count, start, length, buffer, chunk, chunk_size) ? 1 : 0;
  }) == 1;
}

// ---- Comparing in place, in the children's mappings of their files.

// True when every page of [memory, memory + length) is in the page cache. A file in memory read
// through a mapping where it has a hole gets the hole filled (a read fault on tmpfs allocates the
// page), which reading it with pread would not do: such ranges are compared by pread instead.
bool resident(const uint8_t* memory, uint64_t length) noexcept {
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  uintptr_t start = reinterpret_cast<uintptr_t>(memory) & ~(page - 1);
  const uintptr_t end = reinterpret_cast<uintptr_t>(memory) + length;
  unsigned char pages[1024];
  while (start < end) {
    const uintptr_t window = std::min<uintptr_t>(end - start, sizeof pages * page);
    if (mincore(reinterpret_cast<void*>(start), window, pages) != 0) return false;
    for (size_t i = 0; i < (window + page - 1) / page; ++i) {
      if ((pages[i] & 1) == 0) return false;
    }
    start += window;
  }
  return true;
}

// Four 64-bit words: GCC and clang turn operations on it into one AVX2 instruction, or two SSE2
// ones in the baseline build.
using Lanes = uint64_t __attribute__((vector_size(32)));
// Bytes compared per step, and how often the loop looks whether a difference was seen.
constexpr size_t kStep = 4 * sizeof(Lanes);
constexpr size_t kSpan = 4096;

// Whether sources[1..kOthers] equal sources[0] over [start, start + length), reading every byte
// once; with kCopy, sources[0]'s bytes are also stored to copy[start...] in the same pass.
template <size_t kOthers, bool kCopy>
[[gnu::always_inline]] inline bool equal_lanes(const uint8_t* const* sources, uint64_t start,
                                               uint64_t length, uint8_t* copy) noexcept {
  const uint8_t* first = sources[0] + start;
  uint64_t done = 0;
  while (length - done >= kStep) {
    const uint64_t span_end = done + std::min<uint64_t>((length - done) / kStep * kStep, kSpan);
    Lanes difference{};
    for (; done < span_end; done += kStep) {
      // Separate variables, not arrays: GCC keeps them in registers.
      Lanes e0, e1, e2, e3;
      std::memcpy(&e0, first + done, sizeof e0);
      std::memcpy(&e1, first + done + 32, sizeof e1);
      std::memcpy(&e2, first + done + 64, sizeof e2);
      std::memcpy(&e3, first + done + 96, sizeof e3);
      if constexpr (kCopy) {
        uint8_t* to = copy + start + done;
        std::memcpy(to, &e0, sizeof e0);
        std::memcpy(to + 32, &e1, sizeof e1);
        std::memcpy(to + 64, &e2, sizeof e2);
        std::memcpy(to + 96, &e3, sizeof e3);
      }
      for (size_t other = 1; other <= kOthers; ++other) {
        const uint8_t* from = sources[other] + start + done;
        Lanes s0, s1, s2, s3;
        std::memcpy(&s0, from, sizeof s0);
        std::memcpy(&s1, from + 32, sizeof s1);
        std::memcpy(&s2, from + 64, sizeof s2);
        std::memcpy(&s3, from + 96, sizeof s3);
        difference |= (e0 ^ s0) | (e1 ^ s1) | (e2 ^ s2) | (e3 ^ s3);
      }
    }
    if ((difference[0] | difference[1] | difference[2] | difference[3]) != 0) return false;
  }
  for (size_t other = 1; other <= kOthers; ++other) {
    if (std::memcmp(first + done, sources[other] + start + done, length - done) != 0) return false;
  }
  if constexpr (kCopy) std::memcpy(copy + start + done, first + done, length - done);
  return true;
}

// A comparison alone (nothing copied) of a range in DRAM is bound by how many of its cache lines
// are on their way at once, not by the instructions: one core reads a single sequential stream at
// about two thirds of what it reads from several streams side by side, and the hardware prefetcher
// does not follow a stream across a page boundary. So the range is cut into kParts parts walked
// side by side (3 * kParts streams for three children), and each stream's line kAhead bytes further
// on, across the page boundary when it comes, is asked for (a prefetch never faults) before it is
// needed. Part i begins its walk i * kStagger bytes in and wraps around to its start at the end, so
// that the parts do not all cross a page boundary in the same step. On the 2-core benchmark VM the
// parts and prefetches take a 1 MiB comparison of three children in /dev/shm from about 285 to
// about 245 µs (the NBD export's server CPU per 1 MiB read from about 500 to 435 µs under load),
// and the staggered starts a further 5% off the comparison; prefetching without the parts, 8 parts,
// AVX-512 and page-by-page orders did no better, 16 parts worse. Every byte of [0, kParts * part)
// is compared by the parts, once, the rest by equal_lanes.
constexpr size_t kParts = 4;
constexpr size_t kLine = 64;
constexpr size_t kAhead = 1024;
constexpr size_t kStagger = 1024;

template <size_t kOthers>
[[gnu::always_inline]] inline bool equal_parts(const uint8_t* const* sources, uint64_t start,
                                               uint64_t length) noexcept {
  const uint64_t part = length / (kParts * kLine) * kLine;
  // Where each part's walk begins, in whole lines: done = 0 compares the line `shift` bytes into
  // the part, and the walk wraps around to the part's start after its last line.
  std::array<uint64_t, kParts> shifts{};
  for (size_t index = 0; index < kParts; ++index) {
    shifts[index] = part == 0 ? 0 : index * kStagger % part;
  }
  for (uint64_t done = 0; done < part;) {
    const uint64_t span_end = std::min<uint64_t>(part, done + kSpan);
    Lanes difference{};
    for (; done < span_end; done += kLine) {
      for (size_t index = 0; index < kParts; ++index) {
        uint64_t within = done + shifts[index];
        if (within >= part) within -= part;
        const uint64_t at = start + index * part + within;
        if (within + kAhead < part) {
          for (size_t source = 0; source <= kOthers; ++source) {
            __builtin_prefetch(sources[source] + at + kAhead, 0, 3);
          }
        }
        Lanes e0, e1;
        std::memcpy(&e0, sources[0] + at, sizeof e0);
        std::memcpy(&e1, sources[0] + at + 32, sizeof e1);
        for (size_t other = 1; other <= kOthers; ++other) {
          Lanes s0, s1;
          std::memcpy(&s0, sources[other] + at, sizeof s0);
          std::memcpy(&s1, sources[other] + at + 32, sizeof s1);
          difference |= (e0 ^ s0) | (e1 ^ s1);
        }
      }
    }
    if ((difference[0] | difference[1] | difference[2] | difference[3]) != 0) return false;
  }
  const uint64_t parted = kParts * part;
  return equal_lanes<kOthers, false>(sources, start + parted, length - parted, nullptr);
}

// equal_lanes for two and three sources, built for AVX2 and for the baseline (the dynamic loader
// picks one for the machine). Not under ThreadSanitizer: the loader runs the resolver that picks
// the clone while it relocates the program, before the TSan runtime is set up, and the resolver's
// instrumentation then crashes the process at start. That build keeps the baseline version.
#if defined(__SANITIZE_THREAD__)
#define BLOCKD_AVX2_CLONES
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define BLOCKD_AVX2_CLONES
#endif
#endif
#ifndef BLOCKD_AVX2_CLONES
#define BLOCKD_AVX2_CLONES [[gnu::target_clones("avx2", "default")]]
#endif
BLOCKD_AVX2_CLONES bool equal_two(const uint8_t* const* sources, uint64_t start, uint64_t length,
                                  uint8_t* copy) noexcept {
  return copy != nullptr ? equal_lanes<1, true>(sources, start, length, copy)
                         : equal_parts<1>(sources, start, length);
}
BLOCKD_AVX2_CLONES bool equal_three(const uint8_t* const* sources, uint64_t start, uint64_t length,
                                    uint8_t* copy) noexcept {
  return copy != nullptr ? equal_lanes<2, true>(sources, start, length, copy)
                         : equal_parts<2>(sources, start, length);
}

// The children's bytes of one request, each in its file's mapping (FileRange::memory).
struct MappedSources {
  const uint8_t* const* sources;
  size_t count;
  uint8_t* copy;  // the caller's buffer, which receives child 0's bytes; null: compare only
};

// Whether every child's bytes in [start, start + length) of the request equal child 0's (copying
// those on the way). More than three children are compared pairwise with child 0 piece by piece,
// so that child 0's piece is read again from the cache.
bool equal_sources(const MappedSources& mapped, uint64_t start, uint64_t length) noexcept {
  if (mapped.count == 1) {
    if (mapped.copy != nullptr) std::memcpy(mapped.copy + start, mapped.sources[0] + start, length);
    return true;
  }
  if (mapped.count == 2) return equal_two(mapped.sources, start, length, mapped.copy);
  if (mapped.count == 3) return equal_three(mapped.sources, start, length, mapped.copy);
  for (uint64_t done = start; done < start + length; done += kCompareChunk) {
    const uint64_t piece = std::min(kCompareChunk, start + length - done);
    for (size_t other = 1; other < mapped.count; ++other) {
      const uint8_t* pair[2] = {mapped.sources[0], mapped.sources[other]};
      if (!equal_two(pair, done, piece, other == 1 ? mapped.copy : nullptr)) return false;
    }
  }
  return true;
}

// Whether all children agree on the request (`length` bytes), with child 0's bytes copied to
// mapped.copy when it is not null. Under the fault guard: a child whose file shrank behind the
// engine's back raises SIGBUS where its mapping lost its pages, which then counts as a
// difference. Any thread; blocks, never suspends.
bool compare_in_place(const MappedSources& mapped, uint64_t length) noexcept {
  auto compare = [&mapped, length]() noexcept -> int64_t {
    return equal_sources(mapped, 0, length) ? 1 : 0;
  };
  return run_fault_guarded(compare) == 1;
}

// Small per-request arrays: inline for the usual handful of children.
template <typename T>
class ChildArray {
 public:
  explicit ChildArray(size_t count) : count_(count) {
    if (count > kInline) heap_.resize(count);
  }
  T& operator[](size_t i) noexcept { return count_ > kInline ? heap_[i] : inline_[i]; }
  size_t size() const noexcept { return count_; }

 private:
  static constexpr size_t kInline = 8;
  size_t count_;
  std::array<T, kInline> inline_{};
  std::vector<T> heap_;
};

Task<void> read_child(Node& child, uint64_t offset, uint64_t length, void* buffer, uint32_t flags,
                      int64_t& result) {
  result = co_await child.read(offset, length, buffer, flags);
}

// Like read_child, and notes that the read has finished (`done` tells whether it did so before
// the caller's next step, i.e. without waiting: a child in memory).
Task<void> read_child_noting(Node& child, uint64_t offset, uint64_t length, void* buffer,
                             uint32_t flags, int64_t& result, bool& done) {
  result = co_await child.read(offset, length, buffer, flags);
  done = true;
}

// The result of comparing one child with the data already in the caller's buffer.
enum class Comparison { kEqual, kDifferent, kFailed };

Task<void> write_child(Node& child, uint64_t offset, uint64_t length, const void* buffer,
                       uint32_t flags, int64_t& result) {
  result = co_await child.write(offset, length, buffer, flags);
}

Task<void> write_zeroes_child(Node& child, uint64_t offset, uint64_t length, uint32_t flags,
                              int64_t& result) {
  result = co_await child.write_zeroes(offset, length, flags);
}

Task<void> flush_child(Node& child, int64_t& result) { result = co_await child.flush(); }

class QuorumNode final : public Node {
 public:
  QuorumNode(block::NodeOptions common, QuorumOptions options)
      : Node(std::move(common)), quorum_(std::move(options)) {}

  Status attach_children(std::vector<std::shared_ptr<Node>> children) {
    for (auto& child : children) {
      auto edge = add_child("children." + std::to_string(next_index_), std::move(child));
      if (!edge) return edge.status();
      ++next_index_;
    }
    const int64_t length = this->children().front()->node()->size();
    for (const auto& edge : this->children()) {
      if (edge->node()->size() != length) {
        return Status::generic("Could not refresh total sector count: Input/output error");
      }
    }
    set_size(length);
    return Status::ok();
  }

  std::string_view driver_name() const noexcept override { return "quorum"; }
  std::string filename() const override { return json_filename(open_options()); }

  nlohmann::json open_options() const override {
    nlohmann::json children = nlohmann::json::array();
    for (const auto& edge : this->children()) children.push_back(edge->node()->open_options());
    nlohmann::json options = {
        {"driver", "quorum"}, {"children", children}, {"vote-threshold", quorum_.vote_threshold}};
    if (quorum_.blkverify) options["blkverify"] = *quorum_.blkverify;
    if (quorum_.rewrite_corrupted) options["rewrite-corrupted"] = *quorum_.rewrite_corrupted;
    if (quorum_.read_pattern) {
      options["read-pattern"] =
          *quorum_.read_pattern == QuorumOptions::ReadPattern::kFifo ? "fifo" : "quorum";
    }
    return options;
  }

  uint32_t request_alignment() const noexcept override {
    uint32_t alignment = 1;
    for (const auto& edge : children()) {
      alignment = std::max(alignment, edge->node()->request_alignment());
    }
    return alignment;
  }

  uint64_t max_transfer() const noexcept override {
    uint64_t limit = Node::max_transfer();
    for (const auto& edge : children()) limit = std::min(limit, edge->node()->max_transfer());
    return limit;
  }

  bool supports_write_zeroes() const noexcept override {
    return std::all_of(children().begin(), children().end(),
                       [](const auto& edge) { return edge->node()->supports_write_zeroes(); });
  }

  Task<int64_t> read(uint64_t offset, uint64_t length, void* buffer,
                     uint32_t flags) noexcept override;
  Task<int64_t> write(uint64_t offset, uint64_t length, const void* buffer,
                      uint32_t flags) noexcept override;
  Task<int64_t> write_zeroes(uint64_t offset, uint64_t length, uint32_t flags) noexcept override;
  Task<int64_t> flush() noexcept override;
  Task<BlockStatus> block_status(uint64_t offset, uint64_t length) noexcept override;
  block::FileRange map_file(uint64_t offset, uint64_t length,
                            block::MapAccess access) noexcept override;
  Task<block::FileRange> map_file_async(uint64_t offset, uint64_t length,
                                        block::MapAccess access) noexcept override;
  void release_file(const block::FileRange& range, block::MapAccess access) noexcept override;

  Status add_dynamic_child(std::shared_ptr<Node> child) override;
  Status remove_dynamic_child(block::Child& child) override;

 protected:
  void child_permissions(const block::Child&, uint32_t permissions, uint32_t shared,
                         uint32_t& child_permissions, uint32_t& child_shared) const override {
    child_permissions = permissions;
    // Repairs write to the children even when the users only read.
    if (quorum_.rewrite_corrupted.value_or(false) && !read_only()) {
      child_permissions |= block::kPermWrite;
    }
    // Another writer or a resize would make the children differ: never shared.
    child_shared = (shared & block::kPermConsistentRead) | block::kPermWriteUnchanged;
  }

 private:
  bool fifo() const noexcept {
    return quorum_.read_pattern.value_or(QuorumOptions::ReadPattern::kQuorum) ==
           QuorumOptions::ReadPattern::kFifo;
  }

  void report(QuorumEvent::Kind kind, QuorumEvent::Op op, int64_t error, const std::string& node,
              uint64_t offset, uint64_t length) {
    if (!quorum_.events) return;
    QuorumEvent event;
    event.kind = kind;
    event.op = op;
    if (error < 0) event.error = errno_text(static_cast<int>(error));
    event.node_name = node;
    const uint64_t first = offset / kSectorSize;
    const uint64_t end = (offset + length + kSectorSize - 1) / kSectorSize;
    event.sector_num = static_cast<int64_t>(first);
    event.sectors_count = static_cast<int64_t>(end - first);
    quorum_.events(event);
  }
  void report_bad(QuorumEvent::Op op, int64_t error, Node& child, uint64_t offset,
                  uint64_t length) {
    report(QuorumEvent::Kind::kReportBad, op, error, child.node_name(), offset, length);
  }
  void report_failure(uint64_t offset, uint64_t length) {
    report(QuorumEvent::Kind::kFailure, QuorumEvent::Op::kRead, 0, node_name(), offset, length);
  }

  // The most frequent error among the failed children (QEMU's choice when too few succeeded).
  static int64_t vote_error(ChildArray<int64_t>& results) {
    int64_t best = -EIO;
    size_t best_count = 0;
    for (size_t i = 0; i < results.size(); ++i) {
      if (results[i] >= 0) continue;
      size_t count = 0;
      for (size_t j = 0; j < results.size(); ++j) count += results[j] == results[i];
      if (count > best_count) {
        best = results[i];
        best_count = count;
      }
    }
    return best;
  }

  // Snapshot of the children for one request; requests keep the node's in-flight count so that
  // x-blockdev-change can wait for them before removing an edge.
  struct InFlight {
    QuorumNode* node;
    explicit InFlight(QuorumNode* n) : node(n) { ++node->in_flight_; }
    ~InFlight() { --node->in_flight_; }
  };
  Node& child_node(size_t i) const noexcept { return *children()[i]->node(); }

  ScratchBuffer take_buffer(size_t length) {
    for (size_t i = 0; i < pool_.size(); ++i) {
      if (pool_[i].capacity >= length) {
        ScratchBuffer buffer = std::move(pool_[i]);
        pool_[i] = std::move(pool_.back());
        pool_.pop_back();
        return buffer;
      }
    }
    ScratchBuffer buffer;
    buffer.capacity = (std::max<size_t>(length, 4096) + kBufferAlignment - 1) & ~(kBufferAlignment - 1);
    buffer.data.reset(static_cast<char*>(std::aligned_alloc(kBufferAlignment, buffer.capacity)));
    if (!buffer.data) buffer.capacity = 0;
    return buffer;
  }
  void give_back(ScratchBuffer buffer) {
    if (buffer.data && pool_.size() < kMaxPooledBuffers) pool_.push_back(std::move(buffer));
  }

  // Reports the children whose write failed; the request succeeds when enough did.
  int64_t finish_write(ChildArray<int64_t>& results, uint64_t offset, uint64_t length) {
    size_t successes = 0;
    for (size_t i = 0; i < results.size(); ++i) {
      if (results[i] >= 0) {
        ++successes;
      } else {
        report_bad(QuorumEvent::Op::kWrite, results[i], child_node(i), offset, length);
      }
    }
    if (successes >= static_cast<size_t>(quorum_.vote_threshold)) return 0;
    report_failure(offset, length);
    return vote_error(results);
  }

  Task<int64_t> read_fifo(uint64_t offset, uint64_t length, void* buffer, uint32_t flags) noexcept;
  // What comparing a request in place in the children's mappings found.
  enum class InPlace { kAgreed, kDisagreed, kUnavailable };
  // Maps every child's range; true when each child keeps it in a mapping of its file
  // (FileRange::memory) and all of it is in the page cache. `ranges` receives every mapping
  // granted, which the caller hands back (release_children) whatever the answer.
  // `check_residency` false leaves the page cache check to the caller.
  bool map_children(uint64_t offset, uint64_t length, ChildArray<block::FileRange>& ranges,
                    bool check_residency = true) noexcept;
  // Hands back the mappings of children `from` on.
  void release_children(ChildArray<block::FileRange>& ranges, size_t from) noexcept;
  // Compares the children in place and, when `copy` is not null, copies child 0's bytes there.
  InPlace compare_children(uint64_t offset, uint64_t length, uint8_t* copy,
                           ChildArray<block::FileRange>& ranges) noexcept;
  // The same from a task: from kSplitThreshold on, the comparison runs whole on a pool worker
  // while the loop thread serves other requests.
  Task<InPlace> compare_children_off_loop(uint64_t offset, uint64_t length, uint8_t* copy,
                                          ChildArray<block::FileRange>& ranges);
  Task<bool> read_mapped(uint64_t offset, uint64_t length, char* buffer);
  // Writes a large request to children that are all files in memory, off the loop thread (see
  // the definition). False, with nothing written, when some child is not.
  Task<bool> write_mapped(uint64_t offset, uint64_t length, const void* buffer,
                          ChildArray<int64_t>& results);
  Task<Comparison> compare_child(Node& child, uint64_t offset, uint64_t length, const char* expected,
                                 char* chunk, uint64_t chunk_size, uint32_t flags, int64_t& error);
  Task<int64_t> vote(uint64_t offset, uint64_t length, void* buffer, ChildArray<char*>& data,
                     ChildArray<int64_t>& results);
  // Runs `change` on the node's loop once no request is in flight.
  Status change_children(const std::function<Status()>& change);

  QuorumOptions quorum_;
  unsigned next_index_ = 0;
  size_t in_flight_ = 0;
  std::vector<ScratchBuffer> pool_;
};

Task<int64_t> QuorumNode::read_fifo(uint64_t offset, uint64_t length, void* buffer,
                                    uint32_t flags) noexcept {
  int64_t result = -EIO;
  for (size_t i = 0; i < children().size(); ++i) {
    Node& child = child_node(i);
    result = co_await child.read(offset, length, buffer, flags);
    if (result >= 0) co_return 0;
    report_bad(QuorumEvent::Op::kRead, result, child, offset, length);
  }
  co_return result;
}

bool QuorumNode::map_children(uint64_t offset, uint64_t length,
                              ChildArray<block::FileRange>& ranges, bool check_residency) noexcept {
  for (size_t i = 0; i < ranges.size(); ++i) {
    ranges[i] = child_node(i).map_file(offset, length, block::MapAccess::kRead);
    if (ranges[i].fd < 0 || ranges[i].memory == nullptr ||
        (check_residency && !resident(ranges[i].memory, length))) {
      return false;
    }
  }
  return true;
}

void QuorumNode::release_children(ChildArray<block::FileRange>& ranges, size_t from) noexcept {
  for (size_t i = from; i < ranges.size(); ++i) {
    if (ranges[i].fd >= 0) child_node(i).release_file(ranges[i], block::MapAccess::kRead);
  }
}

QuorumNode::InPlace QuorumNode::compare_children(uint64_t offset, uint64_t length, uint8_t* copy,
                                                 ChildArray<block::FileRange>& ranges) noexcept {
  if (!map_children(offset, length, ranges)) return InPlace::kUnavailable;
  ChildArray<const uint8_t*> sources(ranges.size());
  for (size_t i = 0; i < ranges.size(); ++i) sources[i] = ranges[i].memory;
  const MappedSources mapped{&sources[0], sources.size(), copy};
  return compare_in_place(mapped, length) ? InPlace::kAgreed : InPlace::kDisagreed;
}

// A comparison of a large read costs several times what sending the read does: a loop thread
// that waited for it (or for a worker doing half of it) would leave the other core idle between
// the requests of a queue. Whole on a worker, the loop meanwhile receives and sends other
// requests, and the comparisons of a queue of them run side by side. Below kSplitThreshold the
// hand-off costs more than it frees.
Task<QuorumNode::InPlace> QuorumNode::compare_children_off_loop(
    uint64_t offset, uint64_t length, uint8_t* copy, ChildArray<block::FileRange>& ranges) {
  if (length < kSplitThreshold) co_return compare_children(offset, length, copy, ranges);
  if (!map_children(offset, length, ranges, false)) co_return InPlace::kUnavailable;
  ChildArray<const uint8_t*> sources(ranges.size());
  for (size_t i = 0; i < ranges.size(); ++i) sources[i] = ranges[i].memory;
  const MappedSources mapped{&sources[0], sources.size(), copy};
  // The worker checks the residency too (system calls the loop thread is spared).
  const auto verdict =
      static_cast<InPlace>(co_await RunInThread(loop(), [&mapped, length]() noexcept -> int64_t {
        for (size_t i = 0; i < mapped.count; ++i) {
          if (!resident(mapped.sources[i], length)) {
            return static_cast<int64_t>(InPlace::kUnavailable);
          }
        }
        return static_cast<int64_t>(compare_in_place(mapped, length) ? InPlace::kAgreed
                                                                      : InPlace::kDisagreed);
      }));
  co_return verdict;
}

// A mapping of the quorum is child 0's, granted once every child was found to hold the same bytes
// (compared in place, as a large read is). Only for reads of at least kInPlaceThreshold bytes in
// quorum mode whose children all keep the range mapped and in memory; otherwise, and whenever a
// child differs or faults, nothing is granted, so that the caller reads through read(), which
// votes, reports and repairs. What the caller then transfers from child 0's file is what a read
// returning at the moment of the comparison would have returned: a write racing it, through the
// quorum or behind the engine's back, is the race any read has with a write of the same range,
// whose result is undefined. The other children's mappings end at once; child 0's lasts until
// release_file and counts as a request in flight, so that no child edge goes away under it.
block::FileRange QuorumNode::map_file(uint64_t offset, uint64_t length,
                                      block::MapAccess access) noexcept {
  if (access != block::MapAccess::kRead || length < kInPlaceThreshold || fifo()) return {};
  ChildArray<block::FileRange> ranges(children().size());
  const bool agreed = compare_children(offset, length, nullptr, ranges) == InPlace::kAgreed;
  release_children(ranges, agreed ? 1 : 0);
  if (!agreed) return {};
  ++in_flight_;
  return ranges[0];
}

// The same for a caller that can wait (the NBD export's large reads), with the comparison off the
// loop thread (compare_children_off_loop).
Task<block::FileRange> QuorumNode::map_file_async(uint64_t offset, uint64_t length,
                                                  block::MapAccess access) noexcept {
  if (access != block::MapAccess::kRead || length < kInPlaceThreshold || fifo()) {
    co_return block::FileRange{};
  }
  InFlight guard(this);
  ChildArray<block::FileRange> ranges(children().size());
  const bool agreed =
      co_await compare_children_off_loop(offset, length, nullptr, ranges) == InPlace::kAgreed;
  release_children(ranges, agreed ? 1 : 0);
  if (!agreed) co_return block::FileRange{};
  ++in_flight_;
  co_return ranges[0];
}

void QuorumNode::release_file(const block::FileRange& range, block::MapAccess access) noexcept {
  child_node(0).release_file(range, access);
  --in_flight_;
}

// The fast path for children that all lie in files in memory (Node::map_file): their bytes are
// read with plain system calls, child 0 into the caller's buffer, and compared; no child request,
// no coroutine per child. True when every child agreed (the read is done); false when some child
// is elsewhere, failed or differs: then nothing is reported and the caller reads the children
// again through their nodes, which gives the errors, votes and events. A child changed or
// truncated behind the engine's back reads differently (past its end as zeroes) and is outvoted
// there, as on the normal path.
Task<bool> QuorumNode::read_mapped(uint64_t offset, uint64_t length, char* buffer) {
  const size_t count = children().size();
  ChildArray<block::FileRange> ranges(count);
  // Every mapping granted is handed back on the way out (a qcow2 child holds its lock meanwhile).
  struct Release {
    QuorumNode& node;
    ChildArray<block::FileRange>& ranges;
    ~Release() {
      for (size_t i = 0; i < ranges.size(); ++i) {
        if (ranges[i].fd >= 0) node.child_node(i).release_file(ranges[i], block::MapAccess::kRead);
      }
    }
  } release{*this, ranges};
  for (size_t i = 0; i < count; ++i) {
    ranges[i] = child_node(i).map_file(offset, length, block::MapAccess::kRead);
    if (ranges[i].fd < 0) co_return false;
  }
  const uint64_t chunk_size = std::min(length, kCompareChunk);
  ScratchBuffer chunk = take_buffer(chunk_size);
  if (chunk.data == nullptr) co_return false;
  bool agreed = false;
  if (length < kSplitThreshold) {
    agreed = compare_mapped(&ranges[0], count, 0, length, buffer, chunk.data.get(), chunk_size);
  } else {
    ScratchBuffer second_chunk = take_buffer(chunk_size);
    if (second_chunk.data == nullptr) {
      give_back(std::move(chunk));
      co_return false;
    }
    // The second half, from a piece boundary, goes to a worker; the loop reads the first.
    const uint64_t half = (length / 2 + kCompareChunk - 1) / kCompareChunk * kCompareChunk;
    bool second_agreed = false;
    Join join;
    join.start(loop(), compare_mapped_in_thread(loop(), &ranges[0], count, half, length - half,
                                                buffer, second_chunk.data.get(), chunk_size,
                                                second_agreed));
    agreed = compare_mapped(&ranges[0], count, 0, half, buffer, chunk.data.get(), chunk_size);
    co_await join.wait();
    agreed = agreed && second_agreed;
    give_back(std::move(second_chunk));
  }
  give_back(std::move(chunk));
  co_return agreed;
}

// Reads piece by piece into `chunk` and compares each piece with `expected` right away, while the
// copy is still in the cache. Stops at the first difference or error (`error` then holds it).
Task<Comparison> QuorumNode::compare_child(Node& child, uint64_t offset, uint64_t length,
                                           const char* expected, char* chunk, uint64_t chunk_size,
                                           uint32_t flags, int64_t& error) {
  for (uint64_t done = 0; done < length;) {
    const uint64_t piece = std::min(chunk_size, length - done);
    const int64_t result = co_await child.read(offset + done, piece, chunk, flags);
    if (result < 0) {
      error = result;
      co_return Comparison::kFailed;
    }
    if (std::memcmp(expected + done, chunk, piece) != 0) co_return Comparison::kDifferent;
    done += piece;
  }
  co_return Comparison::kEqual;
}

Task<int64_t> QuorumNode::read(uint64_t offset, uint64_t length, void* buffer,
                               uint32_t flags) noexcept {
  InFlight guard(this);
  if (fifo()) co_return co_await read_fifo(offset, length, buffer, flags);
  InPlace in_place = InPlace::kUnavailable;
  if (length >= kInPlaceThreshold) {
    ChildArray<block::FileRange> ranges(children().size());
    in_place =
        co_await compare_children_off_loop(offset, length, static_cast<uint8_t*>(buffer), ranges);
    release_children(ranges, 0);
    if (in_place == InPlace::kAgreed) co_return 0;
  }
  // Children that differed in place differ through pread as well: straight to the vote.
  if (length > 0 && in_place == InPlace::kUnavailable &&
      co_await read_mapped(offset, length, static_cast<char*>(buffer))) {
    co_return 0;
  }
  const size_t count = children().size();
  // data[i] holds child i's bytes: child 0 reads straight into the caller's buffer, a child found
  // equal to it shares that buffer, the others get scratch buffers.
  ChildArray<ScratchBuffer> scratch(count);
  ChildArray<char*> data(count);
  ChildArray<int64_t> results(count);
  data[0] = static_cast<char*>(buffer);
  Join join;
  bool first_done = false;
  join.start(loop(), read_child_noting(child_node(0), offset, length, buffer, flags, results[0],
                                       first_done));
  // `pending` is the first child not read yet.
  size_t pending = 1;
  if (first_done && results[0] >= 0) {
    // The compare path, for children that answer without waiting (files in memory): the others
    // are read one after another through one small buffer and compared as they arrive. Nothing
    // is hashed or copied whole unless a child disagrees or fails.
    const uint64_t chunk_size =
        length <= kCompareChunk ? length : std::max<uint64_t>(kCompareChunk, request_alignment());
    ScratchBuffer chunk = take_buffer(chunk_size);
    if (chunk.data == nullptr) co_return -ENOMEM;
    for (; pending < count; ++pending) {
      const Comparison comparison =
          co_await compare_child(child_node(pending), offset, length, data[0], chunk.data.get(),
                                 chunk_size, flags, results[pending]);
      if (comparison == Comparison::kDifferent) break;
      if (comparison == Comparison::kEqual) {
        data[pending] = data[0];
        results[pending] = 0;
      }
    }
    give_back(std::move(chunk));
    if (pending == count) {
      bool all_agree = true;
      for (size_t i = 1; i < count; ++i) all_agree = all_agree && results[i] >= 0;
      if (all_agree) co_return 0;
    }
  }
  // Every child from `pending` on is read whole, concurrently, and the children vote.
  for (size_t i = pending; i < count; ++i) {
    scratch[i] = take_buffer(length);
    data[i] = scratch[i].data.get();
    if (data[i] == nullptr) {
      co_await join.wait();
      co_return -ENOMEM;
    }
  }
  for (size_t i = pending; i < count; ++i) {
    join.start(loop(), read_child(child_node(i), offset, length, data[i], flags, results[i]));
  }
  co_await join.wait();
  const int64_t result = co_await vote(offset, length, buffer, data, results);
  for (size_t i = pending; i < count; ++i) give_back(std::move(scratch[i]));
  co_return result;
}

Task<int64_t> QuorumNode::vote(uint64_t offset, uint64_t length, void* buffer,
                               ChildArray<char*>& data, ChildArray<int64_t>& results) {
  const size_t count = results.size();
  const auto threshold = static_cast<size_t>(quorum_.vote_threshold);
  size_t successes = 0;
  size_t first = count;
  for (size_t i = 0; i < count; ++i) {
    if (results[i] >= 0) {
      ++successes;
      if (first == count) first = i;
    } else {
      report_bad(QuorumEvent::Op::kRead, results[i], child_node(i), offset, length);
    }
  }
  if (successes < threshold) {
    report_failure(offset, length);
    co_return vote_error(results);
  }
  // The fast path: every successful read returned the same bytes.
  bool agree = true;
  for (size_t i = first + 1; i < count && agree; ++i) {
    if (results[i] >= 0) agree = std::memcmp(data[first], data[i], length) == 0;
  }
  if (agree) {
    if (data[first] != buffer) std::memcpy(buffer, data[first], length);
    co_return 0;
  }
  // Vote: group the children by their data (hash first, bytes to confirm). group[i] is the
  // lowest-numbered child with the same data as child i.
  ChildArray<uint64_t> hashes(count);
  ChildArray<size_t> group(count);
  ChildArray<size_t> votes(count);
  for (size_t i = 0; i < count; ++i) {
    if (results[i] < 0) continue;
    hashes[i] = hash_bytes(data[i], length);
    group[i] = i;
    for (size_t j = 0; j < i; ++j) {
      if (results[j] >= 0 && group[j] == j && hashes[j] == hashes[i] &&
          std::memcmp(data[j], data[i], length) == 0) {
        group[i] = j;
        break;
      }
    }
    ++votes[group[i]];
  }
  // The largest group wins; among equal groups the one first seen on the highest-numbered child.
  size_t winner = count;
  for (size_t i = 0; i < count; ++i) {
    if (results[i] >= 0 && group[i] == i && (winner == count || votes[i] >= votes[winner])) {
      winner = i;
    }
  }
  if (votes[winner] < threshold) {
    report_failure(offset, length);
    co_return -EIO;
  }
  const bool rewrite = quorum_.rewrite_corrupted.value_or(false);
  for (size_t i = 0; i < count; ++i) {
    if (results[i] >= 0 && group[i] != winner) {
      report_bad(QuorumEvent::Op::kRead, 0, child_node(i), offset, length);
    }
  }
  if (data[winner] != buffer) std::memcpy(buffer, data[winner], length);
  if (rewrite) {
    // Repairs complete before the read does; their own failures are not the reader's concern.
    ChildArray<int64_t> repaired(count);
    Join join;
    for (size_t i = 0; i < count; ++i) {
      if (results[i] >= 0 && group[i] != winner) {
        join.start(loop(), write_child(child_node(i), offset, length, buffer, 0, repaired[i]));
      }
    }
    co_await join.wait();
  }
  co_return 0;
}

// When every child's range lies in a host file in memory (Node::map_file with kWrite: writing the
// bytes there is all the write needs), a large write is written into the children's files by a
// pool worker, one pwrite each, while the loop serves other requests; through the children's
// nodes each copy would run on the loop thread (a file in memory writes inline), one after
// another. results[i] receives child i's outcome.
Task<bool> QuorumNode::write_mapped(uint64_t offset, uint64_t length, const void* buffer,
                                    ChildArray<int64_t>& results) {
  const size_t count = children().size();
  ChildArray<block::FileRange> ranges(count);
  bool mapped = true;
  for (size_t i = 0; i < count && mapped; ++i) {
    ranges[i] = child_node(i).map_file(offset, length, block::MapAccess::kWrite);
    mapped = ranges[i].fd >= 0;
  }
  if (mapped) {
    int64_t* outcomes = &results[0];
    const block::FileRange* targets = &ranges[0];
    co_await RunInThread(loop(), [=]() noexcept -> int64_t {
      for (size_t i = 0; i < count; ++i) {
        outcomes[i] = write_whole(targets[i].fd, buffer, length, targets[i].offset);
      }
      return 0;
    });
  }
  for (size_t i = 0; i < count; ++i) {
    if (ranges[i].fd >= 0) child_node(i).release_file(ranges[i], block::MapAccess::kWrite);
  }
  co_return mapped;
}

Task<int64_t> QuorumNode::write(uint64_t offset, uint64_t length, const void* buffer,
                                uint32_t flags) noexcept {
  InFlight guard(this);
  const size_t count = children().size();
  ChildArray<int64_t> results(count);
  // FUA needs more than the bytes in the files: through the nodes.
  if (length >= kSplitThreshold && flags == 0 &&
      co_await write_mapped(offset, length, buffer, results)) {
    co_return finish_write(results, offset, length);
  }
  {
    Join join;
    for (size_t i = 0; i < count; ++i) {
      join.start(loop(), write_child(child_node(i), offset, length, buffer, flags, results[i]));
    }
    co_await join.wait();
  }
  co_return finish_write(results, offset, length);
}

Task<int64_t> QuorumNode::write_zeroes(uint64_t offset, uint64_t length, uint32_t flags) noexcept {
  InFlight guard(this);
  const size_t count = children().size();
  ChildArray<int64_t> results(count);
  {
    Join join;
    for (size_t i = 0; i < count; ++i) {
      join.start(loop(), write_zeroes_child(child_node(i), offset, length, flags, results[i]));
    }
    co_await join.wait();
  }
  // Without a fallback a child may refuse; the caller then writes zero buffers to the whole
  // quorum, which repeats this request's effect on the children that did succeed.
  if (flags & block::kRequestNoFallback) {
    for (size_t i = 0; i < count; ++i) {
      if (results[i] == -ENOTSUP) co_return -ENOTSUP;
    }
  }
  co_return finish_write(results, offset, length);
}

Task<int64_t> QuorumNode::flush() noexcept {
  InFlight guard(this);
  const size_t count = children().size();
  ChildArray<int64_t> results(count);
  {
    Join join;
    for (size_t i = 0; i < count; ++i) join.start(loop(), flush_child(child_node(i), results[i]));
    co_await join.wait();
  }
  size_t successes = 0;
  for (size_t i = 0; i < count; ++i) {
    if (results[i] >= 0) {
      ++successes;
    } else {
      report_bad(QuorumEvent::Op::kFlush, results[i], child_node(i), 0, 0);
    }
  }
  if (successes >= static_cast<size_t>(quorum_.vote_threshold)) co_return 0;
  co_return vote_error(results);
}

Task<BlockStatus> QuorumNode::block_status(uint64_t offset, uint64_t length) noexcept {
  InFlight guard(this);
  const uint64_t size = static_cast<uint64_t>(this->size());
  if (offset >= size) co_return BlockStatus{0, 0};
  length = std::min(length, size - offset);
  // Zero only where every child reads as zero (for the shortest such run); data otherwise, for
  // the longest data run any child reports.
  uint64_t zero_run = length;
  uint64_t data_run = 0;
  for (size_t i = 0; i < children().size(); ++i) {
    Node& child = child_node(i);
    const BlockStatus status = co_await child.block_status(offset, length);
    if (status.bytes < 0) {
      report_bad(QuorumEvent::Op::kRead, status.bytes, child, offset, length);
      data_run = length;
      break;
    }
    const uint64_t run = std::clamp<uint64_t>(static_cast<uint64_t>(status.bytes), 1, length);
    if (status.flags & block::kStatusZero) {
      zero_run = std::min(zero_run, run);
    } else {
      data_run = std::max(data_run, run);
    }
  }
  if (data_run > 0) {
    co_return BlockStatus{static_cast<int64_t>(data_run),
                          block::kStatusData | block::kStatusAllocated};
  }
  co_return BlockStatus{static_cast<int64_t>(zero_run),
                        block::kStatusZero | block::kStatusAllocated};
}

Status QuorumNode::change_children(const std::function<Status()>& change) {
  // Requests keep pointers to the children: they finish before an edge changes. The count is
  // only read here while no request can start (the main loop runs this handler; a node on another
  // loop is changed from inside that loop).
  const bool here = Loop::current() == nullptr || Loop::current() == &loop();
  if (here && in_flight_ == 0) {
    return change();
  }
  auto drain_and_change = [&]() -> Status {
    loop().run_until([&] { return in_flight_ == 0; });
    return change();
  };
  if (Loop::current() == &loop()) return drain_and_change();
  return loop().call(drain_and_change);
}

Status QuorumNode::add_dynamic_child(std::shared_ptr<Node> child) {
  if (quorum_.blkverify.value_or(false)) {
    return Status::generic("Cannot add a child to a quorum in blkverify mode");
  }
  if (!child->users().empty()) {
    return Status::generic("The node " + child->node_name() + " already has a parent");
  }
  if (next_index_ == UINT32_MAX) return Status::generic("Too many children");
  // The new child runs its I/O where the quorum does (an export may have moved it to an iothread).
  Loop& home = child->loop();
  if (&home != &loop()) BLOCKD_RETURN_IF_ERROR(child->move_to_loop(loop(), nullptr));
  Node* adding = child.get();
  Status status = change_children([&]() -> Status {
    auto edge = add_child("children." + std::to_string(next_index_), std::move(child));
    if (!edge) return edge.status();
    ++next_index_;
    return Status::ok();
  });
  if (!status && &home != &loop()) (void)adding->move_to_loop(home, nullptr);
  return status;
}

Status QuorumNode::remove_dynamic_child(block::Child& child) {
  if (static_cast<int64_t>(children().size()) <= quorum_.vote_threshold) {
    return Status::generic("The number of children cannot be lower than the vote threshold " +
                           std::to_string(quorum_.vote_threshold));
  }
  return change_children([&]() -> Status {
    // Removing the newest child gives its index back, as QEMU does.
    if (child.name() == "children." + std::to_string(next_index_ - 1)) --next_index_;
    remove_child(child);
    return Status::ok();
  });
}

}  // namespace

Status validate_quorum_options(const QuorumOptions& options, size_t children) {
  if (children < 1) return Status::generic("Number of provided children must be 1 or more");
  if (options.vote_threshold < 1) {
    return Status::generic("Parameter 'vote-threshold' expects a value >= 1");
  }
  if (static_cast<uint64_t>(options.vote_threshold) > children) {
    return Status::generic("threshold may not exceed children count");
  }
  const bool blkverify = options.blkverify.value_or(false);
  if (blkverify && (children != 2 || options.vote_threshold != 2)) {
    return Status::generic(
        "blkverify=on can only be set if there are exactly two files and vote-threshold is 2");
  }
  if (blkverify && options.rewrite_corrupted.value_or(false)) {
    return Status::generic("rewrite-corrupted=on cannot be used with blkverify=on");
  }
  return Status::ok();
}

Expected<std::shared_ptr<Node>> open_quorum_node(block::NodeOptions common, QuorumOptions options,
                                                 std::vector<std::shared_ptr<Node>> children,
                                                 Loop& loop) {
  BLOCKD_RETURN_IF_ERROR(validate_quorum_options(options, children.size()));
  auto node = std::make_shared<QuorumNode>(std::move(common), std::move(options));
  node->set_loop(loop);
  BLOCKD_RETURN_IF_ERROR(node->attach_children(std::move(children)));
  return std::shared_ptr<Node>(std::move(node));
}

}  // namespace blockd::drivers
