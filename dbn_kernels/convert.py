"""``convert``: swap every ``torch.nn.BatchNorm1d/2d/3d`` in a model for the project's layers."""

from __future__ import annotations

import torch
from torch import nn

from . import modules

_PLAIN = {nn.BatchNorm1d: modules.BatchNorm1d, nn.BatchNorm2d: modules.BatchNorm2d,
          nn.BatchNorm3d: modules.BatchNorm3d}
_DIMINISHING = {nn.BatchNorm1d: modules.DiminishingBatchNorm1d,
                nn.BatchNorm2d: modules.DiminishingBatchNorm2d,
                nn.BatchNorm3d: modules.DiminishingBatchNorm3d}


def _torch_base(module: nn.Module) -> type | None:
    for base in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        if isinstance(module, base):
            return base
    return None


def _replacement(bn: nn.Module, base: type, alpha, backend: str, kwargs: dict) -> nn.Module:
    affine = bn.weight is not None
    common = dict(eps=bn.eps, momentum=bn.momentum, affine=affine,
                  track_running_stats=bn.track_running_stats, bias=bn.bias is not None or not affine,
                  backend=backend, device=None, dtype=None)
    if alpha is None:
        new = _PLAIN[base](bn.num_features, **common, **kwargs)
    else:
        new = _DIMINISHING[base](bn.num_features, **common, alpha=alpha, **kwargs)
    # Reuse the very parameter and buffer objects: optimisers and hooks that hold them keep working.
    for name in ("weight", "bias"):
        setattr(new, name, getattr(bn, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(new, name, getattr(bn, name))
    if alpha is not None:
        stats = bn.running_mean
        new.dbn_mean = stats.detach().clone()
        new.dbn_std = torch.sqrt(bn.running_var.detach() + bn.eps)
    new.train(bn.training)
    return new


def convert(module: nn.Module, *, alpha=None, backend: str = "auto", **kwargs) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` in ``module`` (recursively, in place) and return it.

    ``alpha=None`` gives the plain ``BatchNorm*d`` (same numbers, faster kernels); any other
    value the ``DiminishingBatchNorm*d`` with that schedule, its averages seeded from the running
    statistics. Parameters and buffers are reused, not copied; ``training`` is kept. Extra
    keywords (``eval_stats``, ``grad_through_stats``) go to the new layers. Layers that already
    are the project's are left alone.
    """
    if isinstance(module, (modules._ProjectNorm,)):
        return module
    base = _torch_base(module)
    if base is not None:
        return _replacement(module, base, alpha, backend, kwargs)
    for name, child in module.named_children():
        new = convert(child, alpha=alpha, backend=backend, **kwargs)
        if new is not child:
            setattr(module, name, new)
    return module
