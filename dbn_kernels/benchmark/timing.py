"""Timing one call: warm-up, then the median of many repetitions.

On CUDA (the standard of the device README's METHOD.md): every repetition is bracketed by a pair
of CUDA events, and before each one a buffer several times the size of the L2 cache is
overwritten, so no repetition finds its input in L2 from the last one (the same flush as
``triton.testing.do_bench``). All repetitions are queued before the host waits once, so the host
runs ahead of the GPU and the events see the GPU's time, launch gaps included where the host
cannot keep up (as a user running eagerly would).

On CPU: ``time.perf_counter`` around each call, no cache flush; CPU numbers are for comparing the
reference with PyTorch's CPU batch norm and for the smoke test, not for judging kernels.

The number of repetitions follows a time budget per measurement, within [min_reps, max_reps].
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch


def percentile(sorted_samples: list[float], q: float) -> float:
    """Linear interpolation between closest ranks, q in [0, 1]."""
    position = q * (len(sorted_samples) - 1)
    low, high = math.floor(position), math.ceil(position)
    weight = position - low
    return sorted_samples[low] * (1 - weight) + sorted_samples[high] * weight


@dataclass
class Timing:
    samples_ms: list[float]

    def __post_init__(self):
        self.samples_ms = sorted(self.samples_ms)

    @property
    def reps(self) -> int:
        return len(self.samples_ms)

    @property
    def median_ms(self) -> float:
        return percentile(self.samples_ms, 0.5)

    @property
    def p20_ms(self) -> float:
        return percentile(self.samples_ms, 0.2)

    @property
    def p80_ms(self) -> float:
        return percentile(self.samples_ms, 0.8)


@dataclass
class TimerSettings:
    warmup_ms: float
    budget_ms: float
    min_reps: int
    max_reps: int
    min_warmup_calls: int = 3


GPU_SETTINGS = TimerSettings(warmup_ms=25.0, budget_ms=150.0, min_reps=10, max_reps=1000)
CPU_SETTINGS = TimerSettings(warmup_ms=5.0, budget_ms=20.0, min_reps=5, max_reps=200)


class Timer:
    """Times zero-argument callables on one device."""

    def __init__(self, device: torch.device, settings: TimerSettings | None = None) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.settings = settings or (GPU_SETTINGS if self.is_cuda else CPU_SETTINGS)
        self.flush_buffer = None
        if self.is_cuda:
            l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
            self.flush_buffer = torch.empty(max(4 * l2_bytes, 256 * 2 ** 20), dtype=torch.int8,
                                            device=device)

    @property
    def method(self) -> str:
        if self.is_cuda:
            return (f"CUDA events, {self.flush_buffer.numel() // 2 ** 20} MiB L2 flush before "
                    f"each rep, median of >= {self.settings.min_reps} reps after "
                    f">= {self.settings.warmup_ms:g} ms warm-up")
        return (f"time.perf_counter, no cache flush, median of >= {self.settings.min_reps} reps "
                f"after >= {self.settings.warmup_ms:g} ms warm-up")

    def sync(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], object]) -> Timing:
        settings = self.settings
        # Warm-up: module loading, compilation, autotuning and allocator growth stay out.
        start = time.perf_counter()
        calls = 0
        while (calls < settings.min_warmup_calls
               or (time.perf_counter() - start) * 1e3 < settings.warmup_ms):
            fn()
            calls += 1
            if calls % 8 == 0:
                self.sync()  # keep the queue short so the wall clock tracks the GPU
        self.sync()
        reps = settings.min_reps
        if settings.max_reps > settings.min_reps:
            per_call = max(sorted(self._samples(fn, 3))[1], 1e-4)
            reps = int(min(settings.max_reps, max(reps, settings.budget_ms / per_call)))
        return Timing(self._samples(fn, reps))

    def _samples(self, fn: Callable[[], object], reps: int) -> list[float]:
        if not self.is_cuda:
            samples = []
            for _ in range(reps):
                start = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - start) * 1e3)
            return samples
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for start, end in zip(starts, ends):
            self.flush_buffer.zero_()
            start.record()
            fn()
            end.record()
        self.sync()
        return [start.elapsed_time(end) for start, end in zip(starts, ends)]


@dataclass
class CopyBandwidth:
    gbps: float
    nbytes: int
    timing: Timing

    @property
    def description(self) -> str:
        return (f"{self.gbps:,.0f} GB/s (copy of {self.nbytes / 2 ** 20:,.0f} MiB, "
                "bytes read + written)")


def copy_bandwidth(timer: Timer) -> CopyBandwidth:
    """The device's practical memory bandwidth: a large device-to-device copy, counting the
    bytes read plus the bytes written (the same accounting as the byte model)."""
    if timer.is_cuda:
        l2_bytes = getattr(torch.cuda.get_device_properties(timer.device), "L2_cache_size", 0)
        nbytes = max(512 * 2 ** 20, 16 * l2_bytes)
    else:
        nbytes = 128 * 2 ** 20
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=timer.device).normal_()
    dst = torch.empty_like(src)
    timing = timer.time(lambda: dst.copy_(src))
    moved = 2 * nbytes
    return CopyBandwidth(gbps=moved / (timing.median_ms * 1e-3) / 1e9, nbytes=nbytes,
                         timing=timing)
