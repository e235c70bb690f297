"""The autograd seam: one ``torch.autograd.Function`` for every backend.

Forward runs the backend's ``train_forward`` or ``eval_forward`` op and saves the same tensors
whatever the backend; backward runs the backend's ``backward`` op. A training step over a process
group runs the same backend's passes with a collective between them instead (``sync``). Swapping
a backend never touches this file.

The backend ops are opaque to autograd's other modes, so the Function provides them itself:
double backward and ``torch.func`` transforms over the backward get the gradients in
differentiable ops (``derivatives``), forward-mode AD a ``jvp`` rule, and ``vmap`` a rule that
runs the reference passes under a nested vmap. An ordinary backward keeps the backend's op. The
last two rules live on a twin class, ``TransformableFunction``, used only while a transform is
active: same forward and backward, but ``torch.compile`` cannot trace a Function that has them,
and the ``setup_context`` form they need costs host time on every call.
"""

from __future__ import annotations

import torch
from torch.autograd import forward_ad as _forward_ad

from . import derivatives, reference, sync
from .ops import op, stat_dtype


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the call when ``t`` already has it (the usual case)."""
    return t if t.dtype == dtype else t.to(dtype)


# The arguments after the differentiable ones: (x, weight, bias, residual) of the Function and
# (x, weight, bias) of its twin, which takes no epilogue (see ``TransformableFunction``).
_NO_GRADS = (None,) * 14


def transforms_active() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, jvp, ...) or a forward-mode AD level is
    active: then the Function must run (its ``vmap``/``jvp`` rules), even where no gradient will
    be asked for. Two cheap reads; under ``torch.compile`` the graph decides instead."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0


def _cast_param_grads(ctx, grad_x, grad_w, grad_b, grad_residual):
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    grads = (
        grad_x if need_x else None,
        _as(grad_w, ctx.weight_dtype) if need_w else None,
        _as(grad_b, ctx.bias_dtype) if need_b else None,
    )
    if ctx.takes_epilogue:
        return (*grads, grad_residual, *_NO_GRADS, None)  # ..., residual, ..., relu
    return (*grads, *_NO_GRADS)


def _residual_needs_grad(ctx) -> bool:
    return ctx.takes_epilogue and ctx.needs_input_grad[3]


def _backward(ctx, grad_y):
    """The backend's backward op (or the synchronised passes): the fast path."""
    x, weight, mean, invstd, batch_mean, batch_invstd, alpha, relu_output = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_residual = _residual_needs_grad(ctx)
    if ctx.group is not None:
        *grads, grad_residual = sync.backward(
            grad_y, x, weight, mean, invstd, batch_mean, batch_invstd, alpha,
            ctx.grad_through_stats, need_x, need_w or need_b, ctx.backend, ctx.group,
            relu_output, need_residual)
    else:
        *grads, grad_residual = op(ctx.backend, "backward")(
            grad_y, x, weight, mean, invstd, batch_mean, batch_invstd, alpha,
            ctx.grad_through_stats, need_x, relu_output, need_residual)
    if need_residual and relu_output is None:
        grad_residual = grad_y  # y = n + residual: the residual's gradient is dy itself
    return _cast_param_grads(ctx, *grads, grad_residual if need_residual else None)


def _differentiable_backward(ctx, grad_y):
    """The same gradients in differentiable, batchable ops (``derivatives``): for a graph being
    created (double backward) and for ``torch.func`` transforms over the backward."""
    _refuse_synchronised(ctx.group, "higher-order or transformed gradients")
    x, weight, mean, invstd, _, _, alpha, relu_output = ctx.saved_tensors
    if relu_output is not None:
        # ReLU's second derivative is 0: the mask is a constant of the double backward.
        grad_y = torch.where(relu_output > 0, grad_y, 0)
    grads = derivatives.backward(grad_y, x, weight, mean, invstd, alpha, ctx.eps,
                                 ctx.grad_through_stats, ctx.needs_input_grad[:3])
    return _cast_param_grads(ctx, *grads, grad_y if _residual_needs_grad(ctx) else None)


def _refuse_synchronised(group, what: str) -> None:
    if group is not None:
        raise RuntimeError(
            f"{what} of a synchronised (process-group) batch-norm training step are not "
            "supported: its statistics depend on other ranks' inputs. Differentiate it once, "
            "or run the layer in eval mode")


def run_forward(x, weight, bias, running_mean, running_var, dbn_mean, dbn_std,
                num_batches_tracked, training, momentum, eps, alpha_params, eval_stats, backend,
                group=None, normalize_with_batch=False, residual=None, relu=False):
    """The backend's forward op: ``y`` and what backward needs, ``(mean, invstd, batch_mean,
    batch_invstd, alpha)``. Called by the Function below, and directly when no gradient will be
    asked for (no graph to record: inference, ``torch.no_grad()``). ``group``: a process group
    whose statistics a training step uses (``None``: this device's batch alone).
    ``normalize_with_batch``: the authors' variant of the training step (see ``ops``).
    ``residual``, ``relu``: the fused epilogue, y = relu?(normalized + residual?)."""
    if training and group is not None:
        return sync.train_forward(x, weight, bias, running_mean, running_var, dbn_mean, dbn_std,
                                  num_batches_tracked, momentum, eps, alpha_params, backend, group,
                                  residual, relu, normalize_with_batch)
    if training:
        train = op(backend, "train_forward")
        if normalize_with_batch:
            y, *saved = train(x, weight, bias, running_mean, running_var, dbn_mean, dbn_std,
                              num_batches_tracked, momentum, eps, *alpha_params, residual, relu,
                              normalize_with_batch=True)
        else:  # no keyword to parse: the common call stays the cheapest
            y, *saved = train(x, weight, bias, running_mean, running_var, dbn_mean, dbn_std,
                              num_batches_tracked, momentum, eps, *alpha_params, residual, relu)
        return y, saved
    mean, spread, spread_is_std = _eval_statistics(running_mean, running_var, dbn_mean, dbn_std,
                                                   eval_stats)
    y, invstd = op(backend, "eval_forward")(x, weight, bias, mean, spread, eps, spread_is_std,
                                            residual, relu)
    return y, _eval_saved(mean, invstd)


def _eval_statistics(running_mean, running_var, dbn_mean, dbn_std, eval_stats):
    """``(mean, spread, spread_is_std)`` an eval step normalises with."""
    if eval_stats == "dbn":
        return dbn_mean, dbn_std, True
    return running_mean, running_var, False


def _eval_saved(mean, invstd):
    # Stored statistics are constants: the backward is affine (a_g = 0), so the batch
    # statistics it would read are never used and the stored ones stand in.
    return mean, invstd, mean, invstd, invstd


def _forward_as_passes(x, weight, bias, running_mean, running_var, dbn_mean, dbn_std,
                       num_batches_tracked, training, momentum, eps, alpha_params, eval_stats,
                       normalize_with_batch):
    """``run_forward`` on the reference passes called as Python functions (not as ops), which
    vmap can batch. Out of place wherever an operand may be batched when another is not."""
    if training:
        stats = reference.batch_stats(x, num_batches_tracked)
        *saved, coef = reference.finalize(
            stats.unsqueeze(0), weight, bias, running_mean, running_var, dbn_mean, dbn_std,
            num_batches_tracked, momentum, eps, *alpha_params,
            normalize_with_batch=normalize_with_batch)
        return reference.normalize(x, coef), saved
    mean, spread, spread_is_std = _eval_statistics(running_mean, running_var, dbn_mean, dbn_std,
                                                   eval_stats)
    acc = stat_dtype(x)
    invstd = reference.eval_invstd(spread, eps, spread_is_std, acc)
    scale = invstd if weight is None else invstd * weight
    shift = torch.zeros_like(scale) if bias is None else bias.to(acc)
    coef = torch.stack((mean.to(acc), scale, shift))
    return reference.normalize(x, coef), _eval_saved(mean, invstd)


_UPDATED_BUFFERS = (3, 4, 5, 6)  # running_mean, running_var, dbn_mean, dbn_std


def _store(ctx, x, weight, bias, saved, eps, grad_through_stats, backend, group,
           relu_output=None, takes_epilogue=False):
    """What either Function's backward reads. ``saved``: run_forward's five statistics;
    ``relu_output``: the output ``y`` when the step ended in a ReLU (its mask)."""
    ctx.save_for_backward(x, weight, *saved, relu_output)
    ctx.takes_epilogue = takes_epilogue
    ctx.grad_through_stats = grad_through_stats
    ctx.backend = backend
    ctx.group = group
    ctx.eps = eps
    ctx.weight_dtype = None if weight is None else weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward_entry(ctx, grad_y, *_):
    if torch.is_grad_enabled() or transforms_active():  # create_graph=True, or torch.func
        return _differentiable_backward(ctx, grad_y)
    return _backward(ctx, grad_y)


class DiminishingBatchNormFunction(torch.autograd.Function):
    """One normalisation step with its fused epilogue: ``y = relu?(norm(x) + residual?)``. The
    Function of every eager and compiled call. The ReLU's mask is not stored: backward reads it
    from ``y`` (saved; it is the output anyway).

    Written with ``ctx`` in ``forward`` rather than ``setup_context``: the latter makes
    ``Function.apply`` bind the arguments with ``inspect.signature`` on every call, about 100 us
    of host time."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, dbn_mean, dbn_std,
                num_batches_tracked, training, momentum, eps, alpha_params, eval_stats,
                grad_through_stats, backend, group, normalize_with_batch, relu):
        y, saved = run_forward(x, weight, bias, running_mean, running_var, dbn_mean, dbn_std,
                               num_batches_tracked, training, momentum, eps, alpha_params,
                               eval_stats, backend, group, normalize_with_batch, residual, relu)
        if not training:
            grad_through_stats, group = False, None
        _store(ctx, x, weight, bias, saved, eps, grad_through_stats, backend, group,
               y if relu else None, takes_epilogue=True)
        return y

    backward = staticmethod(_backward_entry)


class TransformableFunction(torch.autograd.Function):
    """The same step for ``torch.func`` transforms and forward-mode AD, which need
    ``setup_context`` and get rules for ``jvp`` and ``vmap``; applied only while one is active
    (``torch.compile`` cannot trace a Function that defines them). Outputs ``y`` and, not
    differentiable, the statistics backward reads: ``(mean, invstd, batch_mean, batch_invstd,
    alpha)`` in training, ``invstd`` in eval (the mean is a buffer, an input). It takes no
    epilogue: under a transform the caller adds the residual and applies the ReLU with ordinary
    (transformable) ops."""

    @staticmethod
    def forward(x, weight, bias, running_mean, running_var, dbn_mean, dbn_std,
                num_batches_tracked, training, momentum, eps, alpha_params, eval_stats,
                grad_through_stats, backend, group, normalize_with_batch):
        y, saved = run_forward(x, weight, bias, running_mean, running_var, dbn_mean, dbn_std,
                               num_batches_tracked, training, momentum, eps, alpha_params,
                               eval_stats, backend, group, normalize_with_batch)
        return (y, *saved) if training else (y, saved[1])

    @staticmethod
    def setup_context(ctx, inputs, output):
        (x, weight, bias, running_mean, running_var, dbn_mean, dbn_std, _, training, _, eps, _,
         eval_stats, grad_through_stats, backend, group, _) = inputs
        _, *stats = output
        if training:
            saved = stats
        else:
            mean, *_ = _eval_statistics(running_mean, running_var, dbn_mean, dbn_std, eval_stats)
            saved = _eval_saved(mean, stats[0])
            grad_through_stats, group = False, None
        ctx.mark_non_differentiable(*stats)
        ctx.stat_outputs = len(stats)
        _store(ctx, x, weight, bias, saved, eps, grad_through_stats, backend, group)
        ctx.save_for_forward(x, weight, *saved)

    backward = staticmethod(_backward_entry)

    @staticmethod
    def jvp(ctx, x_tangent, weight_tangent, bias_tangent, *_):
        _refuse_synchronised(ctx.group, "forward-mode derivatives")
        x, weight, mean, invstd, batch_mean, batch_invstd, alpha = ctx.saved_tensors  # forward's
        y_tangent = derivatives.jvp(x, weight, mean, invstd, batch_mean, batch_invstd, alpha,
                                    ctx.grad_through_stats, x_tangent, weight_tangent,
                                    bias_tangent)
        return (y_tangent, *(None,) * ctx.stat_outputs)

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, running_mean, running_var, dbn_mean, dbn_std,
             num_batches_tracked, training, momentum, eps, alpha_params, eval_stats,
             grad_through_stats, backend, group, normalize_with_batch):
        # The backend ops have no batching rule; the reference passes, run as ordinary ops under
        # a nested vmap, give every sample its own step.
        _refuse_synchronised(group, "vmap")
        tensors = (x, weight, bias, running_mean, running_var, dbn_mean, dbn_std,
                   num_batches_tracked)
        dims = tuple(in_dims[:len(tensors)])
        if training and dims[0] is not None:
            for i in _UPDATED_BUFFERS:
                if tensors[i] is not None and dims[i] is None:
                    raise RuntimeError(
                        "vmap over a batch-norm training step whose buffers are not batched: "
                        "each vmapped batch would update the same running statistics. Batch "
                        "the buffers with the input (torch.func.stack_module_state), call the "
                        "layer in eval mode, or use track_running_stats=False")

        def step(*t):
            y, saved = _forward_as_passes(*t, training, momentum, eps, alpha_params, eval_stats,
                                          normalize_with_batch)
            return (y, *saved) if training else (y, saved[1])

        outputs = torch.vmap(step, in_dims=dims)(*tensors)
        return outputs, (0,) * len(outputs)
