"""What is benchmarked: the shape suites, the modes, and the byte model.

Every GB/s figure of the benchmark comes from ``bytes_moved`` below, so the byte model lives here
once. It counts the *floor* traffic of the fused design, in units of the x-sized tensor:

    train-fwd  2 reads + 1 write   (statistics pass over x; normalise pass reading x, writing y)
    eval-fwd   1 read  + 1 write   (one element-wise pass with stored statistics)
    bwd        4 reads + 1 write   (reduction pass over dy and x; element-wise pass over dy and x
                                    writing dx)
    fwd-bwd    the sum: 6 reads + 2 writes

The fused epilogue (``--epilogue``: y = relu(norm(x)) or relu(norm(x) + residual), computed in the
norm's own kernels) adds to these floors, again in x-sized tensors:

    epilogue   train-fwd  eval-fwd  bwd        fwd-bwd
    none       +0         +0        +0         +0
    relu       +0         +0        +1R        +1R       (relu is free in the forward; the
                                                          backward reads y for the mask y > 0)
    add-relu   +1R        +1R       +1R +1W    +2R +1W   (the forward reads the residual; the
                                                          backward reads y, writes d_residual)

so fused add-relu fwd-bwd floors at 8 reads + 3 writes. The unfused compositions that providers
``torch`` and ``torch-compile`` time for an epilogue are charged these same fused floors (what
they move beyond them is their cost, as elsewhere).

Per-channel vectors (weight, bias, statistics: C values each) are left out; for the shapes here
they are under 0.1% of the traffic. Every provider is charged the same bytes whatever it actually
moves, so GB/s is "effective bandwidth" and the ratio of two providers' GB/s is the inverse ratio
of their times.
"""

from __future__ import annotations

import argparse
import itertools
from collections import Counter
from dataclasses import dataclass

import torch

MODES = {
    # mode: (x-sized reads, x-sized writes)
    "train-fwd": (2, 1),
    "eval-fwd": (1, 1),
    "bwd": (4, 1),
    "fwd-bwd": (6, 2),
}

EPILOGUES = {
    # epilogue: mode -> (extra x-sized reads, extra x-sized writes) over MODES
    "none": {mode: (0, 0) for mode in MODES},
    "relu": {"train-fwd": (0, 0), "eval-fwd": (0, 0), "bwd": (1, 0), "fwd-bwd": (1, 0)},
    "add-relu": {"train-fwd": (1, 0), "eval-fwd": (1, 0), "bwd": (1, 1), "fwd-bwd": (2, 1)},
}
"""What follows the norm: nothing, ``relu(y)`` or ``relu(y + residual)``."""

LAYOUTS = ("nchw", "nhwc")
"""``nhwc`` is PyTorch's channels_last memory format of an (N, C, H, W) tensor."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

SUITES = ("quick", "resnet50", "sweep")

DEFAULT_RESNET_BATCH = 64


@dataclass(frozen=True)
class Shape:
    """An (N, C, H, W) batch-norm input; ``count`` = how many layers of the suite's model have it."""

    dims: tuple[int, int, int, int]
    count: int = 1

    @property
    def numel(self) -> int:
        n, c, h, w = self.dims
        return n * c * h * w

    @property
    def channels(self) -> int:
        return self.dims[1]

    @property
    def label(self) -> str:
        return "x".join(str(d) for d in self.dims)


def traffic(mode: str, epilogue: str = "none") -> tuple[int, int]:
    """(x-sized reads, x-sized writes) of one call in ``mode`` with ``epilogue``."""
    reads, writes = MODES[mode]
    extra_reads, extra_writes = EPILOGUES[epilogue][mode]
    return reads + extra_reads, writes + extra_writes


def bytes_moved(shape: Shape, dtype: torch.dtype, mode: str, epilogue: str = "none") -> int:
    """The floor traffic of one call in ``mode`` with ``epilogue`` (see the module docstring)."""
    reads, writes = traffic(mode, epilogue)
    element_size = torch.empty((), dtype=dtype).element_size()
    return (reads + writes) * shape.numel * element_size


def memory_format(layout: str) -> torch.memory_format:
    return torch.channels_last if layout == "nhwc" else torch.contiguous_format


# ---- suites ---------------------------------------------------------------------------------

QUICK_SHAPES = ((8, 64, 16, 16), (16, 8, 32, 32), (4, 256, 4, 4))
"""Small enough that the CPU reference runs each in well under a millisecond: few channels with
many values each, a middle case, many channels with few values each."""

SWEEP_CHANNELS = (32, 128, 512, 2048)
SWEEP_SPATIAL = (7, 14, 28, 56, 112)
SWEEP_BATCHES = (16, 64, 256)
SWEEP_MAX_NUMEL = 2 ** 27
"""The sweep's grid, capped at 128 Mi elements (512 MiB in float32) per tensor."""


def resnet50_shapes(batch: int = DEFAULT_RESNET_BATCH, image_size: int = 224) -> list[Shape]:
    """Every batch-norm input shape of ResNet-50, in network order, with how often it occurs.

    Read off the project's ResNet-50 definition by running it on the meta device (no memory, no
    arithmetic), so the suite cannot drift from the model the end-to-end benchmark trains.
    """
    from .resnet import ResNet50

    with torch.device("meta"):
        model = ResNet50()
    seen: list[tuple[int, ...]] = []

    def record(module, inputs):
        seen.append(tuple(inputs[0].shape))

    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.register_forward_pre_hook(record)
    model(torch.empty(batch, 3, image_size, image_size, device="meta"))
    counts = Counter(seen)
    return [Shape(dims, counts[dims]) for dims in dict.fromkeys(seen)]


def suite_shapes(suite: str, batch: int | None = None) -> list[Shape]:
    """The shapes of ``suite``; ``batch`` replaces N (for ``sweep``: keeps only that N)."""
    if suite == "quick":
        dims = QUICK_SHAPES if batch is None else [(batch, *d[1:]) for d in QUICK_SHAPES]
        return [Shape(tuple(d)) for d in dims]
    if suite == "resnet50":
        return resnet50_shapes(DEFAULT_RESNET_BATCH if batch is None else batch)
    if suite == "sweep":
        batches = SWEEP_BATCHES if batch is None else (batch,)
        grid = [Shape((n, c, s, s)) for n, c, s in
                itertools.product(batches, SWEEP_CHANNELS, SWEEP_SPATIAL)]
        return sorted((s for s in grid if s.numel <= SWEEP_MAX_NUMEL), key=lambda s: s.numel)
    raise ValueError(f"unknown suite {suite!r}; choose one of {SUITES}")


def shape_list(text: str) -> list[tuple[int, int, int, int]]:
    """``"64x256x56x56,64x64x112x112"`` -> [(64, 256, 56, 56), (64, 64, 112, 112)].

    The ``type`` of dbn-bench's ``--shapes``: a malformed entry is a usage error naming it.
    """
    dims_list = []
    for entry in filter(None, (part.strip() for part in text.split(","))):
        try:
            dims = tuple(int(d) for d in entry.lower().split("x"))
        except ValueError:
            dims = ()
        if len(dims) != 4 or min(dims) < 1:
            raise argparse.ArgumentTypeError(
                f"{entry!r} is not NxCxHxW (four positive integers joined by 'x')")
        dims_list.append(dims)
    if not dims_list:
        raise argparse.ArgumentTypeError("no shape given")
    return dims_list


def select_shapes(suite: str, batch: int | None = None,
                  only: list[tuple[int, int, int, int]] | None = None) -> list[Shape]:
    """The suite's shapes or, given ``only``, exactly those, in that order.

    A shape of ``only`` that the suite also has keeps its layer count, so a subset of the ResNet-50
    suite still says how many layers each shape stands for; any other shape counts once.
    """
    shapes = suite_shapes(suite, batch)
    if only is None:
        return shapes
    counts = {shape.dims: shape.count for shape in shapes}
    return [Shape(dims, counts.get(dims, 1)) for dims in dict.fromkeys(only)]
