// defines: tf::cpu::kDefaultWaitPolicy, apply_default_wait_policy and wait_policy: how idle OpenMP
// threads wait, chosen for libgomp before it starts
#pragma once

#include <string>

namespace tf::cpu {

// The OMP_WAIT_POLICY tightfit gives libgomp where the environment sets no wait policy: an idle
// OpenMP thread sleeps at once. libgomp's own default spins 300000 times first, which keeps a thread
// waiting at a barrier on its core, so that on a loaded machine it takes the time of the thread it
// waits for: two threads ran 20 times slower than one, and still 2 to 8 times slower with a spin of
// 10000 (benchmarks/RESULTS.md, "OpenMP wait policy under load").
inline constexpr const char* kDefaultWaitPolicy = "passive";

// libgomp reads OMP_WAIT_POLICY and GOMP_SPINCOUNT once, as it loads, before main, and has no call
// to change them later; a variable set in the process after exec, even before any library's
// initializer (an executable's .preinit_array), is undone by glibc's start-up before libgomp reads
// it. So where the environment sets neither, this sets OMP_WAIT_POLICY to tightfit's default and
// executes the same program again (/proc/self/exe, the same arguments), which libgomp then starts
// under; returns without effect where either is set or the exec fails. Call it first thing in main.
void apply_default_wait_policy(char** argv);

// How idle OpenMP threads wait in this process and who chose it (tightfit's default or the
// environment), and how the pool of decoding's loops (src/core/pool.h) waits, as a line for a
// run's log.
std::string wait_policy();

}  // namespace tf::cpu
