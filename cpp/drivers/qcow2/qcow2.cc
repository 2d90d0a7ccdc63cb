// The qcow2 format driver: open, the data path, the metadata cache and refcounts. See qcow2.h for
// what is supported and qcow2_node.h for the locking and metadata ordering rules.
#include "drivers/qcow2/qcow2.h"

#include <zlib.h>

#include <algorithm>
#include <cstring>
#include <filesystem>

#include "drivers/qcow2/qcow2_node.h"
#include "drivers/qemu_json.h"

namespace blockd::drivers {
namespace qcow2 {

using block::BlockStatus;

// ---- AsyncRwLock

Task<void> AsyncRwLock::lock_shared() noexcept {
  while (writer_ || waiting_writers_ > 0) co_await changed_.wait();
  ++readers_;
}

void AsyncRwLock::unlock_shared() noexcept {
  if (--readers_ == 0) changed_.notify_all();
}

Task<void> AsyncRwLock::lock() noexcept {
  ++waiting_writers_;
  while (writer_ || readers_ > 0) co_await changed_.wait();
  --waiting_writers_;
  writer_ = true;
}

void AsyncRwLock::unlock() noexcept {
  writer_ = false;
  changed_.notify_all();
}

// ---- MetadataCache

Table* MetadataCache::peek(uint64_t offset) noexcept {
  auto it = entries_.find(offset);
  if (it == entries_.end()) return nullptr;
  it->second->last_use = ++clock_;
  return it->second.get();
}

TablePtr MetadataCache::find(uint64_t offset) noexcept {
  auto it = entries_.find(offset);
  if (it == entries_.end()) return nullptr;
  it->second->last_use = ++clock_;
  return it->second;
}

void MetadataCache::insert(const TablePtr& table) {
  table->last_use = ++clock_;
  entries_[table->offset] = table;
}

std::vector<TablePtr> MetadataCache::dirty_tables() const {
  std::vector<TablePtr> out;
  for (const auto& [offset, table] : entries_) {
    if (table->dirty) out.push_back(table);
  }
  // Ascending offsets: sequential writes.
  std::sort(out.begin(), out.end(), [](auto& a, auto& b) { return a->offset < b->offset; });
  return out;
}

bool MetadataCache::has_dirty() const noexcept {
  for (const auto& [offset, table] : entries_) {
    if (table->dirty) return true;
  }
  return false;
}

void MetadataCache::trim() {
  while (entries_.size() > capacity_) {
    auto victim = entries_.end();
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->second->dirty || it->second->pins > 0) continue;
      if (victim == entries_.end() || it->second->last_use < victim->second->last_use) victim = it;
    }
    if (victim == entries_.end()) return;  // only dirty or pinned entries left
    entries_.erase(victim);
  }
}

// ---- Node basics

Qcow2Node::Qcow2Node(block::NodeOptions common, const Qcow2Options& options)
    : Node(std::move(common)), qcow2_options_(options) {
  discard_passthrough_[0] = options.pass_discard_request.value_or(options_.discard == "unmap");
  discard_passthrough_[1] = options.pass_discard_snapshot.value_or(true);
  discard_passthrough_[2] = options.pass_discard_other.value_or(false);
}

std::string Qcow2Node::filename() const {
  std::string name = file().filename();
  if (name.rfind("json:", 0) == 0) return json_filename(open_options());
  return name;
}

nlohmann::json Qcow2Node::open_options() const {
  nlohmann::json options = {{"driver", "qcow2"}, {"file", file().open_options()}};
  if (backing_) options["backing"] = backing_->node()->open_options();
  return options;
}

void Qcow2Node::child_permissions(const block::Child& child, uint32_t permissions,
                                  uint32_t shared, uint32_t& child_permissions,
                                  uint32_t& child_shared) const {
  if (&child == backing_ || child.name() == "backing") {
    // A backing file is only read; others may do anything but change it under us.
    child_permissions = block::kPermConsistentRead;
    child_shared = block::kPermAll & ~block::kPermWrite;
    return;
  }
  Node::child_permissions(child, permissions, shared, child_permissions, child_shared);
  // Metadata updates write to the file whenever the node is writable.
  if (!read_only()) child_permissions |= block::kPermWrite | block::kPermResize;
  child_permissions |= block::kPermConsistentRead;
  child_shared &= ~(block::kPermWrite | block::kPermResize);
}

// ---- File I/O

Task<int> Qcow2Node::file_io(bool write, uint64_t offset, uint8_t* buffer,
                             uint64_t length) noexcept {
  const uint64_t max = file().max_transfer();
  while (length > 0) {
    const uint64_t chunk = std::min(length, max);
    const int64_t done = write ? co_await file().write(offset, chunk, buffer, 0)
                               : co_await file().read(offset, chunk, buffer, 0);
    if (done < 0) co_return static_cast<int>(done);
    offset += chunk;
    buffer += chunk;
    length -= chunk;
  }
  co_return 0;
}

Task<int> Qcow2Node::file_read(uint64_t offset, void* buffer, uint64_t length) noexcept {
  return file_io(false, offset, static_cast<uint8_t*>(buffer), length);
}

Task<int> Qcow2Node::file_write(uint64_t offset, const void* buffer, uint64_t length) noexcept {
  // file_io only reads from the buffer when writing.
  return file_io(true, offset, static_cast<uint8_t*>(const_cast<void*>(buffer)), length);
}

Task<int> Qcow2Node::file_sync() noexcept {
  if (options_.cache_no_flush) co_return 0;
  co_return static_cast<int>(co_await file().flush());
}

Task<int> Qcow2Node::write_header() noexcept {
  auto bytes = header_.encode();
  if (!bytes) co_return -EINVAL;
  co_return co_await file_write(0, bytes->data(), bytes->size());
}

// ---- Open

Task<Status> Qcow2Node::load() noexcept {
  const int64_t file_size = file().size();
  if (file_size < 0) co_return Status::generic("Could not get image size: " + errno_text(file_size));
  std::vector<uint8_t> first(std::min<uint64_t>(static_cast<uint64_t>(file_size), 4096));
  if (int r = co_await file_read(0, first.data(), first.size()); r < 0) {
    co_return Status::generic("Could not read qcow2 header: " + errno_text(r));
  }
  if (first.size() >= 24 && load_be32(first.data()) == kMagic) {
    const uint32_t bits = load_be32(&first[20]);
    if (bits >= kMinClusterBits && bits <= kMaxClusterBits) {
      const uint64_t wanted = std::min<uint64_t>(uint64_t{1} << bits, file_size);
      if (wanted > first.size()) {
        first.resize(wanted);
        if (int r = co_await file_read(0, first.data(), first.size()); r < 0) {
          co_return Status::generic("Could not read qcow2 header: " + errno_text(r));
        }
      }
    }
  }
  auto parsed = parse_header(first, static_cast<uint64_t>(file_size));
  if (!parsed) co_return parsed.status();
  header_ = std::move(parsed).value();

  if (std::string unknown = unknown_incompatible_features(header_); !unknown.empty()) {
    co_return Status::generic("Unsupported qcow2 feature(s): " + unknown);
  }
  if (header_.crypt_method != kCryptNone) {
    co_return Status::generic("qcow2: encrypted images are not supported by blockd");
  }
  if (header_.incompatible_features & kIncompatDataFile) {
    co_return Status::generic("qcow2: external data files are not supported by blockd");
  }
  if (header_.incompatible_features & kIncompatExtendedL2) {
    co_return Status::generic("qcow2: extended L2 entries (subclusters) are not supported by blockd");
  }
  if (header_.compression_type != kCompressionZlib) {
    co_return Status::generic("qcow2: zstd compressed images are not supported by blockd");
  }
  if (header_.incompatible_features & kIncompatCorrupt) {
    if (!read_only()) {
      options_.read_only = true;
      read_only_reason_ =
          "qcow2: Image is corrupt (the corrupt bit is set); opened read-only. Run 'qemu-img "
          "check -r all' to repair it";
    }
  }
  const bool repair = (header_.incompatible_features & kIncompatDirty) && !read_only();
  if (repair && header_.find_extension(kExtBitmaps)) {
    co_return Status::generic(
        "qcow2: the image is marked dirty and has persistent bitmaps, whose refcounts blockd "
        "cannot rebuild: run 'qemu-img check -r all' or open it read-only");
  }
  cluster_bits_ = header_.cluster_bits;
  l2_entries_ = header_.l2_entries();
  refblock_entries_ = header_.refcount_block_entries();
  host_end_ = div_round_up(static_cast<uint64_t>(file_size), cluster_size()) * cluster_size();
  cow_buffer_.resize(cluster_size());

  // Active L1.
  l1_.resize(header_.l1_size);
  if (header_.l1_size > 0) {
    std::vector<uint8_t> raw(uint64_t{header_.l1_size} * 8);
    if (int r = co_await file_read(header_.l1_table_offset, raw.data(), raw.size()); r < 0) {
      co_return Status::generic("Could not read L1 table: " + errno_text(r));
    }
    for (uint32_t i = 0; i < header_.l1_size; ++i) {
      l1_[i] = load_be64(&raw[i * 8]);
      if (uint64_t l2 = l1_[i] & kOffsetMask) active_l2_.insert(l2);
    }
  }
  // Refcount table.
  {
    const uint64_t bytes = uint64_t{header_.refcount_table_clusters} << cluster_bits_;
    std::vector<uint8_t> raw(bytes);
    if (int r = co_await file_read(header_.refcount_table_offset, raw.data(), bytes); r < 0) {
      co_return Status::generic("Could not read refcount table: " + errno_text(r));
    }
    refcount_table_.resize(bytes / 8);
    for (uint64_t i = 0; i < refcount_table_.size(); ++i) {
      refcount_table_[i] = load_be64(&raw[i * 8]);
      const uint64_t block = refcount_table_[i] & ~kRefcountTableReservedMask;
      if (block != 0) refblocks_.insert(block);
      if ((refcount_table_[i] & kRefcountTableReservedMask) || block % cluster_size() != 0 ||
          (block != 0 && block + cluster_size() > static_cast<uint64_t>(file_size))) {
        co_return Status::generic("Invalid refcount table entry " + std::to_string(i) +
                                  ": refcount block offset " + std::to_string(block) +
                                  " is unaligned or outside the image file");
      }
    }
  }
  // Snapshot table: read a growing window until every entry parses.
  if (header_.nb_snapshots > 0) {
    const uint64_t available = static_cast<uint64_t>(file_size) - header_.snapshots_offset;
    uint64_t window = std::min<uint64_t>(available, 64 << 10);
    for (;;) {
      std::vector<uint8_t> raw(window);
      if (int r = co_await file_read(header_.snapshots_offset, raw.data(), window); r < 0) {
        co_return Status::generic("Could not read snapshot table: " + errno_text(r));
      }
      auto table = parse_snapshot_table(raw, header_.nb_snapshots, header_, file_size);
      if (table) {
        snapshots_ = std::move(table).value();
        break;
      }
      if (window >= available || window >= kMaxSnapshotTableBytes) co_return table.status();
      window = std::min({available, window * 4, kMaxSnapshotTableBytes});
    }
  }

  // Caches: by default enough L2 tables to map the whole disk (up to 32 MiB), and a quarter of
  // that (at least 4 clusters) for refcount blocks.
  const uint64_t full_l2 = std::max<uint64_t>(uint64_t{header_.l1_size} * cluster_size(), 1);
  uint64_t l2_bytes = std::min<uint64_t>(full_l2, 32u << 20);
  uint64_t refcount_bytes = std::max<uint64_t>(l2_bytes / 4, 4 * cluster_size());
  if (qcow2_options_.cache_size) {
    const uint64_t total = static_cast<uint64_t>(*qcow2_options_.cache_size);
    if (qcow2_options_.l2_cache_size && qcow2_options_.refcount_cache_size) {
      co_return Status::generic(
          "l2-cache-size, refcount-cache-size and cache-size may not be set at the same time");
    }
    l2_bytes = qcow2_options_.l2_cache_size ? *qcow2_options_.l2_cache_size
               : qcow2_options_.refcount_cache_size
                   ? total - std::min<uint64_t>(total, *qcow2_options_.refcount_cache_size)
                   : std::min<uint64_t>(full_l2, total * 3 / 4);
    refcount_bytes = total - std::min<uint64_t>(total, l2_bytes);
  } else {
    if (qcow2_options_.l2_cache_size) l2_bytes = *qcow2_options_.l2_cache_size;
    if (qcow2_options_.refcount_cache_size) refcount_bytes = *qcow2_options_.refcount_cache_size;
  }
  if (l2_bytes > (1ull << 40) || refcount_bytes > (1ull << 40)) {
    co_return Status::generic("L2 cache size too big");
  }
  l2_cache_.set_capacity(l2_bytes / cluster_size());
  refblock_cache_.set_capacity(refcount_bytes / cluster_size());
  set_size(static_cast<int64_t>(header_.size));
  if (repair) {
    // Left dirty by a writer with lazy refcounts: refcounts may be anything; recount them.
    if (int r = co_await rebuild_refcounts(); r < 0) {
      co_return Status::generic("qcow2: could not repair the refcounts of the dirty image: " +
                                errno_text(r));
    }
  }
  co_return Status::ok();
}

Status Qcow2Node::attach_backing(const Qcow2Options& options, const OpenBackingFile& open_backing) {
  std::shared_ptr<block::Node> node;
  backing_filename_ = header_.backing_file;
  if (options.backing_given) {
    node = options.backing;
  } else if (!header_.backing_file.empty()) {
    std::string path = header_.backing_file;
    std::string image = file().filename();
    if (path.find(':') == std::string::npos && path[0] != '/' && image.rfind("json:", 0) != 0) {
      path = (std::filesystem::path(image).parent_path() / path).string();
    }
    if (!open_backing) return Status::generic("Could not open backing file: no opener given");
    auto opened = open_backing(path, header_.backing_format());
    if (!opened) return opened.status().with_prefix("Could not open backing file");
    node = std::move(opened).value();
  }
  if (!node) return Status::ok();
  auto child = add_child("backing", std::move(node));
  if (!child) return child.status();
  backing_ = *child;
  return Status::ok();
}

int Qcow2Node::data_extents(const Table& table, std::vector<CompressedExtent>& out) const {
  out.clear();
  for (uint64_t i = 0; i < l2_entries_; ++i) {
    const uint64_t entry = table.entry(i);
    if (!check_l2_entry(entry, header_.version, cluster_bits_, host_end_).empty()) return -EIO;
    switch (classify_l2_entry(entry, header_.version)) {
      case ClusterKind::kNormal:
      case ClusterKind::kZeroAllocated:
        out.push_back({entry & kOffsetMask, cluster_size()});
        break;
      case ClusterKind::kCompressed: {
        CompressedExtent extent = decode_compressed_entry(entry, cluster_bits_);
        extent.length = std::min(extent.length, host_end_ - extent.host_offset);
        out.push_back(extent);
        break;
      }
      default:
        break;
    }
  }
  return 0;
}

Task<int> Qcow2Node::rebuild_refcounts() noexcept {
  // Count every reference the image's metadata makes, cluster by cluster.
  std::vector<uint64_t> counts(host_end_ >> cluster_bits_, 0);
  bool outside = false;
  auto count = [&](uint64_t offset, uint64_t length) {
    if (length == 0) return;
    for (uint64_t c = offset >> cluster_bits_; c <= (offset + length - 1) >> cluster_bits_; ++c) {
      if (c < counts.size()) {
        ++counts[c];
      } else {
        outside = true;
      }
    }
  };
  count(0, cluster_size());
  count(header_.l1_table_offset, l1_.size() * 8);
  count(header_.refcount_table_offset, uint64_t{header_.refcount_table_clusters} << cluster_bits_);
  for (uint64_t block : refcount_table_) count(block & ~kRefcountTableReservedMask, block ? 1 : 0);
  count(header_.snapshots_offset, snapshot_table_size(snapshots_));
  std::vector<std::vector<uint64_t>> trees = {l1_};
  for (const SnapshotEntry& s : snapshots_) {
    count(s.l1_table_offset, uint64_t{s.l1_size} * 8);
    trees.emplace_back();
    if (int r = co_await read_l1(s.l1_table_offset, s.l1_size, trees.back()); r < 0) co_return r;
  }
  for (const auto& tree : trees) {
    for (uint64_t l1_entry : tree) {
      if (!check_l1_entry(l1_entry, cluster_bits_, host_end_).empty()) co_return -EIO;
      const uint64_t l2_offset = l1_entry & kOffsetMask;
      if (l2_offset == 0) continue;
      count(l2_offset, cluster_size());
      TablePtr table;
      if (int r = co_await load_table(l2_cache_, l2_offset, table); r < 0) co_return r;
      std::vector<CompressedExtent> extents;
      if (int r = data_extents(*table, extents); r < 0) co_return r;
      for (const CompressedExtent& extent : extents) count(extent.host_offset, extent.length);
      l2_cache_.trim();
    }
  }
  if (outside) co_return -EIO;
  // Store the counts. A referenced cluster whose refcount block is missing cannot be fixed in
  // place (a new block would take a cluster that may be in use).
  for (uint64_t c = 0; c < counts.size(); ++c) {
    TablePtr block;
    if (int r = co_await refblock_for(c, false, block); r < 0) co_return r;
    if (!block) {
      if (counts[c] != 0) co_return -EIO;
      continue;
    }
    if (counts[c] > max_refcount(header_.refcount_order)) co_return -EFBIG;
    const uint64_t slot = c % refblock_entries_;
    if (qcow2::get_refcount(block->data.data(), slot, header_.refcount_order) != counts[c]) {
      set_refcount(block->data.data(), slot, header_.refcount_order, counts[c]);
      block->dirty = true;
    }
    if (refblock_cache_.over_capacity()) {
      if (int r = co_await write_dirty(refblock_cache_); r < 0) co_return r;
      refblock_cache_.trim();
    }
  }
  // COPIED flags follow the new counts, then the image is clean again.
  if (int r = co_await recompute_copied(); r < 0) co_return r;
  if (int r = co_await flush_metadata(); r < 0) co_return r;
  header_.incompatible_features &= ~kIncompatDirty;
  if (int r = co_await write_header(); r < 0) co_return r;
  co_return co_await file_sync();
}

// ---- Tables

TablePtr Qcow2Node::new_table(MetadataCache& cache, uint64_t offset) {
  auto table = std::make_shared<Table>();
  table->offset = offset;
  table->data.assign(cluster_size(), 0);
  table->dirty = true;
  cache.insert(table);
  return table;
}

Task<int> Qcow2Node::load_table(MetadataCache& cache, uint64_t offset, TablePtr& out) noexcept {
  if ((out = cache.find(offset))) co_return 0;
  auto table = std::make_shared<Table>();
  table->offset = offset;
  table->data.resize(cluster_size());
  if (int r = co_await file_read(offset, table->data.data(), cluster_size()); r < 0) co_return r;
  // Another coroutine may have loaded (and even changed) it meanwhile: keep theirs.
  if ((out = cache.find(offset))) co_return 0;
  cache.insert(table);
  out = std::move(table);
  co_return 0;
}

bool Qcow2Node::writable_in_place(uint64_t guest_cluster) noexcept {
  if (!(l1_[guest_cluster / l2_entries_] & kEntryCopied)) return false;
  uint64_t entry;
  return lookup_cached(guest_cluster, entry) == 1 &&
         classify_l2_entry(entry, header_.version) == ClusterKind::kNormal &&
         (entry & kEntryCopied) && !overlaps_metadata(entry & kOffsetMask);
}

int Qcow2Node::lookup_cached(uint64_t guest_cluster, uint64_t& entry) noexcept {
  entry = 0;
  const uint64_t l1_index = guest_cluster / l2_entries_;
  if (l1_index >= l1_.size()) return -EIO;
  const uint64_t l1_entry = l1_[l1_index];
  if (!check_l1_entry(l1_entry, cluster_bits_, host_end_).empty()) return -EIO;
  const uint64_t l2_offset = l1_entry & kOffsetMask;
  if (l2_offset == 0) return 1;
  const Table* table = l2_cache_.peek(l2_offset);
  if (table == nullptr) return 0;
  entry = table->entry(guest_cluster % l2_entries_);
  if (!check_l2_entry(entry, header_.version, cluster_bits_, host_end_).empty()) return -EIO;
  return 1;
}

Task<int> Qcow2Node::lookup(uint64_t guest_cluster, uint64_t& entry) noexcept {
  if (int found = lookup_cached(guest_cluster, entry); found != 0) co_return found < 0 ? found : 0;
  // The L1 entry is valid and the L2 table not cached: read it.
  TablePtr table;
  if (int r = co_await load_table(l2_cache_, l1_[guest_cluster / l2_entries_] & kOffsetMask, table);
      r < 0) {
    co_return r;
  }
  entry = table->entry(guest_cluster % l2_entries_);
  if (!check_l2_entry(entry, header_.version, cluster_bits_, host_end_).empty()) co_return -EIO;
  co_return 0;
}

Task<int> Qcow2Node::read_backing(uint64_t offset, uint64_t length, uint8_t* buffer) noexcept {
  block::Node* base = backing();
  uint64_t readable = 0;
  if (base && offset < static_cast<uint64_t>(base->size())) {
    readable = std::min<uint64_t>(length, base->size() - offset);
    const int64_t r = co_await base->read(offset, readable, buffer, 0);
    if (r < 0) co_return static_cast<int>(r);
  }
  if (readable < length) std::memset(buffer + readable, 0, length - readable);
  co_return 0;
}

Task<int> Qcow2Node::read_compressed(uint64_t entry, uint8_t* cluster_buffer) noexcept {
  const CompressedExtent extent = decode_compressed_entry(entry, cluster_bits_);
  const uint64_t length = std::min(extent.length, host_end_ - extent.host_offset);
  std::vector<uint8_t> compressed(length);
  if (int r = co_await file_read(extent.host_offset, compressed.data(), length); r < 0) co_return r;
  z_stream stream{};
  if (inflateInit2(&stream, -12) != Z_OK) co_return -ENOMEM;
  stream.next_in = compressed.data();
  stream.avail_in = static_cast<uInt>(length);
  stream.next_out = cluster_buffer;
  stream.avail_out = static_cast<uInt>(cluster_size());
  const int status = inflate(&stream, Z_FINISH);
  const bool complete = stream.avail_out == 0 && (status == Z_STREAM_END || status == Z_BUF_ERROR ||
                                                  status == Z_OK);
  inflateEnd(&stream);
  co_return complete ? 0 : -EIO;
}

Task<int> Qcow2Node::read_cluster(uint64_t guest_cluster, uint64_t entry,
                                  uint8_t* buffer) noexcept {
  switch (classify_l2_entry(entry, header_.version)) {
    case ClusterKind::kNormal:
      co_return co_await file_read(entry & kOffsetMask, buffer, cluster_size());
    case ClusterKind::kCompressed:
      co_return co_await read_compressed(entry, buffer);
    case ClusterKind::kZeroPlain:
    case ClusterKind::kZeroAllocated:
      std::memset(buffer, 0, cluster_size());
      co_return 0;
    case ClusterKind::kUnallocated:
      break;
  }
  co_return co_await read_backing(guest_cluster << cluster_bits_, cluster_size(), buffer);
}

// ---- Data path: read and block status

Task<int64_t> Qcow2Node::read(uint64_t offset, uint64_t length, void* buffer, uint32_t) noexcept {
  const uint64_t size = header_.size;
  if (offset > size || length > size - offset) co_return -EINVAL;
  if (!lock_.try_lock_shared()) co_await lock_.lock_shared();
  SharedGuard guard(lock_);
  auto* out = static_cast<uint8_t*>(buffer);
  uint64_t pos = offset;
  const uint64_t end = offset + length;
  while (pos < end) {
    const uint64_t guest_cluster = pos >> cluster_bits_;
    const uint64_t in = offset_in_cluster(pos);
    uint64_t n = std::min(cluster_size() - in, end - pos);
    uint64_t entry;
    int found = lookup_cached(guest_cluster, entry);
    if (found == 0) found = co_await lookup(guest_cluster, entry);
    if (found < 0) co_return found;
    switch (classify_l2_entry(entry, header_.version)) {
      case ClusterKind::kNormal: {
        // Extend over following clusters that are stored contiguously.
        const uint64_t base = entry & kOffsetMask;
        uint64_t clusters = 1;
        while (pos + n < end && n < file().max_transfer()) {
          uint64_t next_entry;
          int next_found = lookup_cached(guest_cluster + clusters, next_entry);
          if (next_found == 0) next_found = co_await lookup(guest_cluster + clusters, next_entry);
          if (next_found < 0) break;
          if (classify_l2_entry(next_entry, header_.version) != ClusterKind::kNormal ||
              (next_entry & kOffsetMask) != base + (clusters << cluster_bits_)) {
            break;
          }
          n += std::min(cluster_size(), end - pos - n);
          ++clusters;
        }
        const uint64_t host = base + in;
        const int64_t r = n <= file().max_transfer() ? co_await file().read(host, n, out, 0)
                                                      : co_await file_read(host, out, n);
        if (r < 0) co_return r;
        break;
      }
      case ClusterKind::kZeroPlain:
      case ClusterKind::kZeroAllocated:
        std::memset(out, 0, n);
        break;
      case ClusterKind::kUnallocated:
        if (int r = co_await read_backing(pos, n, out); r < 0) co_return r;
        break;
      case ClusterKind::kCompressed: {
        std::vector<uint8_t> cluster(cluster_size());
        if (int r = co_await read_compressed(entry, cluster.data()); r < 0) co_return r;
        std::memcpy(out, cluster.data() + in, n);
        break;
      }
    }
    pos += n;
    out += n;
  }
  // Trimming only while the lock is held: an exclusive holder may be keeping a clean table it
  // is about to change, which must not leave the cache under it.
  l2_cache_.trim();
  refblock_cache_.trim();
  co_return static_cast<int64_t>(length);
}

Task<BlockStatus> Qcow2Node::block_status(uint64_t offset, uint64_t length) noexcept {
  const uint64_t size = header_.size;
  if (offset >= size) co_return BlockStatus{0, 0};
  length = std::min(length, size - offset);
  co_await lock_.lock_shared();
  SharedGuard guard(lock_);
  uint64_t entry;
  if (int r = co_await lookup(offset >> cluster_bits_, entry); r < 0) co_return BlockStatus{r, 0};
  const ClusterKind kind = classify_l2_entry(entry, header_.version);
  auto same_kind = [&](uint64_t e) {
    const ClusterKind k = classify_l2_entry(e, header_.version);
    if (kind == ClusterKind::kZeroPlain || kind == ClusterKind::kZeroAllocated) {
      return k == ClusterKind::kZeroPlain || k == ClusterKind::kZeroAllocated;
    }
    if (kind == ClusterKind::kNormal || kind == ClusterKind::kCompressed) {
      return k == ClusterKind::kNormal || k == ClusterKind::kCompressed;
    }
    return k == kind;
  };
  uint64_t run = std::min(cluster_size() - offset_in_cluster(offset), length);
  while (run < length) {
    uint64_t next;
    if (co_await lookup((offset + run) >> cluster_bits_, next) < 0 || !same_kind(next)) break;
    run = std::min(run + cluster_size(), length);
  }
  l2_cache_.trim();
  refblock_cache_.trim();
  guard.release();
  switch (kind) {
    case ClusterKind::kNormal:
    case ClusterKind::kCompressed:
      co_return BlockStatus{static_cast<int64_t>(run), block::kStatusData | block::kStatusAllocated};
    case ClusterKind::kZeroPlain:
    case ClusterKind::kZeroAllocated:
      co_return BlockStatus{static_cast<int64_t>(run), block::kStatusZero | block::kStatusAllocated};
    case ClusterKind::kUnallocated:
      break;
  }
  block::Node* base = backing();
  if (!base || offset >= static_cast<uint64_t>(base->size())) {
    co_return BlockStatus{static_cast<int64_t>(run), block::kStatusZero};
  }
  BlockStatus below =
      co_await base->block_status(offset, std::min<uint64_t>(run, base->size() - offset));
  if (below.bytes > 0) below.flags &= ~block::kStatusAllocated;
  co_return below;
}

// ---- Data path: ranges handed to the kernel (Node::map_file)
//
// The NBD export moves large reads from the image file to the socket with sendfile and large
// write payloads from the socket into the file with splice, when map_file says where the bytes
// are. Why what map_file grants is what read() and write() would do:
//
// What may be mapped. Only kNormal clusters: their host bytes are the guest's bytes. Zero
// clusters (even with preallocated space, which may hold stale bytes), unallocated ones (backing
// file or zeroes), compressed ones and a range whose clusters are not stored one after another
// give fd -1, and the caller takes the buffered path.
//
// Writes. A mapped write bypasses write(), so it is allowed only where write() itself would just
// write the bytes in place under the shared lock: writable_in_place (L1 and L2 entries COPIED,
// i.e. the table and the cluster have refcount 1, and the cluster is no metadata). Such a write
// updates no metadata: no refcount, no L2 entry, no flag. blockd never sets the dirty bit (it
// keeps refcounts exact even with lazy-refcounts), so there is no header to update either. A
// cluster shared with a snapshot needs copy-on-write: not mappable for writing until a buffered
// write has copied it (the copy is then COPIED and mappable).
//
// For how long. A mapping is used after map_file returns, while other requests run (the transfer
// waits for the socket), so it holds the node lock shared until release_file. Everything that
// could free a mapped cluster, make it shared or reuse it takes the lock exclusively and so waits
// for the mapping to end: discard, write-zeroes, flush (which applies deferred refcount
// decrements), snapshot create, delete and revert, and the planning step of allocating writes
// (the only place clusters are allocated). Allocating writes planned earlier finish without the
// lock, but they write only into clusters they allocated (a mapped cluster is referenced, so it
// is not among them), and the references they drop are decremented only at a later flush. Their
// guest clusters are never COPIED normal clusters while the allocation is in flight, so a write
// mapping cannot cover one; a read mapping of one shows the old, still valid, host cluster.
//
// Without blocking. The lock is taken only if that needs no wait (with writers preferred, a
// waiting exclusive holder makes map_file fail rather than wait or starve it), and L2 entries
// come only from the cache; anything else gives fd -1.
//
// The price: a client that stops reading its replies or trickles a write payload delays this
// node's exclusive operations (flushes of other clients included) until its transfer ends or
// the connection drops, as it already delays a drain of the export.

int64_t Qcow2Node::contiguous_host_run(uint64_t offset, uint64_t length, bool write) noexcept {
  const uint64_t first = offset >> cluster_bits_;
  const uint64_t last = (offset + length - 1) >> cluster_bits_;
  uint64_t base = 0;
  for (uint64_t cluster = first; cluster <= last; ++cluster) {
    uint64_t entry;
    if (lookup_cached(cluster, entry) != 1) return -1;  // not cached, or corrupt
    if (classify_l2_entry(entry, header_.version) != ClusterKind::kNormal) return -1;
    if (write && !writable_in_place(cluster)) return -1;
    const uint64_t host = entry & kOffsetMask;
    if (cluster == first) {
      base = host;
    } else if (host != base + ((cluster - first) << cluster_bits_)) {
      return -1;
    }
  }
  return static_cast<int64_t>(base + offset_in_cluster(offset));
}

block::FileRange Qcow2Node::map_file(uint64_t offset, uint64_t length,
                                     block::MapAccess access) noexcept {
  const bool write = access != block::MapAccess::kRead;
  if (length == 0 || offset > header_.size || length > header_.size - offset) return {};
  if (write && read_only()) return {};
  if (!lock_.try_lock_shared()) return {};
  const int64_t host = contiguous_host_run(offset, length, write);
  block::FileRange range;
  if (host >= 0) range = file().map_file(static_cast<uint64_t>(host), length, access);
  if (range.fd < 0) {
    lock_.unlock_shared();
    return {};
  }
  // No memory view: a caller sends it inside a reply that may wait behind a client that reads
  // nothing, where nothing ends the mapping early, and this mapping holds the lock that flushes
  // and snapshots need. Through the descriptor, the NBD writer ends a stalled transfer's mapping
  // after a short wait (small reads take the buffered path instead).
  range.memory = nullptr;
  return range;
}

void Qcow2Node::release_file(const block::FileRange& range, block::MapAccess access) noexcept {
  file().release_file(range, access);
  lock_.unlock_shared();
}

// ---- Refcounts

Task<int> Qcow2Node::refblock_for(uint64_t cluster_index, bool create, TablePtr& out) noexcept {
  out = nullptr;
  const uint64_t table_index = cluster_index / refblock_entries_;
  if (table_index >= refcount_table_.size() || refcount_table_[table_index] == 0) {
    if (!create) co_return 0;
    if (table_index >= refcount_table_.size()) {
      if (int r = co_await grow_refcount_table(table_index); r < 0) co_return r;
    }
    if (refcount_table_[table_index] == 0) {
      if (int r = co_await create_refblock(table_index); r < 0) co_return r;
    }
  }
  const uint64_t block = refcount_table_[table_index] & ~kRefcountTableReservedMask;
  if (block == 0 || block % cluster_size() != 0 || block + cluster_size() > host_end_) co_return -EIO;
  co_return co_await load_table(refblock_cache_, block, out);
}

Task<int> Qcow2Node::get_refcount(uint64_t cluster_index, uint64_t& value) noexcept {
  TablePtr block;
  value = 0;
  if (int r = co_await refblock_for(cluster_index, false, block); r < 0) co_return r;
  if (block) {
    value = qcow2::get_refcount(block->data.data(), cluster_index % refblock_entries_,
                                header_.refcount_order);
  }
  co_return 0;
}

Task<int> Qcow2Node::update_refcount(uint64_t offset, uint64_t length, int64_t delta) noexcept {
  if (length == 0) co_return 0;
  const uint64_t first = offset >> cluster_bits_;
  const uint64_t last = (offset + length - 1) >> cluster_bits_;
  for (uint64_t index = first; index <= last; ++index) {
    TablePtr block;
    if (int r = co_await refblock_for(index, delta > 0, block); r < 0) co_return r;
    if (!block) co_return -EIO;  // decrementing a cluster that has no refcount block
    const uint64_t slot = index % refblock_entries_;
    const uint64_t old = qcow2::get_refcount(block->data.data(), slot, header_.refcount_order);
    if (delta < 0 && old < static_cast<uint64_t>(-delta)) co_return -EIO;
    if (delta > 0 && max_refcount(header_.refcount_order) - old < static_cast<uint64_t>(delta)) {
      co_return -EFBIG;
    }
    const uint64_t value = old + static_cast<uint64_t>(delta);
    set_refcount(block->data.data(), slot, header_.refcount_order, value);
    block->dirty = true;
    if (value == 0 && index < free_hint_) free_hint_ = index;
  }
  co_return 0;
}

Task<int> Qcow2Node::create_refblock(uint64_t table_index) noexcept {
  // The new block covers clusters [table_index * entries, ...) which are all free; it lives in
  // the first of them and counts itself.
  const uint64_t offset = (table_index * refblock_entries_) << cluster_bits_;
  TablePtr block = new_table(refblock_cache_, offset);
  set_refcount(block->data.data(), 0, header_.refcount_order, 1);
  // The block must be on disk before the refcount table points at it.
  if (int r = co_await file_write(offset, block->data.data(), cluster_size()); r < 0) {
    refblock_cache_.erase(offset);
    co_return r;
  }
  block->dirty = false;
  host_end_ = std::max(host_end_, offset + cluster_size());
  if (int r = co_await file_sync(); r < 0) co_return r;
  uint8_t entry[8];
  store_be64(entry, offset);
  if (int r = co_await file_write(header_.refcount_table_offset + table_index * 8, entry, 8); r < 0) {
    co_return r;
  }
  refcount_table_[table_index] = offset;
  refblocks_.insert(offset);
  co_return 0;
}

Task<int> Qcow2Node::grow_refcount_table(uint64_t needed_index) noexcept {
  // New refcount blocks and the new table go at the start of the area covered by table index
  // `needed_index` (beyond everything covered so far, hence free). Blocks first, then the table;
  // the blocks must cover themselves and the table.
  const uint64_t start = needed_index * refblock_entries_;  // cluster index
  uint64_t entries = std::max<uint64_t>(needed_index + 1, refcount_table_.size() * 2);
  uint64_t blocks = 1;
  uint64_t table_clusters = 0;
  for (int round = 0; round < 64; ++round) {
    table_clusters = div_round_up(entries * 8, cluster_size());
    const uint64_t new_blocks = div_round_up(blocks + table_clusters, refblock_entries_);
    const uint64_t new_entries = std::max(entries, needed_index + new_blocks);
    if (new_blocks == blocks && new_entries == entries) break;
    blocks = new_blocks;
    entries = new_entries;
  }
  table_clusters = div_round_up(entries * 8, cluster_size());
  if ((table_clusters << cluster_bits_) > kMaxRefcountTableBytes) co_return -EFBIG;
  const uint64_t used = blocks + table_clusters;
  std::vector<uint64_t> table(table_clusters * cluster_size() / 8, 0);
  std::copy(refcount_table_.begin(), refcount_table_.end(), table.begin());
  for (uint64_t b = 0; b < blocks; ++b) {
    std::vector<uint8_t> data(cluster_size(), 0);
    const uint64_t range_first = (needed_index + b) * refblock_entries_;
    for (uint64_t c = start; c < start + used; ++c) {
      if (c >= range_first && c < range_first + refblock_entries_) {
        set_refcount(data.data(), c - range_first, header_.refcount_order, 1);
      }
    }
    const uint64_t offset = (start + b) << cluster_bits_;
    if (int r = co_await file_write(offset, data.data(), data.size()); r < 0) co_return r;
    table[needed_index + b] = offset;
    refblocks_.insert(offset);
  }
  const uint64_t table_offset = (start + blocks) << cluster_bits_;
  const std::vector<uint8_t> raw = encode_be64_table(table);
  if (int r = co_await file_write(table_offset, raw.data(), raw.size()); r < 0) co_return r;
  host_end_ = std::max(host_end_, (start + used) << cluster_bits_);
  if (int r = co_await file_sync(); r < 0) co_return r;
  // Switch the header to the new table, then release the old one.
  const uint64_t old_offset = header_.refcount_table_offset;
  const uint64_t old_bytes = uint64_t{header_.refcount_table_clusters} << cluster_bits_;
  header_.refcount_table_offset = table_offset;
  header_.refcount_table_clusters = static_cast<uint32_t>(table_clusters);
  if (int r = co_await write_header(); r < 0) co_return r;
  if (int r = co_await file_sync(); r < 0) co_return r;
  refcount_table_ = std::move(table);
  co_return co_await update_refcount(old_offset, old_bytes, -1);
}

Task<int64_t> Qcow2Node::allocate_clusters(uint64_t count, bool* fresh) noexcept {
  uint64_t run_start = free_hint_;
  uint64_t index = free_hint_;
  uint64_t first_free = UINT64_MAX;
  while (index - run_start < count) {
    const uint64_t table_index = index / refblock_entries_;
    TablePtr block;
    // Covering a new area takes clusters from it: rescan the run afterwards.
    const bool covered =
        table_index < refcount_table_.size() && refcount_table_[table_index] != 0;
    if (int r = co_await refblock_for(index, true, block); r < 0) co_return r;
    if (!covered) {
      index = run_start;
      first_free = UINT64_MAX;
      continue;
    }
    // Scan the rest of this refcount block without suspending.
    const uint64_t block_end = (table_index + 1) * refblock_entries_;
    for (; index < block_end && index - run_start < count; ++index) {
      if (qcow2::get_refcount(block->data.data(), index % refblock_entries_,
                              header_.refcount_order) != 0) {
        run_start = index + 1;
      } else if (first_free == UINT64_MAX) {
        first_free = index;
      }
    }
    if ((index << cluster_bits_) >= (uint64_t{1} << 56)) co_return -ENOSPC;
  }
  // No free cluster below the first one seen (a lone one before a longer run stays the hint).
  free_hint_ = first_free < run_start ? first_free : run_start + count;
  for (uint64_t i = 0; i < count; ++i) {
    if (int r = co_await update_refcount((run_start + i) << cluster_bits_, 1, 1); r < 0) co_return r;
  }
  // host_end_ only grows, and covers every cluster written since open (metadata is allocated
  // before it is written; refcount blocks raise it themselves).
  if (fresh) *fresh = (run_start << cluster_bits_) >= host_end_;
  host_end_ = std::max(host_end_, (run_start + count) << cluster_bits_);
  co_return static_cast<int64_t>(run_start << cluster_bits_);
}

void Qcow2Node::defer_free(uint64_t offset, uint64_t length, DiscardKind kind) {
  deferred_frees_.push_back({offset, length, kind});
}

void Qcow2Node::defer_free_entry(uint64_t entry, DiscardKind kind) {
  switch (classify_l2_entry(entry, header_.version)) {
    case ClusterKind::kNormal:
    case ClusterKind::kZeroAllocated:
      defer_free(entry & kOffsetMask, cluster_size(), kind);
      break;
    case ClusterKind::kCompressed: {
      const CompressedExtent extent = decode_compressed_entry(entry, cluster_bits_);
      defer_free(extent.host_offset, extent.length, kind);
      break;
    }
    default:
      break;
  }
}

Task<int> Qcow2Node::apply_deferred_frees(std::vector<DeferredFree> frees) noexcept {
  for (const DeferredFree& free : frees) {
    if (int r = co_await update_refcount(free.offset, free.length, -1); r < 0) co_return r;
    if (!discard_passthrough_[static_cast<int>(free.kind)]) continue;
    // Give clusters that became free back to the file system.
    const uint64_t first = free.offset >> cluster_bits_;
    const uint64_t last = (free.offset + free.length - 1) >> cluster_bits_;
    for (uint64_t index = first; index <= last; ++index) {
      uint64_t value;
      if (co_await get_refcount(index, value) == 0 && value == 0) {
        (void)co_await file().discard(index << cluster_bits_, cluster_size());
      }
    }
  }
  co_return 0;
}

// ---- Metadata ordering

Task<int> Qcow2Node::write_dirty(MetadataCache& cache) noexcept {
  // An allocating write may change a table while it is being written (it needs no lock for
  // that): write a copy, and let such a change mark the table dirty again.
  std::vector<uint8_t> copy(cluster_size());
  for (const TablePtr& table : cache.dirty_tables()) {
    std::memcpy(copy.data(), table->data.data(), cluster_size());
    table->dirty = false;
    if (int r = co_await file_write(table->offset, copy.data(), cluster_size()); r < 0) {
      table->dirty = true;
      co_return r;
    }
  }
  co_return 0;
}

Task<int> Qcow2Node::write_l1() noexcept {
  const std::vector<uint8_t> raw = encode_be64_table(l1_);
  if (int r = co_await file_write(header_.l1_table_offset, raw.data(), raw.size()); r < 0) {
    co_return r;
  }
  l1_dirty_ = false;
  co_return 0;
}

Task<int> Qcow2Node::flush_metadata() noexcept {
  for (int round = 0; round < 2; ++round) {
    // Only references dropped before this round's tables are copied are durable after it.
    std::vector<DeferredFree> frees;
    frees.swap(deferred_frees_);
    if (refblock_cache_.has_dirty()) {
      if (int r = co_await write_dirty(refblock_cache_); r < 0) co_return r;
      if (int r = co_await file_sync(); r < 0) co_return r;
    }
    if (l2_cache_.has_dirty()) {
      if (int r = co_await write_dirty(l2_cache_); r < 0) co_return r;
      if (int r = co_await file_sync(); r < 0) co_return r;
    }
    if (l1_dirty_) {
      if (int r = co_await write_l1(); r < 0) co_return r;
      if (int r = co_await file_sync(); r < 0) co_return r;
    }
    if (frees.empty()) break;
    // Those references are gone on disk: the decrements may follow (written by the second round).
    if (int r = co_await apply_deferred_frees(std::move(frees)); r < 0) co_return r;
  }
  co_return 0;
}

Task<int> Qcow2Node::trim_caches() noexcept {
  if (l2_cache_.over_capacity() || refblock_cache_.over_capacity()) {
    if (int r = co_await flush_metadata(); r < 0) co_return r;
  }
  l2_cache_.trim();
  refblock_cache_.trim();
  co_return 0;
}

bool Qcow2Node::overlaps_metadata(uint64_t host) const noexcept {
  const uint64_t cs = cluster_size();
  auto inside = [&](uint64_t start, uint64_t bytes) {
    return bytes > 0 && host + cs > start && host < start + bytes;
  };
  if (host < cs) return true;
  if (inside(header_.l1_table_offset, uint64_t{header_.l1_size} * 8)) return true;
  if (inside(header_.refcount_table_offset, uint64_t{header_.refcount_table_clusters} * cs)) {
    return true;
  }
  if (inside(header_.snapshots_offset, snapshot_table_size(snapshots_))) return true;
  if (active_l2_.count(host)) return true;
  if (refblocks_.count(host)) return true;
  for (const SnapshotEntry& s : snapshots_) {
    if (inside(s.l1_table_offset, uint64_t{s.l1_size} * 8)) return true;
  }
  return false;
}

// ---- Data path: writes

Task<int> Qcow2Node::writable_l2(uint64_t l1_index, TablePtr& out) noexcept {
  const uint64_t l1_entry = l1_[l1_index];
  if (!check_l1_entry(l1_entry, cluster_bits_, host_end_).empty()) co_return -EIO;
  const uint64_t old = l1_entry & kOffsetMask;
  if (old == 0) {
    const int64_t offset = co_await allocate_clusters(1);
    if (offset < 0) co_return static_cast<int>(offset);
    out = new_table(l2_cache_, static_cast<uint64_t>(offset));
    l1_[l1_index] = static_cast<uint64_t>(offset) | kEntryCopied;
    l1_dirty_ = true;
    active_l2_.insert(static_cast<uint64_t>(offset));
    co_return 0;
  }
  TablePtr table;
  if (int r = co_await load_table(l2_cache_, old, table); r < 0) co_return r;
  if (l1_entry & kEntryCopied) {
    out = std::move(table);
    co_return 0;
  }
  uint64_t refcount;
  if (int r = co_await get_refcount(old >> cluster_bits_, refcount); r < 0) co_return r;
  if (refcount == 1) {  // not shared after all (a stale flag): claim it
    l1_[l1_index] |= kEntryCopied;
    l1_dirty_ = true;
    out = std::move(table);
    co_return 0;
  }
  // Shared with a snapshot: copy it. Its data clusters stay shared (their refcounts count each
  // L1 that reaches them), so no entry of the copy is COPIED.
  const int64_t offset = co_await allocate_clusters(1);
  if (offset < 0) co_return static_cast<int>(offset);
  TablePtr copy = new_table(l2_cache_, static_cast<uint64_t>(offset));
  copy->data = table->data;
  for (uint64_t i = 0; i < l2_entries_; ++i) {
    const uint64_t e = copy->entry(i);
    if (e & kEntryCopied) copy->set_entry(i, e & ~kEntryCopied);
  }
  copy->dirty = true;
  l1_[l1_index] = static_cast<uint64_t>(offset) | kEntryCopied;
  l1_dirty_ = true;
  active_l2_.erase(old);
  active_l2_.insert(static_cast<uint64_t>(offset));
  defer_free(old, cluster_size(), DiscardKind::kOther);
  out = std::move(copy);
  co_return 0;
}

bool Qcow2Node::reads_as_zero(uint64_t offset, uint64_t entry) const noexcept {
  switch (classify_l2_entry(entry, header_.version)) {
    case ClusterKind::kZeroPlain:
    case ClusterKind::kZeroAllocated:
      return true;
    case ClusterKind::kUnallocated: {
      const block::Node* base = backing();
      return base == nullptr || offset >= static_cast<uint64_t>(base->size());
    }
    default:
      return false;
  }
}

Task<int> Qcow2Node::read_old(uint64_t offset, uint64_t entry, uint8_t* buffer,
                              uint64_t length) noexcept {
  switch (classify_l2_entry(entry, header_.version)) {
    case ClusterKind::kNormal:
      co_return co_await file_read((entry & kOffsetMask) + offset_in_cluster(offset), buffer, length);
    case ClusterKind::kCompressed: {
      std::vector<uint8_t> cluster(cluster_size());
      if (int r = co_await read_compressed(entry, cluster.data()); r < 0) co_return r;
      std::memcpy(buffer, cluster.data() + offset_in_cluster(offset), length);
      co_return 0;
    }
    case ClusterKind::kZeroPlain:
    case ClusterKind::kZeroAllocated:
      std::memset(buffer, 0, length);
      co_return 0;
    case ClusterKind::kUnallocated:
      break;
  }
  co_return co_await read_backing(offset, length, buffer);
}

Task<int> Qcow2Node::write_partial_cluster(uint64_t cluster_start, uint64_t entry,
                                          uint64_t host, uint64_t offset, const uint8_t* data,
                                          uint64_t length, bool fresh) noexcept {
  const bool zero = reads_as_zero(cluster_start, entry);
  if (fresh && zero) co_return co_await file_write(host + (offset - cluster_start), data, length);
  // The old content around the data, and the data, in one write of the whole cluster.
  std::unique_ptr<uint8_t[]> buffer;
  if (spare_clusters_.empty()) {
    buffer = std::make_unique_for_overwrite<uint8_t[]>(cluster_size());
  } else {
    buffer = std::move(spare_clusters_.back());
    spare_clusters_.pop_back();
  }
  int r = 0;
  if (zero) {
    std::memset(buffer.get(), 0, cluster_size());
  } else {
    r = co_await read_old(cluster_start, entry, buffer.get(), cluster_size());
  }
  if (r == 0) {
    std::memcpy(buffer.get() + (offset - cluster_start), data, length);
    r = co_await file_write(host, buffer.get(), cluster_size());
  }
  if (spare_clusters_.size() < kSpareClusters) spare_clusters_.push_back(std::move(buffer));
  co_return r;
}

Task<void> Qcow2Node::wait_not_allocating(uint64_t guest_cluster) noexcept {
  while (allocating_.count(guest_cluster)) co_await allocation_done_.wait();
}

Task<void> Qcow2Node::drain_allocations() noexcept {
  while (allocations_in_flight_ > 0) co_await allocation_done_.wait();
}

Task<int> Qcow2Node::write_slow(uint64_t& pos, uint64_t end, const uint8_t*& data) noexcept {
  co_await lock_.lock();
  ExclusiveGuard guard(lock_);
  const uint64_t guest_cluster = pos >> cluster_bits_;
  const uint64_t in = offset_in_cluster(pos);
  co_await wait_not_allocating(guest_cluster);
  TablePtr l2;
  if (int r = co_await writable_l2(guest_cluster / l2_entries_, l2); r < 0) co_return r;
  const uint64_t index = guest_cluster % l2_entries_;
  const uint64_t entry = l2->entry(index);
  if (!check_l2_entry(entry, header_.version, cluster_bits_, host_end_).empty()) co_return -EIO;
  const ClusterKind kind = classify_l2_entry(entry, header_.version);
  const uint64_t host = entry & kOffsetMask;
  const bool owned = (entry & kEntryCopied) && !overlaps_metadata(host);
  if (owned && (kind == ClusterKind::kNormal || kind == ClusterKind::kZeroAllocated)) {
    // In place (the shared path declined only because the L1 entry was not marked COPIED yet).
    const uint64_t n = std::min(cluster_size() - in, end - pos);
    if (kind == ClusterKind::kNormal) {
      if (int r = co_await file_write(host + in, data, n); r < 0) co_return r;
    } else {
      // A preallocated zero cluster: fill it and drop the zero flag.
      std::memset(cow_buffer_.data(), 0, cluster_size());
      std::memcpy(cow_buffer_.data() + in, data, n);
      if (int r = co_await file_write(host, cow_buffer_.data(), cluster_size()); r < 0) co_return r;
      l2->set_entry(index, host | kEntryCopied);
    }
    pos += n;
    data += n;
    co_return co_await trim_caches();
  }

  // New host clusters for a run of guest clusters of this L2 table that all need one, as far as
  // the request goes: one contiguous data write.
  const uint64_t last_cluster = (end - 1) >> cluster_bits_;
  const uint64_t limit = std::min({l2_entries_ - index, last_cluster - guest_cluster + 1,
                                   std::max<uint64_t>(file().max_transfer() >> cluster_bits_, 1)});
  uint64_t count = 1;
  while (count < limit) {
    const uint64_t next = l2->entry(index + count);
    if (!check_l2_entry(next, header_.version, cluster_bits_, host_end_).empty()) break;
    const ClusterKind next_kind = classify_l2_entry(next, header_.version);
    if ((next & kEntryCopied) &&
        (next_kind == ClusterKind::kNormal || next_kind == ClusterKind::kZeroAllocated)) {
      break;
    }
    if (allocating_.count(guest_cluster + count)) break;
    ++count;
  }
  bool fresh = false;
  const int64_t allocated = co_await allocate_clusters(count, &fresh);
  if (allocated < 0) co_return static_cast<int>(allocated);
  const uint64_t target = static_cast<uint64_t>(allocated);
  for (uint64_t i = 0; i < count; ++i) allocating_.insert(guest_cluster + i);
  ++allocations_in_flight_;
  ++l2->pins;
  guard.release();

  // The data, and what the first and last clusters keep of their old content around it.
  const uint64_t start = guest_cluster << cluster_bits_;
  const uint64_t stop = (guest_cluster + count) << cluster_bits_;
  const uint64_t data_end = std::min(end, stop);
  uint64_t at = pos;
  const uint8_t* from = data;
  int r = 0;
  if (in > 0 || data_end < start + cluster_size()) {
    const uint64_t n = std::min(data_end, start + cluster_size()) - pos;
    r = co_await write_partial_cluster(start, l2->entry(index), target, pos, from, n, fresh);
    at += n;
    from += n;
  }
  // Whole clusters straight from the caller's buffer, then a partial last one.
  const uint64_t whole_end = data_end == stop ? stop : data_end & ~(cluster_size() - 1);
  if (r == 0 && whole_end > at) {
    r = co_await file_write(target + (at - start), from, whole_end - at);
    from += whole_end - at;
    at = whole_end;
  }
  if (r == 0 && at < data_end) {
    r = co_await write_partial_cluster(at, l2->entry(index + count - 1), target + (at - start), at,
                                       from, data_end - at, fresh);
  }

  // Switch the entries (no suspension from here on, so no lock is needed).
  for (uint64_t i = 0; i < count; ++i) {
    if (r == 0) {
      const uint64_t old = l2->entry(index + i);
      l2->set_entry(index + i, (target + (i << cluster_bits_)) | kEntryCopied);
      defer_free_entry(old, DiscardKind::kOther);
    }
    allocating_.erase(guest_cluster + i);
  }
  if (r < 0) {
    // Nothing references the new clusters: their refcounts drop with the next metadata flush.
    defer_free(target, count << cluster_bits_, DiscardKind::kOther);
  }
  --l2->pins;
  --allocations_in_flight_;
  allocation_done_.notify_all();
  if (r < 0) co_return r;
  data += data_end - pos;
  pos = data_end;
  if (l2_cache_.over_capacity() || refblock_cache_.over_capacity()) {
    co_await lock_.lock();
    ExclusiveGuard trim_guard(lock_);
    co_return co_await trim_caches();
  }
  co_return 0;
}

Task<int64_t> Qcow2Node::write(uint64_t offset, uint64_t length, const void* buffer,
                               uint32_t flags) noexcept {
  const uint64_t size = header_.size;
  if (offset > size || length > size - offset) co_return -EINVAL;
  if (read_only()) co_return -EROFS;
  const auto* in = static_cast<const uint8_t*>(buffer);
  uint64_t pos = offset;
  const uint64_t end = offset + length;
  while (pos < end) {
    // Clusters this image owns exclusively are written in place under the shared lock.
    {
      if (!lock_.try_lock_shared()) co_await lock_.lock_shared();
      SharedGuard guard(lock_);
      while (pos < end) {
        uint64_t n = std::min(cluster_size() - offset_in_cluster(pos), end - pos);
        uint64_t entry;
        if (!writable_in_place(pos >> cluster_bits_)) {
          // Maybe only because its L2 table is not cached.
          if (!(l1_[(pos >> cluster_bits_) / l2_entries_] & kEntryCopied)) break;
          if (int r = co_await lookup(pos >> cluster_bits_, entry); r < 0) co_return r;
          if (!writable_in_place(pos >> cluster_bits_)) break;
        }
        (void)lookup_cached(pos >> cluster_bits_, entry);
        const uint64_t base = entry & kOffsetMask;
        const uint64_t host = base + offset_in_cluster(pos);
        // Extend over the following clusters stored right after it (cached tables only).
        const uint64_t max = file().max_transfer();
        while (pos + n < end && n < max) {
          const uint64_t next = (pos + n) >> cluster_bits_;
          uint64_t next_entry;
          if (!writable_in_place(next) || lookup_cached(next, next_entry) != 1 ||
              (next_entry & kOffsetMask) != host + n) {
            break;
          }
          n += std::min(cluster_size(), end - pos - n);
        }
        n = std::min(n, max);
        const int64_t r = co_await file().write(host, n, in, 0);
        if (r < 0) co_return r;
        pos += n;
        in += n;
      }
      l2_cache_.trim();
      refblock_cache_.trim();
    }
    if (pos < end) {
      if (int r = co_await write_slow(pos, end, in); r < 0) co_return r;
    }
  }
  if (flags & block::kRequestFua) {
    if (int64_t r = co_await flush(); r < 0) co_return r;
  }
  co_return static_cast<int64_t>(length);
}

Task<int64_t> Qcow2Node::flush() noexcept {
  if (read_only()) co_return 0;
  co_await lock_.lock();
  ExclusiveGuard guard(lock_);
  if (int r = co_await flush_metadata(); r < 0) co_return r;
  co_return co_await file_sync();
}

Task<int> Qcow2Node::zero_cluster(uint64_t guest_cluster, bool unmap) noexcept {
  co_await wait_not_allocating(guest_cluster);
  TablePtr l2;
  if (int r = co_await writable_l2(guest_cluster / l2_entries_, l2); r < 0) co_return r;
  const uint64_t index = guest_cluster % l2_entries_;
  const uint64_t entry = l2->entry(index);
  if (!check_l2_entry(entry, header_.version, cluster_bits_, host_end_).empty()) co_return -EIO;
  const ClusterKind kind = classify_l2_entry(entry, header_.version);
  if (kind == ClusterKind::kZeroPlain) co_return 0;
  if (!unmap && (kind == ClusterKind::kNormal || kind == ClusterKind::kZeroAllocated) &&
      (entry & kEntryCopied)) {
    l2->set_entry(index, (entry & kOffsetMask) | kEntryCopied | kEntryZero);  // keep the space
    co_return 0;
  }
  l2->set_entry(index, kEntryZero);
  defer_free_entry(entry, DiscardKind::kRequest);
  co_return 0;
}

Task<int64_t> Qcow2Node::write_zeroes(uint64_t offset, uint64_t length, uint32_t flags) noexcept {
  const uint64_t size = header_.size;
  if (offset > size || length > size - offset) co_return -EINVAL;
  if (read_only()) co_return -EROFS;
  if (options_.discard != "unmap") flags &= ~block::kRequestMayUnmap;
  const uint64_t end = offset + length;
  // Whole clusters (and a tail that ends at the end of the disk) get the zero flag; partial
  // ones are written with zeroes. Version 2 has no zero flag.
  uint64_t pos = offset;
  while (pos < end) {
    const uint64_t in = offset_in_cluster(pos);
    const uint64_t n = std::min(cluster_size() - in, end - pos);
    const bool whole = in == 0 && (n == cluster_size() || pos + n == size);
    if (!whole || header_.version < kVersion3) {
      if (flags & block::kRequestNoFallback) co_return -ENOTSUP;
      std::vector<uint8_t> zeroes(n, 0);
      if (int64_t r = co_await write(pos, n, zeroes.data(), 0); r < 0) co_return r;
    } else {
      co_await lock_.lock();
      ExclusiveGuard guard(lock_);
      if (int r = co_await zero_cluster(pos >> cluster_bits_, flags & block::kRequestMayUnmap);
          r < 0) {
        co_return r;
      }
      if (int r = co_await trim_caches(); r < 0) co_return r;
    }
    pos += n;
  }
  if (flags & block::kRequestFua) {
    if (int64_t r = co_await flush(); r < 0) co_return r;
  }
  co_return static_cast<int64_t>(length);
}

Task<int> Qcow2Node::discard_cluster(uint64_t guest_cluster) noexcept {
  co_await wait_not_allocating(guest_cluster);
  uint64_t entry;
  if (int r = co_await lookup(guest_cluster, entry); r < 0) co_return r;
  const ClusterKind kind = classify_l2_entry(entry, header_.version);
  // With a backing file, a discarded cluster must not show the backing data again (version 3:
  // zero flag); without one, unallocated reads as zeroes anyway.
  const bool keep_zero = backing() != nullptr && header_.version >= kVersion3;
  if (kind == ClusterKind::kUnallocated && !keep_zero) co_return 0;
  if (kind == ClusterKind::kZeroPlain) co_return 0;
  TablePtr l2;
  if (int r = co_await writable_l2(guest_cluster / l2_entries_, l2); r < 0) co_return r;
  const uint64_t index = guest_cluster % l2_entries_;
  entry = l2->entry(index);
  l2->set_entry(index, keep_zero ? kEntryZero : 0);
  defer_free_entry(entry, DiscardKind::kRequest);
  co_return 0;
}

Task<int64_t> Qcow2Node::discard(uint64_t offset, uint64_t length) noexcept {
  const uint64_t size = header_.size;
  if (offset > size || length > size - offset) co_return -EINVAL;
  if (options_.discard != "unmap") co_return 0;
  if (read_only()) co_return -EROFS;
  // Only whole clusters (or the last, partial one) are discarded; the rest is left as it is.
  uint64_t first = (offset + cluster_size() - 1) >> cluster_bits_;
  uint64_t end = offset + length;
  uint64_t last = end == size ? div_round_up(end, cluster_size()) : end >> cluster_bits_;
  if (first >= last) co_return 0;
  co_await lock_.lock();
  ExclusiveGuard guard(lock_);
  for (uint64_t cluster = first; cluster < last; ++cluster) {
    if (int r = co_await discard_cluster(cluster); r < 0) co_return r;
  }
  if (int r = co_await trim_caches(); r < 0) co_return r;
  co_return 0;
}

}  // namespace qcow2

Expected<std::shared_ptr<block::Node>> open_qcow2_node(
    block::NodeOptions common, const Qcow2Options& options, std::shared_ptr<block::Node> file,
    const OpenBackingFile& open_backing, Loop& loop,
    const std::function<Status(Task<Status>)>& run) {
  auto node = std::make_shared<qcow2::Qcow2Node>(std::move(common), options);
  node->set_loop(loop);
  auto child = node->add_child("file", std::move(file));
  if (!child) return child.status();
  BLOCKD_RETURN_IF_ERROR(run(node->load()));
  BLOCKD_RETURN_IF_ERROR(node->attach_backing(options, open_backing));
  return std::shared_ptr<block::Node>(std::move(node));
}

Qcow2Snapshots* qcow2_snapshots(block::Node& node) {
  return dynamic_cast<qcow2::Qcow2Node*>(&node);
}

}  // namespace blockd::drivers
