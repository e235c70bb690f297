// The element-wise passes: out = (in0 - k0[c]) * p0[c] + ((in1 - k1[c]) * p1[c] + p2[c]) with
// per-channel fp32 coefficients computed by the finalize kernels (ElementwiseCoefs):
//   normalize / eval:  y  = (x - center) * scale + shift       (a subtract and an FMA)
//   backward:          dx = dy * A + ((x - m_B) * B + shift)   (dy * A when a_g = 0: x not read)
//
// One grid-stride kernel per (dtype, index width, access width U, across), chosen on the host
// (ElementwisePlan, dbn_launch.h):
//   across = false: each U-element vector takes its channel from its first element; NCS vectors
//     may cross one channel boundary (U <= S), so any S >= 8 gets 16-byte accesses; U = 1 is the
//     scalar path of both layouts;
//   across = true: NSC, C a multiple of U: a vector covers U consecutive channels, whose
//     coefficients are loaded as float vectors (16-byte loads) rather than 3 to 5 scalar loads
//     per element.
// 32-bit indexing with multiply-shift division when numel < 2^31, 64-bit otherwise (widths
// 16 / sizeof(T) and 1 only, to keep the number of instantiations small).
//
// The fused epilogue (dbn_kernels/ops.py) rides on the same pass, element for element:
//   forward:  y = relu?((x - center) * scale + shift + residual?)
//   backward: dy is read as torch.where(relu_output > 0, dy, 0), and with residual_grad that masked
//             dy is written as grad_residual beside dx (or alone: without input gradient there is
//             no dx, out is null and no coefficient is read).
// Its switches are uniform runtime flags (null pointers and a bool in the arguments), not
// template parameters: four independent switches as template flags would multiply the ~10
// instantiations per dtype by up to 16, and the branches on them are warp-uniform (a few
// instructions per vector, never divergence). Register use stays within today's two input
// streams: the residual arrives in the second input's registers (in1 is the backward's x, the
// residual the forward's: they never come together), and relu_output is consumed as it arrives,
// leaving only the masked dy live. Every stream uses the plan's width (16-byte vectors when the
// alignment of all of them allows it; the launchers copy a residual or relu_output in another
// memory format into x's, so they share its element order).
#include <algorithm>
#include <array>
#include <atomic>

#include "dbn_common.cuh"

namespace dbn {
namespace {

// Units (vectors or scalars) per thread per iteration, loaded before any is used: enough bytes in
// flight per SM to cover memory latency at moderate register use (16 elements per input for 16-
// and 8-byte vectors).
template <typename T, int U>
constexpr int unroll_for() { return U == VecWidth<T>::value ? 2 : 4; }

struct ElementwiseArgs {
  const void* in0;
  const void* in1;  // may be null
  void* out;        // null: only grad_residual is written (and no coefficient read)
  ElementwiseCoefs k;  // null coefficient pointers read as 0
  // The epilogue (file comment); the pointers may be null.
  const void* residual;     // added before the ReLU; never with in1
  bool relu;
  const void* relu_output;  // in0 read as in0 where relu_output > 0, else 0
  void* grad_residual;      // that masked in0, written as read
};

// Row q = i / inner of element i and its channel q % C.
__device__ __forceinline__ uint32_t channel_of(uint32_t i, const ElementwisePlan& p, uint32_t& q) {
  q = fast_div(p.div_inner, i);
  return q - fast_div(p.div_c, q) * p.div_c.divisor;
}

__device__ __forceinline__ uint64_t channel_of(uint64_t i, const ElementwisePlan& p, uint64_t& q) {
  q = i / static_cast<uint64_t>(p.inner);
  return q % static_cast<uint64_t>(p.g.C);
}

__device__ __forceinline__ uint32_t mod_c(uint32_t i, const ElementwisePlan& p) {
  return i - fast_div(p.div_c, i) * p.div_c.divisor;
}

__device__ __forceinline__ uint64_t mod_c(uint64_t i, const ElementwisePlan& p) {
  return i % static_cast<uint64_t>(p.g.C);
}

// The coefficients of one channel (scalar loads; the lanes of a warp mostly share the channel).
struct Coef {
  float k0, s0, k1, s1, s2;
};

template <typename I>
__device__ __forceinline__ Coef coef_at(const ElementwiseCoefs& k, I c, bool has_in1) {
  Coef q;
  q.k0 = k.k0 != nullptr ? k.k0[c] : 0.f;
  q.s0 = k.p0[c];
  q.k1 = has_in1 && k.k1 != nullptr ? k.k1[c] : 0.f;
  q.s1 = has_in1 ? k.p1[c] : 0.f;
  q.s2 = k.p2 != nullptr ? k.p2[c] : 0.f;
  return q;
}

// v1 is read only with in1 (by reference: without in1 it is never initialised).
__device__ __forceinline__ float apply_coef(float v0, const float& v1, const Coef& q,
                                            bool has_in1) {
  const float r = has_in1 ? fmaf(v1 - q.k1, q.s1, q.s2) : q.s2;
  return fmaf(v0 - q.k0, q.s0, r);
}

// U consecutive coefficients from c0 (a multiple of U) as min(U, 4)-float vector loads; null: 0.
template <int U, typename I>
__device__ __forceinline__ void load_coefs(const float* p, I c0, float (&out)[U]) {
  if (p == nullptr) {
#pragma unroll
    for (int e = 0; e < U; ++e) out[e] = 0.f;
    return;
  }
  constexpr int W = U < 4 ? U : 4;
#pragma unroll
  for (int j = 0; j < U; j += W) {
    const AlignedVec<float, W> v = *reinterpret_cast<const AlignedVec<float, W>*>(p + c0 + j);
#pragma unroll
    for (int e = 0; e < W; ++e) out[j + e] = v.v[e];
  }
}

template <typename T, typename I, int U, bool ACROSS>
__device__ __forceinline__ void elementwise_loop(const ElementwiseArgs& a,
                                                 const ElementwisePlan& p) {
  const T* __restrict__ in0 = static_cast<const T*>(a.in0);
  const T* __restrict__ in1 = static_cast<const T*>(a.in1);
  T* __restrict__ out = static_cast<T*>(a.out);
  const T* __restrict__ relu_output = static_cast<const T*>(a.relu_output);
  T* __restrict__ grad_residual = static_cast<T*>(a.grad_residual);
  const I units = static_cast<I>(p.g.numel) / U;
  constexpr int kUnroll = unroll_for<T, U>();
  const I step = static_cast<I>(gridDim.x) * kThreads * kUnroll;
  const ElementwiseCoefs& k = a.k;
  const bool has_in1 = in1 != nullptr;
  const bool has_residual = a.residual != nullptr;
  // The second stream, held in v1: in1 or the residual (never both).
  const T* __restrict__ second = has_in1 ? in1 : static_cast<const T*>(a.residual);
  for (I base = static_cast<I>(blockIdx.x) * kThreads * kUnroll + threadIdx.x; base < units;
       base += step) {
    float v0[kUnroll][U], v1[kUnroll][U];
#pragma unroll
    for (int r = 0; r < kUnroll; ++r) {
      const I u = base + static_cast<I>(r) * kThreads;
      if (u < units) {
        load_as_float<T, U>(in0 + u * U, v0[r]);
        if (second != nullptr) load_as_float<T, U>(second + u * U, v1[r]);
        // Loaded last and used at once: issued before in0 and converted after it (as the
        // reductions do), it would hold its registers across in0's conversion, which took the
        // plain float32 NCS pass from 40 to 48 registers (6 -> 5 CTAs per SM).
        if (relu_output != nullptr) {
          mask_by_relu_output<T, U>(load_vec<T, U>(relu_output + u * U), v0[r]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kUnroll; ++r) {
      const I u = base + static_cast<I>(r) * kThreads;
      if (u >= units) continue;
      const I i = u * U;
      if (grad_residual != nullptr) store_from_float<T, U>(grad_residual + i, v0[r]);
      if (out == nullptr) continue;
      float o[U];
      if constexpr (ACROSS) {
        // Channels c0 .. c0 + U - 1 (C is a multiple of U, so no wrap-around).
        const I c0 = mod_c(i, p);
        float k0[U], s0[U], s2[U];
        load_coefs<U>(k.k0, c0, k0);
        load_coefs<U>(k.p0, c0, s0);
        load_coefs<U>(k.p2, c0, s2);
        if (has_in1) {
          float k1[U], s1[U];
          load_coefs<U>(k.k1, c0, k1);
          load_coefs<U>(k.p1, c0, s1);
#pragma unroll
          for (int e = 0; e < U; ++e) {
            o[e] = fmaf(v0[r][e] - k0[e], s0[e], fmaf(v1[r][e] - k1[e], s1[e], s2[e]));
          }
        } else {
#pragma unroll
          for (int e = 0; e < U; ++e) o[e] = fmaf(v0[r][e] - k0[e], s0[e], s2[e]);
        }
      } else {
        I q;
        const I c = channel_of(i, p, q);
        const Coef lo = coef_at(k, c, has_in1);
        // Elements left in row q from i: at least 1, and at most one boundary in the vector.
        const I room = (q + 1) * static_cast<I>(p.inner) - i;
        if (U == 1 || room >= static_cast<I>(U)) {
#pragma unroll
          for (int e = 0; e < U; ++e) o[e] = apply_coef(v0[r][e], v1[r][e], lo, has_in1);
        } else {
          const I c_next = c + 1 == static_cast<I>(p.g.C) ? I(0) : c + 1;
          const Coef hi = coef_at(k, c_next, has_in1);
#pragma unroll
          for (int e = 0; e < U; ++e) {
            const bool first = static_cast<I>(e) < room;  // selects, not a local-memory struct
            const Coef cf{first ? lo.k0 : hi.k0, first ? lo.s0 : hi.s0, first ? lo.k1 : hi.k1,
                          first ? lo.s1 : hi.s1, first ? lo.s2 : hi.s2};
            o[e] = apply_coef(v0[r][e], v1[r][e], cf, has_in1);
          }
        }
      }
      if (has_residual) {
#pragma unroll
        for (int e = 0; e < U; ++e) o[e] += v1[r][e];
      }
      if (a.relu) {
#pragma unroll
        for (int e = 0; e < U; ++e) o[e] = relu(o[e]);
      }
      store_from_float<T, U>(out + i, o);
    }
  }
}

// The numel % U elements after the last whole vector (across = false with U > 1 only), one per
// thread of the first threads of the grid.
template <typename T, typename I, int U>
__device__ __forceinline__ void elementwise_tail(const ElementwiseArgs& a,
                                                 const ElementwisePlan& p) {
  const I start = static_cast<I>(p.g.numel) / U * U;
  const I i = start + static_cast<I>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= static_cast<I>(p.g.numel)) return;
  const bool has_in1 = a.in1 != nullptr;
  float v0 = static_cast<float>(static_cast<const T*>(a.in0)[i]);
  if (a.relu_output != nullptr) {
    v0 = relu_masked(v0, static_cast<float>(static_cast<const T*>(a.relu_output)[i]));
  }
  if (a.grad_residual != nullptr) static_cast<T*>(a.grad_residual)[i] = static_cast<T>(v0);
  if (a.out == nullptr) return;
  I q;
  const Coef cf = coef_at(a.k, channel_of(i, p, q), has_in1);
  const float v1 = has_in1 ? static_cast<float>(static_cast<const T*>(a.in1)[i]) : 0.f;
  float o = apply_coef(v0, v1, cf, has_in1);
  if (a.residual != nullptr) o += static_cast<float>(static_cast<const T*>(a.residual)[i]);
  if (a.relu) o = relu(o);
  static_cast<T*>(a.out)[i] = static_cast<T>(o);
}

template <typename T, typename I, int U, bool ACROSS>
__device__ __forceinline__ void elementwise_body(const ElementwiseArgs& a,
                                                 const ElementwisePlan& p) {
  elementwise_loop<T, I, U, ACROSS>(a, p);
  if constexpr (!ACROSS && U > 1) elementwise_tail<T, I, U>(a, p);
}

template <typename T, typename I, int U, bool ACROSS>
__global__ void __launch_bounds__(kThreads)
elementwise_kernel(ElementwiseArgs a, ElementwisePlan p) {
  elementwise_body<T, I, U, ACROSS>(a, p);
}

// 8-element vectors across channels hold up to 5 x 8 coefficients besides the data: unbounded,
// ptxas takes 86 registers (2 CTAs per SM); bounded to 3 CTAs per SM it fits in 80 without
// spilling. (A bound on the other instantiations only lets ptxas take more registers.)
template <typename T, typename I, int U, bool ACROSS>
__global__ void __launch_bounds__(kThreads, 3)
elementwise_kernel_b3(ElementwiseArgs a, ElementwisePlan p) {
  elementwise_body<T, I, U, ACROSS>(a, p);
}

// 4-element 16-bit vectors across channels: the epilogue's flags took them from 64 to 68
// registers (4 -> 3 CTAs per SM); bounded to 4 CTAs per SM they fit in 64 again without spilling.
template <typename T, typename I, int U, bool ACROSS>
__global__ void __launch_bounds__(kThreads, 4)
elementwise_kernel_b4(ElementwiseArgs a, ElementwisePlan p) {
  elementwise_body<T, I, U, ACROSS>(a, p);
}

template <typename T, typename I, int U, bool ACROSS>
constexpr auto elementwise_kernel_for() {
  if constexpr (ACROSS && U == 4 && sizeof(T) == 2) {
    return elementwise_kernel_b4<T, I, U, ACROSS>;
  } else if constexpr (ACROSS && U == 8) {
    return elementwise_kernel_b3<T, I, U, ACROSS>;
  } else {
    return elementwise_kernel<T, I, U, ACROSS>;
  }
}

// Resident CTAs per SM of a kernel on the current device (cached per kernel and device): the grid
// is at most one full wave of them, the grid-stride loop does the rest.
template <typename T, typename I, int U, bool ACROSS>
int elementwise_blocks_per_sm() {
#ifdef DBN_EMULATION
  return 2048 / kThreads;
#else
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  static std::array<std::atomic<int>, 64> cache{};
  std::atomic<int>& slot = cache[device % 64];
  int blocks = slot.load(std::memory_order_relaxed);
  if (blocks > 0) return blocks;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &blocks, elementwise_kernel_for<T, I, U, ACROSS>(), kThreads, 0));
  blocks = std::max(blocks, 1);
  slot.store(blocks, std::memory_order_relaxed);
  return blocks;
#endif
}

template <typename T, typename I, int U, bool ACROSS>
void launch_width(const ElementwisePlan& plan, const ElementwiseArgs& a, cudaStream_t stream) {
  const int64_t units = plan.g.numel / U;
  const int64_t per_block = static_cast<int64_t>(kThreads) * unroll_for<T, U>();
  const int64_t wave =
      static_cast<int64_t>(plan.sms) * elementwise_blocks_per_sm<T, I, U, ACROSS>();
  const int blocks =
      static_cast<int>(std::max<int64_t>(1, std::min((units + per_block - 1) / per_block, wave)));
  const auto kernel = elementwise_kernel_for<T, I, U, ACROSS>();
  DBN_LAUNCH(kernel, blocks, kThreads, stream, a, plan);
}

// Widths V, V/2 and V/4 (while > 1) for 32-bit indices; V only for 64-bit ones.
template <typename T, typename I, bool ACROSS>
void launch_vector(const ElementwisePlan& plan, const ElementwiseArgs& a, cudaStream_t stream) {
  constexpr int V = VecWidth<T>::value;
  if (plan.width == V) {
    launch_width<T, I, V, ACROSS>(plan, a, stream);
    return;
  }
  if constexpr (sizeof(I) == 4) {
    if (plan.width == V / 2) {
      launch_width<T, I, V / 2, ACROSS>(plan, a, stream);
      return;
    }
    if constexpr (V / 4 > 1) {
      if (plan.width == V / 4) {
        launch_width<T, I, V / 4, ACROSS>(plan, a, stream);
        return;
      }
    }
  }
  TORCH_CHECK(false, "dbn elementwise: no kernel for width ", plan.width);
}

template <typename T, typename I>
void launch_indexed(const ElementwisePlan& plan, const ElementwiseArgs& a, cudaStream_t stream) {
  if (plan.width == 1) {
    launch_width<T, I, 1, false>(plan, a, stream);
  } else if (plan.across) {
    launch_vector<T, I, true>(plan, a, stream);
  } else {
    launch_vector<T, I, false>(plan, a, stream);
  }
}

}  // namespace

void launch_elementwise(const ElementwisePlan& plan, const ElementwiseTensors& t,
                        const ElementwiseCoefs& coefs, cudaStream_t stream) {
  // The kernel holds in1 and the residual in the same registers.
  TORCH_INTERNAL_ASSERT(t.in1 == nullptr || t.residual == nullptr);
  TORCH_INTERNAL_ASSERT(t.out != nullptr || t.grad_residual != nullptr);
  const auto in = [](const at::Tensor* p) { return p != nullptr ? p->const_data_ptr() : nullptr; };
  const auto out = [](at::Tensor* p) { return p != nullptr ? p->data_ptr() : nullptr; };
  DBN_DISPATCH_FLOAT_TYPES(t.in0->scalar_type(), "dbn elementwise", [&] {
    const ElementwiseArgs a{in(t.in0), in(t.in1), out(t.out), coefs, in(t.residual), t.relu,
                            in(t.relu_output), out(t.grad_residual)};
    if (plan.wide_index) {
      launch_indexed<scalar_t, uint64_t>(plan, a, stream);
    } else {
      launch_indexed<scalar_t, uint32_t>(plan, a, stream);
    }
  });
}

}  // namespace dbn
