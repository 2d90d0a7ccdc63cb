// The qcow2 on-disk layout: constants, and big-endian encoding and decoding of the header, its
// extensions, the snapshot table, L1/L2 entries and refcount entries.
//
// Implements the data structures of QEMU's docs/interop/qcow2.txt ("Header", "Header extensions",
// "Feature name table", "Host cluster management", "Cluster mapping", "Snapshots"). Nothing here
// does I/O: callers read bytes from the image, hand them to a parse_* function, and write what an
// encode_* function returns. Every parser takes untrusted bytes and returns an Expected whose
// error names the field that is wrong; none of them throws, crashes or reads past its input.
//
// Typical use when creating an image (the blockdev-create job):
//
//   qcow2::Header header;                // version 3, 64 KiB clusters, 16-bit refcounts
//   header.size = 1 << 30;
//   header.l1_size = qcow2::l1_entries_for(header.size, header.cluster_bits);
//   header.l1_table_offset = ...; header.refcount_table_offset = ...; ...
//   std::vector<uint8_t> first_cluster = header.encode();   // header, extensions, backing name
//
// and when opening one:
//
//   auto header = qcow2::parse_header(first_cluster_bytes, file_size);
//   if (!header) return header.status();  // "qcow2: Unsupported cluster size: 2^8", ...
//
// Thread-safety: plain values and pure functions; any thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/status.h"

namespace blockd::drivers::qcow2 {

// ---- Header constants.

constexpr uint32_t kMagic = 0x514649fb;  // "QFI\xfb"
constexpr uint32_t kVersion2 = 2;
constexpr uint32_t kVersion3 = 3;
constexpr uint32_t kHeaderV2Length = 72;       // a version 2 header is exactly this long
constexpr uint32_t kHeaderV3MinLength = 104;   // a version 3 header is at least this long
constexpr uint32_t kHeaderV3Length = 112;      // what we write: up to compression_type, padded
constexpr uint32_t kCompressionTypeOffset = 104;

constexpr uint32_t kMinClusterBits = 9;   // 512 B
constexpr uint32_t kMaxClusterBits = 21;  // 2 MiB (QEMU's limit)
constexpr uint32_t kDefaultClusterBits = 16;
constexpr uint32_t kMaxRefcountOrder = 6;  // 64-bit refcounts
constexpr uint32_t kDefaultRefcountOrder = 4;
constexpr uint32_t kMaxBackingFileNameLength = 1023;
// QEMU's implementation limits, which we share so that every image we accept QEMU accepts too.
constexpr uint64_t kMaxL1TableBytes = 32u << 20;
constexpr uint64_t kMaxRefcountTableBytes = 8u << 20;
constexpr uint32_t kMaxSnapshots = 65536;
constexpr uint64_t kMaxSnapshotTableBytes = 64u << 20;
constexpr uint32_t kMaxSnapshotExtraData = 1024;

// crypt_method values.
constexpr uint32_t kCryptNone = 0;
constexpr uint32_t kCryptAes = 1;
constexpr uint32_t kCryptLuks = 2;

// compression_type values.
constexpr uint8_t kCompressionZlib = 0;
constexpr uint8_t kCompressionZstd = 1;

// Incompatible feature bits: an image with an unknown one must not be opened.
constexpr uint64_t kIncompatDirty = 1ull << 0;
constexpr uint64_t kIncompatCorrupt = 1ull << 1;
constexpr uint64_t kIncompatDataFile = 1ull << 2;
constexpr uint64_t kIncompatCompression = 1ull << 3;
constexpr uint64_t kIncompatExtendedL2 = 1ull << 4;
constexpr uint64_t kIncompatKnown = (1ull << 5) - 1;
// Compatible feature bits: unknown ones may be ignored.
constexpr uint64_t kCompatLazyRefcounts = 1ull << 0;
// Autoclear feature bits: whoever writes the image must clear the ones it does not know.
constexpr uint64_t kAutoclearBitmaps = 1ull << 0;
constexpr uint64_t kAutoclearDataFileRaw = 1ull << 1;
constexpr uint64_t kAutoclearKnown = (1ull << 2) - 1;

// Header extension types.
constexpr uint32_t kExtEnd = 0x00000000;
constexpr uint32_t kExtBackingFormat = 0xe2792aca;
constexpr uint32_t kExtFeatureTable = 0x6803f857;
constexpr uint32_t kExtBitmaps = 0x23852875;
constexpr uint32_t kExtCryptoHeader = 0x0537be77;
constexpr uint32_t kExtDataFile = 0x44415441;

// Feature name table entry: 1 byte type, 1 byte bit, 46 bytes name.
constexpr uint32_t kFeatureNameEntrySize = 48;
constexpr uint32_t kFeatureNameLength = 46;
enum class FeatureType : uint8_t { kIncompatible = 0, kCompatible = 1, kAutoclear = 2 };

// ---- L1 / L2 / refcount table entries.

constexpr uint64_t kEntryCopied = 1ull << 63;      // L1 and standard L2: refcount is exactly one
constexpr uint64_t kEntryCompressed = 1ull << 62;  // L2: compressed cluster descriptor
constexpr uint64_t kEntryZero = 1ull << 0;         // standard L2 (v3): reads as zeroes
constexpr uint64_t kOffsetMask = 0x00fffffffffffe00ull;  // bits 9-55: host offset
constexpr uint64_t kL1ReservedMask = 0x7f000000000001ffull;
constexpr uint64_t kL2StandardReservedMask = 0x3f000000000001feull;
constexpr uint64_t kRefcountTableReservedMask = 0x1ffull;
constexpr uint32_t kCompressedSectorSize = 512;

// What a standard or compressed L2 entry describes.
enum class ClusterKind {
  kUnallocated,     // reads from the backing file (or zeroes)
  kZeroPlain,       // reads as zeroes, no host cluster
  kZeroAllocated,   // reads as zeroes, host cluster preallocated
  kNormal,          // data at host offset
  kCompressed,      // compressed data somewhere in the file
};

// Classifies a (non-extended) L2 entry. The zero flag counts only for version 3 images.
ClusterKind classify_l2_entry(uint64_t entry, uint32_t version) noexcept;

// Where a compressed cluster's bytes are: from `host_offset`, at most `length` bytes (the
// compressed stream may end earlier; it may spill into the next host cluster).
struct CompressedExtent {
  uint64_t host_offset = 0;
  uint64_t length = 0;
};
CompressedExtent decode_compressed_entry(uint64_t entry, uint32_t cluster_bits) noexcept;
// Builds a compressed L2 entry for `length` bytes at `host_offset` (length > 0). The caller must
// keep host_offset within the descriptor's offset field (checked with compressed_offset_fits).
uint64_t encode_compressed_entry(uint64_t host_offset, uint64_t length,
                                 uint32_t cluster_bits) noexcept;
bool compressed_offset_fits(uint64_t host_offset, uint32_t cluster_bits) noexcept;

// Number of L1 entries needed to map `virtual_size` bytes.
uint64_t l1_entries_for(uint64_t virtual_size, uint32_t cluster_bits) noexcept;

// Reads entry `index` of a refcount block whose entries are (1 << refcount_order) bits wide.
// Sub-byte entries are packed from the least significant bit of each byte; wider ones are big
// endian. `block` must hold at least one cluster; index < cluster_size * 8 >> refcount_order.
uint64_t get_refcount(const uint8_t* block, uint64_t index, uint32_t refcount_order) noexcept;
// Writes entry `index`; `value` must fit in the entry width (see max_refcount).
void set_refcount(uint8_t* block, uint64_t index, uint32_t refcount_order, uint64_t value) noexcept;
// Largest refcount an entry of this width holds.
uint64_t max_refcount(uint32_t refcount_order) noexcept;

// ---- Big-endian helpers (unaligned access is fine).
uint16_t load_be16(const uint8_t* p) noexcept;
uint32_t load_be32(const uint8_t* p) noexcept;
uint64_t load_be64(const uint8_t* p) noexcept;
void store_be16(uint8_t* p, uint16_t value) noexcept;
void store_be32(uint8_t* p, uint32_t value) noexcept;
void store_be64(uint8_t* p, uint64_t value) noexcept;
// A table of 64-bit entries (L1, refcount table) in its on-disk big-endian form.
std::vector<uint8_t> encode_be64_table(const std::vector<uint64_t>& entries);

// ---- Header.

// A header extension as stored: its type and its data (without padding).
struct HeaderExtension {
  uint32_t type = 0;
  std::string data;
  bool operator==(const HeaderExtension&) const = default;
};

// The image header with its extensions and backing file name. parse_header fills every field;
// encode() writes them back, so a header read and re-encoded keeps unknown extensions and unknown
// additional header fields.
struct Header {
  uint32_t version = kVersion3;
  uint64_t backing_file_offset = 0;  // where the backing name is stored; encode() recomputes it
  uint32_t backing_file_size = 0;    // its length; encode() recomputes it
  uint32_t cluster_bits = kDefaultClusterBits;
  uint64_t size = 0;  // virtual disk size in bytes
  uint32_t crypt_method = kCryptNone;
  uint32_t l1_size = 0;  // entries in the active L1 table
  uint64_t l1_table_offset = 0;
  uint64_t refcount_table_offset = 0;
  uint32_t refcount_table_clusters = 0;
  uint32_t nb_snapshots = 0;
  uint64_t snapshots_offset = 0;
  // Version 3 fields (ignored and written as fixed values for version 2).
  uint64_t incompatible_features = 0;
  uint64_t compatible_features = 0;
  uint64_t autoclear_features = 0;
  uint32_t refcount_order = kDefaultRefcountOrder;  // always 4 for version 2
  uint32_t header_length = kHeaderV3Length;         // 72 for version 2
  uint8_t compression_type = kCompressionZlib;
  // Header bytes from offset 105 up to header_length that we do not interpret (kept verbatim).
  std::string unknown_fields;

  // Every extension in file order except the end marker, known ones included.
  std::vector<HeaderExtension> extensions;
  std::string backing_file;  // backing file name, empty if none

  uint64_t cluster_size() const noexcept { return uint64_t{1} << cluster_bits; }
  // Entries in one L2 table (standard entries) and in one refcount block.
  uint64_t l2_entries() const noexcept { return cluster_size() / 8; }
  uint64_t refcount_block_entries() const noexcept {
    return (cluster_size() * 8) >> refcount_order;
  }

  // The backing format extension's value ("raw", "qcow2"), or empty.
  std::string backing_format() const;
  // Sets (or with an empty value removes) the backing format extension.
  void set_backing_format(std::string_view format);
  // Returns the data of the first extension of `type`, or nullptr.
  const HeaderExtension* find_extension(uint32_t type) const noexcept;
  // Adds or replaces the extension of `type`; an empty `data` removes it.
  void set_extension(uint32_t type, std::string data);

  // Encodes the header, its extensions, the end marker and the backing file name into one
  // cluster (cluster_size() bytes, zero padded). Fails if they do not fit in the first cluster
  // (with a message saying so). Sets nothing in *this.
  Expected<std::vector<uint8_t>> encode() const;
  // Encodes only the fixed fields (header_length bytes, or 72 for version 2), e.g. to rewrite
  // the incompatible feature bits in place.
  std::vector<uint8_t> encode_fixed() const;
};

// Parses and validates the image header from the first bytes of the image (at least the first
// cluster, or the whole file if it is shorter). `file_size` is the image file's length, used to
// reject tables that lie outside it. Checks: magic, version, header length, cluster size, refcount
// order, encryption, feature bits against each other, alignment and range of the L1, refcount
// and snapshot tables, the L1 and refcount table limits, the extensions' lengths and the backing
// file name. Unknown incompatible features are *not* refused here (see unknown_incompatible).
// Errors are GenericError with messages such as "Image is not in qcow2 format".
Expected<Header> parse_header(std::span<const uint8_t> bytes, uint64_t file_size);

// Names the incompatible features set in `header` that this implementation does not know, using
// the image's feature name table where it has one ("dirty bit", "Unknown incompatible feature:
// 40"). Empty if there are none.
std::string unknown_incompatible_features(const Header& header);

// The feature name table extension data describing every feature bit we know (what QEMU writes
// into new images).
std::string standard_feature_name_table();

// ---- Snapshot table.

// One snapshot table entry.
struct SnapshotEntry {
  uint64_t l1_table_offset = 0;
  uint32_t l1_size = 0;
  std::string id;    // unique id string ("1", "2", ...)
  std::string name;  // user-visible name
  uint32_t date_sec = 0;
  uint32_t date_nsec = 0;
  uint64_t vm_clock_nsec = 0;
  uint64_t vm_state_size = 0;  // from the 64-bit extra field when present, else the 32-bit one
  uint64_t disk_size = 0;      // virtual size at snapshot time (extra data), else header size
  uint64_t icount = UINT64_MAX;  // instruction count (extra data), UINT64_MAX = not recorded
  // Extra data beyond the fields we know (bytes 24.. of the extra area), kept verbatim.
  std::string unknown_extra;
  // How much extra data the entry had when parsed (0 for a new entry: encode writes 24 bytes).
  uint32_t extra_data_size = 0;

  bool operator==(const SnapshotEntry&) const = default;
};

// Size of the known extra data we write: vm_state_size (8), disk_size (8), icount (8).
constexpr uint32_t kSnapshotExtraDataSize = 24;
constexpr uint32_t kSnapshotFixedSize = 40;

// Parses `count` entries from the snapshot table bytes. Checks each entry's lengths stay inside
// `bytes`, extra data size limits, that L1 tables are cluster aligned, lie within `file_size` and
// respect the L1 size limit, and (for version 3) that the extra data holds at least the disk size.
// `default_disk_size` is used for entries without the disk size field.
Expected<std::vector<SnapshotEntry>> parse_snapshot_table(std::span<const uint8_t> bytes,
                                                          uint32_t count, const Header& header,
                                                          uint64_t file_size);
// Encodes a snapshot table. Each entry gets max(extra_data_size, 24) bytes of extra data.
std::vector<uint8_t> encode_snapshot_table(const std::vector<SnapshotEntry>& entries);
// Size in bytes encode_snapshot_table would produce.
uint64_t snapshot_table_size(const std::vector<SnapshotEntry>& entries) noexcept;

// ---- Table validation helpers (for the driver's metadata loads).

// Checks an L1 entry read from an image: reserved bits clear, L2 offset cluster aligned and
// inside the file. Returns an empty string if fine, else what is wrong.
std::string check_l1_entry(uint64_t entry, uint32_t cluster_bits, uint64_t file_size);
// Checks a (non-extended) L2 entry the same way: reserved bits, alignment, range; for compressed
// entries that the data lies inside the file.
std::string check_l2_entry(uint64_t entry, uint32_t version, uint32_t cluster_bits,
                           uint64_t file_size);

}  // namespace blockd::drivers::qcow2
