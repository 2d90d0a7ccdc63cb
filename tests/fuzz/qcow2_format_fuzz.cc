// libFuzzer target: arbitrary bytes as the start of a qcow2 image. Runs the header parser (fixed
// fields, extensions, backing file name), the snapshot table parser on the bytes after the
// header cluster, and the L1/L2/refcount entry decoders on every 8-byte word. Every input must
// give a value or an error, never a crash or an out-of-bounds access; a header that parses must
// re-encode and parse again.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>

#include "drivers/qcow2/format.h"

namespace qcow2 = blockd::drivers::qcow2;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::span<const uint8_t> bytes(data, size);
  // The file may claim to be larger than the input: tables "beyond" the input are then checked
  // against the claimed size only.
  const uint64_t file_size = size + (size > 0 ? data[0] % 4 : 0) * 65536;
  auto header = qcow2::parse_header(bytes, file_size);
  if (header) {
    (void)qcow2::unknown_incompatible_features(*header);
    auto encoded = header->encode();
    if (encoded) {
      auto again = qcow2::parse_header(*encoded, std::max<uint64_t>(file_size, encoded->size()));
      if (!again) __builtin_trap();
    }
    const uint64_t cluster = header->cluster_size();
    if (size > cluster) {
      auto table = qcow2::parse_snapshot_table(bytes.subspan(cluster), header->nb_snapshots % 64,
                                               *header, file_size);
      if (table) {
        auto round = qcow2::encode_snapshot_table(*table);
        auto reparsed = qcow2::parse_snapshot_table(round, static_cast<uint32_t>(table->size()),
                                                    *header, file_size);
        if (!reparsed) __builtin_trap();
      }
    }
    for (size_t at = 0; at + 8 <= size; at += 8) {
      const uint64_t entry = qcow2::load_be64(data + at);
      (void)qcow2::check_l1_entry(entry, header->cluster_bits, file_size);
      (void)qcow2::check_l2_entry(entry, header->version, header->cluster_bits, file_size);
      (void)qcow2::decode_compressed_entry(entry, header->cluster_bits);
    }
    if (size >= cluster) {
      const uint64_t entries = header->refcount_block_entries();
      for (uint64_t i = 0; i < entries; i += 1 + entries / 64) {
        (void)qcow2::get_refcount(data, i, header->refcount_order);
      }
    }
  }
  return 0;
}
