// CPU emulation of the CUDA execution model: just enough of it to run dbn_kernels' kernels,
// unchanged, on one host thread (each CUDA thread a fiber, blocks one after another).
//
// Used only by emulate.cpp, which tests/emulation.py compiles with the host compiler to check the
// kernels and their host launchers against the reference backend on machines without a GPU. It
// emulates: threadIdx/blockIdx/blockDim/gridDim, __syncthreads (a block barrier), __shfl_down_sync
// (a per-warp exchange; every lane of the warp must take part, as in the kernels), __shared__
// (static storage, valid because blocks run one at a time) and the few intrinsics used. It says
// nothing about performance, occupancy or the memory model beyond barrier ordering.
#pragma once

#include <math.h>

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <tuple>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

namespace dbn {

struct ReducePlan;
struct ElementwisePlan;

namespace emu {

// Test hooks (hooks.h): every launch is counted, and the plans among its arguments are recorded.
inline int64_t launches = 0;
void record_plan(const ReducePlan& plan);
void record_plan(const ElementwisePlan& plan);
template <typename T>
void record_plan(const T&) {}  // any other kernel argument

// How threads run: every CUDA thread of a block is a fiber (a ucontext with its own stack), and
// one host thread runs the block's fibers in turn, each until it reaches a barrier or returns.
// Host threads, one per CUDA thread, did the same job 5-10x slower: a 256-thread block passing a
// barrier cost 256 futex wake-ups and context switches through the OS scheduler. Fibers also
// make the emulation deterministic: threads always run in the same order (ascending within a
// phase), so a missing __syncthreads gives the same wrong result on every run instead of
// passing or failing by chance. (It cannot catch a missing barrier where a thread reads what a
// lower-numbered thread wrote: that one always ran first.)

class Barrier;

struct Fiber {
  ucontext_t context;
  dim3 index;
  const Barrier* waiting_on = nullptr;  // blocked here until the barrier's phase moves on
  unsigned long waiting_phase = 0;
  bool done = false;
};

inline ucontext_t scheduler_context;  // the host thread's own context, between fibers
inline std::vector<Fiber> fibers;     // the running block's threads
inline unsigned current = 0;          // the fiber running now
inline void (*current_body)(const void*) = nullptr;
inline const void* current_arguments = nullptr;

// A barrier for a fixed number of fibers: the last to arrive starts a new phase and goes on;
// the others yield to the scheduler, which resumes them once the phase has moved on.
class Barrier {
 public:
  explicit Barrier(unsigned threads) : threads_(threads) {}

  void arrive_and_wait() {
    if (++arrived_ == threads_) {
      arrived_ = 0;
      ++phase_;
      return;
    }
    Fiber& self = fibers[current];
    self.waiting_on = this;
    self.waiting_phase = phase_;
    swapcontext(&self.context, &scheduler_context);
  }

  unsigned long phase() const { return phase_; }

 private:
  const unsigned threads_;
  unsigned arrived_ = 0;
  unsigned long phase_ = 0;
};

struct BlockState {
  explicit BlockState(unsigned threads)
      : block_barrier(threads), warp_values((threads + 31) / 32 * 32) {
    for (unsigned w = 0; w < (threads + 31) / 32; ++w) {
      warp_barriers.push_back(std::make_unique<Barrier>(32));
    }
  }
  Barrier block_barrier;
  std::vector<std::unique_ptr<Barrier>> warp_barriers;
  std::vector<float> warp_values;
};

inline dim3 thread_idx;
inline dim3 block_idx;
inline dim3 block_dim;
inline dim3 grid_dim;
inline BlockState* block_state = nullptr;

inline unsigned linear_thread() {
  return thread_idx.x + block_dim.x * (thread_idx.y + block_dim.y * thread_idx.z);
}

// The fibers' stacks: mapped once, grown when a launch needs more threads, reused by every
// launch. Each has an inaccessible guard page below it, so an overflow faults at once instead of
// overwriting the neighbouring fiber's stack. Pages are committed only as they are touched.
class FiberStacks {
 public:
  static constexpr size_t kStackBytes = 256 * 1024;

  char* stack(unsigned i) { return base_ + i * slot_bytes() + page_bytes(); }

  void reserve(unsigned count) {
    if (count <= count_) return;
    release();
    void* base = mmap(nullptr, count * slot_bytes(), PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) throw std::runtime_error("emulation: cannot map the fibers' stacks");
    base_ = static_cast<char*>(base);
    count_ = count;
    for (unsigned i = 0; i < count; ++i) {
      mprotect(base_ + i * slot_bytes(), page_bytes(), PROT_NONE);
    }
  }

  ~FiberStacks() { release(); }

 private:
  static size_t page_bytes() {  // asked once: stack() runs per thread per block
    static const size_t bytes = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    return bytes;
  }
  static size_t slot_bytes() { return kStackBytes + page_bytes(); }
  void release() {
    if (base_ != nullptr) munmap(base_, count_ * slot_bytes());
    base_ = nullptr;
    count_ = 0;
  }
  char* base_ = nullptr;
  unsigned count_ = 0;
};

inline FiberStacks fiber_stacks;

inline void fiber_entry() {
  current_body(current_arguments);
  fibers[current].done = true;
  // returning resumes uc_link: the scheduler
}

// One block: start a fiber per thread, then resume, in thread order, every fiber that is not
// done and not waiting at a barrier whose phase is unchanged, until all are done.
inline void run_block(unsigned threads) {
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = fibers[t];
    f.waiting_on = nullptr;
    f.done = false;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = fiber_stacks.stack(t);
    f.context.uc_stack.ss_size = FiberStacks::kStackBytes;
    f.context.uc_link = &scheduler_context;
    makecontext(&f.context, fiber_entry, 0);
  }
  unsigned running = threads;
  while (running > 0) {
    bool resumed = false;
    for (unsigned t = 0; t < threads; ++t) {
      Fiber& f = fibers[t];
      if (f.done || (f.waiting_on != nullptr && f.waiting_on->phase() == f.waiting_phase)) {
        continue;
      }
      f.waiting_on = nullptr;
      current = t;
      thread_idx = f.index;
      swapcontext(&scheduler_context, &f.context);
      resumed = true;
      if (f.done) --running;
    }
    if (!resumed) {
      // Every fiber left waits at a barrier that the finished ones will never reach (on a GPU:
      // a hang or undefined behaviour). The stranded fibers' stacks are simply reused.
      throw std::runtime_error(
          "emulation: deadlock, threads wait at a barrier that not every thread of the block "
          "reaches");
    }
  }
}

// Run kernel over grid x block, the blocks one after another (so __shared__ storage, which is
// static here, is reused safely). Launches must not run concurrently from several host threads.
template <typename... KernelArgs, typename... Args>
void launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, Args&&... args) {
  using Params = std::tuple<std::decay_t<KernelArgs>...>;
  const unsigned threads = block.x * block.y * block.z;
  block_dim = block;
  grid_dim = grid;
  const Params params(std::forward<Args>(args)...);
  ++launches;
  std::apply([](const auto&... arg) { (record_plan(arg), ...); }, params);
  struct Call {
    void (*kernel)(KernelArgs...);
    const Params* params;
  } call{kernel, &params};
  current_body = [](const void* p) {
    const Call& c = *static_cast<const Call*>(p);
    std::apply(c.kernel, *c.params);
  };
  current_arguments = &call;
  BlockState state(threads);
  block_state = &state;
  fiber_stacks.reserve(threads);
  if (fibers.size() < threads) fibers.resize(threads);
  for (unsigned t = 0; t < threads; ++t) {
    fibers[t].index = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
  }
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        block_idx = dim3(bx, by, bz);
        run_block(threads);
      }
    }
  }
  block_state = nullptr;
}

}  // namespace emu
}  // namespace dbn

#define threadIdx (::dbn::emu::thread_idx)
#define blockIdx (::dbn::emu::block_idx)
#define blockDim (::dbn::emu::block_dim)
#define gridDim (::dbn::emu::grid_dim)

inline void __syncthreads() { ::dbn::emu::block_state->block_barrier.arrive_and_wait(); }

inline float __shfl_down_sync(unsigned /*mask*/, float value, int offset) {
  auto& state = *::dbn::emu::block_state;
  const unsigned t = ::dbn::emu::linear_thread();
  const unsigned warp = t / 32, lane = t % 32;
  float* values = state.warp_values.data() + warp * 32;
  values[lane] = value;
  state.warp_barriers[warp]->arrive_and_wait();
  const float result = lane + offset < 32 ? values[lane + offset] : value;
  state.warp_barriers[warp]->arrive_and_wait();
  return result;
}

inline uint32_t __umulhi(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
