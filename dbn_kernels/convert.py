"""``convert``: swap every batch norm in a model for the project's layers; ``revert``: back to
torch's, for inference and export."""

from __future__ import annotations

import torch
from torch import nn

from . import modules

_PLAIN = {nn.BatchNorm1d: modules.BatchNorm1d, nn.BatchNorm2d: modules.BatchNorm2d,
          nn.BatchNorm3d: modules.BatchNorm3d}
_DIMINISHING = {nn.BatchNorm1d: modules.DiminishingBatchNorm1d,
                nn.BatchNorm2d: modules.DiminishingBatchNorm2d,
                nn.BatchNorm3d: modules.DiminishingBatchNorm3d}
_SYNC = (modules.SyncBatchNorm, modules.SyncDiminishingBatchNorm)


def _torch_base(module: nn.Module) -> type | None:
    for base in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm):
        if isinstance(module, base):
            return base
    return None


def _common(bn: nn.Module, backend: str) -> dict:
    affine = bn.weight is not None
    return dict(eps=bn.eps, momentum=bn.momentum, affine=affine,
                track_running_stats=bn.track_running_stats,
                bias=bn.bias is not None or not affine, backend=backend, device=None, dtype=None)


def _adopt(new: nn.Module, old: nn.Module, names) -> nn.Module:
    """Give ``new`` the very parameter and buffer objects of ``old`` (optimisers and hooks that
    hold them keep working) and its ``training`` flag."""
    for name in names:
        setattr(new, name, getattr(old, name))
    new.train(old.training)
    return new


_SHARED = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _from_torch(bn: nn.Module, base: type, alpha, sync: bool, process_group, backend: str,
                kwargs: dict) -> nn.Module:
    """A project layer in place of one of torch's (a ``torch.nn.SyncBatchNorm`` stays sync)."""
    common = _common(bn, backend)
    if sync or base is nn.SyncBatchNorm:
        group = process_group if process_group is not None else getattr(bn, "process_group", None)
        cls = modules.SyncBatchNorm if alpha is None else modules.SyncDiminishingBatchNorm
        common["process_group"] = group
    else:
        cls = (_PLAIN if alpha is None else _DIMINISHING)[base]
    if alpha is None:
        new = cls(bn.num_features, **common, **kwargs)
    else:
        new = cls(bn.num_features, **common, alpha=alpha, **kwargs)
        # The averages start from the running statistics.
        new.dbn_mean = bn.running_mean.detach().clone()
        new.dbn_std = torch.sqrt(bn.running_var.detach() + bn.eps)
    return _adopt(new, bn, _SHARED)


def _to_sync(layer: nn.Module, process_group) -> nn.Module:
    """A local project layer as its sync counterpart, every setting and tensor kept."""
    common = _common(layer, layer.backend)
    if isinstance(layer, modules._DiminishingMixin):
        new = modules.SyncDiminishingBatchNorm(
            layer.num_features, **common, process_group=process_group, alpha=layer.alpha,
            eval_stats=layer.eval_stats, grad_through_stats=layer.grad_through_stats,
            activation=layer.activation, normalize_with=layer.normalize_with)
        return _adopt(new, layer, _SHARED + ("dbn_mean", "dbn_std"))
    new = modules.SyncBatchNorm(layer.num_features, **common, process_group=process_group,
                                activation=layer.activation)
    return _adopt(new, layer, _SHARED)


def convert(module: nn.Module, *, alpha=None, sync: bool = False, process_group=None,
            backend: str = "auto", **kwargs) -> nn.Module:
    """Replace every batch norm in ``module`` (recursively, in place) and return it.

    ``torch.nn.BatchNorm1d/2d/3d`` becomes, with ``alpha=None``, the plain ``BatchNorm*d`` (same
    numbers, faster kernels), with any other ``alpha`` the ``DiminishingBatchNorm*d`` with that
    schedule, its averages seeded from the running statistics. Extra keywords (``eval_stats``,
    ``grad_through_stats``, ``normalize_with``) go to the new layers.

    ``sync=True`` gives the layers that normalise with the statistics of every rank of
    ``process_group`` (default: the whole default group) in training: ``SyncBatchNorm`` or
    ``SyncDiminishingBatchNorm``, for ``torch.nn.BatchNorm*d``, for ``torch.nn.SyncBatchNorm``
    and for the project's own local layers, which keep their kind and settings (a Diminishing
    layer stays Diminishing, whatever ``alpha``). A ``torch.nn.SyncBatchNorm`` becomes a sync
    layer even with ``sync=False`` (keeping its own group unless ``process_group`` is given):
    converting never drops synchronisation. Otherwise the project's layers are left alone.

    Parameters and buffers are reused, not copied; ``training`` is kept.
    """
    if isinstance(module, _SYNC):
        return module
    if isinstance(module, modules._ProjectNorm):
        return _to_sync(module, process_group) if sync else module
    base = _torch_base(module)
    if base is not None:
        return _from_torch(module, base, alpha, sync, process_group, backend, kwargs)
    for name, child in module.named_children():
        new = convert(child, alpha=alpha, sync=sync, process_group=process_group,
                      backend=backend, **kwargs)
        if new is not child:
            setattr(module, name, new)
    return module


def _revert_layer(layer: nn.Module) -> nn.Module:
    """torch's layer evaluating as ``layer`` does: same parameter objects, settings, ``training``
    flag and counter; running statistics = those ``layer`` evaluates with."""
    cls = layer._torch_cls
    affine = layer.weight is not None
    kwargs = dict(eps=layer.eps, momentum=layer.momentum, affine=affine,
                  track_running_stats=layer.track_running_stats)
    if cls is nn.SyncBatchNorm:
        kwargs["process_group"] = layer.process_group
    bias = layer.bias is not None or not affine
    if not bias and modules._takes_bias(cls):
        kwargs["bias"] = False
    # Built on the meta device: every tensor is replaced below, so nothing is allocated twice.
    new = cls(layer.num_features, **kwargs, device="meta")
    if not bias and new.bias is not None:
        new.register_parameter("bias", None)
    names = [name for name in _SHARED if getattr(layer, name) is not None]
    if isinstance(layer, modules._DiminishingMixin) and layer.eval_stats == "dbn":
        names.remove("running_mean")
        names.remove("running_var")
        new.running_mean = layer.dbn_mean.detach().clone()
        # dbn_std includes eps, which batch norm adds back: sqrt(running_var + eps) = dbn_std.
        # Formed in float64 so that the round trip is exact to the buffers' rounding (MPS has
        # no float64); clamped so that hand-set statistics below sqrt(eps) give no negative
        # variance.
        std = layer.dbn_std.detach()
        wide = std.to(torch.float32 if std.device.type == "mps" else torch.float64)
        new.running_var = (wide * wide - layer.eps).clamp_min_(0).to(std.dtype)
    return _adopt(new, layer, names)


def revert(module: nn.Module) -> nn.Module:
    """Replace every dbn_kernels layer in ``module`` (recursively, in place) with torch's own
    batch norm that evaluates identically, and return it; a layer passed alone is returned as
    its replacement. For inference and export: fusing convolutions with batch norm
    (``torch.nn.utils.fusion.fuse_conv_bn_eval``, ``torch.fx.experimental.optimization.fuse``,
    ``torch.ao.quantization.fuse_modules``), quantization, ONNX, TorchScript.

    ``BatchNorm*d`` and ``DiminishingBatchNorm*d`` become ``torch.nn.BatchNorm*d``;
    ``SyncBatchNorm`` and ``SyncDiminishingBatchNorm`` become ``torch.nn.SyncBatchNorm`` with the
    same ``process_group`` (they accept any rank, so there is no ``BatchNorm*d`` to pick; torch's
    sync layer evaluates like ``BatchNorm*d`` and ``fuse_conv_bn_eval`` folds it, but the
    type-matching fusers skip it). The weight and bias are the very same ``Parameter`` objects;
    eps, momentum, affine, track_running_stats, the ``training`` flag, ``num_batches_tracked``,
    device and dtype are kept, and a layer built with ``bias=False`` stays without bias.

    The new running statistics are those the layer evaluates with: a Diminishing layer with
    ``eval_stats="dbn"`` gets ``running_mean = dbn_mean`` and ``running_var = dbn_std**2 - eps``
    (clamped at 0; ``dbn_std`` includes eps), copies formed in float64; otherwise the layer's own
    running buffers are reused. ``dbn_mean``, ``dbn_std`` and the schedule are dropped: training
    a reverted Diminishing layer is plain batch norm.

    A ``dbn_kernels.fuse`` result is unfused first (``unfuse``: the ReLU and the residual add
    become torch ops in its graph again); a fused layer elsewhere is refused (torch's layer has
    no activation), before anything changes.
    """
    if isinstance(module, torch.fx.GraphModule):
        from .fuse import unfuse  # fuse imports this module

        unfuse(module)  # the fused epilogues as torch ops again, before the layers go
    if isinstance(module, modules._ProjectNorm):
        if module.activation is not None:
            raise ValueError(
                f"revert cannot turn a {type(module).__name__} with activation="
                f"{module.activation!r} into torch's batch norm, which has no activation: "
                "revert the dbn_kernels.fuse result (a GraphModule) as a whole, which unfuses "
                "it, or set the layer's activation to None and apply the ReLU after it")
        return _revert_layer(module)
    for name, child in module.named_children():
        new = revert(child)
        if new is not child:
            setattr(module, name, new)
    return module
