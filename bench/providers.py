"""Everything ``dbn-bench`` can time, each with its availability and a setup per mode.

Providers (``--providers`` takes these names):

* ``cuda-bn``, ``cuda-dbn``, ``triton-bn``, ``triton-dbn``, ``reference-bn``, ``reference-dbn``:
  the project's ``BatchNorm2d`` (plain batch norm) and ``DiminishingBatchNorm2d`` (alpha=0.25)
  on one backend each;
* ``torch``: eager ``torch.nn.BatchNorm2d``; which implementation PyTorch dispatched to (cuDNN or
  its native kernels) is read off the profiler's operator names, not guessed;
* ``cudnn``: cuDNN called directly through ``torch.ops.aten.cudnn_batch_norm`` and
  ``cudnn_batch_norm_backward``, where cuDNN accepts the case;
* ``torch-compile``: ``torch.compile(nn.BatchNorm2d, fullgraph=True, dynamic=False)``, compiled
  afresh for every case so each shape gets kernels specialised to it (torch.compile's best case).

With an epilogue (``--epilogue relu`` / ``add-relu``, carried by ``CaseInputs.epilogue``) the
project's providers time the fused layer (``activation="relu"``, called with the residual for
add-relu); ``torch`` times the unfused composition a user writes today (``nn.BatchNorm2d``, then
``+ residual``, then ``torch.relu``); ``torch-compile`` compiles that same composition (Inductor
fuses it); ``cudnn`` reports the case as skipped (no fused epilogue there).

A provider's ``setup(inputs, mode)`` returns a function that performs one call in that mode and
returns its outputs by name (see ``cases.expected_outputs``); the first call starts from the
case's initial state, so its outputs can be checked before anything is timed. Calls happen as a
user makes them: modules through autograd, backward through ``torch.autograd.grad``, inference
under ``torch.no_grad``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .. import backends
from ..modules import BatchNorm2d, DiminishingBatchNorm2d
from .cases import ALPHA, EPS, MOMENTUM, STEPS_BEFORE, CaseInputs

Outputs = dict[str, torch.Tensor]
Call = Callable[[], Outputs]


class Unsupported(Exception):
    """The provider cannot run this particular case (reported as skipped, with the reason)."""


@dataclass
class Provider:
    name: str
    family: str
    """``bn`` (plain batch norm) or ``dbn``: which expected outputs apply."""
    description: str
    unavailable: Callable[[torch.device], str | None]
    """Why the provider cannot run on a device at all, or ``None``."""
    build: Callable[[CaseInputs, str], Call]
    implementation: Callable[[Call, torch.device], str]
    """Which implementation a call really ran (called once per row, after the check)."""
    opt_in_on_cpu: str | None = None
    """Run on CPU only when named in ``--providers``, for this reason."""
    is_baseline: bool = False

    def setup(self, inputs: CaseInputs, mode: str) -> Call:
        return self.build(inputs, mode)


# ---- modules: the project's layers, nn.BatchNorm2d, torch.compile ---------------------------

def _load_state(module: nn.Module, inputs: CaseInputs, family: str) -> nn.Module:
    with torch.no_grad():
        module.weight.copy_(inputs.weight)
        module.bias.copy_(inputs.bias)
        module.running_mean.copy_(inputs.running_mean)
        module.running_var.copy_(inputs.running_var)
        module.num_batches_tracked.fill_(STEPS_BEFORE)
        if family == "dbn":
            module.dbn_mean.copy_(inputs.dbn_mean)
            module.dbn_std.copy_(inputs.dbn_std)
    return module


def _buffers(module: nn.Module, family: str) -> Outputs:
    names = ("running_mean", "running_var") + (("dbn_mean", "dbn_std") if family == "dbn" else ())
    return {name: getattr(module, name) for name in names}


def _module_call(module: nn.Module, forward: Callable, inputs: CaseInputs, mode: str,
                 family: str) -> Call:
    """One call of ``forward`` (the module, a composition holding it or a compiled wrapper) in
    ``mode``. With the add-relu epilogue ``forward`` takes ``(x, residual)`` and the backward also
    returns the residual's gradient as ``dresidual``."""
    x, dy = inputs.x, inputs.dy
    params = (module.weight, module.bias)
    residual = inputs.residual if inputs.epilogue == "add-relu" else None

    def run(x, residual):
        return forward(x) if residual is None else forward(x, residual)

    if mode == "eval-fwd":
        module.eval()

        def call():
            with torch.no_grad():
                return {"y": run(x, residual)}
        return call

    if mode == "train-fwd":
        def call():
            return {"y": run(x, residual), **_buffers(module, family)}
        return call

    x = x.detach().requires_grad_()
    wrt = (x, *params)
    if residual is not None:
        residual = residual.detach().requires_grad_()
        wrt += (residual,)

    def grads(y, **kwargs) -> Outputs:
        out = torch.autograd.grad(y, wrt, dy, **kwargs)
        named = {"dx": out[0], "dw": out[1], "db": out[2]}
        if residual is not None:
            named["dresidual"] = out[3]
        return named

    if mode == "bwd":
        # The forward runs once here; each timed call is the backward alone over the same graph.
        y = run(x, residual)

        def call():
            return grads(y, retain_graph=True)
        return call

    def call():  # fwd-bwd
        y = run(x, residual)
        return {"y": y, **grads(y), **_buffers(module, family)}
    return call


class _Unfused(nn.Module):
    """``relu(norm(x))`` or ``relu(norm(x) + residual)`` as a user writes it today: the norm, then
    separate element-wise ops (the composition ``torch`` and ``torch-compile`` time)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        y = self.norm(x)
        if residual is not None:
            y = y + residual
        return torch.relu(y)


def _project(backend: str, family: str) -> Provider:
    def unavailable(device: torch.device) -> str | None:
        if backend == "triton" and device.type != "cuda":
            # Under TRITON_INTERPRET=1 the kernels run on CPU, but the interpreter's speed says
            # nothing about the kernels': never time it.
            return "the Triton kernels need a GPU (the Triton interpreter on CPU is not timed)"
        reason = backends.unavailable_reason(backend, device.type)
        if reason is not None and device.type != "cuda" and not torch.cuda.is_available():
            reason += " (no GPU on this machine)"
        return reason

    def build(inputs: CaseInputs, mode: str) -> Call:
        C = inputs.shape.channels
        # The epilogue is fused: the layer's own kernels apply the ReLU (and add the residual).
        activation = None if inputs.epilogue == "none" else "relu"
        if family == "dbn":
            module = DiminishingBatchNorm2d(C, eps=EPS, momentum=MOMENTUM, alpha=ALPHA,
                                            backend=backend, device=inputs.device,
                                            activation=activation)
        else:
            module = BatchNorm2d(C, eps=EPS, momentum=MOMENTUM, backend=backend,
                                 device=inputs.device, activation=activation)
        _load_state(module, inputs, family)
        return _module_call(module, module, inputs, mode, family)

    kind = "DiminishingBatchNorm2d(alpha=0.25)" if family == "dbn" else "BatchNorm2d"
    return Provider(name=f"{backend}-{family}", family=family,
                    description=f"dbn_kernels.{kind}, backend={backend!r}",
                    unavailable=unavailable, build=build,
                    implementation=lambda call, device: backend)


def _torch_batch_norm(inputs: CaseInputs) -> nn.BatchNorm2d:
    """PyTorch's own layer holding the case's parameters and statistics."""
    module = nn.BatchNorm2d(inputs.shape.channels, eps=EPS, momentum=MOMENTUM,
                            device=inputs.device)
    _load_state(module, inputs, "bn")
    return module


def _always_available(device: torch.device) -> str | None:
    return None


def _torch_eager() -> Provider:
    def build(inputs: CaseInputs, mode: str) -> Call:
        module = _torch_batch_norm(inputs)
        forward = module if inputs.epilogue == "none" else _Unfused(module)
        return _module_call(module, forward, inputs, mode, "bn")

    return Provider(name="torch", family="bn", description="torch.nn.BatchNorm2d, eager",
                    unavailable=_always_available, build=build,
                    implementation=dispatched_implementation, is_baseline=True)


def dispatched_implementation(call: Call, device: torch.device) -> str:
    """Which batch-norm implementation PyTorch ran for one call, from the profiler's op names.

    cuDNN only exists for CUDA tensors: on CPU PyTorch always runs its native kernels. On CUDA
    PyTorch picks cuDNN when ``torch.backends.cudnn.enabled`` and the input meets cuDNN's rules
    (see ``_select_batch_norm_backend`` in ATen's Normalization.cpp), else its native kernels; the
    profiler records ``aten::cudnn_batch_norm`` (and ``..._backward``) when cuDNN ran.
    """
    if device.type != "cuda":
        return "native"
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            call()
        torch.cuda.synchronize(device)
        names = {event.name for event in prof.events()}
    if any("cudnn_batch_norm" in name for name in names):
        return "cudnn"
    if any("miopen_batch_norm" in name for name in names):
        return "miopen"
    if any("batch_norm" in name for name in names):
        return "native"
    return "unknown"


def _compile_unavailable(device: torch.device) -> str | None:
    try:
        from torch._dynamo.eval_frame import is_dynamo_supported
    except ImportError:
        return "torch._dynamo is missing from this torch build"
    if not is_dynamo_supported():
        return "torch.compile does not support this Python or platform"
    return None


def _torch_compile() -> Provider:
    def build(inputs: CaseInputs, mode: str) -> Call:
        module = _torch_batch_norm(inputs)
        if mode == "eval-fwd":
            module.eval()
        # With an epilogue: the same unfused composition as provider torch, which Inductor fuses.
        target = module if inputs.epilogue == "none" else _Unfused(module)
        # A fresh cache per case: otherwise the recompile limit would, after a few shapes, make
        # torch.compile fall back to eager without saying so.
        torch._dynamo.reset()
        compiled = torch.compile(target, fullgraph=True, dynamic=False)
        return _module_call(module, compiled, inputs, mode, "bn")

    return Provider(name="torch-compile", family="bn",
                    description="torch.compile(nn.BatchNorm2d [+ epilogue], fullgraph=True, "
                                "dynamic=False)",
                    unavailable=_compile_unavailable, build=build,
                    implementation=lambda call, device: "inductor",
                    opt_in_on_cpu="on CPU torch.compile spends seconds per shape and mode in the "
                                  "C++ compiler; name it in --providers to include it")


# ---- cuDNN, called directly ------------------------------------------------------------------

def _cudnn_unavailable(device: torch.device) -> str | None:
    if device.type != "cuda":
        suffix = "" if torch.cuda.is_available() else " (no GPU on this machine)"
        return f"cuDNN needs a CUDA tensor{suffix}"
    if not torch.backends.cudnn.is_available():
        return "this torch build has no cuDNN"
    return None


def _cudnn() -> Provider:
    cudnn_forward = torch.ops.aten.cudnn_batch_norm
    cudnn_backward = torch.ops.aten.cudnn_batch_norm_backward

    def build(inputs: CaseInputs, mode: str) -> Call:
        if inputs.epilogue != "none":
            raise Unsupported(f"cuDNN's batch norm here has no fused activation or residual "
                              f"(epilogue {inputs.epilogue})")
        x, dy, weight, bias = inputs.x, inputs.dy, inputs.weight, inputs.bias
        running_mean = inputs.running_mean.clone()
        running_var = inputs.running_var.clone()
        if x.dtype == torch.bfloat16:
            # cuDNN's batch norm takes float32 parameters with float16 input only; bfloat16
            # input needs bfloat16 ones (a model cast with .to(torch.bfloat16)). The (C,)
            # vectors are a negligible part of the bytes moved. cuDNN 9.19 on an H200 still
            # answered NOT_SUPPORTED for every bfloat16 case: there, PyTorch's own kernels
            # (provider torch) are the bfloat16 baseline.
            weight, bias, running_mean, running_var = (
                t.to(x.dtype) for t in (weight, bias, running_mean, running_var))
        training = mode != "eval-fwd"

        def forward():
            return cudnn_forward(x, weight, bias, running_mean, running_var, training,
                                 MOMENTUM, EPS)

        def backward(saved):
            _, save_mean, save_var, reserve = saved
            return cudnn_backward(x, dy, weight, running_mean, running_var, save_mean, save_var,
                                  EPS, reserve)

        # cuDNN signals a case it does not support by raising: try one call on scratch buffers
        # and report the case as skipped rather than failed.
        try:
            saved = cudnn_forward(x, weight, bias, running_mean.clone(), running_var.clone(),
                                  training, MOMENTUM, EPS)
            if mode in ("bwd", "fwd-bwd"):
                backward(saved)
        except RuntimeError as exc:
            raise Unsupported(f"cuDNN rejected the case: {str(exc).splitlines()[0]}") from exc

        if mode == "eval-fwd":
            return lambda: {"y": forward()[0]}
        if mode == "train-fwd":
            return lambda: {"y": forward()[0], "running_mean": running_mean,
                            "running_var": running_var}
        if mode == "bwd":
            saved = forward()  # once, outside the timed calls

            def call():
                dx, dw, db = backward(saved)
                return {"dx": dx, "dw": dw, "db": db}
            return call

        def call():  # fwd-bwd
            saved = forward()
            dx, dw, db = backward(saved)
            return {"y": saved[0], "dx": dx, "dw": dw, "db": db,
                    "running_mean": running_mean, "running_var": running_var}
        return call

    return Provider(name="cudnn", family="bn",
                    description="torch.ops.aten.cudnn_batch_norm / cudnn_batch_norm_backward",
                    unavailable=_cudnn_unavailable, build=build,
                    implementation=lambda call, device: "cudnn", is_baseline=True)


# ---- the registry ----------------------------------------------------------------------------

def all_providers() -> list[Provider]:
    """Every provider, the project's first, in the order the table lists them."""
    project = [_project(backend, family) for backend in backends.BACKENDS
               for family in ("bn", "dbn")]
    return [*project, _torch_eager(), _cudnn(), _torch_compile()]


def provider_names() -> list[str]:
    return [p.name for p in all_providers()]


@dataclass
class Selection:
    runnable: list[Provider]
    skipped: list[tuple[str, str]]
    """(provider name, reason) for every provider that will not run at all."""


def select(requested: list[str] | None, device: torch.device) -> Selection:
    """The providers to run on ``device``: ``requested`` names (default: all), minus those that
    cannot run there, which are listed with the reason rather than dropped."""
    providers = {p.name: p for p in all_providers()}
    if requested:
        unknown = [name for name in requested if name not in providers]
        if unknown:
            raise ValueError(f"unknown provider(s) {', '.join(unknown)}; "
                             f"choose from {', '.join(providers)}")
    names = [name for name in providers if not requested or name in requested]
    runnable, skipped = [], []
    for name in names:
        provider = providers[name]
        reason = provider.unavailable(device)
        if reason is None and device.type == "cpu" and provider.opt_in_on_cpu and not requested:
            reason = provider.opt_in_on_cpu
        if reason is None:
            runnable.append(provider)
        else:
            skipped.append((name, reason))
    return Selection(runnable, skipped)
