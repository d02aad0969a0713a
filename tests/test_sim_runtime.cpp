// defines: tests of the simulated device runtime (tf::simt::rt): allocation, copies both ways,
// memset, and the bounds and liveness checks of copies and of kernels on rt::device_alloc memory.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <string>
#include <vector>

#include "kernels/cuda/port.h"
#include "kernels/cuda/runtime.h"
#include "src/core/error.h"

namespace port = tf::port;
namespace rt = tf::simt::rt;

namespace {

// The message of the tf::Error `f` throws, or "" when it succeeds.
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const tf::Error& e) {
    return e.what();
  }
  return "";
}

void expect_contains(const std::string& msg, std::initializer_list<const char*> parts) {
  EXPECT_FALSE(msg.empty()) << "the call did not fail";
  for (const char* p : parts)
    EXPECT_NE(msg.find(p), std::string::npos) << "missing \"" << p << "\" in: " << msg;
}

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
  expect_contains(error_of([] { rt::set_device(1); }), {"rt::set_device(1)", "one device"});
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
  expect_contains(error_of([&] { rt::memcpy_h2d(p + 16, host.data(), 64, nullptr); }),
                  {"destination of rt::memcpy_h2d", "'weights'", "byte offset 16", "16 bytes past its end"});
  expect_contains(error_of([&] { rt::memcpy_d2h(host.data(), p, 65, nullptr); }),
                  {"source of rt::memcpy_d2h", "'weights'", "1 bytes past its end"});
  expect_contains(error_of([&] { rt::memset_async(p + 60, 0, 8, nullptr); }),
                  {"destination of rt::memset_async", "'weights'", "4 bytes past its end"});
  expect_contains(error_of([&] { rt::memcpy_d2d(p, host.data(), 8, nullptr); }),
                  {"source of rt::memcpy_d2d", "is not device memory"});
  rt::device_free(p);
}

TEST(SimRuntime, KernelAccessesToDeviceAllocAreBoundsChecked) {
  auto* p = static_cast<float*>(rt::device_alloc(100 * sizeof(float), "activations"));
  // 128 threads over 100 elements with the bound set past the end: the write to element 100 fails.
  expect_contains(error_of([&] {
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
  expect_contains(error_of([] { rt::scratch(-1, 8); }), {"rt::scratch: slot -1"});
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
  expect_contains(error_of([&] { rt::stream_synchronize(s); }), {"rt::stream_synchronize", "destroyed"});
  int not_a_stream = 0;
  expect_contains(error_of([&] { rt::memset_async(nullptr, 0, 0, &not_a_stream); }),
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

}  // namespace
