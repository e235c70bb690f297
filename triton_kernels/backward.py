"""Backward kernels and their launcher:

    dx = gamma / sig_k * (dy - a_g * sum(dy) / M - a_g * xhat_B * sum(dy * xhat) / M)
       = A * dy + B * (x - m_B) + C'     per channel, a_g = a_k (or 0: grad_through_stats=False)

with A = gamma / sig_k, B = -A * a_g * sum(dy * xhat) / M / s_B, C' = -A * a_g * sum(dy) / M.
Centred on m_B rather than folded into B * x + (C' - B * m_B): the folded constant is ~B * |m_B|
and its rounding (|m_B / s_B| * 2**-24 relative to A * dy) would be dx's error when |mean| >> std.

1. ``backward_reduce``: grid (channel blocks, splits of M); per-lane sums of dy and
   dy * (x - mean), one partial per (split, channel).
2. ``backward_finalize``: one program per channel block adds the partials in split order, writes
   grad_weight = sum(dy * xhat) and grad_bias = sum(dy) and the coefficients: rows A, m_B, B, C'
   of a (4, C) tensor (A alone without gradient through the statistics).
3. ``backward_dx``: the element-wise pass; without gradient through the statistics dx = A * dy
   and x is not read at all.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dbn_kernels import reference

from .launch import (EMULATE_RTNE, as_promised, device_guard, elementwise_plan, finalize_plan,
                     kernel_input, reduce_plan, same_layout)
from .tiling import along_channels, elementwise_tile, reduction_tile, store_rounded


@triton.jit
def backward_reduce(dy_ptr, x_ptr, mean_ptr, partial_ptr, C, S, M, s_blocks, tiles,
                    tiles_per_split, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                    CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr, INT64: tl.constexpr):
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = c < C
    mean = tl.load(mean_ptr + c, mask=keep, other=0.0).to(tl.float32)
    if CHANNELS_LAST:
        centre = mean[None, :]
        sum_dy = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    else:
        centre = mean[:, None]
        sum_dy = tl.zeros([BLOCK_C, BLOCK_R], tl.float32)
    # sum(dy * (x - mean)); invstd is applied once per channel in the finalize.
    sum_dy_xc = tl.zeros_like(sum_dy)
    t_begin = split * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, tiles)
    for t in range(t_begin, t_end):
        offs, mask = reduction_tile(c, t, C, S, M, s_blocks, BLOCK_R, CHANNELS_LAST, ALIGN, INT64)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sum_dy += dy
        sum_dy_xc += dy * (x - centre)
    if CHANNELS_LAST:
        sum_dy_c = tl.sum(sum_dy, 0)
        sum_dy_xc_c = tl.sum(sum_dy_xc, 0)
    else:
        sum_dy_c = tl.sum(sum_dy, 1)
        sum_dy_xc_c = tl.sum(sum_dy_xc, 1)
    out = partial_ptr + split * C + c
    tl.store(out, sum_dy_c, mask=keep)
    tl.store(out + splits * C, sum_dy_xc_c, mask=keep)


@triton.jit
def backward_finalize(partial_ptr, splits, C, weight_ptr, invstd_ptr, batch_mean_ptr,
                      batch_invstd_ptr, alpha_ptr, grad_weight_ptr, grad_bias_ptr, coef_ptr,
                      count, HAS_WEIGHT: tl.constexpr, INPUT_GRAD: tl.constexpr,
                      GRAD_THROUGH_STATS: tl.constexpr, BLOCK_C: tl.constexpr,
                      BLOCK_SPLIT: tl.constexpr):
    pid = tl.program_id(0)
    c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = c < C
    sum_dy = tl.zeros([BLOCK_C], tl.float32)
    sum_dy_xc = tl.zeros([BLOCK_C], tl.float32)
    # Ascending split order, a fixed tree within each step: reproducible bit for bit.
    for j0 in range(0, splits, BLOCK_SPLIT):
        j = j0 + tl.arange(0, BLOCK_SPLIT)
        mask = (j < splits)[:, None] & keep[None, :]
        offs = j[:, None] * C + c[None, :]
        sum_dy += tl.sum(tl.load(partial_ptr + offs, mask=mask, other=0.0), 0)
        sum_dy_xc += tl.sum(tl.load(partial_ptr + splits * C + offs, mask=mask, other=0.0), 0)
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
            b = -a * alpha * sum_dy_xhat * batch_invstd / count
            shift = -a * alpha * sum_dy / count
            tl.store(coef_ptr + C + c, batch_mean, mask=keep)
            tl.store(coef_ptr + 2 * C + c, b, mask=keep)
            tl.store(coef_ptr + 3 * C + c, shift, mask=keep)


@triton.jit
def backward_dx(dy_ptr, x_ptr, dx_ptr, coef_ptr, C, S, extent_a, b_blocks,
                BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                ALIGN: tl.constexpr, INT64: tl.constexpr, GRAD_THROUGH_STATS: tl.constexpr,
                EMULATE_RTNE: tl.constexpr):
    offs, mask, chan, chan_mask, first = elementwise_tile(
        tl.program_id(0), C, S, extent_a, b_blocks, BLOCK_A, BLOCK_B, CHANNELS_LAST, ALIGN, INT64)
    a = along_channels(tl.load(coef_ptr + chan, mask=chan_mask, other=0.0), CHANNELS_LAST)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dx = a * dy
    if GRAD_THROUGH_STATS:
        # rows A, m_B, B, C' of the (4, C) coefficients: contiguous vector loads per tile
        center = along_channels(tl.load(coef_ptr + C + chan, mask=chan_mask, other=0.0),
                                CHANNELS_LAST)
        b = along_channels(tl.load(coef_ptr + 2 * C + chan, mask=chan_mask, other=0.0),
                           CHANNELS_LAST)
        shift = along_channels(tl.load(coef_ptr + 3 * C + chan, mask=chan_mask, other=0.0),
                               CHANNELS_LAST)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dx = dx + ((x - center) * b + shift)
    store_rounded(dx_ptr + offs, dx, mask, EMULATE_RTNE)


def backward(grad_y, x, weight, mean, invstd, batch_mean, batch_invstd, alpha,
             grad_through_stats, input_grad):
    if x.dtype == torch.float64 or x.numel() == 0:
        return reference.backward(grad_y, x, weight, mean, invstd, batch_mean, batch_invstd,
                                  alpha, grad_through_stats, input_grad)
    xk, geo = kernel_input(x)
    # dy is read with x's offsets: another memory format (or an expanded gradient) is copied.
    dy = same_layout(grad_y, xk, geo)
    C = geo.C
    f32 = {"dtype": torch.float32, "device": x.device}
    weight = None if weight is None else weight.contiguous()
    mean, invstd = mean.contiguous(), invstd.contiguous()
    batch_mean, batch_invstd = batch_mean.contiguous(), batch_invstd.contiguous()

    plan = reduce_plan(geo, xk.element_size(), x.device)
    fin = finalize_plan(C, plan.splits)
    partial = torch.empty((2, plan.splits, C), **f32)
    grad_weight = torch.empty(C, **f32)
    grad_bias = torch.empty(C, **f32)
    # rows A, m_B, B, C' (only A is written and read without gradient through the statistics)
    coef = torch.empty((4 if grad_through_stats else 1, C), **f32) if input_grad else partial

    with device_guard(x):
        backward_reduce[plan.grid](
            dy, xk, mean, partial, C, geo.S, geo.M, plan.s_blocks, plan.tiles,
            plan.tiles_per_split, BLOCK_C=plan.block_c, BLOCK_R=plan.block_r,
            CHANNELS_LAST=geo.channels_last, ALIGN=geo.align, INT64=geo.int64,
            num_warps=plan.num_warps)
        backward_finalize[fin.grid](
            partial, plan.splits, C, partial if weight is None else weight, invstd, batch_mean,
            batch_invstd, alpha, grad_weight, grad_bias, coef, float(geo.M),
            HAS_WEIGHT=weight is not None, INPUT_GRAD=bool(input_grad),
            GRAD_THROUGH_STATS=bool(grad_through_stats), BLOCK_C=fin.block_c,
            BLOCK_SPLIT=fin.block_split, num_warps=fin.num_warps)
        if not input_grad:
            return x.new_empty((0,)), grad_weight, grad_bias
        ew = elementwise_plan(geo, xk.element_size())
        grad_x = torch.empty_like(xk)
        backward_dx[ew.grid](
            dy, xk, grad_x, coef, C, geo.S, ew.extent_a, ew.b_blocks, BLOCK_A=ew.block_a,
            BLOCK_B=ew.block_b, CHANNELS_LAST=geo.channels_last, ALIGN=geo.align,
            INT64=geo.int64, GRAD_THROUGH_STATS=bool(grad_through_stats),
            EMULATE_RTNE=EMULATE_RTNE, num_warps=ew.num_warps)
    if xk is not x:
        grad_x = as_promised(grad_x, x)
    return grad_x, grad_weight, grad_bias
