// Background jobs: QEMU's job model (qapi/job.json) as blockd runs it.
//
// A job is a coroutine that does long work (creating an image) on the main loop while QMP stays
// responsive. Around that coroutine sits QEMU's life cycle, which clients watch through
// JOB_STATUS_CHANGE events and query-jobs:
//
//   created -> running -> waiting -> pending -> concluded -> null        (success)
//   created -> running -> aborting -> concluded -> null                  (failure or cancel)
//
// A job that does not finalize automatically stops in pending until job-finalize; a job that does
// not dismiss itself stays concluded (still listed, with its error) until job-dismiss. The other
// statuses (paused, ready, standby) belong to jobs blockd does not run yet; the transition and verb
// tables below still cover them so that every status check follows QEMU.
//
// Threads: everything here runs on the main loop.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/event.h"
#include "runtime/loop.h"
#include "runtime/status.h"
#include "runtime/task.h"

namespace blockd::block {

// The statuses of a job, in the order of QAPI's JobStatus.
enum class JobStatus {
  kUndefined,
  kCreated,
  kRunning,
  kPaused,
  kReady,
  kStandby,
  kWaiting,
  kPending,
  kAborting,
  kConcluded,
  kNull,
};

// The actions a client may ask of a job, in the order of QAPI's JobVerb.
enum class JobVerb {
  kCancel,
  kPause,
  kResume,
  kSetSpeed,
  kComplete,
  kFinalize,
  kDismiss,
  kChange,
};

// The QAPI spellings ("running", "dismiss", ...).
std::string_view job_status_name(JobStatus status) noexcept;
std::string_view job_verb_name(JobVerb verb) noexcept;

// Whether a job may move from `from` to `to` (QEMU's transition table).
bool job_transition_allowed(JobStatus from, JobStatus to) noexcept;
// Whether a job in `status` accepts `verb` (QEMU's verb table).
bool job_verb_allowed(JobVerb verb, JobStatus status) noexcept;

// Job ids follow QEMU's rule for ids: a letter, then letters, digits, '-', '.' and '_'.
bool job_id_well_formed(std::string_view id) noexcept;

class JobRegistry;

class Job {
 public:
  // The work of a job. It runs once, on the main loop; it reports progress through the job and
  // should check is_cancelled() between steps of long work. Its Status is the job's result.
  using Body = std::function<Task<Status>(Job& job)>;

  struct Options {
    std::string id;
    std::string type;  // as QAPI's JobType: "create", ...
    bool auto_finalize = true;
    bool auto_dismiss = true;
  };

  const std::string& id() const noexcept { return options_.id; }
  const std::string& type() const noexcept { return options_.type; }
  JobStatus status() const noexcept { return status_; }
  bool auto_finalize() const noexcept { return options_.auto_finalize; }
  bool auto_dismiss() const noexcept { return options_.auto_dismiss; }

  // Progress in arbitrary units, as query-jobs reports it.
  int64_t current_progress() const noexcept { return current_progress_; }
  int64_t total_progress() const noexcept { return total_progress_; }
  void set_total_progress(int64_t total) noexcept { total_progress_ = total; }
  void add_progress(int64_t done) noexcept { current_progress_ += done; }

  // Why the job failed ("Operation canceled" after a cancel); empty while it runs or on success.
  const std::optional<std::string>& error() const noexcept { return error_; }

  // True once job-cancel was accepted; the body should stop at its next step.
  bool is_cancelled() const noexcept { return cancelled_; }

 private:
  friend class JobRegistry;
  Job(Options options, Body body) : options_(std::move(options)), body_(std::move(body)) {}

  Options options_;
  Body body_;
  JobStatus status_ = JobStatus::kUndefined;
  int64_t current_progress_ = 0;
  int64_t total_progress_ = 0;
  std::optional<std::string> error_;
  bool cancelled_ = false;
  bool body_running_ = false;
};

// Every job of an engine, by id. Main loop only.
class JobRegistry {
 public:
  // `on_status_change` is called after every status change (the QMP layer emits
  // JOB_STATUS_CHANGE from it). `loop` runs the job bodies.
  JobRegistry(Loop& loop, std::function<void(const Job&)> on_status_change);
  ~JobRegistry();
  JobRegistry(const JobRegistry&) = delete;
  JobRegistry& operator=(const JobRegistry&) = delete;

  // Registers a job in status created. Errors (GenericError, QEMU's texts):
  //   "Invalid job ID '<id>'", "Job ID '<id>' already in use".
  Expected<Job*> create(Job::Options options, Job::Body body);
  // Moves a created job to running and starts its body, which runs until its first wait before
  // start() returns (a body that never waits has concluded by then, as a create job that fails
  // at once does in QEMU).
  void start(Job& job);

  // The job commands. Errors: "Job not found", and for a status that does not accept the verb
  // "Job '<id>' in state '<status>' cannot accept command verb '<verb>'".
  Status cancel(std::string_view id);
  Status finalize(std::string_view id);
  Status dismiss(std::string_view id);

  // The job named `id`, or null.
  Job* find(std::string_view id) const noexcept;
  // Every job not yet dismissed, newest first (the order query-jobs lists them in).
  std::vector<const Job*> jobs() const;

  // For shutdown: cancels every job and completes once no job body runs any more.
  Task<void> cancel_all();
  // Number of job bodies still running.
  size_t running_bodies() const noexcept { return running_bodies_; }

 private:
  void transition(Job& job, JobStatus to);
  Status check_verb(const Job& job, JobVerb verb) const;
  Task<void> run(Job* job);
  // After the body: waiting -> pending -> (finalize) or aborting -> concluded.
  void completed(Job& job);
  void conclude(Job& job);
  void remove(Job& job);

  Loop& loop_;
  std::function<void(const Job&)> on_status_change_;
  std::vector<std::unique_ptr<Job>> jobs_;  // oldest first
  size_t running_bodies_ = 0;
  Event body_finished_;
};

}  // namespace blockd::block
