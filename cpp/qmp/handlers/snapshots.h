// Shared by the block handlers: how a qcow2 snapshot table entry appears in QMP.
#pragma once

#include "drivers/qcow2/format.h"
#include "qapi/types.h"

namespace blockd::qapi {

// The SnapshotInfo QEMU reports for a snapshot (vm-clock split into seconds and nanoseconds;
// icount only when recorded).
SnapshotInfo snapshot_info(const drivers::qcow2::SnapshotEntry& entry);

}  // namespace blockd::qapi
