"""Statistics over a process group: the training step composed from the passes, with one
``torch.distributed`` collective between the reduction and the finalize of each direction.

Forward::

    batch_stats (local count, mean, M2) -> all_gather -> finalize (the (world, 3, C) stack,
    merged in rank order) -> normalize

Backward::

    backward_reduce (local count, sum dy, sum dy * (x - mean)) -> all_gather ->
    backward_finalize (the stack, summed in rank order) -> backward_dx

Every rank merges the same stack in the same order, so a_k, the buffers and the saved statistics
are bit for bit the same on every rank, and a run is deterministic for a fixed world size. The
statistics cover the union of the ranks' batches, count-weighted: uneven batches and ranks with
an empty batch (count 0, which merges as nothing) give the single-process result on the
concatenated batch. Gathering the per-rank rows rather than all-reducing their sums keeps Chan's
merge (no E[x^2] - E[x]^2) and the fixed order; the rows are 3 * C values per rank, a few KiB.

Parameter gradients are the rank's own sums, as in ``torch.nn.SyncBatchNorm``: data-parallel
training adds (DDP: averages) them over the ranks. The collective is the only synchronisation:
on CUDA it is queued on the device like the kernels around it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .ops import empty_like_preserving, op, residual_grad_written


def all_gather_rows(rows: torch.Tensor, group) -> torch.Tensor:
    """Every rank's ``(R, C)`` rows as a ``(world, R, C)`` stack in rank order: one collective.

    The output is allocated as ``(world * R, C)``, the shape both gloo and NCCL accept for a
    gather along the first dimension, and viewed as the stack."""
    world = dist.get_world_size(group)
    rows = rows.contiguous()
    out = rows.new_empty((world * rows.shape[0], rows.shape[1]))
    dist.all_gather_into_tensor(out, rows, group=group)
    return out.view(world, *rows.shape)


def train_forward(x, weight, bias, running_mean, running_var, dbn_mean, dbn_std,
                  num_batches_tracked, momentum, eps, alpha_params, backend, group,
                  residual=None, relu=False, normalize_with_batch=False):
    """The training step on statistics of the whole group: ``y`` and the saved tensors
    ``(mean, invstd, batch_mean, batch_invstd, alpha)``, as the fused ``train_forward`` (with
    its epilogue, ``residual`` and ``relu``, in the normalize pass, and its variant,
    ``normalize_with_batch``, in finalize)."""
    local = op(backend, "batch_stats")(x, num_batches_tracked)
    stats = all_gather_rows(local, group)
    *saved, coef = op(backend, "finalize")(
        stats, weight, bias, running_mean, running_var, dbn_mean, dbn_std, num_batches_tracked,
        momentum, eps, *alpha_params, normalize_with_batch=normalize_with_batch)
    # An empty local batch still took part in the collective above (its count is 0).
    y = op(backend, "normalize")(x, coef, residual, relu) if x.numel() \
        else empty_like_preserving(x)
    return y, saved


def backward(grad_y, x, weight, mean, invstd, batch_mean, batch_invstd, alpha,
             grad_through_stats, input_grad, param_grads, backend, group, relu_output=None,
             residual_grad=False):
    """``(grad_x, grad_weight, grad_bias, grad_residual)``: ``grad_x`` is this rank's slice of
    the gradient of the whole group's loss (``None`` unless ``input_grad``), the parameter
    gradients the rank's own sums (``None`` unless ``param_grads``), ``grad_residual`` as the
    fused ``backward``'s (the masked dy, local: ``None`` unless written).

    The sums cross ranks only for ``grad_x``; as in ``torch.nn.SyncBatchNorm``, no collective
    runs when no rank needs it (every rank holds the same model, so all agree)."""
    local = op(backend, "backward_reduce")(grad_y, x, mean, relu_output)
    grad_x = grad_weight = grad_bias = grad_residual = None
    residual_grad = residual_grad_written(relu_output, residual_grad)
    if input_grad or residual_grad:
        if input_grad:
            sums = all_gather_rows(local, group)
            _, _, coef = op(backend, "backward_finalize")(
                sums, weight, invstd, batch_mean, batch_invstd, alpha, grad_through_stats, True)
        else:  # the residual's gradient alone: no dx coefficients, no collective
            coef = local.new_empty((0, local.shape[-1]))
        if x.numel():
            grad_x, grad_residual = op(backend, "backward_dx")(grad_y, x, coef, relu_output,
                                                               residual_grad)
        else:
            grad_x = grad_residual = empty_like_preserving(x)
        grad_x = grad_x if input_grad else None
        grad_residual = grad_residual if residual_grad else None
    if param_grads:
        grad_weight, grad_bias, _ = op(backend, "backward_finalize")(
            local.unsqueeze(0), weight, invstd, batch_mean, batch_invstd, alpha,
            grad_through_stats, False)
    return grad_x, grad_weight, grad_bias, grad_residual


def group_to_sync(group) -> object | None:
    """``group`` when a training step must synchronise over it (more than one rank), else
    ``None``: the single-device path."""
    return group if group is not None and dist.get_world_size(group) > 1 else None


def group_or_default(process_group) -> object | None:
    """A sync layer's group: ``process_group``, or the default group when it is ``None``;
    ``None`` while ``torch.distributed`` is not initialised (one process: nothing to sync)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return process_group if process_group is not None else dist.group.WORLD
