// defines: tf::sim::Fiber on Boost.Context's fiber or, where Boost.Context is not installed, on
// ucontext
#include "kernels/sim/fiber.h"

#include <memory>

namespace tf::sim {

#if TF_SIM_BOOST_CONTEXT

namespace {

// Lends the caller's stack to Boost.Context, which keeps its fiber record at the top; the memory
// stays the caller's.
struct BorrowedStack {
  void* base;
  size_t bytes;
  boost::context::stack_context allocate() {
    boost::context::stack_context sc;
    sc.size = bytes;
    sc.sp = static_cast<char*>(base) + bytes;
    return sc;
  }
  void deallocate(boost::context::stack_context&) noexcept {}
};

}  // namespace

void Fiber::start(void* stack, size_t bytes, void (*body)(void*), void* arg) {
  self_ = boost::context::fiber();  // unwinds an unfinished fiber while its stack is intact
  body_ = body;
  arg_ = arg;
  finished_ = false;
  self_ = boost::context::fiber(std::allocator_arg, BorrowedStack{stack, bytes},
                                [this](boost::context::fiber&& caller) {
                                  caller_ = std::move(caller);
                                  body_(arg_);
                                  finished_ = true;
                                  return std::move(caller_);
                                });
}

void Fiber::resume() {
  self_ = std::move(self_).resume();
}

void Fiber::yield() {
  caller_ = std::move(caller_).resume();
}

void rethrow_fiber_unwind() {
  try {
    throw;
  } catch (const boost::context::detail::forced_unwind&) {
    throw;
  } catch (...) {
  }
}

#else

namespace {
thread_local Fiber* t_starting = nullptr;  // makecontext passes no pointer portably
}  // namespace

void Fiber::entry() {
  Fiber* self = t_starting;
  self->body_(self->arg_);
  self->finished_ = true;
  swapcontext(&self->self_, &self->caller_);
}

void Fiber::start(void* stack, size_t bytes, void (*body)(void*), void* arg) {
  body_ = body;
  arg_ = arg;
  finished_ = false;
  getcontext(&self_);
  self_.uc_stack.ss_sp = stack;
  self_.uc_stack.ss_size = bytes;
  self_.uc_link = nullptr;
  makecontext(&self_, entry, 0);
}

void Fiber::resume() {
  t_starting = this;
  swapcontext(&caller_, &self_);
}

void Fiber::yield() {
  swapcontext(&self_, &caller_);
}

void rethrow_fiber_unwind() {}

#endif

}  // namespace tf::sim
