// Backward, pass 1: per-(split, channel) partial sums of dy and dy * (x - mean), dy masked by the
// fused ReLU's output when given.
#include "reduce_common.cuh"

namespace dbn {

void launch_backward_reduce(const at::Tensor& dy, const at::Tensor& x,
                            const at::Tensor* relu_output, const float* mean,
                            const ReducePlan& plan, float* part, cudaStream_t stream) {
  DBN_DISPATCH_FLOAT_TYPES(x.scalar_type(), "dbn backward_reduce", [&] {
    const auto* xp = static_cast<const scalar_t*>(x.const_data_ptr());
    const auto* gp = static_cast<const scalar_t*>(dy.const_data_ptr());
    if (relu_output != nullptr) {
      const auto* yp = static_cast<const scalar_t*>(relu_output->const_data_ptr());
      launch_reduce<scalar_t, ReluGradSumOp>(xp, gp, yp, mean, plan, part, nullptr, stream);
    } else {
      launch_reduce<scalar_t, GradSumOp>(xp, gp, nullptr, mean, plan, part, nullptr, stream);
    }
  });
}

int backward_reduce_blocks_per_sm(at::ScalarType dtype, bool channels_last, int width,
                                  bool relu_output) {
  if (relu_output) return reduce_blocks_per_sm_for<ReluGradSumOp>(dtype, channels_last, width);
  return reduce_blocks_per_sm_for<GradSumOp>(dtype, channels_last, width);
}

}  // namespace dbn
