// The split (M x C) reduction kernels shared by the forward statistics (WelfordOp) and the
// backward sums (GradSumOp). Each CTA reduces one (channel or channel tile) x (M split) block to
// one partial per channel, written to part[(field * C + c) * splits + split]; the finalize
// kernels merge the partials of a channel in split order. No atomics: bitwise reproducible.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>

#include "dbn_common.cuh"

namespace dbn {

// ---- NCS: contiguous (N, C, S) -----------------------------------------------------------------
// grid (C, splits), 1-D blocks of kThreads. CTA (c, j) covers rows [n0, n1) of channel c (row n
// = the S values of (n, c)) and columns [s0, s0 + chunk). Its work is flattened into units (U
// consecutive columns, one 16-byte vector when U > 1) numbered t = row * units_per_chunk + col, so
// short rows (7x7) keep every thread busy; t -> (row, col) is one multiply-shift division.
template <typename T, class Op, int U, int B>
__device__ __forceinline__ void ncs_accumulate(const T* __restrict__ x, const T* __restrict__ dy,
                                               int64_t base, int64_t row_stride, uint32_t total,
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
        load_as_float<T, U>(x + off, xs);
        if constexpr (Op::kNeedsDy) {
          load_as_float<T, U>(dy + off, gs);
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

template <typename T, class Op>
__global__ void __launch_bounds__(kThreads)
reduce_ncs_kernel(const T* __restrict__ x, const T* __restrict__ dy,
                  const float* __restrict__ center_ptr, ReducePlan p, float* __restrict__ part) {
  constexpr int V = VecWidth<T>::value;
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
  if (p.vec) {
    const uint32_t per_row = static_cast<uint32_t>(p.chunk / V);
    const uint32_t total = static_cast<uint32_t>(n1 - n0) * per_row;
    const uint32_t valid = static_cast<uint32_t>((s1 - s0) / V);
    ncs_accumulate<T, Op, V, (16 / V > 1 ? 16 / V : 1)>(x, dy, base, row_stride, total,
                                                        p.units_div, valid, st, center);
  } else {
    const uint32_t per_row = static_cast<uint32_t>(p.chunk);
    const uint32_t total = static_cast<uint32_t>(n1 - n0) * per_row;
    const uint32_t valid = static_cast<uint32_t>(s1 - s0);
    ncs_accumulate<T, Op, 1, 8>(x, dy, base, row_stride, total, p.units_div, valid, st, center);
  }

  float acc[Op::kF];
#pragma unroll
  for (int f = 0; f < Op::kF; ++f) acc[f] = st[f][0];
  block_reduce_1d<Op>(acc);
  if (threadIdx.x == 0) {
    const int64_t splits = p.splits;
#pragma unroll
    for (int f = 0; f < Op::kF; ++f) part[(f * C + c) * splits + j] = acc[f];
  }
}

// ---- NSC: channels last, M rows of C ------------------------------------------------------------
// grid (channel tiles, splits), blocks (tx, ty) with tx * ty = kThreads. Thread (tx, ty) owns the
// G = 16 / sizeof(T) consecutive channels [c0, c0 + G) (one 16-byte vector per row when aligned)
// and rows r0 + ty, r0 + ty + ty_dim, ... of its split, R rows per batch for memory parallelism.
// A warp reads whole 16-byte-aligned row segments: coalesced. The ty states are then merged by a
// fixed shared-memory tree.
template <typename T, class Op>
__global__ void __launch_bounds__(kThreads)
reduce_nsc_kernel(const T* __restrict__ x, const T* __restrict__ dy,
                  const float* __restrict__ center_ptr, ReducePlan p, float* __restrict__ part) {
  constexpr int G = VecWidth<T>::value;
  constexpr int R = 4;
  constexpr int kF = Op::kF;
  const int64_t C = p.g.C;
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
        if (ok[i] && p.vec) {
          load_as_float<T, G>(x + off, xv[i]);
          if constexpr (Op::kNeedsDy) load_as_float<T, G>(dy + off, gv[i]);
        } else {
#pragma unroll
          for (int k = 0; k < G; ++k) {
            const bool in = ok[i] && c0 + k < C;
            xv[i][k] = in ? static_cast<float>(x[off + k]) : 0.f;
            if constexpr (Op::kNeedsDy) gv[i][k] = in ? static_cast<float>(dy[off + k]) : 0.f;
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
    const int64_t splits = p.splits;
#pragma unroll
    for (int k = 0; k < G; ++k) {
      if (c0 + k < C) {
#pragma unroll
        for (int f = 0; f < kF; ++f) part[(f * C + c0 + k) * splits + j] = st[f][k];
      }
    }
  }
}

// Resident CTAs per SM of the reduction kernel for this layout on the current device: the planner
// sizes the grid to exactly one full wave (every CTA resident at once, equal work, no tail).
template <typename T, class Op>
int reduce_blocks_per_sm(bool channels_last) {
#ifdef DBN_EMULATION
  (void)channels_last;
  return 2048 / kThreads;
#else
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  static std::array<std::atomic<int>, 128> cache{};
  std::atomic<int>& slot = cache[(device % 64) * 2 + (channels_last ? 1 : 0)];
  int blocks = slot.load(std::memory_order_relaxed);
  if (blocks > 0) return blocks;
  if (channels_last) {
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &blocks, reduce_nsc_kernel<T, Op>, kThreads, 0));
  } else {
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &blocks, reduce_ncs_kernel<T, Op>, kThreads, 0));
  }
  blocks = std::max(blocks, 1);
  slot.store(blocks, std::memory_order_relaxed);
  return blocks;
#endif
}

template <class Op>
int reduce_blocks_per_sm_for(at::ScalarType dtype, bool channels_last) {
  switch (dtype) {
    case at::ScalarType::Half: return reduce_blocks_per_sm<c10::Half, Op>(channels_last);
    case at::ScalarType::BFloat16: return reduce_blocks_per_sm<c10::BFloat16, Op>(channels_last);
    default: return reduce_blocks_per_sm<float, Op>(channels_last);
  }
}

// Launch the reduction of plan p for input dtype T with accumulator Op.
template <typename T, class Op>
void launch_reduce(const T* x, const T* dy, const float* center, const ReducePlan& p, float* part,
                   cudaStream_t stream) {
  if (p.g.channels_last) {
    const dim3 grid(p.grid_x, p.splits), block(p.tx, p.ty);
    const auto kernel = reduce_nsc_kernel<T, Op>;
    DBN_LAUNCH(kernel, grid, block, stream, x, dy, center, p, part);
  } else {
    const dim3 grid(p.grid_x, p.splits), block(kThreads);
    const auto kernel = reduce_ncs_kernel<T, Op>;
    DBN_LAUNCH(kernel, grid, block, stream, x, dy, center, p, part);
  }
}

}  // namespace dbn
