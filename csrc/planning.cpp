#include "planning.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <vector>

#include <ATen/ATen.h>
#ifndef DBN_EMULATION
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace dbn {

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Floats of an array in a workspace followed by others: rounded up to 4, so that the next one
// starts 16-byte aligned (vector loads).
int64_t padded(int64_t n) { return (n + 3) / 4 * 4; }

int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

#ifdef DBN_EMULATION
int num_sms(c10::DeviceIndex) {
  const char* env = std::getenv("DBN_EMULATION_SMS");  // the grid shape depends on it
  return env != nullptr ? std::max(1, std::atoi(env)) : 4;
}
#else
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

// Dimension order (outermost first) of NCS or NSC.
std::vector<int64_t> order_for(int64_t dim, bool channels_last) {
  std::vector<int64_t> order{0};
  if (!channels_last) order.push_back(1);
  for (int64_t d = 2; d < dim; ++d) order.push_back(d);
  if (channels_last) order.push_back(1);
  return order;
}

bool is_layout(const Tensor& t, bool channels_last) {
  return dense_in_order(t, order_for(t.dim(), channels_last));
}

enum class Layout { kNCS, kNSC, kOther };

Layout classify(const Tensor& t) {
  const bool ncs = is_layout(t, false), nsc = is_layout(t, true);
  if (ncs && nsc) {  // the same memory (S == 1 or C == 1): pick the better grid
    int64_t S = 1;
    for (int64_t d = 2; d < t.dim(); ++d) S *= t.size(d);
    return (S == 1 && t.size(1) > 1) ? Layout::kNSC : Layout::kNCS;
  }
  if (ncs) return Layout::kNCS;
  return nsc ? Layout::kNSC : Layout::kOther;
}

// ---- planning -----------------------------------------------------------------------------------
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

// NCS: grid (C, splits); each channel's N x S block is split over N first, then into column
// chunks, until the grid holds `target` CTAs or a CTA would get too little work.
void plan_ncs(ReducePlan& p, int64_t target) {
  const Geometry& g = p.g;
  const int64_t U = p.width;
  constexpr int64_t kMaxSplits = 65535;
  const int64_t min_work = kThreads * 32;  // elements per CTA, at least
  int64_t splits =
      std::min(ceil_div(target, g.C), std::max<int64_t>(1, ceil_div(g.M, min_work)));
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
  TORCH_CHECK(g.C < (int64_t(1) << 31), "dbn: too many channels");
  p.splits = static_cast<int>(total_splits);
  p.grid_x = static_cast<int>(g.C);
  p.units_div = FastDiv(static_cast<uint32_t>(p.chunk / U));
  p.tx = kThreads;
  p.ty = 1;
}

// NSC: grid (channel tiles, splits); a tile is up to 32 threads of 16 bytes of channels, the
// splits are row ranges.
void plan_nsc(ReducePlan& p, int64_t target, int64_t esize) {
  const Geometry& g = p.g;
  constexpr int64_t kMaxSplits = 65535;
  const int64_t groups = ceil_div(g.C, 16 / esize);
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

}  // namespace

cudaStream_t current_stream(const Tensor& t) {
#ifdef DBN_EMULATION
  (void)t;
  return nullptr;
#else
  return c10::cuda::getCurrentCUDAStream(t.get_device()).stream();
#endif
}

Input kernel_input(const Tensor& x) {
  Tensor t = x;
  Layout layout = classify(t);
  if (layout == Layout::kOther) {
    t = x.contiguous(x.suggest_memory_format());
    layout = classify(t);
    if (layout == Layout::kOther) {
      t = x.contiguous();
      layout = Layout::kNCS;
    }
  }
  Geometry g;
  g.channels_last = layout == Layout::kNSC;
  g.N = x.size(0);
  g.C = x.size(1);
  for (int64_t d = 2; d < x.dim(); ++d) g.S *= x.size(d);
  g.M = g.N * g.S;
  g.numel = x.numel();
  return {t, g, current_stream(x), num_sms(x.get_device())};
}

Tensor match_layout(const Tensor& t, const Input& in) {
  Tensor out = t.scalar_type() == in.t.scalar_type() ? t : t.to(in.t.scalar_type());
  if (!is_layout(out, in.g.channels_last)) {
    Tensor copy = at::empty_like(in.t);
    copy.copy_(out);
    out = copy;
  }
  return out;
}

Tensor match_layout_or_undefined(const OptTensor& t, const Input& in) {
  return t.has_value() ? match_layout(*t, in) : Tensor();
}

Output output_like(const Tensor& x, const Input& in) {
  Tensor out = at::empty_like(x, at::MemoryFormat::Preserve);
  if (is_layout(out, in.g.channels_last)) return {out, out};
  return {out, at::empty_like(in.t)};
}

Tensor Output::finish() {
  if (!target.is_same(result)) result.copy_(target);
  return result;
}

int64_t alignment(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  int64_t align = 16;
  while (align > 1 && a % align != 0) align >>= 1;
  return align;
}

int64_t alignment(const ElementwiseTensors& t) {
  int64_t align = 16;
  for (const Tensor* p : {t.in0, t.in1, static_cast<const Tensor*>(t.out), t.residual,
                          t.relu_output, static_cast<const Tensor*>(t.grad_residual)}) {
    if (p != nullptr) align = std::min(align, alignment(*p));
  }
  return align;
}

ReducePlan plan_reduce(const Input& in, Reduction kind, int64_t align) {
  ReducePlan p;
  p.g = in.g;
  const auto dtype = in.t.scalar_type();
  const int64_t esize = in.t.element_size();
  p.width = reduce_width(in.g, esize, align);
  const int blocks_per_sm =
      kind == Reduction::kStats
          ? collect_stats_blocks_per_sm(dtype, in.g.channels_last, p.width)
          : backward_reduce_blocks_per_sm(dtype, in.g.channels_last, p.width,
                                          kind == Reduction::kReluSums);
  const int64_t target = static_cast<int64_t>(in.sms) * blocks_per_sm;
  if (in.g.channels_last) {
    plan_nsc(p, target, esize);
  } else {
    plan_ncs(p, target);
  }
  return p;
}

ElementwisePlan plan_elementwise(const Input& in, int64_t align, const ElementwiseCoefs& coefs) {
  const Geometry& g = in.g;
  const int64_t esize = in.t.element_size();
  int64_t coef_align = 16;
  for (const float* q : {coefs.k0, coefs.p0, coefs.k1, coefs.p1, coefs.p2}) {
    coef_align = std::min(coef_align, alignment(q));
  }
  ElementwisePlan p;
  p.g = g;
  p.sms = in.sms;
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
  return p;
}

StackWorkspace stack_workspace(const Input& in, const ReducePlan& plan, int64_t extra) {
  const int64_t stack_floats = padded(int64_t(plan.splits) * kStackRows * in.g.C);
  Tensor storage = at::empty({stack_floats + extra}, in.t.options().dtype(at::kFloat));
  float* stack = storage.data_ptr<float>();
  return {storage, stack, plan.splits, stack + stack_floats};
}

ElementwiseCoefs normalize_coefs(const float* coef, int64_t C) {
  ElementwiseCoefs k;
  k.k0 = coef;
  k.p0 = coef + C;
  k.p2 = coef + 2 * C;
  return k;
}

ElementwiseCoefs dx_coefs(const float* coef, int64_t rows, int64_t C) {
  ElementwiseCoefs k;
  if (rows == 0) return k;  // no input gradient: the pass writes only grad_residual
  k.p0 = coef;  // A
  if (rows == 4) {
    k.k1 = coef + C;
    k.p1 = coef + 2 * C;
    k.p2 = coef + 3 * C;
  }
  return k;
}

Param param(const Tensor& t) {
  if (!t.defined()) return {};
  switch (t.scalar_type()) {
    case at::kHalf: return {t.const_data_ptr(), kParamF16};
    case at::kBFloat16: return {t.const_data_ptr(), kParamBF16};
    default: return {t.const_data_ptr(), kParamF32};
  }
}

Tensor contiguous_or_undefined(const OptTensor& t) {
  return t.has_value() ? t->contiguous() : Tensor();
}

InPlace::InPlace(const OptTensor& t) {
  if (t.has_value()) {
    target_ = *t;
    work_ = t->is_contiguous() ? *t : t->contiguous();
  }
}

MutableParam InPlace::param() const {
  const Param p = dbn::param(work_);
  return {work_.defined() ? work_.data_ptr() : nullptr, p.dt};
}

void InPlace::finish() {
  if (work_.defined() && !work_.is_same(target_)) target_.copy_(work_);
}

}  // namespace dbn
