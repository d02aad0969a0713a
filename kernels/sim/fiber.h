// defines: tf::sim::Fiber, the coroutine each simulated thread (and each interleaved block) runs
// as, and rethrow_fiber_unwind. With Boost.Context (TF_SIM_BOOST_CONTEXT, when CMake finds it) a
// switch is a few user-space instructions; without it, ucontext's swapcontext, which makes a
// system call per switch (it saves the signal mask) and so costs the simulator about half its time
// on kernels that synchronise often.
#pragma once

#include <cstddef>

#if TF_SIM_BOOST_CONTEXT
#include <boost/context/fiber.hpp>
#else
#include <ucontext.h>
#endif

namespace tf::sim {

class Fiber {
 public:
  Fiber() = default;
  Fiber(const Fiber&) = delete;
  Fiber& operator=(const Fiber&) = delete;

  // Sets body(arg) to run on [stack, stack + bytes) from the next resume(). A fiber still
  // suspended from an earlier start is dropped first (with Boost.Context its stack is unwound).
  void start(void* stack, size_t bytes, void (*body)(void*), void* arg);
  // Runs the fiber until it yields or its body returns.
  void resume();
  // Inside the fiber: back to the resume() that ran it.
  void yield();
  bool finished() const { return finished_; }

 private:
  void (*body_)(void*) = nullptr;
  void* arg_ = nullptr;
  bool finished_ = true;
#if TF_SIM_BOOST_CONTEXT
  boost::context::fiber self_;    // the fiber while it is suspended
  boost::context::fiber caller_;  // its resumer while it runs
#else
  static void entry();
  ucontext_t self_;
  ucontext_t caller_;
#endif
};

// For a catch (...) inside a fiber's body: rethrows the exception that unwinds a suspended fiber
// being destroyed, which must reach the fiber's entry.
void rethrow_fiber_unwind();

}  // namespace tf::sim
