// defines: helpers of the simulator and launcher tests for calls that must fail: the failure's
// message, and the check that it names what it should
#pragma once

#include <gtest/gtest.h>

#include <functional>
#include <initializer_list>
#include <string>

#include "src/core/error.h"

namespace tf::test {

// The message of the tf::Error that `fn` (a launch, a copy, a call) ends with, or "" when it returns.
inline std::string launch_error(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// Expects `msg` to be a failure's message holding each of `parts`.
inline void expect_contains(const std::string& msg, std::initializer_list<const char*> parts) {
  EXPECT_FALSE(msg.empty()) << "the call did not fail";
  for (const char* p : parts)
    EXPECT_NE(msg.find(p), std::string::npos) << "missing \"" << p << "\" in: " << msg;
}

}  // namespace tf::test
