"""Merging a stack of per-channel partial results, in one fixed order.

A stack is a dense ``(P, 3, C)`` float32 tensor: source p's rows are (count, mean, M2) for the
forward statistics, (count, sum dy, sum dy * (x - mean)) for backward's sums. The sources are the
splits of one reduction launch, or whole inputs (another process's batch, for multi-GPU
statistics). Sources merge in ascending p, ``BLOCK_SPLIT`` at a time with a fixed tree within a
step, so two runs agree bit for bit whatever the scheduling.

The finalize kernels merge their stack themselves; ``merge_kernel`` collapses a stack into one
source, for the passes that hand their statistics to the caller (``batch_stats``,
``backward_reduce``).
"""

import torch
import triton
import triton.language as tl

from .launch import device_guard, finalize_plan
from .tiling import merge_lanes, merge_pair


@triton.jit
def load_sources(stack_ptr, j0, sources, C, c, keep, BLOCK_SPLIT: tl.constexpr):
    """Rows (count, first, second) of sources [j0, j0 + BLOCK_SPLIT) for channels ``c``, each
    [BLOCK_SPLIT, BLOCK_C]; sources past the end read as empty (count 0)."""
    j = j0 + tl.arange(0, BLOCK_SPLIT)
    mask = (j < sources)[:, None] & keep[None, :]
    offs = j[:, None] * (3 * C) + c[None, :]
    return (tl.load(stack_ptr + offs, mask=mask, other=0.0),
            tl.load(stack_ptr + C + offs, mask=mask, other=0.0),
            tl.load(stack_ptr + 2 * C + offs, mask=mask, other=0.0))


@triton.jit
def merge_stats(stack_ptr, sources, C, c, keep, BLOCK_SPLIT: tl.constexpr):
    """(mean, M2, count) of channels ``c`` over every source of a statistics stack (Chan)."""
    mean = tl.zeros(c.shape, tl.float32)
    m2 = tl.zeros(c.shape, tl.float32)
    n = tl.zeros(c.shape, tl.float32)
    for j0 in range(0, sources, BLOCK_SPLIT):
        part_n, part_mean, part_m2 = load_sources(stack_ptr, j0, sources, C, c, keep, BLOCK_SPLIT)
        b_mean, b_m2, b_n = merge_lanes(part_mean, part_m2, part_n, 0)
        mean, m2, n = merge_pair(mean, m2, n, b_mean, b_m2, b_n)
    return mean, m2, n


@triton.jit
def sum_sums(stack_ptr, sources, C, c, keep, BLOCK_SPLIT: tl.constexpr):
    """(count, sum dy, sum dy * (x - mean)) of channels ``c`` over every source of a sums stack."""
    n = tl.zeros(c.shape, tl.float32)
    sum_dy = tl.zeros(c.shape, tl.float32)
    sum_dy_xc = tl.zeros(c.shape, tl.float32)
    for j0 in range(0, sources, BLOCK_SPLIT):
        part_n, part_dy, part_dy_xc = load_sources(stack_ptr, j0, sources, C, c, keep,
                                                   BLOCK_SPLIT)
        n += tl.sum(part_n, 0)
        sum_dy += tl.sum(part_dy, 0)
        sum_dy_xc += tl.sum(part_dy_xc, 0)
    return n, sum_dy, sum_dy_xc


@triton.jit
def merge_kernel(stack_ptr, sources, C, out_ptr, STATS: tl.constexpr, BLOCK_C: tl.constexpr,
                 BLOCK_SPLIT: tl.constexpr):
    """One source (3, C) from a stack: Chan's merge for statistics (``STATS``), else sums."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = c < C
    if STATS:
        mean, m2, n = merge_stats(stack_ptr, sources, C, c, keep, BLOCK_SPLIT)
        tl.store(out_ptr + c, n, mask=keep)
        tl.store(out_ptr + C + c, mean, mask=keep)
        tl.store(out_ptr + 2 * C + c, m2, mask=keep)
    else:
        n, sum_dy, sum_dy_xc = sum_sums(stack_ptr, sources, C, c, keep, BLOCK_SPLIT)
        tl.store(out_ptr + c, n, mask=keep)
        tl.store(out_ptr + C + c, sum_dy, mask=keep)
        tl.store(out_ptr + 2 * C + c, sum_dy_xc, mask=keep)


def merge(stack: torch.Tensor, stats: bool) -> torch.Tensor:
    """The (3, C) merge of a dense (P, 3, C) float32 stack."""
    sources, _, C = stack.shape
    fin = finalize_plan(C, sources)
    out = stack.new_empty((3, C))
    with device_guard(stack):
        merge_kernel[fin.grid](stack, sources, C, out, STATS=stats, BLOCK_C=fin.block_c,
                               BLOCK_SPLIT=fin.block_split, num_warps=fin.num_warps)
    return out
