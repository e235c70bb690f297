// Host-side interface between the op launchers (ops_*.cpp, planning.cpp) and the kernels in the
// .cu files. Plain structs and launcher declarations only: no device code, so the host files are
// compiled by the host compiler and each .cu file is one nvcc translation unit.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

#ifdef DBN_EMULATION
// CPU emulation build (emulation/): the same sources compiled as host C++.
struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;
#else
#include <cuda_runtime_api.h>
#endif

namespace dbn {

constexpr int kThreads = 256;  // every kernel's block size

// Rows of a statistics or sums stack (P, 3, C): stack[(p * kStackRows + row) * C + c]. Row 0 is
// the number of values source p covered; rows 1 and 2 are (mean, M2) for statistics and
// (sum dy, sum dy * (x - mean)) for sums. The split reductions write their per-CTA partial
// results in this layout too, so finalize merges them like any other stack.
constexpr int kStackRows = 3;

// dtype codes of per-channel tensors (weight, bias, buffers): float32 or the input's dtype.
enum ParamDType : int { kParamF32 = 0, kParamF16 = 1, kParamBF16 = 2 };

// A per-channel tensor whose dtype is known only at run time; a null pointer means absent.
struct Param {
  const void* ptr = nullptr;
  int dt = kParamF32;
};

// The same, written in place (the running and DBN buffers).
struct MutableParam {
  void* ptr = nullptr;
  int dt = kParamF32;
};

// 32-bit division by a runtime constant with a multiply and a shift (Granlund-Montgomery), valid
// for dividends and divisors below 2^31. Built on the host, used on the device.
struct FastDiv {
  uint32_t divisor = 1, magic = 0, shift = 0;
  FastDiv() = default;
  explicit FastDiv(uint32_t d) : divisor(d) {
    shift = 0;
    while (shift < 32 && (uint64_t(1) << shift) < d) ++shift;
    const uint64_t one = 1;
    magic = static_cast<uint32_t>(((one << 32) * ((one << shift) - d)) / d + 1);
  }
};

// How x (and dy, which is brought to the same layout) lies in memory.
//   NCS: contiguous (N, C, *S): N*C rows of S = prod(S) elements, channel = row % C.
//   NSC: channels last, (N, *S, C) in memory: M = N*S rows of C elements.
struct Geometry {
  int64_t N = 0, C = 0, S = 1, M = 0, numel = 0;
  bool channels_last = false;
};

// Grid of the split (M x C) reductions: one partial result per (split, channel), stored as a
// (splits, 3, C) stack (kStackRows) that finalize merges in a fixed order.
struct ReducePlan {
  Geometry g;
  // Elements per load. NCS: the largest power of two (at most 16 bytes) that divides S and the
  // alignment of x (and dy), so a load never crosses a row; NSC: 16 / sizeof(T) (C a multiple of
  // it, 16-byte aligned pointers) or 1.
  int width = 1;
  int splits = 1;           // partials per channel (grid.y)
  int grid_x = 1;           // NCS: C; NSC: channel tiles
  // NCS: CTA (c, j) reads rows [N*jn/split_n, N*(jn+1)/split_n) x columns [js*chunk, +chunk)
  int split_n = 1, split_s = 1;
  int64_t chunk = 1;        // columns per split, a multiple of the load width
  FastDiv units_div;        // divides the CTA-local unit index by chunk / width
  // NSC: CTA (tile, j) reads rows [j*rows_per_split, +rows_per_split) of its tile's channels
  int tx = 1, ty = kThreads;
  int64_t rows_per_split = 1;
};

// Per-channel float32 coefficients of the element-wise pass (null pointers read as 0):
//   out = (in0 - k0[c]) * p0[c] + ((in1 - k1[c]) * p1[c] + p2[c])      (in1 term only with in1)
// Normalize: in0 = x, k0 = center, p0 = scale, p2 = shift. Backward: in0 = dy, p0 = A, in1 = x,
// k1 = center (m_B), p1 = B, p2 = shift. Centering before scaling keeps |mean| >> std inputs
// accurate (the folded x * scale + shift would lose the low bits of shift = -mean * scale).
struct ElementwiseCoefs {
  const float* k0 = nullptr;
  const float* p0 = nullptr;
  const float* k1 = nullptr;
  const float* p1 = nullptr;
  const float* p2 = nullptr;
};

// The tensors of one element-wise pass (null: absent), every one in the kernel input's dtype and
// layout, so that they share its element order (elementwise.cu):
//   out = (in0 - k0[c]) * p0[c] + ((in1 - k1[c]) * p1[c] + p2[c])        (ElementwiseCoefs)
// and the fused epilogue of dbn_kernels/ops.py: forward, out = relu?(out + residual?);
// backward, in0 (dy) is read as in0 where relu_output > 0, else 0, and written as read to
// grad_residual. Without out (no input gradient) the pass writes grad_residual alone.
struct ElementwiseTensors {
  const at::Tensor* in0 = nullptr;
  const at::Tensor* in1 = nullptr;
  at::Tensor* out = nullptr;
  const at::Tensor* residual = nullptr;  // never with in1 (the kernel holds them in one place)
  bool relu = false;
  const at::Tensor* relu_output = nullptr;
  at::Tensor* grad_residual = nullptr;
};

// The element-wise pass's launch plan; the channel c of each element comes from the geometry.
// Accesses are `width` elements (1, 2, 4 or 8; at most 16 bytes, every data pointer aligned to
// width * sizeof(T)):
//   across = false: a vector's channel is (i / inner) % C for its first element i. NCS (inner = S)
//     needs only width <= S, not S % width == 0: a vector crossing into the next channel (at most
//     one boundary) takes that channel's coefficients from the boundary on; the numel % width
//     elements at the end are done one by one. NSC with width 1 (inner = 1) is the scalar path.
//   across = true (NSC, C % width == 0): element e of a vector is channel c0 + e, c0 = i % C a
//     multiple of width; its coefficients are loaded as float vectors too (min(width, 4) floats,
//     so every coefficient pointer is aligned to that many floats).
struct ElementwisePlan {
  Geometry g;
  int width = 1;
  bool across = false;
  bool wide_index = false;  // numel >= 2^31: 64-bit index arithmetic (widths 16 / sizeof(T) or 1)
  int sms = 1;              // the launcher sizes the grid: one wave of resident CTAs at most
  int64_t inner = 1;        // channel of element i = (i / inner) % C: S for NCS, 1 for NSC
  FastDiv div_inner, div_c; // element -> channel for the 32-bit path
};

// The scalars of a DBN step (the op's float and bool arguments).
struct StepScalars {
  float eps = 0.f;
  bool has_momentum = false;  // false: cumulative average, f = 1 / k
  float momentum = 0.f;
  float alpha_scale = 1.f, alpha_power = 0.f, alpha_offset = 0.f;
  bool normalize_with_batch = false;  // ops.h
};

// The saved tensors (float32): mu_k, 1/sig_k, m_B, 1/s_B per channel and a_k.
struct SavedPtrs {
  float* mean = nullptr;
  float* invstd = nullptr;
  float* batch_mean = nullptr;
  float* batch_invstd = nullptr;
  float* alpha = nullptr;
};

struct FinalizeArgs {
  const float* stats = nullptr;  // (sources, 3, C) rows count, mean, M2
  int64_t sources = 0;
  int64_t C = 0;
  StepScalars step;
  const int64_t* num_batches_tracked = nullptr;  // k, already incremented by collect_stats
  MutableParam running_mean, running_var, dbn_mean, dbn_std;
  Param weight, bias;
  SavedPtrs out;
  float* coef = nullptr;  // (3, C): center mu_k, scale gamma / sig_k, shift beta (0 without bias)
};

struct EvalPrepareArgs {
  int64_t C = 0;
  Param mean, spread, weight, bias;
  float eps = 0.f;
  bool spread_is_std = true;
  float* out_invstd = nullptr;
  float* coef = nullptr;  // (3, C): center (mean as float32), scale gamma / sigma, shift beta
};

// The saved tensors the backward reads (float32 copies).
struct SavedConstPtrs {
  const float* invstd = nullptr;
  const float* batch_mean = nullptr;
  const float* batch_invstd = nullptr;
  const float* alpha = nullptr;  // read only when grad_through_stats
};

struct FinalizeBackwardArgs {
  const float* sums = nullptr;  // (sources, 3, C) rows count, sum dy, sum dy * (x - mean)
  int64_t sources = 0;
  int64_t C = 0;
  Param weight;
  SavedConstPtrs saved;
  bool grad_through_stats = false;
  bool input_grad = false;
  float* grad_weight = nullptr;
  float* grad_bias = nullptr;
  // (4, C) rows A, center m_B, B, shift with grad_through_stats, (1, C) row A without, unwritten
  // without input_grad: dx = A * dy + (B * (x - center) + shift).
  float* coef = nullptr;
};

// Resident CTAs per SM of the reduction kernels (occupancy on the current device, cached), for
// the layout and, NCS, the load width (ReducePlan::width); the backward's with or without
// relu_output (separate kernels).
int collect_stats_blocks_per_sm(at::ScalarType dtype, bool channels_last, int width);
int backward_reduce_blocks_per_sm(at::ScalarType dtype, bool channels_last, int width,
                                  bool relu_output);

// Launchers (each launch is checked with C10_CUDA_KERNEL_LAUNCH_CHECK, see DBN_LAUNCH). Partials
// are (plan.splits, 3, C) stacks. collect_stats increments *counter (when not null) once: it is
// the first launch of a step, and finalize, the next, reads the incremented k.
void launch_collect_stats(const at::Tensor& x, const ReducePlan& plan, float* part,
                          int64_t* counter, cudaStream_t stream);
// relu_output (may be null, else in x's dtype and layout): dy is read as dy where
// relu_output > 0, else 0 (the fused epilogue's ReLU); plan it with Reduction::kReluSums.
void launch_backward_reduce(const at::Tensor& dy, const at::Tensor& x,
                            const at::Tensor* relu_output, const float* mean,
                            const ReducePlan& plan, float* part, cudaStream_t stream);
// Merge a (sources, 3, C) stack into one source (3, C): Chan's formula for statistics, sums for
// sums; the same fixed order as finalize, so finalize of the merged source equals finalize of
// the stack bitwise.
void launch_merge_stats(const float* stack, int64_t sources, int64_t C, float* out,
                        cudaStream_t stream);
void launch_merge_sums(const float* stack, int64_t sources, int64_t C, float* out,
                       cudaStream_t stream);
void launch_finalize(const FinalizeArgs& args, cudaStream_t stream);
void launch_eval_prepare(const EvalPrepareArgs& args, cudaStream_t stream);
void launch_finalize_backward(const FinalizeBackwardArgs& args, cudaStream_t stream);
void launch_elementwise(const ElementwisePlan& plan, const ElementwiseTensors& tensors,
                        const ElementwiseCoefs& coefs, cudaStream_t stream);

}  // namespace dbn
