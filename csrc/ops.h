// The ops of the cuda backend, dbn::cuda_<entry> (dbn::emu_<entry> in the CPU emulation), with the
// C++ signatures of the schemas in dbn_kernels/ops.py: binding.cpp registers them as they are
// declared here, and a signature that drifts from its schema fails the registration at import.
//
// Every op runs on the current stream with no host synchronisation (CUDA-graph capturable).
// float64 is not compiled into the kernels: every op re-dispatches it (input, or stack of
// statistics/sums) to the same op of the reference backend, which computes in float64.
#pragma once

#include <optional>
#include <tuple>
#include <utility>

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#ifdef DBN_EMULATION
#define DBN_OP_PREFIX "emu_"
#else
#define DBN_OP_PREFIX "cuda_"
#endif
// "dbn::cuda_<entry>": an op's name in messages.
#define DBN_OP_NAME(ENTRY) "dbn::" DBN_OP_PREFIX ENTRY

namespace dbn {

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;
using Tensors2 = std::tuple<Tensor, Tensor>;
using Tensors3 = std::tuple<Tensor, Tensor, Tensor>;
using Tensors4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using Tensors6 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// The fused epilogue (ops.py): the forward ops compute y = relu?(normalized + residual?) in float32
// and round once; the backward ops read dy where relu_output (the forward's y) > 0, else 0, and
// with residual_grad (and relu_output) write that masked dy as grad_residual in the same
// element-wise pass as grad_x, else return it (0,)-empty. residual and relu_output have x's shape
// and dtype, in any memory format.
//
// normalize_with_batch (finalize, train_forward; keyword-only in the schema, last here; ignored
// without dbn_mean): the step normalizes with the batch statistics and saves batch norm's tensors
// (alpha = 1), while dbn_mean and dbn_std take the a_k-averages of the mean and the inverse std.

// ---- passes (ops_forward.cpp, ops_backward.cpp) -------------------------------------------------
Tensor batch_stats(const Tensor& x, const OptTensor& num_batches_tracked);
// -> (mean, invstd, batch_mean, batch_invstd, alpha, coef)
Tensors6 finalize(const Tensor& stats, const OptTensor& weight, const OptTensor& bias,
                  const OptTensor& running_mean, const OptTensor& running_var,
                  const OptTensor& dbn_mean, const OptTensor& dbn_std,
                  const OptTensor& num_batches_tracked, std::optional<double> momentum,
                  double eps, double alpha_scale, double alpha_power, double alpha_offset,
                  bool normalize_with_batch);
Tensor normalize(const Tensor& x, const Tensor& coef, const OptTensor& residual, bool relu);
Tensor backward_reduce(const Tensor& grad_y, const Tensor& x, const Tensor& mean,
                       const OptTensor& relu_output);
// -> (grad_weight, grad_bias, coef)
Tensors3 backward_finalize(const Tensor& sums, const OptTensor& weight, const Tensor& invstd,
                           const Tensor& batch_mean, const Tensor& batch_invstd,
                           const Tensor& alpha, bool grad_through_stats, bool input_grad);
// -> (grad_x, grad_residual); grad_x is (0,)-empty for (0, C) coefficients (no input gradient)
Tensors2 backward_dx(const Tensor& grad_y, const Tensor& x, const Tensor& coef,
                     const OptTensor& relu_output, bool residual_grad);

// ---- fused single-device compositions -----------------------------------------------------------
// -> (y, mean, invstd, batch_mean, batch_invstd, alpha)
Tensors6 train_forward(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                       const OptTensor& running_mean, const OptTensor& running_var,
                       const OptTensor& dbn_mean, const OptTensor& dbn_std,
                       const OptTensor& num_batches_tracked, std::optional<double> momentum,
                       double eps, double alpha_scale, double alpha_power, double alpha_offset,
                       const OptTensor& residual, bool relu, bool normalize_with_batch);
// -> (y, invstd)
Tensors2 eval_forward(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                      const Tensor& mean, const Tensor& spread, double eps, bool spread_is_std,
                      const OptTensor& residual, bool relu);
// -> (grad_x, grad_weight, grad_bias, grad_residual)
Tensors4 backward(const Tensor& grad_y, const Tensor& x, const OptTensor& weight,
                  const Tensor& mean, const Tensor& invstd, const Tensor& batch_mean,
                  const Tensor& batch_invstd, const Tensor& alpha, bool grad_through_stats,
                  bool input_grad, const OptTensor& relu_output, bool residual_grad);

// The reference backend's op `qualname` (dbn::reference_<entry>, defined when dbn_kernels is
// imported), called with the arguments of the op of type Fn. Looked up per call: only float64
// takes this path.
template <typename Fn, typename... Args>
decltype(auto) call_reference(const char* qualname, Args&&... args) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow(qualname, "")
      .template typed<Fn>()
      .call(std::forward<Args>(args)...);
}

}  // namespace dbn
