// Device helpers shared by the kernels: vector loads/stores, dtype conversions, per-channel
// parameter access with a runtime dtype, fast division, Welford/Chan merges and the fixed-order
// warp/block reductions that make every result bitwise reproducible (no float atomics).
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#ifndef DBN_EMULATION
#include <c10/cuda/CUDAException.h>
#endif

#include "dbn_launch.h"

// Launch on `stream` and check the launch. KERNEL is one name (a function pointer for templates).
// Under DBN_EMULATION (emulation/cuda_emu.h) the grid runs on the host instead.
#ifdef DBN_EMULATION
#define DBN_LAUNCH(KERNEL, GRID, BLOCK, STREAM, ...) \
  ::dbn::emu::launch(KERNEL, dim3(GRID), dim3(BLOCK), __VA_ARGS__)
#else
#define DBN_LAUNCH(KERNEL, GRID, BLOCK, STREAM, ...)   \
  do {                                               \
    KERNEL<<<GRID, BLOCK, 0, STREAM>>>(__VA_ARGS__); \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                  \
  } while (0)
#endif

namespace dbn {

// ---- dtype dispatch over the input dtypes the kernels compile for -----------------------------
// float64 never reaches a kernel: the op launchers route it to the reference backend.
#define DBN_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                                   \
  [&] {                                                                             \
    switch (TYPE) {                                                                 \
      case at::ScalarType::Float: { using scalar_t = float; return __VA_ARGS__(); } \
      case at::ScalarType::Half: { using scalar_t = c10::Half; return __VA_ARGS__(); } \
      case at::ScalarType::BFloat16: {                                              \
        using scalar_t = c10::BFloat16; return __VA_ARGS__(); }                     \
      default:                                                                      \
        TORCH_CHECK(false, NAME, ": unsupported input dtype ", TYPE);               \
    }                                                                               \
  }()

// ---- vector access ---------------------------------------------------------------------------
template <typename T>
struct VecWidth {
  static constexpr int value = 16 / static_cast<int>(sizeof(T));  // elements per 16 bytes
};

template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_as_float(const T* __restrict__ p, float (&out)[N]) {
  if constexpr (N == 1) {
    out[0] = static_cast<float>(p[0]);
  } else {
    const AlignedVec<T, N> v = *reinterpret_cast<const AlignedVec<T, N>*>(p);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = static_cast<float>(v.v[i]);
  }
}

// N elements as they are stored (one 16-byte or narrower load).
template <typename T, int N>
__device__ __forceinline__ AlignedVec<T, N> load_vec(const T* __restrict__ p) {
  return *reinterpret_cast<const AlignedVec<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_from_float(T* __restrict__ p, const float (&in)[N]) {
  if constexpr (N == 1) {
    p[0] = static_cast<T>(in[0]);
  } else {
    AlignedVec<T, N> v;
#pragma unroll
    for (int i = 0; i < N; ++i) v.v[i] = static_cast<T>(in[i]);
    *reinterpret_cast<AlignedVec<T, N>*>(p) = v;
  }
}

// ---- the fused epilogue's ReLU (ops.py) ---------------------------------------------------------
// Forward: torch.relu, NaN kept (max(v, 0) would turn it into 0).
__device__ __forceinline__ float relu(float v) { return v < 0.f ? 0.f : v; }

// Backward: dy through the ReLU, recovered from its output y, as torch.where(y > 0, dy, 0): a
// select, not dy * (y > 0), so an inf or NaN dy where the ReLU was off still gives 0.
__device__ __forceinline__ float relu_masked(float dy, float y) { return y > 0.f ? dy : 0.f; }

// dy[0 .. N) masked in place by the N values of y as stored (load_vec). The reductions issue the
// relu_output load before dy's and convert it last, so that its latency overlaps dy's (a load
// converted at once stalls before the next one is issued).
template <typename T, int N>
__device__ __forceinline__ void mask_by_relu_output(const AlignedVec<T, N>& y, float (&dy)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) dy[i] = relu_masked(dy[i], static_cast<float>(y.v[i]));
}

// ---- per-channel tensors whose dtype is only known at run time --------------------------------
__device__ __forceinline__ float load_param(const Param& p, int64_t i) {
  switch (p.dt) {
    case kParamF16: return static_cast<float>(static_cast<const c10::Half*>(p.ptr)[i]);
    case kParamBF16: return static_cast<float>(static_cast<const c10::BFloat16*>(p.ptr)[i]);
    default: return static_cast<const float*>(p.ptr)[i];
  }
}

__device__ __forceinline__ float load_param(const MutableParam& p, int64_t i) {
  return load_param(Param{p.ptr, p.dt}, i);
}

__device__ __forceinline__ void store_param(const MutableParam& p, int64_t i, float v) {
  switch (p.dt) {
    case kParamF16: static_cast<c10::Half*>(p.ptr)[i] = static_cast<c10::Half>(v); break;
    case kParamBF16: static_cast<c10::BFloat16*>(p.ptr)[i] = static_cast<c10::BFloat16>(v); break;
    default: static_cast<float*>(p.ptr)[i] = v;
  }
}

// ---- division ----------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t fast_div(const FastDiv& d, uint32_t n) {
  return (__umulhi(n, d.magic) + n) >> d.shift;
}

__device__ __forceinline__ void fast_divmod(const FastDiv& d, uint32_t n, uint32_t& q,
                                            uint32_t& r) {
  q = fast_div(d, n);
  r = n - q * d.divisor;
}

// ---- torch.lerp, as ATen computes it (so buffer updates match the reference) ------------------
__device__ __forceinline__ float lerp_like_torch(float start, float end, float weight) {
  return fabsf(weight) < 0.5f ? start + weight * (end - start)
                              : end - (end - start) * (1.0f - weight);
}

// ---- Welford / Chan ----------------------------------------------------------------------------
// Merge the statistics (mean_b, m2_b, n_b) of a disjoint set into (mean, m2, n). The empty set
// (n_b == 0) is the identity; merging into an empty state copies exactly.
__device__ __forceinline__ void chan_merge(float& mean, float& m2, float& n, float mean_b,
                                           float m2_b, float n_b) {
  if (n_b == 0.f) return;
  const float nn = n + n_b;
  const float w = n_b / nn;
  const float delta = mean_b - mean;
  mean = fmaf(delta, w, mean);
  m2 = m2 + m2_b + delta * delta * n * w;
  n = nn;
}

// Accumulators of the split reductions. Each holds kF fields per channel for G channels, adds a
// batch of R rows x G channels (rows masked by ok), and combines with another state. Fields 0
// and 1 are what a split stores in rows 1 and 2 of its stack entry; row 0, the count, comes from
// the split's bounds (reduce_common.cuh), not from a per-element tally.

// Forward statistics: fields mean, m2, count. A batch is reduced exactly in registers (two-pass
// mean and squared deviations) and Chan-merged, so the per-element cost is an add and an FMA and
// inputs with |mean| >> std stay accurate (never E[x^2] - E[x]^2).
struct WelfordOp {
  static constexpr int kF = 3;
  static constexpr bool kNeedsDy = false;
  static constexpr bool kMasksDy = false;

  __device__ __forceinline__ static void combine(float* a, const float* b) {
    chan_merge(a[0], a[1], a[2], b[0], b[1], b[2]);
  }

  template <int R, int G>
  __device__ __forceinline__ static void add(float (&st)[kF][G], const float (&x)[R][G],
                                             const float (&)[R][G], const bool (&ok)[R],
                                             const float (&)[G]) {
    float cnt = 0.f;
#pragma unroll
    for (int r = 0; r < R; ++r) cnt += ok[r] ? 1.f : 0.f;
    if (cnt == 0.f) return;
    const float inv_cnt = 1.f / cnt;
    const float nn = st[2][0] + cnt;
    const float w = cnt / nn;
    const float n_old = st[2][0];
#pragma unroll
    for (int k = 0; k < G; ++k) {
      float s = 0.f;
#pragma unroll
      for (int r = 0; r < R; ++r) s += ok[r] ? x[r][k] : 0.f;
      const float mb = s * inv_cnt;
      float q = 0.f;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float d = ok[r] ? x[r][k] - mb : 0.f;
        q = fmaf(d, d, q);
      }
      const float delta = mb - st[0][k];
      st[0][k] = fmaf(delta, w, st[0][k]);
      st[1][k] = st[1][k] + q + delta * delta * n_old * w;
      st[2][k] = nn;
    }
  }
};

// Backward sums: fields sum(dy), sum(dy * (x - mean)). Masked-out values are loaded as zeros and
// contribute nothing. MASKS_DY: dy is read through the fused epilogue's ReLU (reduce_common.cuh).
template <bool MASKS_DY>
struct GradSumOpT {
  static constexpr int kF = 2;
  static constexpr bool kNeedsDy = true;
  static constexpr bool kMasksDy = MASKS_DY;

  __device__ __forceinline__ static void combine(float* a, const float* b) {
    a[0] += b[0];
    a[1] += b[1];
  }

  template <int R, int G>
  __device__ __forceinline__ static void add(float (&st)[kF][G], const float (&x)[R][G],
                                             const float (&g)[R][G], const bool (&ok)[R],
                                             const float (&center)[G]) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int k = 0; k < G; ++k) {
        const float gv = ok[r] ? g[r][k] : 0.f;
        st[0][k] += gv;
        st[1][k] = fmaf(gv, x[r][k] - center[k], st[1][k]);
      }
    }
  }
};

using GradSumOp = GradSumOpT<false>;
using ReluGradSumOp = GradSumOpT<true>;

// Merges of the sources of a (P, 3, C) stack (kStackRows), fields (count, mean, M2) ...
struct StatsMergeOp {
  static constexpr int kF = kStackRows;
  __device__ __forceinline__ static void combine(float* a, const float* b) {
    chan_merge(a[1], a[2], a[0], b[1], b[2], b[0]);
  }
};

// ... and (count, sum dy, sum dy * (x - mean)).
struct SumsMergeOp {
  static constexpr int kF = kStackRows;
  __device__ __forceinline__ static void combine(float* a, const float* b) {
#pragma unroll
    for (int f = 0; f < kF; ++f) a[f] += b[f];
  }
};

// Fixed-order tree over a warp: lane 0 ends with the merge of all 32 lanes' states.
template <class Op>
__device__ __forceinline__ void warp_reduce(float (&st)[Op::kF]) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    float other[Op::kF];
#pragma unroll
    for (int f = 0; f < Op::kF; ++f) other[f] = __shfl_down_sync(0xffffffffu, st[f], off);
    Op::combine(st, other);
  }
}

// Fixed-order reduction over a 1-D block of kThreads threads: thread 0 ends with the result.
template <class Op>
__device__ __forceinline__ void block_reduce_1d(float (&st)[Op::kF]) {
  constexpr int kWarps = kThreads / 32;
  __shared__ float sm[Op::kF][kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  warp_reduce<Op>(st);
  if (lane == 0) {
#pragma unroll
    for (int f = 0; f < Op::kF; ++f) sm[f][warp] = st[f];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int f = 0; f < Op::kF; ++f) st[f] = lane < kWarps ? sm[f][lane] : 0.f;
    warp_reduce<Op>(st);
  }
}


// Channel c of a (P, 3, C) stack merged by one warp: lane l folds sources l, l + 32, ... in
// ascending order, then the fixed shuffle tree; lane 0 ends with the result. The fold and the
// tree are the same for every caller, so merging a stack in two steps (merge kernel, then
// finalize of the one merged source) gives the bits of merging it in one.
template <class MergeOp>
__device__ __forceinline__ void warp_merge_sources(const float* __restrict__ stack,
                                                   int64_t sources, int64_t C, int64_t c,
                                                   float (&st)[kStackRows]) {
#pragma unroll
  for (int f = 0; f < kStackRows; ++f) st[f] = 0.f;
  for (int64_t p = threadIdx.x & 31; p < sources; p += 32) {
    float src[kStackRows];
#pragma unroll
    for (int f = 0; f < kStackRows; ++f) src[f] = stack[(p * kStackRows + f) * C + c];
    MergeOp::combine(st, src);
  }
  warp_reduce<MergeOp>(st);
}

}  // namespace dbn
