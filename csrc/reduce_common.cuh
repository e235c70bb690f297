// The split (M x C) reduction kernels shared by the forward statistics (WelfordOp) and the
// backward sums (GradSumOp). Each CTA reduces one (channel or channel tile) x (M split) block to
// one partial per channel, entry `split` of a (splits, 3, C) stack (kStackRows): the finalize
// kernels merge the partials of a channel in split order. No atomics: bitwise reproducible.
//
// The backward reads dy through the fused epilogue's ReLU with ReluGradSumOp: dy where
// relu_output (the forward's y, in x's dtype and layout) > 0, else 0, applied as each dy vector
// arrives. Its own accumulator type, hence its own kernels, rather than a runtime flag: with a
// flag the plain NCS kernels took ~60 registers at every width > 1 (41-56 without), an occupancy
// step lower (float32 6 -> 4, 16-bit 5 -> 4 CTAs per SM on sm_90). As template instances the
// plain kernels are unchanged and the masked ones take 47-57; each has its own occupancy, which
// the planner queries like the others (Reduction::kReluSums).
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <type_traits>

#include "dbn_common.cuh"

namespace dbn {

// Split j's partial result for channel c: the number of values it covered (from its bounds: the
// hot loop keeps no tally) and the accumulator's two stored fields.
__device__ __forceinline__ void store_partial(float* __restrict__ part, int64_t C, int j,
                                              int64_t c, int64_t count, const float* acc) {
  float* entry = part + static_cast<int64_t>(j) * kStackRows * C + c;
  entry[0] = static_cast<float>(count);
  entry[C] = acc[0];
  entry[2 * C] = acc[1];
}

// num_batches_tracked += 1, by one thread of the grid: the step's first launch counts it, and
// nothing else in the launch reads the counter (finalize, the next launch, reads k).
__device__ __forceinline__ void count_step(int64_t* counter) {
  if (counter != nullptr && blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0 &&
      threadIdx.y == 0) {
    *counter += 1;
  }
}

// ---- NCS: contiguous (N, C, S) -----------------------------------------------------------------
// grid (C, splits), 1-D blocks of kThreads. CTA (c, j) covers rows [n0, n1) of channel c (row n
// = the S values of (n, c)) and columns [s0, s0 + chunk). Its work is flattened into units (U
// consecutive columns, one load of U * sizeof(T) <= 16 bytes; U divides S) numbered
// t = row * units_per_chunk + col, so short rows (7x7) keep every thread busy; t -> (row, col) is
// one multiply-shift division.
template <typename T, class Op, int U, int B>
__device__ __forceinline__ void ncs_accumulate(const T* __restrict__ x, const T* __restrict__ dy,
                                               const T* __restrict__ relu_output, int64_t base,
                                               int64_t row_stride, uint32_t total,
                                               const FastDiv& units_div, uint32_t units_valid,
                                               float (&st)[Op::kF][1],
                                               const float (&center)[1]) {
  for (uint32_t t0 = threadIdx.x; t0 < total; t0 += B * kThreads) {
    float xv[B * U][1], gv[B * U][1];
    bool ok[B * U];
#pragma unroll
    for (int b = 0; b < B; ++b) {
      const uint32_t t = t0 + b * kThreads;
      uint32_t row = 0, col = 0;
      bool valid = t < total;
      if (valid) {
        fast_divmod(units_div, t, row, col);
        valid = col < units_valid;
      }
      float xs[U], gs[U];
      if (valid) {
        const int64_t off = base + static_cast<int64_t>(row) * row_stride +
                            static_cast<int64_t>(col) * U;
        AlignedVec<T, U> ys;
        if constexpr (Op::kMasksDy) ys = load_vec<T, U>(relu_output + off);
        load_as_float<T, U>(x + off, xs);
        if constexpr (Op::kNeedsDy) {
          load_as_float<T, U>(dy + off, gs);
          if constexpr (Op::kMasksDy) mask_by_relu_output<T, U>(ys, gs);
        }
      } else {
#pragma unroll
        for (int u = 0; u < U; ++u) xs[u] = 0.f;
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        xv[b * U + u][0] = xs[u];
        if constexpr (Op::kNeedsDy) {
          gv[b * U + u][0] = valid ? gs[u] : 0.f;
        } else {
          gv[b * U + u][0] = 0.f;
        }
        ok[b * U + u] = valid;
      }
    }
    Op::template add<B * U, 1>(st, xv, gv, ok, center);
  }
}

// Loads of U elements (U a power of two dividing S, at most 16 bytes), B per batch: 16 elements
// in flight per thread and input for every vector width, 8 for scalar loads.
template <typename T, class Op, int U>
__device__ __forceinline__ void ncs_run(const T* __restrict__ x, const T* __restrict__ dy,
                                        const T* __restrict__ relu_output, int64_t base,
                                        int64_t row_stride, int64_t rows, int64_t cols,
                                        const ReducePlan& p,
                                        float (&st)[Op::kF][1], const float (&center)[1]) {
  constexpr int B = U == 1 ? 8 : 16 / U;
  const uint32_t per_row = static_cast<uint32_t>(p.chunk / U);
  const uint32_t total = static_cast<uint32_t>(rows) * per_row;
  const uint32_t valid = static_cast<uint32_t>(cols / U);
  ncs_accumulate<T, Op, U, B>(x, dy, relu_output, base, row_stride, total, p.units_div, valid,
                              st, center);
}

// One kernel per load width U (= p.width), so each gets its own register allocation (the
// resident CTAs per SM, and so the planned grid, are per width too).
template <typename T, class Op, int U>
__global__ void __launch_bounds__(kThreads)
reduce_ncs_kernel(const T* __restrict__ x, const T* __restrict__ dy,
                  const T* __restrict__ relu_output, const float* __restrict__ center_ptr,
                  ReducePlan p, float* __restrict__ part, int64_t* counter) {
  count_step(counter);
  const int64_t C = p.g.C, S = p.g.S, N = p.g.N;
  const int64_t c = blockIdx.x;
  const int j = blockIdx.y;
  const int jn = j / p.split_s, js = j - jn * p.split_s;
  const int64_t n0 = N * jn / p.split_n, n1 = N * (jn + 1) / p.split_n;
  const int64_t s0 = static_cast<int64_t>(js) * p.chunk;
  const int64_t s1 = (S - s0 < p.chunk) ? S : s0 + p.chunk;
  const int64_t base = (n0 * C + c) * S + s0;
  const int64_t row_stride = C * S;

  float center[1] = {0.f};
  if constexpr (Op::kNeedsDy) center[0] = center_ptr[c];
  float st[Op::kF][1];
#pragma unroll
  for (int f = 0; f < Op::kF; ++f) st[f][0] = 0.f;

  // The plan guarantees (n1 - n0) * units per chunk < 2^31.
  ncs_run<T, Op, U>(x, dy, relu_output, base, row_stride, n1 - n0, s1 - s0, p, st, center);

  float acc[Op::kF];
#pragma unroll
  for (int f = 0; f < Op::kF; ++f) acc[f] = st[f][0];
  block_reduce_1d<Op>(acc);
  if (threadIdx.x == 0) store_partial(part, C, j, c, (n1 - n0) * (s1 - s0), acc);
}

// ---- NSC: channels last, M rows of C ------------------------------------------------------------
// grid (channel tiles, splits), blocks (tx, ty) with tx * ty = kThreads. Thread (tx, ty) owns the
// G = 16 / sizeof(T) consecutive channels [c0, c0 + G) (one 16-byte vector per row when aligned:
// p.width == G) and rows r0 + ty, r0 + ty + ty_dim, ... of its split, R rows per batch for memory
// parallelism. A warp reads whole 16-byte-aligned row segments: coalesced. The ty states are then
// merged by a fixed shared-memory tree.
//
// Its register use sits near an occupancy step, where ptxas's choice moves with unrelated code
// changes (76 -> 86 registers, 3 -> 2 CTAs per SM, for the 16-bit forward): the bound pins the
// resident CTAs per SM (forward 3 for 16-bit types, 4 for float32; backward 2). The only spill it
// causes is 4 bytes in the 16-bit forward's scalar (C % 8 != 0) path on sm_90.
template <typename T, class Op>
constexpr int nsc_min_blocks() {
  return Op::kNeedsDy ? 2 : (sizeof(T) == 2 ? 3 : 4);
}

template <typename T, class Op>
__global__ void __launch_bounds__(kThreads, (nsc_min_blocks<T, Op>()))
reduce_nsc_kernel(const T* __restrict__ x, const T* __restrict__ dy,
                  const T* __restrict__ relu_output, const float* __restrict__ center_ptr,
                  ReducePlan p, float* __restrict__ part, int64_t* counter) {
  count_step(counter);
  constexpr int G = VecWidth<T>::value;
  // Rows per batch. The masked 16-bit backward reads three streams in the plain one's 126
  // registers: 4 rows spill (8-16 bytes on sm_90), 3 still do, 2 take 113 registers and keep 96
  // bytes per thread in flight (the plain kernel 128).
  constexpr int R = Op::kMasksDy && sizeof(T) == 2 ? 2 : 4;
  constexpr int kF = Op::kF;
  const int64_t C = p.g.C;
  const bool vec = p.width == G;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int TX = blockDim.x, TY = blockDim.y;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * TX + tx) * G;
  const int j = blockIdx.y;
  const int64_t r0 = static_cast<int64_t>(j) * p.rows_per_split;
  const int64_t r1 = (p.g.M - r0 < p.rows_per_split) ? p.g.M : r0 + p.rows_per_split;

  float center[G];
#pragma unroll
  for (int k = 0; k < G; ++k) {
    center[k] = 0.f;
    if constexpr (Op::kNeedsDy) {
      if (c0 + k < C) center[k] = center_ptr[c0 + k];
    }
  }
  float st[kF][G];
#pragma unroll
  for (int f = 0; f < kF; ++f)
#pragma unroll
    for (int k = 0; k < G; ++k) st[f][k] = 0.f;

  if (c0 < C) {
    for (int64_t r = r0 + ty; r < r1; r += static_cast<int64_t>(R) * TY) {
      float xv[R][G], gv[R][G];
      bool ok[R];
#pragma unroll
      for (int i = 0; i < R; ++i) {
        const int64_t rr = r + static_cast<int64_t>(i) * TY;
        ok[i] = rr < r1;
        const int64_t off = rr * C + c0;
        if (ok[i] && vec) {
          AlignedVec<T, G> ys;
          if constexpr (Op::kMasksDy) ys = load_vec<T, G>(relu_output + off);
          load_as_float<T, G>(x + off, xv[i]);
          if constexpr (Op::kNeedsDy) {
            load_as_float<T, G>(dy + off, gv[i]);
            if constexpr (Op::kMasksDy) mask_by_relu_output<T, G>(ys, gv[i]);
          }
        } else {
#pragma unroll
          for (int k = 0; k < G; ++k) {
            const bool in = ok[i] && c0 + k < C;
            xv[i][k] = in ? static_cast<float>(x[off + k]) : 0.f;
            if constexpr (Op::kNeedsDy) {
              gv[i][k] = in ? static_cast<float>(dy[off + k]) : 0.f;
              if (Op::kMasksDy && in) {
                gv[i][k] = relu_masked(gv[i][k], static_cast<float>(relu_output[off + k]));
              }
            }
          }
        }
        if constexpr (!Op::kNeedsDy) {
#pragma unroll
          for (int k = 0; k < G; ++k) gv[i][k] = 0.f;
        }
      }
      Op::template add<R, G>(st, xv, gv, ok, center);
    }
  }

  // Fixed-order tree over ty. Layout [field][k][ty][tx]: consecutive tx, consecutive banks.
  __shared__ float sm[kF * G * kThreads];
  auto at = [&](int f, int k, int y) -> float& { return sm[((f * G + k) * TY + y) * TX + tx]; };
#pragma unroll
  for (int f = 0; f < kF; ++f)
#pragma unroll
    for (int k = 0; k < G; ++k) at(f, k, ty) = st[f][k];
  __syncthreads();
  for (int s = TY / 2; s > 0; s >>= 1) {
    if (ty < s) {
#pragma unroll
      for (int k = 0; k < G; ++k) {
        float a[kF], b[kF];
#pragma unroll
        for (int f = 0; f < kF; ++f) {
          a[f] = st[f][k];
          b[f] = at(f, k, ty + s);
        }
        Op::combine(a, b);
#pragma unroll
        for (int f = 0; f < kF; ++f) {
          st[f][k] = a[f];
          at(f, k, ty) = a[f];
        }
      }
    }
    __syncthreads();
  }
  if (ty == 0) {
#pragma unroll
    for (int k = 0; k < G; ++k) {
      if (c0 + k < C) {
        float acc[kF];
#pragma unroll
        for (int f = 0; f < kF; ++f) acc[f] = st[f][k];
        store_partial(part, C, j, c0 + k, r1 - r0, acc);
      }
    }
  }
}

// Call f(std::integral_constant<int, U>{}) for the NCS load width U = width (16 / sizeof(T), its
// halves down to 1).
template <typename T, typename F>
decltype(auto) with_ncs_width(int width, F&& f) {
  constexpr int V = VecWidth<T>::value;
  if (width == V) return f(std::integral_constant<int, V>{});
  if (width == V / 2) return f(std::integral_constant<int, V / 2>{});
  if constexpr (V / 4 > 1) {
    if (width == V / 4) return f(std::integral_constant<int, V / 4>{});
  }
  TORCH_CHECK(width == 1, "dbn reduce: no kernel for width ", width);
  return f(std::integral_constant<int, 1>{});
}

// Resident CTAs per SM of the reduction kernel for this layout (and NCS load width) on the current
// device: the planner sizes the grid to exactly one full wave (every CTA resident at once, equal
// work, no tail).
template <typename T, class Op>
int reduce_blocks_per_sm(bool channels_last, int width) {
#ifdef DBN_EMULATION
  (void)channels_last;
  (void)width;
  return 2048 / kThreads;
#else
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  // Slots per device: NCS widths 1, 2, 4, 8, then NSC.
  static std::array<std::atomic<int>, 64 * 5> cache{};
  int kind = 4;
  if (!channels_last) {
    kind = 0;
    while ((2 << kind) <= width) ++kind;
  }
  std::atomic<int>& slot = cache[(device % 64) * 5 + kind];
  int blocks = slot.load(std::memory_order_relaxed);
  if (blocks > 0) return blocks;
  if (channels_last) {
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &blocks, reduce_nsc_kernel<T, Op>, kThreads, 0));
  } else {
    with_ncs_width<T>(width, [&](auto u) {
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
          &blocks, reduce_ncs_kernel<T, Op, decltype(u)::value>, kThreads, 0));
    });
  }
  blocks = std::max(blocks, 1);
  slot.store(blocks, std::memory_order_relaxed);
  return blocks;
#endif
}

template <class Op>
int reduce_blocks_per_sm_for(at::ScalarType dtype, bool channels_last, int width) {
  switch (dtype) {
    case at::ScalarType::Half: return reduce_blocks_per_sm<c10::Half, Op>(channels_last, width);
    case at::ScalarType::BFloat16:
      return reduce_blocks_per_sm<c10::BFloat16, Op>(channels_last, width);
    default: return reduce_blocks_per_sm<float, Op>(channels_last, width);
  }
}

// Launch the reduction of plan p for input dtype T with accumulator Op.
// dy with GradSumOp, dy and relu_output with ReluGradSumOp, neither with WelfordOp (null).
template <typename T, class Op>
void launch_reduce(const T* x, const T* dy, const T* relu_output, const float* center,
                   const ReducePlan& p, float* part, int64_t* counter, cudaStream_t stream) {
  if (p.g.channels_last) {
    const dim3 grid(p.grid_x, p.splits), block(p.tx, p.ty);
    const auto kernel = reduce_nsc_kernel<T, Op>;
    DBN_LAUNCH(kernel, grid, block, stream, x, dy, relu_output, center, p, part, counter);
  } else {
    with_ncs_width<T>(p.width, [&](auto u) {
      const dim3 grid(p.grid_x, p.splits), block(kThreads);
      const auto kernel = reduce_ncs_kernel<T, Op, decltype(u)::value>;
      DBN_LAUNCH(kernel, grid, block, stream, x, dy, relu_output, center, p, part, counter);
    });
  }
}

}  // namespace dbn
