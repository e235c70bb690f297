#include "checks.h"

#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include "dbn_launch.h"

namespace dbn {

namespace {

bool on_backend_device(const Tensor& t) {
#ifdef DBN_EMULATION
  return t.is_cpu();
#else
  return t.is_cuda();
#endif
}

void check_backend_device(const char* op, const char* name, const Tensor& t) {
#ifdef DBN_EMULATION
  TORCH_CHECK(on_backend_device(t), op, ": the emulation runs on CPU tensors, got ", name,
              " on ", t.device());
#else
  TORCH_CHECK(on_backend_device(t), op, ": the cuda backend needs a CUDA tensor, got ", name,
              " on ", t.device());
#endif
}

bool is_stat_dtype(at::ScalarType dt) { return dt == at::kFloat || dt == at::kDouble; }

}  // namespace

OpCheck OpCheck::input(const char* op, const Tensor& x) {
  check_backend_device(op, "an input", x);
  TORCH_CHECK(x.dim() >= 2, op, ": expected an input of shape (N, C, *), got ", x.dim(),
              "D input");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
              op, ": input dtype ", dt, " is not supported (float32, float16, bfloat16, float64)");
  return OpCheck(op, x, x.size(1), dt, dt == at::kDouble ? at::kDouble : at::kFloat);
}

OpCheck OpCheck::stack(const char* op, const char* name, const Tensor& stack) {
  check_backend_device(op, name, stack);
  TORCH_CHECK(stack.dim() == 3 && stack.size(1) == kStackRows, op, ": ", name,
              " should have shape (P, 3, C), got ", stack.sizes());
  TORCH_CHECK(is_stat_dtype(stack.scalar_type()), op, ": ", name, " has dtype ",
              stack.scalar_type(), "; it must be float32 (float64 for float64 input)");
  return OpCheck(op, stack, stack.size(2), std::nullopt, stack.scalar_type());
}

void OpCheck::on_device(const char* name, const Tensor& t) const {
  TORCH_CHECK(t.device() == device_, op_, ": ", name, " is on ", t.device(),
              " but the input is on ", device_);
}

void OpCheck::per_channel(const char* name, const Tensor& t) const {
  on_device(name, t);
  TORCH_CHECK(t.numel() == C_, op_, ": ", name, " should contain ", C_, " elements not ",
              t.numel());
  const auto dt = t.scalar_type();
  if (input_dtype_.has_value()) {
    TORCH_CHECK(dt == at::kFloat || dt == *input_dtype_, op_, ": ", name, " has dtype ", dt,
                "; with ", *input_dtype_, " input it must be float32 or ", *input_dtype_);
  } else if (stat_dtype_ == at::kFloat) {  // the kernels read float32, float16 or bfloat16
    TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op_, ": ", name,
                " has dtype ", dt, "; with float32 statistics it must be float32 or the input's "
                "dtype (float16, bfloat16)");
  }
}

void OpCheck::per_channel(const char* name, const OptTensor& t) const {
  if (t.has_value()) per_channel(name, *t);
}

void OpCheck::saved(const char* name, const Tensor& t) const {
  on_device(name, t);
  TORCH_CHECK(t.numel() == C_, op_, ": ", name, " should contain ", C_, " elements not ",
              t.numel());
  TORCH_CHECK(t.is_floating_point(), op_, ": ", name, " must be floating point");
}

void OpCheck::scalar(const char* name, const Tensor& t) const {
  TORCH_CHECK(t.device() == device_ && t.numel() == 1 && t.is_floating_point(), op_, ": ", name,
              " must be one floating-point element on the input's device");
}

void OpCheck::like_input(const char* name, const Tensor& t, const Tensor& x) const {
  on_device(name, t);
  TORCH_CHECK(t.sizes() == x.sizes(), op_, ": ", name, " has shape ", t.sizes(),
              " but the input has shape ", x.sizes());
  TORCH_CHECK(t.is_floating_point(), op_, ": ", name, " must be floating point");
}

void OpCheck::epilogue_input(const char* name, const OptTensor& t, const Tensor& x) const {
  if (!t.has_value()) return;
  on_device(name, *t);
  TORCH_CHECK(t->sizes() == x.sizes(), op_, ": ", name, " has shape ", t->sizes(),
              " but the input has shape ", x.sizes(), "; they must match (no broadcasting)");
  TORCH_CHECK(t->scalar_type() == x.scalar_type(), op_, ": ", name, " has dtype ",
              t->scalar_type(), " but the input has ", x.scalar_type(), "; they must match");
}

void OpCheck::coef(const Tensor& coef, std::initializer_list<int64_t> rows) const {
  on_device("coef", coef);
  bool rows_ok = false;
  for (int64_t r : rows) rows_ok = rows_ok || (coef.dim() == 2 && coef.size(0) == r);
  TORCH_CHECK(rows_ok && coef.size(1) == C_, op_, ": coef has shape ", coef.sizes(),
              "; expected (rows, ", C_, ") with rows one of ",
              c10::IntArrayRef(rows.begin(), rows.size()));
  TORCH_CHECK(coef.scalar_type() == stat_dtype_, op_, ": coef has dtype ", coef.scalar_type(),
              "; it must be the statistics dtype ", stat_dtype_);
}

void OpCheck::counter(const OptTensor& t) const {
  if (!t.has_value()) return;
  on_device("num_batches_tracked", *t);
  TORCH_CHECK(t->scalar_type() == at::kLong && t->numel() == 1, op_,
              ": num_batches_tracked must be one int64 element, got ", t->scalar_type(), " ",
              t->sizes());
}

void OpCheck::step(const StepArgs& s) const {
  per_channel("weight", s.weight);
  per_channel("bias", s.bias);
  per_channel("running_mean", s.running_mean);
  per_channel("running_var", s.running_var);
  per_channel("dbn_mean", s.dbn_mean);
  per_channel("dbn_std", s.dbn_std);
  // The kernels update each pair together.
  TORCH_CHECK(s.running_mean.has_value() == s.running_var.has_value(), op_,
              ": running_mean and running_var must be given together");
  TORCH_CHECK(s.dbn_mean.has_value() == s.dbn_std.has_value(), op_,
              ": dbn_mean and dbn_std must be given together");
  counter(s.num_batches_tracked);
  TORCH_CHECK(!s.dbn_mean.has_value() || s.num_batches_tracked.has_value(), op_,
              ": dbn_mean/dbn_std need num_batches_tracked to count steps");
  TORCH_CHECK(!s.running_mean.has_value() || s.momentum.has_value() ||
                  s.num_batches_tracked.has_value(),
              op_, ": momentum=None (cumulative average) needs num_batches_tracked");
}

}  // namespace dbn
