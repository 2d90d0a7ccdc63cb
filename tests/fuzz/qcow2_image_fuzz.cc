// libFuzzer target: arbitrary bytes as a whole qcow2 image file, opened by the qcow2 driver over
// the file driver and then used. Where qcow2_format_fuzz feeds the pure decoders, this one runs
// what the driver builds on them: reading the L1 table and the refcount table at open, the dirty
// bit's refcount recount, L2 lookups through the metadata cache, compressed clusters, the snapshot
// table, and (for writable opens) cluster allocation, copy-on-write, discard, zero writes and
// snapshot create/revert/delete against whatever refcounts and tables the image claims. Every
// input must give an open error or I/O results (data or a negative errno), never a crash, a hang
// or an access outside the buffers.
//
// The last input byte selects what is done: bit 0 opens read-write, bit 1 adds the snapshot
// operations (read-write only). The image is written to a private file on tmpfs for each input.
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "drivers/file.h"
#include "drivers/qcow2/qcow2.h"
#include "runtime/loop.h"

namespace {

using blockd::Expected;
using blockd::Loop;
using blockd::Status;
using blockd::Task;
namespace block = blockd::block;
namespace drivers = blockd::drivers;

constexpr uint64_t kReadBudget = 4u << 20;  // bytes read per input, whatever the virtual size
constexpr int kStatusSteps = 32;            // block-status extents walked per input

struct Harness {
  std::unique_ptr<Loop> loop;
  std::string path;
};

Harness& harness() {
  static Harness* instance = [] {
    auto* h = new Harness();
    auto loop = Loop::create(64);
    if (!loop) __builtin_trap();
    h->loop = std::move(loop).value();
    std::string dir = ::access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    std::string name = dir + "/blockd-qcow2-fuzz-XXXXXX";
    const int fd = ::mkstemp(name.data());
    if (fd < 0) __builtin_trap();
    ::close(fd);
    h->path = name;
    // Removed at normal exit; a crash leaves it for the crash's reproduction anyway.
    std::atexit([] { ::unlink(harness().path.c_str()); });
    return h;
  }();
  return *instance;
}

template <typename T>
T run(Loop& loop, Task<T> task) {
  std::optional<T> result;
  loop.spawn([](Task<T> inner, std::optional<T>& out) -> Task<void> {
    out = co_await std::move(inner);
  }(std::move(task), result));
  loop.run_until([&] { return result.has_value(); });
  return std::move(*result);
}

bool write_image(const std::string& path, const uint8_t* data, size_t size) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_TRUNC | O_CLOEXEC);
  if (fd < 0) return false;
  size_t done = 0;
  while (done < size) {
    const ssize_t n = ::write(fd, data + done, size - done);
    if (n <= 0) break;
    done += static_cast<size_t>(n);
  }
  ::close(fd);
  return done == size;
}

// Walks block status from the start and reads the beginning of each extent, within the budget.
void read_around(Loop& loop, block::Node& node) {
  const uint64_t size = static_cast<uint64_t>(node.size());
  std::vector<uint8_t> buffer(64 << 10);
  uint64_t offset = 0;
  uint64_t budget = kReadBudget;
  for (int step = 0; step < kStatusSteps && offset < size && budget > 0; ++step) {
    auto status = run(loop, node.block_status(offset, size - offset));
    if (status.bytes <= 0 || static_cast<uint64_t>(status.bytes) > size - offset) {
      if (status.bytes > 0) __builtin_trap();  // a run past the end of the node
      break;
    }
    const uint64_t length = std::min<uint64_t>({static_cast<uint64_t>(status.bytes),
                                                buffer.size(), budget});
    (void)run(loop, node.read(offset, length, buffer.data(), 0));
    budget -= length;
    offset += static_cast<uint64_t>(status.bytes);
  }
  // The last bytes of the node too: the end of the L1 table and its last L2 table.
  if (size >= 4096) (void)run(loop, node.read(size - 4096, 4096, buffer.data(), 0));
}

void modify(Loop& loop, block::Node& node, const uint8_t* data, size_t size) {
  const uint64_t node_size = static_cast<uint64_t>(node.size());
  if (node_size < 8192) return;
  std::vector<uint8_t> buffer(8192, 0x5a);
  // Offsets taken from the input so that the fuzzer can aim at the clusters its tables describe.
  const uint64_t pick = size >= 16 ? drivers::qcow2::load_be64(data + size - 16) : 0;
  const uint64_t at = (pick % (node_size - 8192)) & ~uint64_t{511};
  (void)run(loop, node.write(0, 4096, buffer.data(), 0));
  (void)run(loop, node.write(at, buffer.size(), buffer.data(), 0));
  (void)run(loop, node.write_zeroes(at + 4096, 4096, 0));
  (void)run(loop, node.discard(0, 4096));
  (void)run(loop, node.flush());
}

void snapshot_operations(Loop& loop, block::Node& node) {
  auto* snapshots = drivers::qcow2_snapshots(node);
  if (snapshots == nullptr) return;
  (void)run(loop, snapshots->create_snapshot("fuzz"));
  std::vector<uint8_t> buffer(4096, 0xa5);
  if (node.size() >= 4096) (void)run(loop, node.write(0, buffer.size(), buffer.data(), 0));
  const size_t count = snapshots->snapshots().size();
  if (count > 0) (void)run(loop, snapshots->revert_snapshot(0));
  if (snapshots->snapshots().size() > 0) {
    (void)run(loop, snapshots->delete_snapshot(snapshots->snapshots().size() - 1));
  }
  (void)run(loop, node.flush());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  Harness& h = harness();
  if (!write_image(h.path, data, size)) return 0;
  const uint8_t mode = data[size - 1];
  const bool writable = (mode & 1) != 0;
  {
    drivers::FileOptions file_options;
    file_options.filename = h.path;
    file_options.locking = drivers::FileOptions::Locking::kOff;
    auto file = drivers::open_file_node(
        block::NodeOptions{.node_name = "file0", .read_only = !writable}, file_options, *h.loop);
    if (!file) return 0;
    drivers::OpenBackingFile no_backing = [](const std::string&, const std::string&)
        -> Expected<std::shared_ptr<block::Node>> {
      return Status::generic("no backing files while fuzzing");
    };
    drivers::Qcow2Options options;
    // A small cache so that evictions (and their write-backs) happen on small images too.
    options.l2_cache_size = 64 << 10;
    options.refcount_cache_size = 64 << 10;
    auto node = drivers::open_qcow2_node(
        block::NodeOptions{.node_name = "qcow2", .read_only = !writable}, options, *file,
        no_backing, *h.loop, [&](Task<Status> task) { return run(*h.loop, std::move(task)); });
    if (!node) return 0;
    read_around(*h.loop, **node);
    if (writable && !(*node)->read_only()) {
      modify(*h.loop, **node, data, size);
      if (mode & 2) snapshot_operations(*h.loop, **node);
      read_around(*h.loop, **node);
    }
  }
  // Whatever the node left running (cache write-backs, timers) finishes before the next input.
  h.loop->run_until([&] { return h.loop->in_flight() == 0; });
  return 0;
}
