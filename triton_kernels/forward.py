"""Forward kernels and their launchers: the passes ``batch_stats``, ``finalize`` and ``normalize``,
the fused ``train_forward`` they compose, and ``eval_forward``.

Training step, three launches and no host synchronisation:

1. ``collect_stats_kernel``: grid (channel blocks, splits of M). Each lane keeps a Welford state
   (count, mean, M2) over the tiles of its split; the lanes are merged (Chan) and each program
   writes one source of the (splits, 3, C) statistics stack. Program (0, 0) also increments
   ``num_batches_tracked``.
2. ``finalize_kernel``: one program per channel block merges a statistics stack in source order
   (the splits of step 1, or whatever stack the caller gives the ``finalize`` pass), computes a_k
   from the counter, applies every buffer update and writes the saved tensors and the
   per-channel (center, scale, shift) = (mu_k, gamma / sig_k, beta).
3. ``normalize_kernel``: y = (x - center) * scale + shift, a subtract and an FMA per element,
   and the fused epilogue (``+ residual``, ReLU) before the one rounding into x's dtype: the
   residual costs one more read in this pass, not a pass of its own.

The ``batch_stats`` pass adds one launch, ``merge_kernel``, which collapses the splits into the
single (3, C) source it returns. Evaluation is one launch, ``eval_normalize_kernel``, which
derives (center, scale, shift) from the stored statistics inside each tile.

The element-wise passes are centered rather than folded into ``x * scale + (shift - center *
scale)``: the folded constant is ~|mu/sigma| in size, and its rounding (|mu/sigma| * 2**-24) would
be the output's error when |mean| >> std. ``x - center`` is exact when the two are close.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dbn_kernels import reference

from .launch import (EMULATE_RTNE, as_promised, device_guard, elementwise_plan, finalize_plan,
                     kernel_input, needs_reference, reduce_plan, same_layout)
from .merge import merge, merge_stats
from .tiling import along_channels, elementwise_tile, lerp, merge_lanes, reduction_tile, store_rounded


@triton.jit
def collect_stats_kernel(x_ptr, stack_ptr, counter_ptr, C, S, M, s_blocks, tiles, full_tiles,
                  tiles_per_split, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                  CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr, INT64: tl.constexpr,
                  BUMP_COUNTER: tl.constexpr):
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    if CHANNELS_LAST:
        mean = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        real_channel = (c < C)[None, :]
    else:
        mean = tl.zeros([BLOCK_C, BLOCK_R], tl.float32)
        real_channel = (c < C)[:, None]
    m2 = tl.zeros_like(mean)
    t_begin = split * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, tiles)
    # Tiles before full_tiles have a value in every lane: all lanes share one count, and the
    # Welford update costs one reciprocal per tile instead of a division per value (this loop
    # is what bounds the kernel's instruction rate for 16-bit inputs).
    t_full = tl.minimum(t_end, tl.maximum(full_tiles, t_begin))
    for t in range(t_begin, t_full):
        offs, mask = reduction_tile(c, t, C, S, M, s_blocks, BLOCK_R, CHANNELS_LAST, ALIGN, INT64)
        x = tl.load(x_ptr + offs, mask=real_channel, other=0.0).to(tl.float32)
        delta = x - mean
        mean += delta * (1.0 / (t - t_begin + 1).to(tl.float32))
        m2 += delta * (x - mean)
    count = tl.zeros_like(mean) + (t_full - t_begin).to(tl.float32)
    # Partial tiles (the end of M; planes whose length BLOCK_R does not divide): per-lane counts.
    for t in range(t_full, t_end):
        offs, mask = reduction_tile(c, t, C, S, M, s_blocks, BLOCK_R, CHANNELS_LAST, ALIGN, INT64)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        count += mask.to(tl.float32)
        delta = x - mean
        mean += tl.where(mask, delta / tl.maximum(count, 1.0), 0.0)
        m2 += tl.where(mask, delta * (x - mean), 0.0)
    if CHANNELS_LAST:
        mean, m2, count = merge_lanes(mean, m2, count, 0)
    else:
        mean, m2, count = merge_lanes(mean, m2, count, 1)
    keep = c < C
    out = stack_ptr + split * (3 * C) + c  # this split's source of the (splits, 3, C) stack
    tl.store(out, count, mask=keep)
    tl.store(out + C, mean, mask=keep)
    tl.store(out + 2 * C, m2, mask=keep)
    if BUMP_COUNTER:
        # The counter is bumped here rather than in finalize: finalize runs several programs that
        # all need k, and one of them writing it while others read would race. Nothing else in
        # this launch reads it, and finalize (a later launch) sees the new value.
        first = (pid_c == 0) & (split == 0)
        k = tl.load(counter_ptr, mask=first, other=0)
        tl.store(counter_ptr, k + 1, mask=first)


@triton.jit
def finalize_kernel(stack_ptr, sources, C, counter_ptr, dbn_mean_ptr, dbn_std_ptr,
                    running_mean_ptr, running_var_ptr, weight_ptr, bias_ptr, mean_ptr, invstd_ptr,
                    batch_mean_ptr, batch_invstd_ptr, alpha_ptr, coef_ptr, momentum, eps,
                    alpha_scale, alpha_power, alpha_offset,
                    HAS_COUNTER: tl.constexpr, HAS_DBN: tl.constexpr, HAS_RUNNING: tl.constexpr,
                    CUMULATIVE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                    NORMALIZE_WITH_BATCH: tl.constexpr, BLOCK_C: tl.constexpr,
                    BLOCK_SPLIT: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    pid = tl.program_id(0)
    c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = c < C
    mean, m2, n = merge_stats(stack_ptr, sources, C, c, keep, BLOCK_SPLIT)
    # n is the stack's total count, read on the device: another process's batch may be in it.
    n = tl.where(keep, n, 2.0)  # lanes past C: no 0 / 0 below
    var = m2 / n
    std = tl.sqrt_rn(var + eps)
    batch_invstd = 1.0 / std

    if HAS_COUNTER:
        k = tl.load(counter_ptr)
        kf = k.to(tl.float32)
    if HAS_DBN:
        # a_k = min(1, scale * (k + offset)^-power), and 1 at the first step.
        a = alpha_scale * tl.exp2(-alpha_power * tl.log2(kf + alpha_offset))
        a = tl.where(k <= 1, 1.0, tl.minimum(a, 1.0))
        old_mean = tl.load(dbn_mean_ptr + c, mask=keep, other=0.0).to(tl.float32)
        old_std = tl.load(dbn_std_ptr + c, mask=keep, other=1.0).to(tl.float32)
        if NORMALIZE_WITH_BATCH:
            # The averages are for evaluation only (dbn_std the inverse of the averaged inverse
            # std); the step is batch norm's, below, and so is its gradient (a = 1).
            store_rounded(dbn_mean_ptr + c, lerp(old_mean, mean, a), keep, EMULATE_RTNE)
            store_rounded(dbn_std_ptr + c, 1.0 / lerp(1.0 / old_std, batch_invstd, a), keep,
                          EMULATE_RTNE)
        else:
            mu = lerp(old_mean, mean, a)
            sigma = lerp(old_std, std, a)
            store_rounded(dbn_mean_ptr + c, mu, keep, EMULATE_RTNE)
            store_rounded(dbn_std_ptr + c, sigma, keep, EMULATE_RTNE)
            invstd = 1.0 / sigma
    if not HAS_DBN or NORMALIZE_WITH_BATCH:
        a = tl.full([], 1.0, tl.float32)
        mu = mean
        invstd = batch_invstd
    if HAS_RUNNING:
        if CUMULATIVE:
            f = 1.0 / kf
        else:
            f = momentum
        old_rm = tl.load(running_mean_ptr + c, mask=keep, other=0.0).to(tl.float32)
        old_rv = tl.load(running_var_ptr + c, mask=keep, other=1.0).to(tl.float32)
        new_rm = lerp(old_rm, mean, f)
        new_rv = lerp(old_rv, m2 / (n - 1.0), f)  # PyTorch's unbiased running variance
        store_rounded(running_mean_ptr + c, new_rm, keep, EMULATE_RTNE)
        store_rounded(running_var_ptr + c, new_rv, keep, EMULATE_RTNE)

    tl.store(mean_ptr + c, mu, mask=keep)
    tl.store(invstd_ptr + c, invstd, mask=keep)
    tl.store(batch_mean_ptr + c, mean, mask=keep)
    tl.store(batch_invstd_ptr + c, batch_invstd, mask=keep)
    tl.store(alpha_ptr, a, mask=pid == 0)

    # (center, scale, shift) for normalize: y = (x - mu) * (gamma / sig) + beta
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + c, mask=keep, other=1.0).to(tl.float32)
    if HAS_BIAS:
        shift = tl.load(bias_ptr + c, mask=keep, other=0.0).to(tl.float32)
    else:
        shift = tl.zeros([BLOCK_C], tl.float32)
    tl.store(coef_ptr + c, mu, mask=keep)
    tl.store(coef_ptr + C + c, scale, mask=keep)
    tl.store(coef_ptr + 2 * C + c, shift, mask=keep)


@triton.jit
def epilogue(y, residual_ptr, offs, mask, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr):
    """The fused epilogue relu?(y + residual?) on a float32 tile, before its one rounding. The
    residual is read with x's offsets (the launchers give it x's memory order)."""
    if HAS_RESIDUAL:
        y = y + tl.load(residual_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        # not tl.maximum: a NaN stays NaN, as with torch.relu
        y = tl.where(y < 0.0, 0.0, y)
    return y


@triton.jit
def normalize_kernel(x_ptr, y_ptr, coef_ptr, residual_ptr, C, S, extent_a, b_blocks,
              BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, CHANNELS_LAST: tl.constexpr,
              ALIGN: tl.constexpr, INT64: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
              RELU: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    offs, mask, chan, chan_mask, first = elementwise_tile(
        tl.program_id(0), C, S, extent_a, b_blocks, BLOCK_A, BLOCK_B, CHANNELS_LAST, ALIGN, INT64)
    # (center, scale, shift), rows of a (3, C) tensor: contiguous vector loads per tile
    center = along_channels(tl.load(coef_ptr + chan, mask=chan_mask, other=0.0), CHANNELS_LAST)
    scale = along_channels(tl.load(coef_ptr + C + chan, mask=chan_mask, other=0.0),
                           CHANNELS_LAST)
    shift = along_channels(tl.load(coef_ptr + 2 * C + chan, mask=chan_mask, other=0.0),
                           CHANNELS_LAST)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = epilogue((x - center) * scale + shift, residual_ptr, offs, mask, HAS_RESIDUAL, RELU)
    store_rounded(y_ptr + offs, y, mask, EMULATE_RTNE)


@triton.jit
def eval_normalize_kernel(x_ptr, y_ptr, mean_ptr, spread_ptr, weight_ptr, bias_ptr, invstd_ptr,
                   residual_ptr, eps, C, S, extent_a, b_blocks, BLOCK_A: tl.constexpr,
                   BLOCK_B: tl.constexpr, CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr,
                   INT64: tl.constexpr, SPREAD_IS_STD: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                   HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
                   EMULATE_RTNE: tl.constexpr):
    offs, mask, chan, chan_mask, first = elementwise_tile(
        tl.program_id(0), C, S, extent_a, b_blocks, BLOCK_A, BLOCK_B, CHANNELS_LAST, ALIGN, INT64)
    # A handful of per-channel values per tile: cheaper than a separate launch.
    mean = tl.load(mean_ptr + chan, mask=chan_mask, other=0.0).to(tl.float32)
    spread = tl.load(spread_ptr + chan, mask=chan_mask, other=1.0).to(tl.float32)
    if SPREAD_IS_STD:
        invstd = 1.0 / spread
    else:
        invstd = 1.0 / tl.sqrt_rn(spread + eps)
    tl.store(invstd_ptr + chan, invstd, mask=first)
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + chan, mask=chan_mask, other=1.0).to(tl.float32)
    center = along_channels(mean, CHANNELS_LAST)
    scale = along_channels(scale, CHANNELS_LAST)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # centered, not folded into x * scale - mean * scale (see the module's docstring)
    if HAS_BIAS:
        shift = tl.load(bias_ptr + chan, mask=chan_mask, other=0.0).to(tl.float32)
        y = (x - center) * scale + along_channels(shift, CHANNELS_LAST)
    else:
        y = (x - center) * scale
    y = epilogue(y, residual_ptr, offs, mask, HAS_RESIDUAL, RELU)
    store_rounded(y_ptr + offs, y, mask, EMULATE_RTNE)


# ---- launchers ---------------------------------------------------------------------------------

def _per_channel(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def _in_place_ok(*buffers) -> bool:
    """The kernels write buffers as dense (C,) vectors."""
    return all(b is None or b.is_contiguous() for b in buffers)


def _collect_stats(xk, geo, num_batches_tracked):
    """Launch 1: the (splits, 3, C) statistics stack of ``xk``, bumping the counter."""
    plan = reduce_plan(geo, xk.element_size(), xk.device)
    stack = torch.empty((plan.splits, 3, geo.C), dtype=torch.float32, device=xk.device)
    has_counter = num_batches_tracked is not None
    collect_stats_kernel[plan.grid](
        xk, stack, num_batches_tracked if has_counter else stack, geo.C, geo.S, geo.M,
        plan.s_blocks, plan.tiles, plan.full_tiles, plan.tiles_per_split,
        BLOCK_C=plan.block_c, BLOCK_R=plan.block_r, CHANNELS_LAST=geo.channels_last,
        ALIGN=geo.align, INT64=geo.int64, BUMP_COUNTER=has_counter, num_warps=plan.num_warps)
    return stack


def _finalize(stack, weight, bias, running_mean, running_var, dbn_mean, dbn_std,
              num_batches_tracked, momentum, eps, alpha_scale, alpha_power, alpha_offset,
              normalize_with_batch):
    """Launch 2: merge a dense (P, 3, C) stack; the saved tensors and the (3, C) coefficients."""
    sources, _, C = stack.shape
    weight, bias = _per_channel(weight), _per_channel(bias)
    has_counter = num_batches_tracked is not None
    has_dbn = dbn_mean is not None
    has_running = running_mean is not None
    f32 = {"dtype": torch.float32, "device": stack.device}
    mean, invstd, batch_mean, batch_invstd = (torch.empty(C, **f32) for _ in range(4))
    alpha = torch.empty((), **f32)
    coef = torch.empty((3, C), **f32)  # center, scale, shift
    unused = stack  # stands in for absent tensors; the kernel never touches it then
    fin = finalize_plan(C, sources)
    finalize_kernel[fin.grid](
        stack, sources, C, num_batches_tracked if has_counter else unused,
        dbn_mean if has_dbn else unused, dbn_std if has_dbn else unused,
        running_mean if has_running else unused, running_var if has_running else unused,
        unused if weight is None else weight, unused if bias is None else bias,
        mean, invstd, batch_mean, batch_invstd, alpha, coef,
        0.0 if momentum is None else float(momentum), float(eps), float(alpha_scale),
        float(alpha_power), float(alpha_offset),
        HAS_COUNTER=has_counter, HAS_DBN=has_dbn, HAS_RUNNING=has_running,
        CUMULATIVE=momentum is None, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        NORMALIZE_WITH_BATCH=has_dbn and normalize_with_batch,  # ignored without dbn_mean
        BLOCK_C=fin.block_c, BLOCK_SPLIT=fin.block_split,
        EMULATE_RTNE=EMULATE_RTNE, num_warps=fin.num_warps)
    return mean, invstd, batch_mean, batch_invstd, alpha, coef


def _residual(residual, xk, geo):
    """The residual as the element-wise kernels read it: with x's offsets, so another memory
    format (or an expanded tensor) is copied into x's order."""
    return None if residual is None else same_layout(residual, xk, geo)


def _normalize(xk, geo, coef, residual, relu):
    """Launch 3: y = relu?((x - center) * scale + shift + residual?), in ``xk``'s memory order
    (``residual`` already in it)."""
    ew = elementwise_plan(geo, xk.element_size())
    y = torch.empty_like(xk)
    normalize_kernel[ew.grid](
        xk, y, coef, y if residual is None else residual, geo.C, geo.S, ew.extent_a,
        ew.b_blocks, BLOCK_A=ew.block_a, BLOCK_B=ew.block_b, CHANNELS_LAST=geo.channels_last,
        ALIGN=geo.align, INT64=geo.int64, HAS_RESIDUAL=residual is not None, RELU=bool(relu),
        EMULATE_RTNE=EMULATE_RTNE, num_warps=ew.num_warps)
    return y


# ---- the passes --------------------------------------------------------------------------------

def batch_stats(x, num_batches_tracked):
    if needs_reference(x):
        return reference.batch_stats(x, num_batches_tracked)
    xk, geo = kernel_input(x)
    with device_guard(x):
        return merge(_collect_stats(xk, geo, num_batches_tracked), stats=True)


def finalize(stats, weight, bias, running_mean, running_var, dbn_mean, dbn_std,
             num_batches_tracked, momentum, eps, alpha_scale, alpha_power, alpha_offset, *,
             normalize_with_batch=False):
    if stats.dtype == torch.float64 or not _in_place_ok(running_mean, running_var, dbn_mean,
                                                        dbn_std):
        return reference.finalize(stats, weight, bias, running_mean, running_var, dbn_mean,
                                  dbn_std, num_batches_tracked, momentum, eps, alpha_scale,
                                  alpha_power, alpha_offset,
                                  normalize_with_batch=normalize_with_batch)
    with device_guard(stats):
        return _finalize(stats.contiguous(), weight, bias, running_mean, running_var, dbn_mean,
                         dbn_std, num_batches_tracked, momentum, eps, alpha_scale, alpha_power,
                         alpha_offset, normalize_with_batch)


def normalize(x, coef, residual=None, relu=False):
    if needs_reference(x):
        return reference.normalize(x, coef, residual, relu)
    xk, geo = kernel_input(x)
    residual = _residual(residual, xk, geo)
    with device_guard(x):
        y = _normalize(xk, geo, coef.to(torch.float32).contiguous(), residual, relu)
    return y if xk is x else as_promised(y, x)


# ---- fused compositions ------------------------------------------------------------------------

def train_forward(x, weight, bias, running_mean, running_var, dbn_mean, dbn_std,
                  num_batches_tracked, momentum, eps, alpha_scale, alpha_power, alpha_offset,
                  residual=None, relu=False, *, normalize_with_batch=False):
    """batch_stats -> finalize -> normalize, with the splits merged in finalize: 3 launches (the
    residual and the ReLU are normalize's epilogue)."""
    if needs_reference(x) or not _in_place_ok(running_mean, running_var, dbn_mean, dbn_std):
        # buffers that are not dense vectors are the reference's job too
        return reference.train_forward(x, weight, bias, running_mean, running_var, dbn_mean,
                                       dbn_std, num_batches_tracked, momentum, eps, alpha_scale,
                                       alpha_power, alpha_offset, residual, relu,
                                       normalize_with_batch=normalize_with_batch)
    if ((dbn_mean is not None or (running_mean is not None and momentum is None))
            and num_batches_tracked is None):
        raise ValueError("num_batches_tracked is required for DBN statistics or momentum=None")
    xk, geo = kernel_input(x)
    residual = _residual(residual, xk, geo)
    with device_guard(x):
        stack = _collect_stats(xk, geo, num_batches_tracked)
        mean, invstd, batch_mean, batch_invstd, alpha, coef = _finalize(
            stack, weight, bias, running_mean, running_var, dbn_mean, dbn_std,
            num_batches_tracked, momentum, eps, alpha_scale, alpha_power, alpha_offset,
            normalize_with_batch)
        y = _normalize(xk, geo, coef, residual, relu)
    if xk is not x:
        y = as_promised(y, x)
    return y, mean, invstd, batch_mean, batch_invstd, alpha


def eval_forward(x, weight, bias, mean, spread, eps, spread_is_std, residual=None, relu=False):
    if needs_reference(x):
        return reference.eval_forward(x, weight, bias, mean, spread, eps, spread_is_std,
                                      residual, relu)
    xk, geo = kernel_input(x)
    residual = _residual(residual, xk, geo)
    weight, bias = _per_channel(weight), _per_channel(bias)
    mean, spread = mean.contiguous(), spread.contiguous()
    ew = elementwise_plan(geo, xk.element_size())
    y = torch.empty_like(xk)
    invstd = torch.empty(geo.C, dtype=torch.float32, device=x.device)
    with device_guard(x):
        eval_normalize_kernel[ew.grid](
            xk, y, mean, spread, invstd if weight is None else weight,
            invstd if bias is None else bias, invstd, y if residual is None else residual,
            float(eps), geo.C, geo.S, ew.extent_a, ew.b_blocks, BLOCK_A=ew.block_a,
            BLOCK_B=ew.block_b, CHANNELS_LAST=geo.channels_last, ALIGN=geo.align,
            INT64=geo.int64, SPREAD_IS_STD=bool(spread_is_std), HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, RELU=bool(relu),
            EMULATE_RTNE=EMULATE_RTNE, num_warps=ew.num_warps)
    if xk is not x:
        y = as_promised(y, x)
    return y, invstd
