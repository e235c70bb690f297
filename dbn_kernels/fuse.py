"""``fuse``: a ``torch.fx`` pass that folds the ReLU (and the residual add before it) that follows
a batch norm into the norm's own kernels; ``unfuse``: the way back.

Patterns, where the norm's output has no other user (and the add's none but the ReLU)::

    norm(x) -> relu                      =>  norm(x)             with activation="relu"
    norm(x) -> add(., residual) -> relu  =>  norm(x, residual)   with activation="relu"

ReLU is ``nn.ReLU`` (in place or not), ``torch.relu``/``F.relu`` (and their in-place forms) or
the ``relu``/``relu_`` method; the add is ``+``, ``+=``, ``torch.add`` or the ``add``/``add_``
method without ``alpha``. When both operands of the add are fusible norms, the left one takes
the other as its residual: torchvision's ``out = bn2(out); out += identity`` keeps its
downsample branch's norm unfused, as the residual.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import modules
from .convert import convert

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_RELU_FUNCTIONS = (torch.relu, torch.relu_, F.relu, F.relu_)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


def _is_relu(node: fx.Node, submodules: dict) -> bool:
    if node.op == "call_module":
        return type(submodules[node.target]) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _is_add(node: fx.Node) -> bool:
    if "alpha" in node.kwargs or len(node.args) != 2:
        return False
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS
    return node.op == "call_method" and node.target in ("add", "add_")


def _fusible_norm(node, submodules: dict, calls: dict) -> bool:
    """A call of a batch-norm layer (torch's or the project's, not yet fused) on one input, whose
    output is used once and which no other node calls (its activation is a property of the
    layer, so a layer called twice cannot take it for one call only)."""
    if not (isinstance(node, fx.Node) and node.op == "call_module"):
        return False
    layer = submodules[node.target]
    if not isinstance(layer, _NORMS) or len(node.args) != 1 or node.kwargs:
        return False
    if isinstance(layer, modules._ProjectNorm) and layer.activation is not None:
        return False
    return len(node.users) == 1 and calls[node.target] == 1


def _fused_layer(layer: nn.Module) -> nn.Module:
    """The project layer for ``layer`` with the ReLU: torch's batch norm becomes the project's
    plain one (same numbers and state, reusing its tensors), a project layer a shallow copy
    (same parameter and buffer objects) so the model that was traced keeps its layers as
    they were."""
    if isinstance(layer, modules._ProjectNorm):
        new = copy.copy(layer)
        new._parameters = dict(layer._parameters)
        new._buffers = dict(layer._buffers)
        new._modules = dict(layer._modules)
    else:
        new = convert(layer)
    new.activation = "relu"
    return new


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


class FusionError(RuntimeError):
    """``fuse`` could not trace the model."""


def fuse(model: nn.Module) -> fx.GraphModule:
    """``model`` as a ``torch.fx.GraphModule`` whose batch norms carry the ReLU (and residual
    add) that follow them, computed in the norms' kernels (see the module docstring for the
    patterns). Outputs and gradients are the unfused model's (to the rounding of one fused
    add); parameter and buffer names are unchanged, so checkpoints load either way, and the
    parameter and buffer objects are the model's own (an optimiser built on either trains both).
    The model itself is left as it was.

    torch's ``BatchNorm*d``/``SyncBatchNorm`` that get fused become the project's plain layers
    (batch norm on the project's kernels, same state); norms left unfused stay what they are.
    ``dbn_kernels.convert`` before or after ``fuse`` makes them the project's too, and
    ``dbn_kernels.revert`` (which calls ``unfuse``) gives back torch's layers and ops.

    The result's ``fusions`` maps each norm's name to what it took (``"relu"``,
    ``"residual+relu"``) or why it was left alone. Raises ``FusionError`` naming the cause when
    ``torch.fx`` cannot trace the model (data-dependent control flow, say): fuse traceable
    submodules instead (``model.layer1 = dbn_kernels.fuse(model.layer1)``)."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # torch.fx raises many kinds (TraceError, TypeError, ...)
        raise FusionError(
            f"dbn_kernels.fuse: torch.fx cannot trace {type(model).__name__}: "
            f"{type(exc).__name__}: {exc}. Fuse its traceable submodules instead, e.g. "
            "model.layer1 = dbn_kernels.fuse(model.layer1)") from exc
    graph = gm.graph
    submodules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    fusions: dict[str, str] = {}
    for relu in list(graph.nodes):
        if not (_is_relu(relu, submodules) and len(relu.args) >= 1):
            continue
        source = relu.args[0]
        if not isinstance(source, fx.Node):
            continue
        norm, residual, dead = None, None, [relu]
        if _is_add(source) and len(source.users) == 1:
            left, right = source.args
            for candidate, other in ((left, right), (right, left)):
                if _fusible_norm(candidate, submodules, calls) and isinstance(other, fx.Node):
                    norm, residual = candidate, other
                    dead.append(source)
                    break
        elif _fusible_norm(source, submodules, calls):
            norm = source
        if norm is None:
            continue
        layer = _fused_layer(submodules[norm.target])
        _set_submodule(gm, norm.target, layer)
        submodules[norm.target] = layer
        # At the ReLU's place: the residual may be computed after the norm (torchvision computes
        # the downsample branch after bn2).
        with graph.inserting_before(relu):
            kwargs = {} if residual is None else {"residual": residual}
            fused = graph.call_module(norm.target, norm.args, kwargs)
        fused.meta = dict(norm.meta)
        relu.replace_all_uses_with(fused)
        for node in (*dead, norm):
            graph.erase_node(node)
        fusions[norm.target] = "relu" if residual is None else "residual+relu"

    for path, layer in submodules.items():
        if isinstance(layer, _NORMS) and path not in fusions:
            fusions[path] = _why_unfused(path, layer, calls)
    graph.lint()
    gm.recompile()
    gm.fusions = fusions
    return gm


def _why_unfused(path: str, layer: nn.Module, calls: dict) -> str:
    if isinstance(layer, modules._ProjectNorm) and layer.activation is not None:
        return "already fused"
    if calls.get(path, 0) > 1:
        return "not fused: the layer is called more than once"
    if calls.get(path, 0) == 0:
        return "not fused: not called by the traced forward"
    return "not fused: its output is not followed by a ReLU (or add + ReLU) that uses it alone"


def unfuse(gm: fx.GraphModule) -> fx.GraphModule:
    """Undo ``fuse`` in place: every fused call becomes the norm, ``operator.add`` and
    ``torch.relu`` nodes again and the layers lose their activation. Returns ``gm``."""
    graph = gm.graph
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        layer = gm.get_submodule(node.target)
        if not isinstance(layer, modules._ProjectNorm):
            continue
        residual = node.kwargs.get("residual")
        if layer.activation is None and residual is None:
            continue
        with graph.inserting_after(node):
            norm = graph.call_module(node.target, node.args)
        out = norm
        if residual is not None:
            with graph.inserting_after(out):
                out = graph.call_function(operator.add, (out, residual))
        if layer.activation == "relu":
            with graph.inserting_after(out):
                out = graph.call_function(torch.relu, (out,))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        layer.activation = None
        changed = True
    if changed:
        graph.lint()
        gm.recompile()
    return gm
