"""The reference backend: the DBN step and its analytic backward in plain PyTorch ops.

It runs on any device and layout, accumulates in float32 (float64 for float64 input), keeps the
input's memory format and never synchronises with the host. It is the CPU path and the oracle
the GPU backends are checked against.

On a small layer each torch call costs one to a few microseconds of host time whatever its size,
more than the arithmetic, so the code below counts calls: per-channel values are combined in
place, x-sized temporaries are reused, conversions happen only when a dtype differs, and
mixed-dtype operands (half input, float32 statistics) are left to type promotion, which computes
in the wider type without a converted copy. A Python number as a tensor operand (``t * 2.0``)
costs a hidden call that makes a scalar tensor, so constants go where an op takes a scalar
argument (lerp's weight, add's ``alpha``, addcmul's ``value``) when there is one.
"""

from __future__ import annotations

import torch

from .ops import define_backend, stat_dtype


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _channel_shape(x: torch.Tensor) -> tuple[int, ...]:
    """The shape that makes a (C,) vector broadcast against x of shape (N, C, *S); passed as
    ``view(*shape)``, which parses faster than a tuple argument."""
    return (1, -1) + (1,) * (x.dim() - 2)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the call when ``t`` already has it (the usual case)."""
    return t if t.dtype == dtype else t.to(dtype)


def _lerp_into(buffer: torch.Tensor, end: torch.Tensor, weight) -> None:
    """``buffer <- lerp(buffer, end, weight)``, computed in ``end``'s dtype (the statistics'),
    rounded once into the buffer's."""
    if buffer.dtype == end.dtype:
        buffer.lerp_(end, weight)
    else:
        buffer.copy_(torch.lerp(buffer.to(end.dtype), end, weight))


def schedule_alpha(k: torch.Tensor, alpha_scale: float, alpha_power: float,
                   alpha_offset: float, dtype: torch.dtype) -> torch.Tensor:
    """a_k on the device: 1 at k == 1, else min(1, scale / (k + offset) ** power)."""
    if alpha_power == 0.0:
        # A constant schedule: nothing to evaluate but the first step.
        a = torch.full_like(k, min(1.0, alpha_scale), dtype=dtype)
    else:
        a = k.to(dtype, copy=True).add_(alpha_offset).pow_(-alpha_power)
        a.mul_(alpha_scale).clamp_(max=1.0)
    return a.masked_fill_(k <= 1, 1.0)


def _normalize_in_place(centred: torch.Tensor, x: torch.Tensor, scale: torch.Tensor,
                        shift: torch.Tensor | None) -> torch.Tensor:
    """y = centred * scale + shift in ``x``'s dtype, where ``centred`` is x minus a per-channel
    centre in the statistics' dtype (a temporary, overwritten here).

    Scaling the centred value rather than folding the centre into the shift (x*scale + shift)
    keeps |mean| >> std inputs accurate: the large terms cancel before rounding. In place, because
    on CPU a fresh x-sized allocation costs more than the arithmetic."""
    shape = _channel_shape(x)
    y = centred.mul_(scale.view(*shape))
    if shift is not None:
        y.add_(shift.view(*shape))
    return _as(y, x.dtype)


def train_forward(x, weight, bias, running_mean, running_var, dbn_mean, dbn_std,
                  num_batches_tracked, momentum, eps, alpha_scale, alpha_power, alpha_offset):
    acc = stat_dtype(x)
    dims = _reduce_dims(x)
    M = x.numel() // x.shape[1]
    # Two passes, centred before squaring: as accurate as Welford (no E[x^2] - E[x]^2
    # cancellation) and several times faster than torch.var_mean on CPU.
    batch_mean = x.mean(dims, dtype=acc)
    centred = x - batch_mean.view(*_channel_shape(x))  # in acc: type promotion
    batch_var = centred.square().mean(dims)
    batch_std = batch_var.add(eps).sqrt_()
    batch_invstd = batch_std.reciprocal()

    k = num_batches_tracked
    if k is not None:
        k.add_(1)

    if dbn_mean is not None:
        alpha = schedule_alpha(k, alpha_scale, alpha_power, alpha_offset, acc)
        mean = torch.lerp(_as(dbn_mean, acc), batch_mean, alpha)
        std = torch.lerp(_as(dbn_std, acc), batch_std, alpha)
        dbn_mean.copy_(mean)
        dbn_std.copy_(std)
        invstd = std.reciprocal()
    else:
        alpha = batch_mean.new_ones(())
        mean = batch_mean.clone()  # op outputs may not alias each other
        invstd = batch_invstd.clone()

    if running_mean is not None:
        # PyTorch's update; a float momentum goes to lerp as a scalar, 1/k stays on the device.
        f = momentum if momentum is not None else k.to(acc, copy=True).reciprocal_()
        _lerp_into(running_mean, batch_mean, f)
        _lerp_into(running_var, batch_var * (M / (M - 1)), f)

    scale = invstd if weight is None else invstd * weight
    if dbn_mean is None:
        shift = bias  # mu_k = m_B: x - mu_k is the batch-centred value itself
    else:
        # x - mu_k = (x - m_B) + (m_B - mu_k): reuse the batch-centred values.
        shift = (batch_mean - mean).mul_(scale)
        if bias is not None:
            shift.add_(bias)
    y = _normalize_in_place(centred, x, scale, shift)
    return y, mean, invstd, batch_mean, batch_invstd, alpha


def eval_forward(x, weight, bias, mean, spread, eps, spread_is_std):
    acc = stat_dtype(x)
    spread = _as(spread, acc)
    invstd = spread.reciprocal() if spread_is_std else torch.rsqrt(spread + eps)
    centred = x - _as(mean, acc).view(*_channel_shape(x))
    scale = invstd if weight is None else invstd * weight
    return _normalize_in_place(centred, x, scale, bias), invstd


def _like_input(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` in ``x``'s dtype and memory format (dy may arrive in another format than x)."""
    if t.dtype == x.dtype and t.stride() == x.stride():
        return t
    return torch.empty_like(x).copy_(t)


def backward(grad_y, x, weight, mean, invstd, batch_mean, batch_invstd, alpha,
             grad_through_stats, input_grad):
    acc = stat_dtype(x)
    dims = _reduce_dims(x)
    shape = _channel_shape(x)
    M = x.numel() // x.shape[1]
    sum_dy = grad_y.sum(dims, dtype=acc)
    centred = x - mean.view(*shape)  # x - mu_k, in acc
    work = centred * grad_y  # summed here, then reused in place as dx's storage
    sum_dy_xhat = work.sum(dims).mul_(invstd)
    if not input_grad:
        return x.new_empty((0,)), sum_dy_xhat, sum_dy

    # dx = a*(dy - a_g*sum(dy)/M - a_g*xhat_B*sum(dy*xhat)/M) per channel, a = gamma/sig_k,
    # a_g = a_k or 0. x - m_B is taken as (x - mu_k) + (mu_k - m_B) so that |mean| >> std stays
    # accurate, which gives dx = a*dy - (c + b*(x - mu_k))/M with h = a*a_g,
    # b = h*sum(dy*xhat)/s_B and c = h*sum(dy) + b*(mu_k - m_B); 1/M is the scalar factor of
    # the last two calls.
    a = invstd if weight is None else invstd * weight
    grad_x = torch.mul(grad_y, a.view(*shape), out=work)
    if grad_through_stats:
        h = a * alpha
        b = torch.mul(h, sum_dy_xhat).mul_(batch_invstd)
        c = torch.addcmul(h.mul_(sum_dy), b, mean - batch_mean)
        inv_M = 1 / M if M else 0.0  # M = 0: an empty batch, nothing to scale
        grad_x.sub_(c.view(*shape), alpha=inv_M).addcmul_(centred, b.view(*shape), value=-inv_M)
    return _like_input(grad_x, x), sum_dy_xhat, sum_dy

define_backend("reference", {"train_forward": train_forward, "eval_forward": eval_forward,
                             "backward": backward}, device_types=("cpu", "cuda"))
