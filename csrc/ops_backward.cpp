// The backward ops: the passes backward_reduce, backward_finalize and backward_dx, and their
// composition backward (backward_reduce over splits -> backward_finalize over the split partials
// -> backward_dx: 3 launches, 2 without input gradient unless grad_residual is asked for). The
// passes and the fused op share the launch helpers below.
//
// The fused epilogue's backward adds no pass: relu_output (the forward's y) is read beside dy by
// the reduction and by the element-wise pass, which masks dy as it arrives, and grad_residual
// (the masked dy) is a second output of the element-wise pass.
#include <optional>

#include <ATen/ATen.h>

#include "checks.h"
#include "planning.h"

namespace dbn {

namespace {

int64_t dx_coef_rows(bool grad_through_stats, bool input_grad) {
  if (!input_grad) return 0;
  return grad_through_stats ? 4 : 1;
}

Tensor as_float(const Tensor& t) { return t.to(at::kFloat).contiguous(); }

// Pass 1: the split partial sums (count, sum dy, sum dy * (x - mean)), dy masked by relu_output
// when it is defined, with `extra` floats for the caller.
StackWorkspace reduce_sums(const Input& in, const Tensor& dy, const Tensor& relu_output,
                           const Tensor& mean, int64_t extra) {
  const Tensor mean_f = as_float(mean);
  int64_t align = std::min(alignment(in.t), alignment(dy));
  if (relu_output.defined()) align = std::min(align, alignment(relu_output));
  const ReducePlan plan = plan_reduce(
      in, relu_output.defined() ? Reduction::kReluSums : Reduction::kSums, align);
  StackWorkspace ws = stack_workspace(in, plan, extra);
  launch_backward_reduce(dy, in.t, relu_output.defined() ? &relu_output : nullptr,
                         mean_f.const_data_ptr<float>(), plan, ws.stack, in.stream);
  return ws;
}

void check_finalize_inputs(const OpCheck& check, const OptTensor& weight, const Tensor& invstd,
                           const Tensor& batch_mean, const Tensor& batch_invstd,
                           const Tensor& alpha, bool grad_through_stats) {
  check.per_channel("weight", weight);
  check.saved("invstd", invstd);
  check.saved("batch_mean", batch_mean);
  check.saved("batch_invstd", batch_invstd);
  if (grad_through_stats) check.scalar("alpha", alpha);
}

// Everything backward_finalize reads besides the sums, as the kernel reads it (float32).
struct FinalizeInputs {
  Tensor weight, invstd, batch_mean, batch_invstd, alpha;

  FinalizeInputs(const OptTensor& w, const Tensor& invstd_, const Tensor& batch_mean_,
                 const Tensor& batch_invstd_, const Tensor& alpha_, bool grad_through_stats) {
    weight = contiguous_or_undefined(w);
    invstd = as_float(invstd_);
    batch_mean = as_float(batch_mean_);
    batch_invstd = as_float(batch_invstd_);
    if (grad_through_stats) alpha = as_float(alpha_);
  }

  SavedConstPtrs ptrs() const {
    return {invstd.const_data_ptr<float>(), batch_mean.const_data_ptr<float>(),
            batch_invstd.const_data_ptr<float>(),
            alpha.defined() ? alpha.const_data_ptr<float>() : nullptr};
  }
};

// Finalize a (sources, 3, C) stack of sums: grad_weight, grad_bias, and the dx coefficients
// (dx_coef_rows of them) written to `coef`.
Tensors2 run_backward_finalize(const float* sums, int64_t sources, int64_t C,
                               const FinalizeInputs& in, bool grad_through_stats,
                               bool input_grad, float* coef, const at::TensorOptions& fopts,
                               cudaStream_t stream) {
  Tensor grad_weight = at::empty({C}, fopts), grad_bias = at::empty({C}, fopts);
  const FinalizeBackwardArgs args{sums, sources, C, param(in.weight), in.ptrs(),
                                  grad_through_stats, input_grad, grad_weight.data_ptr<float>(),
                                  grad_bias.data_ptr<float>(), coef};
  launch_finalize_backward(args, stream);
  return {grad_weight, grad_bias};
}

Tensor empty_vector(const Tensor& x) { return at::empty({0}, x.options()); }

// Does the backward write grad_residual (ops.residual_grad_written)?
bool writes_grad_residual(const OptTensor& relu_output, bool residual_grad) {
  return residual_grad && relu_output.has_value();
}

// What an empty x gives for (grad_x, grad_residual).
Tensors2 empty_input_grads(const Tensor& x, bool input_grad, bool grad_residual) {
  const auto like_x = [&](bool written) {
    return written ? at::empty_like(x, at::MemoryFormat::Preserve) : empty_vector(x);
  };
  return {like_x(input_grad), like_x(grad_residual)};
}

// (grad_x, grad_residual) in one element-wise pass, dy masked by relu_output when it is defined:
// grad_x = A * dy (+ B * (x - center) + shift) with the (rows, C) coefficients at `coef` (none
// for 0 rows: no input gradient), and grad_residual the masked dy. No launch when neither is
// written.
Tensors2 run_dx(const Tensor& x, const Input& in, const Tensor& dy, const Tensor& relu_output,
                const float* coef, int64_t rows, bool grad_residual) {
  if (rows == 0 && !grad_residual) return {empty_vector(x), empty_vector(x)};
  ElementwiseTensors t;
  t.in0 = &dy;
  if (rows == 4) t.in1 = &in.t;
  if (relu_output.defined()) t.relu_output = &relu_output;
  std::optional<Output> dx, dres;
  if (rows > 0) {
    dx = output_like(x, in);
    t.out = &dx->target;
  }
  if (grad_residual) {
    dres = output_like(x, in);
    t.grad_residual = &dres->target;
  }
  const ElementwiseCoefs coefs = dx_coefs(coef, rows, in.g.C);
  const ElementwisePlan plan = plan_elementwise(in, alignment(t), coefs);
  launch_elementwise(plan, t, coefs, in.stream);
  return {dx ? dx->finish() : empty_vector(x), dres ? dres->finish() : empty_vector(x)};
}

}  // namespace

// ---- passes -----------------------------------------------------------------------------------

Tensor backward_reduce(const Tensor& grad_y, const Tensor& x, const Tensor& mean,
                       const OptTensor& relu_output) {
  const OpCheck check = OpCheck::input(DBN_OP_NAME("backward_reduce"), x);
  check.like_input("grad_y", grad_y, x);
  check.saved("mean", mean);
  check.epilogue_input("relu_output", relu_output, x);
  if (x.scalar_type() == at::kDouble) {
    return call_reference<decltype(backward_reduce)>("dbn::reference_backward_reduce", grad_y, x,
                                                     mean, relu_output);
  }
  const DeviceGuard guard(x);
  const int64_t C = check.channels();
  Tensor sums = at::empty({kStackRows, C}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) return sums.zero_();
  const Input in = kernel_input(x);
  const StackWorkspace ws = reduce_sums(in, match_layout(grad_y, in),
                                        match_layout_or_undefined(relu_output, in), mean, 0);
  launch_merge_sums(ws.stack, ws.sources, C, sums.data_ptr<float>(), in.stream);
  return sums;
}

Tensors3 backward_finalize(const Tensor& sums, const OptTensor& weight, const Tensor& invstd,
                           const Tensor& batch_mean, const Tensor& batch_invstd,
                           const Tensor& alpha, bool grad_through_stats, bool input_grad) {
  const OpCheck check = OpCheck::stack(DBN_OP_NAME("backward_finalize"), "sums", sums);
  check_finalize_inputs(check, weight, invstd, batch_mean, batch_invstd, alpha,
                        grad_through_stats);
  if (sums.scalar_type() == at::kDouble) {
    return call_reference<decltype(backward_finalize)>(
        "dbn::reference_backward_finalize", sums, weight, invstd, batch_mean, batch_invstd, alpha,
        grad_through_stats, input_grad);
  }
  const FinalizeInputs in(weight, invstd, batch_mean, batch_invstd, alpha, grad_through_stats);
  const DeviceGuard guard(sums);
  const int64_t C = check.channels();
  const auto fopts = sums.options().dtype(at::kFloat);
  const Tensor stack = sums.contiguous();
  Tensor coef = at::empty({dx_coef_rows(grad_through_stats, input_grad), C}, fopts);
  auto [grad_weight, grad_bias] = run_backward_finalize(
      stack.const_data_ptr<float>(), stack.size(0), C, in, grad_through_stats, input_grad,
      coef.data_ptr<float>(), fopts, current_stream(sums));
  return {grad_weight, grad_bias, coef};
}

Tensors2 backward_dx(const Tensor& grad_y, const Tensor& x, const Tensor& coef,
                     const OptTensor& relu_output, bool residual_grad) {
  const OpCheck check = OpCheck::input(DBN_OP_NAME("backward_dx"), x);
  check.like_input("grad_y", grad_y, x);
  check.coef(coef, {0, 1, 4});
  check.epilogue_input("relu_output", relu_output, x);
  if (x.scalar_type() == at::kDouble) {
    return call_reference<decltype(backward_dx)>("dbn::reference_backward_dx", grad_y, x, coef,
                                                 relu_output, residual_grad);
  }
  const DeviceGuard guard(x);
  const int64_t rows = coef.size(0);
  const bool grad_residual = writes_grad_residual(relu_output, residual_grad);
  if (x.numel() == 0) return empty_input_grads(x, rows > 0, grad_residual);
  const Input in = kernel_input(x);
  const Tensor k = coef.contiguous();
  return run_dx(x, in, match_layout(grad_y, in), match_layout_or_undefined(relu_output, in),
                k.const_data_ptr<float>(), rows, grad_residual);
}

// ---- fused ------------------------------------------------------------------------------------

Tensors4 backward(const Tensor& grad_y, const Tensor& x, const OptTensor& weight,
                  const Tensor& mean, const Tensor& invstd, const Tensor& batch_mean,
                  const Tensor& batch_invstd, const Tensor& alpha, bool grad_through_stats,
                  bool input_grad, const OptTensor& relu_output, bool residual_grad) {
  const OpCheck check = OpCheck::input(DBN_OP_NAME("backward"), x);
  check.like_input("grad_y", grad_y, x);
  check.saved("mean", mean);
  check_finalize_inputs(check, weight, invstd, batch_mean, batch_invstd, alpha,
                        grad_through_stats);
  check.epilogue_input("relu_output", relu_output, x);
  if (x.scalar_type() == at::kDouble) {
    return call_reference<decltype(backward)>("dbn::reference_backward", grad_y, x, weight, mean,
                                              invstd, batch_mean, batch_invstd, alpha,
                                              grad_through_stats, input_grad, relu_output,
                                              residual_grad);
  }
  const FinalizeInputs fin(weight, invstd, batch_mean, batch_invstd, alpha, grad_through_stats);
  const DeviceGuard guard(x);
  const int64_t C = check.channels();
  const auto fopts = x.options().dtype(at::kFloat);
  const bool grad_residual = writes_grad_residual(relu_output, residual_grad);
  if (x.numel() == 0) {
    auto [grad_x, grad_res] = empty_input_grads(x, input_grad, grad_residual);
    return {grad_x, at::zeros({C}, fopts), at::zeros({C}, fopts), grad_res};
  }
  const Input in = kernel_input(x);
  const Tensor dy = match_layout(grad_y, in);
  const Tensor mask = match_layout_or_undefined(relu_output, in);
  const int64_t rows = dx_coef_rows(grad_through_stats, input_grad);
  const StackWorkspace ws = reduce_sums(in, dy, mask, mean, rows * C);
  float* coef = ws.extra;
  auto [grad_weight, grad_bias] = run_backward_finalize(
      ws.stack, ws.sources, C, fin, grad_through_stats, input_grad, coef, fopts, in.stream);
  auto [grad_x, grad_res] = run_dx(x, in, dy, mask, coef, rows, grad_residual);
  return {grad_x, grad_weight, grad_bias, grad_res};
}

}  // namespace dbn
