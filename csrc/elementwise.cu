// The element-wise passes: out = (in0 - k0[c]) * p0[c] + ((in1 - k1[c]) * p1[c] + p2[c]) with
// per-channel fp32 coefficients computed by the finalize kernels (AffineCoefs):
//   normalize / eval:  y  = (x - mu) * scale + beta            (a subtract and an FMA)
//   backward:          dx = dy * A + ((x - m_B) * B + C)       (dy * A when a_g = 0: x not read)
//
// One grid-stride kernel per (dtype, index width). Modes, chosen on the host:
//   1  NCS, S a multiple of the vector width: each 16-byte vector lies in one channel;
//   2  NSC, C a multiple of the vector width: each vector covers consecutive channels;
//   0  anything else (or unaligned pointers): scalar accesses, unrolled for memory parallelism.
// 32-bit indexing with multiply-shift division when numel < 2^31, 64-bit otherwise.
#include "dbn_common.cuh"

namespace dbn {
namespace {

// Units (vectors or scalars) per thread per iteration, loaded before any is used: enough bytes in
// flight per SM to cover memory latency at moderate register use.
template <int U>
constexpr int unroll_for() { return U == 1 ? 4 : 2; }

struct AffineArgs {
  const void* in0;
  const void* in1;  // may be null
  void* out;
  AffineCoefs k;    // null coefficient pointers read as 0
  int64_t* counter; // incremented once (num_batches_tracked), may be null
};

// Channel of element i: (i / inner) % C, and for mode 2 the first channel of a vector: i % C.
__device__ __forceinline__ uint32_t channel_of(uint32_t i, const AffinePlan& p) {
  const uint32_t q = fast_div(p.div_inner, i);
  return q - fast_div(p.div_c, q) * p.div_c.divisor;
}

__device__ __forceinline__ uint64_t channel_of(uint64_t i, const AffinePlan& p) {
  return (i / static_cast<uint64_t>(p.inner)) % static_cast<uint64_t>(p.g.C);
}

__device__ __forceinline__ uint32_t mod_c(uint32_t i, const AffinePlan& p) {
  return i - fast_div(p.div_c, i) * p.div_c.divisor;
}

__device__ __forceinline__ uint64_t mod_c(uint64_t i, const AffinePlan& p) {
  return i % static_cast<uint64_t>(p.g.C);
}

template <typename T, typename I, int U, int MODE>
__device__ __forceinline__ void affine_loop(const AffineArgs& a, const AffinePlan& p) {
  const T* __restrict__ in0 = static_cast<const T*>(a.in0);
  const T* __restrict__ in1 = static_cast<const T*>(a.in1);
  T* __restrict__ out = static_cast<T*>(a.out);
  const I units = static_cast<I>(p.g.numel) / U;
  constexpr int kUnroll = unroll_for<U>();
  const I step = static_cast<I>(gridDim.x) * kThreads * kUnroll;
  const AffineCoefs& k = a.k;
  const bool has_in1 = in1 != nullptr, has_k0 = k.k0 != nullptr, has_k1 = k.k1 != nullptr,
             has_p2 = k.p2 != nullptr;
  for (I base = static_cast<I>(blockIdx.x) * kThreads * kUnroll + threadIdx.x; base < units;
       base += step) {
    float v0[kUnroll][U], v1[kUnroll][U];
#pragma unroll
    for (int r = 0; r < kUnroll; ++r) {
      const I u = base + static_cast<I>(r) * kThreads;
      if (u < units) {
        load_as_float<T, U>(in0 + u * U, v0[r]);
        if (has_in1) load_as_float<T, U>(in1 + u * U, v1[r]);
      }
    }
#pragma unroll
    for (int r = 0; r < kUnroll; ++r) {
      const I u = base + static_cast<I>(r) * kThreads;
      if (u >= units) continue;
      const I i = u * U;
      float o[U];
      if (MODE == 2) {
        // Consecutive channels c0 .. c0 + U - 1 (C is a multiple of U, so no wrap-around).
        const I c0 = mod_c(i, p);
#pragma unroll
        for (int e = 0; e < U; ++e) {
          const I c = c0 + e;
          const float q = has_in1 ? fmaf(v1[r][e] - (has_k1 ? k.k1[c] : 0.f), k.p1[c],
                                         has_p2 ? k.p2[c] : 0.f)
                                  : (has_p2 ? k.p2[c] : 0.f);
          o[e] = fmaf(v0[r][e] - (has_k0 ? k.k0[c] : 0.f), k.p0[c], q);
        }
      } else {
        // MODE 1: the U elements share one channel; MODE 0: U == 1.
        const I c = channel_of(i, p);
        const float k0 = has_k0 ? k.k0[c] : 0.f, s0 = k.p0[c];
        const float k1 = has_in1 && has_k1 ? k.k1[c] : 0.f, s1 = has_in1 ? k.p1[c] : 0.f;
        const float s2 = has_p2 ? k.p2[c] : 0.f;
#pragma unroll
        for (int e = 0; e < U; ++e) {
          const float q = has_in1 ? fmaf(v1[r][e] - k1, s1, s2) : s2;
          o[e] = fmaf(v0[r][e] - k0, s0, q);
        }
      }
      store_from_float<T, U>(out + i, o);
    }
  }
}

template <typename T, typename I>
__global__ void __launch_bounds__(kThreads) channel_affine_kernel(AffineArgs a, AffinePlan p) {
  constexpr int V = VecWidth<T>::value;
  if (a.counter != nullptr && blockIdx.x == 0 && threadIdx.x == 0) *a.counter += 1;
  switch (p.mode) {
    case 1: affine_loop<T, I, V, 1>(a, p); break;
    case 2: affine_loop<T, I, V, 2>(a, p); break;
    default: affine_loop<T, I, 1, 0>(a, p); break;
  }
}

}  // namespace

void launch_channel_affine(const AffinePlan& plan, const at::Tensor& in0, const at::Tensor* in1,
                           at::Tensor& out, const AffineCoefs& coefs, int64_t* counter,
                           cudaStream_t stream) {
  DBN_DISPATCH_FLOAT_TYPES(in0.scalar_type(), "dbn channel_affine", [&] {
    AffineArgs a{in0.const_data_ptr(), in1 != nullptr ? in1->const_data_ptr() : nullptr,
                 out.data_ptr(), coefs, counter};
    if (plan.wide_index) {
      const auto kernel = channel_affine_kernel<scalar_t, uint64_t>;
      DBN_LAUNCH(kernel, plan.blocks, kThreads, stream, a, plan);
    } else {
      const auto kernel = channel_affine_kernel<scalar_t, uint32_t>;
      DBN_LAUNCH(kernel, plan.blocks, kThreads, stream, a, plan);
    }
  });
}

}  // namespace dbn
