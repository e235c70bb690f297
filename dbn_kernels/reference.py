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

from .ops import SCHEMAS, define_backend, stat_dtype


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


def _normalize_in_place(centered: torch.Tensor, x: torch.Tensor, scale: torch.Tensor,
                        shift: torch.Tensor | None, residual: torch.Tensor | None = None,
                        relu: bool = False) -> torch.Tensor:
    """y = relu?(centered * scale + shift + residual?) in ``x``'s dtype, where ``centered`` is x
    minus a per-channel center in the statistics' dtype (a temporary, overwritten here). The
    epilogue runs before the one rounding into x's dtype.

    Scaling the centered value rather than folding the center into the shift (x*scale + shift)
    keeps |mean| >> std inputs accurate: the large terms cancel before rounding. In place, because
    on CPU a fresh x-sized allocation costs more than the arithmetic."""
    shape = _channel_shape(x)
    y = centered.mul_(scale.view(*shape))
    if shift is not None:
        y.add_(shift.view(*shape))
    if residual is not None:
        y.add_(residual)
    if relu:
        y.relu_()
    return _as(y, x.dtype)


def _masked(grad_y: torch.Tensor, relu_output: torch.Tensor | None) -> torch.Tensor:
    """dy through the fused ReLU: dy where the saved output is positive, else 0 (as PyTorch's
    ReLU backward, which also reads its output)."""
    if relu_output is None:
        return grad_y
    return torch.where(relu_output > 0, grad_y, 0)


def _average(batch_mean, batch_std, batch_invstd, unbiased_var, running_mean, running_var,
             dbn_mean, dbn_std, k, momentum, alpha_scale, alpha_power, alpha_offset,
             normalize_with_batch=False):
    """a_k from the (already incremented) counter ``k`` and every buffer update; returns the
    statistics the step normalizes with, ``(mean, invstd, alpha)``. ``unbiased_var`` (PyTorch's
    running_var input) is read only with running statistics. ``normalize_with_batch``: the
    authors' variant (see ``ops``), batch statistics with a_k = 1 for the step, the averages
    (of the mean and of the inverse std) for evaluation only."""
    acc = batch_mean.dtype
    if dbn_mean is not None and normalize_with_batch:
        alpha = schedule_alpha(k, alpha_scale, alpha_power, alpha_offset, acc)
        dbn_mean.copy_(torch.lerp(_as(dbn_mean, acc), batch_mean, alpha))
        inv_average = torch.lerp(_as(dbn_std, acc).reciprocal(), batch_invstd, alpha)
        dbn_std.copy_(inv_average.reciprocal_())
        alpha = batch_mean.new_ones(())
        mean = batch_mean.clone()  # op outputs may not alias each other
        invstd = batch_invstd.clone()
    elif dbn_mean is not None:
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
        _lerp_into(running_var, unbiased_var, f)
    return mean, invstd, alpha


def _scale(invstd: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """gamma / sigma per channel, in the statistics' dtype."""
    return invstd if weight is None else invstd * weight


# ---- the passes ------------------------------------------------------------------------------

def batch_stats(x, num_batches_tracked):
    acc = stat_dtype(x)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    C = x.shape[1]
    if x.numel() == 0:
        return x.new_zeros((3, C), dtype=acc)  # count 0: merges as nothing
    dims = _reduce_dims(x)
    mean = x.mean(dims, dtype=acc)
    centered = x - mean.view(*_channel_shape(x))  # centered: no cancellation
    m2 = centered.mul_(centered).sum(dims)  # (mul_, not square_: vmap batches it)
    return torch.stack((torch.full_like(mean, x.numel() // C), mean, m2))


def merge_stats(stats: torch.Tensor):
    """(count, mean, M2) per channel of a (P, 3, C) statistics stack, merged with Chan's formula:
    deviations of the sources' means from the first one's, so the weighted sum does not round at
    the size of |mean| when |mean| >> std."""
    if stats.shape[0] == 1:
        return stats[0, 0], stats[0, 1], stats[0, 2]
    count, means, m2s = stats[:, 0], stats[:, 1], stats[:, 2]
    n = count.sum(0)
    dev = means - means[0]
    shift = (count * dev).sum(0) / n
    m2 = m2s.sum(0) + (count * (dev - shift).square_()).sum(0)
    return n, means[0] + shift, m2


def finalize(stats, weight, bias, running_mean, running_var, dbn_mean, dbn_std,
             num_batches_tracked, momentum, eps, alpha_scale, alpha_power, alpha_offset, *,
             normalize_with_batch=False):
    n, batch_mean, m2 = merge_stats(stats)
    batch_var = m2 / n
    batch_std = batch_var.add(eps).sqrt_()
    batch_invstd = batch_std.reciprocal()
    unbiased_var = m2 / (n - 1) if running_mean is not None else None
    mean, invstd, alpha = _average(batch_mean, batch_std, batch_invstd, unbiased_var,
                                   running_mean, running_var, dbn_mean, dbn_std,
                                   num_batches_tracked, momentum, alpha_scale, alpha_power,
                                   alpha_offset, normalize_with_batch)
    shift = torch.zeros_like(mean) if bias is None else bias
    coef = torch.stack((mean, _scale(invstd, weight), _as(shift, mean.dtype)))
    # a one-source stack's rows are views of the input, which op outputs may not be
    return mean, invstd, batch_mean.clone(), batch_invstd, alpha, coef


def normalize(x, coef, residual=None, relu=False):
    centered = x - _as(coef[0], stat_dtype(x)).view(*_channel_shape(x))
    return _normalize_in_place(centered, x, coef[1], coef[2], residual, relu)


def backward_reduce(grad_y, x, mean, relu_output=None):
    acc = stat_dtype(x)
    C = x.shape[1]
    if x.numel() == 0:
        return x.new_zeros((3, C), dtype=acc)
    dims = _reduce_dims(x)
    grad_y = _masked(grad_y, relu_output)
    sum_dy = grad_y.sum(dims, dtype=acc)
    sum_dy_xc = (x - mean.view(*_channel_shape(x))).mul_(grad_y).sum(dims)  # in acc
    return torch.stack((torch.full_like(sum_dy, x.numel() // C), sum_dy, sum_dy_xc))


def backward_finalize(sums, weight, invstd, batch_mean, batch_invstd, alpha, grad_through_stats,
                      input_grad):
    n, sum_dy, sum_dy_xc = (sums[:, row].sum(0) for row in range(3))  # not views: outputs
    grad_weight = sum_dy_xc * invstd
    C = sums.shape[-1]
    if not input_grad:
        return grad_weight, sum_dy, sums.new_empty((0, C))
    a = _scale(invstd, weight)
    if not grad_through_stats:
        return grad_weight, sum_dy, torch.stack((a,))
    h = (a * alpha).div_(n)
    b = (h * grad_weight).mul_(batch_invstd).neg_()
    coef = torch.stack((a, _as(batch_mean, a.dtype), b, h.mul_(sum_dy).neg_()))
    return grad_weight, sum_dy, coef


def _grad_residual(grad_y, x, relu_output, residual_grad):
    """The residual's gradient (``grad_y`` already masked) when the ops write it, else empty."""
    if not (residual_grad and relu_output is not None):
        return x.new_empty((0,))
    return _like_input(grad_y, x)  # the masked dy is a new tensor: no alias of an input


def backward_dx(grad_y, x, coef, relu_output=None, residual_grad=False):
    grad_y = _masked(grad_y, relu_output)
    grad_residual = _grad_residual(grad_y, x, relu_output, residual_grad)
    return _dx(grad_y, x, coef), grad_residual


def _dx(grad_y, x, coef):
    shape = _channel_shape(x)
    if coef.shape[0] == 0:
        return x.new_empty((0,))
    if coef.shape[0] == 1:
        grad_x = grad_y * coef[0].view(*shape)  # in the statistics' dtype: type promotion
    else:
        # One x-sized temporary, updated in place: B * (x - center) + shift + A * dy.
        grad_x = (x - coef[1].view(*shape)).mul_(coef[2].view(*shape)).add_(coef[3].view(*shape))
        grad_x.addcmul_(grad_y, coef[0].view(*shape))
    return _like_input(grad_x, x)


# ---- fused compositions ------------------------------------------------------------------------

def train_forward(x, weight, bias, running_mean, running_var, dbn_mean, dbn_std,
                  num_batches_tracked, momentum, eps, alpha_scale, alpha_power, alpha_offset,
                  residual=None, relu=False, *, normalize_with_batch=False):
    """batch_stats -> finalize -> normalize in one: the statistics straight from x, and the
    batch-centered values reused for y."""
    acc = stat_dtype(x)
    dims = _reduce_dims(x)
    M = x.numel() // x.shape[1]
    # Two passes, centered before squaring: as accurate as Welford (no E[x^2] - E[x]^2
    # cancellation) and several times faster than torch.var_mean on CPU.
    batch_mean = x.mean(dims, dtype=acc)
    centered = x - batch_mean.view(*_channel_shape(x))  # in acc: type promotion
    batch_var = centered.square().mean(dims)
    batch_std = batch_var.add(eps).sqrt_()
    batch_invstd = batch_std.reciprocal()

    k = num_batches_tracked
    if k is not None:
        k.add_(1)
    unbiased_var = batch_var * (M / (M - 1)) if running_mean is not None else None
    mean, invstd, alpha = _average(batch_mean, batch_std, batch_invstd, unbiased_var,
                                   running_mean, running_var, dbn_mean, dbn_std, k, momentum,
                                   alpha_scale, alpha_power, alpha_offset, normalize_with_batch)

    scale = _scale(invstd, weight)
    if dbn_mean is None or normalize_with_batch:
        shift = bias  # mu_k = m_B: x - mu_k is the batch-centered value itself
    else:
        # x - mu_k = (x - m_B) + (m_B - mu_k): reuse the batch-centered values.
        shift = (batch_mean - mean).mul_(scale)
        if bias is not None:
            shift.add_(bias)
    y = _normalize_in_place(centered, x, scale, shift, residual, relu)
    return y, mean, invstd, batch_mean, batch_invstd, alpha


def eval_invstd(spread, eps, spread_is_std, acc):
    """1/sigma of an eval step, in ``acc``: ``spread`` is a std (``dbn_std``, eps included) or
    a variance (``running_var``)."""
    spread = _as(spread, acc)
    return spread.reciprocal() if spread_is_std else torch.rsqrt(spread + eps)


def eval_forward(x, weight, bias, mean, spread, eps, spread_is_std, residual=None, relu=False):
    acc = stat_dtype(x)
    invstd = eval_invstd(spread, eps, spread_is_std, acc)
    centered = x - _as(mean, acc).view(*_channel_shape(x))
    scale = invstd if weight is None else invstd * weight
    return _normalize_in_place(centered, x, scale, bias, residual, relu), invstd


def _like_input(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` in ``x``'s dtype and memory format (dy may arrive in another format than x)."""
    if t.dtype == x.dtype and t.stride() == x.stride():
        return t
    return torch.empty_like(x).copy_(t)


def backward(grad_y, x, weight, mean, invstd, batch_mean, batch_invstd, alpha,
             grad_through_stats, input_grad, relu_output=None, residual_grad=False):
    grad_y = _masked(grad_y, relu_output)
    grad_residual = _grad_residual(grad_y, x, relu_output, residual_grad)
    grad_x, grad_weight, grad_bias = _backward(grad_y, x, weight, mean, invstd, batch_mean,
                                               batch_invstd, alpha, grad_through_stats,
                                               input_grad)
    return grad_x, grad_weight, grad_bias, grad_residual


def _backward(grad_y, x, weight, mean, invstd, batch_mean, batch_invstd, alpha,
              grad_through_stats, input_grad):
    acc = stat_dtype(x)
    dims = _reduce_dims(x)
    shape = _channel_shape(x)
    M = x.numel() // x.shape[1]
    sum_dy = grad_y.sum(dims, dtype=acc)
    centered = x - mean.view(*shape)  # x - mu_k, in acc
    work = centered * grad_y  # summed here, then reused in place as dx's storage
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
        grad_x.sub_(c.view(*shape), alpha=inv_M).addcmul_(centered, b.view(*shape), value=-inv_M)
    return _like_input(grad_x, x), sum_dy_xhat, sum_dy

define_backend("reference", {entry: globals()[entry] for entry in SCHEMAS},
               device_types=("cpu", "cuda"))
