// The qcow2 on-disk layout; see format.h.
#include "drivers/qcow2/format.h"

#include <algorithm>
#include <cinttypes>
#include <cstring>

namespace blockd::drivers::qcow2 {
namespace {

std::string hex(uint64_t value) {
  char text[32];
  std::snprintf(text, sizeof text, "%" PRIx64, value);
  return text;
}

uint64_t align_up(uint64_t value, uint64_t alignment) {
  return (value + alignment - 1) / alignment * alignment;
}

bool aligned(uint64_t value, uint32_t cluster_bits) {
  return (value & ((uint64_t{1} << cluster_bits) - 1)) == 0;
}

// Checks that a table of `bytes` bytes at `offset` is cluster aligned and fits in the file.
Status check_table(uint64_t offset, uint64_t bytes, uint32_t cluster_bits, uint64_t file_size,
                   std::string_view what) {
  if (offset == 0) {
    return Status::generic("Invalid " + std::string(what) + " offset (0, the image header)");
  }
  if (!aligned(offset, cluster_bits)) {
    return Status::generic("Invalid " + std::string(what) + " offset (not cluster aligned)");
  }
  if (offset > file_size || bytes > file_size - offset) {
    return Status::generic("Invalid " + std::string(what) + " offset (outside the image file)");
  }
  return Status::ok();
}

struct FeatureName {
  FeatureType type;
  uint8_t bit;
  const char* name;
};

// The names QEMU gives the feature bits (they appear in error messages and image info).
constexpr FeatureName kKnownFeatures[] = {
    {FeatureType::kIncompatible, 0, "dirty bit"},
    {FeatureType::kIncompatible, 1, "corrupt bit"},
    {FeatureType::kIncompatible, 2, "external data file"},
    {FeatureType::kIncompatible, 3, "compression type"},
    {FeatureType::kIncompatible, 4, "extended L2 entries"},
    {FeatureType::kCompatible, 0, "lazy refcounts"},
    {FeatureType::kAutoclear, 0, "bitmaps"},
    {FeatureType::kAutoclear, 1, "raw external data"},
};

}  // namespace

uint16_t load_be16(const uint8_t* p) noexcept { return static_cast<uint16_t>(p[0] << 8 | p[1]); }
uint32_t load_be32(const uint8_t* p) noexcept {
  return uint32_t{p[0]} << 24 | uint32_t{p[1]} << 16 | uint32_t{p[2]} << 8 | uint32_t{p[3]};
}
uint64_t load_be64(const uint8_t* p) noexcept {
  return uint64_t{load_be32(p)} << 32 | load_be32(p + 4);
}
void store_be16(uint8_t* p, uint16_t value) noexcept {
  p[0] = static_cast<uint8_t>(value >> 8);
  p[1] = static_cast<uint8_t>(value);
}
void store_be32(uint8_t* p, uint32_t value) noexcept {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(value >> (24 - 8 * i));
}
void store_be64(uint8_t* p, uint64_t value) noexcept {
  store_be32(p, static_cast<uint32_t>(value >> 32));
  store_be32(p + 4, static_cast<uint32_t>(value));
}

std::vector<uint8_t> encode_be64_table(const std::vector<uint64_t>& entries) {
  std::vector<uint8_t> raw(entries.size() * 8);
  for (size_t i = 0; i < entries.size(); ++i) store_be64(&raw[i * 8], entries[i]);
  return raw;
}

// ---- Entries.

ClusterKind classify_l2_entry(uint64_t entry, uint32_t version) noexcept {
  if (entry & kEntryCompressed) return ClusterKind::kCompressed;
  const bool zero = version >= kVersion3 && (entry & kEntryZero);
  const uint64_t host = entry & kOffsetMask;
  if (zero) return host ? ClusterKind::kZeroAllocated : ClusterKind::kZeroPlain;
  return host ? ClusterKind::kNormal : ClusterKind::kUnallocated;
}

CompressedExtent decode_compressed_entry(uint64_t entry, uint32_t cluster_bits) noexcept {
  // The descriptor holds the offset in its low (62 - (cluster_bits - 8)) bits and, above it, the
  // number of additional 512-byte sectors.
  const uint32_t shift = 62 - (cluster_bits - 8);
  const uint64_t offset = entry & ((uint64_t{1} << shift) - 1);
  const uint64_t sectors = ((entry >> shift) & ((uint64_t{1} << (cluster_bits - 8)) - 1)) + 1;
  CompressedExtent extent;
  extent.host_offset = offset;
  extent.length = sectors * kCompressedSectorSize - (offset % kCompressedSectorSize);
  return extent;
}

bool compressed_offset_fits(uint64_t host_offset, uint32_t cluster_bits) noexcept {
  const uint32_t shift = 62 - (cluster_bits - 8);
  return host_offset < (uint64_t{1} << std::min(shift, 56u));
}

uint64_t encode_compressed_entry(uint64_t host_offset, uint64_t length,
                                 uint32_t cluster_bits) noexcept {
  const uint32_t shift = 62 - (cluster_bits - 8);
  const uint64_t first_sector = host_offset / kCompressedSectorSize;
  const uint64_t last_sector = (host_offset + length - 1) / kCompressedSectorSize;
  return kEntryCompressed | ((last_sector - first_sector) << shift) | host_offset;
}

uint64_t l1_entries_for(uint64_t virtual_size, uint32_t cluster_bits) noexcept {
  const uint64_t cluster_size = uint64_t{1} << cluster_bits;
  const uint64_t clusters = (virtual_size + cluster_size - 1) >> cluster_bits;
  const uint64_t l2_entries = cluster_size / 8;
  return (clusters + l2_entries - 1) / l2_entries;
}

uint64_t max_refcount(uint32_t refcount_order) noexcept {
  const uint32_t bits = 1u << refcount_order;
  return bits == 64 ? UINT64_MAX : (uint64_t{1} << bits) - 1;
}

uint64_t get_refcount(const uint8_t* block, uint64_t index, uint32_t refcount_order) noexcept {
  const uint32_t bits = 1u << refcount_order;
  if (bits < 8) {
    const uint64_t bit = index * bits;
    return (block[bit / 8] >> (bit % 8)) & ((1u << bits) - 1);
  }
  const uint8_t* p = block + index * (bits / 8);
  switch (bits) {
    case 8:
      return p[0];
    case 16:
      return load_be16(p);
    case 32:
      return load_be32(p);
    default:
      return load_be64(p);
  }
}

void set_refcount(uint8_t* block, uint64_t index, uint32_t refcount_order,
                  uint64_t value) noexcept {
  const uint32_t bits = 1u << refcount_order;
  if (bits < 8) {
    const uint64_t bit = index * bits;
    const uint8_t mask = static_cast<uint8_t>(((1u << bits) - 1) << (bit % 8));
    block[bit / 8] = static_cast<uint8_t>((block[bit / 8] & ~mask) |
                                          ((value << (bit % 8)) & mask));
    return;
  }
  uint8_t* p = block + index * (bits / 8);
  switch (bits) {
    case 8:
      p[0] = static_cast<uint8_t>(value);
      break;
    case 16:
      store_be16(p, static_cast<uint16_t>(value));
      break;
    case 32:
      store_be32(p, static_cast<uint32_t>(value));
      break;
    default:
      store_be64(p, value);
  }
}

std::string check_l1_entry(uint64_t entry, uint32_t cluster_bits, uint64_t file_size) {
  if (entry & kL1ReservedMask) return "L1 entry has reserved bits set (" + hex(entry) + ")";
  const uint64_t offset = entry & kOffsetMask;
  if (offset == 0) return {};
  if (!aligned(offset, cluster_bits)) {
    return "L2 table offset " + hex(offset) + " unaligned";
  }
  if (offset >= file_size || (uint64_t{1} << cluster_bits) > file_size - offset) {
    return "L2 table offset " + hex(offset) + " outside the image file";
  }
  return {};
}

std::string check_l2_entry(uint64_t entry, uint32_t version, uint32_t cluster_bits,
                           uint64_t file_size) {
  if (entry & kEntryCompressed) {
    if (entry & kEntryCopied) return "compressed cluster entry has the COPIED flag set";
    const CompressedExtent extent = decode_compressed_entry(entry, cluster_bits);
    if (extent.host_offset >= file_size) {
      return "compressed cluster offset " + hex(extent.host_offset) + " outside the image file";
    }
    return {};
  }
  if (entry & kL2StandardReservedMask) return "L2 entry has reserved bits set (" + hex(entry) + ")";
  if (version < kVersion3 && (entry & kEntryZero)) {
    return "L2 entry has the zero flag set in a version 2 image";
  }
  const uint64_t offset = entry & kOffsetMask;
  if (offset == 0) {
    if ((entry & kEntryCopied) && !(entry & kEntryZero)) {
      return "L2 entry has the COPIED flag but no cluster offset";
    }
    return {};
  }
  if (!aligned(offset, cluster_bits)) return "cluster offset " + hex(offset) + " unaligned";
  if (offset >= file_size || (uint64_t{1} << cluster_bits) > file_size - offset) {
    return "cluster offset " + hex(offset) + " outside the image file";
  }
  return {};
}

// ---- Header.

std::string Header::backing_format() const {
  const HeaderExtension* extension = find_extension(kExtBackingFormat);
  return extension ? extension->data : std::string();
}

void Header::set_backing_format(std::string_view format) {
  set_extension(kExtBackingFormat, std::string(format));
}

const HeaderExtension* Header::find_extension(uint32_t type) const noexcept {
  for (const HeaderExtension& extension : extensions) {
    if (extension.type == type) return &extension;
  }
  return nullptr;
}

void Header::set_extension(uint32_t type, std::string data) {
  auto it = std::find_if(extensions.begin(), extensions.end(),
                         [&](const HeaderExtension& e) { return e.type == type; });
  if (data.empty()) {
    if (it != extensions.end()) extensions.erase(it);
    return;
  }
  if (it != extensions.end()) {
    it->data = std::move(data);
  } else {
    extensions.push_back({type, std::move(data)});
  }
}

std::vector<uint8_t> Header::encode_fixed() const {
  const uint32_t length = version >= kVersion3 ? std::max(header_length, kHeaderV3MinLength)
                                               : kHeaderV2Length;
  std::vector<uint8_t> out(length, 0);
  uint8_t* p = out.data();
  store_be32(p + 0, kMagic);
  store_be32(p + 4, version);
  store_be64(p + 8, backing_file_offset);
  store_be32(p + 16, backing_file_size);
  store_be32(p + 20, cluster_bits);
  store_be64(p + 24, size);
  store_be32(p + 32, crypt_method);
  store_be32(p + 36, l1_size);
  store_be64(p + 40, l1_table_offset);
  store_be64(p + 48, refcount_table_offset);
  store_be32(p + 56, refcount_table_clusters);
  store_be32(p + 60, nb_snapshots);
  store_be64(p + 64, snapshots_offset);
  if (version >= kVersion3) {
    store_be64(p + 72, incompatible_features);
    store_be64(p + 80, compatible_features);
    store_be64(p + 88, autoclear_features);
    store_be32(p + 96, refcount_order);
    store_be32(p + 100, length);
    if (length > kCompressionTypeOffset) {
      p[kCompressionTypeOffset] = compression_type;
      std::memcpy(p + kCompressionTypeOffset + 1, unknown_fields.data(),
                  std::min<size_t>(unknown_fields.size(), length - kCompressionTypeOffset - 1));
    }
  }
  return out;
}

Expected<std::vector<uint8_t>> Header::encode() const {
  Header copy = *this;
  if (copy.version >= kVersion3) {
    copy.header_length = std::max(copy.header_length, kHeaderV3MinLength);
    if (copy.compression_type != kCompressionZlib) {
      copy.header_length = std::max(copy.header_length, kHeaderV3Length);
    }
  }
  std::vector<uint8_t> fixed;
  // The extension area starts right after the fixed header.
  uint64_t position = copy.version >= kVersion3 ? copy.header_length : kHeaderV2Length;
  for (const HeaderExtension& extension : copy.extensions) {
    position += 8 + align_up(extension.data.size(), 8);
  }
  position += 8;  // end marker
  copy.backing_file_offset = copy.backing_file.empty() ? 0 : position;
  copy.backing_file_size = static_cast<uint32_t>(copy.backing_file.size());
  const uint64_t total = position + copy.backing_file.size();
  if (copy.backing_file.size() > kMaxBackingFileNameLength) {
    return Status::generic("Backing file name too long");
  }
  if (total > cluster_size()) {
    return Status::generic("qcow2 header, extensions and backing file name exceed the cluster size");
  }
  std::vector<uint8_t> out(cluster_size(), 0);
  fixed = copy.encode_fixed();
  std::memcpy(out.data(), fixed.data(), fixed.size());
  uint64_t at = fixed.size();
  for (const HeaderExtension& extension : copy.extensions) {
    store_be32(&out[at], extension.type);
    store_be32(&out[at + 4], static_cast<uint32_t>(extension.data.size()));
    std::memcpy(&out[at + 8], extension.data.data(), extension.data.size());
    at += 8 + align_up(extension.data.size(), 8);
  }
  at += 8;  // the end marker is all zeroes
  std::memcpy(&out[at], copy.backing_file.data(), copy.backing_file.size());
  return out;
}

Expected<Header> parse_header(std::span<const uint8_t> bytes, uint64_t file_size) {
  if (bytes.size() < kHeaderV2Length || load_be32(bytes.data()) != kMagic) {
    return Status::generic("Image is not in qcow2 format");
  }
  const uint8_t* p = bytes.data();
  Header h;
  h.version = load_be32(p + 4);
  if (h.version != kVersion2 && h.version != kVersion3) {
    return Status::generic("Unsupported qcow2 version " + std::to_string(h.version));
  }
  h.backing_file_offset = load_be64(p + 8);
  h.backing_file_size = load_be32(p + 16);
  h.cluster_bits = load_be32(p + 20);
  h.size = load_be64(p + 24);
  h.crypt_method = load_be32(p + 32);
  h.l1_size = load_be32(p + 36);
  h.l1_table_offset = load_be64(p + 40);
  h.refcount_table_offset = load_be64(p + 48);
  h.refcount_table_clusters = load_be32(p + 56);
  h.nb_snapshots = load_be32(p + 60);
  h.snapshots_offset = load_be64(p + 64);

  if (h.cluster_bits < kMinClusterBits || h.cluster_bits > kMaxClusterBits) {
    return Status::generic("Unsupported cluster size: 2^" + std::to_string(h.cluster_bits));
  }
  const uint64_t cluster_size = h.cluster_size();
  if (bytes.size() < std::min(cluster_size, file_size)) {
    return Status::generic("qcow2 header is truncated (the first cluster is incomplete)");
  }

  if (h.version == kVersion2) {
    h.refcount_order = kDefaultRefcountOrder;
    h.header_length = kHeaderV2Length;
  } else {
    if (bytes.size() < kHeaderV3MinLength) return Status::generic("qcow2 header too short");
    h.incompatible_features = load_be64(p + 72);
    h.compatible_features = load_be64(p + 80);
    h.autoclear_features = load_be64(p + 88);
    h.refcount_order = load_be32(p + 96);
    h.header_length = load_be32(p + 100);
    if (h.header_length < kHeaderV3MinLength) return Status::generic("qcow2 header too short");
    if (h.header_length % 8 != 0) {
      return Status::generic("qcow2 header length " + std::to_string(h.header_length) +
                             " is not a multiple of 8");
    }
    if (h.header_length > cluster_size) {
      return Status::generic("qcow2 header exceeds cluster size");
    }
    if (h.header_length > bytes.size()) return Status::generic("qcow2 header is truncated");
    if (h.header_length > kCompressionTypeOffset) {
      h.compression_type = p[kCompressionTypeOffset];
      h.unknown_fields.assign(reinterpret_cast<const char*>(p) + kCompressionTypeOffset + 1,
                              h.header_length - kCompressionTypeOffset - 1);
    }
  }
  if (h.refcount_order > kMaxRefcountOrder) {
    return Status::generic("Reference count entry width too large; may not exceed 64 bits");
  }
  if (h.compression_type > kCompressionZstd) {
    return Status::generic("Unknown compression type " + std::to_string(h.compression_type));
  }
  if ((h.compression_type != kCompressionZlib) !=
      ((h.incompatible_features & kIncompatCompression) != 0)) {
    return Status::generic(h.compression_type != kCompressionZlib
                               ? "Invalid compression type: the compression type incompatible "
                                 "feature bit is not set"
                               : "Invalid compression type: the compression type incompatible "
                                 "feature bit is set but the type is zlib");
  }
  if (h.crypt_method > kCryptLuks) {
    return Status::generic("Unsupported encryption method: " + std::to_string(h.crypt_method));
  }

  // Header extensions: from the end of the fixed header up to the backing file name (or the end
  // of the first cluster).
  uint64_t extensions_end = cluster_size;
  if (h.backing_file_offset != 0) {
    if (h.backing_file_offset < h.header_length || h.backing_file_offset > cluster_size) {
      return Status::generic("Invalid backing file offset");
    }
    extensions_end = h.backing_file_offset;
  }
  extensions_end = std::min<uint64_t>(extensions_end, bytes.size());
  uint64_t at = h.header_length;
  bool found_end = false;
  while (at + 8 <= extensions_end) {
    const uint32_t type = load_be32(p + at);
    const uint32_t length = load_be32(p + at + 4);
    at += 8;
    if (type == kExtEnd) {
      found_end = true;
      break;
    }
    if (length > extensions_end - at) {
      return Status::generic("Header extension 0x" + hex(type) + " is too long (" +
                             std::to_string(length) + " bytes)");
    }
    HeaderExtension extension{type, std::string(reinterpret_cast<const char*>(p) + at, length)};
    if (type == kExtBackingFormat && length > 1023) {
      return Status::generic("Backing file format name too long");
    }
    h.extensions.push_back(std::move(extension));
    at += align_up(length, 8);
  }
  if (!found_end && at < extensions_end) {
    return Status::generic("Header extension area is truncated");
  }

  if (h.backing_file_offset != 0) {
    if (h.backing_file_size > kMaxBackingFileNameLength ||
        h.backing_file_size > cluster_size - h.backing_file_offset) {
      return Status::generic("Backing file name too long");
    }
    if (h.backing_file_offset + h.backing_file_size > bytes.size()) {
      return Status::generic("Backing file name lies outside the image file");
    }
    h.backing_file.assign(reinterpret_cast<const char*>(p) + h.backing_file_offset,
                          h.backing_file_size);
  }

  // Tables.
  if (h.refcount_table_clusters == 0) {
    return Status::generic("Image does not contain a reference count table");
  }
  if ((uint64_t{h.refcount_table_clusters} << h.cluster_bits) > kMaxRefcountTableBytes) {
    return Status::generic("Reference count table too large");
  }
  BLOCKD_RETURN_IF_ERROR(check_table(h.refcount_table_offset,
                                     uint64_t{h.refcount_table_clusters} << h.cluster_bits,
                                     h.cluster_bits, file_size, "reference count table"));
  if (uint64_t{h.l1_size} * 8 > kMaxL1TableBytes) {
    return Status::generic("Active L1 table too large");
  }
  if (h.size > (UINT64_MAX >> 2)) return Status::generic("Image is too big");
  if (h.l1_size < l1_entries_for(h.size, h.cluster_bits)) {
    return Status::generic("L1 table is too small");
  }
  if (h.l1_size > 0) {
    BLOCKD_RETURN_IF_ERROR(check_table(h.l1_table_offset, uint64_t{h.l1_size} * 8, h.cluster_bits,
                                       file_size, "L1 table"));
  } else if (!aligned(h.l1_table_offset, h.cluster_bits)) {
    return Status::generic("Invalid L1 table offset (not cluster aligned)");
  }
  if (h.nb_snapshots > kMaxSnapshots) return Status::generic("Too many snapshots");
  if (h.nb_snapshots > 0) {
    BLOCKD_RETURN_IF_ERROR(check_table(h.snapshots_offset, uint64_t{h.nb_snapshots} *
                                                              kSnapshotFixedSize,
                                       h.cluster_bits, file_size, "snapshot table"));
  }
  if ((h.incompatible_features & kIncompatExtendedL2) && h.cluster_bits < 14) {
    return Status::generic("Extended L2 entries need a cluster size of at least 16 KiB");
  }
  if ((h.autoclear_features & kAutoclearDataFileRaw) &&
      !(h.incompatible_features & kIncompatDataFile)) {
    return Status::generic("data-file-raw requires a data file");
  }
  return h;
}

std::string unknown_incompatible_features(const Header& header) {
  const uint64_t unknown = header.incompatible_features & ~kIncompatKnown;
  if (unknown == 0) return {};
  // Collect names from the image's feature name table(s).
  std::string names;
  uint64_t named = 0;
  for (const HeaderExtension& extension : header.extensions) {
    if (extension.type != kExtFeatureTable) continue;
    for (size_t at = 0; at + kFeatureNameEntrySize <= extension.data.size();
         at += kFeatureNameEntrySize) {
      const auto type = static_cast<uint8_t>(extension.data[at]);
      const auto bit = static_cast<uint8_t>(extension.data[at + 1]);
      if (type != static_cast<uint8_t>(FeatureType::kIncompatible) || bit >= 64) continue;
      const uint64_t mask = uint64_t{1} << bit;
      if (!(unknown & mask) || (named & mask)) continue;
      std::string name(extension.data.data() + at + 2, kFeatureNameLength);
      name.resize(std::strlen(name.c_str()));
      if (!names.empty()) names += ", ";
      names += name;
      named |= mask;
    }
  }
  if (unknown & ~named) {
    if (!names.empty()) names += ", ";
    names += "Unknown incompatible feature: " + hex(unknown & ~named);
  }
  return names;
}

std::string standard_feature_name_table() {
  std::string table;
  for (const FeatureName& feature : kKnownFeatures) {
    std::string entry(kFeatureNameEntrySize, '\0');
    entry[0] = static_cast<char>(feature.type);
    entry[1] = static_cast<char>(feature.bit);
    std::memcpy(entry.data() + 2, feature.name, std::strlen(feature.name));
    table += entry;
  }
  return table;
}

// ---- Snapshots.

Expected<std::vector<SnapshotEntry>> parse_snapshot_table(std::span<const uint8_t> bytes,
                                                          uint32_t count, const Header& header,
                                                          uint64_t file_size) {
  std::vector<SnapshotEntry> entries;
  entries.reserve(std::min<uint32_t>(count, 1024));
  uint64_t at = 0;
  for (uint32_t i = 0; i < count; ++i) {
    const std::string where = "Snapshot table entry " + std::to_string(i);
    if (bytes.size() - at < kSnapshotFixedSize) {
      return Status::generic(where + " lies outside the snapshot table");
    }
    const uint8_t* p = bytes.data() + at;
    SnapshotEntry s;
    s.l1_table_offset = load_be64(p);
    s.l1_size = load_be32(p + 8);
    const uint16_t id_length = load_be16(p + 12);
    const uint16_t name_length = load_be16(p + 14);
    s.date_sec = load_be32(p + 16);
    s.date_nsec = load_be32(p + 20);
    s.vm_clock_nsec = load_be64(p + 24);
    s.vm_state_size = load_be32(p + 32);
    s.extra_data_size = load_be32(p + 36);
    at += kSnapshotFixedSize;
    if (s.extra_data_size > kMaxSnapshotExtraData) {
      return Status::generic(where + ": extra data too large");
    }
    const uint64_t variable = uint64_t{s.extra_data_size} + id_length + name_length;
    if (bytes.size() - at < variable) {
      return Status::generic(where + " lies outside the snapshot table");
    }
    const uint8_t* extra = bytes.data() + at;
    s.disk_size = header.size;
    if (s.extra_data_size >= 8) s.vm_state_size = load_be64(extra);
    if (s.extra_data_size >= 16) {
      s.disk_size = load_be64(extra + 8);
    } else if (header.version >= kVersion3) {
      return Status::generic(where + ": extra data too small (a version 3 image must record the "
                             "snapshot's disk size)");
    }
    if (s.extra_data_size >= 24) s.icount = load_be64(extra + 16);
    if (s.extra_data_size > kSnapshotExtraDataSize) {
      s.unknown_extra.assign(reinterpret_cast<const char*>(extra) + kSnapshotExtraDataSize,
                             s.extra_data_size - kSnapshotExtraDataSize);
    }
    at += s.extra_data_size;
    s.id.assign(reinterpret_cast<const char*>(bytes.data() + at), id_length);
    at += id_length;
    s.name.assign(reinterpret_cast<const char*>(bytes.data() + at), name_length);
    at += name_length;
    at = align_up(at, 8);
    if (at > bytes.size()) at = bytes.size();

    if (uint64_t{s.l1_size} * 8 > kMaxL1TableBytes) {
      return Status::generic(where + ": L1 table too large");
    }
    if (s.l1_size > 0) {
      Status status = check_table(s.l1_table_offset, uint64_t{s.l1_size} * 8, header.cluster_bits,
                                  file_size, "snapshot L1 table");
      if (!status) return status.with_prefix(where);
    }
    entries.push_back(std::move(s));
  }
  return entries;
}

uint64_t snapshot_table_size(const std::vector<SnapshotEntry>& entries) noexcept {
  uint64_t total = 0;
  for (const SnapshotEntry& s : entries) {
    const uint64_t extra =
        std::max<uint64_t>(s.extra_data_size, kSnapshotExtraDataSize + s.unknown_extra.size());
    total += align_up(kSnapshotFixedSize + extra + s.id.size() + s.name.size(), 8);
  }
  return total;
}

std::vector<uint8_t> encode_snapshot_table(const std::vector<SnapshotEntry>& entries) {
  std::vector<uint8_t> out(snapshot_table_size(entries), 0);
  uint64_t at = 0;
  for (const SnapshotEntry& s : entries) {
    const uint32_t extra = static_cast<uint32_t>(std::max<uint64_t>(
        s.extra_data_size, kSnapshotExtraDataSize + s.unknown_extra.size()));
    uint8_t* p = out.data() + at;
    store_be64(p, s.l1_table_offset);
    store_be32(p + 8, s.l1_size);
    store_be16(p + 12, static_cast<uint16_t>(s.id.size()));
    store_be16(p + 14, static_cast<uint16_t>(s.name.size()));
    store_be32(p + 16, s.date_sec);
    store_be32(p + 20, s.date_nsec);
    store_be64(p + 24, s.vm_clock_nsec);
    store_be32(p + 32, static_cast<uint32_t>(std::min<uint64_t>(s.vm_state_size, UINT32_MAX)));
    store_be32(p + 36, extra);
    store_be64(p + 40, s.vm_state_size);
    store_be64(p + 48, s.disk_size);
    store_be64(p + 56, s.icount);
    std::memcpy(p + 64, s.unknown_extra.data(), s.unknown_extra.size());
    uint64_t cursor = kSnapshotFixedSize + extra;
    std::memcpy(p + cursor, s.id.data(), s.id.size());
    cursor += s.id.size();
    std::memcpy(p + cursor, s.name.data(), s.name.size());
    cursor += s.name.size();
    at += align_up(cursor, 8);
  }
  return out;
}

}  // namespace blockd::drivers::qcow2
