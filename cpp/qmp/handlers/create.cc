// Handler of blockdev-create: translates the schema's BlockdevCreateOptions into a driver's
// creation options and runs the driver's creation as a "create" job.
//
// As in QEMU, only an unsupported driver and a bad or duplicate job id fail the command itself;
// everything else (a missing node, invalid options, I/O errors) fails the job, whose error
// query-jobs reports. The job finalizes itself and waits for job-dismiss once concluded.
#include "drivers/file_create.h"
#include "drivers/qcow2/create.h"
#include "qapi/commands.h"
#include "qmp/context.h"

namespace blockd::qapi {

// Defined in handlers/block.cc: a node name finds that node, a definition opens a new node.
Expected<std::shared_ptr<block::Node>> open_blockdev_ref(qmp::Context& context,
                                                         const BlockdevRef& ref);

namespace {

drivers::Preallocation to_driver(std::optional<PreallocMode> mode) {
  switch (mode.value_or(PreallocMode::kOff)) {
    case PreallocMode::kOff:
      return drivers::Preallocation::kOff;
    case PreallocMode::kMetadata:
      return drivers::Preallocation::kMetadata;
    case PreallocMode::kFalloc:
      return drivers::Preallocation::kFalloc;
    case PreallocMode::kFull:
      return drivers::Preallocation::kFull;
  }
  return drivers::Preallocation::kOff;
}

drivers::FileCreateOptions to_driver(const BlockdevCreateOptionsFile& options) {
  drivers::FileCreateOptions out;
  out.filename = options.filename;
  out.size = options.size;
  out.preallocation = to_driver(options.preallocation);
  out.nocow = options.nocow.value_or(false);
  if (options.extent_size_hint) out.extent_size_hint = *options.extent_size_hint;
  return out;
}

drivers::qcow2::CreateOptions to_driver(const BlockdevCreateOptionsQcow2& options) {
  drivers::qcow2::CreateOptions out;
  out.size = options.size;
  if (options.version) out.version = *options.version == BlockdevQcow2Version::kV2 ? 2 : 3;
  out.cluster_size = options.cluster_size;
  out.refcount_bits = options.refcount_bits;
  out.lazy_refcounts = options.lazy_refcounts.value_or(false);
  out.backing_file = options.backing_file;
  if (options.backing_fmt) out.backing_format = std::string(to_string(*options.backing_fmt));
  out.preallocation = to_driver(options.preallocation);
  out.zstd = options.compression_type == Qcow2CompressionType::kZstd;
  out.data_file = options.data_file.has_value();
  out.data_file_raw = options.data_file_raw.value_or(false);
  out.extended_l2 = options.extended_l2.value_or(false);
  out.encrypt = options.encrypt.has_value();
  return out;
}

// QEMU's create job counts one unit of progress, done when the driver returns.
Task<Status> with_progress(block::Job& job, Task<Status> work) {
  job.set_total_progress(1);
  Status result = co_await std::move(work);
  job.add_progress(1);
  co_return result;
}

Task<Status> create_qcow2(qmp::Context& context, BlockdevCreateOptionsQcow2 options,
                          block::Job& job) {
  auto file = open_blockdev_ref(context, options.file);
  if (!file) co_return file.status();
  co_return co_await drivers::qcow2::create_image(std::move(file).value(), to_driver(options),
                                                  [&job] { return job.is_cancelled(); });
}

}  // namespace

Status qmp_blockdev_create(qmp::Context& context, const BlockdevCreateArgs& args) {
  const BlockdevCreateOptions& options = args.options;
  block::Job::Body body;
  switch (options.driver) {
    case BlockdevDriver::kFile:
      body = [&context, file = to_driver(*options.u.file)](block::Job& job) {
        return with_progress(job, drivers::create_file(file, context.main_loop(), [&job] {
                               return job.is_cancelled();
                             }));
      };
      break;
    case BlockdevDriver::kQcow2:
      body = [&context, qcow2 = *options.u.qcow2](block::Job& job) {
        return with_progress(job, create_qcow2(context, qcow2, job));
      };
      break;
    default:
      return Status::generic("Driver does not support blockdev-create");
  }
  auto job = context.jobs().create(
      {.id = args.job_id, .type = "create", .auto_finalize = true, .auto_dismiss = false},
      std::move(body));
  if (!job) return job.status();
  context.jobs().start(**job);
  return Status::ok();
}

}  // namespace blockd::qapi
