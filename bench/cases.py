"""The inputs of one benchmark case and the float64 answers every provider is checked against.

A case is a shape, a dtype and a layout. Its inputs are random (never zeros, which hide unwritten
outputs and can run faster than real data) with a different mean and spread per channel. The
expected outputs come from the project's reference backend run in float64 on the very values the
providers see (the input rounded to its dtype, then widened), the project's oracle.

Both families start from the same state: the plain batch-norm ("bn") providers use the running
statistics; the Diminishing ("dbn") providers also start from averaged statistics and a step
counter of ``STEPS_BEFORE``, so their first timed step is k = 10 with a_k = ``ALPHA``, not the
k = 1 step that is plain batch norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import reference  # noqa: F401  (defines the dbn::reference_* ops)
from ..ops import op
from .shapes import DTYPES, Shape, memory_format

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
    return CaseInputs(
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


def expected_outputs(inputs: CaseInputs, family: str, mode: str) -> dict[str, torch.Tensor]:
    """What a correct provider of ``family`` returns for one call in ``mode`` from the initial
    state, in float64. Keys: y, running_mean, running_var, dbn_mean, dbn_std, dx, dw, db."""
    f64 = torch.float64

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
        return {"y": y}

    counter = torch.tensor(STEPS_BEFORE, dtype=torch.long, device=inputs.device)
    schedule = (ALPHA, 0.0, 0.0) if family == "dbn" else (1.0, 0.0, 0.0)
    y, mean, invstd, batch_mean, batch_invstd, alpha = op("reference", "train_forward")(
        x, weight, bias, running_mean, running_var, dbn_mean, dbn_std, counter, MOMENTUM, EPS,
        *schedule)
    forward = {"y": y, "running_mean": running_mean, "running_var": running_var}
    if family == "dbn":
        forward.update(dbn_mean=dbn_mean, dbn_std=dbn_std)
    if mode == "train-fwd":
        return forward

    dx, dw, db, _ = op("reference", "backward")(dy, x, weight, mean, invstd, batch_mean,
                                             batch_invstd, alpha, True, True)
    backward = {"dx": dx, "dw": dw, "db": db}
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
