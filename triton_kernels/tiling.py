"""Device-side helpers shared by the forward and backward kernels: where a tile lives in memory,
and the Welford/Chan merges.

A tile's last dimension always runs along contiguous memory, so loads and stores vectorise:

* NSC (channels_last, (N, C)): memory is (M, C); tiles are [rows, channels];
* NCS (contiguous N, C, *S): memory is (N*C planes, S); tiles are [planes or channels,
  positions].
"""

import triton
import triton.language as tl


@triton.jit
def reduction_tile(c, t, C, S, M, s_blocks, BLOCK_R: tl.constexpr,
                   CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr, INT64: tl.constexpr):
    """Offsets and mask of reduction tile ``t`` for the channel vector ``c`` ([BLOCK_C]).

    NSC: rows [t*BLOCK_R, (t+1)*BLOCK_R) of (M, C), shape [BLOCK_R, BLOCK_C].
    NCS: sample t // s_blocks, positions (t % s_blocks)*BLOCK_R + [0, BLOCK_R),
    shape [BLOCK_C, BLOCK_R].
    """
    r = tl.arange(0, BLOCK_R)
    if CHANNELS_LAST:
        # ALIGN divides C: rewriting C so lets Triton prove that rows start on vector
        # boundaries and that the mask is constant per vector, so accesses vectorise.
        C = (C // ALIGN) * ALIGN
        if INT64:
            rows = (tl.zeros([BLOCK_R], tl.int64) + t) * BLOCK_R + r
        else:
            rows = t * BLOCK_R + r
        offs = rows[:, None] * C + c[None, :]
        mask = (rows < M)[:, None] & (c < C)[None, :]
    else:
        S = (S // ALIGN) * ALIGN  # as C above
        n = t // s_blocks
        if INT64:
            s = (tl.zeros([BLOCK_R], tl.int64) + (t - n * s_blocks)) * BLOCK_R + r
            planes = (c.to(tl.int64) * 0 + n) * C + c
        else:
            s = (t - n * s_blocks) * BLOCK_R + r
            planes = n * C + c
        offs = planes[:, None] * S + s[None, :]
        mask = (c < C)[:, None] & (s < S)[None, :]
    return offs, mask


@triton.jit
def elementwise_tile(pid, C, S, extent_a, b_blocks, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                     CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr, INT64: tl.constexpr):
    """Tile ``pid`` of an element-wise pass over [extent_a, extent_b] (NSC: M rows by C channels;
    NCS: N*C planes by S positions).

    Returns the offsets and mask of the tile, the channel of each of its columns (NSC)
    or rows (NCS) as a vector with its mask, and ``first``: the channels whose first
    tile this is, for per-channel outputs written exactly once. Per-channel values are loaded
    as vectors and broadcast with ``along_channels``."""
    pid_a = pid // b_blocks
    pid_b = pid - pid_a * b_blocks
    if INT64:
        pid_a = pid_a.to(tl.int64)
        pid_b = pid_b.to(tl.int64)
    a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    if CHANNELS_LAST:
        C = (C // ALIGN) * ALIGN  # see reduction_tile
        offs = a[:, None] * C + b[None, :]
        mask = (a < extent_a)[:, None] & (b < C)[None, :]
        chan = b
        chan_mask = b < C
        # Scalar conditions are widened to vectors before combining with a vector mask: Triton
        # 3.9's interpreter rejects the mask that `vector & scalar` produces.
        first = chan_mask & (pid_a + tl.zeros_like(b) == 0)
    else:
        S = (S // ALIGN) * ALIGN
        offs = a[:, None] * S + b[None, :]
        mask = (a < extent_a)[:, None] & (b < S)[None, :]
        chan = a % C
        chan_mask = a < extent_a
        first = (a < C) & (pid_b + tl.zeros_like(a) == 0)
    return offs, mask, chan, chan_mask, first


@triton.jit
def along_channels(v, CHANNELS_LAST: tl.constexpr):
    """A per-channel vector of an element-wise tile, shaped to broadcast against the tile."""
    if CHANNELS_LAST:
        out = v[None, :]
    else:
        out = v[:, None]
    return out


@triton.jit
def merge_lanes(mean, m2, count, AXIS: tl.constexpr):
    """Chan et al.'s merge of per-lane Welford states along AXIS, in closed form: the combined
    mean, then M2 plus each lane's count times its squared distance from that mean (no
    E[x^2] - E[x]^2). A plain tree reduction: fixed order, so bitwise reproducible.

    The mean comes in two steps. First an estimate, the count-weighted average of the lane means
    (weights count / n <= 1: nothing overflows), which rounds at the size of |mean| with every
    lane it adds. Then the correction, the weighted average of the deviations from the estimate:
    those have both signs and are about the size of the lanes' spread, so their sum stays near
    zero and rounds far below an ulp of the mean, in whatever order the reduction adds them (a
    tree on a GPU; one row after another under Triton's interpreter, which sums along axis 0
    with numpy). The result is off by about the final rounding.

    Centering on one lane's mean instead (the largest, say) makes every deviation one-signed and
    as large as the distance from that lane to the mean: their sum grows with the lane count,
    and its rounding becomes the mean's error. Lanes holding one value each (channels_last tiles
    of a small batch: every row is a lane) spread like the data, a few std, and the mean would
    be off by several ulp there."""
    n = tl.sum(count, AXIS)
    inv_n = 1.0 / tl.maximum(n, 1.0)
    estimate = tl.sum(count * tl.expand_dims(inv_n, AXIS) * mean, AXIS)
    dev = mean - tl.expand_dims(estimate, AXIS)
    shift = tl.sum(count * dev, AXIS) * inv_n
    dev = dev - tl.expand_dims(shift, AXIS)
    m2 = tl.sum(m2 + count * dev * dev, AXIS)
    return estimate + shift, m2, n


@triton.jit
def merge_pair(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    """Chan et al.'s pairwise merge of two Welford states."""
    n = n_a + n_b
    w_b = n_b / tl.maximum(n, 1.0)
    delta = mean_b - mean_a
    return mean_a + delta * w_b, m2_a + m2_b + delta * delta * n_a * w_b, n


@triton.jit
def lerp(start, end, weight):
    """torch.lerp's formula: exact at weight 1 (the first DBN step copies the batch statistics)."""
    return tl.where(weight < 0.5, start + weight * (end - start),
                    end - (end - start) * (1.0 - weight))


@triton.jit
def store_rounded(ptr, value, mask, EMULATE_RTNE: tl.constexpr):
    """Store float32 ``value`` in the pointee's dtype, rounding to nearest even as the GPU does.

    Triton's interpreter truncates float32 -> bfloat16 instead, which would make CI measure an
    error the GPU does not have; under the interpreter the rounding is done on the bits."""
    dtype = ptr.dtype.element_ty
    if EMULATE_RTNE and dtype == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        tl.store(ptr, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, value.to(dtype), mask=mask)
