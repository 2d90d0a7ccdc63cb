// EventBus rate limiting, on the manual test clock.
#include "qmp/event_bus.h"

#include <gtest/gtest.h>

#include <condition_variable>
#include <mutex>
#include <string>
#include <vector>

namespace blockd::qmp {
namespace {

using std::chrono::milliseconds;

class EventBusTest : public ::testing::Test {
 protected:
  void SetUp() override {
    bus_.TEST_use_manual_clock();
    bus_.subscribe([this](const std::string& line) { lines_.push_back(nlohmann::json::parse(line)); });
  }

  void report_bad(const std::string& node, int sector) {
    bus_.emit("QUORUM_REPORT_BAD", {{"type", "read"}, {"node-name", node}, {"sector-num", sector},
                                    {"sectors-count", 1}});
  }

  // The (node-name, sector-num) of each event delivered so far.
  std::vector<std::pair<std::string, int>> delivered() const {
    std::vector<std::pair<std::string, int>> out;
    for (const auto& line : lines_) {
      out.emplace_back(line["data"].value("node-name", line["data"].value("reference", "")),
                       line["data"]["sector-num"].get<int>());
    }
    return out;
  }

  EventBus bus_;
  std::vector<nlohmann::json> lines_;
};

TEST_F(EventBusTest, UnthrottledEventsPassAtOnce) {
  for (int i = 0; i < 3; ++i) bus_.emit("BLOCK_EXPORT_DELETED", {{"id", "e"}});
  EXPECT_EQ(lines_.size(), 3u);
  EXPECT_TRUE(lines_[0].contains("timestamp"));
}

TEST_F(EventBusTest, FirstAtOnceNewestWhenTheWindowCloses) {
  report_bad("a", 1);
  report_bad("a", 2);
  report_bad("a", 3);
  EXPECT_EQ(delivered(), (std::vector<std::pair<std::string, int>>{{"a", 1}}));
  bus_.TEST_advance_clock(milliseconds(999));
  EXPECT_EQ(lines_.size(), 1u);
  bus_.TEST_advance_clock(milliseconds(1));
  EXPECT_EQ(delivered(), (std::vector<std::pair<std::string, int>>{{"a", 1}, {"a", 3}}));
  // Delivering the pending event opened a new window: the next one waits for it too.
  report_bad("a", 4);
  EXPECT_EQ(lines_.size(), 2u);
  bus_.TEST_advance_clock(milliseconds(1000));
  EXPECT_EQ(lines_.size(), 3u);
  // A window that closes empty ends the throttling: the next event passes at once.
  bus_.TEST_advance_clock(milliseconds(1000));
  report_bad("a", 5);
  EXPECT_EQ(lines_.size(), 4u);
}

TEST_F(EventBusTest, ReportBadIsThrottledPerNode) {
  report_bad("a", 1);
  report_bad("b", 1);
  report_bad("a", 2);
  report_bad("b", 2);
  EXPECT_EQ(delivered(), (std::vector<std::pair<std::string, int>>{{"a", 1}, {"b", 1}}));
  bus_.TEST_advance_clock(milliseconds(1000));
  EXPECT_EQ(lines_.size(), 4u);
}

TEST_F(EventBusTest, FailureHasOneWindowForAllNodes) {
  bus_.emit("QUORUM_FAILURE", {{"reference", "q1"}, {"sector-num", 0}, {"sectors-count", 1}});
  bus_.emit("QUORUM_FAILURE", {{"reference", "q2"}, {"sector-num", 5}, {"sectors-count", 1}});
  EXPECT_EQ(delivered(), (std::vector<std::pair<std::string, int>>{{"q1", 0}}));
  bus_.TEST_advance_clock(milliseconds(2500));
  EXPECT_EQ(delivered(), (std::vector<std::pair<std::string, int>>{{"q1", 0}, {"q2", 5}}));
}

TEST_F(EventBusTest, ALongStepClosesWindowsInOrder) {
  report_bad("a", 1);
  report_bad("a", 2);
  bus_.TEST_advance_clock(milliseconds(500));
  report_bad("b", 1);
  report_bad("b", 2);
  bus_.TEST_advance_clock(milliseconds(10000));
  EXPECT_EQ(delivered(), (std::vector<std::pair<std::string, int>>{
                             {"a", 1}, {"b", 1}, {"a", 2}, {"b", 2}}));
}

TEST(EventBusRealClock, PendingEventArrivesAfterAboutASecond) {
  EventBus bus;
  std::mutex mutex;
  std::condition_variable cv;
  std::vector<std::string> lines;
  bus.subscribe([&](const std::string& line) {
    std::lock_guard lock(mutex);
    lines.push_back(line);
    cv.notify_all();
  });
  const auto start = std::chrono::steady_clock::now();
  bus.emit("QUORUM_FAILURE", {{"reference", "q"}, {"sector-num", 0}, {"sectors-count", 1}});
  bus.emit("QUORUM_FAILURE", {{"reference", "q"}, {"sector-num", 9}, {"sectors-count", 1}});
  std::unique_lock lock(mutex);
  ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(5), [&] { return lines.size() == 2; }));
  const auto waited = std::chrono::steady_clock::now() - start;
  EXPECT_GE(waited, milliseconds(990));
  EXPECT_EQ(nlohmann::json::parse(lines[1])["data"]["sector-num"], 9) << lines[1];
}

}  // namespace
}  // namespace blockd::qmp
