"""Timing calls: warm-up, then the median of many samples, several providers interleaved.

On CUDA: every sample is one call bracketed by a
pair of CUDA events, and before each one a buffer several times the size of the L2 cache is
overwritten, so no sample finds its input in L2 from the last one (the same flush as
``triton.testing.do_bench``). All samples are queued before the host waits once. Two ways to
treat the host (``TimerSettings.hide_host``):

* device time (the kernel benchmark's default): a spin kernel queued after the flush keeps the
  GPU busy while the host issues the call, longer than the host was measured to need, so the
  call's kernels are all queued when the start event runs and the events see the GPU's time
  alone. On the first H200 run the host's issue of one forward + backward (260-290 us through
  the module and autograd, 30 us for cuDNN called directly) exceeded the kernels' time on most
  ResNet-50 shapes, and timings without the spin compared hosts, not kernels. The host's share
  is measured on its own (``python -m dbn_kernels.benchmark.host_overhead``) and end to end by
  the training step.
* eager time (the training step): no spin; the host runs ahead of the GPU where it can, and the
  events see launch gaps where it cannot keep up, as a user running eagerly would.

On CPU: ``time.perf_counter_ns`` around each sample, no cache flush. A call shorter than
``min_sample_ms`` (0.5 ms) is repeated back to back within one sample, and the sample divided by
the count, so that every sample is long against the clock's resolution and the timer's own cost
(thousands of ticks even of a coarse clock), yet short against the scheduler's time slice: on a
shared machine a sample that spans a preemption carries another process's slice. On a loaded
2-core machine, samples of 3 ms and more were hit so often that their p20-p80 exceeded 100% of
the median, while samples up to 1.5 ms stayed near 10%; 0.5 ms keeps every sample under 1 ms.
CPU numbers are for comparing the reference with PyTorch's CPU batch norm and for the smoke
test, not for judging kernels.

Several calls (the providers of one case) are timed in interleaved rounds: round r takes one
sample of each call in turn, A, B, C, then round r + 1 does the same. Whatever drifts during the
measurement (the load from other processes, the clock frequency, the temperature) then hits
every call alike, and ratios of their medians compare like with like.

The number of rounds follows a time budget per call, within [min_reps, max_reps]. A timing whose
p20-p80 is wider than ``NOISE_THRESHOLD`` of its median is flagged as noisy.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch

NOISE_THRESHOLD = 0.10
"""A timing is noisy when (p80 - p20) / median exceeds this: samples that scatter that widely
say the machine disturbed the measurement, and its median, or a ratio of it, may not repeat."""


def percentile(sorted_samples: list[float], q: float) -> float:
    """Linear interpolation between closest ranks, q in [0, 1]."""
    position = q * (len(sorted_samples) - 1)
    low, high = math.floor(position), math.ceil(position)
    weight = position - low
    return sorted_samples[low] * (1 - weight) + sorted_samples[high] * weight


@dataclass
class Timing:
    samples_ms: list[float]
    """Time per call of every sample, sorted."""
    calls_per_sample: int = 1

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

    @property
    def spread(self) -> float:
        """(p80 - p20) / median: how widely the middle 60% of the samples scatter."""
        return (self.p80_ms - self.p20_ms) / self.median_ms

    @property
    def noisy(self) -> bool:
        return self.spread > NOISE_THRESHOLD


@dataclass
class TimerSettings:
    warmup_ms: float
    """Warm-up time per call; when several calls are interleaved, each gets this much."""
    budget_ms: float
    """Measurement time per call, which sets the number of samples within [min_reps, max_reps]."""
    min_reps: int
    max_reps: int
    min_warmup_calls: int = 3
    min_sample_ms: float = 0.0
    """CPU only: shorter calls are repeated within one sample until it lasts this long (on a GPU
    each sample is one call, after its own cache flush)."""
    hide_host: bool = False
    """CUDA only: time the device alone, the host's issue of the call hidden behind a spin
    kernel (see the module docstring). The budget then counts each sample's wall time, spin
    included."""


GPU_SETTINGS = TimerSettings(warmup_ms=25.0, budget_ms=150.0, min_reps=10, max_reps=1000,
                             hide_host=True)

HIDE_MARGIN = 1.5
"""The spin lasts this many times the longest host issue time seen in calibration, plus
HIDE_EXTRA_MS, within HIDE_MAX_MS."""
HIDE_EXTRA_MS = 0.05
HIDE_MAX_MS = 20.0
CPU_SETTINGS = TimerSettings(warmup_ms=10.0, budget_ms=50.0, min_reps=10, max_reps=400,
                             min_sample_ms=0.5)


class CallFailed(Exception):
    """A call raised while warmed up or timed: ``name`` says which, ``error`` is what it raised."""

    def __init__(self, name: str, error: Exception) -> None:
        super().__init__(f"{name}: {error}")
        self.name, self.error = name, error


class Timer:
    """Times zero-argument callables on one device."""

    def __init__(self, device: torch.device, settings: TimerSettings | None = None,
                 clock: Callable[[], int] = time.perf_counter_ns) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"
        # A copy: callers adjust a timer's settings (--budget-ms) without changing the defaults.
        self.settings = replace(settings or (GPU_SETTINGS if self.is_cuda else CPU_SETTINGS))
        self.clock = clock
        """Host clock in ns: CPU samples and the warm-up's length (the tests pass a fake one)."""
        self.flush_buffer = None
        self.spin_ms = 0.0
        """The spin before each CUDA sample of the measurement under way (0: none)."""
        self._spin_rate: float | None = None  # spin-kernel cycles per ms, measured on first use
        self._flush_time: float | None = None  # ms of one L2 flush, measured on first use
        self._spin_failure: str | None = None  # "" once the spin kernel is known to work
        if self.is_cuda:
            l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
            self.flush_buffer = torch.empty(max(4 * l2_bytes, 256 * 2 ** 20), dtype=torch.int8,
                                            device=device)

    @property
    def method(self) -> str:
        settings = self.settings
        tail = (f"median of >= {settings.min_reps} samples after >= {settings.warmup_ms:g} ms "
                f"warm-up; noisy when (p80 - p20) / median > {NOISE_THRESHOLD:.0%}")
        if self.is_cuda:
            host = ("device time: the host's issue of each call hidden behind a spin kernel "
                    "queued before it" if settings.hide_host else
                    "eager time: host launch gaps included where the host falls behind")
            if self._spin_failure:
                host += f" (the spin kernel failed, {self._spin_failure})"
            return (f"CUDA events, {self.flush_buffer.numel() // 2 ** 20} MiB L2 flush before "
                    f"each sample, {host}, {tail}")
        return ("time.perf_counter_ns, a case's providers interleaved round by round, calls "
                f"under {settings.min_sample_ms:g} ms repeated within a sample (time per call "
                f"reported), no cache flush, {tail}")

    def sync(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], object]) -> Timing:
        try:
            return self.time_interleaved({"call": fn})["call"]
        except CallFailed as failure:
            raise failure.error from None

    def time_interleaved(self, calls: dict[str, Callable[[], object]]) -> dict[str, Timing]:
        """Times every call of ``calls`` in interleaved rounds (see the module docstring); the
        same number of samples for each. A call that raises stops the measurement with
        ``CallFailed`` naming it."""
        if not calls:
            return {}
        settings = self.settings
        self._warm_up(calls)
        single = {name: 1 for name in calls}
        self.spin_ms = 0.0
        if self.is_cuda and settings.hide_host and self._spin_works():
            self.spin_ms = self._spin_needed(calls)
        per_call_ms = {name: max(percentile(sorted(samples), 0.5), 1e-4)
                       for name, samples in self._rounds(calls, single, 3).items()}
        if self.spin_ms:
            # The budget counts wall time: a sample costs its spin and flush too.
            per_call_ms = {name: ms + self.spin_ms + self._flush_ms()
                           for name, ms in per_call_ms.items()}
        calls_per_sample = single
        if not self.is_cuda and settings.min_sample_ms > 0:
            calls_per_sample = {name: max(1, math.ceil(settings.min_sample_ms / ms))
                                for name, ms in per_call_ms.items()}
        rounds = settings.min_reps
        if settings.max_reps > settings.min_reps:
            # budget_ms for each call: as many rounds as fit in len(calls) budgets.
            round_ms = sum(per_call_ms[name] * calls_per_sample[name] for name in calls)
            rounds = int(min(settings.max_reps,
                             max(rounds, len(calls) * settings.budget_ms / round_ms)))
        samples = self._rounds(calls, calls_per_sample, rounds)
        return {name: Timing(samples[name], calls_per_sample[name]) for name in calls}

    def _warm_up(self, calls: dict[str, Callable[[], object]]) -> None:
        """Module loading, compilation, autotuning and allocator growth stay out of the samples."""
        settings = self.settings
        start, rounds, name = self.clock(), 0, ""
        try:
            while (rounds < settings.min_warmup_calls
                   or (self.clock() - start) / 1e6 < settings.warmup_ms * len(calls)):
                for name, fn in calls.items():
                    fn()
                rounds += 1
                if rounds % 8 == 0:
                    self.sync()  # keep the queue short so the wall clock tracks the GPU
            self.sync()
        except Exception as exc:
            raise CallFailed(name, exc) from exc

    def _rounds(self, calls: dict[str, Callable[[], object]], calls_per_sample: dict[str, int],
                rounds: int) -> dict[str, list[float]]:
        """``rounds`` interleaved rounds, one sample of each call per round: ms per call."""
        if self.is_cuda:
            return self._cuda_rounds(calls, rounds)
        clock, samples, name = self.clock, {name: [] for name in calls}, ""
        try:
            for _ in range(rounds):
                for name, fn in calls.items():
                    repeat = calls_per_sample[name]
                    start = clock()
                    for _ in range(repeat):
                        fn()
                    samples[name].append((clock() - start) / repeat / 1e6)
        except Exception as exc:
            raise CallFailed(name, exc) from exc
        return samples

    # ---- device time: the spin kernel ----------------------------------------------------------

    def _spin_needed(self, calls: dict[str, Callable[[], object]]) -> float:
        """How long the spin before each sample must last (ms): the host's issue time of each
        call (it does not depend on whether the GPU is busy: nothing on the timed paths waits for
        the device)."""
        longest = 0.0
        for name, fn in calls.items():
            for _ in range(3):
                start = time.perf_counter()
                try:
                    fn()
                except Exception as exc:
                    raise CallFailed(name, exc) from exc
                longest = max(longest, (time.perf_counter() - start) * 1e3)
                self.sync()
        return min(HIDE_MAX_MS, HIDE_MARGIN * longest + HIDE_EXTRA_MS)

    def _spin_works(self) -> bool:
        """Whether the spin kernel runs and keeps a plausible clock (0.1-10 GHz). If not, the
        timer falls back to eager time for good, and ``method`` says so."""
        if self._spin_failure is None:
            try:
                rate = self._cycles_per_ms()
                self._spin_failure = ("" if 1e5 <= rate <= 1e7 else
                                      f"its clock measured {rate:.3g} cycles/ms")
            except Exception as exc:  # a torch without torch.cuda._sleep, a driver error
                self._spin_failure = f"{type(exc).__name__}: {exc}"
            if self._spin_failure:
                self.settings.hide_host = False
        return not self._spin_failure

    def _spin(self, ms: float) -> None:
        """Queue a kernel that keeps the GPU busy for about ``ms``."""
        torch.cuda._sleep(max(1, int(ms * self._cycles_per_ms())))

    def _cycles_per_ms(self) -> float:
        """The spin kernel's clock, measured once per timer (GPU clocks vary by model)."""
        if self._spin_rate is None:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            cycles = 2_000_000
            torch.cuda._sleep(cycles)  # the first launch loads the kernel
            start.record()
            torch.cuda._sleep(cycles)
            end.record()
            end.synchronize()
            self._spin_rate = cycles / max(start.elapsed_time(end), 1e-3)
        return self._spin_rate

    def _flush_ms(self) -> float:
        """The L2 flush's own time, measured once per timer."""
        if self._flush_time is None:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.flush_buffer.zero_()
            start.record()
            self.flush_buffer.zero_()
            end.record()
            end.synchronize()
            self._flush_time = start.elapsed_time(end)
        return self._flush_time

    def _cuda_rounds(self, calls: dict[str, Callable[[], object]],
                     rounds: int) -> dict[str, list[float]]:
        """Every sample queued (flush, spin when hiding the host, start event, call, end event)
        before one synchronisation. An error the device reports at that synchronisation is
        charged to the last call queued (exact when one call is timed at a time, as the runner
        does on a GPU)."""
        events = {name: [(torch.cuda.Event(enable_timing=True),
                          torch.cuda.Event(enable_timing=True)) for _ in range(rounds)]
                  for name in calls}
        name = ""
        spin_ms = self.spin_ms
        try:
            for index in range(rounds):
                for name, fn in calls.items():
                    start, end = events[name][index]
                    self.flush_buffer.zero_()
                    if spin_ms:
                        self._spin(spin_ms)
                    start.record()
                    fn()
                    end.record()
            self.sync()
        except Exception as exc:
            raise CallFailed(name, exc) from exc
        return {name: [start.elapsed_time(end) for start, end in pairs]
                for name, pairs in events.items()}


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
