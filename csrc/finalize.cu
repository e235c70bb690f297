// Per-channel kernels: merge the split partials in a fixed order and turn them into everything
// the element-wise passes and the caller need.
//
//   finalize_train     batch statistics -> a_k from num_batches_tracked (on the device), the
//                      dbn_mean / dbn_std / running_mean / running_var updates, the saved tensors,
//                      and the normalize pass's per-channel scale and shift (center: mean);
//   eval_prepare       stored statistics -> invstd, scale, shift and center;
//   finalize_backward  sums -> grad_weight, grad_bias and the dx coefficients A, B, C.
//
// One warp per channel: lane l merges partials l, l + 32, ... in order, then a fixed shuffle tree.
#include "dbn_common.cuh"

namespace dbn {
namespace {

constexpr int kWarpsPerBlock = kThreads / 32;

__global__ void __launch_bounds__(kThreads) finalize_train_kernel(FinalizeTrainArgs a) {
  const int lane = threadIdx.x & 31;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (c >= a.C) return;  // uniform per warp
  const int64_t splits = a.splits;
  const float* pm = a.part + c * splits;
  const float* pq = a.part + (a.C + c) * splits;
  const float* pn = a.part + (2 * a.C + c) * splits;
  float st[3] = {0.f, 0.f, 0.f};
  for (int64_t j = lane; j < splits; j += 32) chan_merge(st[0], st[1], st[2], pm[j], pq[j], pn[j]);
  warp_reduce<WelfordOp>(st);
  if (lane != 0) return;

  // The DBN step, mirroring reference.train_forward operation by operation.
  const float batch_mean = st[0];
  const float batch_var = st[1] / a.M;  // biased
  const float batch_std = sqrtf(batch_var + a.eps);

  float kf = 1.f;
  int64_t k = 1;
  if (a.num_batches_tracked != nullptr) {
    k = a.num_batches_tracked[0] + 1;  // after this step's increment (done by the normalize pass)
    kf = static_cast<float>(k);
  }

  float alpha = 1.f, mean = batch_mean, std = batch_std;
  if (a.dbn_mean != nullptr) {
    if (k > 1) {
      alpha = fminf(a.alpha_scale * powf(kf + a.alpha_offset, -a.alpha_power), 1.f);
    }
    mean = lerp_like_torch(load_param(a.dbn_mean, a.dbn_mean_dt, c), batch_mean, alpha);
    std = lerp_like_torch(load_param(a.dbn_std, a.dbn_std_dt, c), batch_std, alpha);
    store_param(a.dbn_mean, a.dbn_mean_dt, c, mean);
    store_param(a.dbn_std, a.dbn_std_dt, c, std);
  }
  const float invstd = 1.f / std;

  if (a.running_mean != nullptr) {
    const float f = a.has_momentum ? a.momentum : 1.f / kf;
    const float rm = lerp_like_torch(load_param(a.running_mean, a.running_mean_dt, c),
                                     batch_mean, f);
    const float rv = lerp_like_torch(load_param(a.running_var, a.running_var_dt, c),
                                     batch_var * a.unbias, f);
    store_param(a.running_mean, a.running_mean_dt, c, rm);
    store_param(a.running_var, a.running_var_dt, c, rv);
  }

  a.out_mean[c] = mean;
  a.out_invstd[c] = invstd;
  a.out_batch_mean[c] = batch_mean;
  a.out_batch_invstd[c] = 1.f / batch_std;
  if (c == 0) *a.out_alpha = alpha;

  a.scale[c] = a.weight != nullptr ? invstd * load_param(a.weight, a.weight_dt, c) : invstd;
  a.shift[c] = a.bias != nullptr ? load_param(a.bias, a.bias_dt, c) : 0.f;
}

__global__ void __launch_bounds__(kThreads) eval_prepare_kernel(EvalPrepareArgs a) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= a.C) return;
  const float mean = load_param(a.mean, a.mean_dt, c);
  const float spread = load_param(a.spread, a.spread_dt, c);
  const float invstd = a.spread_is_std ? 1.f / spread : 1.f / sqrtf(spread + a.eps);
  a.out_invstd[c] = invstd;
  a.scale[c] = a.weight != nullptr ? invstd * load_param(a.weight, a.weight_dt, c) : invstd;
  a.shift[c] = a.bias != nullptr ? load_param(a.bias, a.bias_dt, c) : 0.f;
  a.center[c] = mean;
}

__global__ void __launch_bounds__(kThreads) finalize_backward_kernel(FinalizeBackwardArgs a) {
  const int lane = threadIdx.x & 31;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (c >= a.C) return;  // uniform per warp
  const int64_t splits = a.splits;
  const float* p_dy = a.part + c * splits;
  const float* p_dyx = a.part + (a.C + c) * splits;
  float st[2] = {0.f, 0.f};
  for (int64_t j = lane; j < splits; j += 32) {
    st[0] += p_dy[j];
    st[1] += p_dyx[j];
  }
  warp_reduce<GradSumOp>(st);
  if (lane != 0) return;

  // The DBN backward as reference.backward computes it, with C's -B * m_B term moved into the
  // element-wise pass as B * (x - m_B).
  const float invstd = a.invstd[c];
  const float sum_dy = st[0];
  const float sum_dy_xhat = st[1] * invstd;  // sum(dy * (x - mean)) / sig_k
  a.grad_weight[c] = sum_dy_xhat;
  a.grad_bias[c] = sum_dy;
  if (!a.input_grad) return;
  const float A = a.weight != nullptr ? invstd * load_param(a.weight, a.weight_dt, c) : invstd;
  float B = 0.f, Cc = 0.f;
  if (a.grad_through_stats) {
    const float alpha = *a.alpha;
    B = -A * alpha * sum_dy_xhat * a.batch_invstd[c] / a.M;
    Cc = -A * alpha * sum_dy / a.M;
  }
  a.coef_a[c] = A;
  a.coef_b[c] = B;
  a.coef_c[c] = Cc;
}

int warp_blocks(int64_t C) {
  return static_cast<int>((C + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

}  // namespace

void launch_finalize_train(const FinalizeTrainArgs& args, cudaStream_t stream) {
  DBN_LAUNCH(finalize_train_kernel, warp_blocks(args.C), kThreads, stream, args);
}

void launch_eval_prepare(const EvalPrepareArgs& args, cudaStream_t stream) {
  const int blocks = static_cast<int>((args.C + kThreads - 1) / kThreads);
  DBN_LAUNCH(eval_prepare_kernel, blocks, kThreads, stream, args);
}

void launch_finalize_backward(const FinalizeBackwardArgs& args, cudaStream_t stream) {
  DBN_LAUNCH(finalize_backward_kernel, warp_blocks(args.C), kThreads, stream, args);
}

}  // namespace dbn
