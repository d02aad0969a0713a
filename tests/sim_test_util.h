// defines: helpers of the simulator and launcher tests: for calls that must fail, the failure's
// message and the check that it names what it should; the check that a fragment layout covers its
// tile once
#pragma once

#include <gtest/gtest.h>

#include <functional>
#include <initializer_list>
#include <set>
#include <string>
#include <utility>

#include "kernels/sim/fragments.h"
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

// Expects the layout `coord` (lane, element) -> (row, col) of a per-lane fragment of `per_lane`
// elements to place every element of its rows x cols tile exactly once across the 32 lanes.
template <typename F>
void expect_bijection(int rows, int cols, int per_lane, F coord) {
  std::set<std::pair<int, int>> seen;
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < per_lane; ++i) {
      const sim::FragCoord p = coord(lane, i);
      ASSERT_TRUE(p.row >= 0 && p.row < rows && p.col >= 0 && p.col < cols)
          << "lane " << lane << " element " << i;
      EXPECT_TRUE(seen.insert({p.row, p.col}).second) << "lane " << lane << " element " << i << " repeats";
    }
  }
  EXPECT_EQ(seen.size(), size_t(rows * cols));
}

}  // namespace tf::test
