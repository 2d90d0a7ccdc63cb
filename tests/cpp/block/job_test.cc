// The job life cycle: QEMU's transition and verb tables, and the paths a job takes through them.
#include "block/job.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "test_support.h"

namespace blockd::block {
namespace {

using testing::make_loop;

// A registry whose status changes are recorded as "id:status" strings. The bodies below wait
// only on Events, which resume them inline, so every step is synchronous.
struct Fixture {
  std::unique_ptr<Loop> loop = make_loop();
  std::vector<std::string> events;
  JobRegistry jobs{*loop, [this](const Job& job) {
                     events.push_back(job.id() + ":" + std::string(job_status_name(job.status())));
                   }};
};

// A body that waits for `gate`, then returns `result` (checking the cancel flag on the way).
Job::Body gated_body(Event& gate, Status result = Status::ok(), bool* saw_cancel = nullptr) {
  return [&gate, result, saw_cancel](Job& job) -> Task<Status> {
    return [](Event& gate, Status result, bool* saw_cancel, Job& job) -> Task<Status> {
      job.set_total_progress(2);
      job.add_progress(1);
      co_await gate.wait();
      if (saw_cancel) *saw_cancel = job.is_cancelled();
      job.add_progress(1);
      co_return result;
    }(gate, result, saw_cancel, job);
  };
}

Job::Options options(std::string id, bool auto_finalize = true, bool auto_dismiss = false) {
  return {.id = std::move(id), .type = "create", .auto_finalize = auto_finalize,
          .auto_dismiss = auto_dismiss};
}

TEST(JobTables, TransitionsFollowQemu) {
  using S = JobStatus;
  EXPECT_TRUE(job_transition_allowed(S::kUndefined, S::kCreated));
  EXPECT_TRUE(job_transition_allowed(S::kCreated, S::kRunning));
  EXPECT_TRUE(job_transition_allowed(S::kCreated, S::kAborting));
  EXPECT_TRUE(job_transition_allowed(S::kRunning, S::kWaiting));
  EXPECT_TRUE(job_transition_allowed(S::kRunning, S::kPaused));
  EXPECT_TRUE(job_transition_allowed(S::kPaused, S::kRunning));
  EXPECT_TRUE(job_transition_allowed(S::kReady, S::kStandby));
  EXPECT_TRUE(job_transition_allowed(S::kWaiting, S::kPending));
  EXPECT_TRUE(job_transition_allowed(S::kPending, S::kConcluded));
  EXPECT_TRUE(job_transition_allowed(S::kAborting, S::kConcluded));
  EXPECT_TRUE(job_transition_allowed(S::kConcluded, S::kNull));
  EXPECT_FALSE(job_transition_allowed(S::kRunning, S::kConcluded));
  EXPECT_FALSE(job_transition_allowed(S::kRunning, S::kPending));
  EXPECT_FALSE(job_transition_allowed(S::kConcluded, S::kRunning));
  EXPECT_FALSE(job_transition_allowed(S::kPaused, S::kAborting));
  for (int to = 0; to <= static_cast<int>(S::kNull); ++to) {
    EXPECT_FALSE(job_transition_allowed(S::kNull, static_cast<S>(to)));
  }
}

TEST(JobTables, VerbsFollowQemu) {
  using S = JobStatus;
  EXPECT_TRUE(job_verb_allowed(JobVerb::kCancel, S::kRunning));
  EXPECT_TRUE(job_verb_allowed(JobVerb::kCancel, S::kPending));
  EXPECT_FALSE(job_verb_allowed(JobVerb::kCancel, S::kAborting));
  EXPECT_FALSE(job_verb_allowed(JobVerb::kCancel, S::kConcluded));
  EXPECT_TRUE(job_verb_allowed(JobVerb::kDismiss, S::kConcluded));
  EXPECT_FALSE(job_verb_allowed(JobVerb::kDismiss, S::kRunning));
  EXPECT_TRUE(job_verb_allowed(JobVerb::kFinalize, S::kPending));
  EXPECT_FALSE(job_verb_allowed(JobVerb::kFinalize, S::kConcluded));
  EXPECT_TRUE(job_verb_allowed(JobVerb::kComplete, S::kReady));
  EXPECT_FALSE(job_verb_allowed(JobVerb::kComplete, S::kRunning));
  EXPECT_EQ(job_verb_name(JobVerb::kSetSpeed), "set-speed");
  EXPECT_EQ(job_status_name(JobStatus::kConcluded), "concluded");
}

TEST(JobTables, IdsFollowQemu) {
  EXPECT_TRUE(job_id_well_formed("j"));
  EXPECT_TRUE(job_id_well_formed("job-1.a_b"));
  EXPECT_FALSE(job_id_well_formed(""));
  EXPECT_FALSE(job_id_well_formed("1job"));
  EXPECT_FALSE(job_id_well_formed("#block1"));
  EXPECT_FALSE(job_id_well_formed("a b"));
}

TEST(JobRegistry, SuccessWaitsConcludedForDismiss) {
  Fixture f;
  Event gate;
  auto job = f.jobs.create(options("j1"), gated_body(gate));
  ASSERT_TRUE(job.has_value());
  f.jobs.start(**job);
  EXPECT_EQ(f.events, (std::vector<std::string>{"j1:created", "j1:running"}));
  EXPECT_EQ((*job)->status(), JobStatus::kRunning);
  EXPECT_EQ((*job)->current_progress(), 1);
  EXPECT_EQ((*job)->total_progress(), 2);
  Status refused = f.jobs.dismiss("j1");
  EXPECT_EQ(refused.message(), "Job 'j1' in state 'running' cannot accept command verb 'dismiss'");
  EXPECT_EQ(f.jobs.finalize("j1").message(),
            "Job 'j1' in state 'running' cannot accept command verb 'finalize'");

  gate.notify_all();
  EXPECT_EQ(f.events, (std::vector<std::string>{"j1:created", "j1:running", "j1:waiting",
                                                "j1:pending", "j1:concluded"}));
  EXPECT_EQ((*job)->current_progress(), 2);
  EXPECT_FALSE((*job)->error().has_value());
  EXPECT_EQ(f.jobs.cancel("j1").message(),
            "Job 'j1' in state 'concluded' cannot accept command verb 'cancel'");
  ASSERT_EQ(f.jobs.jobs().size(), 1u);

  EXPECT_TRUE(f.jobs.dismiss("j1").is_ok());
  EXPECT_EQ(f.events.back(), "j1:null");
  EXPECT_TRUE(f.jobs.jobs().empty());
  EXPECT_EQ(f.jobs.dismiss("j1").message(), "Job not found");
}

TEST(JobRegistry, AutoDismissEndsInNull) {
  Fixture f;
  Event gate;
  auto job = f.jobs.create(options("j", true, true), gated_body(gate));
  ASSERT_TRUE(job.has_value());
  f.jobs.start(**job);
  gate.notify_all();
  EXPECT_EQ(f.events, (std::vector<std::string>{"j:created", "j:running", "j:waiting",
                                                "j:pending", "j:concluded", "j:null"}));
  EXPECT_EQ(f.jobs.find("j"), nullptr);
}

TEST(JobRegistry, ManualFinalizeWaitsInPending) {
  Fixture f;
  Event gate;
  auto job = f.jobs.create(options("j", false, false), gated_body(gate));
  ASSERT_TRUE(job.has_value());
  f.jobs.start(**job);
  gate.notify_all();
  EXPECT_EQ((*job)->status(), JobStatus::kPending);
  EXPECT_EQ(f.jobs.dismiss("j").message(),
            "Job 'j' in state 'pending' cannot accept command verb 'dismiss'");
  EXPECT_TRUE(f.jobs.finalize("j").is_ok());
  EXPECT_EQ((*job)->status(), JobStatus::kConcluded);
  EXPECT_EQ(f.events.back(), "j:concluded");
}

TEST(JobRegistry, CancelInPendingAborts) {
  Fixture f;
  Event gate;
  auto job = f.jobs.create(options("j", false, false), gated_body(gate));
  ASSERT_TRUE(job.has_value());
  f.jobs.start(**job);
  gate.notify_all();
  ASSERT_TRUE(f.jobs.cancel("j").is_ok());
  EXPECT_EQ(f.events, (std::vector<std::string>{"j:created", "j:running", "j:waiting",
                                                "j:pending", "j:aborting", "j:concluded"}));
  EXPECT_EQ((*job)->error(), "Operation canceled");
}

TEST(JobRegistry, FailureAbortsWithTheBodysError) {
  Fixture f;
  Event gate;
  auto job = f.jobs.create(options("j"), gated_body(gate, Status::generic("disk on fire")));
  ASSERT_TRUE(job.has_value());
  f.jobs.start(**job);
  gate.notify_all();
  EXPECT_EQ(f.events, (std::vector<std::string>{"j:created", "j:running", "j:aborting",
                                                "j:concluded"}));
  EXPECT_EQ((*job)->error(), "disk on fire");
}

TEST(JobRegistry, CancelWhileRunningReachesTheBody) {
  Fixture f;
  Event gate;
  bool saw_cancel = false;
  // The body succeeds anyway: a cancelled job still aborts.
  auto job = f.jobs.create(options("j"), gated_body(gate, Status::ok(), &saw_cancel));
  ASSERT_TRUE(job.has_value());
  f.jobs.start(**job);
  ASSERT_TRUE(f.jobs.cancel("j").is_ok());
  EXPECT_EQ((*job)->status(), JobStatus::kRunning);  // until the body notices
  gate.notify_all();
  EXPECT_TRUE(saw_cancel);
  EXPECT_EQ(f.events, (std::vector<std::string>{"j:created", "j:running", "j:aborting",
                                                "j:concluded"}));
  EXPECT_EQ((*job)->error(), "Operation canceled");
}

TEST(JobRegistry, CancelBeforeStartNeverRunsTheBody) {
  Fixture f;
  bool ran = false;
  auto job = f.jobs.create(options("j"), [&ran](Job&) -> Task<Status> {
    ran = true;
    return []() -> Task<Status> { co_return Status::ok(); }();
  });
  ASSERT_TRUE(job.has_value());
  ASSERT_TRUE(f.jobs.cancel("j").is_ok());
  EXPECT_FALSE(ran);
  EXPECT_EQ(f.events, (std::vector<std::string>{"j:created", "j:aborting", "j:concluded"}));
}

TEST(JobRegistry, RefusesBadAndDuplicateIds) {
  Fixture f;
  Event gate;
  EXPECT_EQ(f.jobs.create(options("bad id"), gated_body(gate)).status().message(),
            "Invalid job ID 'bad id'");
  auto job = f.jobs.create(options("j"), gated_body(gate));
  ASSERT_TRUE(job.has_value());
  EXPECT_EQ(f.jobs.create(options("j"), gated_body(gate)).status().message(),
            "Job ID 'j' already in use");
  EXPECT_EQ(f.jobs.cancel("nope").message(), "Job not found");
  EXPECT_EQ(f.jobs.finalize("nope").message(), "Job not found");
  EXPECT_EQ(f.events, (std::vector<std::string>{"j:created"}));
  (void)f.jobs.cancel("j");
}

TEST(JobRegistry, ListsNewestFirst) {
  Fixture f;
  Event gate;
  for (const char* id : {"a", "b", "c"}) {
    auto job = f.jobs.create(options(id), gated_body(gate));
    ASSERT_TRUE(job.has_value());
    f.jobs.start(**job);
  }
  std::vector<std::string> ids;
  for (const Job* job : f.jobs.jobs()) ids.push_back(job->id());
  EXPECT_EQ(ids, (std::vector<std::string>{"c", "b", "a"}));
  gate.notify_all();
}

TEST(JobRegistry, CancelAllWaitsForRunningBodies) {
  Fixture f;
  Event gate;
  auto job = f.jobs.create(options("j"), gated_body(gate));
  ASSERT_TRUE(job.has_value());
  f.jobs.start(**job);
  bool cancelled_all = false;
  f.loop->spawn([](JobRegistry& jobs, bool& done) -> Task<void> {
    co_await jobs.cancel_all();
    done = true;
  }(f.jobs, cancelled_all));
  EXPECT_FALSE(cancelled_all);
  EXPECT_EQ(f.jobs.running_bodies(), 1u);
  gate.notify_all();
  EXPECT_TRUE(cancelled_all);
  EXPECT_EQ((*job)->status(), JobStatus::kConcluded);
  EXPECT_EQ((*job)->error(), "Operation canceled");
}

}  // namespace
}  // namespace blockd::block
