#include "block/job.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <initializer_list>

namespace blockd::block {
namespace {

constexpr size_t kStatusCount = static_cast<size_t>(JobStatus::kNull) + 1;

// A set of statuses as a bit mask, for the two tables below.
constexpr uint32_t statuses(std::initializer_list<JobStatus> list) {
  uint32_t mask = 0;
  for (JobStatus status : list) mask |= 1u << static_cast<unsigned>(status);
  return mask;
}

using S = JobStatus;

// Where each status may lead (indexed by the status left).
constexpr uint32_t kNextStatuses[kStatusCount] = {
    /* undefined */ statuses({S::kCreated}),
    /* created   */ statuses({S::kRunning, S::kAborting, S::kNull}),
    /* running   */ statuses({S::kPaused, S::kReady, S::kWaiting, S::kAborting}),
    /* paused    */ statuses({S::kRunning}),
    /* ready     */ statuses({S::kStandby, S::kWaiting, S::kAborting}),
    /* standby   */ statuses({S::kReady}),
    /* waiting   */ statuses({S::kPending, S::kAborting}),
    /* pending   */ statuses({S::kAborting, S::kConcluded}),
    /* aborting  */ statuses({S::kAborting, S::kConcluded}),
    /* concluded */ statuses({S::kNull}),
    /* null      */ 0,
};

// Which statuses accept each verb (indexed by the verb).
constexpr uint32_t kVerbStatuses[] = {
    /* cancel    */ statuses({S::kCreated, S::kRunning, S::kPaused, S::kReady, S::kStandby,
                              S::kWaiting, S::kPending}),
    /* pause     */ statuses({S::kCreated, S::kRunning, S::kPaused, S::kReady, S::kStandby}),
    /* resume    */ statuses({S::kCreated, S::kRunning, S::kPaused, S::kReady, S::kStandby}),
    /* set-speed */ statuses({S::kCreated, S::kRunning, S::kPaused, S::kReady, S::kStandby}),
    /* complete  */ statuses({S::kReady}),
    /* finalize  */ statuses({S::kPending}),
    /* dismiss   */ statuses({S::kConcluded}),
    /* change    */ statuses({S::kCreated, S::kRunning, S::kPaused, S::kReady, S::kStandby}),
};

constexpr bool has(uint32_t mask, JobStatus status) {
  return (mask >> static_cast<unsigned>(status)) & 1u;
}

}  // namespace

std::string_view job_status_name(JobStatus status) noexcept {
  static constexpr std::string_view kNames[kStatusCount] = {
      "undefined", "created", "running", "paused",    "ready", "standby",
      "waiting",   "pending", "aborting", "concluded", "null",
  };
  return kNames[static_cast<size_t>(status)];
}

std::string_view job_verb_name(JobVerb verb) noexcept {
  static constexpr std::string_view kNames[] = {
      "cancel", "pause", "resume", "set-speed", "complete", "finalize", "dismiss", "change",
  };
  return kNames[static_cast<size_t>(verb)];
}

bool job_transition_allowed(JobStatus from, JobStatus to) noexcept {
  return has(kNextStatuses[static_cast<size_t>(from)], to);
}

bool job_verb_allowed(JobVerb verb, JobStatus status) noexcept {
  return has(kVerbStatuses[static_cast<size_t>(verb)], status);
}

bool job_id_well_formed(std::string_view id) noexcept {
  if (id.empty() || !std::isalpha(static_cast<unsigned char>(id[0]))) return false;
  return std::all_of(id.begin() + 1, id.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '.' || c == '_';
  });
}

JobRegistry::JobRegistry(Loop& loop, std::function<void(const Job&)> on_status_change)
    : loop_(loop), on_status_change_(std::move(on_status_change)) {}

JobRegistry::~JobRegistry() = default;

Expected<Job*> JobRegistry::create(Job::Options options, Job::Body body) {
  if (!job_id_well_formed(options.id)) {
    return Status::generic("Invalid job ID '" + options.id + "'");
  }
  if (find(options.id) != nullptr) {
    return Status::generic("Job ID '" + options.id + "' already in use");
  }
  jobs_.push_back(std::unique_ptr<Job>(new Job(std::move(options), std::move(body))));
  Job& job = *jobs_.back();
  transition(job, JobStatus::kCreated);
  return &job;
}

void JobRegistry::start(Job& job) {
  transition(job, JobStatus::kRunning);
  job.body_running_ = true;
  ++running_bodies_;
  loop_.spawn(run(&job));
}

Task<void> JobRegistry::run(Job* job) {
  Status result = co_await job->body_(*job);
  // The body's captures (nodes, options) are not needed any more; a concluded job that waits for
  // job-dismiss must not keep nodes alive.
  job->body_ = nullptr;
  job->body_running_ = false;
  --running_bodies_;
  if (!result && !job->error_) job->error_ = result.message();
  completed(*job);
  body_finished_.notify_all();
}

void JobRegistry::completed(Job& job) {
  if (job.cancelled_ && !job.error_) job.error_ = errno_text(-ECANCELED);
  if (job.error_) {
    transition(job, JobStatus::kAborting);
    conclude(job);
    return;
  }
  transition(job, JobStatus::kWaiting);
  transition(job, JobStatus::kPending);
  if (job.auto_finalize()) conclude(job);
}

void JobRegistry::conclude(Job& job) {
  transition(job, JobStatus::kConcluded);
  if (job.auto_dismiss()) remove(job);
}

void JobRegistry::remove(Job& job) {
  transition(job, JobStatus::kNull);
  std::erase_if(jobs_, [&](const std::unique_ptr<Job>& entry) { return entry.get() == &job; });
}

void JobRegistry::transition(Job& job, JobStatus to) {
  // A failed check here is a bug in this file, never a client's doing: the verbs are checked
  // before anything moves.
  if (!job_transition_allowed(job.status_, to)) std::terminate();
  job.status_ = to;
  if (on_status_change_) on_status_change_(job);
}

Status JobRegistry::check_verb(const Job& job, JobVerb verb) const {
  if (job_verb_allowed(verb, job.status())) return Status::ok();
  return Status::generic("Job '" + job.id() + "' in state '" +
                         std::string(job_status_name(job.status())) +
                         "' cannot accept command verb '" + std::string(job_verb_name(verb)) +
                         "'");
}

Job* JobRegistry::find(std::string_view id) const noexcept {
  for (const auto& job : jobs_) {
    if (job->id() == id) return job.get();
  }
  return nullptr;
}

std::vector<const Job*> JobRegistry::jobs() const {
  std::vector<const Job*> list;
  for (auto it = jobs_.rbegin(); it != jobs_.rend(); ++it) list.push_back(it->get());
  return list;
}

Status JobRegistry::cancel(std::string_view id) {
  Job* job = find(id);
  if (job == nullptr) return Status::generic("Job not found");
  BLOCKD_RETURN_IF_ERROR(check_verb(*job, JobVerb::kCancel));
  job->cancelled_ = true;
  // A running body sees the flag at its next step and the job aborts once the body returns.
  // Otherwise nothing runs that could notice: abort now.
  if (!job->body_running_) {
    job->body_ = nullptr;
    completed(*job);
  }
  return Status::ok();
}

Status JobRegistry::finalize(std::string_view id) {
  Job* job = find(id);
  if (job == nullptr) return Status::generic("Job not found");
  BLOCKD_RETURN_IF_ERROR(check_verb(*job, JobVerb::kFinalize));
  conclude(*job);
  return Status::ok();
}

Status JobRegistry::dismiss(std::string_view id) {
  Job* job = find(id);
  if (job == nullptr) return Status::generic("Job not found");
  BLOCKD_RETURN_IF_ERROR(check_verb(*job, JobVerb::kDismiss));
  remove(*job);
  return Status::ok();
}

Task<void> JobRegistry::cancel_all() {
  std::vector<std::string> ids;
  for (const auto& job : jobs_) ids.push_back(job->id());
  for (const auto& id : ids) {
    if (Job* job = find(id); job && job_verb_allowed(JobVerb::kCancel, job->status())) {
      (void)cancel(id);
    }
  }
  while (running_bodies_ > 0) co_await body_finished_.wait();
}

}  // namespace blockd::block
