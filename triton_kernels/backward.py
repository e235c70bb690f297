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

After a fused ReLU (``relu_output``, the forward's y) passes 1 and 3 read dy * (y > 0) in place
of dy: the mask costs one more read in each, and pass 3 also writes the masked dy as the
residual's gradient (``residual_grad``), from the registers it is already in. Without input
gradient the residual's gradient alone still takes pass 3 (x and the coefficients unread).

The ``backward_reduce`` pass adds one launch, ``merge_kernel``, which adds the splits into the
single (3, C) source it returns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dbn_kernels import reference

from dbn_kernels.ops import dx_coef_rows, residual_grad_written

from .launch import (EMULATE_RTNE, as_promised, device_guard, elementwise_plan, finalize_plan,
                     kernel_input, needs_reference, reduce_plan, same_layout)
from .merge import merge, sum_sums
from .tiling import along_channels, elementwise_tile, reduction_tile, store_rounded


@triton.jit
def relu_masked(dy, relu_output_ptr, offs, mask, HAS_RELU_OUTPUT: tl.constexpr):
    """dy through the forward's fused ReLU: 0 where its output y is not positive. The mask is
    recovered from y (read with x's offsets), not stored by the forward."""
    if HAS_RELU_OUTPUT:
        y = tl.load(relu_output_ptr + offs, mask=mask, other=0.0)
        dy = tl.where(y > 0, dy, 0.0)
    return dy


@triton.jit
def backward_reduce_kernel(dy_ptr, x_ptr, mean_ptr, relu_output_ptr, stack_ptr, C, S, M,
                           s_blocks, tiles, tiles_per_split, BLOCK_C: tl.constexpr,
                           BLOCK_R: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                           ALIGN: tl.constexpr, INT64: tl.constexpr,
                           HAS_RELU_OUTPUT: tl.constexpr):
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
        dy = relu_masked(tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32),
                         relu_output_ptr, offs, mask, HAS_RELU_OUTPUT)
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
def backward_dx_kernel(dy_ptr, x_ptr, dx_ptr, coef_ptr, relu_output_ptr, grad_residual_ptr, C, S,
                       extent_a, b_blocks, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                       CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr, INT64: tl.constexpr,
                       INPUT_GRAD: tl.constexpr, GRAD_THROUGH_STATS: tl.constexpr,
                       HAS_RELU_OUTPUT: tl.constexpr, RESIDUAL_GRAD: tl.constexpr,
                       EMULATE_RTNE: tl.constexpr):
    offs, mask, chan, chan_mask, first = elementwise_tile(
        tl.program_id(0), C, S, extent_a, b_blocks, BLOCK_A, BLOCK_B, CHANNELS_LAST, ALIGN, INT64)
    dy = relu_masked(tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32),
                     relu_output_ptr, offs, mask, HAS_RELU_OUTPUT)
    if RESIDUAL_GRAD:
        # the residual's gradient is the masked dy: written while it is in registers
        store_rounded(grad_residual_ptr + offs, dy, mask, EMULATE_RTNE)
    if INPUT_GRAD:  # off: a pass for the residual's gradient alone
        a = along_channels(tl.load(coef_ptr + chan, mask=chan_mask, other=0.0), CHANNELS_LAST)
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

def _reduce(dy, xk, geo, mean, relu_output):
    """Launch 1: the (splits, 3, C) sums stack, dy masked by ``relu_output`` when given."""
    plan = reduce_plan(geo, xk.element_size(), xk.device)
    stack = torch.empty((plan.splits, 3, geo.C), dtype=torch.float32, device=xk.device)
    backward_reduce_kernel[plan.grid](
        dy, xk, mean.contiguous(), dy if relu_output is None else relu_output, stack, geo.C,
        geo.S, geo.M, plan.s_blocks, plan.tiles, plan.tiles_per_split, BLOCK_C=plan.block_c,
        BLOCK_R=plan.block_r, CHANNELS_LAST=geo.channels_last, ALIGN=geo.align,
        INT64=geo.int64, HAS_RELU_OUTPUT=relu_output is not None, num_warps=plan.num_warps)
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


def _dx(dy, xk, geo, coef, relu_output, residual_grad):
    """Launch 3: dx from the (4, C) or (1, C) coefficients, and the residual's gradient (the
    masked dy) when ``residual_grad``, both in ``xk``'s memory order. ``coef`` with 0 rows: the
    residual's gradient alone. Returns (grad_x, grad_residual), each None when not written."""
    input_grad = coef.shape[0] > 0
    ew = elementwise_plan(geo, xk.element_size())
    grad_x = torch.empty_like(xk) if input_grad else None
    grad_residual = torch.empty_like(xk) if residual_grad else None
    unused = dy  # stands in for absent tensors; the kernel never touches it then
    backward_dx_kernel[ew.grid](
        dy, xk, unused if grad_x is None else grad_x, coef if input_grad else unused,
        unused if relu_output is None else relu_output,
        unused if grad_residual is None else grad_residual, geo.C, geo.S, ew.extent_a,
        ew.b_blocks, BLOCK_A=ew.block_a, BLOCK_B=ew.block_b, CHANNELS_LAST=geo.channels_last,
        ALIGN=geo.align, INT64=geo.int64, INPUT_GRAD=input_grad,
        GRAD_THROUGH_STATS=coef.shape[0] == 4, HAS_RELU_OUTPUT=relu_output is not None,
        RESIDUAL_GRAD=residual_grad, EMULATE_RTNE=EMULATE_RTNE, num_warps=ew.num_warps)
    return grad_x, grad_residual


def _kernel_inputs(grad_y, x, relu_output):
    """x as the kernels read it, its geometry, and dy and the ReLU's output in x's memory order:
    both are read with x's offsets, so another memory format (or an expanded gradient) is
    copied."""
    xk, geo = kernel_input(x)
    if relu_output is not None:
        relu_output = same_layout(relu_output, xk, geo)
    return xk, geo, same_layout(grad_y, xk, geo), relu_output


def _outputs(grad_x, grad_residual, xk, x):
    """grad_x and grad_residual as the ops return them: in x's memory format (see
    ``as_promised``), and ``(0,)``-empty when not written."""
    if xk is not x:
        grad_x = None if grad_x is None else as_promised(grad_x, x)
        grad_residual = None if grad_residual is None else as_promised(grad_residual, x)
    # one empty tensor each: outputs of an op may not alias one another
    return (x.new_empty((0,)) if grad_x is None else grad_x,
            x.new_empty((0,)) if grad_residual is None else grad_residual)


# ---- the passes --------------------------------------------------------------------------------

def backward_reduce(grad_y, x, mean, relu_output=None):
    if needs_reference(x):
        return reference.backward_reduce(grad_y, x, mean, relu_output)
    xk, geo, dy, relu_output = _kernel_inputs(grad_y, x, relu_output)
    with device_guard(x):
        return merge(_reduce(dy, xk, geo, mean, relu_output), stats=False)


def backward_finalize(sums, weight, invstd, batch_mean, batch_invstd, alpha, grad_through_stats,
                      input_grad):
    if sums.dtype == torch.float64:
        return reference.backward_finalize(sums, weight, invstd, batch_mean, batch_invstd, alpha,
                                           grad_through_stats, input_grad)
    with device_guard(sums):
        return _finalize(sums.contiguous(), weight, invstd, batch_mean, batch_invstd, alpha,
                         grad_through_stats, input_grad)


def backward_dx(grad_y, x, coef, relu_output=None, residual_grad=False):
    if needs_reference(x):
        return reference.backward_dx(grad_y, x, coef, relu_output, residual_grad)
    residual_grad = residual_grad_written(relu_output, residual_grad)
    if coef.shape[0] == 0 and not residual_grad:
        return x.new_empty((0,)), x.new_empty((0,))  # nothing to write: no launch
    xk, geo, dy, relu_output = _kernel_inputs(grad_y, x, relu_output)
    with device_guard(x):
        grad_x, grad_residual = _dx(dy, xk, geo, coef.to(torch.float32).contiguous(),
                                    relu_output, residual_grad)
    return _outputs(grad_x, grad_residual, xk, x)


# ---- fused composition -------------------------------------------------------------------------

def backward(grad_y, x, weight, mean, invstd, batch_mean, batch_invstd, alpha,
             grad_through_stats, input_grad, relu_output=None, residual_grad=False):
    """backward_reduce -> backward_finalize -> backward_dx, the splits added in the finalize:
    3 launches (2 without input gradient, unless the residual's gradient is asked for)."""
    if needs_reference(x):
        return reference.backward(grad_y, x, weight, mean, invstd, batch_mean, batch_invstd,
                                  alpha, grad_through_stats, input_grad, relu_output,
                                  residual_grad)
    residual_grad = residual_grad_written(relu_output, residual_grad)
    xk, geo, dy, relu_output = _kernel_inputs(grad_y, x, relu_output)
    with device_guard(x):
        stack = _reduce(dy, xk, geo, mean, relu_output)
        grad_weight, grad_bias, coef = _finalize(stack, weight, invstd, batch_mean, batch_invstd,
                                                 alpha, grad_through_stats, input_grad)
        grad_x = grad_residual = None
        if input_grad or residual_grad:
            grad_x, grad_residual = _dx(dy, xk, geo, coef, relu_output, residual_grad)
    grad_x, grad_residual = _outputs(grad_x, grad_residual, xk, x)
    return grad_x, grad_weight, grad_bias, grad_residual
