// CPU emulation of the CUDA execution model: just enough of it to run dbn_kernels' kernels,
// unchanged, on host threads (one std::thread per CUDA thread, blocks one after another).
//
// Used only by emulate.cpp, which tests/emulation.py compiles with the host compiler to check the
// kernels and their host launchers against the reference backend on machines without a GPU. It
// emulates: threadIdx/blockIdx/blockDim/gridDim, __syncthreads (a block barrier), __shfl_down_sync
// (a per-warp exchange; every lane of the warp must take part, as in the kernels), __shared__
// (static storage, valid because blocks run one at a time) and the few intrinsics used. It says
// nothing about performance, occupancy or the memory model beyond barrier ordering.
#pragma once

#include <math.h>

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
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

// A reusable barrier for a fixed number of threads. std::barrier is C++20, and torch's
// cpp_extension builds with -std=c++17 on some supported releases (2.11), so the emulation keeps
// its own: the last thread to arrive starts a new phase and wakes the rest.
class Barrier {
 public:
  explicit Barrier(unsigned threads) : threads_(threads) {}

  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const unsigned long phase = phase_;
    if (++arrived_ == threads_) {
      arrived_ = 0;
      ++phase_;
      lock.unlock();
      wake_.notify_all();
      return;
    }
    wake_.wait(lock, [&] { return phase_ != phase; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable wake_;
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

inline thread_local dim3 thread_idx;
inline thread_local dim3 block_idx;
inline dim3 block_dim;
inline dim3 grid_dim;
inline BlockState* block_state = nullptr;

inline unsigned linear_thread() {
  return thread_idx.x + block_dim.x * (thread_idx.y + block_dim.y * thread_idx.z);
}

// Run kernel over grid x block: block_dim.x * .y * .z threads, each walking the blocks in order
// with a barrier between blocks (so __shared__ storage is reused safely).
template <typename... KernelArgs, typename... Args>
void launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, Args&&... args) {
  const unsigned threads = block.x * block.y * block.z;
  block_dim = block;
  grid_dim = grid;
  const std::tuple<std::decay_t<KernelArgs>...> params(std::forward<Args>(args)...);
  ++launches;
  std::apply([](const auto&... arg) { (record_plan(arg), ...); }, params);
  BlockState state(threads);
  block_state = &state;
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      thread_idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      for (unsigned bz = 0; bz < grid.z; ++bz) {
        for (unsigned by = 0; by < grid.y; ++by) {
          for (unsigned bx = 0; bx < grid.x; ++bx) {
            block_idx = dim3(bx, by, bz);
            std::apply(kernel, params);
            state.block_barrier.arrive_and_wait();
          }
        }
      }
    });
  }
  for (auto& th : pool) th.join();
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
