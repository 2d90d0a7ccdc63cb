#include "qmp/json_stream.h"

#include <gtest/gtest.h>

namespace blockd::qmp {
namespace {

std::vector<JsonStream::Item> feed_all(JsonStream& stream, std::string_view bytes) {
  std::vector<JsonStream::Item> items;
  stream.feed(bytes, items);
  return items;
}

TEST(JsonStreamTest, SplitsBackToBackValues) {
  JsonStream stream;
  auto items = feed_all(stream, R"({"a":1}{"b":"}"} [1,[2]])");
  ASSERT_EQ(items.size(), 3u);
  EXPECT_EQ(items[0].text, R"({"a":1})");
  EXPECT_EQ(items[1].text, R"({"b":"}"})");
  EXPECT_EQ(items[2].text, "[1,[2]]");
}

TEST(JsonStreamTest, ValueSplitAcrossFeeds) {
  JsonStream stream;
  EXPECT_TRUE(feed_all(stream, R"({"execute":"query-)").empty());
  auto items = feed_all(stream, R"(version"}\n)");
  ASSERT_EQ(items.size(), 1u);
  EXPECT_EQ(items[0].text, R"({"execute":"query-version"})");
}

TEST(JsonStreamTest, EscapedQuotesInStrings) {
  JsonStream stream;
  auto items = feed_all(stream, R"({"a":"x\"}y\\"})");
  ASSERT_EQ(items.size(), 1u);
  EXPECT_EQ(items[0].text, R"({"a":"x\"}y\\"})");
}

TEST(JsonStreamTest, ScalarsAndStrays) {
  JsonStream stream;
  auto items = feed_all(stream, "\"str\" 12 } ");
  ASSERT_EQ(items.size(), 3u);
  EXPECT_EQ(items[0].text, "\"str\"");
  EXPECT_EQ(items[1].text, "12");
  EXPECT_EQ(items[2].text, "}");
}

TEST(JsonStreamTest, NestingLimitReportedOnceThenRecovers) {
  JsonStream stream;
  std::string deep(2000, '[');
  deep += std::string(2000, ']');
  auto items = feed_all(stream, deep + R"({"ok":true})");
  ASSERT_EQ(items.size(), 2u);
  EXPECT_FALSE(items[0].ok);
  EXPECT_EQ(items[0].text, "JSON nesting depth limit exceeded");
  EXPECT_TRUE(items[1].ok);
  EXPECT_EQ(items[1].text, R"({"ok":true})");
}

TEST(JsonStreamTest, RecoveryEndsAtLineBreak) {
  JsonStream stream;
  auto items = feed_all(stream, std::string(2000, '{') + "\n{\"a\":1}");
  ASSERT_EQ(items.size(), 2u);
  EXPECT_EQ(items[0].text, "JSON nesting depth limit exceeded");
  EXPECT_EQ(items[1].text, R"({"a":1})");
}

TEST(JsonStreamTest, SizeLimitDoesNotBuffer) {
  JsonStream stream;
  std::string big = "[\"" + std::string(JsonStream::kMaxValueBytes + 10, 'x');
  auto items = feed_all(stream, big);
  ASSERT_EQ(items.size(), 1u);
  EXPECT_EQ(items[0].text, "JSON token size limit exceeded");
  EXPECT_EQ(stream.pending_bytes(), 0u);
  items = feed_all(stream, "\"] {\"a\":1}");
  ASSERT_EQ(items.size(), 1u);
  EXPECT_EQ(items[0].text, R"({"a":1})");
}

}  // namespace
}  // namespace blockd::qmp
