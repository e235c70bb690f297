"""Functional forms of the layers. The modules are thin wrappers around these."""

from __future__ import annotations

import torch

from . import backends
from ._checks import check_call, check_epilogue
from .sync import group_to_sync
from .autograd import (DiminishingBatchNormFunction, TransformableFunction, run_forward,
                       transforms_active)
from .schedules import AlphaLike, HostSchedule, as_schedule

__all__ = ["batch_norm", "diminishing_batch_norm"]

EVAL_STATS = ("dbn", "running")
NORMALIZE_WITH = ("average", "batch")
_BN_SCHEDULE = (1.0, 0.0, 0.0)  # a_k = 1: plain batch norm


def _normalize(x, weight, bias, running_mean, running_var, dbn_mean, dbn_std,
               num_batches_tracked, *, training, momentum, eps, alpha_params, eval_stats,
               grad_through_stats, backend, process_group, residual, activation,
               normalize_with_batch=False):
    relu = check_epilogue(x, residual, activation)
    use_batch_stats = training or (running_mean is None and dbn_mean is None)
    # Statistics cross ranks in training only; eval is local, as in torch.nn.SyncBatchNorm.
    group = group_to_sync(process_group) if training else None
    if not use_batch_stats:
        stats = dbn_mean if eval_stats == "dbn" else running_mean
        if stats is None:
            raise ValueError(f"eval_stats={eval_stats!r} needs its buffers, which are None")
    if _exporting():
        # Before check_call, whose shape tests torch.jit.trace would warn about (the exporter
        # validates the ATen op's arguments itself).
        if not training:
            y = _export_eval(x, weight, bias, running_mean, running_var, dbn_mean, dbn_std,
                             eps, eval_stats, use_batch_stats)
            return _epilogue(y, residual, relu)
        _refuse_onnx_training_export()
    check_call(x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var,
               dbn_mean=dbn_mean, dbn_std=dbn_std, num_batches_tracked=num_batches_tracked,
               training=use_batch_stats, momentum=momentum, eps=eps,
               needs_counter=training and (dbn_mean is not None or momentum is None),
               batch_is_local=group is None)
    if not training:
        # Buffers change in training only. Batch statistics in eval (no buffers to read) are a
        # training step with every update switched off.
        num_batches_tracked = None
    name = backends.resolve(backend, x.device)
    if x.numel() == 0 and group is None:
        # PyTorch: an empty batch gives an empty output, leaves the statistics alone and still
        # counts a step.
        if training and num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        shape = (1, -1, *([1] * (x.dim() - 2)))
        y = x * (1 if weight is None else weight.view(shape))
        return _epilogue(y if bias is None else y + bias.view(shape), residual, relu)
    args = (x, weight, bias, running_mean, running_var, dbn_mean, dbn_std, num_batches_tracked,
            use_batch_stats, momentum, eps, alpha_params, eval_stats, grad_through_stats, name,
            group, normalize_with_batch)
    if transforms_active():
        # The transform rules cover the normalization; the epilogue, as ordinary ops, gets
        # torch's own (unfused: a transform is not the fast path).
        return _epilogue(TransformableFunction.apply(*args)[0], residual, relu)
    if not (torch.is_grad_enabled() and (x.requires_grad or _requires_grad(weight)
                                         or _requires_grad(bias) or _requires_grad(residual))):
        # No gradient can be asked for: the op alone, without recording a graph (the Function's
        # machinery is a third of an eval call's host time on a GPU).
        return run_forward(*args[:13], name, group, normalize_with_batch, residual, relu)[0]
    return DiminishingBatchNormFunction.apply(*args[:3], residual, *args[3:], relu)


def _epilogue(y: torch.Tensor, residual: torch.Tensor | None, relu: bool) -> torch.Tensor:
    """The fused epilogue as separate ordinary ops, where no fused kernel runs."""
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def _exporting() -> bool:
    """Whether this call is being captured for deployment: by ``torch.export`` (and the ONNX
    exporter built on it) or by ``torch.jit.trace`` (and the TorchScript-based ONNX exporter).
    Every eval call asks, so it is two cheap reads. The flag is read directly because torch
    2.11's ``torch.compiler.is_exporting()`` answers True inside any ``torch.compile``d code,
    which must keep the project's ops."""
    return torch.compiler._is_exporting_flag or torch.jit.is_tracing()


def _export_eval(x, weight, bias, running_mean, running_var, dbn_mean, dbn_std, eps,
                 eval_stats, use_batch_stats):
    """An eval step as ATen's batch norm with the statistics the layer evaluates with, for
    exporters: a ``torch.export`` program then holds ATen ops only (it loads and runs without
    dbn_kernels), ``torch.jit.trace`` records ``aten::batch_norm`` and both ONNX exporters emit
    a standard BatchNormalization node (which they may fold into a preceding convolution)."""
    if use_batch_stats:  # no buffers (track_running_stats=False): the batch's own statistics
        return torch.nn.functional.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    if eval_stats == "dbn":
        # dbn_std includes eps: batch norm's sqrt(var + eps) gives it back, to about one ulp,
        # from var = dbn_std**2 - eps (no clamp needed: eps is added back before the sqrt). In
        # the buffers' precision, float32 at least; float64 would leave double-precision ops in
        # ONNX graphs, which some runtimes (TensorRT) refuse.
        if dbn_std.dtype in _FULL:
            var = dbn_std * dbn_std - eps
        else:
            var = (dbn_std.float().square() - eps).to(dbn_std.dtype)
        mean = dbn_mean
    else:
        mean, var = running_mean, running_var
    return torch.nn.functional.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)


_FULL = (torch.float32, torch.float64)


def _refuse_onnx_training_export() -> None:
    """A training step has no ONNX form here (the project's ops and autograd Function have no
    ONNX translation): say what to do instead of the exporter's unknown-operator error."""
    if torch.onnx.is_in_onnx_export():
        raise RuntimeError(
            "dbn_kernels layers export to ONNX in eval mode only: call model.eval() before "
            "torch.onnx.export (its default training=TrainingMode.EVAL does), or call "
            "dbn_kernels.revert(model) to export torch's own batch norm in their place (a "
            "reverted DiminishingBatchNorm trains as plain batch norm)")


def _requires_grad(t: torch.Tensor | None) -> bool:
    return t is not None and t.requires_grad


def batch_norm(input: torch.Tensor, running_mean: torch.Tensor | None,
               running_var: torch.Tensor | None, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, training: bool = False,
               momentum: float | None = 0.1, eps: float = 1e-5, *,
               num_batches_tracked: torch.Tensor | None = None,
               backend: str = "auto", process_group=None,
               residual: torch.Tensor | None = None,
               activation: str | None = None) -> torch.Tensor:
    """``torch.nn.functional.batch_norm`` on the project's kernels.

    Unlike PyTorch's functional form this one counts steps itself: pass ``num_batches_tracked``
    and it is incremented on the device in training (required for ``momentum=None``, PyTorch's
    cumulative average, which needs k without a host round trip).

    ``process_group``: in training, normalise with the statistics of every rank's batch of this
    ``torch.distributed`` group (``torch.distributed.group.WORLD`` for all ranks), as
    ``torch.nn.SyncBatchNorm`` does; every rank must call it, with an empty batch if it has none.
    ``None`` (the default) or a group of one rank: this call's batch alone.

    ``residual`` and ``activation`` (``None`` or ``"relu"``): the fused epilogue,
    ``activation(batch_norm(input) + residual)`` in the same kernels (``residual`` of the input's
    shape and dtype). Backward recovers the ReLU's mask from the output.
    """
    return _normalize(input, weight, bias, running_mean, running_var, None, None,
                      num_batches_tracked, training=training, momentum=momentum, eps=eps,
                      alpha_params=_BN_SCHEDULE, eval_stats="running",
                      grad_through_stats=True, backend=backend, process_group=process_group,
                      residual=residual, activation=activation)


def diminishing_batch_norm(input: torch.Tensor, dbn_mean: torch.Tensor, dbn_std: torch.Tensor,
                           num_batches_tracked: torch.Tensor,
                           weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                           running_mean: torch.Tensor | None = None,
                           running_var: torch.Tensor | None = None, training: bool = False,
                           alpha: AlphaLike = 0.25, momentum: float | None = 0.1,
                           eps: float = 1e-5, *, eval_stats: str = "dbn",
                           grad_through_stats: bool = True,
                           backend: str = "auto", process_group=None,
                           residual: torch.Tensor | None = None,
                           activation: str | None = None,
                           normalize_with: str = "average") -> torch.Tensor:
    """Diminishing batch norm (Ma & Klabjan, Algorithm 1): normalise with the a_k-weighted
    average of the batch mean and standard deviation, kept in ``dbn_mean``/``dbn_std`` and
    updated in training. PyTorch's ``running_mean``/``running_var`` are updated alongside when
    given. ``process_group``, ``residual`` and ``activation`` as in ``batch_norm``.

    ``normalize_with="batch"``: the authors' released variant instead. Training normalises with
    the batch statistics and batch norm's gradient; ``dbn_mean`` and the inverse std
    1/sqrt(var + eps) are a_k-averaged for evaluation, ``dbn_std`` holding the reciprocal of the
    latter average (the std evaluation divides by)."""
    if eval_stats not in EVAL_STATS:
        raise ValueError(f"eval_stats must be one of {EVAL_STATS}, got {eval_stats!r}")
    if normalize_with not in NORMALIZE_WITH:
        raise ValueError(
            f"normalize_with must be one of {NORMALIZE_WITH}, got {normalize_with!r}")
    if dbn_mean is None or dbn_std is None or num_batches_tracked is None:
        raise ValueError("diminishing_batch_norm needs dbn_mean, dbn_std and num_batches_tracked")
    schedule = as_schedule(alpha)
    if isinstance(schedule, HostSchedule):
        alpha_params = schedule.params_at(num_batches_tracked) if training else _BN_SCHEDULE
    else:
        alpha_params = schedule.params
    return _normalize(input, weight, bias, running_mean, running_var, dbn_mean, dbn_std,
                      num_batches_tracked, training=training, momentum=momentum, eps=eps,
                      alpha_params=alpha_params, eval_stats=eval_stats,
                      grad_through_stats=bool(grad_through_stats), backend=backend,
                      process_group=process_group, residual=residual, activation=activation,
                      normalize_with_batch=normalize_with == "batch")
