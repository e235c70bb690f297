"""Backward kernels and their launchers: the passes ``backward_reduce``, ``backward_finalize``
and ``backward_dx``, and the fused ``backward`` they compose:

    dx = gamma / sig_k * (dy - a_g * sum(dy) / n - a_g * xhat_B * sum(dy * xhat) / n)
       = A * dy + B * (x - m_B) + shift     per channel, a_g = a_k (or 0: grad_through_stats=False)

with A = gamma / sig_k, B = -A * a_g * sum(dy * xhat) / n / s_B, shift = -A * a_g * sum(dy) / n.
Centered on m_B rather than folded into B * x + (shift - B * m_B): the folded constant is
~B * |m_B| and its rounding (|m_B / s_B| * 2**-24 relative to A * dy) would be dx's error when
|mean| >> std.

1. ``backward_reduce_kernel``: grid (channel blocks, splits of M); per-lane sums of dy and
   dy * (x - mean); each program writes one source (count, sum dy, sum dy * (x - mean)) of the
   (splits, 3, C) sums stack.
2. ``backward_finalize_kernel``: one program per channel block adds a sums stack in source order,
   writes grad_weight = sum(dy * xhat) and grad_bias = sum(dy) and the dx coefficients: rows A,
   m_B, B, shift of a (4, C) tensor (A alone without gradient through the statistics).
3. ``backward_dx_kernel``: the element-wise pass; without gradient through the statistics
   dx = A * dy and x is not read at all.

The ``backward_reduce`` pass adds one launch, ``merge_kernel``, which adds the splits into the
single (3, C) source it returns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dbn_kernels import reference

from dbn_kernels.ops import dx_coef_rows

from .launch import (EMULATE_RTNE, as_promised, device_guard, elementwise_plan, finalize_plan,
                     kernel_input, needs_reference, reduce_plan, same_layout)
from .merge import merge, sum_sums
from .tiling import along_channels, elementwise_tile, reduction_tile, store_rounded


@triton.jit
def backward_reduce_kernel(dy_ptr, x_ptr, mean_ptr, stack_ptr, C, S, M, s_blocks, tiles,
                           tiles_per_split, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                           CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr,
                           INT64: tl.constexpr):
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = c < C
    mean = tl.load(mean_ptr + c, mask=keep, other=0.0).to(tl.float32)
    if CHANNELS_LAST:
        center = mean[None, :]
        sum_dy = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    else:
        center = mean[:, None]
        sum_dy = tl.zeros([BLOCK_C, BLOCK_R], tl.float32)
    # sum(dy * (x - mean)); invstd is applied once per channel in the finalize. Centered on the
    # saved mean, these terms are small and of both signs: plain per-lane sums, unlike the
    # forward's lane means, need no pivot (see tiling.merge_lanes).
    sum_dy_xc = tl.zeros_like(sum_dy)
    t_begin = split * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, tiles)
    # The values per channel this split covers, counted per tile from the geometry (a scalar
    # per tile, not a mask per value): the count row of the sums stack. Float32, like the
    # forward statistics' counts.
    count = tl.zeros([], tl.float32)
    for t in range(t_begin, t_end):
        offs, mask = reduction_tile(c, t, C, S, M, s_blocks, BLOCK_R, CHANNELS_LAST, ALIGN, INT64)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sum_dy += dy
        sum_dy_xc += dy * (x - center)
        if INT64:
            t = tl.zeros([], tl.int64) + t  # t * BLOCK_R may pass 2**31
        if CHANNELS_LAST:
            count += tl.minimum(M - t * BLOCK_R, BLOCK_R).to(tl.float32)
        else:
            count += tl.minimum(S - (t % s_blocks) * BLOCK_R, BLOCK_R).to(tl.float32)
    if CHANNELS_LAST:
        sum_dy_c = tl.sum(sum_dy, 0)
        sum_dy_xc_c = tl.sum(sum_dy_xc, 0)
    else:
        sum_dy_c = tl.sum(sum_dy, 1)
        sum_dy_xc_c = tl.sum(sum_dy_xc, 1)
    out = stack_ptr + split * (3 * C) + c  # this split's source of the (splits, 3, C) stack
    tl.store(out, tl.zeros_like(sum_dy_c) + count, mask=keep)
    tl.store(out + C, sum_dy_c, mask=keep)
    tl.store(out + 2 * C, sum_dy_xc_c, mask=keep)


@triton.jit
def backward_finalize_kernel(stack_ptr, sources, C, weight_ptr, invstd_ptr, batch_mean_ptr,
                             batch_invstd_ptr, alpha_ptr, grad_weight_ptr, grad_bias_ptr,
                             coef_ptr, HAS_WEIGHT: tl.constexpr, INPUT_GRAD: tl.constexpr,
                             GRAD_THROUGH_STATS: tl.constexpr, BLOCK_C: tl.constexpr,
                             BLOCK_SPLIT: tl.constexpr):
    pid = tl.program_id(0)
    c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = c < C
    # n: the stack's total count, read on the device (another process's batch may be in it)
    n, sum_dy, sum_dy_xc = sum_sums(stack_ptr, sources, C, c, keep, BLOCK_SPLIT)
    n = tl.where(keep, n, 1.0)  # lanes past C: no 0 / 0
    invstd = tl.load(invstd_ptr + c, mask=keep, other=0.0).to(tl.float32)
    sum_dy_xhat = sum_dy_xc * invstd
    tl.store(grad_weight_ptr + c, sum_dy_xhat, mask=keep)
    tl.store(grad_bias_ptr + c, sum_dy, mask=keep)
    if INPUT_GRAD:
        a = invstd
        if HAS_WEIGHT:
            a = a * tl.load(weight_ptr + c, mask=keep, other=1.0).to(tl.float32)
        tl.store(coef_ptr + c, a, mask=keep)
        if GRAD_THROUGH_STATS:
            alpha = tl.load(alpha_ptr).to(tl.float32)
            batch_mean = tl.load(batch_mean_ptr + c, mask=keep, other=0.0).to(tl.float32)
            batch_invstd = tl.load(batch_invstd_ptr + c, mask=keep, other=0.0).to(tl.float32)
            b = -a * alpha * sum_dy_xhat * batch_invstd / n
            shift = -a * alpha * sum_dy / n
            tl.store(coef_ptr + C + c, batch_mean, mask=keep)
            tl.store(coef_ptr + 2 * C + c, b, mask=keep)
            tl.store(coef_ptr + 3 * C + c, shift, mask=keep)


@triton.jit
def backward_dx_kernel(dy_ptr, x_ptr, dx_ptr, coef_ptr, C, S, extent_a, b_blocks,
                       BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                       ALIGN: tl.constexpr, INT64: tl.constexpr,
                       GRAD_THROUGH_STATS: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    offs, mask, chan, chan_mask, first = elementwise_tile(
        tl.program_id(0), C, S, extent_a, b_blocks, BLOCK_A, BLOCK_B, CHANNELS_LAST, ALIGN, INT64)
    a = along_channels(tl.load(coef_ptr + chan, mask=chan_mask, other=0.0), CHANNELS_LAST)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dx = a * dy
    if GRAD_THROUGH_STATS:
        # rows A, m_B, B, shift of the (4, C) coefficients: contiguous vector loads per tile
        center = along_channels(tl.load(coef_ptr + C + chan, mask=chan_mask, other=0.0),
                                CHANNELS_LAST)
        b = along_channels(tl.load(coef_ptr + 2 * C + chan, mask=chan_mask, other=0.0),
                           CHANNELS_LAST)
        shift = along_channels(tl.load(coef_ptr + 3 * C + chan, mask=chan_mask, other=0.0),
                               CHANNELS_LAST)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dx = dx + ((x - center) * b + shift)
    store_rounded(dx_ptr + offs, dx, mask, EMULATE_RTNE)


# ---- launchers ---------------------------------------------------------------------------------

def _reduce(dy, xk, geo, mean):
    """Launch 1: the (splits, 3, C) sums stack."""
    plan = reduce_plan(geo, xk.element_size(), xk.device)
    stack = torch.empty((plan.splits, 3, geo.C), dtype=torch.float32, device=xk.device)
    backward_reduce_kernel[plan.grid](
        dy, xk, mean.contiguous(), stack, geo.C, geo.S, geo.M, plan.s_blocks, plan.tiles,
        plan.tiles_per_split, BLOCK_C=plan.block_c, BLOCK_R=plan.block_r,
        CHANNELS_LAST=geo.channels_last, ALIGN=geo.align, INT64=geo.int64,
        num_warps=plan.num_warps)
    return stack


def _finalize(stack, weight, invstd, batch_mean, batch_invstd, alpha, grad_through_stats,
              input_grad):
    """Launch 2: add a dense (P, 3, C) stack; grad_weight, grad_bias, the dx coefficients."""
    sources, _, C = stack.shape
    f32 = {"dtype": torch.float32, "device": stack.device}
    weight = None if weight is None else weight.contiguous()
    grad_weight = torch.empty(C, **f32)
    grad_bias = torch.empty(C, **f32)
    coef = torch.empty((dx_coef_rows(grad_through_stats, input_grad), C), **f32)
    fin = finalize_plan(C, sources)
    backward_finalize_kernel[fin.grid](
        stack, sources, C, stack if weight is None else weight, invstd.contiguous(),
        batch_mean.contiguous(), batch_invstd.contiguous(), alpha, grad_weight, grad_bias,
        coef if input_grad else stack, HAS_WEIGHT=weight is not None,
        INPUT_GRAD=bool(input_grad), GRAD_THROUGH_STATS=bool(grad_through_stats),
        BLOCK_C=fin.block_c, BLOCK_SPLIT=fin.block_split, num_warps=fin.num_warps)
    return grad_weight, grad_bias, coef


def _dx(dy, xk, geo, coef):
    """Launch 3: dx from the (4, C) or (1, C) coefficients, in ``xk``'s memory order."""
    ew = elementwise_plan(geo, xk.element_size())
    grad_x = torch.empty_like(xk)
    backward_dx_kernel[ew.grid](
        dy, xk, grad_x, coef, geo.C, geo.S, ew.extent_a, ew.b_blocks, BLOCK_A=ew.block_a,
        BLOCK_B=ew.block_b, CHANNELS_LAST=geo.channels_last, ALIGN=geo.align,
        INT64=geo.int64, GRAD_THROUGH_STATS=coef.shape[0] == 4,
        EMULATE_RTNE=EMULATE_RTNE, num_warps=ew.num_warps)
    return grad_x


def _kernel_inputs(grad_y, x):
    """x as the kernels read it, its geometry, and dy in x's memory order: dy is read with x's
    offsets, so another memory format (or an expanded gradient) is copied."""
    xk, geo = kernel_input(x)
    return xk, geo, same_layout(grad_y, xk, geo)


# ---- the passes --------------------------------------------------------------------------------

def backward_reduce(grad_y, x, mean):
    if needs_reference(x):
        return reference.backward_reduce(grad_y, x, mean)
    xk, geo, dy = _kernel_inputs(grad_y, x)
    with device_guard(x):
        return merge(_reduce(dy, xk, geo, mean), stats=False)


def backward_finalize(sums, weight, invstd, batch_mean, batch_invstd, alpha, grad_through_stats,
                      input_grad):
    if sums.dtype == torch.float64:
        return reference.backward_finalize(sums, weight, invstd, batch_mean, batch_invstd, alpha,
                                           grad_through_stats, input_grad)
    with device_guard(sums):
        return _finalize(sums.contiguous(), weight, invstd, batch_mean, batch_invstd, alpha,
                         grad_through_stats, input_grad)


def backward_dx(grad_y, x, coef):
    if needs_reference(x):
        return reference.backward_dx(grad_y, x, coef)
    xk, geo, dy = _kernel_inputs(grad_y, x)
    with device_guard(x):
        grad_x = _dx(dy, xk, geo, coef.to(torch.float32).contiguous())
    return grad_x if xk is x else as_promised(grad_x, x)


# ---- fused composition -------------------------------------------------------------------------

def backward(grad_y, x, weight, mean, invstd, batch_mean, batch_invstd, alpha,
             grad_through_stats, input_grad):
    """backward_reduce -> backward_finalize -> backward_dx, the splits added in the finalize:
    3 launches (2 without input gradient)."""
    if needs_reference(x):
        return reference.backward(grad_y, x, weight, mean, invstd, batch_mean, batch_invstd,
                                  alpha, grad_through_stats, input_grad)
    xk, geo, dy = _kernel_inputs(grad_y, x)
    with device_guard(x):
        stack = _reduce(dy, xk, geo, mean)
        grad_weight, grad_bias, coef = _finalize(stack, weight, invstd, batch_mean, batch_invstd,
                                                 alpha, grad_through_stats, input_grad)
        if not input_grad:
            return x.new_empty((0,)), grad_weight, grad_bias
        grad_x = _dx(dy, xk, geo, coef)
    if xk is not x:
        grad_x = as_promised(grad_x, x)
    return grad_x, grad_weight, grad_bias
