// defines: tests of the simulated device runtime (tf::simt::rt): allocation, copies both ways,
// memset, the bounds and liveness checks of copies and kernels on rt::device_alloc memory, the
// ordering checks between streams, and the check of raw device pointers in kernel parameter structs.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <string>
#include <vector>

#include "kernels/cuda/port.h"
#include "kernels/cuda/runtime.h"
#include "kernels/sim/runtime.h"
#include "src/core/error.h"
#include "tests/sim_test_util.h"

namespace port = tf::port;
using tf::sim::AccessKind;
namespace rt = tf::simt::rt;

namespace {

using tf::test::expect_contains;
using tf::test::launch_error;

__global__ void add_one(port::gptr<float> v, int n) {
  const int i = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < n) v[i] = float(v[i]) + 1.0f;
}

__global__ void write_all(port::gptr<float> v, int n) {
  const int i = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < n) v[i] = 1.0f;
}

TEST(SimRuntime, DescribesOneDevice) {
  EXPECT_EQ(rt::device_count(), 1);
  EXPECT_EQ(rt::device_name(0), "SIMT simulator");
  EXPECT_GT(rt::device_total_memory(0), size_t(0));
  rt::set_device(0);
  expect_contains(launch_error([] { rt::set_device(1); }), {"rt::set_device(1)", "one device"});
}

TEST(SimRuntime, AllocationStartsAsNaNBytes) {
  auto* p = static_cast<uint8_t*>(rt::device_alloc(100, "fresh"));
  std::vector<uint8_t> host(100, 0);
  rt::memcpy_d2h(host.data(), p, 100, nullptr);
  for (uint8_t b : host) EXPECT_EQ(b, 0xff);
  rt::device_free(p);
}

TEST(SimRuntime, CopiesBothWaysMemsetAndAKernel) {
  const int n = 100;
  std::vector<float> x(n);
  for (int i = 0; i < n; ++i) x[size_t(i)] = float(i) * 0.5f - 7.0f;
  auto* a = static_cast<float*>(rt::device_alloc(n * sizeof(float), "a"));
  auto* b = static_cast<float*>(rt::device_alloc(n * sizeof(float), "b"));
  rt::memcpy_h2d(a, x.data(), n * sizeof(float), nullptr);
  rt::memcpy_d2d(b, a, n * sizeof(float), nullptr);
  port::launch(add_one, port::LaunchConfig{"add_one", dim3(2), dim3(64)}, b, n);
  std::vector<float> got(n, 0.0f);
  rt::memcpy_d2h(got.data(), b, n * sizeof(float), nullptr);
  rt::stream_synchronize(nullptr);
  // x + 1 is exact for these values (multiples of 0.5 well inside f32's integer range).
  for (int i = 0; i < n; ++i) EXPECT_EQ(got[size_t(i)], x[size_t(i)] + 1.0f) << i;

  // memset of a middle range leaves the bytes around it alone.
  rt::memset_async(reinterpret_cast<uint8_t*>(b) + 8, 0, 16, nullptr);
  rt::memcpy_d2h(got.data(), b, n * sizeof(float), nullptr);
  rt::device_synchronize();
  for (int i = 0; i < n; ++i) EXPECT_EQ(got[size_t(i)], i >= 2 && i < 6 ? 0.0f : x[size_t(i)] + 1.0f) << i;
  rt::device_free(a);
  rt::device_free(b);
}

TEST(SimRuntime, CopyAndMemsetBoundsNameTheAllocation) {
  auto* p = static_cast<uint8_t*>(rt::device_alloc(64, "weights"));
  std::vector<uint8_t> host(128, 0);
  expect_contains(launch_error([&] { rt::memcpy_h2d(p + 16, host.data(), 64, nullptr); }),
                  {"destination of rt::memcpy_h2d", "'weights'", "byte offset 16", "16 bytes past its end"});
  expect_contains(launch_error([&] { rt::memcpy_d2h(host.data(), p, 65, nullptr); }),
                  {"source of rt::memcpy_d2h", "'weights'", "1 bytes past its end"});
  expect_contains(launch_error([&] { rt::memset_async(p + 60, 0, 8, nullptr); }),
                  {"destination of rt::memset_async", "'weights'", "4 bytes past its end"});
  expect_contains(launch_error([&] { rt::memcpy_d2d(p, host.data(), 8, nullptr); }),
                  {"source of rt::memcpy_d2d", "is not device memory"});
  rt::device_free(p);
}

TEST(SimRuntime, KernelAccessesToDeviceAllocAreBoundsChecked) {
  auto* p = static_cast<float*>(rt::device_alloc(100 * sizeof(float), "activations"));
  // 128 threads over 100 elements with the bound set past the end: the write to element 100 fails.
  expect_contains(launch_error([&] {
                    port::launch(write_all, port::LaunchConfig{"write_all", dim3(2), dim3(64)}, p, 128);
                  }),
                  {"out-of-bounds write", "kernel 'write_all'", "global buffer 'activations'"});
  port::launch(write_all, port::LaunchConfig{"write_all", dim3(2), dim3(64)}, p, 100);
  rt::device_free(p);
}

TEST(SimRuntime, ScratchGrowsOnlyForLargerSizes) {
  void* a = rt::scratch(0, 256);
  EXPECT_EQ(rt::scratch(0, 128), a);
  EXPECT_EQ(rt::scratch(0, 256), a);
  void* b = rt::scratch(0, 4096);
  EXPECT_NE(b, nullptr);
  rt::memset_async(b, 0, 4096, nullptr);
  expect_contains(launch_error([] { rt::scratch(-1, 8); }), {"rt::scratch: slot -1"});
  rt::release_scratch();
}

TEST(SimRuntime, StreamsAndEventsAreValidated) {
  rt::StreamHandle s = rt::stream_create();
  rt::EventHandle e = rt::event_create();
  rt::event_record(e, s);
  rt::stream_wait_event(nullptr, e);
  rt::set_current_stream(s);
  EXPECT_EQ(rt::current_stream(), s);
  rt::set_current_stream(nullptr);
  rt::stream_synchronize(s);
  rt::event_destroy(e);
  rt::stream_destroy(s);
  expect_contains(launch_error([&] { rt::stream_synchronize(s); }), {"rt::stream_synchronize", "destroyed"});
  int not_a_stream = 0;
  expect_contains(launch_error([&] { rt::memset_async(nullptr, 0, 0, &not_a_stream); }),
                  {"rt::memset_async: stream", "rt::stream_create"});
}

TEST(SimRuntime, SyncAfterLaunchIsASetting) {
  const bool was = rt::sync_after_launch();
  rt::set_sync_after_launch(true);
  EXPECT_TRUE(rt::sync_after_launch());
  rt::set_sync_after_launch(false);
  EXPECT_FALSE(rt::sync_after_launch());
  rt::set_sync_after_launch(was);
}

// ---- use after free -------------------------------------------------------------------------------

TEST(SimRuntime, UseAfterFreeByAKernelACopyOrAMemsetNamesTheAllocation) {
  auto* p = static_cast<float*>(rt::device_alloc(64 * sizeof(float), "kv_cache"));
  rt::device_free(p);
  expect_contains(launch_error([&] {
                    port::launch(write_all, port::LaunchConfig{"write_all", dim3(1), dim3(64)}, p, 64);
                  }),
                  {"use after free", "kernel 'write_all'", "'kv_cache'", "rt::device_free"});
  std::vector<float> host(64, 0.0f);
  expect_contains(launch_error([&] { rt::memcpy_h2d(p + 4, host.data(), 16, nullptr); }),
                  {"use after free", "destination of rt::memcpy_h2d", "'kv_cache'", "byte offset 16"});
  expect_contains(launch_error([&] { rt::memcpy_d2h(host.data(), p, 16, nullptr); }),
                  {"use after free", "source of rt::memcpy_d2h", "'kv_cache'"});
  expect_contains(launch_error([&] { rt::memset_async(p, 0, 16, nullptr); }),
                  {"use after free", "destination of rt::memset_async", "'kv_cache'"});
}

TEST(SimRuntime, DoubleFreeInteriorAndHostPointersAreRefused) {
  auto* p = static_cast<uint8_t*>(rt::device_alloc(256, "grads"));
  expect_contains(launch_error([&] { rt::device_free(p + 8); }),
                  {"rt::device_free", "byte offset 8 of 'grads'", "not the start"});
  rt::device_free(p);
  expect_contains(launch_error([&] { rt::device_free(p); }), {"'grads'", "already freed (double free)"});
  int host = 0;
  expect_contains(launch_error([&] { rt::device_free(&host); }), {"rt::device_free", "not device memory"});
  tf::sim::DeviceBuffer owned(64, "owned");
  expect_contains(launch_error([&] { rt::device_free(owned.data()); }), {"'owned' is a sim::DeviceBuffer"});
}

// ---- ordering between streams -----------------------------------------------------------------------

__global__ void read_all(port::gptr<const float> v, port::gptr<float> out, int n) {
  const int i = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < n) out[i] = v[i];
}

// A copy stream and a compute stream, as the device backend has, with two device buffers.
struct TwoStreams : ::testing::Test {
  static constexpr int kN = 64;
  void SetUp() override {
    copy = rt::stream_create();
    compute = rt::stream_create();
    in = static_cast<float*>(rt::device_alloc(kN * sizeof(float), "batch"));
    out = static_cast<float*>(rt::device_alloc(kN * sizeof(float), "hidden"));
    host.assign(kN, 2.5f);
    done = rt::event_create();
  }
  void TearDown() override {
    rt::device_synchronize();
    rt::event_destroy(done);
    rt::device_free(in);
    rt::device_free(out);
    rt::stream_destroy(copy);
    rt::stream_destroy(compute);
  }
  void launch_read(rt::StreamHandle s) {
    port::launch(read_all, port::LaunchConfig{"read_all", dim3(1), dim3(kN), 0, s}, in, out, kN);
  }
  rt::StreamHandle copy = nullptr, compute = nullptr;
  rt::EventHandle done = nullptr;
  float* in = nullptr;
  float* out = nullptr;
  std::vector<float> host;
};

TEST_F(TwoStreams, AKernelReadingAnUploadNotWaitedForIsReported) {
  rt::memcpy_h2d(in, host.data(), kN * sizeof(float), copy);
  expect_contains(launch_error([&] { launch_read(compute); }),
                  {"stream race", "kernel 'read_all' on stream", "reads 'batch'",
                   "last written by rt::memcpy_h2d on stream", "not ordered before it"});
}

TEST_F(TwoStreams, AnEventRecordedBeforeTheUploadDoesNotOrderIt) {
  rt::event_record(done, copy);
  rt::memcpy_h2d(in, host.data(), kN * sizeof(float), copy);
  rt::stream_wait_event(compute, done);
  expect_contains(launch_error([&] { launch_read(compute); }), {"stream race", "reads 'batch'"});
}

TEST_F(TwoStreams, AnEventOrASynchronisationOrdersTheUpload) {
  rt::memcpy_h2d(in, host.data(), kN * sizeof(float), copy);
  rt::event_record(done, copy);
  rt::stream_wait_event(compute, done);
  launch_read(compute);
  std::vector<float> got(kN, 0.0f);
  rt::memcpy_d2h(got.data(), out, kN * sizeof(float), compute);
  rt::stream_synchronize(compute);
  EXPECT_EQ(got, host);

  // The host waits for the upload, so what it launches next comes after it.
  rt::stream_synchronize(compute);
  rt::memcpy_h2d(in, host.data(), kN * sizeof(float), copy);
  rt::stream_synchronize(copy);
  launch_read(compute);
  rt::device_synchronize();
  rt::memcpy_h2d(in, host.data(), kN * sizeof(float), copy);
  rt::device_synchronize();
  launch_read(compute);
}

TEST_F(TwoStreams, AnUploadOverwritingWhatAKernelStillReadsIsReported) {
  rt::memcpy_h2d(in, host.data(), kN * sizeof(float), copy);
  rt::stream_synchronize(copy);
  launch_read(compute);
  // The next batch's upload on the copy stream, without waiting for the kernel that reads this one.
  expect_contains(launch_error([&] { rt::memcpy_h2d(in, host.data(), kN * sizeof(float), copy); }),
                  {"stream race", "rt::memcpy_h2d on stream", "writes 'batch'", "kernel 'read_all' on stream",
                   "reads with no ordering"});
  // Two writers on different streams.
  expect_contains(launch_error([&] { rt::memset_async(out, 0, 16, copy); }),
                  {"stream race", "rt::memset_async", "writes 'hidden'", "kernel 'read_all'", "also writes"});
}

TEST_F(TwoStreams, PiecesOfOneArenaAt256ByteBoundariesDoNotAlias) {
  auto* arena = static_cast<uint8_t*>(rt::device_alloc(1024, "arena"));
  auto* a = reinterpret_cast<float*>(arena);
  auto* b = reinterpret_cast<float*>(arena + 256);
  rt::memcpy_h2d(a, host.data(), 256, copy);
  port::launch(write_all, port::LaunchConfig{"write_all", dim3(1), dim3(64), 0, compute}, b, 64);
  // The same piece, though, is checked.
  expect_contains(
      launch_error([&] {
        port::launch(write_all, port::LaunchConfig{"write_all", dim3(1), dim3(64), 0, compute}, a, 64);
      }),
      {"stream race", "kernel 'write_all'", "writes 'arena' (byte offset", "rt::memcpy_h2d"});
  rt::device_synchronize();
  rt::device_free(arena);
}

TEST_F(TwoStreams, HostAccessChecksRangesAndOrdersOnTheCurrentStream) {
  rt::memcpy_h2d(in, host.data(), kN * sizeof(float), copy);
  rt::set_current_stream(compute);
  expect_contains(
      launch_error([&] { tf::sim::host_access(in, kN * sizeof(float), AccessKind::Read, "blas::gemm A"); }),
      {"stream race", "blas::gemm A on stream", "reads 'batch'", "rt::memcpy_h2d"});
  rt::stream_synchronize(copy);
  tf::sim::host_access(in, kN * sizeof(float), AccessKind::Read, "blas::gemm A");
  tf::sim::host_access(out, kN * sizeof(float), AccessKind::Write, "blas::gemm C");
  expect_contains(launch_error([&] {
                    tf::sim::host_access(out, kN * sizeof(float) + 4, AccessKind::Write, "blas::gemm C");
                  }),
                  {"blas::gemm C", "'hidden'", "4 bytes past its end"});
  // The kernel's read of 'hidden' after the host stand-in wrote it on the same stream is ordered.
  port::launch(read_all, port::LaunchConfig{"read_all", dim3(1), dim3(kN), 0, compute}, out, out, kN);
  rt::set_current_stream(nullptr);
}

// ---- raw device pointers in parameter structs --------------------------------------------------------

struct RawArgs {
  float* out;
  int n;
};
struct CheckedArgs {
  int n;
  port::gptr<float> out;
};

__global__ void write_raw(RawArgs a) {
  const int i = int(threadIdx.x);
  if (i < a.n) a.out[i] = 1.0f;
}
__global__ void write_checked(int pad, CheckedArgs a) {
  const int i = int(threadIdx.x);
  if (i < a.n) a.out[i] = float(pad);
}

TEST(SimRuntime, RawDevicePointersInParameterStructsAreReportedAtLaunch) {
  auto* p = static_cast<float*>(rt::device_alloc(32 * sizeof(float), "logits"));
  expect_contains(
      launch_error([&] {
        port::launch(write_raw, port::LaunchConfig{"write_raw", dim3(1), dim3(32)}, RawArgs{p, 32});
      }),
      {"kernel 'write_raw': parameter 1 (a struct) holds a raw device pointer at byte 0", "'logits'",
       "port::gptr<T>"});
  // With a checked pointer member the launch runs, and its accesses are checked.
  port::launch(write_checked, port::LaunchConfig{"write_checked", dim3(1), dim3(32)}, 3, CheckedArgs{32, p});
  expect_contains(launch_error([&] {
                    port::launch(write_checked, port::LaunchConfig{"write_checked", dim3(1), dim3(64)}, 3,
                                 CheckedArgs{33, p});
                  }),
                  {"out-of-bounds write", "kernel 'write_checked'", "'logits'"});
  rt::device_free(p);
}

}  // namespace
