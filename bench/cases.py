"""The inputs of one benchmark case and the float64 answers every provider is checked against.

A case is a shape, a dtype, a layout and an epilogue (what follows the norm: nothing, ReLU, or a
residual add then ReLU; see ``shapes.EPILOGUES``). Its inputs are random (never zeros, which hide unwritten
outputs and can run faster than real data) with a different mean and spread per channel. The
expected outputs come from the project's reference backend run in float64 on the very values the
providers see (the input rounded to its dtype, then widened), the project's oracle. An epilogue is applied to that float64 output (y = relu(y0 + residual)),
and the backward then starts from the masked dy (dy where the float64 y > 0, else 0), which is
also the expected gradient of the residual.

Both families start from the same state: the plain batch-norm ("bn") providers use the running
statistics; the Diminishing ("dbn") providers also start from averaged statistics and a step
counter of ``STEPS_BEFORE``, so their first timed step is k = 10 with a_k = ``ALPHA``, not the
k = 1 step that is plain batch norm.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .. import reference  # noqa: F401  (defines the dbn::reference_* ops)
from ..ops import op
from .shapes import DTYPES, EPILOGUES, Shape, memory_format

EPS = 1e-5
MOMENTUM = 0.1
ALPHA = 0.25
STEPS_BEFORE = 9

FAMILIES = ("bn", "dbn")

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}
"""Largest ‖out - ref‖ / ‖ref‖ accepted before a provider is timed: a gate against wrong results
(float32 rounding lands near 1e-7, bf16 and fp16 rounding of the output near 2e-3 and 3e-4); the
test suite holds the project's kernels to tighter bounds."""


@dataclass
class CaseInputs:
    """One case's tensors on the benchmark device. Parameters and buffers are float32 whatever the
    input dtype, as in mixed-precision training (cuDNN requires it for half inputs)."""

    shape: Shape
    dtype: torch.dtype
    layout: str
    x: torch.Tensor
    dy: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    dbn_mean: torch.Tensor
    dbn_std: torch.Tensor
    residual: torch.Tensor | None = None
    """x's dtype and layout; added before the ReLU with ``epilogue="add-relu"``."""
    epilogue: str = "none"
    """``none``, ``relu`` or ``add-relu``: ``with_epilogue`` gives the same tensors with another."""

    def with_epilogue(self, epilogue: str) -> "CaseInputs":
        if epilogue not in EPILOGUES:
            raise ValueError(f"unknown epilogue {epilogue!r}; choose from {', '.join(EPILOGUES)}")
        return replace(self, epilogue=epilogue)

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def dtype_name(self) -> str:
        return next(name for name, dtype in DTYPES.items() if dtype == self.dtype)


def make_inputs(shape: Shape, dtype: torch.dtype, layout: str, device: torch.device,
                seed: int) -> CaseInputs:
    gen = torch.Generator(device=device).manual_seed(seed)
    C = shape.channels
    fmt = memory_format(layout)

    def randn(*size):
        return torch.randn(*size, generator=gen, device=device)

    def uniform(low, high, size):
        return low + (high - low) * torch.rand(size, generator=gen, device=device)

    per_channel = (1, C, 1, 1)
    x = randn(*shape.dims) * uniform(0.5, 2.0, per_channel) + 2.0 * randn(*per_channel)
    inputs = CaseInputs(
        shape=shape, dtype=dtype, layout=layout,
        x=x.to(dtype).contiguous(memory_format=fmt),
        dy=randn(*shape.dims).to(dtype).contiguous(memory_format=fmt),
        weight=uniform(0.5, 1.5, (C,)),
        bias=0.5 * randn(C),
        running_mean=randn(C),
        running_var=uniform(0.5, 2.0, (C,)),
        dbn_mean=randn(C),
        dbn_std=uniform(0.5, 2.0, (C,)),
    )
    # Drawn last, so the other tensors are those of a case without it. Centred on zero, so
    # relu(y + residual) masks about half the values.
    inputs.residual = randn(*shape.dims).to(dtype).contiguous(memory_format=fmt)
    return inputs


def expected_outputs(inputs: CaseInputs, family: str, mode: str) -> dict[str, torch.Tensor]:
    """What a correct provider of ``family`` returns for one call in ``mode`` from the initial
    state, in float64, with ``inputs.epilogue`` applied. Keys: y, running_mean, running_var,
    dbn_mean, dbn_std, dx, dw, db, and dresidual for the add-relu epilogue's backward."""
    f64 = torch.float64
    epilogue = inputs.epilogue
    residual = inputs.residual if epilogue == "add-relu" else None
    if epilogue == "add-relu" and residual is None:
        raise ValueError("the add-relu epilogue needs inputs.residual")

    def apply_epilogue(y0):
        if epilogue == "none":
            return y0
        return torch.relu(y0 if residual is None else y0 + residual.detach().to(f64))

    def wide(t):
        return t.detach().to(f64)

    x, dy, weight, bias = wide(inputs.x), wide(inputs.dy), wide(inputs.weight), wide(inputs.bias)
    running_mean, running_var = wide(inputs.running_mean), wide(inputs.running_var)
    dbn_mean = wide(inputs.dbn_mean) if family == "dbn" else None
    dbn_std = wide(inputs.dbn_std) if family == "dbn" else None

    if mode == "eval-fwd":
        if family == "dbn":
            y, _ = op("reference", "eval_forward")(x, weight, bias, dbn_mean, dbn_std, EPS, True)
        else:
            y, _ = op("reference", "eval_forward")(x, weight, bias, running_mean, running_var,
                                                   EPS, False)
        return {"y": apply_epilogue(y)}

    counter = torch.tensor(STEPS_BEFORE, dtype=torch.long, device=inputs.device)
    schedule = (ALPHA, 0.0, 0.0) if family == "dbn" else (1.0, 0.0, 0.0)
    y, mean, invstd, batch_mean, batch_invstd, alpha = op("reference", "train_forward")(
        x, weight, bias, running_mean, running_var, dbn_mean, dbn_std, counter, MOMENTUM, EPS,
        *schedule)
    y = apply_epilogue(y)
    forward = {"y": y, "running_mean": running_mean, "running_var": running_var}
    if family == "dbn":
        forward.update(dbn_mean=dbn_mean, dbn_std=dbn_std)
    if mode == "train-fwd":
        return forward

    if epilogue != "none":
        dy = torch.where(y > 0, dy, torch.zeros_like(dy))
    dx, dw, db, _ = op("reference", "backward")(dy, x, weight, mean, invstd, batch_mean,
                                             batch_invstd, alpha, True, True)
    backward = {"dx": dx, "dw": dw, "db": db}
    if residual is not None:
        backward["dresidual"] = dy
    return backward if mode == "bwd" else {**forward, **backward}


@dataclass
class CheckResult:
    ok: bool
    max_rel_err: float
    worst: str
    """The output with the largest error (or the one missing / not finite)."""
    message: str = ""


def compare(outputs: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
            dtype: torch.dtype) -> CheckResult:
    """Every expected output present, finite and within ``TOLERANCE[dtype]`` (relative norm)."""
    tolerance = TOLERANCE[dtype]
    worst, worst_err = "", 0.0
    for name, ref in expected.items():
        out = outputs.get(name)
        if out is None:
            return CheckResult(False, float("inf"), name, f"{name} was not returned")
        if tuple(out.shape) != tuple(ref.shape):
            return CheckResult(False, float("inf"), name,
                               f"{name} has shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
        out = out.detach().to(torch.float64)
        if not bool(torch.isfinite(out).all()):
            return CheckResult(False, float("inf"), name, f"{name} has NaN or Inf")
        err = float(torch.linalg.vector_norm(out - ref) /
                    torch.linalg.vector_norm(ref).clamp_min(1e-300))
        if err >= worst_err:
            worst, worst_err = name, err
    if worst_err > tolerance:
        return CheckResult(False, worst_err, worst,
                           f"{worst} off by {worst_err:.1e} (relative), tolerance {tolerance:.0e}")
    return CheckResult(True, worst_err, worst)
