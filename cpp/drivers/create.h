// Image creation (blockdev-create): what every creating driver shares.
#pragma once

#include <functional>

namespace blockd::drivers {

// How much of a new image is allocated up front (QAPI's PreallocMode).
enum class Preallocation {
  kOff,       // nothing beyond the metadata that must exist
  kMetadata,  // all format metadata; data stays unallocated on the host (formats only)
  kFalloc,    // metadata, and the host space of the data reserved with fallocate
  kFull,      // metadata, and the data written with zeroes
};

// Polled by a creating driver between steps of long work; true asks it to stop with -ECANCELED.
using CancelCheck = std::function<bool()>;

}  // namespace blockd::drivers
