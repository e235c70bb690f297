// Checks at the op boundary, shared by every op and raised before any buffer is written. They
// protect memory safety (what the kernels index, and as which dtype they read it) and say what
// is wrong in the op's terms; the user-facing validation of arguments is dbn_kernels/_checks.py's.
#pragma once

#include <initializer_list>
#include <optional>

#include "ops.h"

namespace dbn {

// The arguments of a step after x (train_forward) or the statistics (finalize).
struct StepArgs {
  const OptTensor& weight;
  const OptTensor& bias;
  const OptTensor& running_mean;
  const OptTensor& running_var;
  const OptTensor& dbn_mean;
  const OptTensor& dbn_std;
  const OptTensor& num_batches_tracked;
  std::optional<double> momentum;
  double eps, alpha_scale, alpha_power, alpha_offset;
  bool normalize_with_batch;
};

// What an op's per-channel arguments are checked against: the device, C, the input dtype that
// per-channel tensors may share besides float32, and the statistics dtype.
class OpCheck {
 public:
  // x: (N, C, *) on the backend's device, float32, float16, bfloat16 or float64.
  static OpCheck input(const char* op, const Tensor& x);
  // A (P, 3, C) stack of statistics or sums on the backend's device, float32 or float64. The
  // input dtype is unknown: per-channel tensors may be float32, float16 or bfloat16.
  static OpCheck stack(const char* op, const char* name, const Tensor& stack);

  // C elements on the device, float32 or the input dtype.
  void per_channel(const char* name, const Tensor& t) const;
  void per_channel(const char* name, const OptTensor& t) const;
  // A saved tensor the backward converts to float32: C floating-point elements on the device.
  void saved(const char* name, const Tensor& t) const;
  // alpha: one floating-point element on the device.
  void scalar(const char* name, const Tensor& t) const;
  // grad_y: x's shape, floating point, on the device.
  void like_input(const char* name, const Tensor& t, const Tensor& x) const;
  // The fused epilogue's residual or relu_output, when given: x's shape and dtype on x's device,
  // in any memory format (the launchers read it in x's).
  void epilogue_input(const char* name, const OptTensor& t, const Tensor& x) const;
  // Coefficients: (rows, C) in the statistics dtype of the input, rows one of `rows`.
  void coef(const Tensor& coef, std::initializer_list<int64_t> rows) const;
  // num_batches_tracked: one int64 element on the device, or none.
  void counter(const OptTensor& t) const;
  // weight, bias, the buffers (given in pairs) and the counter a step reads and writes.
  void step(const StepArgs& s) const;

  int64_t channels() const { return C_; }

 private:
  OpCheck(const char* op, const Tensor& like, int64_t C, std::optional<at::ScalarType> input,
          at::ScalarType stat)
      : op_(op), device_(like.device()), C_(C), input_dtype_(input), stat_dtype_(stat) {}
  void on_device(const char* name, const Tensor& t) const;

  const char* op_;
  at::Device device_;
  int64_t C_;
  std::optional<at::ScalarType> input_dtype_;  // unknown for a stack
  at::ScalarType stat_dtype_;                  // float32, float64 for float64 input
};

}  // namespace dbn
