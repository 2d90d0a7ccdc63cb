// Handlers of the job commands (query-jobs, job-cancel, job-dismiss, job-finalize) and the
// JOB_STATUS_CHANGE event. The life cycle itself is block::JobRegistry's.
#include "qapi/commands.h"
#include "qapi/events.h"
#include "qmp/context.h"

namespace blockd::qmp {

namespace {

// block::JobStatus follows QAPI's JobStatus value for value; the names tie the two together.
qapi::JobStatus to_qapi(block::JobStatus status) {
  qapi::JobStatus out{};
  qapi::parse_enum(block::job_status_name(status), out);
  return out;
}

}  // namespace

void Context::job_status_changed(const block::Job& job) {
  qapi::JobStatusChangeEvent event;
  event.id = job.id();
  event.status = to_qapi(job.status());
  qapi::emit_job_status_change(events_, event);
}

}  // namespace blockd::qmp

namespace blockd::qapi {

Expected<std::vector<JobInfo>> qmp_query_jobs(qmp::Context& context) {
  std::vector<JobInfo> infos;
  for (const block::Job* job : context.jobs().jobs()) {
    JobInfo info;
    info.id = job->id();
    parse_enum(job->type(), info.type);
    info.status = qmp::to_qapi(job->status());
    info.current_progress = job->current_progress();
    info.total_progress = job->total_progress();
    info.error = job->error();
    infos.push_back(std::move(info));
  }
  return infos;
}

Status qmp_job_cancel(qmp::Context& context, const JobCancelArgs& args) {
  return context.jobs().cancel(args.id);
}

Status qmp_job_dismiss(qmp::Context& context, const JobDismissArgs& args) {
  return context.jobs().dismiss(args.id);
}

Status qmp_job_finalize(qmp::Context& context, const JobFinalizeArgs& args) {
  return context.jobs().finalize(args.id);
}

}  // namespace blockd::qapi
