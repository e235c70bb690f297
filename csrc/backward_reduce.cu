// Backward, pass 1: per-(split, channel) partial sums of dy and dy * (x - mean).
#include "reduce_common.cuh"

namespace dbn {

void launch_backward_reduce(const at::Tensor& dy, const at::Tensor& x, const float* mean,
                            const ReducePlan& plan, float* part, cudaStream_t stream) {
  DBN_DISPATCH_FLOAT_TYPES(x.scalar_type(), "dbn backward_reduce", [&] {
    const auto* xp = static_cast<const scalar_t*>(x.const_data_ptr());
    const auto* gp = static_cast<const scalar_t*>(dy.const_data_ptr());
    launch_reduce<scalar_t, GradSumOp>(xp, gp, mean, plan, part, nullptr, stream);
  });
}

int backward_reduce_blocks_per_sm(at::ScalarType dtype, bool channels_last, int width) {
  return reduce_blocks_per_sm_for<GradSumOp>(dtype, channels_last, width);
}

}  // namespace dbn
