// The cuda backend's ops (dbn::cuda_train_forward / cuda_eval_forward / cuda_backward) with the
// schemas of dbn_kernels/ops.py, and their host launchers: input checks (before any buffer is
// written), layout classification, grid planning, workspace allocation and the kernel sequence.
// Everything runs on the current stream with no host synchronisation (CUDA-graph capturable).
//
// float64 input is not compiled into the kernels: it is re-dispatched to the reference backend
// (dbn::reference_*, defined when dbn_kernels is imported), which computes in float64.
//
// Under DBN_EMULATION (emulation/emulate.cpp) this file is compiled as host C++ together with the
// .cu files, registering dbn::emu_* ops for CPU tensors that run the same host logic and the same
// kernels on CPU threads (tests/test_cuda.py checks them against the reference without a GPU).
#ifndef DBN_EMULATION
#include <Python.h>
#endif

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>
#ifndef DBN_EMULATION
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "dbn_launch.h"

#ifdef DBN_EMULATION
#define DBN_OP_PREFIX "emu_"
#define DBN_DISPATCH_KEY CPU
#define DBN_DEVICE_GUARD(x)
#else
#define DBN_OP_PREFIX "cuda_"
#define DBN_DISPATCH_KEY CUDA
#define DBN_DEVICE_GUARD(x) const c10::cuda::CUDAGuard device_guard((x).device())
#endif

namespace dbn {
namespace {

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;

// Keep in sync with dbn_kernels/ops.py (tests/test_extension.py compares the parsed schemas).
constexpr const char* kTrainForwardSchema =
    "(Tensor x, Tensor? weight, Tensor? bias, "
    "Tensor(a!)? running_mean, Tensor(b!)? running_var, "
    "Tensor(c!)? dbn_mean, Tensor(d!)? dbn_std, Tensor(e!)? num_batches_tracked, "
    "float? momentum, float eps, float alpha_scale, float alpha_power, float alpha_offset) "
    "-> (Tensor y, Tensor mean, Tensor invstd, Tensor batch_mean, Tensor batch_invstd, "
    "Tensor alpha)";
constexpr const char* kEvalForwardSchema =
    "(Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor spread, float eps, "
    "bool spread_is_std) -> (Tensor y, Tensor invstd)";
constexpr const char* kBackwardSchema =
    "(Tensor grad_y, Tensor x, Tensor? weight, Tensor mean, Tensor invstd, Tensor batch_mean, "
    "Tensor batch_invstd, Tensor alpha, bool grad_through_stats, bool input_grad) "
    "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)";

using TrainForwardOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using TrainForwardFn = TrainForwardOut(const Tensor&, const OptTensor&, const OptTensor&,
                                       const OptTensor&, const OptTensor&, const OptTensor&,
                                       const OptTensor&, const OptTensor&, std::optional<double>,
                                       double, double, double, double);
using EvalForwardFn = std::tuple<Tensor, Tensor>(const Tensor&, const OptTensor&,
                                                 const OptTensor&, const Tensor&, const Tensor&,
                                                 double, bool);
using BackwardFn = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&,
                                                      const OptTensor&, const Tensor&,
                                                      const Tensor&, const Tensor&, const Tensor&,
                                                      const Tensor&, bool, bool);

template <typename Fn>
c10::TypedOperatorHandle<Fn> reference_op(const char* name) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow(name, "")
      .template typed<Fn>();
}

// ---- small helpers ----------------------------------------------------------------------------
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

// The largest power of two, at most 16, that divides the address (16 for null).
int64_t alignment(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  int64_t align = 16;
  while (align > 1 && a % align != 0) align >>= 1;
  return align;
}

int64_t alignment(const Tensor& t) { return alignment(t.const_data_ptr()); }

// Floats of C per-channel coefficient arrays laid out one after another in a workspace: rounded
// up to 4 so that each array starts 16-byte aligned (vector coefficient loads).
int64_t padded(int64_t n) { return (n + 3) / 4 * 4; }

#ifdef DBN_EMULATION
// What the last planning chose (tests/test_cuda.py asserts that its cases reach each path):
// reduction width, element-wise width, element-wise across.
std::array<int64_t, 3> g_last_plan{};
#endif

#ifdef DBN_EMULATION
int num_sms(c10::DeviceIndex) {
  const char* env = std::getenv("DBN_EMULATION_SMS");  // the grid shape depends on it
  return env != nullptr ? std::max(1, std::atoi(env)) : 4;
}

cudaStream_t current_stream(const Tensor&) { return nullptr; }
#else
cudaStream_t current_stream(const Tensor& x) {
  return c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
}

int num_sms(c10::DeviceIndex device) {
  static std::array<std::atomic<int>, 64> cache{};
  if (device >= 0 && device < 64) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < 64) cache[device].store(value, std::memory_order_relaxed);
  return value;
}
#endif

int param_dt(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return kParamF16;
    case at::kBFloat16: return kParamBF16;
    default: return kParamF32;
  }
}

void check_input(const Tensor& x, const char* op) {
#ifdef DBN_EMULATION
  TORCH_CHECK(x.is_cpu(), op, ": the emulation runs on CPU tensors, got one on ", x.device());
#else
  TORCH_CHECK(x.is_cuda(), op, ": the cuda backend needs a CUDA tensor, got one on ", x.device());
#endif
  TORCH_CHECK(x.dim() >= 2, op, ": expected an input of shape (N, C, *), got ", x.dim(),
              "D input");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
              op, ": input dtype ", dt, " is not supported (float32, float16, bfloat16, float64)");
}

// A per-channel tensor: C elements, on x's device, float32 or x's dtype.
void check_per_channel(const char* op, const char* name, const Tensor& t, const Tensor& x) {
  const int64_t C = x.size(1);
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(),
              " but the input is on ", x.device());
  TORCH_CHECK(t.numel() == C, op, ": ", name, " should contain ", C, " elements not ",
              t.numel());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == x.scalar_type(), op, ": ",
              name, " has dtype ", t.scalar_type(), "; with ", x.scalar_type(),
              " input it must be float32 or ", x.scalar_type());
}

void check_optional(const char* op, const char* name, const OptTensor& t, const Tensor& x) {
  if (t.has_value()) check_per_channel(op, name, *t, x);
}

// ---- layouts ------------------------------------------------------------------------------------
// Is t dense with its dimensions nested in `order` (outermost first)? Size-1 dimensions are
// ignored, as in Tensor::is_contiguous.
bool dense_in_order(const Tensor& t, const std::vector<int64_t>& order) {
  int64_t expected = 1;
  for (auto it = order.rbegin(); it != order.rend(); ++it) {
    const int64_t size = t.size(*it);
    if (size == 1) continue;
    if (t.stride(*it) != expected) return false;
    expected *= size;
  }
  return true;
}

std::vector<int64_t> order_for(int64_t dim, bool channels_last) {
  std::vector<int64_t> order{0};
  if (!channels_last) order.push_back(1);
  for (int64_t d = 2; d < dim; ++d) order.push_back(d);
  if (channels_last) order.push_back(1);
  return order;
}

// Classify t: 0 = NCS (contiguous), 1 = NSC (channels last), -1 = neither.
int classify(const Tensor& t) {
  const bool ncs = dense_in_order(t, order_for(t.dim(), false));
  const bool nsc = dense_in_order(t, order_for(t.dim(), true));
  int64_t S = 1;
  for (int64_t d = 2; d < t.dim(); ++d) S *= t.size(d);
  if (ncs && nsc) return (S == 1 && t.size(1) > 1) ? 1 : 0;  // same memory; pick the better grid
  if (ncs) return 0;
  if (nsc) return 1;
  return -1;
}

// x in a layout the kernels read natively (a copy only for other strides) and its geometry.
std::pair<Tensor, Geometry> supported_layout(const Tensor& x) {
  Tensor xc = x;
  int kind = classify(xc);
  if (kind < 0) {
    xc = x.contiguous(x.suggest_memory_format());
    kind = classify(xc);
    if (kind < 0) {
      xc = x.contiguous();
      kind = 0;
    }
  }
  Geometry g;
  g.channels_last = kind == 1;
  g.N = x.size(0);
  g.C = x.size(1);
  g.S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) g.S *= x.size(d);
  g.M = g.N * g.S;
  g.numel = x.numel();
  return {xc, g};
}

// t (dy) brought to the memory layout of xc, in xc's dtype.
Tensor match_layout(const Tensor& t, const Tensor& xc, const Geometry& g) {
  Tensor out = t.scalar_type() == xc.scalar_type() ? t : t.to(xc.scalar_type());
  if (!dense_in_order(out, order_for(xc.dim(), g.channels_last))) {
    Tensor copy = at::empty_like(xc);
    copy.copy_(out);
    out = copy;
  }
  return out;
}

// An output with x's shape, dtype and memory format (what the fake returns), and the tensor the
// kernel writes: the output itself when its layout is the kernel's, else a temporary to copy from.
std::pair<Tensor, Tensor> output_like(const Tensor& x, const Tensor& xc, const Geometry& g) {
  Tensor out = at::empty_like(x, at::MemoryFormat::Preserve);
  if (dense_in_order(out, order_for(x.dim(), g.channels_last))) return {out, out};
  return {out, at::empty_like(xc)};
}

// ---- planning ------------------------------------------------------------------------------------
// Elements per load of the reduction over x (and dy), whose common alignment is align bytes.
// NCS: the widest load (16 bytes at most) that divides every row and the alignment; NSC: 16-byte
// vectors of consecutive channels or scalars.
int reduce_width(const Geometry& g, int64_t esize, int64_t align) {
  const int64_t V = 16 / esize;
  if (g.channels_last) return (align >= 16 && g.C % V == 0) ? static_cast<int>(V) : 1;
  int64_t U = V;
  while (U > 1 && (g.S % U != 0 || align < U * esize)) U /= 2;
  return static_cast<int>(U);
}

// width: reduce_width(). blocks_per_sm: resident CTAs per SM of the kernel; the grid is one full
// wave of them.
ReducePlan plan_reduce(const Geometry& g, int64_t esize, int width, int sms, int blocks_per_sm) {
  ReducePlan p;
  p.g = g;
  p.width = width;
  const int64_t V = 16 / esize;
  const int64_t target = static_cast<int64_t>(sms) * blocks_per_sm;
  constexpr int64_t kMaxSplits = 65535;
  if (!g.channels_last) {
    const int64_t U = width;
    const int64_t min_work = kThreads * 32;  // elements per CTA, at least
    int64_t splits = std::min(ceil_div(target, g.C), std::max<int64_t>(1, ceil_div(g.M, min_work)));
    splits = std::max(splits, ceil_div(g.M, int64_t(1) << 30));  // CTA-local 32-bit indices
    splits = std::min(splits, kMaxSplits);
    if (splits <= g.N) {
      p.split_n = static_cast<int>(splits);
      p.split_s = 1;
      p.chunk = g.S;
    } else {
      p.split_n = static_cast<int>(g.N);
      const int64_t split_s = ceil_div(splits, g.N);
      p.chunk = ceil_div(ceil_div(g.S, split_s), U) * U;
      p.split_s = static_cast<int>(ceil_div(g.S, p.chunk));
    }
    const int64_t total_splits = static_cast<int64_t>(p.split_n) * p.split_s;
    TORCH_CHECK(total_splits <= kMaxSplits, "dbn: input too large for the reduction grid");
    const int64_t max_rows = ceil_div(g.N, p.split_n);
    TORCH_CHECK(max_rows * (p.chunk / U) < (int64_t(1) << 31),
                "dbn: input too large for the reduction grid");
    p.splits = static_cast<int>(total_splits);
    p.grid_x = static_cast<int>(g.C);
    TORCH_CHECK(g.C < (int64_t(1) << 31), "dbn: too many channels");
    p.units_div = FastDiv(static_cast<uint32_t>(p.chunk / U));
    p.tx = kThreads;
    p.ty = 1;
  } else {
    const int64_t G = V;
    const int64_t groups = ceil_div(g.C, G);
    p.tx = static_cast<int>(std::min<int64_t>(32, next_pow2(groups)));
    p.ty = kThreads / p.tx;
    const int64_t tiles = ceil_div(groups, p.tx);
    TORCH_CHECK(tiles < (int64_t(1) << 31), "dbn: too many channels");
    p.grid_x = static_cast<int>(tiles);
    int64_t splits = std::min(ceil_div(target, tiles),
                              std::max<int64_t>(1, ceil_div(g.M, int64_t(p.ty) * 4 * 2)));
    splits = std::min(splits, kMaxSplits);
    p.rows_per_split = ceil_div(g.M, splits);
    p.splits = static_cast<int>(ceil_div(g.M, p.rows_per_split));
  }
#ifdef DBN_EMULATION
  g_last_plan[0] = p.width;
#endif
  return p;
}

// align: the alignment in bytes common to the element-wise pass's inputs and output;
// coef_align: the alignment common to its non-null coefficient pointers.
AffinePlan plan_affine(const Geometry& g, int64_t esize, int64_t align, int64_t coef_align,
                       int sms) {
  AffinePlan p;
  p.g = g;
  p.sms = sms;
  p.wide_index = g.numel >= (int64_t(1) << 31);
  const int64_t V = 16 / esize;
  int64_t U = V;
  if (!g.channels_last) {
    // A vector may cross one channel boundary (elementwise.cu), so only U <= S is needed.
    p.inner = g.S;
    while (U > 1 && (U > g.S || align < U * esize)) U /= 2;
  } else {
    // U consecutive channels with vector coefficient loads of min(U, 4) floats.
    p.inner = 1;
    while (U > 1 &&
           (g.C % U != 0 || align < U * esize || coef_align < std::min<int64_t>(U, 4) * 4)) {
      U /= 2;
    }
    p.across = U > 1;
  }
  if (p.wide_index && U != V) U = 1;  // 64-bit indices: 16-byte vectors or scalars only
  if (U == 1) p.across = false;
  p.width = static_cast<int>(U);
  if (!p.wide_index) {
    p.div_inner = FastDiv(static_cast<uint32_t>(p.inner));
    p.div_c = FastDiv(static_cast<uint32_t>(g.C));
  }
#ifdef DBN_EMULATION
  g_last_plan[1] = p.width;
  g_last_plan[2] = p.across ? 1 : 0;
#endif
  return p;
}

int64_t coef_alignment(const AffineCoefs& k) {
  int64_t align = 16;
  for (const float* q : {k.k0, k.p0, k.k1, k.p1, k.p2}) align = std::min(align, alignment(q));
  return align;
}

// A buffer the finalize kernel writes in place: itself when contiguous, else a contiguous copy
// that is copied back afterwards.
struct InPlace {
  Tensor target, work;
  explicit InPlace(const OptTensor& t) {
    if (t.has_value()) {
      target = *t;
      work = t->is_contiguous() ? *t : t->contiguous();
    }
  }
  void* ptr() const { return work.defined() ? work.data_ptr() : nullptr; }
  int dt() const { return work.defined() ? param_dt(work) : 0; }
  void finish() {
    if (work.defined() && !work.is_same(target)) target.copy_(work);
  }
};

Tensor contiguous_or_undefined(const OptTensor& t) {
  return t.has_value() ? t->contiguous() : Tensor();
}

const void* cptr(const Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }
int cdt(const Tensor& t) { return t.defined() ? param_dt(t) : 0; }

// ---- the ops ---------------------------------------------------------------------------------------
TrainForwardOut train_forward(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                              const OptTensor& running_mean, const OptTensor& running_var,
                              const OptTensor& dbn_mean, const OptTensor& dbn_std,
                              const OptTensor& num_batches_tracked,
                              std::optional<double> momentum, double eps, double alpha_scale,
                              double alpha_power, double alpha_offset) {
  constexpr const char* op = "dbn::cuda_train_forward";
  check_input(x, op);
  check_optional(op, "weight", weight, x);
  check_optional(op, "bias", bias, x);
  check_optional(op, "running_mean", running_mean, x);
  check_optional(op, "running_var", running_var, x);
  check_optional(op, "dbn_mean", dbn_mean, x);
  check_optional(op, "dbn_std", dbn_std, x);
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(), op,
              ": running_mean and running_var must be given together");
  TORCH_CHECK(dbn_mean.has_value() == dbn_std.has_value(), op,
              ": dbn_mean and dbn_std must be given together");
  if (num_batches_tracked.has_value()) {
    const Tensor& k = *num_batches_tracked;
    TORCH_CHECK(k.device() == x.device(), op, ": num_batches_tracked is on ", k.device(),
                " but the input is on ", x.device());
    TORCH_CHECK(k.scalar_type() == at::kLong && k.numel() == 1, op,
                ": num_batches_tracked must be one int64 element, got ", k.scalar_type(), " ",
                k.sizes());
  }
  TORCH_CHECK(!dbn_mean.has_value() || num_batches_tracked.has_value(), op,
              ": dbn_mean/dbn_std need num_batches_tracked to count steps");
  TORCH_CHECK(!running_mean.has_value() || momentum.has_value() ||
                  num_batches_tracked.has_value(),
              op, ": momentum=None (cumulative average) needs num_batches_tracked");
  const int64_t C = x.size(1);
  const int64_t M = C > 0 ? x.numel() / C : 0;
  TORCH_CHECK(x.numel() == 0 || !running_var.has_value() || M > 1,
              "Expected more than 1 value per channel when training, got input size ",
              x.sizes());

  if (x.scalar_type() == at::kDouble) {
    static auto ref = reference_op<TrainForwardFn>("dbn::reference_train_forward");
    return ref.call(x, weight, bias, running_mean, running_var, dbn_mean, dbn_std,
                    num_batches_tracked, momentum, eps, alpha_scale, alpha_power, alpha_offset);
  }

  DBN_DEVICE_GUARD(x);
  const auto fopts = x.options().dtype(at::kFloat);
  if (x.numel() == 0) {
    // As nn.BatchNorm: an empty batch leaves the statistics alone and still counts a step.
    if (num_batches_tracked.has_value()) num_batches_tracked->add_(1);
    const auto nan = std::numeric_limits<float>::quiet_NaN();
    return {at::empty_like(x, at::MemoryFormat::Preserve), at::full({C}, nan, fopts),
            at::full({C}, nan, fopts), at::full({C}, nan, fopts), at::full({C}, nan, fopts),
            at::ones({}, fopts)};
  }

  const cudaStream_t stream = current_stream(x);
  const int sms = num_sms(x.get_device());
  auto [xc, g] = supported_layout(x);
  const int rw = reduce_width(g, xc.element_size(), alignment(xc));
  const ReducePlan rp =
      plan_reduce(g, xc.element_size(), rw, sms,
                  collect_stats_blocks_per_sm(xc.scalar_type(), g.channels_last, rw));

  Tensor ws = at::empty({padded(3 * C * rp.splits) + 2 * padded(C)}, fopts);
  float* part = ws.data_ptr<float>();
  float* scale = part + padded(3 * C * rp.splits);
  float* shift = scale + padded(C);
  Tensor mean = at::empty({C}, fopts), invstd = at::empty({C}, fopts);
  Tensor batch_mean = at::empty({C}, fopts), batch_invstd = at::empty({C}, fopts);
  Tensor alpha = at::empty({}, fopts);
  const Tensor w = contiguous_or_undefined(weight), b = contiguous_or_undefined(bias);
  InPlace rm(running_mean), rv(running_var), dm(dbn_mean), ds(dbn_std);
  auto [y, yk] = output_like(x, xc, g);

  launch_collect_stats(xc, rp, part, stream);

  FinalizeTrainArgs fa;
  fa.part = part;
  fa.splits = rp.splits;
  fa.C = C;
  fa.M = static_cast<float>(M);
  fa.eps = static_cast<float>(eps);
  fa.unbias = static_cast<float>(static_cast<double>(M) / static_cast<double>(M - 1));
  fa.has_momentum = momentum.has_value();
  fa.momentum = static_cast<float>(momentum.value_or(0.0));
  fa.alpha_scale = static_cast<float>(alpha_scale);
  fa.alpha_power = static_cast<float>(alpha_power);
  fa.alpha_offset = static_cast<float>(alpha_offset);
  int64_t* counter =
      num_batches_tracked.has_value() ? num_batches_tracked->data_ptr<int64_t>() : nullptr;
  fa.num_batches_tracked = counter;
  fa.running_mean = rm.ptr();
  fa.running_mean_dt = rm.dt();
  fa.running_var = rv.ptr();
  fa.running_var_dt = rv.dt();
  fa.dbn_mean = dm.ptr();
  fa.dbn_mean_dt = dm.dt();
  fa.dbn_std = ds.ptr();
  fa.dbn_std_dt = ds.dt();
  fa.weight = cptr(w);
  fa.weight_dt = cdt(w);
  fa.bias = cptr(b);
  fa.bias_dt = cdt(b);
  fa.out_mean = mean.data_ptr<float>();
  fa.out_invstd = invstd.data_ptr<float>();
  fa.out_batch_mean = batch_mean.data_ptr<float>();
  fa.out_batch_invstd = batch_invstd.data_ptr<float>();
  fa.out_alpha = alpha.data_ptr<float>();
  fa.scale = scale;
  fa.shift = shift;
  launch_finalize_train(fa, stream);

  // The normalize pass also increments num_batches_tracked (after finalize has read it).
  AffineCoefs coefs;
  coefs.k0 = fa.out_mean;
  coefs.p0 = scale;
  coefs.p2 = shift;
  const AffinePlan ap = plan_affine(g, xc.element_size(), std::min(alignment(xc), alignment(yk)),
                                    coef_alignment(coefs), sms);
  launch_channel_affine(ap, xc, nullptr, yk, coefs, counter, stream);
  if (!yk.is_same(y)) y.copy_(yk);
  rm.finish();
  rv.finish();
  dm.finish();
  ds.finish();
  return {y, mean, invstd, batch_mean, batch_invstd, alpha};
}

std::tuple<Tensor, Tensor> eval_forward(const Tensor& x, const OptTensor& weight,
                                        const OptTensor& bias, const Tensor& mean,
                                        const Tensor& spread, double eps, bool spread_is_std) {
  constexpr const char* op = "dbn::cuda_eval_forward";
  check_input(x, op);
  check_optional(op, "weight", weight, x);
  check_optional(op, "bias", bias, x);
  check_per_channel(op, "mean", mean, x);
  check_per_channel(op, "spread", spread, x);

  if (x.scalar_type() == at::kDouble) {
    static auto ref = reference_op<EvalForwardFn>("dbn::reference_eval_forward");
    return ref.call(x, weight, bias, mean, spread, eps, spread_is_std);
  }

  DBN_DEVICE_GUARD(x);
  const int64_t C = x.size(1);
  const auto fopts = x.options().dtype(at::kFloat);
  Tensor invstd = at::empty({C}, fopts);
  if (C == 0) return {at::empty_like(x, at::MemoryFormat::Preserve), invstd};
  const cudaStream_t stream = current_stream(x);
  const int sms = num_sms(x.get_device());
  auto [xc, g] = supported_layout(x);

  Tensor ws = at::empty({3 * padded(C)}, fopts);
  float* scale = ws.data_ptr<float>();
  float* shift = scale + padded(C);
  float* center = shift + padded(C);
  const Tensor w = contiguous_or_undefined(weight), b = contiguous_or_undefined(bias);
  const Tensor m = mean.contiguous(), s = spread.contiguous();
  auto [y, yk] = output_like(x, xc, g);

  EvalPrepareArgs ea;
  ea.C = C;
  ea.mean = m.const_data_ptr();
  ea.mean_dt = param_dt(m);
  ea.spread = s.const_data_ptr();
  ea.spread_dt = param_dt(s);
  ea.weight = cptr(w);
  ea.weight_dt = cdt(w);
  ea.bias = cptr(b);
  ea.bias_dt = cdt(b);
  ea.eps = static_cast<float>(eps);
  ea.spread_is_std = spread_is_std;
  ea.out_invstd = invstd.data_ptr<float>();
  ea.scale = scale;
  ea.shift = shift;
  ea.center = center;
  launch_eval_prepare(ea, stream);

  if (x.numel() > 0) {
    AffineCoefs coefs;
    coefs.k0 = center;
    coefs.p0 = scale;
    coefs.p2 = shift;
    const AffinePlan ap = plan_affine(g, xc.element_size(),
                                      std::min(alignment(xc), alignment(yk)),
                                      coef_alignment(coefs), sms);
    launch_channel_affine(ap, xc, nullptr, yk, coefs, nullptr, stream);
    if (!yk.is_same(y)) y.copy_(yk);
  }
  return {y, invstd};
}

std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& grad_y, const Tensor& x,
                                            const OptTensor& weight, const Tensor& mean,
                                            const Tensor& invstd, const Tensor& batch_mean,
                                            const Tensor& batch_invstd, const Tensor& alpha,
                                            bool grad_through_stats, bool input_grad) {
  constexpr const char* op = "dbn::cuda_backward";
  check_input(x, op);
  TORCH_CHECK(grad_y.device() == x.device(), op, ": grad_y is on ", grad_y.device(),
              " but the input is on ", x.device());
  TORCH_CHECK(grad_y.sizes() == x.sizes(), op, ": grad_y has shape ", grad_y.sizes(),
              " but the input has shape ", x.sizes());
  TORCH_CHECK(grad_y.is_floating_point(), op, ": grad_y must be floating point");
  check_optional(op, "weight", weight, x);
  const int64_t C = x.size(1);
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"mean", &mean},
                                {"invstd", &invstd},
                                {"batch_mean", &batch_mean},
                                {"batch_invstd", &batch_invstd}}) {
    TORCH_CHECK(t->device() == x.device(), op, ": ", name, " is on ", t->device(),
                " but the input is on ", x.device());
    TORCH_CHECK(t->numel() == C, op, ": ", name, " should contain ", C, " elements not ",
                t->numel());
    TORCH_CHECK(t->is_floating_point(), op, ": ", name, " must be floating point");
  }
  if (grad_through_stats) {
    TORCH_CHECK(alpha.device() == x.device() && alpha.numel() == 1 && alpha.is_floating_point(),
                op, ": alpha must be one floating-point element on the input's device");
  }

  if (x.scalar_type() == at::kDouble) {
    static auto ref = reference_op<BackwardFn>("dbn::reference_backward");
    return ref.call(grad_y, x, weight, mean, invstd, batch_mean, batch_invstd, alpha,
                    grad_through_stats, input_grad);
  }

  DBN_DEVICE_GUARD(x);
  const auto fopts = x.options().dtype(at::kFloat);
  if (x.numel() == 0) {
    Tensor grad_x = input_grad ? at::empty_like(x, at::MemoryFormat::Preserve)
                               : at::empty({0}, x.options());
    return {grad_x, at::zeros({C}, fopts), at::zeros({C}, fopts)};
  }
  const cudaStream_t stream = current_stream(x);
  const int sms = num_sms(x.get_device());
  auto [xc, g] = supported_layout(x);
  const Tensor dy = match_layout(grad_y, xc, g);
  const int rw = reduce_width(g, xc.element_size(), std::min(alignment(xc), alignment(dy)));
  const ReducePlan rp =
      plan_reduce(g, xc.element_size(), rw, sms,
                  backward_reduce_blocks_per_sm(xc.scalar_type(), g.channels_last, rw));

  const Tensor mean_f = mean.to(at::kFloat).contiguous();
  const Tensor invstd_f = invstd.to(at::kFloat).contiguous();
  const Tensor bmean_f = batch_mean.to(at::kFloat).contiguous();
  const Tensor binvstd_f = batch_invstd.to(at::kFloat).contiguous();
  const Tensor alpha_f = grad_through_stats ? alpha.to(at::kFloat).reshape({1}).contiguous()
                                            : Tensor();
  const Tensor w = contiguous_or_undefined(weight);

  Tensor ws = at::empty({padded(2 * C * rp.splits) + 3 * padded(C)}, fopts);
  float* part = ws.data_ptr<float>();
  float* coef = part + padded(2 * C * rp.splits);
  Tensor grad_weight = at::empty({C}, fopts), grad_bias = at::empty({C}, fopts);

  launch_backward_reduce(dy, xc, mean_f.const_data_ptr<float>(), rp, part, stream);

  FinalizeBackwardArgs fb;
  fb.part = part;
  fb.splits = rp.splits;
  fb.C = C;
  fb.M = static_cast<float>(x.numel() / C);
  fb.invstd = invstd_f.const_data_ptr<float>();
  fb.batch_mean = bmean_f.const_data_ptr<float>();
  fb.batch_invstd = binvstd_f.const_data_ptr<float>();
  fb.alpha = grad_through_stats ? alpha_f.const_data_ptr<float>() : nullptr;
  fb.weight = cptr(w);
  fb.weight_dt = cdt(w);
  fb.grad_through_stats = grad_through_stats;
  fb.input_grad = input_grad;
  fb.grad_weight = grad_weight.data_ptr<float>();
  fb.grad_bias = grad_bias.data_ptr<float>();
  fb.coef_a = coef;
  fb.coef_b = coef + padded(C);
  fb.coef_c = coef + 2 * padded(C);
  launch_finalize_backward(fb, stream);

  if (!input_grad) return {at::empty({0}, x.options()), grad_weight, grad_bias};
  auto [grad_x, dk] = output_like(x, xc, g);
  AffineCoefs coefs;  // dx = A * dy + (B * (x - m_B) + C); a_g = 0: dx = A * dy, x is not read
  coefs.p0 = fb.coef_a;
  if (grad_through_stats) {
    coefs.k1 = fb.batch_mean;
    coefs.p1 = fb.coef_b;
    coefs.p2 = fb.coef_c;
  }
  int64_t align = std::min(alignment(dy), alignment(dk));
  if (grad_through_stats) align = std::min(align, alignment(xc));
  const AffinePlan ap = plan_affine(g, xc.element_size(), align, coef_alignment(coefs), sms);
  launch_channel_affine(ap, dy, grad_through_stats ? &xc : nullptr, dk, coefs, nullptr, stream);
  if (!dk.is_same(grad_x)) grad_x.copy_(dk);
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace
}  // namespace dbn

TORCH_LIBRARY_FRAGMENT(dbn, m) {
  m.def((std::string(DBN_OP_PREFIX "train_forward") + dbn::kTrainForwardSchema).c_str());
  m.def((std::string(DBN_OP_PREFIX "eval_forward") + dbn::kEvalForwardSchema).c_str());
  m.def((std::string(DBN_OP_PREFIX "backward") + dbn::kBackwardSchema).c_str());
}

#ifdef DBN_EMULATION
// Test hook: [reduction width, element-wise width, element-wise across] of the last planning.
TORCH_LIBRARY_FRAGMENT(dbn, m) {
  m.def("emu_last_plan() -> int[]", [] {
    return std::vector<int64_t>(dbn::g_last_plan.begin(), dbn::g_last_plan.end());
  });
}
#endif

TORCH_LIBRARY_IMPL(dbn, DBN_DISPATCH_KEY, m) {
  m.impl(DBN_OP_PREFIX "train_forward", &dbn::train_forward);
  m.impl(DBN_OP_PREFIX "eval_forward", &dbn::eval_forward);
  m.impl(DBN_OP_PREFIX "backward", &dbn::backward);
}

#ifndef DBN_EMULATION
// `import dbn_kernels._C` needs a module init function; the ops above register on load.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif
