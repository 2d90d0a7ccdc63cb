// qcow2 internal snapshots: create, delete and revert (the "Snapshots" section of qcow2.txt).
//
// Crash safety. A snapshot operation changes refcounts and the COPIED flags of the active tables
// together, and they live in different clusters: written in place, a crash between the two writes
// leaves flags that disagree with refcounts, which `qemu-img check` counts as corruption. So these
// operations never write metadata in place. Each one (SnapshotOps) builds the image's next
// metadata beside the current one, in clusters the current metadata does not use:
//   - a new active L1 table, with copies of those active L2 tables whose COPIED flags change;
//   - the new snapshot table (and, on create, the snapshot's copy of the L1 table);
//   - a complete new refcount table and refcount blocks holding the final counts (the old
//     structures are counted as free in them);
// syncs them, and then switches to them with one header write (L1 offset, refcount table, snapshot
// count and offset all lie in the header's first sector), synced again. A crash before the switch
// leaves the old image intact, the new clusters unreferenced and counted free; after it, the new
// image is complete. Neither state has leaks or corruption.
#include <cstdlib>
#include <ctime>

#include "drivers/qcow2/qcow2_node.h"

namespace blockd::drivers::qcow2 {

// The next version of a node's metadata, built in memory and in unused clusters, then switched
// to at once (see the top of this file). Exclusive lock held, caches flushed, for its lifetime.
class SnapshotOps {
 public:
  explicit SnapshotOps(Qcow2Node& node) : n_(node) {}

  // Reads every cluster's current refcount.
  Task<int> load_counts() noexcept;
  // Adds `delta` to the final count of every cluster in [offset, offset + length).
  int add(uint64_t offset, uint64_t length, int64_t delta) noexcept;
  // Adds `delta` for each L2 table an L1 table reaches and each data cluster those reach.
  Task<int> add_tree(const std::vector<uint64_t>& l1, int64_t delta) noexcept;
  // Stores `bytes` in new clusters (free in the current metadata) and returns their offset.
  uint64_t stage(std::vector<uint8_t> bytes);
  // Makes `active` (L1 entries; COPIED is recomputed) and `snapshots` the image's metadata.
  // `new_table` says whether the snapshot table changed.
  Task<int> commit(std::vector<uint64_t> active, std::vector<SnapshotEntry> snapshots,
                   bool new_table) noexcept;

 private:
  int64_t final_count(uint64_t cluster) const noexcept {
    return static_cast<int64_t>(counts_[cluster]) + delta_[cluster];
  }
  void grow(uint64_t clusters);
  // Takes `count` contiguous clusters the current metadata does not use (final count 1).
  uint64_t take(uint64_t count);
  void give_back(uint64_t offset, uint64_t count);
  // One past the highest cluster the new metadata uses.
  uint64_t used_end() const noexcept;
  // Sizes and places the new refcount blocks and table.
  int place_refcount_structures(std::vector<uint64_t>& blocks, uint64_t& table_offset,
                                uint64_t& table_clusters);

  Qcow2Node& n_;
  std::vector<uint64_t> counts_;  // current refcount per cluster
  std::vector<int64_t> delta_;    // change this operation makes
  std::vector<bool> taken_;       // staged in this operation
  uint64_t cursor_ = 1;           // no free cluster below this one
  std::vector<std::pair<uint64_t, std::vector<uint8_t>>> writes_;
};

void SnapshotOps::grow(uint64_t clusters) {
  if (clusters <= counts_.size()) return;
  counts_.resize(clusters, 0);
  delta_.resize(clusters, 0);
  taken_.resize(clusters, false);
}

Task<int> SnapshotOps::load_counts() noexcept {
  const uint64_t clusters = n_.host_end_ >> n_.cluster_bits_;
  grow(clusters);
  for (uint64_t first = 0; first < clusters; first += n_.refblock_entries_) {
    TablePtr block;
    if (int r = co_await n_.refblock_for(first, false, block); r < 0) co_return r;
    if (!block) continue;
    const uint64_t end = std::min(clusters, first + n_.refblock_entries_);
    for (uint64_t c = first; c < end; ++c) {
      counts_[c] = get_refcount(block->data.data(), c - first, n_.header_.refcount_order);
    }
    n_.refblock_cache_.trim();
  }
  co_return 0;
}

int SnapshotOps::add(uint64_t offset, uint64_t length, int64_t delta) noexcept {
  if (length == 0) return 0;
  const uint64_t first = offset >> n_.cluster_bits_;
  const uint64_t last = (offset + length - 1) >> n_.cluster_bits_;
  if (last >= counts_.size()) return -EIO;  // metadata pointing past the image's end
  for (uint64_t c = first; c <= last; ++c) delta_[c] += delta;
  return 0;
}

Task<int> SnapshotOps::add_tree(const std::vector<uint64_t>& l1, int64_t delta) noexcept {
  std::vector<CompressedExtent> extents;
  for (uint64_t l1_entry : l1) {
    if (!check_l1_entry(l1_entry, n_.cluster_bits_, n_.host_end_).empty()) co_return -EIO;
    const uint64_t l2_offset = l1_entry & kOffsetMask;
    if (l2_offset == 0) continue;
    if (int r = add(l2_offset, n_.cluster_size(), delta); r < 0) co_return r;
    TablePtr table;
    if (int r = co_await n_.load_table(n_.l2_cache_, l2_offset, table); r < 0) co_return r;
    if (int r = n_.data_extents(*table, extents); r < 0) co_return r;
    for (const CompressedExtent& extent : extents) {
      if (int r = add(extent.host_offset, extent.length, delta); r < 0) co_return r;
    }
    n_.l2_cache_.trim();
  }
  co_return 0;
}

uint64_t SnapshotOps::take(uint64_t count) {
  uint64_t start = cursor_;
  uint64_t c = cursor_;
  while (c - start < count) {
    grow(c + 1);
    if (counts_[c] != 0 || taken_[c]) start = c + 1;
    ++c;
  }
  for (uint64_t i = start; i < start + count; ++i) {
    taken_[i] = true;
    delta_[i] += 1;
  }
  if (start == cursor_) cursor_ = start + count;
  return start << n_.cluster_bits_;
}

void SnapshotOps::give_back(uint64_t offset, uint64_t count) {
  const uint64_t first = offset >> n_.cluster_bits_;
  for (uint64_t i = first; i < first + count; ++i) {
    taken_[i] = false;
    delta_[i] -= 1;
  }
  cursor_ = std::min(cursor_, first);
}

uint64_t SnapshotOps::stage(std::vector<uint8_t> bytes) {
  const uint64_t clusters = std::max<uint64_t>(1, div_round_up(bytes.size(), n_.cluster_size()));
  bytes.resize(clusters << n_.cluster_bits_, 0);
  const uint64_t offset = take(clusters);
  writes_.emplace_back(offset, std::move(bytes));
  return offset;
}

uint64_t SnapshotOps::used_end() const noexcept {
  for (uint64_t c = counts_.size(); c > 0; --c) {
    if (taken_[c - 1] || final_count(c - 1) != 0) return c;
  }
  return 0;
}

int SnapshotOps::place_refcount_structures(std::vector<uint64_t>& blocks, uint64_t& table_offset,
                                           uint64_t& table_clusters) {
  const uint64_t per_block = n_.refblock_entries_;
  const uint64_t min_entries = n_.refcount_table_.size();
  table_clusters = 0;
  // Placing blocks and the table can extend what must be covered: repeat until it does not.
  for (int round = 0; round < 64; ++round) {
    const uint64_t nblocks = (used_end() + per_block - 1) / per_block;
    const uint64_t want_table = div_round_up(std::max(nblocks, min_entries) * 8, n_.cluster_size());
    if (nblocks <= blocks.size() && want_table <= table_clusters) return 0;
    if ((want_table << n_.cluster_bits_) > kMaxRefcountTableBytes) return -EFBIG;
    while (blocks.size() < nblocks) blocks.push_back(take(1));
    if (want_table > table_clusters) {
      if (table_clusters > 0) give_back(table_offset, table_clusters);
      // Some room to grow, so that the next allocations rarely need a new table.
      table_clusters = std::min(want_table + 1, kMaxRefcountTableBytes >> n_.cluster_bits_);
      table_offset = take(table_clusters);
    }
  }
  return -EIO;
}

Task<int> SnapshotOps::commit(std::vector<uint64_t> active, std::vector<SnapshotEntry> snapshots,
                              bool new_table) noexcept {
  const uint64_t cs = n_.cluster_size();
  const uint32_t order = n_.header_.refcount_order;
  // 1. Active L2 tables: COPIED follows the final data refcounts; a table whose flags change is
  //    copied (its old cluster loses the active L1's reference, the data keeps its count).
  for (uint64_t& l1_entry : active) {
    // The active L1 was read at open without checks: an entry past the image's end would index
    // past the counts below.
    if (!check_l1_entry(l1_entry, n_.cluster_bits_, n_.host_end_).empty()) co_return -EIO;
    const uint64_t l2_offset = l1_entry & kOffsetMask;
    if (l2_offset == 0) {
      l1_entry = 0;
      continue;
    }
    TablePtr table;
    if (int r = co_await n_.load_table(n_.l2_cache_, l2_offset, table); r < 0) co_return r;
    std::vector<uint8_t> copy;
    for (uint64_t j = 0; j < n_.l2_entries_; ++j) {
      const uint64_t entry = table->entry(j);
      const ClusterKind kind = classify_l2_entry(entry, n_.header_.version);
      if (kind != ClusterKind::kNormal && kind != ClusterKind::kZeroAllocated) continue;
      const uint64_t data = (entry & kOffsetMask) >> n_.cluster_bits_;
      if (data >= counts_.size()) co_return -EIO;
      const uint64_t wanted =
          final_count(data) == 1 ? (entry | kEntryCopied) : (entry & ~kEntryCopied);
      if (wanted == entry) continue;
      if (copy.empty()) copy = table->data;
      store_be64(&copy[j * 8], wanted);
    }
    n_.l2_cache_.trim();
    if (copy.empty()) continue;
    if (int r = add(l2_offset, cs, -1); r < 0) co_return r;
    l1_entry = stage(std::move(copy));
  }
  // 2. The active L1 itself, always new; its COPIED flags follow the final L2 refcounts.
  for (uint64_t& l1_entry : active) {
    if (l1_entry == 0) continue;
    const uint64_t l2 = (l1_entry & kOffsetMask) >> n_.cluster_bits_;
    l1_entry = final_count(l2) == 1 ? (l1_entry | kEntryCopied) : (l1_entry & ~kEntryCopied);
  }
  if (int r = add(n_.header_.l1_table_offset, n_.l1_.size() * 8, -1); r < 0) co_return r;
  const uint64_t l1_offset = active.empty() ? 0 : stage(encode_be64_table(active));
  // 3. The snapshot table.
  uint64_t snapshots_offset = n_.header_.snapshots_offset;
  if (new_table) {
    if (int r = add(snapshots_offset, snapshot_table_size(n_.snapshots_), -1); r < 0) co_return r;
    snapshots_offset = snapshots.empty() ? 0 : stage(encode_snapshot_table(snapshots));
  }
  // 4. Refcount structures: the old ones are free in the new counts, the new ones count.
  const uint64_t old_table_bytes = uint64_t{n_.header_.refcount_table_clusters} << n_.cluster_bits_;
  if (int r = add(n_.header_.refcount_table_offset, old_table_bytes, -1); r < 0) co_return r;
  for (uint64_t block : n_.refblocks_) {
    if (int r = add(block, cs, -1); r < 0) co_return r;
  }
  std::vector<uint64_t> blocks;
  uint64_t table_offset = 0;
  uint64_t table_clusters = 0;
  if (int r = place_refcount_structures(blocks, table_offset, table_clusters); r < 0) co_return r;
  // 5. Every final count must be representable; nothing has been written yet.
  for (uint64_t c = 0; c < counts_.size(); ++c) {
    const int64_t value = final_count(c);
    if (value < 0) co_return -EIO;
    if (static_cast<uint64_t>(value) > max_refcount(order)) co_return -EFBIG;
  }
  std::vector<uint64_t> table(table_clusters * cs / 8, 0);
  for (uint64_t b = 0; b < blocks.size(); ++b) {
    std::vector<uint8_t> data(cs, 0);
    const uint64_t first = b * n_.refblock_entries_;
    const uint64_t end = std::min<uint64_t>(counts_.size(), first + n_.refblock_entries_);
    for (uint64_t c = first; c < end; ++c) {
      set_refcount(data.data(), c - first, order, static_cast<uint64_t>(final_count(c)));
    }
    writes_.emplace_back(blocks[b], std::move(data));
    table[b] = blocks[b];
  }
  writes_.emplace_back(table_offset, encode_be64_table(table));
  // 6. Everything new is durable before the header refers to it.
  for (const auto& [offset, bytes] : writes_) {
    if (int r = co_await n_.file_write(offset, bytes.data(), bytes.size()); r < 0) co_return r;
  }
  if (int r = co_await n_.file_sync(); r < 0) co_return r;
  Header next = n_.header_;
  next.l1_table_offset = l1_offset;
  next.l1_size = static_cast<uint32_t>(active.size());
  next.refcount_table_offset = table_offset;
  next.refcount_table_clusters = static_cast<uint32_t>(table_clusters);
  next.nb_snapshots = static_cast<uint32_t>(snapshots.size());
  next.snapshots_offset = snapshots_offset;
  auto header = next.encode();
  if (!header) co_return -EINVAL;
  if (int r = co_await n_.file_write(0, header->data(), header->size()); r < 0) co_return r;
  if (int r = co_await n_.file_sync(); r < 0) co_return r;
  // 7. The node follows the image.
  n_.header_ = std::move(next);
  n_.l1_ = std::move(active);
  n_.l1_dirty_ = false;
  n_.refcount_table_ = std::move(table);
  n_.refblocks_ = {blocks.begin(), blocks.end()};
  n_.snapshots_ = std::move(snapshots);
  n_.refblock_cache_.clear();
  n_.l2_cache_.clear();
  n_.active_l2_.clear();
  for (uint64_t e : n_.l1_) {
    if (uint64_t l2 = e & kOffsetMask) n_.active_l2_.insert(l2);
  }
  n_.host_end_ = std::max(n_.host_end_, counts_.size() << n_.cluster_bits_);
  n_.free_hint_ = 0;
  // Clusters this operation freed go back to the file system (pass-discard-snapshot).
  if (n_.discard_passthrough_[static_cast<int>(DiscardKind::kSnapshot)]) {
    for (uint64_t c = 0; c < counts_.size(); ++c) {
      if (counts_[c] == 0 || final_count(c) != 0) continue;
      uint64_t end = c + 1;
      while (end < counts_.size() && counts_[end] != 0 && final_count(end) == 0) ++end;
      (void)co_await n_.file().discard(c << n_.cluster_bits_, (end - c) << n_.cluster_bits_);
      c = end;
    }
  }
  co_return 0;
}

Task<int> Qcow2Node::read_l1(uint64_t offset, uint32_t entries, std::vector<uint64_t>& out) noexcept {
  std::vector<uint8_t> raw(uint64_t{entries} * 8);
  out.assign(entries, 0);
  if (entries == 0) co_return 0;
  if (int r = co_await file_read(offset, raw.data(), raw.size()); r < 0) co_return r;
  for (uint32_t i = 0; i < entries; ++i) out[i] = load_be64(&raw[i * 8]);
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

Task<int> Qcow2Node::create_snapshot(std::string name) noexcept {
  if (read_only()) co_return -EROFS;
  co_await lock_.lock();
  ExclusiveGuard guard(lock_);
  co_await drain_allocations();
  uint64_t next_id = 0;
  for (const SnapshotEntry& s : snapshots_) {
    if (s.name == name) co_return -EEXIST;
    next_id = std::max<uint64_t>(next_id, std::strtoull(s.id.c_str(), nullptr, 10));
  }
  if (snapshots_.size() >= kMaxSnapshots) co_return -EFBIG;
  if (int r = co_await flush_metadata(); r < 0) co_return r;
  SnapshotOps ops(*this);
  if (int r = co_await ops.load_counts(); r < 0) co_return r;
  // The snapshot gets its own copy of the active L1 (COPIED means nothing there) and one more
  // reference to everything the active L1 reaches.
  std::vector<uint64_t> frozen = l1_;
  for (uint64_t& e : frozen) e &= ~kEntryCopied;
  if (int r = co_await ops.add_tree(frozen, +1); r < 0) co_return r;
  SnapshotEntry entry;
  entry.l1_table_offset = frozen.empty() ? 0 : ops.stage(encode_be64_table(frozen));
  entry.l1_size = static_cast<uint32_t>(frozen.size());
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
  co_return co_await ops.commit(l1_, std::move(entries), true);
}

Task<int> Qcow2Node::delete_snapshot(size_t index) noexcept {
  if (read_only()) co_return -EROFS;
  co_await lock_.lock();
  ExclusiveGuard guard(lock_);
  co_await drain_allocations();
  if (index >= snapshots_.size()) co_return -ENOENT;
  if (int r = co_await flush_metadata(); r < 0) co_return r;
  SnapshotOps ops(*this);
  if (int r = co_await ops.load_counts(); r < 0) co_return r;
  const SnapshotEntry& doomed = snapshots_[index];
  std::vector<uint64_t> l1;
  if (int r = co_await read_l1(doomed.l1_table_offset, doomed.l1_size, l1); r < 0) co_return r;
  if (int r = ops.add(doomed.l1_table_offset, l1.size() * 8, -1); r < 0) co_return r;
  if (int r = co_await ops.add_tree(l1, -1); r < 0) co_return r;
  std::vector<SnapshotEntry> entries = snapshots_;
  entries.erase(entries.begin() + static_cast<ptrdiff_t>(index));
  co_return co_await ops.commit(l1_, std::move(entries), true);
}

Task<int> Qcow2Node::revert_snapshot(size_t index) noexcept {
  if (read_only()) co_return -EROFS;
  co_await lock_.lock();
  ExclusiveGuard guard(lock_);
  co_await drain_allocations();
  if (index >= snapshots_.size()) co_return -ENOENT;
  const SnapshotEntry& target = snapshots_[index];
  if (target.disk_size != header_.size || target.l1_size > l1_.size()) co_return -ENOTSUP;
  if (int r = co_await flush_metadata(); r < 0) co_return r;
  SnapshotOps ops(*this);
  if (int r = co_await ops.load_counts(); r < 0) co_return r;
  std::vector<uint64_t> l1;
  if (int r = co_await read_l1(target.l1_table_offset, target.l1_size, l1); r < 0) co_return r;
  l1.resize(l1_.size(), 0);
  // The snapshot's tree gains the active L1's reference, the current active tree loses it.
  if (int r = co_await ops.add_tree(l1, +1); r < 0) co_return r;
  if (int r = co_await ops.add_tree(l1_, -1); r < 0) co_return r;
  co_return co_await ops.commit(std::move(l1), snapshots_, false);
}

}  // namespace blockd::drivers::qcow2
