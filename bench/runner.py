"""Check, then time: one ``Row`` per (shape, dtype, layout, mode, epilogue, provider).

For each case the inputs are drawn once (fresh random values per case) and the float64 expected
outputs computed once per family and mode. Each provider is set up, its first call compared with
the expected outputs, and only a provider that passes is timed; one that fails is reported as
failed with the error, never timed. A provider that cannot run the case is reported as skipped.

How the checked providers of a case are timed depends on the device:

* on CPU, together, in interleaved rounds (``Timer.time_interleaved``): the machine is shared,
  and load or frequency drift during the case then hits every provider alike, so the speed-up
  columns compare like with like;
* on a GPU, one after another, each set up, checked and timed before the next is built: the
  device is the benchmark's alone, CUDA events measure device time and the L2 flush resets the
  cache before every sample, so there is little drift to share out, while holding every
  provider's modules, graphs and outputs at once would multiply the memory of the largest sweep
  shapes (512 MiB per tensor) by the number of providers.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from .cases import CaseInputs, compare, expected_outputs, make_inputs
from .providers import Call, Provider, Unsupported
from .shapes import DTYPES, Shape, bytes_moved
from .timing import CallFailed, Timer, Timing

BASELINES = ("cudnn", "torch")
"""The speed-up columns: each row's median against these providers' medians on the same case."""


@dataclass
class Row:
    provider: str
    family: str
    shape: Shape
    dtype: str
    layout: str
    mode: str
    status: str
    """``ok`` (checked and timed), ``failed`` (wrong result or error: not timed) or ``skipped``."""
    reason: str = ""
    impl: str = ""
    timing: Timing | None = None
    bytes: int = 0
    max_rel_err: float | None = None
    checked_output: str = ""
    copy_gbps: float | None = None
    speedup: dict[str, float | None] = field(default_factory=dict)
    epilogue: str = "none"
    """What follows the norm (``shapes.EPILOGUES``): part of the case."""
    noisy_speedup: dict[str, bool | None] = field(default_factory=dict)
    """Per baseline: this row or the baseline's row is noisy, so the speed-up is unreliable."""

    @property
    def median_ms(self) -> float | None:
        return self.timing.median_ms if self.timing else None

    @property
    def noisy(self) -> bool:
        return self.timing is not None and self.timing.noisy

    @property
    def gbps(self) -> float | None:
        if self.timing is None:
            return None
        return self.bytes / (self.timing.median_ms * 1e-3) / 1e9

    @property
    def pct_copy(self) -> float | None:
        if self.gbps is None or not self.copy_gbps:
            return None
        return 100.0 * self.gbps / self.copy_gbps

    @property
    def case_key(self) -> tuple:
        return (self.shape.dims, self.dtype, self.layout, self.mode, self.epilogue)

    def to_dict(self) -> dict:
        timing = self.timing
        return {
            "provider": self.provider,
            "family": self.family,
            "shape": list(self.shape.dims),
            "layers_with_shape": self.shape.count,
            "dtype": self.dtype,
            "layout": self.layout,
            "mode": self.mode,
            "epilogue": self.epilogue,
            "status": self.status,
            "reason": self.reason,
            "impl": self.impl,
            "median_ms": timing.median_ms if timing else None,
            "p20_ms": timing.p20_ms if timing else None,
            "p80_ms": timing.p80_ms if timing else None,
            "reps": timing.reps if timing else None,
            "calls_per_sample": timing.calls_per_sample if timing else None,
            "spread": timing.spread if timing else None,
            "noisy": self.noisy if timing else None,
            "bytes": self.bytes,
            "gbps": self.gbps,
            "pct_copy": self.pct_copy,
            "speedup_vs_cudnn": self.speedup.get("cudnn"),
            "speedup_vs_torch": self.speedup.get("torch"),
            "speedup_vs_cudnn_noisy": self.noisy_speedup.get("cudnn"),
            "speedup_vs_torch_noisy": self.noisy_speedup.get("torch"),
            "max_rel_err": self.max_rel_err,
            "checked_output": self.checked_output,
        }


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def check_provider(provider: Provider, inputs: CaseInputs, mode: str,
                   expected: dict[str, torch.Tensor], row: Row) -> Call | None:
    """Sets the provider up and checks its first call: the call to time, or ``None`` with the
    row marked skipped or failed."""
    try:
        call = provider.setup(inputs, mode)
        outputs = call()
    except Unsupported as exc:
        row.status, row.reason = "skipped", str(exc)
        return None
    except Exception as exc:  # a provider's bug is a result to report, not a crash
        row.reason = f"error before timing: {_one_line(exc)}"
        return None
    check = compare(outputs, expected, inputs.dtype)
    row.max_rel_err, row.checked_output = check.max_rel_err, check.worst
    del outputs
    if not check.ok:
        row.reason = f"wrong result, not timed: {check.message}"
        return None
    try:
        row.impl = provider.implementation(call, inputs.device)
    except Exception as exc:
        row.reason = f"error in the profiled call, not timed: {_one_line(exc)}"
        return None
    return call


def time_checked(calls: dict[str, Call], rows: dict[str, Row], timer: Timer) -> None:
    """Times ``calls`` (checked calls, by provider name) interleaved and fills in their rows. A
    call that raises while timed fails its own row; the others are timed again without it."""
    calls = dict(calls)
    while calls:
        try:
            timings = timer.time_interleaved(calls)
        except CallFailed as failure:
            rows[failure.name].reason = f"error while timing: {_one_line(failure.error)}"
            del calls[failure.name]
            continue
        for name, timing in timings.items():
            rows[name].timing, rows[name].status = timing, "ok"
        return


def run_case(providers: list[Provider], inputs: CaseInputs, mode: str, timer: Timer,
             copy_gbps: float | None,
             progress: Callable[[str], None] | None = None) -> list[Row]:
    """Every provider's row for one case and mode (see the module docstring for the order); the
    case's epilogue is ``inputs.epilogue``."""
    epilogue = inputs.epilogue
    rows = {provider.name: Row(provider=provider.name, family=provider.family,
                               shape=inputs.shape, dtype=inputs.dtype_name, layout=inputs.layout,
                               mode=mode, epilogue=epilogue, status="failed",
                               bytes=bytes_moved(inputs.shape, inputs.dtype, mode, epilogue),
                               copy_gbps=copy_gbps)
            for provider in providers}
    groups = [[provider] for provider in providers] if timer.is_cuda else [providers]
    expected: dict[str, dict[str, torch.Tensor]] = {}
    for group in groups:
        calls = {}
        for provider in group:
            if progress:
                label = mode if epilogue == "none" else f"{mode}+{epilogue}"
                progress(f"{inputs.shape.label} {inputs.dtype_name} {inputs.layout} {label} "
                         f"{provider.name}")
            if provider.family not in expected:
                expected[provider.family] = expected_outputs(inputs, provider.family, mode)
            call = check_provider(provider, inputs, mode, expected[provider.family],
                                  rows[provider.name])
            if call is not None:
                calls[provider.name] = call
        time_checked(calls, rows, timer)
        del calls  # a provider's modules and graphs go before the next group is built
    return list(rows.values())


def add_speedups(rows: list[Row]) -> None:
    """speed-up = baseline median / row median, on the same case; ``None`` without a baseline.
    A speed-up is marked noisy when either of its two timings is (the baseline's own 1.00x is
    exact whatever its noise)."""
    timed = {(row.case_key, row.provider): row for row in rows if row.status == "ok"}
    for row in rows:
        for baseline in BASELINES:
            base = timed.get((row.case_key, baseline))
            if base is None or not row.median_ms:
                row.speedup[baseline] = row.noisy_speedup[baseline] = None
                continue
            row.speedup[baseline] = base.median_ms / row.median_ms
            row.noisy_speedup[baseline] = base is not row and (base.noisy or row.noisy)


def run_benchmark(shapes: Iterable[Shape], dtypes: list[str], layouts: list[str],
                  modes: list[str], providers: list[Provider], device: torch.device,
                  timer: Timer, copy_gbps: float | None = None,
                  progress: Callable[[str], None] | None = None,
                  epilogues: Iterable[str] = ("none",)) -> list[Row]:
    epilogues = list(epilogues)
    rows: list[Row] = []
    seed = 0
    for shape in shapes:
        for dtype_name in dtypes:
            for layout in layouts:
                seed += 1
                inputs = make_inputs(shape, DTYPES[dtype_name], layout, device, seed)
                for mode in modes:
                    for epilogue in epilogues:
                        rows += run_case(providers, inputs.with_epilogue(epilogue), mode, timer,
                                         copy_gbps, progress)
                del inputs
                if device.type == "cuda":
                    # Large cases: hand freed memory back before the next case's inputs.
                    gc.collect()
                    torch.cuda.empty_cache()
    add_speedups(rows)
    return rows
