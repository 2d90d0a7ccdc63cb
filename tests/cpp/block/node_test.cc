// Graph and permission tests, on null-co, raw and file nodes with BlockBackends as users.
#include "block/node.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>

#include "block/backend.h"
#include "block/graph.h"
#include "drivers/file.h"
#include "drivers/null.h"
#include "drivers/raw.h"
#include "test_support.h"

namespace blockd::block {
namespace {

using ::testing::HasSubstr;

constexpr uint32_t kReadWrite = kPermConsistentRead | kPermWrite;

class NodeTest : public ::testing::Test {
 protected:
  std::shared_ptr<Node> null_node(const std::string& name, bool read_only = false) {
    NodeOptions common;
    common.node_name = name;
    common.read_only = read_only;
    auto node = drivers::open_null_node(common, {}, *loop_);
    EXPECT_TRUE(node.has_value()) << node.status().message();
    return *node;
  }
  std::shared_ptr<Node> raw_node(const std::string& name, std::shared_ptr<Node> file) {
    NodeOptions common;
    common.node_name = name;
    auto node = drivers::open_raw_node(common, {}, std::move(file), *loop_);
    EXPECT_TRUE(node.has_value()) << node.status().message();
    return *node;
  }

  std::unique_ptr<Loop> loop_ = testing::make_loop();
};

TEST_F(NodeTest, WriterThatDoesNotShareWriteBlocksSecondWriter) {
  auto node = null_node("n0");
  BlockBackend first("block export 'exp0'");
  ASSERT_TRUE(first.attach(node, kReadWrite, kPermAll & ~kPermWrite));
  BlockBackend second("block export 'exp1'");
  Status status = second.attach(node, kReadWrite, kPermAll);
  ASSERT_FALSE(status);
  EXPECT_THAT(status.message(), HasSubstr("'write'"));
  EXPECT_THAT(status.message(), HasSubstr("block export 'exp0'"));
  EXPECT_EQ(second.root(), nullptr);
  EXPECT_EQ(node->users().size(), 1u);

  // The other order: a newcomer that refuses to share write while someone writes.
  BlockBackend reader("block export 'exp2'");
  status = reader.attach(node, kPermConsistentRead, kPermAll & ~kPermWrite);
  ASSERT_FALSE(status);
  EXPECT_THAT(status.message(), HasSubstr("block export 'exp0'"));

  // Two writers that share write coexist.
  first.detach();
  ASSERT_TRUE(first.attach(node, kReadWrite, kPermAll));
  EXPECT_TRUE(second.attach(node, kReadWrite, kPermAll));
}

TEST_F(NodeTest, ReadOnlyNodeRefusesWrite) {
  auto node = null_node("ro", /*read_only=*/true);
  BlockBackend writer("block export 'exp0'");
  Status status = writer.attach(node, kReadWrite, kPermAll);
  ASSERT_FALSE(status);
  EXPECT_EQ(status.message(), "Block node 'ro' is read-only");
  BlockBackend resizer("block export 'exp1'");
  EXPECT_FALSE(resizer.attach(node, kPermResize, kPermAll));
  BlockBackend reader("block export 'exp2'");
  EXPECT_TRUE(reader.attach(node, kPermConsistentRead, kPermAll));
}

TEST_F(NodeTest, ReadOnlyChildRefusesWriteThroughParent) {
  auto file = null_node("file0", /*read_only=*/true);
  auto raw = raw_node("raw0", file);
  BlockBackend writer("block export 'exp0'");
  Status status = writer.attach(raw, kReadWrite, kPermAll);
  ASSERT_FALSE(status);
  EXPECT_EQ(status.message(), "Block node 'file0' is read-only");
  EXPECT_EQ(raw->users().size(), 0u);
  EXPECT_EQ(file->users()[0]->permissions(), 0u);
}

TEST_F(NodeTest, PermissionsPropagateThroughRawToFile) {
  testing::TempDir dir;
  const std::string path = dir.file("img");
  ASSERT_EQ(truncate((path).c_str(), 0), -1);  // does not exist yet
  FILE* created = fopen(path.c_str(), "w");
  ASSERT_NE(created, nullptr);
  fclose(created);
  ASSERT_EQ(truncate(path.c_str(), 1 << 20), 0);

  NodeOptions file_common;
  file_common.node_name = "file0";
  drivers::FileOptions file_options;
  file_options.filename = path;
  auto file = drivers::open_file_node(file_common, file_options, *loop_);
  ASSERT_TRUE(file.has_value()) << file.status().message();
  auto raw = raw_node("raw0", *file);

  ASSERT_EQ((*file)->users().size(), 1u);
  const User* edge = (*file)->users()[0];
  EXPECT_EQ(edge->permissions(), 0u);  // an unused raw node needs nothing from its file

  BlockBackend backend("block export 'exp0'");
  ASSERT_TRUE(backend.attach(raw, kReadWrite, kPermAll & ~kPermWrite));
  EXPECT_EQ(edge->permissions() & kReadWrite, kReadWrite);
  EXPECT_FALSE(edge->shared_permissions() & kPermWrite);

  // The file node now holds the image locks: a second file node on the same image (another open
  // file description, as a second process would have) cannot take write.
  NodeOptions other_common;
  other_common.node_name = "file1";
  auto other = drivers::open_file_node(other_common, file_options, *loop_);
  ASSERT_TRUE(other.has_value());
  BlockBackend intruder("block export 'exp1'");
  Status status = intruder.attach(*other, kReadWrite, kPermAll);
  ASSERT_FALSE(status);
  EXPECT_EQ(status.message(), "Failed to get \"write\" lock");

  // Detaching releases the permissions down the chain, and the locks with them.
  backend.detach();
  EXPECT_EQ(edge->permissions(), 0u);
  EXPECT_EQ(edge->shared_permissions() & kPermWrite, kPermWrite);
  EXPECT_TRUE(intruder.attach(*other, kReadWrite, kPermAll));
}

TEST_F(NodeTest, DetachReleasesPermissions) {
  auto node = null_node("n0");
  BlockBackend first("block export 'exp0'");
  ASSERT_TRUE(first.attach(node, kReadWrite, kPermConsistentRead));
  EXPECT_EQ(first.root(), node.get());
  first.detach();
  EXPECT_EQ(first.root(), nullptr);
  EXPECT_TRUE(node->users().empty());
  BlockBackend second("block export 'exp1'");
  EXPECT_TRUE(second.attach(node, kReadWrite, kPermConsistentRead));
}

TEST_F(NodeTest, UpdatePermissionsChecksConflicts) {
  auto node = null_node("n0");
  BlockBackend reader("block export 'exp0'");
  ASSERT_TRUE(reader.attach(node, kPermConsistentRead, kPermAll & ~kPermWrite));
  BlockBackend other("block export 'exp1'");
  ASSERT_TRUE(other.attach(node, kPermConsistentRead, kPermAll));
  Status status = node->update_permissions(other, kReadWrite, kPermAll);
  ASSERT_FALSE(status);
  EXPECT_EQ(other.permissions(), kPermConsistentRead);  // unchanged on failure
}

TEST_F(NodeTest, ChildKeepsNodeAlive) {
  std::weak_ptr<Node> weak_file;
  std::shared_ptr<Node> raw;
  {
    auto file = null_node("file0");
    weak_file = file;
    raw = raw_node("raw0", file);
  }
  EXPECT_FALSE(weak_file.expired());
  ASSERT_NE(raw->file_child(), nullptr);
  EXPECT_EQ(raw->file_child()->name(), "file");
  raw.reset();
  EXPECT_TRUE(weak_file.expired());
}

// ---- Graph.

TEST_F(NodeTest, GraphGeneratesDistinctNames) {
  Graph graph;
  const std::string first = graph.generate_node_name();
  const std::string second = graph.generate_node_name();
  EXPECT_NE(first, second);
  EXPECT_EQ(first.rfind("#block", 0), 0u);
  // Generated names are never valid user names, so they cannot collide with one.
  EXPECT_FALSE(validate_node_name(first));
}

TEST_F(NodeTest, GraphRejectsDuplicates) {
  Graph graph;
  auto node = null_node("n0");
  graph.add(node, /*monitor_owned=*/true);
  EXPECT_EQ(graph.find("n0"), node);
  Status status = graph.check_name_free("n0");
  ASSERT_FALSE(status);
  EXPECT_EQ(status.message(), "Duplicate nodes with node-name='n0'");
  EXPECT_TRUE(graph.check_name_free("n1"));
}

TEST_F(NodeTest, GraphRemove) {
  Graph graph;
  auto owned = null_node("owned");
  std::weak_ptr<Node> weak = owned;
  graph.add(owned, /*monitor_owned=*/true);
  auto implicit = null_node("implicit");
  graph.add(implicit, /*monitor_owned=*/false);

  Status status = graph.remove("missing");
  ASSERT_FALSE(status);
  EXPECT_EQ(status.message(), "Failed to find node with node-name='missing'");

  status = graph.remove("implicit");
  ASSERT_FALSE(status);
  EXPECT_EQ(status.message(), "Node implicit is not owned by the monitor");

  {
    BlockBackend user("block export 'exp0'");
    ASSERT_TRUE(user.attach(owned, kPermConsistentRead, kPermAll));
    status = graph.remove("owned");
    ASSERT_FALSE(status);
    EXPECT_EQ(status.message(), "Block device owned is in use");
  }
  owned.reset();
  EXPECT_FALSE(weak.expired());  // the monitor still owns it
  EXPECT_EQ(graph.nodes().size(), 2u);
  ASSERT_TRUE(graph.remove("owned"));
  EXPECT_TRUE(weak.expired());
  EXPECT_EQ(graph.find("owned"), nullptr);
  EXPECT_EQ(graph.nodes().size(), 1u);
}

TEST_F(NodeTest, GraphListsNewestFirst) {
  Graph graph;
  auto a = null_node("a");
  auto b = null_node("b");
  graph.add(a, true);
  graph.add(b, true);
  auto nodes = graph.nodes();
  ASSERT_EQ(nodes.size(), 2u);
  EXPECT_EQ(nodes[0]->node_name(), "b");
  EXPECT_EQ(nodes[1]->node_name(), "a");
}

TEST_F(NodeTest, MoveToLoopTakesTheWholeSubtreeOnlyWhenNothingElseUsesIt) {
  auto base = null_node("null0");
  auto raw = raw_node("raw0", base);
  auto other_loop = testing::make_loop();
  BlockBackend owner("block export 'exp0'");
  ASSERT_TRUE(owner.attach(raw, kPermConsistentRead, kPermAll));

  // Another user of the child: nothing moves, and the error names that user.
  BlockBackend bystander("block export 'exp1'");
  ASSERT_TRUE(bystander.attach(base, kPermConsistentRead, kPermAll));
  Status refused = raw->move_to_loop(*other_loop, &owner);
  ASSERT_FALSE(refused);
  EXPECT_THAT(refused.message(), HasSubstr("Node 'null0' is also used by block export 'exp1'"));
  EXPECT_EQ(&raw->loop(), loop_.get());
  EXPECT_EQ(&base->loop(), loop_.get());

  // Alone: the node and its child move, and come back the same way.
  bystander.detach();
  ASSERT_TRUE(raw->move_to_loop(*other_loop, &owner));
  EXPECT_EQ(&raw->loop(), other_loop.get());
  EXPECT_EQ(&base->loop(), other_loop.get());
  ASSERT_TRUE(raw->move_to_loop(*loop_, &owner));
  EXPECT_EQ(&base->loop(), loop_.get());
  owner.detach();
}

TEST(NodeNameTest, Validation) {
  EXPECT_TRUE(validate_node_name("a"));
  EXPECT_TRUE(validate_node_name("disk0"));
  EXPECT_TRUE(validate_node_name("a-b.c_d"));
  Status status = validate_node_name("1abc");
  ASSERT_FALSE(status);
  EXPECT_EQ(status.message(), "Invalid node-name: '1abc'");
  EXPECT_FALSE(validate_node_name("a#b"));
  EXPECT_FALSE(validate_node_name(""));
  EXPECT_FALSE(validate_node_name("-a"));
  EXPECT_TRUE(validate_node_name(std::string(31, 'a')));
  status = validate_node_name(std::string(32, 'a'));
  ASSERT_FALSE(status);
  EXPECT_EQ(status.message(), "Node name too long");
}

}  // namespace
}  // namespace blockd::block
