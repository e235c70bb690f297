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
using Tensors6 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// ---- passes (ops_forward.cpp, ops_backward.cpp) -------------------------------------------------
Tensor batch_stats(const Tensor& x, const OptTensor& num_batches_tracked);
// -> (mean, invstd, batch_mean, batch_invstd, alpha, coef)
Tensors6 finalize(const Tensor& stats, const OptTensor& weight, const OptTensor& bias,
                  const OptTensor& running_mean, const OptTensor& running_var,
                  const OptTensor& dbn_mean, const OptTensor& dbn_std,
                  const OptTensor& num_batches_tracked, std::optional<double> momentum,
                  double eps, double alpha_scale, double alpha_power, double alpha_offset);
Tensor normalize(const Tensor& x, const Tensor& coef);
Tensor backward_reduce(const Tensor& grad_y, const Tensor& x, const Tensor& mean);
// -> (grad_weight, grad_bias, coef)
Tensors3 backward_finalize(const Tensor& sums, const OptTensor& weight, const Tensor& invstd,
                           const Tensor& batch_mean, const Tensor& batch_invstd,
                           const Tensor& alpha, bool grad_through_stats, bool input_grad);
Tensor backward_dx(const Tensor& grad_y, const Tensor& x, const Tensor& coef);

// ---- fused single-device compositions -----------------------------------------------------------
// -> (y, mean, invstd, batch_mean, batch_invstd, alpha)
Tensors6 train_forward(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                       const OptTensor& running_mean, const OptTensor& running_var,
                       const OptTensor& dbn_mean, const OptTensor& dbn_std,
                       const OptTensor& num_batches_tracked, std::optional<double> momentum,
                       double eps, double alpha_scale, double alpha_power, double alpha_offset);
// -> (y, invstd)
Tensors2 eval_forward(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                      const Tensor& mean, const Tensor& spread, double eps, bool spread_is_std);
// -> (grad_x, grad_weight, grad_bias)
Tensors3 backward(const Tensor& grad_y, const Tensor& x, const OptTensor& weight,
                  const Tensor& mean, const Tensor& invstd, const Tensor& batch_mean,
                  const Tensor& batch_invstd, const Tensor& alpha, bool grad_through_stats,
                  bool input_grad);

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
