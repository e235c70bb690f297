// Test hooks of the emulation, for tests that check what the launchers chose: the plans of the
// last launches and the number of launches; and one for the emulator itself: a kernel whose
// barrier thread 0 never reaches. Registered as dbn::emu_last_plan, dbn::emu_launches and
// dbn::emu_divergent_barrier, whose schemas tests/emulation.py defines.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include <torch/library.h>

namespace dbn {
namespace emu {

// [reduction width, element-wise width, element-wise across] of the last launch of each kind.
inline std::array<int64_t, 3> last_plan{};

void record_plan(const ReducePlan& plan) { last_plan[0] = plan.width; }

void record_plan(const ElementwisePlan& plan) {
  last_plan[1] = plan.width;
  last_plan[2] = plan.across ? 1 : 0;
}

// Thread 0 returns before the barrier that the others wait at: on a GPU a hang (or undefined
// behaviour); the emulation must say so instead of waiting forever.
__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x == 0) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

}  // namespace emu
}  // namespace dbn

// The hooks take no tensor, so the dispatcher has no backend key to choose a kernel by: a
// CompositeExplicitAutograd kernel is the one it runs for an empty key set.
TORCH_LIBRARY_IMPL(dbn, CompositeExplicitAutograd, m) {
  m.impl("emu_last_plan", [] {
    return std::vector<int64_t>(dbn::emu::last_plan.begin(), dbn::emu::last_plan.end());
  });
  m.impl("emu_launches", [] { return dbn::emu::launches; });
  m.impl("emu_divergent_barrier", [] {
    int out[64] = {};
    dbn::emu::launch(dbn::emu::divergent_barrier_kernel, dim3(1), dim3(64), out);
  });
}
