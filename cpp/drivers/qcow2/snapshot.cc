// qcow2 internal snapshots: create, delete and revert (the "Snapshots" section of qcow2.txt).
//
// Each operation is ordered so that a crash at any point leaves at worst leaked clusters:
//   create: flush; copy the active L1 to new clusters; add one reference to every L2 table and
//           data cluster it reaches; clear COPIED in the active tables; flush (increments durable);
//           write the new snapshot table; flush; switch header count + offset in one write; sync;
//           only then release the old snapshot table.
//   delete: flush; write the shorter table; switch the header; sync; only then drop the
//           references of the snapshot's L1 (and the L1 itself, the old table); recompute COPIED.
//   revert: flush; add a reference to everything the snapshot reaches; flush; overwrite the active
//           L1 with the snapshot's; sync; drop the references of the old active tree; recompute
//           COPIED.
#include <cstdlib>
#include <ctime>

#include "drivers/qcow2/qcow2_node.h"

namespace blockd::drivers::qcow2 {

namespace {

class ExclusiveLock {
 public:
  explicit ExclusiveLock(AsyncRwLock& lock) : lock_(lock) {}
  ~ExclusiveLock() { lock_.unlock(); }

 private:
  AsyncRwLock& lock_;
};

}  // namespace

Task<int> Qcow2Node::read_l1(uint64_t offset, uint32_t entries, std::vector<uint64_t>& out) noexcept {
  std::vector<uint8_t> raw(uint64_t{entries} * 8);
  out.assign(entries, 0);
  if (entries == 0) co_return 0;
  if (int r = co_await file_read(offset, raw.data(), raw.size()); r < 0) co_return r;
  for (uint32_t i = 0; i < entries; ++i) out[i] = load_be64(&raw[i * 8]);
  co_return 0;
}

Task<int> Qcow2Node::adjust_tree_refcounts(const std::vector<uint64_t>& l1, int64_t delta) noexcept {
  for (uint64_t l1_entry : l1) {
    if (!check_l1_entry(l1_entry, cluster_bits_, host_end_).empty()) co_return -EIO;
    const uint64_t l2_offset = l1_entry & kOffsetMask;
    if (l2_offset == 0) continue;
    TablePtr table;
    if (int r = co_await load_table(l2_cache_, l2_offset, table); r < 0) co_return r;
    std::vector<CompressedExtent> extents;
    if (int r = data_extents(*table, extents); r < 0) co_return r;
    for (const CompressedExtent& extent : extents) {
      if (int r = co_await update_refcount(extent.host_offset, extent.length, delta); r < 0) {
        co_return r;
      }
    }
    if (int r = co_await update_refcount(l2_offset, cluster_size(), delta); r < 0) co_return r;
    if (delta < 0) {
      // Passing freed clusters down to the file follows pass-discard-snapshot.
      uint64_t value;
      if (discard_passthrough_[static_cast<int>(DiscardKind::kSnapshot)] &&
          co_await get_refcount(l2_offset >> cluster_bits_, value) == 0 && value == 0) {
        l2_cache_.erase(l2_offset);
        (void)co_await file().discard(l2_offset, cluster_size());
      }
    }
  }
  co_return 0;
}

Task<int> Qcow2Node::recompute_copied() noexcept {
  for (size_t i = 0; i < l1_.size(); ++i) {
    const uint64_t l2_offset = l1_[i] & kOffsetMask;
    if (l2_offset == 0) continue;
    uint64_t refcount;
    if (int r = co_await get_refcount(l2_offset >> cluster_bits_, refcount); r < 0) co_return r;
    const uint64_t wanted = refcount == 1 ? (l1_[i] | kEntryCopied) : (l1_[i] & ~kEntryCopied);
    if (wanted != l1_[i]) {
      l1_[i] = wanted;
      l1_dirty_ = true;
    }
    TablePtr table;
    if (int r = co_await load_table(l2_cache_, l2_offset, table); r < 0) co_return r;
    for (uint64_t j = 0; j < l2_entries_; ++j) {
      const uint64_t entry = table->entry(j);
      const ClusterKind kind = classify_l2_entry(entry, header_.version);
      if (kind != ClusterKind::kNormal && kind != ClusterKind::kZeroAllocated) continue;
      uint64_t data_refcount;
      if (int r = co_await get_refcount((entry & kOffsetMask) >> cluster_bits_, data_refcount);
          r < 0) {
        co_return r;
      }
      const uint64_t fixed = data_refcount == 1 ? (entry | kEntryCopied) : (entry & ~kEntryCopied);
      if (fixed != entry) table->set_entry(j, fixed);
    }
  }
  co_return 0;
}

Task<int> Qcow2Node::write_metadata_together() noexcept {
  // Refcount changes of clusters the active tables reach and the COPIED flags that describe them
  // cannot change atomically; either order is safe here (a flag stale in either direction only
  // costs a copy, and an image whose header does not yet reference a new snapshot has leaks at
  // worst), so both go out in one burst of writes, keeping the window in which `qemu-img check`
  // would see a flag mismatch as short as possible, and are then synced together.
  if (int r = co_await write_dirty(refblock_cache_); r < 0) co_return r;
  if (int r = co_await write_dirty(l2_cache_); r < 0) co_return r;
  if (l1_dirty_) {
    if (int r = co_await write_l1(); r < 0) co_return r;
  }
  co_return co_await file_sync();
}

Task<int> Qcow2Node::write_snapshot_table(std::vector<SnapshotEntry> entries) noexcept {
  // The new table goes to new clusters; the header switches to it in one write.
  const std::vector<uint8_t> bytes = encode_snapshot_table(entries);
  uint64_t new_offset = 0;
  if (!bytes.empty()) {
    const uint64_t clusters = (bytes.size() + cluster_size() - 1) >> cluster_bits_;
    const int64_t allocated = co_await allocate_clusters(clusters);
    if (allocated < 0) co_return static_cast<int>(allocated);
    new_offset = static_cast<uint64_t>(allocated);
    std::vector<uint8_t> padded(clusters << cluster_bits_, 0);
    std::copy(bytes.begin(), bytes.end(), padded.begin());
    if (int r = co_await file_write(new_offset, padded.data(), padded.size()); r < 0) co_return r;
  }
  // Refcounts of the new table (and anything else pending) before the header points at it.
  if (int r = co_await flush_metadata(); r < 0) co_return r;
  if (int r = co_await file_sync(); r < 0) co_return r;
  const uint64_t old_offset = header_.snapshots_offset;
  const uint64_t old_size = snapshot_table_size(snapshots_);
  const Header saved = header_;
  header_.nb_snapshots = static_cast<uint32_t>(entries.size());
  header_.snapshots_offset = new_offset;
  if (int r = co_await write_header(); r < 0) {
    header_ = saved;
    co_return r;
  }
  if (int r = co_await file_sync(); r < 0) co_return r;
  snapshots_ = std::move(entries);
  if (old_offset != 0 && old_size > 0) {
    if (int r = co_await update_refcount(old_offset, old_size, -1); r < 0) co_return r;
  }
  co_return 0;
}

Task<int> Qcow2Node::create_snapshot(std::string name) noexcept {
  if (read_only()) co_return -EROFS;
  co_await lock_.lock();
  ExclusiveLock guard(lock_);
  uint64_t next_id = 0;
  for (const SnapshotEntry& s : snapshots_) {
    if (s.name == name) co_return -EEXIST;
    next_id = std::max<uint64_t>(next_id, std::strtoull(s.id.c_str(), nullptr, 10));
  }
  if (snapshots_.size() >= kMaxSnapshots) co_return -EFBIG;
  if (int r = co_await flush_metadata(); r < 0) co_return r;

  // 1. The copy of the active L1 (COPIED is meaningless there: stripped).
  const uint64_t l1_bytes = l1_.size() * 8;
  uint64_t l1_copy = 0;
  if (l1_bytes > 0) {
    const int64_t allocated =
        co_await allocate_clusters((l1_bytes + cluster_size() - 1) >> cluster_bits_);
    if (allocated < 0) co_return static_cast<int>(allocated);
    l1_copy = static_cast<uint64_t>(allocated);
    std::vector<uint8_t> raw(((l1_bytes + cluster_size() - 1) >> cluster_bits_) << cluster_bits_, 0);
    for (size_t i = 0; i < l1_.size(); ++i) store_be64(&raw[i * 8], l1_[i] & ~kEntryCopied);
    if (int r = co_await file_write(l1_copy, raw.data(), raw.size()); r < 0) co_return r;
  }
  // 2. One more reference to everything the active L1 reaches. On overflow (1-bit refcounts),
  //    undo what was added: none of it is referenced yet.
  if (int r = co_await adjust_tree_refcounts(l1_, +1); r < 0) {
    // Everything was flushed before step 1, so the caches hold only this operation's changes:
    // dropping them returns to the state on disk (the L1 copy's cluster is free again).
    refblock_cache_.clear();
    l2_cache_.clear();
    free_hint_ = 0;
    co_return r;
  }
  // 3. Everything is shared now: no active entry is COPIED. The cleared flags and the
  //    increments reach the file back to back (see write_metadata_together).
  if (int r = co_await recompute_copied(); r < 0) co_return r;
  if (int r = co_await write_metadata_together(); r < 0) co_return r;
  // 4. The snapshot table with the new entry, then the header.
  SnapshotEntry entry;
  entry.l1_table_offset = l1_copy;
  entry.l1_size = static_cast<uint32_t>(l1_.size());
  entry.id = std::to_string(next_id + 1);
  entry.name = std::move(name);
  timespec now{};
  clock_gettime(CLOCK_REALTIME, &now);
  // As qemu-storage-daemon: microsecond precision, and a "VM clock" that is the host's clock.
  entry.date_sec = static_cast<uint32_t>(now.tv_sec);
  entry.date_nsec = static_cast<uint32_t>(now.tv_nsec / 1000 * 1000);
  entry.vm_clock_nsec = static_cast<uint64_t>(now.tv_sec) * 1000000000 + entry.date_nsec;
  entry.disk_size = header_.size;
  std::vector<SnapshotEntry> entries = snapshots_;
  entries.push_back(std::move(entry));
  if (int r = co_await write_snapshot_table(std::move(entries)); r < 0) co_return r;
  if (int r = co_await flush_metadata(); r < 0) co_return r;
  l2_cache_.trim();
  refblock_cache_.trim();
  co_return co_await file_sync();
}

Task<int> Qcow2Node::delete_snapshot(size_t index) noexcept {
  if (read_only()) co_return -EROFS;
  co_await lock_.lock();
  ExclusiveLock guard(lock_);
  if (index >= snapshots_.size()) co_return -ENOENT;
  if (int r = co_await flush_metadata(); r < 0) co_return r;
  const SnapshotEntry doomed = snapshots_[index];
  std::vector<uint64_t> l1;
  if (int r = co_await read_l1(doomed.l1_table_offset, doomed.l1_size, l1); r < 0) co_return r;
  std::vector<SnapshotEntry> entries = snapshots_;
  entries.erase(entries.begin() + static_cast<ptrdiff_t>(index));
  if (int r = co_await write_snapshot_table(std::move(entries)); r < 0) co_return r;
  // Nothing references the snapshot's tree any more.
  if (int r = co_await adjust_tree_refcounts(l1, -1); r < 0) co_return r;
  if (int r = co_await update_refcount(doomed.l1_table_offset, l1.size() * 8, -1); r < 0) {
    co_return r;
  }
  if (int r = co_await recompute_copied(); r < 0) co_return r;
  if (int r = co_await write_metadata_together(); r < 0) co_return r;
  l2_cache_.trim();
  refblock_cache_.trim();
  co_return co_await file_sync();
}

Task<int> Qcow2Node::revert_snapshot(size_t index) noexcept {
  if (read_only()) co_return -EROFS;
  co_await lock_.lock();
  ExclusiveLock guard(lock_);
  if (index >= snapshots_.size()) co_return -ENOENT;
  const SnapshotEntry& target = snapshots_[index];
  if (target.disk_size != header_.size || target.l1_size > l1_.size()) co_return -ENOTSUP;
  if (int r = co_await flush_metadata(); r < 0) co_return r;
  std::vector<uint64_t> l1;
  if (int r = co_await read_l1(target.l1_table_offset, target.l1_size, l1); r < 0) co_return r;
  l1.resize(l1_.size(), 0);
  // 1. References for the snapshot's tree, durable before the active L1 points at it.
  if (int r = co_await adjust_tree_refcounts(l1, +1); r < 0) co_return r;
  if (int r = co_await flush_metadata(); r < 0) co_return r;
  // 2. Overwrite the active L1 (no entry is COPIED: everything it reaches is shared now).
  const std::vector<uint64_t> old = l1_;
  for (uint64_t& e : l1) e &= ~kEntryCopied;
  l1_ = l1;
  if (int r = co_await write_l1(); r < 0) co_return r;
  if (int r = co_await file_sync(); r < 0) co_return r;
  active_l2_.clear();
  for (uint64_t e : l1_) {
    if (uint64_t l2 = e & kOffsetMask) active_l2_.insert(l2);
  }
  // 3. The old active tree loses its references; then COPIED where refcounts dropped to one.
  if (int r = co_await adjust_tree_refcounts(old, -1); r < 0) co_return r;
  if (int r = co_await recompute_copied(); r < 0) co_return r;
  if (int r = co_await write_metadata_together(); r < 0) co_return r;
  l2_cache_.trim();
  refblock_cache_.trim();
  co_return co_await file_sync();
}

}  // namespace blockd::drivers::qcow2
