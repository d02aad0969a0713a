// defines: tf::test::open_backend, the backend a parameterised backend test runs on ("simt" always,
// "cuda" where a GPU is present) with the attention kernel asked for, or the reason it is not there
// for GTEST_SKIP
#pragma once

#include <memory>
#include <string>

#include "kernels/backend.h"

namespace tf::test {

inline std::unique_ptr<Backend> open_backend(const std::string& name, std::string* why,
                                             AttentionKernel attention = AttentionKernel::Auto) {
  if (name != "cuda") return make_backend(name, nullptr, attention);
  if (count_gpus(why) == 0) {
    *why = "no CUDA device: " + *why;
    return nullptr;
  }
  return make_backend("cuda:0", nullptr, attention);
}

}  // namespace tf::test
