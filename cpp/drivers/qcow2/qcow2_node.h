// Private to the qcow2 driver: the node class, its metadata cache and its lock.
//
// Concurrency: all I/O of a node runs on its loop, as coroutines. Requests that only read the
// mapping (reads, and writes into clusters the image already owns exclusively, COPIED) hold the
// lock shared; anything that changes metadata (discard, write-zeroes, flush, snapshots) holds it
// exclusively for its whole duration, so a reader never sees a half-made change. A range mapped
// onto the image file (map_file) holds it shared until it is released, since the kernel reads or
// writes those clusters meanwhile.
//
// Allocating writes (and copy-on-write) hold the lock exclusively only to plan: they allocate
// host clusters (refcount 1, in the cache), mark the guest clusters as "allocating" and pin their
// L2 table. The data then goes to the new clusters with no lock held, so many allocations proceed
// at once; at the end the L2 entries are switched in one step that does not suspend, which needs
// no lock either. Whoever else changes the entry of a guest cluster first waits until it is no
// longer allocating (one allocation per guest cluster at a time); snapshot operations wait until
// no allocation is in flight. A reader meanwhile sees the old mapping, which is still valid.
//
// Metadata ordering (every metadata write goes through flush_metadata()):
//   1. dirty refcount blocks, then fsync: increments are durable first;
//   2. dirty L2 tables, fsync; then the L1 table if it changed, fsync: a new reference appears
//      only once what it points to and its refcount are on disk;
//   3. deferred decrements (clusters whose last reference was dropped) are applied only now,
//      after the tables that dropped the reference are durable.
// Tables are written from a copy taken when their dirty flag is cleared, and only the decrements
// deferred before a round's tables were copied are applied after it, so an allocating write that
// finishes during a flush only leaves work for the next one. Allocations themselves cannot happen
// during a flush (it holds the lock exclusively): every reference in a table written by a flush
// points at a cluster whose increment the same flush wrote first.
// A crash at any point therefore leaves refcounts >= references: at worst leaked clusters.
#pragma once

#include <deque>
#include <memory>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "drivers/qcow2/format.h"
#include "drivers/qcow2/qcow2.h"
#include "runtime/event.h"
#include "runtime/task.h"

namespace blockd::drivers::qcow2 {

// A coroutine reader/writer lock with writer preference. Loop thread only.
class AsyncRwLock {
 public:
  Task<void> lock_shared() noexcept;
  // Takes the lock shared if that needs no waiting (the common case, without a coroutine).
  bool try_lock_shared() noexcept {
    if (writer_ || waiting_writers_ > 0) return false;
    ++readers_;
    return true;
  }
  void unlock_shared() noexcept;
  Task<void> lock() noexcept;
  void unlock() noexcept;

 private:
  int readers_ = 0;
  bool writer_ = false;
  int waiting_writers_ = 0;
  Event changed_;
};

// An RAII holder for the node lock inside a coroutine frame: it calls `Unlock` on the lock when it
// goes out of scope, unless release() did so first. The lock must already be held.
template <void (AsyncRwLock::*Unlock)() noexcept>
class LockGuard {
 public:
  explicit LockGuard(AsyncRwLock& lock) : lock_(&lock) {}
  ~LockGuard() { release(); }
  LockGuard(const LockGuard&) = delete;
  LockGuard& operator=(const LockGuard&) = delete;
  void release() {
    if (lock_) (lock_->*Unlock)();
    lock_ = nullptr;
  }

 private:
  AsyncRwLock* lock_;
};
using SharedGuard = LockGuard<&AsyncRwLock::unlock_shared>;
using ExclusiveGuard = LockGuard<&AsyncRwLock::unlock>;

inline uint64_t div_round_up(uint64_t value, uint64_t divisor) {
  return (value + divisor - 1) / divisor;
}

// One cached metadata cluster (an L2 table or a refcount block), in its on-disk (big-endian) form.
struct Table {
  uint64_t offset = 0;
  std::vector<uint8_t> data;
  bool dirty = false;
  uint64_t last_use = 0;
  int pins = 0;  // allocations in flight that will change it: not evicted while > 0

  uint64_t entry(uint64_t index) const noexcept { return load_be64(&data[index * 8]); }
  void set_entry(uint64_t index, uint64_t value) noexcept {
    store_be64(&data[index * 8], value);
    dirty = true;
  }
};
using TablePtr = std::shared_ptr<Table>;

// An LRU cache of metadata clusters keyed by host offset. Entries are shared_ptrs so that a
// coroutine holding one across an await is never left with a dangling table; only clean entries
// are evicted (dirty ones leave through flush_metadata).
class MetadataCache {
 public:
  explicit MetadataCache(size_t capacity = 16) : capacity_(capacity) {}
  void set_capacity(size_t capacity) noexcept { capacity_ = capacity < 2 ? 2 : capacity; }
  size_t capacity() const noexcept { return capacity_; }
  TablePtr find(uint64_t offset) noexcept;
  // The same without taking a reference: valid only until the caller next suspends.
  Table* peek(uint64_t offset) noexcept;
  void insert(const TablePtr& table);
  void erase(uint64_t offset) noexcept { entries_.erase(offset); }
  std::vector<TablePtr> dirty_tables() const;
  bool has_dirty() const noexcept;
  bool over_capacity() const noexcept { return entries_.size() > capacity_; }
  // Evicts least recently used clean entries until within capacity.
  void trim();
  void clear() noexcept { entries_.clear(); }

 private:
  size_t capacity_;
  uint64_t clock_ = 0;
  std::unordered_map<uint64_t, TablePtr> entries_;
};

// Why a cluster's reference is dropped (selects the pass-discard-* option).
enum class DiscardKind { kRequest, kSnapshot, kOther };

class Qcow2Node final : public block::Node, public Qcow2Snapshots {
 public:
  Qcow2Node(block::NodeOptions common, const Qcow2Options& options);

  // Reads and checks the header and tables (on the node's loop).
  Task<Status> load() noexcept;
  // Attaches the backing node chosen by the options or the header (main loop, after load()).
  Status attach_backing(const Qcow2Options& options, const OpenBackingFile& open_backing);

  // ---- block::Node
  std::string_view driver_name() const noexcept override { return "qcow2"; }
  std::string filename() const override;
  nlohmann::json open_options() const override;
  int64_t allocated_size() const override { return file().allocated_size(); }
  uint32_t request_alignment() const noexcept override { return 1; }
  bool supports_discard() const noexcept override { return true; }
  bool supports_write_zeroes() const noexcept override { return true; }

  Task<int64_t> read(uint64_t offset, uint64_t length, void* buffer,
                     uint32_t flags) noexcept override;
  Task<int64_t> write(uint64_t offset, uint64_t length, const void* buffer,
                      uint32_t flags) noexcept override;
  Task<int64_t> flush() noexcept override;
  Task<int64_t> discard(uint64_t offset, uint64_t length) noexcept override;
  Task<int64_t> write_zeroes(uint64_t offset, uint64_t length, uint32_t flags) noexcept override;
  Task<block::BlockStatus> block_status(uint64_t offset, uint64_t length) noexcept override;
  // One run of normal clusters stored contiguously, whose L2 entries are cached; for writing,
  // only clusters this image owns exclusively (COPIED). Holds the lock shared until
  // release_file (see qcow2.cc for why that makes it safe).
  block::FileRange map_file(uint64_t offset, uint64_t length,
                            block::MapAccess access) noexcept override;
  void release_file(const block::FileRange& range, block::MapAccess access) noexcept override;

  // ---- Qcow2Snapshots (snapshot.cc)
  std::vector<SnapshotEntry> snapshots() const override { return snapshots_; }
  Task<int> create_snapshot(std::string name) noexcept override;
  Task<int> delete_snapshot(size_t index) noexcept override;
  Task<int> revert_snapshot(size_t index) noexcept override;
  const Header& header() const override { return header_; }
  std::string read_only_reason() const override { return read_only_reason_; }

  block::Node* backing() const noexcept { return backing_ ? backing_->node() : nullptr; }

 protected:
  void child_permissions(const block::Child& child, uint32_t permissions, uint32_t shared,
                         uint32_t& child_permissions, uint32_t& child_shared) const override;

 private:
  friend class SnapshotOps;
  struct DeferredFree {
    uint64_t offset;
    uint64_t length;
    DiscardKind kind;
  };
  block::Node& file() const noexcept { return *file_child()->node(); }
  uint64_t cluster_size() const noexcept { return uint64_t{1} << cluster_bits_; }
  uint64_t offset_in_cluster(uint64_t offset) const noexcept { return offset & (cluster_size() - 1); }

  // ---- Plain I/O on the file child (whole buffers; short reads past EOF become zeroes).
  Task<int> file_io(bool write, uint64_t offset, uint8_t* buffer, uint64_t length) noexcept;
  Task<int> file_read(uint64_t offset, void* buffer, uint64_t length) noexcept;
  Task<int> file_write(uint64_t offset, const void* buffer, uint64_t length) noexcept;
  Task<int> file_sync() noexcept;
  Task<int> write_header() noexcept;

  // Recounts every cluster's references and stores the counts (for an image left dirty by a
  // writer with lazy refcounts), recomputes COPIED and clears the dirty bit.
  Task<int> rebuild_refcounts() noexcept;
  // The host ranges the data entries of an L2 table occupy (-EIO for a corrupt entry).
  int data_extents(const Table& table, std::vector<CompressedExtent>& out) const;

  // ---- Tables.
  Task<int> load_table(MetadataCache& cache, uint64_t offset, TablePtr& out) noexcept;
  TablePtr new_table(MetadataCache& cache, uint64_t offset);
  // The L2 entry of guest cluster `guest_cluster` (0 when its L2 table is unallocated); checks
  // the entries it passes through, returning -EIO for corrupt ones.
  Task<int> lookup(uint64_t guest_cluster, uint64_t& entry) noexcept;
  // The same without suspending: 1 with `entry` set, 0 if the L2 table must be read first (then
  // call lookup), or -EIO.
  int lookup_cached(uint64_t guest_cluster, uint64_t& entry) noexcept;
  // The host offset of guest [offset, offset + length) if it is one contiguous run of normal
  // clusters whose entries are cached (and, for `write`, writable in place), else -1. Shared
  // lock held; never suspends.
  int64_t contiguous_host_run(uint64_t offset, uint64_t length, bool write) noexcept;
  // Whether guest_cluster can be written in place under the shared lock (its L2 table cached,
  // the table and the cluster owned exclusively: COPIED).
  bool writable_in_place(uint64_t guest_cluster) noexcept;
  // The L2 table for guest L1 index `l1_index`, allocated or copied so it can be written.
  Task<int> writable_l2(uint64_t l1_index, TablePtr& out) noexcept;
  // Reads the guest-visible content of one cluster described by `entry` into `buffer`.
  Task<int> read_cluster(uint64_t guest_cluster, uint64_t entry, uint8_t* buffer) noexcept;
  Task<int> read_compressed(uint64_t entry, uint8_t* cluster_buffer) noexcept;
  Task<int> read_backing(uint64_t offset, uint64_t length, uint8_t* buffer) noexcept;

  // ---- Refcounts.
  Task<int> refblock_for(uint64_t cluster_index, bool create, TablePtr& out) noexcept;
  Task<int> get_refcount(uint64_t cluster_index, uint64_t& value) noexcept;
  // Adds `delta` to the refcount of every cluster touched by [offset, offset + length).
  Task<int> update_refcount(uint64_t offset, uint64_t length, int64_t delta) noexcept;
  // Allocates `count` contiguous free clusters (refcount 1, in the cache); returns the host
  // offset or a negative errno. *fresh (if given) says whether the clusters lie beyond anything
  // the image file held or was written at since open, so that they read as zeroes.
  Task<int64_t> allocate_clusters(uint64_t count, bool* fresh = nullptr) noexcept;
  Task<int> create_refblock(uint64_t table_index) noexcept;
  Task<int> grow_refcount_table(uint64_t needed_index) noexcept;
  // Drops one reference to the clusters an L2 entry (or a table) occupies, once the metadata that
  // referenced them is durable.
  void defer_free(uint64_t offset, uint64_t length, DiscardKind kind);
  void defer_free_entry(uint64_t entry, DiscardKind kind);
  Task<int> apply_deferred_frees(std::vector<DeferredFree> frees) noexcept;

  // ---- Ordering.
  Task<int> write_dirty(MetadataCache& cache) noexcept;
  Task<int> write_l1() noexcept;
  Task<int> flush_metadata() noexcept;
  // Writes back and evicts what exceeds the cache sizes (exclusive lock held, at the end of an
  // operation: never while a table is held across an await).
  Task<int> trim_caches() noexcept;
  bool overlaps_metadata(uint64_t host_offset) const noexcept;

  // ---- Write paths.
  // Writes from `pos` (whose cluster cannot be written in place under the shared lock) up to
  // `end` at most, advancing pos and data over what it wrote: an in-place cluster, or one run of
  // consecutive clusters of one L2 table that get new host clusters. Takes the lock itself.
  Task<int> write_slow(uint64_t& pos, uint64_t end, const uint8_t*& data) noexcept;
  // The guest content that [offset, offset + length) of one cluster showed under `entry`.
  Task<int> read_old(uint64_t offset, uint64_t entry, uint8_t* buffer, uint64_t length) noexcept;
  // Whether that content is zeroes without reading it.
  bool reads_as_zero(uint64_t offset, uint64_t entry) const noexcept;
  // Writes `length` bytes of `data` at guest `offset` inside the cluster starting at
  // `cluster_start`, now under `entry`, into its new host cluster `host`, with the rest of the
  // cluster keeping what it showed (skipped when it reads as zeroes and `fresh` says the new
  // cluster reads as zeroes already).
  Task<int> write_partial_cluster(uint64_t cluster_start, uint64_t entry, uint64_t host,
                                  uint64_t offset, const uint8_t* data, uint64_t length,
                                  bool fresh) noexcept;
  // Waits (lock held exclusively) until no allocation of `guest_cluster`, or of any cluster, is
  // in flight.
  Task<void> wait_not_allocating(uint64_t guest_cluster) noexcept;
  Task<void> drain_allocations() noexcept;
  // Exclusive lock held:
  Task<int> zero_cluster(uint64_t guest_cluster, bool unmap) noexcept;
  Task<int> discard_cluster(uint64_t guest_cluster) noexcept;

  // ---- Snapshot helpers (snapshot.cc).
  Task<int> read_l1(uint64_t offset, uint32_t entries, std::vector<uint64_t>& out) noexcept;
  // COPIED recomputed in place from the refcounts (rebuilding a dirty image's refcounts).
  Task<int> recompute_copied() noexcept;

  Qcow2Options qcow2_options_;
  Header header_;
  uint32_t cluster_bits_ = 16;
  uint64_t l2_entries_ = 0;
  uint64_t refblock_entries_ = 0;
  uint64_t host_end_ = 0;     // end of the highest cluster in use or allocated
  uint64_t free_hint_ = 0;    // no free cluster below this index
  std::vector<uint64_t> l1_;  // active L1, host order
  bool l1_dirty_ = false;
  std::vector<uint64_t> refcount_table_;
  std::vector<SnapshotEntry> snapshots_;
  MetadataCache l2_cache_;
  MetadataCache refblock_cache_;
  std::unordered_set<uint64_t> active_l2_;  // host offsets of the active L2 tables
  std::unordered_set<uint64_t> refblocks_;  // host offsets of the refcount blocks
  std::vector<DeferredFree> deferred_frees_;
  std::vector<uint8_t> cow_buffer_;  // one cluster, used under the exclusive lock
  static constexpr size_t kSpareClusters = 32;
  std::vector<std::unique_ptr<uint8_t[]>> spare_clusters_;  // cluster-sized copy-on-write buffers
  std::unordered_set<uint64_t> allocating_;  // guest clusters with an allocation in flight
  uint64_t allocations_in_flight_ = 0;
  Event allocation_done_;
  AsyncRwLock lock_;
  block::Child* backing_ = nullptr;
  std::string read_only_reason_;
  std::string backing_filename_;  // as the image names it
  bool discard_passthrough_[3] = {false, true, false};
};

}  // namespace blockd::drivers::qcow2
