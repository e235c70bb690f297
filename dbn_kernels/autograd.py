"""The autograd seam: one ``torch.autograd.Function`` for every backend.

Forward runs the backend's ``train_forward`` or ``eval_forward`` op and saves the same tensors
whatever the backend; backward runs the backend's ``backward`` op. A training step over a process
group runs the same backend's passes with a collective between them instead (``sync``). Swapping
a backend never touches this file.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import sync
from .ops import op


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the call when ``t`` already has it (the usual case)."""
    return t if t.dtype == dtype else t.to(dtype)


_NO_GRADS = (None,) * 13  # for the arguments after (x, weight, bias)


def _backward(ctx, grad_y):
    x, weight, mean, invstd, batch_mean, batch_invstd, alpha = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if ctx.group is not None:
        grad_x, grad_w, grad_b = sync.backward(
            grad_y, x, weight, mean, invstd, batch_mean, batch_invstd, alpha,
            ctx.grad_through_stats, need_x, need_w or need_b, ctx.backend, ctx.group)
    else:
        grad_x, grad_w, grad_b = op(ctx.backend, "backward")(
            grad_y, x, weight, mean, invstd, batch_mean, batch_invstd, alpha,
            ctx.grad_through_stats, need_x)
    return (
        grad_x if need_x else None,
        _as(grad_w, weight.dtype) if need_w else None,
        _as(grad_b, ctx.bias_dtype) if need_b else None,
        *_NO_GRADS,
    )


# The backward ops have no derivative of their own: under create_graph=True the gradients must
# refuse a second differentiation, which once_differentiable arranges (running the function under
# no_grad). In an ordinary backward grad mode is already off, the wrapper would change nothing,
# and its context manager costs a few microseconds a call, so it is entered only when needed.
_backward_once_differentiable = once_differentiable(_backward)


def run_forward(x, weight, bias, running_mean, running_var, dbn_mean, dbn_std,
                num_batches_tracked, training, momentum, eps, alpha_params, eval_stats, backend,
                group=None):
    """The backend's forward op: ``y`` and what backward needs, ``(mean, invstd, batch_mean,
    batch_invstd, alpha)``. Called by the Function below, and directly when no gradient will be
    asked for (no graph to record: inference, ``torch.no_grad()``). ``group``: a process group
    whose statistics a training step uses (``None``: this device's batch alone)."""
    if training and group is not None:
        return sync.train_forward(x, weight, bias, running_mean, running_var, dbn_mean, dbn_std,
                                  num_batches_tracked, momentum, eps, alpha_params, backend, group)
    if training:
        y, *saved = op(backend, "train_forward")(
            x, weight, bias, running_mean, running_var, dbn_mean, dbn_std,
            num_batches_tracked, momentum, eps, *alpha_params)
        return y, saved
    # Stored statistics are constants: the backward is affine (a_g = 0), so the batch
    # statistics it would read are never used and the stored ones stand in.
    if eval_stats == "dbn":
        mean, spread, spread_is_std = dbn_mean, dbn_std, True
    else:
        mean, spread, spread_is_std = running_mean, running_var, False
    y, invstd = op(backend, "eval_forward")(x, weight, bias, mean, spread, eps, spread_is_std)
    return y, (mean, invstd, mean, invstd, invstd)


class DiminishingBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, dbn_mean, dbn_std,
                num_batches_tracked, training, momentum, eps, alpha_params, eval_stats,
                grad_through_stats, backend, group):
        y, saved = run_forward(x, weight, bias, running_mean, running_var, dbn_mean, dbn_std,
                               num_batches_tracked, training, momentum, eps, alpha_params,
                               eval_stats, backend, group)
        if not training:
            grad_through_stats = False
            group = None
        ctx.save_for_backward(x, weight, *saved)
        ctx.grad_through_stats = grad_through_stats
        ctx.backend = backend
        ctx.group = group
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        if torch.is_grad_enabled():  # create_graph=True
            return _backward_once_differentiable(ctx, grad_y)
        return _backward(ctx, grad_y)
