// The forward ops: the passes batch_stats, finalize and normalize, and their compositions
// train_forward (collect_stats -> finalize over the split partials -> normalize: 3 launches) and
// eval_forward (eval_prepare -> normalize: 2 launches). The passes and the fused ops share the
// launch helpers below; the fused ones keep the split partials and the coefficients in one
// workspace that never leaves the op. The fused epilogue (residual, relu) is normalize's: the
// residual is read by the same element-wise pass, in x's memory order.
#include <limits>

#include <ATen/ATen.h>

#include "checks.h"
#include "planning.h"

namespace dbn {

namespace {

at::TensorOptions float_options(const Tensor& like) { return like.options().dtype(at::kFloat); }

int64_t* counter_ptr(const OptTensor& num_batches_tracked) {
  return num_batches_tracked.has_value() ? num_batches_tracked->data_ptr<int64_t>() : nullptr;
}

// The saved tensors finalize writes.
struct SavedTensors {
  Tensor mean, invstd, batch_mean, batch_invstd, alpha;

  SavedTensors(int64_t C, const at::TensorOptions& fopts)
      : mean(at::empty({C}, fopts)), invstd(at::empty({C}, fopts)),
        batch_mean(at::empty({C}, fopts)), batch_invstd(at::empty({C}, fopts)),
        alpha(at::empty({}, fopts)) {}

  SavedPtrs ptrs() {
    return {mean.data_ptr<float>(), invstd.data_ptr<float>(), batch_mean.data_ptr<float>(),
            batch_invstd.data_ptr<float>(), alpha.data_ptr<float>()};
  }
};

// Pass 1 of a step: the split partial statistics of x, with `extra` floats for the caller; the
// step counted.
StackWorkspace collect_stats(const Input& in, int64_t* counter, int64_t extra) {
  const ReducePlan plan = plan_reduce(in, Reduction::kStats, alignment(in.t));
  StackWorkspace ws = stack_workspace(in, plan, extra);
  launch_collect_stats(in.t, plan, ws.stack, counter, in.stream);
  return ws;
}

StepScalars step_scalars(const StepArgs& s) {
  return {static_cast<float>(s.eps), s.momentum.has_value(),
          static_cast<float>(s.momentum.value_or(0.0)), static_cast<float>(s.alpha_scale),
          static_cast<float>(s.alpha_power), static_cast<float>(s.alpha_offset),
          s.normalize_with_batch};
}

// Finalize a (sources, 3, C) float32 stack: the buffer updates, the saved tensors, and the
// normalize coefficients (3, C) written to `coef`.
SavedTensors run_finalize(const float* stats, int64_t sources, int64_t C, const StepArgs& s,
                          float* coef, const at::TensorOptions& fopts, cudaStream_t stream) {
  SavedTensors saved(C, fopts);
  const Tensor weight = contiguous_or_undefined(s.weight);
  const Tensor bias = contiguous_or_undefined(s.bias);
  InPlace running_mean(s.running_mean), running_var(s.running_var);
  InPlace dbn_mean(s.dbn_mean), dbn_std(s.dbn_std);
  const FinalizeArgs args{stats, sources, C, step_scalars(s), counter_ptr(s.num_batches_tracked),
                          running_mean.param(), running_var.param(), dbn_mean.param(),
                          dbn_std.param(), param(weight), param(bias), saved.ptrs(), coef};
  launch_finalize(args, stream);
  for (InPlace* buffer : {&running_mean, &running_var, &dbn_mean, &dbn_std}) buffer->finish();
  return saved;
}

// y = relu?((x - center) * scale + shift + residual?) with the (3, C) coefficients at `coef`.
Tensor run_normalize(const Tensor& x, const Input& in, const float* coef,
                     const OptTensor& residual, bool relu) {
  Output y = output_like(x, in);
  const Tensor res = match_layout_or_undefined(residual, in);
  ElementwiseTensors t;
  t.in0 = &in.t;
  t.out = &y.target;
  t.residual = res.defined() ? &res : nullptr;
  t.relu = relu;
  const ElementwiseCoefs coefs = normalize_coefs(coef, in.g.C);
  const ElementwisePlan plan = plan_elementwise(in, alignment(t), coefs);
  launch_elementwise(plan, t, coefs, in.stream);
  return y.finish();
}

}  // namespace

// ---- passes -----------------------------------------------------------------------------------

Tensor batch_stats(const Tensor& x, const OptTensor& num_batches_tracked) {
  const OpCheck check = OpCheck::input(DBN_OP_NAME("batch_stats"), x);
  check.counter(num_batches_tracked);
  if (x.scalar_type() == at::kDouble) {
    return call_reference<decltype(batch_stats)>("dbn::reference_batch_stats", x,
                                                 num_batches_tracked);
  }
  const DeviceGuard guard(x);
  const int64_t C = check.channels();
  Tensor stats = at::empty({kStackRows, C}, float_options(x));
  if (x.numel() == 0) {  // no values: count 0, and the step still counts
    if (num_batches_tracked.has_value()) num_batches_tracked->add_(1);
    return stats.zero_();
  }
  const Input in = kernel_input(x);
  const StackWorkspace ws = collect_stats(in, counter_ptr(num_batches_tracked), 0);
  launch_merge_stats(ws.stack, ws.sources, C, stats.data_ptr<float>(), in.stream);
  return stats;
}

Tensors6 finalize(const Tensor& stats, const OptTensor& weight, const OptTensor& bias,
                  const OptTensor& running_mean, const OptTensor& running_var,
                  const OptTensor& dbn_mean, const OptTensor& dbn_std,
                  const OptTensor& num_batches_tracked, std::optional<double> momentum,
                  double eps, double alpha_scale, double alpha_power, double alpha_offset,
                  bool normalize_with_batch) {
  const StepArgs step{weight, bias, running_mean, running_var, dbn_mean, dbn_std,
                      num_batches_tracked, momentum, eps, alpha_scale, alpha_power, alpha_offset,
                      normalize_with_batch};
  const OpCheck check = OpCheck::stack(DBN_OP_NAME("finalize"), "stats", stats);
  check.step(step);
  if (stats.scalar_type() == at::kDouble) {
    return call_reference<decltype(finalize)>(
        "dbn::reference_finalize", stats, weight, bias, running_mean, running_var, dbn_mean,
        dbn_std, num_batches_tracked, momentum, eps, alpha_scale, alpha_power, alpha_offset,
        normalize_with_batch);
  }
  const DeviceGuard guard(stats);
  const int64_t C = check.channels();
  const Tensor stack = stats.contiguous();
  Tensor coef = at::empty({kStackRows, C}, float_options(stats));
  SavedTensors s = run_finalize(stack.const_data_ptr<float>(), stack.size(0), C, step,
                                coef.data_ptr<float>(), float_options(stats),
                                current_stream(stats));
  return {s.mean, s.invstd, s.batch_mean, s.batch_invstd, s.alpha, coef};
}

Tensor normalize(const Tensor& x, const Tensor& coef, const OptTensor& residual, bool relu) {
  const OpCheck check = OpCheck::input(DBN_OP_NAME("normalize"), x);
  check.coef(coef, {3});
  check.epilogue_input("residual", residual, x);
  if (x.scalar_type() == at::kDouble) {
    return call_reference<decltype(normalize)>("dbn::reference_normalize", x, coef, residual,
                                               relu);
  }
  const DeviceGuard guard(x);
  if (x.numel() == 0) return at::empty_like(x, at::MemoryFormat::Preserve);
  const Tensor k = coef.contiguous();
  return run_normalize(x, kernel_input(x), k.const_data_ptr<float>(), residual, relu);
}

// ---- fused ------------------------------------------------------------------------------------

Tensors6 train_forward(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                       const OptTensor& running_mean, const OptTensor& running_var,
                       const OptTensor& dbn_mean, const OptTensor& dbn_std,
                       const OptTensor& num_batches_tracked, std::optional<double> momentum,
                       double eps, double alpha_scale, double alpha_power, double alpha_offset,
                       const OptTensor& residual, bool relu, bool normalize_with_batch) {
  const StepArgs step{weight, bias, running_mean, running_var, dbn_mean, dbn_std,
                      num_batches_tracked, momentum, eps, alpha_scale, alpha_power, alpha_offset,
                      normalize_with_batch};
  const OpCheck check = OpCheck::input(DBN_OP_NAME("train_forward"), x);
  check.step(step);
  check.epilogue_input("residual", residual, x);
  const int64_t C = check.channels();
  const int64_t M = C > 0 ? x.numel() / C : 0;
  TORCH_CHECK(x.numel() == 0 || !running_var.has_value() || M > 1,
              "Expected more than 1 value per channel when training, got input size ",
              x.sizes());
  if (x.scalar_type() == at::kDouble) {
    return call_reference<decltype(train_forward)>(
        "dbn::reference_train_forward", x, weight, bias, running_mean, running_var, dbn_mean,
        dbn_std, num_batches_tracked, momentum, eps, alpha_scale, alpha_power, alpha_offset,
        residual, relu, normalize_with_batch);
  }
  const DeviceGuard guard(x);
  const auto fopts = float_options(x);
  if (x.numel() == 0) {
    // As nn.BatchNorm: an empty batch leaves the statistics alone and still counts a step.
    if (num_batches_tracked.has_value()) num_batches_tracked->add_(1);
    const auto nan = std::numeric_limits<float>::quiet_NaN();
    return {at::empty_like(x, at::MemoryFormat::Preserve), at::full({C}, nan, fopts),
            at::full({C}, nan, fopts), at::full({C}, nan, fopts), at::full({C}, nan, fopts),
            at::ones({}, fopts)};
  }
  const Input in = kernel_input(x);
  const StackWorkspace ws = collect_stats(in, counter_ptr(num_batches_tracked), kStackRows * C);
  float* coef = ws.extra;
  SavedTensors s = run_finalize(ws.stack, ws.sources, C, step, coef, fopts, in.stream);
  Tensor y = run_normalize(x, in, coef, residual, relu);
  return {y, s.mean, s.invstd, s.batch_mean, s.batch_invstd, s.alpha};
}

Tensors2 eval_forward(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                      const Tensor& mean, const Tensor& spread, double eps, bool spread_is_std,
                      const OptTensor& residual, bool relu) {
  const OpCheck check = OpCheck::input(DBN_OP_NAME("eval_forward"), x);
  check.per_channel("weight", weight);
  check.per_channel("bias", bias);
  check.per_channel("mean", mean);
  check.per_channel("spread", spread);
  check.epilogue_input("residual", residual, x);
  if (x.scalar_type() == at::kDouble) {
    return call_reference<decltype(eval_forward)>("dbn::reference_eval_forward", x, weight, bias,
                                                  mean, spread, eps, spread_is_std, residual,
                                                  relu);
  }
  const DeviceGuard guard(x);
  const int64_t C = check.channels();
  const auto fopts = float_options(x);
  Tensor invstd = at::empty({C}, fopts);
  if (C == 0) return {at::empty_like(x, at::MemoryFormat::Preserve), invstd};
  const Input in = kernel_input(x);
  Tensor coef = at::empty({kStackRows, C}, fopts);
  const Tensor w = contiguous_or_undefined(weight), b = contiguous_or_undefined(bias);
  const Tensor m = mean.contiguous(), sp = spread.contiguous();
  const EvalPrepareArgs args{C, param(m), param(sp), param(w), param(b), static_cast<float>(eps),
                             spread_is_std, invstd.data_ptr<float>(), coef.data_ptr<float>()};
  launch_eval_prepare(args, in.stream);
  if (x.numel() == 0) return {at::empty_like(x, at::MemoryFormat::Preserve), invstd};
  return {run_normalize(x, in, coef.const_data_ptr<float>(), residual, relu), invstd};
}

}  // namespace dbn
