#include "qmp/engine.h"

#include <gtest/gtest.h>

namespace blockd::qmp {
namespace {

std::unique_ptr<Engine> make_engine() {
  auto engine = Engine::create();
  EXPECT_TRUE(engine.has_value());
  return std::move(engine).value();
}

nlohmann::json run(Engine& engine, const nlohmann::json& request) {
  return nlohmann::json::parse(engine.execute(request.dump()));
}

TEST(EngineTest, ExecuteEchoesIdAndReturns) {
  auto engine = make_engine();
  auto reply = run(*engine, {{"execute", "query-version"}, {"id", {1, "two"}}});
  EXPECT_EQ(reply["id"], nlohmann::json({1, "two"}));
  EXPECT_EQ(reply["return"]["qemu"]["major"], 7);
}

TEST(EngineTest, UnknownCommand) {
  auto engine = make_engine();
  auto reply = run(*engine, {{"execute", "no-such-command"}});
  EXPECT_EQ(reply["error"]["class"], "CommandNotFound");
  EXPECT_EQ(reply["error"]["desc"], "The command no-such-command has not been found");
}

TEST(EngineTest, ParseErrorsInQemuWords) {
  auto engine = make_engine();
  auto desc = [&](std::string_view text) {
    return nlohmann::json::parse(engine->execute(text))["error"]["desc"].get<std::string>();
  };
  EXPECT_EQ(desc("{bad json}"), "JSON parse error, invalid keyword 'bad'");
  EXPECT_EQ(desc("}"), "JSON parse error, expecting value");
  EXPECT_EQ(desc("[1, 2]"), "QMP input must be a JSON object");
}

TEST(EngineTest, ShutdownWithNodesFlushesAndFreesEverything) {
  auto engine = make_engine();
  auto reply = run(
      *engine,
      {{"execute", "blockdev-add"},
       {"arguments", {{"driver", "raw"}, {"node-name", "r0"}, {"file", {{"driver", "null-co"}}}}}});
  EXPECT_TRUE(reply.contains("return")) << reply.dump();
  engine->shutdown();
  reply = run(*engine, {{"execute", "query-version"}});
  EXPECT_EQ(reply["error"]["desc"], "The block engine has been shut down");
}

TEST(EngineTest, MonitorNegotiatesThenDeliversEvents) {
  auto engine = make_engine();
  auto monitor = engine->open_monitor();
  auto replies = monitor->feed(R"({"execute":"query-version"})");
  ASSERT_EQ(replies.size(), 1u);
  EXPECT_NE(replies[0].find("Expecting capabilities negotiation"), std::string::npos);
  replies = monitor->feed(R"({"execute":"qmp_capabilities"})");
  ASSERT_EQ(replies.size(), 1u);
  EXPECT_EQ(replies[0], R"({"return":{}})");
  engine->events().emit("TEST_EVENT", {{"x", 1}});
  auto events = monitor->take_events();
  ASSERT_EQ(events.size(), 1u);
  auto event = nlohmann::json::parse(events[0]);
  EXPECT_EQ(event["event"], "TEST_EVENT");
  EXPECT_TRUE(event["timestamp"].contains("seconds"));
}

}  // namespace
}  // namespace blockd::qmp
