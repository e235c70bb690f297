// Training forward, pass 1: per-(split, channel) Welford partial statistics of x, and the step
// counted (num_batches_tracked).
#include "reduce_common.cuh"

namespace dbn {

void launch_collect_stats(const at::Tensor& x, const ReducePlan& plan, float* part,
                          int64_t* counter, cudaStream_t stream) {
  DBN_DISPATCH_FLOAT_TYPES(x.scalar_type(), "dbn collect_stats", [&] {
    const auto* xp = static_cast<const scalar_t*>(x.const_data_ptr());
    launch_reduce<scalar_t, WelfordOp>(xp, nullptr, nullptr, nullptr, plan, part, counter,
                                         stream);
  });
}

int collect_stats_blocks_per_sm(at::ScalarType dtype, bool channels_last, int width) {
  return reduce_blocks_per_sm_for<WelfordOp>(dtype, channels_last, width);
}

}  // namespace dbn
