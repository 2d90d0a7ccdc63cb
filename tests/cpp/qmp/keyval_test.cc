#include "qmp/keyval.h"

#include <gtest/gtest.h>

namespace blockd::qmp {
namespace {

nlohmann::json parse_ok(std::string_view text, std::optional<std::string_view> implied = {}) {
  auto parsed = keyval_parse(text, implied);
  EXPECT_TRUE(parsed.has_value()) << (parsed ? "" : parsed.status().message());
  return parsed ? *parsed : nlohmann::json();
}

std::string parse_error(std::string_view text, std::optional<std::string_view> implied = {}) {
  auto parsed = keyval_parse(text, implied);
  EXPECT_FALSE(parsed.has_value());
  return parsed ? "" : parsed.status().message();
}

TEST(KeyvalTest, FlatAndDotted) {
  EXPECT_EQ(
      parse_ok("driver=file,filename=a.img,cache.direct=on"),
      nlohmann::json::parse(R"({"driver":"file","filename":"a.img","cache":{"direct":"on"}})"));
}

TEST(KeyvalTest, EmptyInputIsEmptyObject) { EXPECT_EQ(parse_ok(""), nlohmann::json::object()); }

TEST(KeyvalTest, DoubledCommaIsLiteral) {
  EXPECT_EQ(parse_ok("node-name=a,,b"), nlohmann::json::parse(R"({"node-name":"a,b"})"));
  EXPECT_EQ(parse_ok("node-name=a,,,b=1"), nlohmann::json::parse(R"({"node-name":"a,","b":"1"})"));
}

TEST(KeyvalTest, LaterDuplicateWins) {
  EXPECT_EQ(parse_ok("node-name=a,node-name=b"), nlohmann::json::parse(R"({"node-name":"b"})"));
}

TEST(KeyvalTest, ImpliedKey) {
  EXPECT_EQ(parse_ok("iothread,id=io0", "qom-type"),
            nlohmann::json::parse(R"({"qom-type":"iothread","id":"io0"})"));
  // Only the first parameter can be implied.
  EXPECT_EQ(parse_error("id=io0,iothread", "qom-type"), "Expected '=' after parameter 'iothread'");
}

TEST(KeyvalTest, Lists) {
  EXPECT_EQ(parse_ok("children.0=a,children.1.driver=null-co"),
            nlohmann::json::parse(R"({"children":["a",{"driver":"null-co"}]})"));
  EXPECT_EQ(parse_error("children.0=a,children.2=b"), "Parameter 'children.1' missing");
}

TEST(KeyvalTest, Errors) {
  EXPECT_EQ(parse_error("driver=null-co,x"), "Expected '=' after parameter 'x'");
  EXPECT_EQ(parse_error("b@c=1"), "Invalid parameter 'b@c'");
  EXPECT_EQ(parse_error(".x=1"), "Invalid parameter '.x'");
  EXPECT_EQ(parse_error("x..y=1"), "Invalid parameter 'x..y'");
  EXPECT_EQ(parse_error("s=1,s.x=2"), "Parameters 's.*' used inconsistently");
  EXPECT_EQ(parse_error("s.x=2,s=1"), "Parameters 's.*' used inconsistently");
}

TEST(KeyvalTest, EmptyValue) {
  EXPECT_EQ(parse_ok("size="), nlohmann::json::parse(R"({"size":""})"));
}

}  // namespace
}  // namespace blockd::qmp
