// Tests of the qcow2 on-disk layout: our encoder against our parser, and images made by qemu-img
// against our parser.
#include "drivers/qcow2/format.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <iterator>

#include "test_support.h"

namespace blockd::drivers::qcow2 {
namespace {

std::vector<uint8_t> read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

void sh(const std::string& command) {
  ASSERT_EQ(std::system((command + " >/dev/null").c_str()), 0) << command;
}

// A header whose tables fit in a file of `clusters` clusters.
Header small_header() {
  Header h;
  h.size = 64 << 20;
  h.l1_size = static_cast<uint32_t>(l1_entries_for(h.size, h.cluster_bits));
  h.refcount_table_offset = 1 * h.cluster_size();
  h.refcount_table_clusters = 1;
  h.l1_table_offset = 3 * h.cluster_size();
  return h;
}

constexpr uint64_t kFileSize = 8 << 16;

TEST(Qcow2Format, EndianHelpersRoundTrip) {
  uint8_t bytes[8];
  store_be64(bytes, 0x0102030405060708ull);
  EXPECT_EQ(bytes[0], 1);
  EXPECT_EQ(bytes[7], 8);
  EXPECT_EQ(load_be64(bytes), 0x0102030405060708ull);
  EXPECT_EQ(load_be32(bytes), 0x01020304u);
  EXPECT_EQ(load_be16(bytes + 6), 0x0708);
}

TEST(Qcow2Format, HeaderRoundTripKeepsExtensionsAndBackingName) {
  Header h = small_header();
  h.backing_file = "base image.qcow2";
  h.set_backing_format("qcow2");
  h.set_extension(kExtFeatureTable, standard_feature_name_table());
  h.extensions.push_back({0x12345678, std::string("abc", 3)});  // unknown: must survive
  h.compatible_features = kCompatLazyRefcounts;
  auto bytes = h.encode();
  ASSERT_TRUE(bytes.has_value()) << bytes.status().message();
  ASSERT_EQ(bytes->size(), h.cluster_size());
  auto parsed = parse_header(*bytes, kFileSize);
  ASSERT_TRUE(parsed.has_value()) << parsed.status().message();
  EXPECT_EQ(parsed->backing_file, "base image.qcow2");
  EXPECT_EQ(parsed->backing_format(), "qcow2");
  EXPECT_EQ(parsed->extensions, h.extensions);
  EXPECT_EQ(parsed->size, h.size);
  EXPECT_EQ(parsed->l1_size, h.l1_size);
  EXPECT_EQ(parsed->compatible_features, kCompatLazyRefcounts);
  EXPECT_EQ(parsed->header_length, kHeaderV3Length);
  // Re-encoding what we parsed gives the same bytes.
  auto again = parsed->encode();
  ASSERT_TRUE(again.has_value());
  EXPECT_EQ(*again, *bytes);
}

TEST(Qcow2Format, Version2HeaderIs72Bytes) {
  Header h = small_header();
  h.version = kVersion2;
  h.incompatible_features = kIncompatDirty;  // not representable: dropped
  auto bytes = h.encode();
  ASSERT_TRUE(bytes.has_value());
  EXPECT_EQ(h.encode_fixed().size(), kHeaderV2Length);
  auto parsed = parse_header(*bytes, kFileSize);
  ASSERT_TRUE(parsed.has_value()) << parsed.status().message();
  EXPECT_EQ(parsed->version, kVersion2);
  EXPECT_EQ(parsed->refcount_order, 4u);
  EXPECT_EQ(parsed->incompatible_features, 0u);
}

TEST(Qcow2Format, EncodeRefusesWhatDoesNotFitTheFirstCluster) {
  Header h = small_header();
  h.cluster_bits = 9;
  h.l1_size = static_cast<uint32_t>(l1_entries_for(h.size, h.cluster_bits));
  h.backing_file = std::string(600, 'x');
  auto bytes = h.encode();
  ASSERT_FALSE(bytes.has_value());
  EXPECT_NE(bytes.status().message().find("exceed the cluster size"), std::string::npos);
  h.backing_file = std::string(1024, 'x');
  h.cluster_bits = 16;
  EXPECT_EQ(h.encode().status().message(), "Backing file name too long");
}

// Parses a header modified by `edit` and returns the error message ("" if it parsed).
template <typename Edit>
std::string parse_error(Edit edit, uint64_t file_size = kFileSize) {
  auto bytes = small_header().encode();
  EXPECT_TRUE(bytes.has_value());
  edit(*bytes);
  auto parsed = parse_header(*bytes, file_size);
  return parsed.has_value() ? std::string() : parsed.status().message();
}

TEST(Qcow2Format, ParseRejectsBadHeadersWithClearMessages) {
  EXPECT_EQ(parse_error([](auto&) {}), "");
  EXPECT_EQ(parse_error([](auto& b) { b[0] = 'X'; }), "Image is not in qcow2 format");
  EXPECT_EQ(parse_error([](auto& b) { store_be32(&b[4], 4); }), "Unsupported qcow2 version 4");
  EXPECT_EQ(parse_error([](auto& b) { store_be32(&b[20], 8); }), "Unsupported cluster size: 2^8");
  EXPECT_EQ(parse_error([](auto& b) { store_be32(&b[20], 22); }),
            "Unsupported cluster size: 2^22");
  EXPECT_EQ(parse_error([](auto& b) { store_be32(&b[96], 7); }),
            "Reference count entry width too large; may not exceed 64 bits");
  EXPECT_EQ(parse_error([](auto& b) { store_be32(&b[100], 96); }), "qcow2 header too short");
  EXPECT_EQ(parse_error([](auto& b) { store_be32(&b[100], 108); }),
            "qcow2 header length 108 is not a multiple of 8");
  EXPECT_EQ(parse_error([](auto& b) { store_be32(&b[32], 3); }),
            "Unsupported encryption method: 3");
  EXPECT_EQ(parse_error([](auto& b) { store_be32(&b[56], 0); }),
            "Image does not contain a reference count table");
  EXPECT_EQ(parse_error([](auto& b) { store_be64(&b[48], 0x10200); }),
            "Invalid reference count table offset (not cluster aligned)");
  EXPECT_EQ(parse_error([](auto& b) { store_be64(&b[48], 1ull << 40); }),
            "Invalid reference count table offset (outside the image file)");
  EXPECT_EQ(parse_error([](auto& b) { store_be64(&b[40], 0x30008); }),
            "Invalid L1 table offset (not cluster aligned)");
  EXPECT_EQ(parse_error([](auto& b) { store_be32(&b[36], 0); }), "L1 table is too small");
  EXPECT_EQ(parse_error([](auto& b) { store_be32(&b[36], 0x10000000); }),
            "Active L1 table too large");
  EXPECT_EQ(parse_error([](auto& b) { store_be32(&b[60], 1); }),
            "Invalid snapshot table offset (0, the image header)");
  EXPECT_EQ(parse_error([](auto& b) {
              store_be32(&b[60], 1);
              store_be64(&b[64], 0x20100);
            }),
            "Invalid snapshot table offset (not cluster aligned)");
  EXPECT_EQ(parse_error([](auto& b) { store_be32(&b[60], 70000); }), "Too many snapshots");
  EXPECT_EQ(parse_error([](auto& b) { store_be64(&b[24], UINT64_MAX); }), "Image is too big");
  EXPECT_EQ(parse_error([](auto& b) { b[104] = 1; }),
            "Invalid compression type: the compression type incompatible feature bit is not set");
  EXPECT_EQ(parse_error([](auto& b) { b[104] = 9; }), "Unknown compression type 9");
  // An extension whose length runs past the first cluster.
  EXPECT_EQ(parse_error([](auto& b) {
              store_be32(&b[112], 0x1234);
              store_be32(&b[116], 0x100000);
            }),
            "Header extension 0x1234 is too long (1048576 bytes)");
  EXPECT_EQ(parse_error([](auto& b) {
              store_be64(&b[8], 200);
              store_be32(&b[16], 2000);
            }),
            "Backing file name too long");
  EXPECT_EQ(parse_error([](auto& b) { store_be64(&b[8], 50); }), "Invalid backing file offset");
  // Tables beyond a short file.
  EXPECT_EQ(parse_error([](auto&) {}, 0x20000),
            "Invalid L1 table offset (outside the image file)");
}

TEST(Qcow2Format, EveryTruncationIsAnErrorNotACrash) {
  auto bytes = small_header().encode();
  ASSERT_TRUE(bytes.has_value());
  for (size_t length = 0; length < bytes->size(); length += length < 200 ? 1 : 997) {
    auto parsed = parse_header(std::span<const uint8_t>(bytes->data(), length), kFileSize);
    EXPECT_FALSE(parsed.has_value()) << length;
  }
}

TEST(Qcow2Format, UnknownIncompatibleFeaturesAreNamed) {
  Header h = small_header();
  EXPECT_EQ(unknown_incompatible_features(h), "");
  h.incompatible_features = kIncompatDirty | (1ull << 6) | (1ull << 9);
  EXPECT_EQ(unknown_incompatible_features(h), "Unknown incompatible feature: 240");
  std::string table = standard_feature_name_table();
  std::string entry(kFeatureNameEntrySize, '\0');
  entry[0] = 0;
  entry[1] = 9;
  entry.replace(2, 10, "time warps");
  h.set_extension(kExtFeatureTable, table + entry);
  EXPECT_EQ(unknown_incompatible_features(h), "time warps, Unknown incompatible feature: 40");
}

TEST(Qcow2Format, RefcountEntriesOfEveryWidth) {
  for (uint32_t order = 0; order <= kMaxRefcountOrder; ++order) {
    std::vector<uint8_t> block(512, 0);
    const uint64_t entries = 512 * 8 >> order;
    const uint64_t top = max_refcount(order);
    for (uint64_t i = 0; i < entries; ++i) set_refcount(block.data(), i, order, (i * 7 + 1) & top);
    for (uint64_t i = 0; i < entries; ++i) {
      ASSERT_EQ(get_refcount(block.data(), i, order), (i * 7 + 1) & top) << order << " " << i;
    }
    set_refcount(block.data(), 1, order, top);
    EXPECT_EQ(get_refcount(block.data(), 1, order), top);
    EXPECT_EQ(get_refcount(block.data(), 0, order), 1u);
    EXPECT_EQ(get_refcount(block.data(), 2, order), 15 & top);
  }
  // 16-bit entries are big endian.
  std::vector<uint8_t> block(512, 0);
  set_refcount(block.data(), 1, 4, 0x0102);
  EXPECT_EQ(block[2], 1);
  EXPECT_EQ(block[3], 2);
  // 1-bit entries start at the least significant bit.
  std::vector<uint8_t> bits(512, 0);
  set_refcount(bits.data(), 0, 0, 1);
  set_refcount(bits.data(), 3, 0, 1);
  EXPECT_EQ(bits[0], 0x09);
}

TEST(Qcow2Format, L2EntriesAreClassified) {
  EXPECT_EQ(classify_l2_entry(0, 3), ClusterKind::kUnallocated);
  EXPECT_EQ(classify_l2_entry(kEntryZero, 3), ClusterKind::kZeroPlain);
  EXPECT_EQ(classify_l2_entry(kEntryZero | kEntryCopied | 0x50000, 3),
            ClusterKind::kZeroAllocated);
  EXPECT_EQ(classify_l2_entry(kEntryCopied | 0x50000, 3), ClusterKind::kNormal);
  EXPECT_EQ(classify_l2_entry(kEntryCompressed | 0x50123, 3), ClusterKind::kCompressed);
  EXPECT_EQ(check_l2_entry(kEntryZero | 0x50000, 2, 16, 1 << 20),
            "L2 entry has the zero flag set in a version 2 image");
  EXPECT_EQ(check_l2_entry(0x50200, 3, 16, 1 << 20), "cluster offset 50200 unaligned");
  EXPECT_EQ(check_l2_entry(0x500000, 3, 16, 1 << 20), "cluster offset 500000 outside the image file");
  EXPECT_EQ(check_l2_entry(kEntryCopied | 0x50000, 3, 16, 1 << 20), "");
  EXPECT_EQ(check_l2_entry(1ull << 57, 3, 16, 1 << 20), "L2 entry has reserved bits set (200000000000000)");
  EXPECT_EQ(check_l1_entry(1ull << 60 | 0x10000, 16, 1 << 20),
            "L1 entry has reserved bits set (1000000000010000)");
  EXPECT_EQ(check_l1_entry(kEntryCopied | 0x10000, 16, 1 << 20), "");
  EXPECT_EQ(check_l1_entry(0x10000, 16, 0x18000), "L2 table offset 10000 outside the image file");
}

TEST(Qcow2Format, CompressedDescriptorsRoundTrip) {
  for (uint32_t bits = kMinClusterBits; bits <= kMaxClusterBits; ++bits) {
    const uint64_t offset = 0x123456789ull & ((1ull << (62 - (bits - 8))) - 1);
    const uint64_t length = (uint64_t{1} << bits) - 3;
    ASSERT_TRUE(compressed_offset_fits(offset, bits));
    const uint64_t entry = encode_compressed_entry(offset, length, bits);
    EXPECT_EQ(classify_l2_entry(entry, 3), ClusterKind::kCompressed);
    const CompressedExtent extent = decode_compressed_entry(entry, bits);
    EXPECT_EQ(extent.host_offset, offset);
    // The extent covers the whole sectors the data touches.
    EXPECT_GE(extent.length, length);
    EXPECT_LT(extent.length, length + 512);
    EXPECT_EQ((extent.host_offset + extent.length) % 512, 0u);
  }
}

TEST(Qcow2Format, SnapshotTableRoundTrip) {
  std::vector<SnapshotEntry> entries(2);
  entries[0].l1_table_offset = 0x50000;
  entries[0].l1_size = 1;
  entries[0].id = "1";
  entries[0].name = "first";
  entries[0].date_sec = 1700000000;
  entries[0].date_nsec = 123;
  entries[0].vm_clock_nsec = 99;
  entries[0].disk_size = 64 << 20;
  entries[1] = entries[0];
  entries[1].id = "2";
  entries[1].name = "second, a longer name";
  entries[1].unknown_extra = std::string(8, '\x7f');
  auto bytes = encode_snapshot_table(entries);
  EXPECT_EQ(bytes.size(), snapshot_table_size(entries));
  EXPECT_EQ(bytes.size() % 8, 0u);
  Header h = small_header();
  auto parsed = parse_snapshot_table(bytes, 2, h, 1 << 20);
  ASSERT_TRUE(parsed.has_value()) << parsed.status().message();
  entries[0].extra_data_size = 24;
  entries[1].extra_data_size = 32;
  EXPECT_EQ(*parsed, entries);

  // Truncations and bad offsets are errors.
  for (size_t length = 0; length <= bytes.size(); ++length) {
    auto cut = parse_snapshot_table(std::span<const uint8_t>(bytes.data(), length), 2, h, 1 << 20);
    // 72 bytes for the first entry, 94 for the second before its padding.
    EXPECT_EQ(cut.has_value(), length >= 72 + 94) << length;
  }
  store_be64(bytes.data(), 0x50001);
  EXPECT_EQ(parse_snapshot_table(bytes, 2, h, 1 << 20).status().message(),
            "Snapshot table entry 0: Invalid snapshot L1 table offset (not cluster aligned)");
  store_be64(bytes.data(), 0x50000);
  store_be32(bytes.data() + 36, 8);  // too little extra data for version 3
  EXPECT_NE(parse_snapshot_table(bytes, 2, h, 1 << 20).status().message().find("extra data too small"),
            std::string::npos);
}

// ---- Images made by qemu-img.

class Qcow2FormatQemuImg : public ::testing::Test {
 protected:
  void SetUp() override {
    if (std::system("qemu-img --version >/dev/null 2>&1") != 0) GTEST_SKIP() << "no qemu-img";
  }
  Header parse(const std::string& path) {
    auto bytes = read_all(path);
    auto header = parse_header(bytes, bytes.size());
    EXPECT_TRUE(header.has_value()) << header.status().message();
    return header.has_value() ? *header : Header{};
  }
  blockd::testing::TempDir dir_;
};

TEST_F(Qcow2FormatQemuImg, Version3Variants) {
  const std::string path = dir_.file("a.qcow2");
  for (int bits : {9, 12, 16, 21}) {
    for (int refcount_bits : {1, 16, 64}) {
      sh("qemu-img create -f qcow2 -o cluster_size=" + std::to_string(1 << bits) +
         ",refcount_bits=" + std::to_string(refcount_bits) + " " + path + " 100M");
      Header h = parse(path);
      EXPECT_EQ(h.version, 3u);
      EXPECT_EQ(h.cluster_bits, static_cast<uint32_t>(bits));
      EXPECT_EQ(1u << h.refcount_order, static_cast<uint32_t>(refcount_bits));
      EXPECT_EQ(h.size, 100u << 20);
      EXPECT_EQ(unknown_incompatible_features(h), "");
      // What we re-encode parses to the same header.
      auto again = h.encode();
      ASSERT_TRUE(again.has_value());
      auto bytes = read_all(path);
      EXPECT_EQ(parse_header(*again, bytes.size())->extensions, h.extensions);
    }
  }
}

TEST_F(Qcow2FormatQemuImg, Version2LazyRefcountsAndBacking) {
  const std::string base = dir_.file("base.raw");
  const std::string top = dir_.file("top.qcow2");
  sh("qemu-img create -f raw " + base + " 10M");
  sh("qemu-img create -f qcow2 -o compat=0.10 -b " + base + " -F raw " + top);
  Header h = parse(top);
  EXPECT_EQ(h.version, 2u);
  EXPECT_EQ(h.backing_file, base);
  EXPECT_EQ(h.backing_format(), "raw");
  EXPECT_EQ(h.size, 10u << 20);
  sh("qemu-img create -f qcow2 -o lazy_refcounts=on " + top + " 1G");
  h = parse(top);
  EXPECT_EQ(h.compatible_features, kCompatLazyRefcounts);
  EXPECT_EQ(h.backing_file, "");
}

TEST_F(Qcow2FormatQemuImg, SnapshotTableFromQemuImg) {
  const std::string path = dir_.file("snap.qcow2");
  sh("qemu-img create -f qcow2 " + path + " 16M");
  sh("qemu-img snapshot -c alpha " + path);
  sh("qemu-img snapshot -c beta " + path);
  auto bytes = read_all(path);
  Header h = parse(path);
  ASSERT_EQ(h.nb_snapshots, 2u);
  auto table = parse_snapshot_table(
      std::span<const uint8_t>(bytes).subspan(h.snapshots_offset), h.nb_snapshots, h,
      bytes.size());
  ASSERT_TRUE(table.has_value()) << table.status().message();
  EXPECT_EQ((*table)[0].id, "1");
  EXPECT_EQ((*table)[0].name, "alpha");
  EXPECT_EQ((*table)[1].id, "2");
  EXPECT_EQ((*table)[1].name, "beta");
  EXPECT_EQ((*table)[1].disk_size, 16u << 20);
  EXPECT_GT((*table)[1].date_sec, 1600000000u);
  // Re-encoding reproduces qemu-img's bytes exactly (qemu-img may leave the last entry's padding
  // beyond the end of the file).
  auto encoded = encode_snapshot_table(*table);
  const size_t stored = std::min<size_t>(encoded.size(), bytes.size() - h.snapshots_offset);
  EXPECT_GE(stored + 8, encoded.size());
  EXPECT_TRUE(std::equal(encoded.begin(), encoded.begin() + stored,
                         bytes.begin() + h.snapshots_offset));
}

}  // namespace
}  // namespace blockd::drivers::qcow2
