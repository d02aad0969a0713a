// defines: tests of tf::cuda::rt, the device runtime on the CUDA runtime: every failing call throws
// tf::Error with the call, CUDA's error string and file:line. Runs wherever the CUDA backend is
// built, with or without a GPU (a failing call fails the same way on both).
#include <gtest/gtest.h>

#include <string>

#include "kernels/cuda/runtime.h"
#include "src/core/error.h"

namespace {

#if TIGHTFIT_HAVE_CUDA
namespace rt = tf::cuda::rt;

std::string error_of(void (*f)()) {
  try {
    f();
  } catch (const tf::Error& e) {
    return e.what();
  }
  return "";
}

TEST(CudaRuntime, AFailingCallNamesTheCallTheErrorAndTheLine) {
  // No machine has a device 1000: the call fails with or without a GPU, as it does in simulation.
  const std::string msg = error_of([] { rt::set_device(1000); });
  EXPECT_NE(msg.find("cudaSetDevice(device): "), std::string::npos) << msg;
  EXPECT_NE(msg.find("runtime.cu:"), std::string::npos) << msg;
  EXPECT_NE(error_of([] { tf::simt::rt::set_device(1000); }).find("rt::set_device(1000)"), std::string::npos);
}

TEST(CudaRuntime, AnAllocationThatCannotBeHadNamesWhatAndTheSize) {
  const std::string msg = error_of([] { rt::device_alloc(size_t(1) << 60, "kv_cache"); });
  EXPECT_NE(msg.find("cannot allocate 1152921504606846976 bytes of device memory for 'kv_cache'"),
            std::string::npos)
      << msg;
}

TEST(CudaRuntime, SyncAfterLaunchIsASetting) {
  const bool was = rt::sync_after_launch();
  rt::set_sync_after_launch(!was);
  EXPECT_EQ(rt::sync_after_launch(), !was);
  rt::set_sync_after_launch(was);
}
#else
TEST(CudaRuntime, NeedsTheCudaBackend) {
  GTEST_SKIP() << "built without the CUDA backend (TIGHTFIT_CUDA=OFF or no nvcc)";
}
#endif

}  // namespace
