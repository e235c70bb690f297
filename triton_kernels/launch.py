"""Launch planning shared by every Triton kernel of the backend.

Every heuristic lives here, in plain Python, so that tuning on a GPU means editing one file:

* how an input is viewed: a logical ``(N, C, S)`` tensor in one of two layouts, *NCS*
  (contiguous ``N, C, *S``: each (n, c) plane of S values is contiguous) or *NSC* (channels_last,
  and every ``(N, C)`` input: memory ``(M, C)`` with ``M = N*S`` rows of C contiguous channels);
* the tile shapes of the reduction kernels (``collect_stats``, ``backward_reduce``), of the
  element-wise kernels (``normalize``, ``eval_normalize``, ``backward_dx``) and of the finalizes;
* how many splits of M the reductions use, so that a small C still fills the GPU.

The contiguous dimension of memory is always the last (vectorised) dimension of a tile.

On a small layer the host work of a call decides its speed, so each plan, and an input's
geometry, is computed once and cached: all are pure functions of their arguments (a geometry of
the shape and strides, a plan of the geometry, the element size, the device's program target and
the ``TUNING`` in force, which is part of every key so that changing it takes effect).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os

import torch


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


EMULATE_RTNE = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""Read when the kernels are decorated, like Triton does: see ``tiling.store_rounded``."""

# Offsets are int32 unless a tensor could reach 2**31 elements; masked lanes of the last tile may
# point up to one tile past the end, hence the margin.
_INT32_LIMIT = 2**31 - 1 - 2**24


@dataclasses.dataclass(frozen=True)
class Geometry:
    """A dense input viewed as (N, C, S), with how its memory is ordered."""

    N: int
    C: int
    S: int
    channels_last: bool
    """Memory (N, S, C): channels contiguous. Otherwise (N, C, S): spatial positions contiguous."""

    @property
    def M(self) -> int:
        return self.N * self.S

    @property
    def numel(self) -> int:
        return self.N * self.C * self.S

    @property
    def int64(self) -> bool:
        return self.numel > _INT32_LIMIT

    @property
    def inner(self) -> int:
        """Length of the contiguous runs of memory."""
        return self.C if self.channels_last else self.S

    @property
    def align(self) -> int:
        """Largest power of two (at most 16) dividing the inner extent: an alignment hint that
        lets rows start on vector boundaries even when Triton's own divisibility-by-16
        specialisation does not apply (e.g. 14x14 = 196 spatial positions)."""
        inner = self.inner
        return min(16, inner & -inner) if inner > 0 else 1


def geometry(x: torch.Tensor) -> Geometry | None:
    """The (N, C, S) view of ``x`` if its memory is dense in one of the two supported orders."""
    return _geometry(tuple(x.shape), x.stride())


def _row_major(shape, strides) -> bool:
    """``Tensor.is_contiguous()`` from shape and strides: dense row-major memory, where the
    strides of size-1 dimensions do not matter and an empty tensor is always contiguous."""
    if 0 in shape:
        return True
    expected = 1
    for size, stride in zip(reversed(shape), reversed(strides)):
        if size != 1:
            if stride != expected:
                return False
            expected *= size
    return True


@functools.lru_cache(maxsize=1024)
def _geometry(shape: tuple[int, ...], strides: tuple[int, ...]) -> Geometry | None:
    N, C = shape[0], shape[1]
    S = math.prod(shape[2:])
    ncs = _row_major(shape, strides)
    # channels moved innermost: memory (N, *S, C)
    nsc = _row_major((N, *shape[2:], C), (strides[0], *strides[2:], strides[1]))
    if nsc and (S == 1 or not ncs):
        return Geometry(N, C, S, True)
    if ncs:
        return Geometry(N, C, S, False)
    return None


def needs_reference(x: torch.Tensor) -> bool:
    """Inputs the reference backend computes instead: float64 (the kernels accumulate in
    float32) and empty tensors (the layers never pass them; nothing to launch)."""
    return x.dtype == torch.float64 or x.numel() == 0


def kernel_input(x: torch.Tensor) -> tuple[torch.Tensor, Geometry]:
    """``x`` as the kernels read it: unchanged for the two dense orders, else a dense copy.

    The copy is ``empty_like`` (the memory format the ops' fake implementations promise for the
    output), or a contiguous one for dense tensors in an unusual dimension order."""
    geo = geometry(x)
    if geo is None:
        x = torch.empty_like(x).copy_(x)
        geo = geometry(x)
        if geo is None:
            x = x.contiguous()
            geo = geometry(x)
    return x, geo


def as_promised(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out`` (computed on ``kernel_input(x)``) with the strides of ``empty_like(x)``, which the
    ops' fake implementations promise; differs only when ``x`` took the copying fallback."""
    expected = torch.empty_like(x)
    if expected.stride() == out.stride():
        return out
    return expected.copy_(out)


def same_layout(t: torch.Tensor, like: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """``t`` (shaped like ``like``) in ``like``'s memory order, copying only when it differs."""
    g = geometry(t)
    if g is not None and g.channels_last == geo.channels_last:
        return t
    return torch.empty_like(like).copy_(t)


# ---- tuning ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Tuning:
    """The knobs. Defaults are educated guesses for H100/H200 (memory-bound kernels: enough bytes
    in flight per SM, 16-byte accesses); they have not been measured yet."""

    elementwise_tile_bytes: int = 16384
    """Bytes of input per element-wise program (4096 fp32 or 8192 fp16/bf16 values)."""
    reduce_tile: int = 2048
    """Values per reduction tile: eight per thread of 8 warps, each with three fp32 accumulators
    in collect_stats (about 60 registers, so several programs fit on an SM)."""
    reduce_min_even_bytes: int = 64
    """NCS reductions use tiles of S's largest power-of-two divisor when rows of that
    many bytes are still worth reading (3136 = 64*49 positions: 64), so that no tile is partial;
    else one masked tile spans the plane (49 or 196 positions)."""
    reduce_row_bytes: int = 256
    """NSC reductions: bytes of one tile row (64 fp32 or 128 fp16 channels)."""
    unaligned_elementwise_tile: int = 2048
    """Values per element-wise program when rows cannot be read with 16-byte vectors."""
    elementwise_max_block_c: int = 256
    """NSC element-wise tiles: channels per tile at most."""
    finalize_tile: int = 2048
    """Values (splits x channels) per finalize step."""
    finalize_max_splits: int = 256
    """Splits merged per finalize step (the rest in further steps, in order)."""
    programs_per_sm: int = 4
    """Reduction programs per SM: about one resident wave of 8-warp programs."""
    interpreter_programs: int = 4
    """Reduction programs under TRITON_INTERPRET (CPU): few, but more than one split."""
    max_warps: int = 8


TUNING = Tuning()


def _warps(tile: int, t: Tuning) -> int:
    """One warp per 256 values, between 1 and ``max_warps``."""
    return max(1, min(t.max_warps, _pow2(tile) // 256))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """How many programs a reduction should spread over to fill the device."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _sm_count(index) * TUNING.programs_per_sm
    return TUNING.interpreter_programs


@dataclasses.dataclass(frozen=True)
class ReducePlan:
    """Grid (channel blocks, splits) for collect_stats / backward_reduce.

    Per channel block the reduction runs over ``tiles`` tiles of ``block_r`` values per channel:
    NSC, tile t covers rows [t*block_r, (t+1)*block_r); NCS, tile t is sample
    ``t // s_blocks``, positions ``(t % s_blocks) * block_r + [0, block_r)``. Split j takes tiles
    [j*tiles_per_split, (j+1)*tiles_per_split): every split is non-empty.
    """

    block_c: int
    block_r: int
    c_blocks: int
    s_blocks: int
    tiles: int
    full_tiles: int
    """Tiles [0, full_tiles) have no masked positions (collect_stats' fast loop)."""
    tiles_per_split: int
    splits: int
    num_warps: int

    @property
    def grid(self) -> tuple[int, int]:
        return (self.c_blocks, self.splits)


def reduce_plan(geo: Geometry, elem_size: int, device: torch.device) -> ReducePlan:
    return _reduce_plan(geo, elem_size, target_programs(device), TUNING)


@functools.lru_cache(maxsize=1024)
def _reduce_plan(geo: Geometry, elem_size: int, programs: int, t: Tuning) -> ReducePlan:
    if geo.channels_last:
        block_c = min(_pow2(geo.C), max(1, t.reduce_row_bytes // elem_size))
        block_r = max(1, min(_pow2(geo.M), t.reduce_tile // block_c))
        s_blocks = 1
        tiles = _cdiv(geo.M, block_r)
        full_tiles = geo.M // block_r
    else:
        even = geo.S & -geo.S  # the largest power of two dividing S
        if even * elem_size >= t.reduce_min_even_bytes:
            block_r = min(even, t.reduce_tile)  # divides S: every tile is full
        else:
            block_r = min(_pow2(geo.S), t.reduce_tile)
        block_c = max(1, min(_pow2(geo.C), t.reduce_tile // block_r))
        s_blocks = _cdiv(geo.S, block_r)
        tiles = geo.N * s_blocks
        full_tiles = tiles if geo.S % block_r == 0 else 0
    c_blocks = _cdiv(geo.C, block_c)
    splits_wanted = max(1, programs // c_blocks)
    tiles_per_split = _cdiv(tiles, min(tiles, splits_wanted))
    splits = _cdiv(tiles, tiles_per_split)
    return ReducePlan(block_c=block_c, block_r=block_r, c_blocks=c_blocks, s_blocks=s_blocks,
                      tiles=tiles, full_tiles=full_tiles, tiles_per_split=tiles_per_split,
                      splits=splits,
                      num_warps=_warps(block_c * block_r, t))


@dataclasses.dataclass(frozen=True)
class ElementwisePlan:
    """A 1-D grid over tiles [block_a, block_b]; ``block_b`` runs along contiguous memory.

    NSC: a = rows of M, b = channels. NCS: a = (n, c) planes, b = positions.
    Program p takes tile (p // b_blocks, p % b_blocks), so neighbouring programs touch
    neighbouring memory (and no grid axis is limited to 65535).
    """

    extent_a: int
    block_a: int
    block_b: int
    b_blocks: int
    programs: int
    num_warps: int

    @property
    def grid(self) -> tuple[int]:
        return (self.programs,)


def elementwise_plan(geo: Geometry, elem_size: int) -> ElementwisePlan:
    return _elementwise_plan(geo, elem_size, TUNING)


@functools.lru_cache(maxsize=1024)
def _elementwise_plan(geo: Geometry, elem_size: int, t: Tuning) -> ElementwisePlan:
    tile = max(1, t.elementwise_tile_bytes // elem_size)
    if geo.align * elem_size < 16:
        # Rows that do not start on 16-byte boundaries (7x7 planes, odd C) load one value per
        # instruction, each with its own 64-bit address: smaller tiles keep registers, and so
        # resident warps, in check.
        tile = min(tile, t.unaligned_elementwise_tile)
    if geo.channels_last:
        extent_a, extent_b = geo.M, geo.C
        block_b = min(_pow2(extent_b), t.elementwise_max_block_c, tile)
    else:
        extent_a, extent_b = geo.N * geo.C, geo.S
        block_b = min(_pow2(extent_b), tile)
    block_a = max(1, min(_pow2(extent_a), tile // block_b))
    b_blocks = _cdiv(extent_b, block_b)
    programs = _cdiv(extent_a, block_a) * b_blocks
    return ElementwisePlan(extent_a=extent_a, block_a=block_a, block_b=block_b, b_blocks=b_blocks,
                           programs=programs, num_warps=_warps(block_a * block_b, t))


@dataclasses.dataclass(frozen=True)
class FinalizePlan:
    """One program per ``block_c`` channels, merging ``block_split`` splits per step, in order."""

    block_c: int
    block_split: int
    programs: int
    num_warps: int

    @property
    def grid(self) -> tuple[int]:
        return (self.programs,)


def finalize_plan(C: int, splits: int) -> FinalizePlan:
    return _finalize_plan(C, splits, TUNING)


@functools.lru_cache(maxsize=1024)
def _finalize_plan(C: int, splits: int, t: Tuning) -> FinalizePlan:
    block_split = min(_pow2(splits), t.finalize_max_splits)
    # Narrow channel blocks when there are many splits: the finalize is latency bound, so
    # several programs each reading a slice beat one program reading everything.
    block_c = max(1, min(_pow2(C), t.finalize_tile // block_split))
    return FinalizePlan(block_c=block_c, block_split=block_split, programs=_cdiv(C, block_c),
                        num_warps=_warps(block_c * block_split, t))


def device_guard(x: torch.Tensor):
    """Triton launches on the current device: make it x's (tensors on another GPU)."""
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()
