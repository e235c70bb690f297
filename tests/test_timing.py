"""The GPU timer's device-time mode, run on CPU with CUDA's events and spin kernel replaced by
recorders: what is queued before each sample, in which order, and how long the spin lasts."""

import time

import pytest
import torch

from dbn_kernels.benchmark import timing
from dbn_kernels.benchmark.timing import Timer, TimerSettings


CYCLES_PER_MS = 1.98e6  # a 1.98 GHz SM clock, as an H200's


class FakeCuda:
    """Records the order of the queued operations; events read a device clock that advances by
    what the fake kernels cost."""

    def __init__(self):
        self.log = []
        self.now = 0.0  # device ms

    def event(self, enable_timing=True):
        fake = self

        class Event:
            def record(self):
                fake.log.append("start" if not hasattr(self, "t") and
                                fake.log[-1:] != ["call"] else "end")
                self.t = fake.now

            def elapsed_time(self, other):
                return other.t - self.t

            def synchronize(self):
                pass

        return Event()

    def sleep(self, cycles):
        self.log.append(("spin", cycles))
        self.now += cycles / CYCLES_PER_MS


@pytest.fixture
def fake_gpu_timer(monkeypatch):
    fake = FakeCuda()
    monkeypatch.setattr(torch.cuda, "Event", fake.event)
    monkeypatch.setattr(torch.cuda, "_sleep", fake.sleep)
    timer = Timer(torch.device("cpu"),
                  TimerSettings(warmup_ms=0.0, budget_ms=5.0, min_reps=4, max_reps=4,
                                min_warmup_calls=1, hide_host=True))
    timer.is_cuda = True  # the CUDA code path, on the fakes
    timer.flush_buffer = torch.empty(16, dtype=torch.int8)
    monkeypatch.setattr(timer, "sync", lambda: None)
    return timer, fake


def test_device_time_hides_the_hosts_issue_behind_a_long_enough_spin(fake_gpu_timer):
    timer, fake = fake_gpu_timer

    def call():  # 2 ms of host work, 0.25 ms of device work
        time.sleep(0.002)
        fake.log.append("call")
        fake.now += 0.25

    result = timer.time(call)
    # the spin lasts longer than the host needed to issue the call, within the cap
    assert 2.0 * timing.HIDE_MARGIN < timer.spin_ms <= timing.HIDE_MAX_MS
    # the spin kernel's clock was measured, and each sample queues flush, spin, start, call, end
    assert timer._spin_rate == pytest.approx(CYCLES_PER_MS)
    sample = [("spin", int(timer.spin_ms * CYCLES_PER_MS)), "start", "call", "end"]
    assert fake.log[-4 * len(sample):] == sample * 4
    # the events bracket the call only: the device time, not the spin or the host's
    assert result.median_ms == pytest.approx(0.25)


def test_eager_time_queues_no_spin(fake_gpu_timer):
    timer, fake = fake_gpu_timer
    timer.settings.hide_host = False

    def call():
        fake.log.append("call")
        fake.now += 0.25

    result = timer.time(call)
    assert timer.spin_ms == 0.0
    assert not any(isinstance(entry, tuple) for entry in fake.log)
    assert result.median_ms == pytest.approx(0.25)
    assert "eager time" in timer.method and "device time" not in timer.method


def test_gpu_kernel_benchmark_times_the_device_and_the_training_step_eagerly():
    from dbn_kernels.benchmark.e2e import GPU_STEP_SETTINGS

    assert timing.GPU_SETTINGS.hide_host
    assert not GPU_STEP_SETTINGS.hide_host


def test_a_broken_spin_falls_back_to_eager_time_and_says_so(fake_gpu_timer, monkeypatch):
    timer, fake = fake_gpu_timer

    def no_sleep(cycles):
        raise RuntimeError("no spin kernel here")

    monkeypatch.setattr(torch.cuda, "_sleep", no_sleep)

    def call():
        fake.log.append("call")
        fake.now += 0.25

    result = timer.time(call)
    assert result.median_ms == pytest.approx(0.25)
    assert timer.spin_ms == 0.0 and not timer.settings.hide_host
    assert "eager time" in timer.method and "no spin kernel here" in timer.method
