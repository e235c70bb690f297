"""The step's derivatives as differentiable PyTorch ops, for the autograd transforms the fused
backends cannot serve: double backward (``create_graph=True``), forward mode (``jvp``) and
``torch.func`` transforms over the backward (``jacrev``, ``hessian``, per-sample gradients).

The backend ops compute the first derivative fast but are opaque: nothing differentiates or
batches through them. Here the same first derivative is written so that autograd and vmap can see
through it: the batch statistics are recomputed from ``x`` as functions of ``x``, and the
averaged statistics the step used are rebuilt as the affine functions of them that Algorithm 1
makes them,

    mu_k  = mean   + a_k (m_B(x) - m_B)        (value: the saved mu_k)
    sig_k = 1/invstd + a_k (s_B(x) - s_B)      (value: the saved sig_k, within rounding)

where ``m_B``, ``s_B`` are the saved batch statistics and ``m_B(x)``, ``s_B(x)`` their
recomputation, equal in value and carrying the derivatives. Every derivative of any order then
follows from autograd on ordinary ops. Without gradient through the statistics (and in eval) mu_k
and sig_k are constants.

Accumulation is in the statistics' dtype (float32; float64 for float64 input), as in the
backends; results are cast to the inputs' dtypes.
"""

from __future__ import annotations

import torch

from .ops import stat_dtype


def _channel_view(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.view((1, -1) + (1,) * (x.dim() - 2))


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _statistics(x, mean, invstd, alpha, eps, through_stats):
    """``(mu_k, sig_k, m_B(x), s_B(x))`` per channel in the statistics' dtype (see the module
    docstring); without gradient through the statistics mu_k and sig_k are the saved constants
    and the batch statistics are not recomputed (``None``)."""
    if not through_stats:
        return mean, invstd.reciprocal(), None, None
    m = x.mean(_reduce_dims(x))
    s = (x - _channel_view(m, x)).square().mean(_reduce_dims(x)).add(eps).sqrt()
    mu = mean + alpha * (m - m.detach())
    sig = invstd.reciprocal() + alpha * (s - s.detach())
    return mu, sig, m, s


def backward(grad_y, x, weight, mean, invstd, alpha, eps, grad_through_stats,
             needs_input_grad):
    """``(grad_x, grad_weight, grad_bias)`` of one step, differentiable in ``grad_y``, ``x`` and
    ``weight`` to any order; ``None`` for what ``needs_input_grad`` (x, weight, bias) does not ask.

    With y = gamma * xhat + beta, xhat = (x - mu_k) / sig_k, and mu_k, sig_k the affine functions
    a_k * m_B + c, a_k * s_B + c' of the batch statistics::

        dL/dx = gamma dy / sig_k - a_k / n * sum(gamma dy) / sig_k
                - a_k / n * sum(gamma dy * xhat) / sig_k * (x - m_B) / s_B
    """
    need_x, need_w, need_b = needs_input_grad
    acc = stat_dtype(x)
    xa, g = x.to(acc), grad_y.to(acc)
    dims = _reduce_dims(x)
    mu, sig, m, s = _statistics(xa, mean, invstd, alpha, eps, grad_through_stats)
    xhat = (xa - _channel_view(mu, x)) / _channel_view(sig, x)
    grad_w = (g * xhat).sum(dims) if need_w else None
    grad_b = g.sum(dims) if need_b else None
    grad_x = None
    if need_x:
        g_xhat = g if weight is None else g * _channel_view(weight.to(acc), x)
        grad_x = g_xhat / _channel_view(sig, x)
        if grad_through_stats:
            n = x.numel() // x.shape[1]
            sum_g = g_xhat.sum(dims) / sig
            sum_g_xhat = (g_xhat * xhat).sum(dims) / sig
            grad_x = grad_x - _channel_view(alpha * sum_g / n, x) \
                - _channel_view(alpha * sum_g_xhat / (n * s), x) * (xa - _channel_view(m, x))
        grad_x = grad_x.to(x.dtype)
    return grad_x, grad_w, grad_b


def jvp(x, weight, mean, invstd, batch_mean, batch_invstd, alpha, grad_through_stats,
        x_tangent, weight_tangent, bias_tangent):
    """The tangent of ``y`` for tangents of ``x``, ``weight`` and ``bias`` (any may be ``None``):
    forward-mode AD of the step, in differentiable ops."""
    acc = stat_dtype(x)
    xa = x.to(acc)
    dims = _reduce_dims(x)
    xhat = (xa - _channel_view(mean, x)) * _channel_view(invstd, x)
    tangent = None
    if x_tangent is not None:
        t = x_tangent.to(acc)
        xhat_t = t
        if grad_through_stats:
            # d m_B = mean(dx); d s_B = mean((x - m_B) dx) / s_B; mu_k, sig_k move by a_k times.
            d_mean = alpha * t.mean(dims)
            d_std = alpha * ((xa - _channel_view(batch_mean, x)) * t).mean(dims) * batch_invstd
            xhat_t = t - _channel_view(d_mean, x) - xhat * _channel_view(d_std, x)
        xhat_t = xhat_t * _channel_view(invstd, x)
        tangent = xhat_t if weight is None else xhat_t * _channel_view(weight.to(acc), x)
    if weight_tangent is not None:
        term = xhat * _channel_view(weight_tangent.to(acc), x)
        tangent = term if tangent is None else tangent + term
    if bias_tangent is not None:
        term = _channel_view(bias_tangent.to(acc), x)
        tangent = term.expand_as(xhat) if tangent is None else tangent + term
    return None if tangent is None else tangent.to(x.dtype)
