// Per-channel kernels: merge a (P, 3, C) stack of statistics or sums in a fixed order and turn it
// into everything the element-wise passes and the caller need.
//
//   finalize           statistics -> a_k from num_batches_tracked (on the device), the
//                      dbn_mean / dbn_std / running_mean / running_var updates, the saved tensors
//                      and the normalize coefficients (center, scale, shift);
//   eval_prepare       stored statistics -> invstd and the normalize coefficients;
//   finalize_backward  sums -> grad_weight, grad_bias and the dx coefficients;
//   merge_stack        a stack -> its one merged source (the batch_stats / backward_reduce passes).
//
// One warp per channel (merge_channel). The count n is the stack's: with statistics from
// several devices it is only known on the device.
#include "dbn_common.cuh"

namespace dbn {
namespace {

constexpr int kWarpsPerBlock = kThreads / 32;

// The stack entry of this warp's channel c merged over the sources (warp_merge_sources): true in
// lane 0, which holds it; false in the other lanes, and in warps past the last channel.
template <class MergeOp>
__device__ __forceinline__ bool merge_channel(const float* __restrict__ stack, int64_t sources,
                                              int64_t C, int64_t& c, float (&st)[kStackRows]) {
  c = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (c >= C) return false;  // uniform per warp: the whole warp takes part in the merge
  warp_merge_sources<MergeOp>(stack, sources, C, c, st);
  return (threadIdx.x & 31) == 0;
}

__global__ void __launch_bounds__(kThreads) finalize_kernel(FinalizeArgs a) {
  int64_t c;
  float st[kStackRows];
  if (!merge_channel<StatsMergeOp>(a.stats, a.sources, a.C, c, st)) return;

  // The DBN step, mirroring reference.train_forward operation by operation.
  const float n = st[0];
  const float batch_mean = st[1];
  const float batch_var = st[2] / n;  // biased
  const float batch_std = sqrtf(batch_var + a.step.eps);
  const float batch_invstd = 1.f / batch_std;

  float kf = 1.f;
  int64_t k = 1;
  if (a.num_batches_tracked != nullptr) {
    k = a.num_batches_tracked[0];  // this step's, incremented by collect_stats
    kf = static_cast<float>(k);
  }

  float alpha = 1.f, mean = batch_mean, std = batch_std;
  if (a.dbn_mean.ptr != nullptr) {
    if (k > 1) {
      alpha = fminf(a.step.alpha_scale * powf(kf + a.step.alpha_offset, -a.step.alpha_power), 1.f);
    }
    if (a.step.normalize_with_batch) {
      // The averages are for evaluation only (dbn_std as the inverse of the averaged inverse
      // std); the step is batch norm's, and so is its gradient (alpha = 1).
      store_param(a.dbn_mean, c, lerp_like_torch(load_param(a.dbn_mean, c), batch_mean, alpha));
      store_param(a.dbn_std, c,
                  1.f / lerp_like_torch(1.f / load_param(a.dbn_std, c), batch_invstd, alpha));
      alpha = 1.f;
    } else {
      mean = lerp_like_torch(load_param(a.dbn_mean, c), batch_mean, alpha);
      std = lerp_like_torch(load_param(a.dbn_std, c), batch_std, alpha);
      store_param(a.dbn_mean, c, mean);
      store_param(a.dbn_std, c, std);
    }
  }
  const float invstd = 1.f / std;

  if (a.running_mean.ptr != nullptr) {
    const float f = a.step.has_momentum ? a.step.momentum : 1.f / kf;
    const float unbias = n / (n - 1.f);  // PyTorch's running_var takes M2 / (n - 1)
    store_param(a.running_mean, c, lerp_like_torch(load_param(a.running_mean, c), batch_mean, f));
    store_param(a.running_var, c,
                lerp_like_torch(load_param(a.running_var, c), batch_var * unbias, f));
  }

  a.out.mean[c] = mean;
  a.out.invstd[c] = invstd;
  a.out.batch_mean[c] = batch_mean;
  a.out.batch_invstd[c] = batch_invstd;
  if (c == 0) *a.out.alpha = alpha;

  a.coef[c] = mean;
  a.coef[a.C + c] = a.weight.ptr != nullptr ? invstd * load_param(a.weight, c) : invstd;
  a.coef[2 * a.C + c] = a.bias.ptr != nullptr ? load_param(a.bias, c) : 0.f;
}

__global__ void __launch_bounds__(kThreads) eval_prepare_kernel(EvalPrepareArgs a) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= a.C) return;
  const float spread = load_param(a.spread, c);
  const float invstd = a.spread_is_std ? 1.f / spread : 1.f / sqrtf(spread + a.eps);
  a.out_invstd[c] = invstd;
  a.coef[c] = load_param(a.mean, c);
  a.coef[a.C + c] = a.weight.ptr != nullptr ? invstd * load_param(a.weight, c) : invstd;
  a.coef[2 * a.C + c] = a.bias.ptr != nullptr ? load_param(a.bias, c) : 0.f;
}

__global__ void __launch_bounds__(kThreads) finalize_backward_kernel(FinalizeBackwardArgs a) {
  int64_t c;
  float st[kStackRows];
  if (!merge_channel<SumsMergeOp>(a.sums, a.sources, a.C, c, st)) return;

  // The DBN backward as reference.backward computes it, with the -B * m_B term of the shift
  // moved into the element-wise pass as B * (x - m_B).
  const float n = st[0];
  const float invstd = a.saved.invstd[c];
  const float sum_dy = st[1];
  const float sum_dy_xhat = st[2] * invstd;  // sum(dy * (x - mean)) / sig_k
  a.grad_weight[c] = sum_dy_xhat;
  a.grad_bias[c] = sum_dy;
  if (!a.input_grad) return;
  const float A = a.weight.ptr != nullptr ? invstd * load_param(a.weight, c) : invstd;
  a.coef[c] = A;
  if (!a.grad_through_stats) return;  // dx = A * dy
  const float alpha = *a.saved.alpha;
  a.coef[a.C + c] = a.saved.batch_mean[c];
  a.coef[2 * a.C + c] = -A * alpha * sum_dy_xhat * a.saved.batch_invstd[c] / n;
  a.coef[3 * a.C + c] = -A * alpha * sum_dy / n;
}

template <class MergeOp>
__global__ void __launch_bounds__(kThreads)
merge_stack_kernel(const float* __restrict__ stack, int64_t sources, int64_t C,
                   float* __restrict__ out) {
  int64_t c;
  float st[kStackRows];
  if (!merge_channel<MergeOp>(stack, sources, C, c, st)) return;
#pragma unroll
  for (int f = 0; f < kStackRows; ++f) out[f * C + c] = st[f];
}

int warp_blocks(int64_t C) {
  return static_cast<int>((C + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

}  // namespace

// A grid of no blocks is a launch error: without channels there is nothing to launch.

void launch_finalize(const FinalizeArgs& args, cudaStream_t stream) {
  if (args.C == 0) return;
  DBN_LAUNCH(finalize_kernel, warp_blocks(args.C), kThreads, stream, args);
}

void launch_eval_prepare(const EvalPrepareArgs& args, cudaStream_t stream) {
  if (args.C == 0) return;
  const int blocks = static_cast<int>((args.C + kThreads - 1) / kThreads);
  DBN_LAUNCH(eval_prepare_kernel, blocks, kThreads, stream, args);
}

void launch_finalize_backward(const FinalizeBackwardArgs& args, cudaStream_t stream) {
  if (args.C == 0) return;
  DBN_LAUNCH(finalize_backward_kernel, warp_blocks(args.C), kThreads, stream, args);
}

void launch_merge_stats(const float* stack, int64_t sources, int64_t C, float* out,
                        cudaStream_t stream) {
  if (C == 0) return;
  const auto kernel = merge_stack_kernel<StatsMergeOp>;
  DBN_LAUNCH(kernel, warp_blocks(C), kThreads, stream, stack, sources, C, out);
}

void launch_merge_sums(const float* stack, int64_t sources, int64_t C, float* out,
                       cudaStream_t stream) {
  if (C == 0) return;
  const auto kernel = merge_stack_kernel<SumsMergeOp>;
  DBN_LAUNCH(kernel, warp_blocks(C), kThreads, stream, stack, sources, C, out);
}

}  // namespace dbn
