"""The reference backend: SPEC §2 in plain PyTorch ops.

It runs on any device and layout, accumulates in float32 (float64 for float64 input), keeps the
input's memory format and never synchronises with the host. It is the CPU path and the oracle
the GPU backends are checked against.
"""

from __future__ import annotations

import torch

from .ops import define_backend, stat_dtype


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _per_channel(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """View a (C,) tensor so it broadcasts against x of shape (N, C, *S)."""
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def _affine(centred: torch.Tensor, x: torch.Tensor, weight, bias, invstd, acc,
            offset=None) -> torch.Tensor:
    """y = (centred + offset) * invstd * weight + bias in ``x``'s dtype, where ``centred`` is x
    minus a per-channel centre (a fresh tensor, overwritten here).

    Scaling the centred value rather than folding the centre into the shift (x*scale + shift)
    keeps |mean| >> std inputs accurate: the large terms cancel before rounding."""
    scale = invstd if weight is None else invstd * weight.to(acc)
    shift = torch.zeros_like(scale) if bias is None else bias.to(acc)
    if offset is not None:
        shift = shift + offset * scale
    # In place on a temporary: on CPU a fresh x-sized allocation costs more than the arithmetic.
    y = centred.mul_(_per_channel(scale, x)).add_(_per_channel(shift, x))
    return y.to(x.dtype)


def schedule_alpha(k: torch.Tensor, alpha_scale: float, alpha_power: float,
                   alpha_offset: float, dtype: torch.dtype) -> torch.Tensor:
    """a_k on the device: 1 at k == 1, else min(1, scale / (k + offset) ** power)."""
    kf = k.to(dtype)
    a = (alpha_scale * torch.pow(kf + alpha_offset, -alpha_power)).clamp(max=1.0)
    return torch.where(k <= 1, torch.ones_like(a), a)


def train_forward(x, weight, bias, running_mean, running_var, dbn_mean, dbn_std,
                  num_batches_tracked, momentum, eps, alpha_scale, alpha_power, alpha_offset):
    acc = stat_dtype(x)
    dims = _reduce_dims(x)
    M = x.numel() // x.shape[1]
    xf = x.to(acc)
    # Two passes, centred before squaring: as accurate as Welford (no E[x^2] - E[x]^2
    # cancellation) and several times faster than torch.var_mean on CPU.
    batch_mean = xf.mean(dims)
    centred = xf - _per_channel(batch_mean, x)
    batch_var = centred.square().mean(dims)
    batch_std = torch.sqrt(batch_var + eps)
    batch_invstd = batch_std.reciprocal()

    k = None
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        k = num_batches_tracked

    if dbn_mean is not None:
        alpha = schedule_alpha(k, alpha_scale, alpha_power, alpha_offset, acc)
        mean = torch.lerp(dbn_mean.to(acc), batch_mean, alpha)
        std = torch.lerp(dbn_std.to(acc), batch_std, alpha)
        dbn_mean.copy_(mean)
        dbn_std.copy_(std)
        invstd = std.reciprocal()
    else:
        alpha = torch.ones((), dtype=acc, device=x.device)
        mean = batch_mean.clone()  # op outputs may not alias each other
        invstd = batch_invstd.clone()

    if running_mean is not None:
        if momentum is None:
            f = k.to(acc).reciprocal()
        else:
            f = torch.full((), momentum, dtype=acc, device=x.device)
        running_mean.copy_(torch.lerp(running_mean.to(acc), batch_mean, f))
        running_var.copy_(torch.lerp(running_var.to(acc), batch_var * (M / (M - 1)), f))

    # x - mu_k = (x - m_B) + (m_B - mu_k): reuse the batch-centred values.
    y = _affine(centred, x, weight, bias, invstd, acc, offset=batch_mean - mean)
    return y, mean, invstd, batch_mean, batch_invstd, alpha


def eval_forward(x, weight, bias, mean, spread, eps, spread_is_std):
    acc = stat_dtype(x)
    spread = spread.to(acc)
    invstd = spread.reciprocal() if spread_is_std else torch.rsqrt(spread + eps)
    centred = x.to(acc) - _per_channel(mean.to(acc), x)
    return _affine(centred, x, weight, bias, invstd, acc), invstd


def _like_input(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` in ``x``'s dtype and memory format (dy may arrive in another format than x)."""
    if t.dtype == x.dtype and t.stride() == x.stride():
        return t
    return torch.empty_like(x).copy_(t)


def backward(grad_y, x, weight, mean, invstd, batch_mean, batch_invstd, alpha,
             grad_through_stats, input_grad):
    acc = stat_dtype(x)
    dims = _reduce_dims(x)
    M = x.numel() // x.shape[1]
    xf = x.to(acc)
    gf = grad_y.to(acc)
    sum_dy = gf.sum(dims)
    centred = xf - _per_channel(mean, x)
    work = centred * gf  # summed here, then reused in place as dx's storage
    sum_dy_xhat = work.sum(dims) * invstd
    if not input_grad:
        return x.new_empty((0,)), sum_dy_xhat, sum_dy

    # dx = A*dy + B*(x - m_B) + C per channel (SPEC §2), with a_g = a_k or 0; x - m_B is
    # taken as (x - mu_k) + (mu_k - m_B) so that |mean| >> std stays accurate.
    a = invstd if weight is None else invstd * weight.to(acc)
    if grad_through_stats:
        b = -a * alpha * sum_dy_xhat * batch_invstd / M
        c = -a * alpha * sum_dy / M + b * (mean - batch_mean)
        grad_x = torch.mul(gf, _per_channel(a, x), out=work).add_(_per_channel(c, x))
        grad_x.addcmul_(centred, _per_channel(b, x))
    else:
        grad_x = torch.mul(gf, _per_channel(a, x), out=work)
    return _like_input(grad_x, x), sum_dy_xhat, sum_dy

define_backend("reference", {"train_forward": train_forward, "eval_forward": eval_forward,
                             "backward": backward}, device_types=("cpu", "cuda"))
