// defines: the simulated runtime's ordering checks, shared by the simulator and host code that
// stands in for device libraries: operations on streams (kernels, copies, memsets, host accesses)
// and the accesses each makes to rt::device_alloc memory; device_alloc_view, an allocation that
// device memory in use does not count.
//
// Every operation gets a place on its stream's clock. An access to a granule of device memory is
// ordered after an earlier one when that came from the same stream, or from a stream whose work up
// to it was made visible to this one: an event recorded after it that this stream waited on, or a
// host synchronisation (stream_synchronize, device_synchronize) before this operation was issued.
// A read of bytes whose last write is not ordered before it, or a write not ordered after the last
// write and reads, is reported, naming both operations, their streams and the allocation.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "kernels/sim/sim.h"

namespace tf::sim {

// Bytes of device memory one ordering record covers: pieces carved from one allocation at
// 256-byte boundaries never share one.
inline constexpr size_t kStreamGranule = 64;

// Per-granule ordering state of one rt::device_alloc allocation.
struct StreamShadow;

// Starts operation `what` ("kernel 'gemm'") on `stream` (an rt::StreamHandle) for this host thread;
// until end_stream_op, stream_access records accesses as made by it.
void begin_stream_op(void* stream, std::string what);
void end_stream_op();
// Records an access of the running operation to [addr, addr + bytes) of r. Returns "" or what it
// races with. Memory outside rt::device_alloc (sim::DeviceBuffer) is not tracked.
std::string stream_access(const Region* r, uintptr_t addr, size_t bytes, AccessKind kind);

// For host code standing in for a device library (the GEMM stand-in): checks that [p, p + bytes)
// lies in one live device allocation and records the access, named `what`, as an operation on
// rt::current_stream(). Throws tf::Error naming `what` and the allocation otherwise.
void host_access(const void* p, size_t bytes, AccessKind kind, const char* what);

// An rt::device_alloc allocation (freed by rt::device_free) for memory that is part of one already
// counted, such as a device arena's piece given an allocation of its own so that its bounds are
// checked: checked like any, but left out of rt::memory_in_use, which would count its bytes twice.
void* device_alloc_view(size_t bytes, const char* what);

}  // namespace tf::sim
