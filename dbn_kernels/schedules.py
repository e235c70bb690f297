"""Step-size schedules a_k for the DBN running average.

A schedule is three floats, ``a_k = min(1, scale / (k + offset) ** power)``, so every backend can
evaluate it on the device from ``num_batches_tracked`` without a host round trip: the layers stay
capturable in a CUDA graph and traceable by ``torch.compile``. A Python callable ``k -> float`` is
accepted as an escape hatch; it needs ``k`` on the host, so it synchronises and is not graph safe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Union

import torch

__all__ = ["Schedule", "HostSchedule", "inverse_power", "constant", "as_schedule"]


def _finite(name: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


@dataclass(frozen=True)
class Schedule:
    """``a_k = min(1, scale / (k + offset) ** power)`` for k >= 2; a_1 = 1 always."""

    scale: float
    power: float = 0.0
    offset: float = 0.0

    def __post_init__(self):
        scale = _finite("scale", self.scale)
        power = _finite("power", self.power)
        offset = _finite("offset", self.offset)
        if scale <= 0.0:
            raise ValueError(f"scale must be > 0 so that a_k lies in (0, 1], got {scale}")
        if power < 0.0:
            raise ValueError(f"power must be >= 0, got {power}")
        if 1.0 + offset <= 0.0:
            raise ValueError(f"offset must keep k + offset > 0 for every step k >= 1, got {offset}")
        if power == 0.0 and scale > 1.0:
            raise ValueError(f"alpha must lie in (0, 1], got {scale}")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "power", power)
        object.__setattr__(self, "offset", offset)

    @property
    def params(self) -> tuple[float, float, float]:
        """What the ops take: (alpha_scale, alpha_power, alpha_offset)."""
        return (self.scale, self.power, self.offset)

    def __call__(self, k: int) -> float:
        """a_k on the host, for documentation and tests; the kernels evaluate it on the device."""
        if k <= 1:
            return 1.0
        return min(1.0, self.scale / (k + self.offset) ** self.power)

    def __repr__(self) -> str:
        if self.power == 0.0:
            return f"constant({self.scale})"
        return f"inverse_power(power={self.power}, scale={self.scale}, offset={self.offset})"


@dataclass(frozen=True)
class HostSchedule:
    """A user callable ``k -> a_k`` evaluated on the host (reads ``num_batches_tracked``)."""

    fn: Callable[[int], float]

    def __post_init__(self):
        if not callable(self.fn):
            raise ValueError(f"alpha must be a float, a Schedule or a callable, got {self.fn!r}")

    def params_at(self, num_batches_tracked: torch.Tensor) -> tuple[float, float, float]:
        # The documented escape hatch: this reads the step counter on the host (a synchronisation
        # on CUDA and a graph break under torch.compile).
        k = int(num_batches_tracked) + 1
        if k == 1:
            return (1.0, 0.0, 0.0)  # a_1 = 1 by definition: the first step starts the average
        a = _finite("alpha(k)", self.fn(k))
        if not 0.0 < a <= 1.0:
            raise ValueError(f"alpha(k) must lie in (0, 1], got {a} at k={k}")
        return (a, 0.0, 0.0)


def constant(alpha: float) -> Schedule:
    """The constant schedule a_k = alpha (after the first step)."""
    alpha = _finite("alpha", alpha)
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
    return Schedule(scale=alpha)


def inverse_power(power: float = 1.0, scale: float = 1.0, offset: float = 0.0) -> Schedule:
    """``a_k = min(1, scale / (k + offset) ** power)``: 1/k, 1/k^2, 5/(10+k), ...

    The paper's convergence theorem wants a summable schedule (power > 1 for the averaged
    statistics to converge, power > 2 for its Theorem 11).
    """
    return Schedule(scale=scale, power=power, offset=offset)


AlphaLike = Union[float, int, Schedule, HostSchedule, Callable[[int], float]]


def as_schedule(alpha: AlphaLike) -> Schedule | HostSchedule:
    if isinstance(alpha, (Schedule, HostSchedule)):
        return alpha
    if isinstance(alpha, bool):
        raise ValueError(f"alpha must be a float in (0, 1], got {alpha!r}")
    if isinstance(alpha, (int, float)):
        return constant(alpha)
    if callable(alpha):
        return HostSchedule(alpha)
    raise ValueError(f"alpha must be a float, dbn_kernels.inverse_power(...) or a callable, got {alpha!r}")
