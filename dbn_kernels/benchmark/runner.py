"""Check, then time: one ``Row`` per (shape, dtype, layout, mode, provider).

For each case the inputs are drawn once (fresh random values per case) and the float64 expected
outputs computed once per family and mode. Each provider is set up, its first call compared with
the expected outputs, and only a provider that passes is timed; one that fails is reported as
failed with the error, never timed. A provider that cannot run the case is reported as skipped.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from .oracle import CaseInputs, compare, expected_outputs, make_inputs
from .providers import Provider, Unsupported
from .shapes import DTYPES, Shape, bytes_moved
from .timing import Timer, Timing

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

    @property
    def median_ms(self) -> float | None:
        return self.timing.median_ms if self.timing else None

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
        return (self.shape.dims, self.dtype, self.layout, self.mode)

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
            "status": self.status,
            "reason": self.reason,
            "impl": self.impl,
            "median_ms": timing.median_ms if timing else None,
            "p20_ms": timing.p20_ms if timing else None,
            "p80_ms": timing.p80_ms if timing else None,
            "reps": timing.reps if timing else None,
            "bytes": self.bytes,
            "gbps": self.gbps,
            "pct_copy": self.pct_copy,
            "speedup_vs_cudnn": self.speedup.get("cudnn"),
            "speedup_vs_torch": self.speedup.get("torch"),
            "max_rel_err": self.max_rel_err,
            "checked_output": self.checked_output,
        }


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def run_provider(provider: Provider, inputs: CaseInputs, mode: str,
                 expected: dict[str, torch.Tensor], timer: Timer, copy_gbps: float | None) -> Row:
    row = Row(provider=provider.name, family=provider.family, shape=inputs.shape,
              dtype=inputs.dtype_name, layout=inputs.layout, mode=mode, status="failed",
              bytes=bytes_moved(inputs.shape, inputs.dtype, mode), copy_gbps=copy_gbps)
    try:
        call = provider.setup(inputs, mode)
        outputs = call()
    except Unsupported as exc:
        row.status, row.reason = "skipped", str(exc)
        return row
    except Exception as exc:  # a provider's bug is a result to report, not a crash
        row.reason = f"error before timing: {_one_line(exc)}"
        return row
    check = compare(outputs, expected, inputs.dtype)
    row.max_rel_err, row.checked_output = check.max_rel_err, check.worst
    del outputs
    if not check.ok:
        row.reason = f"wrong result, not timed: {check.message}"
        return row
    try:
        row.impl = provider.implementation(call, inputs.device)
        row.timing = timer.time(call)
    except Exception as exc:
        row.reason = f"error while timing: {_one_line(exc)}"
        return row
    row.status = "ok"
    return row


def add_speedups(rows: list[Row]) -> None:
    """speed-up = baseline median / row median, on the same case; ``None`` without a baseline."""
    medians = {(row.case_key, row.provider): row.median_ms for row in rows if row.status == "ok"}
    for row in rows:
        for baseline in BASELINES:
            base = medians.get((row.case_key, baseline))
            row.speedup[baseline] = (base / row.median_ms
                                     if base is not None and row.median_ms else None)


def run_benchmark(shapes: Iterable[Shape], dtypes: list[str], layouts: list[str],
                  modes: list[str], providers: list[Provider], device: torch.device,
                  timer: Timer, copy_gbps: float | None = None,
                  progress: Callable[[str], None] | None = None) -> list[Row]:
    rows: list[Row] = []
    seed = 0
    for shape in shapes:
        for dtype_name in dtypes:
            for layout in layouts:
                seed += 1
                inputs = make_inputs(shape, DTYPES[dtype_name], layout, device, seed)
                for mode in modes:
                    expected = {}
                    for provider in providers:
                        if progress:
                            progress(f"{shape.label} {dtype_name} {layout} {mode} "
                                     f"{provider.name}")
                        if provider.family not in expected:
                            expected[provider.family] = expected_outputs(
                                inputs, provider.family, mode)
                        rows.append(run_provider(provider, inputs, mode,
                                                 expected[provider.family], timer, copy_gbps))
                    del expected
                del inputs
                if device.type == "cuda":
                    # Large cases: hand freed memory back before the next case's inputs.
                    gc.collect()
                    torch.cuda.empty_cache()
    add_speedups(rows)
    return rows
