// Launch planning for the op launchers: how x lies in memory (Geometry, "NCS" or "NSC"), the
// split grid of the reductions and the access width of the element-wise pass, the workspace
// arithmetic, and the per-channel tensors as the kernels see them. The host-side counterpart of
// dbn_kernels/triton_kernels/launch.py.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>
#ifndef DBN_EMULATION
#include <c10/cuda/CUDAGuard.h>
#endif

#include "dbn_launch.h"
#include "ops.h"

namespace dbn {

// The current device set to a tensor's for the kernels' occupancy queries and launches.
#ifdef DBN_EMULATION
struct DeviceGuard {
  explicit DeviceGuard(const Tensor&) {}
};
#else
struct DeviceGuard {
  explicit DeviceGuard(const Tensor& t) : guard(t.device()) {}
  c10::cuda::CUDAGuard guard;
};
#endif

cudaStream_t current_stream(const Tensor& t);

// x as the kernels read it: x itself when it is NCS or NSC (a copy only for other strides), its
// geometry, and where its kernels run.
struct Input {
  Tensor t;
  Geometry g;
  cudaStream_t stream;
  int sms;
};
Input kernel_input(const Tensor& x);

// t (dy) in the memory layout and dtype of the kernel input.
Tensor match_layout(const Tensor& t, const Input& in);
// The same for an optional tensor (the epilogue's residual or relu_output); undefined when absent.
Tensor match_layout_or_undefined(const OptTensor& t, const Input& in);

// An element-wise pass's output: `result` has x's shape, dtype and memory format (what the fake
// returns); the kernel writes `target`, which is result itself when its layout is the kernel's,
// else a temporary that finish() copies into result.
struct Output {
  Tensor result, target;
  Tensor finish();
};
Output output_like(const Tensor& x, const Input& in);

// The largest power of two, at most 16, that divides the address (16 for null).
int64_t alignment(const void* p);
inline int64_t alignment(const Tensor& t) { return alignment(t.const_data_ptr()); }
// The alignment common to every tensor of an element-wise pass.
int64_t alignment(const ElementwiseTensors& t);

// kReluSums: the sums with dy masked by the fused ReLU's output (kernels of their own).
enum class Reduction { kStats, kSums, kReluSums };

// The split grid of a reduction over the kernel input (and dy, relu_output for the sums), whose
// data pointers have `align` bytes of alignment in common: one full wave of resident CTAs.
ReducePlan plan_reduce(const Input& in, Reduction kind, int64_t align);

// The element-wise pass over the kernel input; align: the alignment common to its inputs and
// output. The vector width also respects the alignment of the coefficient pointers.
ElementwisePlan plan_elementwise(const Input& in, int64_t align, const ElementwiseCoefs& coefs);

// A fresh float32 workspace for a reduction's split partials, a (plan.splits, 3, C) stack, and
// `extra` floats after it (16-byte aligned) for the caller.
struct StackWorkspace {
  Tensor storage;
  float* stack;
  int64_t sources;
  float* extra;
};
StackWorkspace stack_workspace(const Input& in, const ReducePlan& plan, int64_t extra);

// Rows of a contiguous (rows, C) float32 coefficient tensor as the element-wise pass reads them.
ElementwiseCoefs normalize_coefs(const float* coef, int64_t C);  // (center, scale, shift)
ElementwiseCoefs dx_coefs(const float* coef, int64_t rows, int64_t C);  // ([A[, center, B, shift]])

// A per-channel tensor as a kernel argument (absent when undefined).
Param param(const Tensor& t);
// A per-channel tensor or nothing, contiguous.
Tensor contiguous_or_undefined(const OptTensor& t);

// A buffer the finalize kernel updates in place: itself when contiguous, else a contiguous copy
// that finish() copies back.
class InPlace {
 public:
  explicit InPlace(const OptTensor& t);
  MutableParam param() const;
  void finish();

 private:
  Tensor target_, work_;
};

}  // namespace dbn
