// Tests of the QAPI-generated types and marshalling (build/generated/qapi) on real schema types.
// Expected error messages are the ones qemu-storage-daemon 7.2 prints for the same input.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "qapi/introspect.h"
#include "qapi/types.h"
#include "qapi/visit.h"

namespace blockd::qapi {
namespace {

using nlohmann::json;

// Parses `text` as `T` and returns the error message ("" on success).
template <typename T>
std::string error_of(const json& in, InputMode mode = InputMode::kQmp) {
  T out;
  Status status = from_json(in, out, mode, "");
  return status ? "" : status.message();
}

TEST(GeneratedEnums, ToStringAndParse) {
  EXPECT_EQ(to_string(BlockdevDriver::kNullCo), "null-co");
  EXPECT_EQ(to_string(BlockdevAioOptions::kIoUring), "io_uring");
  EXPECT_EQ(to_string(FloppyDriveType::k144), "144");
  EXPECT_EQ(to_string(QCryptoCipherAlgorithm::k3des), "3des");
  BlockExportType type{};
  ASSERT_TRUE(parse_enum("vduse-blk", type));
  EXPECT_EQ(type, BlockExportType::kVduseBlk);
  EXPECT_FALSE(parse_enum("vduse_blk", type));
}

TEST(GeneratedVisit, MissingMember) {
  EXPECT_EQ(error_of<BlockdevOptions>(json{{"node-name", "a"}}), "Parameter 'driver' is missing");
  EXPECT_EQ(error_of<BlockdevOptions>(json{{"driver", "raw"}, {"file", {{"driver", "file"}}}}),
            "Parameter 'file.filename' is missing");
  EXPECT_EQ(
      error_of<NbdServerStartArgs>(json{{"addr", {{"type", "inet"}, {"data", {{"host", "x"}}}}}}),
      "Parameter 'addr.data.port' is missing");
}

TEST(GeneratedVisit, UnexpectedMember) {
  EXPECT_EQ(
      error_of<BlockdevOptions>(json{{"driver", "null-co"}, {"node-name", "a"}, {"bogus", 1}}),
      "Parameter 'bogus' is unexpected");
  EXPECT_EQ(error_of<BlockdevOptions>(json{
                {"driver", "raw"}, {"file", {{"driver", "file"}, {"filename", "x"}, {"zz", 1}}}}),
            "Parameter 'file.zz' is unexpected");
  // Members of another branch are unexpected too.
  EXPECT_EQ(error_of<BlockdevOptions>(json{{"driver", "null-co"}, {"filename", "x"}}),
            "Parameter 'filename' is unexpected");
  EXPECT_EQ(error_of<ObjectDelArgs>(json{{"id", "x"}, {"zz", 1}}), "Parameter 'zz' is unexpected");
}

TEST(GeneratedVisit, WrongType) {
  EXPECT_EQ(error_of<BlockdevOptions>(json{{"driver", 1}}),
            "Invalid parameter type for 'driver', expected: string");
  EXPECT_EQ(error_of<BlockdevOptions>(json{{"driver", "null-co"}, {"size", "x"}}),
            "Invalid parameter type for 'size', expected: integer");
  EXPECT_EQ(error_of<BlockdevOptions>(json{{"driver", "null-co"}, {"size", 1.5}}),
            "Invalid parameter type for 'size', expected: integer");
  EXPECT_EQ(error_of<BlockdevOptions>(json{{"driver", "null-co"}, {"latency-ns", "x"}}),
            "Parameter 'latency-ns' expects uint64");
  EXPECT_EQ(error_of<BlockdevOptions>(json{{"driver", "null-co"}, {"read-only", "yes"}}),
            "Invalid parameter type for 'read-only', expected: boolean");
  EXPECT_EQ(error_of<BlockdevOptions>(json{{"driver", "null-co"}, {"cache", 5}}),
            "Invalid parameter type for 'cache', expected: object");
  EXPECT_EQ(error_of<BlockdevOptions>(
                json{{"driver", "quorum"}, {"vote-threshold", 1}, {"children", "x"}}),
            "Invalid parameter type for 'children', expected: array");
  EXPECT_EQ(error_of<QmpCapabilitiesArgs>(json{{"enable", "oob"}}),
            "Invalid parameter type for 'enable', expected: array");
  EXPECT_EQ(error_of<BlockdevOptions>(json{{"driver", "null-co"}, {"node-name", nullptr}}),
            "Invalid parameter type for 'node-name', expected: string");
}

TEST(GeneratedVisit, NestedPaths) {
  EXPECT_EQ(error_of<BlockdevOptions>(json{
                {"driver", "raw"},
                {"file", {{"driver", "raw"}, {"file", {{"driver", "file"}, {"filename", 5}}}}}}),
            "Invalid parameter type for 'file.file.filename', expected: string");
  EXPECT_EQ(error_of<BlockdevOptions>(
                json{{"driver", "quorum"},
                     {"vote-threshold", 1},
                     {"children", json::array({"x", {{"driver", "file"}, {"filename", 1}}})}}),
            "Invalid parameter type for 'children[1].filename', expected: string");
  EXPECT_EQ(error_of<BlockdevOptions>(
                json{{"driver", "blkdebug"},
                     {"image", "x"},
                     {"inject-error", json::array({{{"event", "l2_load"}, {"x", 1}}})}}),
            "Parameter 'inject-error[0].x' is unexpected");
  EXPECT_EQ(error_of<BlockdevOptions>(json{{"driver", "qcow2"},
                                           {"file", "x"},
                                           {"encrypt", {{"format", "luks"}, {"key-secret", 1}}}}),
            "Invalid parameter type for 'encrypt.key-secret', expected: string");
}

TEST(GeneratedVisit, BadEnumValueNamesOnlyTheMember) {
  EXPECT_EQ(error_of<BlockdevOptions>(json{{"driver", "bogus"}}),
            "Parameter 'driver' does not accept value 'bogus'");
  EXPECT_EQ(
      error_of<BlockdevOptions>(json{
          {"driver", "raw"}, {"file", {{"driver", "file"}, {"filename", "x"}, {"aio", "bad"}}}}),
      "Parameter 'aio' does not accept value 'bad'");
  // List elements have no name: QEMU says 'null'.
  EXPECT_EQ(
      error_of<BlockdevOptions>(json{
          {"driver", "blkdebug"}, {"image", "x"}, {"take-child-perms", json::array({"bogus"})}}),
      "Parameter 'null' does not accept value 'bogus'");
}

TEST(GeneratedVisit, IntegerRanges) {
  json addr = {{"type", "inet"}, {"data", {{"host", "x"}, {"port", "1"}}}};
  EXPECT_EQ(error_of<NbdServerStartArgs>(json{{"addr", addr}, {"max-connections", 4294967296}}),
            "Parameter 'max-connections' expects uint32_t");
  EXPECT_EQ(error_of<NbdServerStartArgs>(json{{"addr", addr}, {"max-connections", -1}}),
            "Parameter 'max-connections' expects uint32_t");
  EXPECT_EQ(error_of<NbdServerStartArgs>(json{{"addr", addr}, {"max-connections", "x"}}),
            "Parameter 'max-connections' expects uint64");
  json far = addr;
  far["data"]["to"] = 70000;
  EXPECT_EQ(error_of<NbdServerStartArgs>(json{{"addr", far}}), "Parameter 'to' expects uint16_t");
  EXPECT_EQ(error_of<BlockdevOptions>(
                json{{"driver", "blkdebug"}, {"image", "x"}, {"max-transfer", int64_t{1} << 40}}),
            "Parameter 'max-transfer' expects int32_t");
  // Negative values wrap for uint64, as in QEMU.
  BlockdevOptions opts;
  ASSERT_TRUE(
      from_json(json{{"driver", "null-co"}, {"latency-ns", -1}}, opts, InputMode::kQmp, ""));
  EXPECT_EQ(opts.u.null_co->latency_ns, UINT64_MAX);
}

TEST(GeneratedVisit, AlternateSelection) {
  BlockdevOptions opts;
  ASSERT_TRUE(from_json(json{{"driver", "raw"}, {"file", "disk0"}}, opts, InputMode::kQmp, ""));
  ASSERT_TRUE(opts.u.raw);
  const BlockdevRef::Base& ref = opts.u.raw->file;
  ASSERT_TRUE(std::holds_alternative<std::string>(ref));
  EXPECT_EQ(std::get<std::string>(ref), "disk0");

  ASSERT_TRUE(from_json(json{{"driver", "qcow2"},
                             {"file", {{"driver", "file"}, {"filename", "/x"}}},
                             {"backing", nullptr},
                             {"overlap-check", "none"}},
                        opts, InputMode::kQmp, ""));
  const auto& qcow2 = *opts.u.qcow2;
  const BlockdevRefOrNull::Base& backing = *qcow2.backing;
  EXPECT_TRUE(std::holds_alternative<std::nullptr_t>(backing));
  const BlockdevRef::Base& file = qcow2.file;
  ASSERT_EQ(file.index(), 0u);
  EXPECT_EQ(std::get<0>(file)->u.file->filename, "/x");
  const Qcow2OverlapChecks::Base& checks = *qcow2.overlap_check;
  EXPECT_EQ(std::get<Qcow2OverlapCheckMode>(checks), Qcow2OverlapCheckMode::kNone);

  EXPECT_EQ(error_of<BlockdevOptions>(json{{"driver", "raw"}, {"file", 1}}),
            "Invalid parameter type for 'file', expected: BlockdevRef");
  EXPECT_EQ(error_of<BlockdevOptions>(json{{"driver", "qcow2"}, {"file", "x"}, {"backing", 5}}),
            "Invalid parameter type for 'backing', expected: BlockdevRefOrNull");
  EXPECT_EQ(error_of<BlockdevOptions>(
                json{{"driver", "quorum"}, {"vote-threshold", 1}, {"children", json::array({1})}}),
            "Invalid parameter type for 'null', expected: BlockdevRef");
  EXPECT_EQ(error_of<BlockdevOptions>(
                json{{"driver", "qcow2"}, {"file", "x"}, {"overlap-check", {{"template", "bad"}}}}),
            "Parameter 'template' does not accept value 'bad'");

  BlockExportOptions exp;
  ASSERT_TRUE(from_json(json{{"type", "nbd"},
                             {"id", "e"},
                             {"node-name", "n"},
                             {"bitmaps", json::array({"b1", {{"node", "n2"}, {"name", "b2"}}})}},
                        exp, InputMode::kQmp, ""));
  const auto& bitmaps = *exp.u.nbd->bitmaps;
  ASSERT_EQ(bitmaps.size(), 2u);
  EXPECT_EQ(std::get<std::string>(bitmaps[0]), "b1");
  EXPECT_EQ(std::get<BlockDirtyBitmap>(bitmaps[1]).node, "n2");
  EXPECT_EQ(error_of<BlockExportOptions>(json{{"type", "nbd"},
                                              {"id", "e"},
                                              {"node-name", "n"},
                                              {"bitmaps", json::array({{{"node", "a"}}})}}),
            "Parameter 'bitmaps[0].name' is missing");
}

TEST(GeneratedVisit, UnionBranchSelection) {
  BlockExportOptions exp;
  ASSERT_TRUE(from_json(json{{"type", "vhost-user-blk"},
                             {"id", "e"},
                             {"node-name", "n"},
                             {"addr", {{"type", "unix"}, {"path", "/s"}}},
                             {"num-queues", 4}},
                        exp, InputMode::kQmp, ""));
  EXPECT_EQ(exp.type, BlockExportType::kVhostUserBlk);
  EXPECT_FALSE(exp.u.nbd);
  ASSERT_TRUE(exp.u.vhost_user_blk);
  EXPECT_EQ(exp.u.vhost_user_blk->num_queues, 4);
  ASSERT_TRUE(exp.u.vhost_user_blk->addr.u.unix_);
  EXPECT_EQ(exp.u.vhost_user_blk->addr.u.unix_->path, "/s");

  ObjectOptions obj;
  ASSERT_TRUE(from_json(json{{"qom-type", "iothread"}, {"id", "io0"}, {"poll-max-ns", 0}}, obj,
                        InputMode::kQmp, ""));
  EXPECT_EQ(obj.qom_type, ObjectType::kIothread);
  EXPECT_EQ(obj.u.iothread->poll_max_ns, 0);
}

TEST(GeneratedVisit, KeyvalConversions) {
  BlockdevOptions opts;
  ASSERT_TRUE(from_json(json{{"driver", "null-co"},
                             {"node-name", "a"},
                             {"size", "0x10"},
                             {"read-only", "on"},
                             {"read-zeroes", "n"},
                             {"latency-ns", "-1"},
                             {"cache", {{"direct", "yes"}}}},
                        opts, InputMode::kKeyval, ""));
  EXPECT_EQ(opts.u.null_co->size, 16);
  EXPECT_EQ(opts.read_only, true);
  EXPECT_EQ(opts.u.null_co->read_zeroes, false);
  EXPECT_EQ(opts.u.null_co->latency_ns, UINT64_MAX);
  EXPECT_EQ(opts.cache->direct, true);

  auto keyval_error = [](const json& in) {
    return error_of<BlockdevOptions>(in, InputMode::kKeyval);
  };
  EXPECT_EQ(keyval_error(json{{"driver", "null-co"}, {"latency-ns", "x"}}),
            "Parameter 'latency-ns' expects integer");
  EXPECT_EQ(keyval_error(json{{"driver", "null-co"}, {"size", ""}}),
            "Parameter 'size' expects integer");
  EXPECT_EQ(keyval_error(json{{"driver", "null-co"}, {"read-only", "maybe"}}),
            "Parameter 'read-only' expects 'on' or 'off'");
  EXPECT_EQ(keyval_error(json{{"driver", "null-co"}, {"cache", {{"direct", "x"}}}}),
            "Parameter 'cache.direct' expects 'on' or 'off'");
  EXPECT_EQ(keyval_error(json{{"driver", "null-co"}, {"cache", "x"}}),
            "Invalid parameter type for 'cache', expected: object");
  EXPECT_EQ(keyval_error(json{{"driver", "null-co"}, {"latency-ns", {{"x", "1"}}}}),
            "Parameters 'latency-ns.*' are unexpected");
  EXPECT_EQ(keyval_error(json{{"driver", "quorum"},
                              {"vote-threshold", "1"},
                              {"children", json::array({{{"driver", "file"}}})}}),
            "Parameter 'children.0.filename' is missing");
  EXPECT_EQ(
      keyval_error(json{{"driver", "blkdebug"},
                        {"image", "x"},
                        {"inject-error", json::array({{{"event", "l2_load"}, {"state", "zz"}}})}}),
      "Parameter 'inject-error.0.state' expects integer");

  NbdServerOptions nbd;
  json addr = {{"type", "inet"}, {"host", "x"}, {"port", "1"}};
  EXPECT_EQ(error_of<NbdServerOptions>(json{{"addr", addr}, {"max-connections", "-1"}},
                                       InputMode::kKeyval),
            "Parameter 'max-connections' expects uint32_t");
  json far = addr;
  far["to"] = "70000";
  EXPECT_EQ(error_of<NbdServerOptions>(json{{"addr", far}}, InputMode::kKeyval),
            "Parameter 'to' expects uint16_t");
  far["to"] = "x";
  EXPECT_EQ(error_of<NbdServerOptions>(json{{"addr", far}}, InputMode::kKeyval),
            "Parameter 'addr.to' expects integer");
}

TEST(GeneratedVisit, KeyvalSizes) {
  auto size_of = [](const char* text, uint64_t& out) {
    BlockExportOptions exp;
    Status status = from_json(json{{"type", "vhost-user-blk"},
                                   {"id", "e"},
                                   {"node-name", "n"},
                                   {"addr", {{"type", "unix"}, {"path", "/s"}}},
                                   {"logical-block-size", text}},
                              exp, InputMode::kKeyval, "");
    if (status) out = *exp.u.vhost_user_blk->logical_block_size;
    return status ? std::string() : status.message();
  };
  uint64_t v = 0;
  EXPECT_EQ(size_of("512", v), "");
  EXPECT_EQ(v, 512u);
  EXPECT_EQ(size_of("4k", v), "");
  EXPECT_EQ(v, 4096u);
  EXPECT_EQ(size_of("1.5k", v), "");
  EXPECT_EQ(v, 1536u);
  EXPECT_EQ(size_of("2M", v), "");
  EXPECT_EQ(v, 2u << 20);
  EXPECT_EQ(size_of("1G", v), "");
  EXPECT_EQ(v, 1u << 30);
  EXPECT_EQ(size_of("3T", v), "");
  EXPECT_EQ(v, uint64_t{3} << 40);
  EXPECT_EQ(size_of("100b", v), "");
  EXPECT_EQ(v, 100u);
  EXPECT_EQ(size_of("0x10", v), "");
  EXPECT_EQ(v, 16u);
  EXPECT_EQ(size_of("1.k", v), "");
  EXPECT_EQ(v, 1024u);
  for (const char* bad : {"x", "-1", "16E", "1.5", "1e3k", "", "1kk", "0x1.5"}) {
    EXPECT_EQ(size_of(bad, v), "Parameter 'logical-block-size' expects size") << bad;
  }
  // In QMP mode a size is a plain unsigned integer.
  BlockExportOptions exp;
  Status status = from_json(json{{"type", "vhost-user-blk"},
                                 {"id", "e"},
                                 {"node-name", "n"},
                                 {"addr", {{"type", "unix"}, {"path", "/s"}}},
                                 {"logical-block-size", "4k"}},
                            exp, InputMode::kQmp, "");
  EXPECT_EQ(status.message(), "Parameter 'logical-block-size' expects uint64");
}

TEST(GeneratedVisit, KeyvalAlternateTakesStrings) {
  BlockdevOptions opts;
  ASSERT_TRUE(from_json(json{{"driver", "qcow2"}, {"file", "disk"}, {"overlap-check", "all"}}, opts,
                        InputMode::kKeyval, ""));
  const BlockdevRef::Base& file = opts.u.qcow2->file;
  EXPECT_EQ(std::get<std::string>(file), "disk");
  EXPECT_EQ(
      error_of<BlockdevOptions>(json{{"driver", "qcow2"}, {"file", "x"}, {"overlap-check", "bad"}},
                                InputMode::kKeyval),
      "Parameter 'overlap-check' does not accept value 'bad'");
}

TEST(GeneratedVisit, RoundTrip) {
  json in = {{"driver", "qcow2"},
             {"node-name", "top"},
             {"discard", "unmap"},
             {"cache", {{"direct", true}}},
             {"file", {{"driver", "file"}, {"filename", "/img"}, {"aio", "io_uring"}}},
             {"backing",
              {{"driver", "quorum"},
               {"vote-threshold", 2},
               {"children", json::array({"a", "b", {{"driver", "null-co"}, {"size", 4096}}})}}},
             {"overlap-check", {{"template", "all"}, {"main-header", false}}},
             {"encrypt", {{"format", "luks"}, {"key-secret", "sec0"}}},
             {"l2-cache-size", 1048576}};
  BlockdevOptions opts;
  ASSERT_TRUE(from_json(in, opts, InputMode::kQmp, ""));
  EXPECT_EQ(to_json(opts), in);
  BlockdevOptions copy = opts;  // deep copy through the boxes
  EXPECT_EQ(copy, opts);
  std::get<0>(static_cast<BlockdevRef::Base&>(copy.u.qcow2->file))->u.file->filename = "/other";
  EXPECT_NE(copy, opts);

  json info = {{"file", "/img"},
               {"node-name", "n"},
               {"ro", false},
               {"drv", "qcow2"},
               {"backing_file_depth", 0},
               {"encrypted", false},
               {"detect_zeroes", "off"},
               {"bps", 0},
               {"bps_rd", 0},
               {"bps_wr", 0},
               {"iops", 0},
               {"iops_rd", 0},
               {"iops_wr", 0},
               {"image",
                {{"filename", "/img"},
                 {"format", "qcow2"},
                 {"virtual-size", 1073741824},
                 {"backing-image", {{"filename", "/base"}, {"format", "raw"}, {"virtual-size", 1}}},
                 {"format-specific",
                  {{"type", "qcow2"},
                   {"data",
                    {{"compat", "1.1"},
                     {"refcount-bits", 16},
                     {"compression-type", "zlib"},
                     {"bitmaps", json::array({{{"name", "b"},
                                               {"granularity", 65536},
                                               {"flags", json::array({"auto"})}}})}}}}}}},
               {"cache", {{"writeback", true}, {"direct", false}, {"no-flush", false}}},
               {"write_threshold", 0}};
  BlockDeviceInfo bdi;
  ASSERT_TRUE(from_json(info, bdi, InputMode::kQmp, ""));
  EXPECT_EQ(bdi.image.backing_image.value()->filename, "/base");
  EXPECT_EQ(to_json(bdi), info);
}

TEST(GeneratedVisit, OutputOmitsAbsentOptionals) {
  BlockExportInfo info;
  info.id = "e";
  info.type = BlockExportType::kFuse;
  info.node_name = "n";
  EXPECT_EQ(to_json(info),
            (json{{"id", "e"}, {"type", "fuse"}, {"node-name", "n"}, {"shutting-down", false}}));
  QuorumReportBadEvent ev;
  ev.type = QuorumOpType::kFlush;
  ev.node_name = "n";
  EXPECT_EQ(to_json(ev),
            (json{{"type", "flush"}, {"node-name", "n"}, {"sector-num", 0}, {"sectors-count", 0}}));
}

TEST(GeneratedIntrospection, Shape) {
  const json& schema = qmp_schema_introspection();
  ASSERT_TRUE(schema.is_array());
  std::map<std::string, json> by_name;
  for (const json& e : schema) by_name[e.at("name").get<std::string>()] = e;
  ASSERT_TRUE(by_name.count("blockdev-add"));
  EXPECT_EQ(by_name["blockdev-add"]["meta-type"], "command");
  EXPECT_EQ(by_name["QUORUM_REPORT_BAD"]["meta-type"], "event");
  // Commands without a handler are not advertised.
  EXPECT_FALSE(by_name.count("query-pr-managers"));
  // Type names are masked; built-ins keep theirs.
  EXPECT_EQ(by_name["str"]["json-type"], "string");
  EXPECT_EQ(by_name["int"]["json-type"], "int");
  const json& args = by_name[by_name["blockdev-del"]["arg-type"].get<std::string>()];
  EXPECT_EQ(args["meta-type"], "object");
  EXPECT_EQ(args["members"], json::parse(R"([{"name":"node-name","type":"str"}])"));
  const json& quit = by_name["quit"];
  EXPECT_EQ(by_name[quit["arg-type"].get<std::string>()]["members"], json::array());
}

}  // namespace
}  // namespace blockd::qapi
