"""The triton backend against the float64 reference.

Without a GPU these run under Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET
before the kernels are imported); with one, the same tests run on CUDA tensors. Shapes are small
so the interpreter stays fast; a few tests shrink the tiles to force many splits and finalize
steps. Every float allocation of the backend is poisoned with NaN, so an output element (or a
partial) that a kernel forgets to write shows up as a mismatch.

Tolerances: float32 about 1e-5 relative; float16/bfloat16 no worse than twice the error
of PyTorch's own computation at that dtype, both measured against the float64 reference.
"""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import dbn_kernels as dbn
from dbn_kernels import ops

pytest.importorskip("triton")
pytest.importorskip("dbn_kernels.triton_kernels")
# the package re-exports functions named like its modules: fetch the modules themselves
tk_forward = importlib.import_module("dbn_kernels.triton_kernels.forward")
tk_backward = importlib.import_module("dbn_kernels.triton_kernels.backward")
launch = importlib.import_module("dbn_kernels.triton_kernels.launch")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "channels_last"]
EPS = 1e-5
SCHEDULE = (2.0, 1.0, 0.5)  # a_k = min(1, 2 / (k + 0.5)): 1, 0.8, 0.57, ...

TRAIN, EVAL, BACKWARD = (ops.op("triton", e) for e in ("train_forward", "eval_forward", "backward"))
REF_TRAIN, REF_EVAL, REF_BACKWARD = (ops.op("reference", e)
                                     for e in ("train_forward", "eval_forward", "backward"))


# ---- poisoned allocations --------------------------------------------------------------------

class _PoisonedTorch:
    """``torch`` as the backend's modules see it, with empty/empty_like filled with garbage."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _poison(t):
        return t.fill_(math.nan) if t.is_floating_point() else t.fill_(-12345)

    def empty(self, *args, **kwargs):
        return self._poison(torch.empty(*args, **kwargs))

    def empty_like(self, *args, **kwargs):
        return self._poison(torch.empty_like(*args, **kwargs))


@pytest.fixture(autouse=True)
def _poisoned_allocations(monkeypatch):
    for module in (tk_forward, tk_backward):
        monkeypatch.setattr(module, "torch", _PoisonedTorch())


# ---- helpers ---------------------------------------------------------------------------------

def make_x(shape, dtype, layout, mean=2.0, std=3.0):
    x = (torch.randn(shape, dtype=torch.float64) * std + mean).to(dtype)
    if layout == "channels_last" and x.dim() > 2:
        # channels innermost in memory: channels_last for 4-D/5-D, the same order for 3-D
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    return x.to(DEVICE)


def is_channel_inner(t):
    return t.movedim(1, -1).is_contiguous()


def make_state(C, dtype=torch.float32, dbn_buffers=True, running=True, counter=True, k0=0):
    g = torch.Generator().manual_seed(C)
    st = {
        "running_mean": torch.randn(C, generator=g, dtype=torch.float64) if running else None,
        "running_var": torch.rand(C, generator=g, dtype=torch.float64) + 0.5 if running else None,
        "dbn_mean": torch.randn(C, generator=g, dtype=torch.float64) if dbn_buffers else None,
        "dbn_std": torch.rand(C, generator=g, dtype=torch.float64) + 0.5 if dbn_buffers else None,
    }
    st = {k: None if v is None else v.to(dtype).to(DEVICE) for k, v in st.items()}
    st["num_batches_tracked"] = torch.tensor(k0, device=DEVICE) if counter else None
    return st


def as_double(st):
    return {k: None if v is None else (v.clone() if k == "num_batches_tracked" else v.double())
            for k, v in st.items()}


BUFFER_ORDER = ("running_mean", "running_var", "dbn_mean", "dbn_std", "num_batches_tracked")


def train(op, x, w, b, st, momentum=0.1, schedule=SCHEDULE):
    return op(x, w, b, *(st[k] for k in BUFFER_ORDER), momentum, EPS, *schedule)


def params(C, dtype=torch.float32, affine=True):
    if not affine:
        return None, None
    w = torch.rand(C, dtype=torch.float64) + 0.5
    b = torch.randn(C, dtype=torch.float64)
    return w.to(dtype).to(DEVICE), b.to(dtype).to(DEVICE)


def dbl(t):
    return None if t is None else t.double()


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def torch_forward_error(x, w, b, mean64, invstd64, y64):
    """Error of PyTorch's own batch_norm at x's dtype, given the exact statistics."""
    var = (invstd64.pow(-2) - EPS).float()
    y = F.batch_norm(x, mean64.float(), var, None if w is None else w.float(),
                     None if b is None else b.float(), False, 0.0, EPS)
    return max_err(y, y64)


def assert_low_precision_close(actual, expected64, baseline, what):
    err = max_err(actual, expected64)
    # tiny slack for the case where the baseline rounds exactly
    assert err <= 2 * baseline + 1e-6 * expected64.abs().max().item(), (
        f"{what}: error {err:.3g} exceeds twice PyTorch's {baseline:.3g}")


def assert_stats_close(actual, expected, name):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-5, atol=1e-6,
                               msg=lambda m: f"{name}: {m}")


def assert_buffers_close(st, ref, exact_dtype):
    for name in BUFFER_ORDER[:-1]:
        if st[name] is None:
            assert ref[name] is None
            continue
        if exact_dtype:
            assert_stats_close(st[name], ref[name], name)
        else:  # buffers stored in float16/bfloat16: one rounding per step
            torch.testing.assert_close(st[name].double(), ref[name], rtol=1e-2, atol=1e-3,
                                       msg=lambda m: f"{name}: {m}")
    if st["num_batches_tracked"] is not None:
        assert st["num_batches_tracked"].item() == ref["num_batches_tracked"].item()
        assert st["num_batches_tracked"].dtype == torch.int64


def check_train_step(x, w, b, st, ref, momentum=0.1, schedule=SCHEDULE):
    """One step on both backends; compares everything and returns both outputs."""
    out = train(TRAIN, x, w, b, st, momentum, schedule)
    out64 = train(REF_TRAIN, x.double(), dbl(w), dbl(b), ref, momentum, schedule)
    y, y64 = out[0], out64[0]
    assert y.dtype == x.dtype and y.shape == x.shape
    assert y.stride() == torch.empty_like(x).stride()  # what the fake promises
    if x.dtype == torch.float32:
        torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    else:
        baseline = torch_forward_error(x, w, b, out64[1], out64[2], y64)
        assert_low_precision_close(y, y64, baseline, "y")
    for name, a, e in zip(("mean", "invstd", "batch_mean", "batch_invstd", "alpha"),
                          out[1:], out64[1:]):
        assert a.dtype == torch.float32 and a.shape == e.shape
        assert_stats_close(a, e, name)
    return out, out64


# ---- training forward ------------------------------------------------------------------------

SHAPES = [
    (4, 3, 7, 7),      # C not a power of two, 7x7
    (5, 1, 1, 1),      # C = 1, 1x1
    (3, 5, 16, 16),    # M larger than one tile in both layouts
    (6, 5),            # BatchNorm1d on (N, C)
    (4, 3, 10),        # BatchNorm1d on (N, C, L)
    (2, 3, 3, 4, 5),   # BatchNorm3d
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_training_steps(shape, layout, dtype):
    C = shape[1]
    w, b = params(C)
    st = make_state(C)
    ref = as_double(st)
    for _ in range(3):
        x = make_x(shape, dtype, layout)
        check_train_step(x, w, b, st, ref)
        assert_buffers_close(st, ref, exact_dtype=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_parameters_and_buffers_in_input_dtype(dtype):
    C = 5
    w, b = params(C, dtype)
    st = make_state(C, dtype)
    for _ in range(3):
        ref = as_double(st)  # resynchronised: each step rounds the buffers once
        x = make_x((4, C, 5, 5), dtype, "channels_last")
        check_train_step(x, w, b, st, ref)
        assert all(st[k].dtype == dtype for k in BUFFER_ORDER[:-1])
        assert_buffers_close(st, ref, exact_dtype=False)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", ["plain_bn", "cumulative", "no_buffers", "no_affine",
                                  "weight_only"])
def test_buffer_variants(case, layout):
    C, shape = 3, (4, 3, 6, 6)
    w, b = params(C, affine=case != "no_affine")
    if case == "weight_only":
        b = None
    momentum = None if case == "cumulative" else 0.1
    st = make_state(C, dbn_buffers=case not in ("plain_bn", "cumulative", "no_buffers"),
                    running=case != "no_buffers", counter=case != "no_buffers", k0=2)
    ref = as_double(st)
    for _ in range(3):
        out, _ = check_train_step(make_x(shape, torch.float32, layout), w, b, st, ref,
                                  momentum=momentum)
        assert_buffers_close(st, ref, exact_dtype=True)
        if st["dbn_mean"] is None:
            assert out[5].item() == 1.0  # plain batch norm: a_k = 1


def test_first_step_copies_batch_statistics():
    """a_1 = 1 whatever the schedule says (here a constant 0.25)."""
    C = 4
    st = make_state(C)
    x = make_x((3, C, 5, 5), torch.float32, "contiguous")
    out = train(TRAIN, x, None, None, st, schedule=(0.25, 0.0, 0.0))
    assert st["num_batches_tracked"].item() == 1 and out[5].item() == 1.0
    torch.testing.assert_close(st["dbn_mean"], out[3], rtol=0, atol=0)
    torch.testing.assert_close(st["dbn_std"], 1 / out[4], rtol=1e-6, atol=0)
    xd = x.double()
    torch.testing.assert_close(out[3].double(), xd.mean((0, 2, 3)), rtol=1e-6, atol=1e-6)


def test_statistics_accurate_when_mean_dwarfs_std():
    """Welford/Chan: E[x^2] - E[x]^2 in float32 would lose every digit here."""
    C = 3
    st = make_state(C, dbn_buffers=False)
    ref = as_double(st)
    x = make_x((4, C, 9, 9), torch.float32, "channels_last", mean=3000.0, std=0.5)
    out = train(TRAIN, x, None, None, st)
    out64 = train(REF_TRAIN, x.double(), None, None, ref)
    torch.testing.assert_close(out[4].double(), out64[4], rtol=1e-4, atol=0)  # batch_invstd
    torch.testing.assert_close(st["running_var"].double(), ref["running_var"], rtol=1e-4, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_elementwise_passes_accurate_when_mean_dwarfs_std(layout):
    """The element-wise passes are centred: y = (x - mu) * scale + beta and
    dx = A*dy + B*(x - m_B) + C'. Folded into x * scale + (beta - mu*scale) (or B*x + C with
    C = C' - B*m_B) they lose about |mu/sigma| * 2**-24 absolutely: ~4e-4 here.

    The float64 reference gets the kernels' own float32 statistics (exact in float64): those
    carry their own rounding (|mu| * 2**-25 is ~1e-4 at mu = 3000, ~2e-4 in y), whatever form
    the element-wise pass takes; this test is about the element-wise pass."""
    C, shape = 3, (4, 3, 9, 9)
    g = torch.Generator().manual_seed(7)
    w = (torch.rand(C, generator=g, dtype=torch.float64) * 0.4 + 0.8).float().to(DEVICE)
    b = torch.randn(C, generator=g, dtype=torch.float64).float().to(DEVICE)
    chan_mean = torch.tensor([3000.0, -2500.0, 3900.0], dtype=torch.float64)
    x64 = torch.randn(shape, generator=g, dtype=torch.float64) * 0.5 \
        + chan_mean.view(1, C, 1, 1)
    x = x64.float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(DEVICE)
    xd = x.double()
    st = make_state(C)  # dbn_mean ~ 0: the first step copies the batch statistics anyway
    for _ in range(2):  # the second step has a_k < 1 and mu_k != m_B
        out = train(TRAIN, x, w, b, st)
    stats64 = [t.double() for t in out[1:]]
    mean64, invstd64 = stats64[0], stats64[1]

    # training forward: mu_k = out[1], sig_k = 1/out[2]
    y64, _ = REF_EVAL(xd, dbl(w), dbl(b), mean64, invstd64.reciprocal(), EPS, True)
    torch.testing.assert_close(out[0].double(), y64, rtol=0, atol=2e-5)

    # backward through the statistics; dy correlated with xhat so that B (and B*x) is large
    xhat = (xd - mean64.view(1, C, 1, 1)) * invstd64.view(1, C, 1, 1)
    noise = torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE)  # g is a CPU generator
    dy = (xhat + 0.3 * noise).float()
    if layout == "channels_last":
        dy = dy.contiguous(memory_format=torch.channels_last)
    dy = dy.to(DEVICE)
    dx, _, _ = BACKWARD(dy, x, w, *out[1:], True, True)
    dx64, _, _ = REF_BACKWARD(dy.double(), xd, dbl(w), *stats64, True, True)
    assert dx.stride() == x.stride()
    torch.testing.assert_close(dx.double(), dx64, rtol=0, atol=2e-5)

    # evaluation with stored float32 statistics of the same magnitude
    y, _ = EVAL(x, w, b, st["dbn_mean"], st["dbn_std"], EPS, True)
    y64, _ = REF_EVAL(xd, dbl(w), dbl(b), st["dbn_mean"].double(), st["dbn_std"].double(), EPS,
                      True)
    torch.testing.assert_close(y.double(), y64, rtol=0, atol=2e-5)


def test_float64_runs_the_reference():
    C = 3
    x = make_x((4, C, 5, 5), torch.float64, "contiguous")
    w, b = params(C, torch.float64)
    st, st_ref = make_state(C, torch.float64), make_state(C, torch.float64)
    out = train(TRAIN, x, w, b, st)
    out_ref = train(REF_TRAIN, x, w, b, st_ref)
    for a, e in zip(out, out_ref):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, e, rtol=0, atol=0)


# ---- evaluation ------------------------------------------------------------------------------

@pytest.mark.parametrize("spread_is_std", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_eval(dtype, layout, spread_is_std):
    C, shape = 5, (3, 5, 6, 7)
    w, b = params(C)
    mean = torch.randn(C, dtype=torch.float64)
    spread = torch.rand(C, dtype=torch.float64) + 0.5
    x = make_x(shape, dtype, layout)
    y, invstd = EVAL(x, w, b, mean.float().to(DEVICE), spread.float().to(DEVICE), EPS,
                     spread_is_std)
    y64, invstd64 = REF_EVAL(x.double(), dbl(w), dbl(b), mean.to(DEVICE), spread.to(DEVICE),
                             EPS, spread_is_std)
    assert y.dtype == dtype and y.stride() == x.stride()
    assert invstd.dtype == torch.float32 and invstd.shape == (C,)
    assert_stats_close(invstd, invstd64, "invstd")
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    else:
        baseline = torch_forward_error(x, w, b, mean.to(DEVICE), invstd64, y64)
        assert_low_precision_close(y, y64, baseline, "y")


@pytest.mark.parametrize("shape", [(7, 6), (2, 6, 1, 1), (2, 1, 9, 9)], ids=str)
def test_eval_buffers_in_input_dtype(shape):
    C = shape[1]
    x = make_x(shape, torch.bfloat16, "channels_last")
    mean = torch.randn(C).bfloat16().to(DEVICE)
    std = (torch.rand(C) + 0.5).bfloat16().to(DEVICE)
    y, invstd = EVAL(x, None, None, mean, std, EPS, True)
    y64, invstd64 = REF_EVAL(x.double(), None, None, mean.double(), std.double(), EPS, True)
    assert_stats_close(invstd, invstd64, "invstd")
    baseline = torch_forward_error(x, None, None, mean.double(), invstd64, y64)
    assert_low_precision_close(y, y64, baseline, "y")


# ---- backward --------------------------------------------------------------------------------

def check_backward(x, dy, w, out, out64, grad_through_stats, input_grad=True):
    grads = BACKWARD(dy, x, w, *out[1:], grad_through_stats, input_grad)
    grads64 = REF_BACKWARD(dy.double(), x.double(), dbl(w), *out64[1:], grad_through_stats,
                           input_grad)
    dx, gw, gb = grads
    dx64, gw64, gb64 = grads64
    dims = [0, *range(2, x.dim())]
    # sums over M: the float32 error scales with the sum of the terms' magnitudes
    centred = x.double() - out64[1].view(1, -1, *[1] * (x.dim() - 2))
    scale_w = (dy.double() * centred).abs().sum(dims) * out64[2]
    scale_b = dy.double().abs().sum(dims)
    assert gw.dtype == gb.dtype == torch.float32
    assert ((gw.double() - gw64).abs() <= 1e-6 * scale_w + 1e-5 * gw64.abs()).all(), "grad_weight"
    assert ((gb.double() - gb64).abs() <= 1e-6 * scale_b + 1e-5 * gb64.abs()).all(), "grad_bias"
    if not input_grad:
        assert dx.numel() == 0
        return grads
    assert dx.dtype == x.dtype and dx.shape == x.shape
    assert dx.stride() == torch.empty_like(x).stride()  # what the fake promises
    # dx = A*dy + B*x + C: the rounding error scales with the A*dy term even when dx ~ 0
    a = out64[2] * (1.0 if w is None else w.double())
    term = (dy.double().abs() * a.abs().view(1, -1, *[1] * (x.dim() - 2))).max().item()
    if x.dtype == torch.float32:
        torch.testing.assert_close(dx.double(), dx64, rtol=1e-5,
                                   atol=1e-5 * max(term, dx64.abs().max().item()))
    else:
        baseline = max_err(dx64.to(x.dtype), dx64)  # rounding the exact gradient to x's dtype
        assert_low_precision_close(dx, dx64, baseline, "grad_x")
    return grads


@pytest.mark.parametrize("grad_through_stats", [True, False])
@pytest.mark.parametrize("shape", [(4, 3, 7, 7), (3, 5, 16, 16), (6, 5)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward(dtype, layout, shape, grad_through_stats):
    C = shape[1]
    w, b = params(C)
    st = make_state(C)
    ref = as_double(st)
    for step in range(2):  # the second step has a_k < 1
        x = make_x(shape, dtype, layout)
        out, out64 = check_train_step(x, w, b, st, ref)
    dy = make_x(shape, dtype, layout, mean=0.3, std=1.0)
    check_backward(x, dy, w, out, out64, grad_through_stats)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_matches_pytorch_batch_norm(dtype):
    """Plain batch norm (a_k = 1): grads agree with PyTorch's, within its own error."""
    C, shape = 3, (4, 3, 5, 5)
    x = make_x(shape, dtype, "channels_last")
    w, b = params(C)
    dy = make_x(shape, dtype, "channels_last", mean=0.0, std=1.0)
    out = train(TRAIN, x, w, None, make_state(C, dbn_buffers=False))
    dx, gw, gb = BACKWARD(dy, x, w, *out[1:], True, True)
    x64 = x.double().requires_grad_()
    w64 = w.double().requires_grad_()
    b64 = b.double().requires_grad_()
    F.batch_norm(x64, None, None, w64, b64, True, 0.0, EPS).backward(dy.double())
    xt = x.clone().requires_grad_()
    wt, bt = w.clone().requires_grad_(), b.clone().requires_grad_()
    F.batch_norm(xt, None, None, wt, bt, True, 0.0, EPS).backward(dy)
    torch.testing.assert_close(gw.double(), w64.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gb.double(), b64.grad, rtol=1e-5, atol=1e-5)
    if dtype == torch.float32:
        torch.testing.assert_close(dx.double(), x64.grad, rtol=1e-5, atol=1e-5)
    else:
        assert_low_precision_close(dx, x64.grad, max_err(xt.grad, x64.grad), "grad_x")


@pytest.mark.parametrize("dy_layout", ["other", "expanded", "sliced"])
def test_backward_grad_in_another_layout(dy_layout):
    C, shape = 3, (2, 3, 5, 6)
    x = make_x(shape, torch.float32, "channels_last")
    w, b = params(C)
    st = make_state(C)
    ref = as_double(st)
    out, out64 = check_train_step(x, w, b, st, ref)
    if dy_layout == "other":
        dy = make_x(shape, torch.float32, "contiguous")
    elif dy_layout == "expanded":  # what y.sum().backward() delivers
        dy = torch.ones((), device=DEVICE).expand(shape)
    else:
        dy = make_x((2, 3, 5, 12), torch.float32, "contiguous")[..., ::2]
    grads = check_backward(x, dy, w, out, out64, True)
    assert is_channel_inner(grads[0])


def test_backward_without_input_grad():
    C, shape = 5, (3, 5, 4, 4)
    x = make_x(shape, torch.float32, "contiguous")
    w, b = params(C)
    st = make_state(C)
    out, out64 = check_train_step(x, w, b, st, as_double(st))
    check_backward(x, make_x(shape, torch.float32, "contiguous"), w, out, out64, True,
                   input_grad=False)


# ---- splits, finalize steps, 64-bit offsets, non-dense inputs -----------------------------------

TINY = launch.Tuning(elementwise_tile_bytes=64, unaligned_elementwise_tile=16, reduce_tile=8,
                     reduce_min_even_bytes=8, reduce_row_bytes=8, elementwise_max_block_c=4,
                     finalize_tile=8, finalize_max_splits=4,
                     programs_per_sm=64, interpreter_programs=64, max_warps=2)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_many_splits_and_finalize_steps(monkeypatch, layout):
    monkeypatch.setattr(launch, "TUNING", TINY)
    shape = (3, 5, 6, 7)
    geo = launch.geometry(make_x(shape, torch.float32, layout))
    plan = launch.reduce_plan(geo, 4, torch.device(DEVICE))
    fin = launch.finalize_plan(geo.C, plan.splits)
    # the point of this test: several splits, several finalize steps, several channel blocks
    assert plan.splits > 2 * fin.block_split and plan.c_blocks > 1 and fin.programs > 1
    assert launch.elementwise_plan(geo, 4).b_blocks > 1
    if layout == "channels_last":  # both of collect_stats' loops: full tiles and the tail
        assert 0 < plan.full_tiles < plan.tiles and geo.M % plan.block_r
    else:
        assert plan.full_tiles == plan.tiles
    C = shape[1]
    w, b = params(C)
    st = make_state(C)
    ref = as_double(st)
    for _ in range(2):
        x = make_x(shape, torch.float32, layout)
        out, out64 = check_train_step(x, w, b, st, ref)
        assert_buffers_close(st, ref, exact_dtype=True)
    for gts in (True, False):
        check_backward(x, make_x(shape, torch.float32, layout, 0.0, 1.0), w, out, out64, gts)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_64bit_offsets(monkeypatch, layout):
    """The int64 offset path, forced on a small tensor (2**31 elements would not fit CI)."""
    monkeypatch.setattr(launch, "_INT32_LIMIT", 0)
    monkeypatch.setattr(launch, "TUNING", TINY)
    shape = (2, 3, 5, 5)
    x = make_x(shape, torch.float32, layout)
    assert launch.geometry(x).int64
    C = shape[1]
    w, b = params(C)
    st = make_state(C)
    out, out64 = check_train_step(x, w, b, st, as_double(st))
    check_backward(x, make_x(shape, torch.float32, layout), w, out, out64, True)
    y, _ = EVAL(x, w, b, st["dbn_mean"], st["dbn_std"], EPS, True)
    y64, _ = REF_EVAL(x.double(), dbl(w), dbl(b), st["dbn_mean"].double(),
                      st["dbn_std"].double(), EPS, True)
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)


def test_layout_classification():
    """Which (N, C, S) view the kernels take: the contiguous dimension must be the inner one."""
    def kind(t):
        geo = launch.geometry(t)
        return None if geo is None else ("channel-inner" if geo.channels_last else "spatial-inner")

    cl = torch.channels_last
    assert kind(torch.empty(6, 5)) == "channel-inner"
    assert kind(torch.empty(6, 5, 1, 1)) == "channel-inner"  # S = 1: channels are contiguous
    assert kind(torch.empty(6, 5, 1, 1).to(memory_format=cl)) == "channel-inner"
    assert kind(torch.empty(6, 5, 3, 4)) == "spatial-inner"
    assert kind(torch.empty(6, 5, 3, 4).to(memory_format=cl)) == "channel-inner"
    assert kind(torch.empty(6, 1, 3, 4).to(memory_format=cl)) == "spatial-inner"  # C = 1
    assert kind(torch.empty(2, 5, 3, 4, 2).to(memory_format=torch.channels_last_3d)) \
        == "channel-inner"
    assert kind(torch.empty(6, 5, 3, 4)[:, :, ::2]) is None
    assert kind(torch.empty(4, 3, 5, 7).permute(1, 2, 3, 0)) is None
    geo = launch.geometry(torch.empty(4, 8, 14, 14))
    assert (geo.N, geo.C, geo.S, geo.M, geo.align) == (4, 8, 196, 784, 4)


def test_int64_threshold():
    small = launch.Geometry(N=2, C=3, S=4, channels_last=False)
    big = launch.Geometry(N=2**16, C=2**8, S=2**7, channels_last=True)  # 2**31 elements
    assert not small.int64 and big.int64


@pytest.mark.parametrize("kind", ["sliced", "permuted"])
def test_non_dense_input(kind):
    C = 3
    if kind == "sliced":
        x = make_x((4, 3, 8, 7), torch.float32, "contiguous")[:, :, ::2]
    else:  # dense, but W outermost: neither supported order
        x = make_x((7, 4, 3, 5), torch.float32, "contiguous").permute(1, 2, 3, 0)
    assert launch.geometry(x) is None
    w, b = params(C)
    st = make_state(C)
    out = train(TRAIN, x, w, b, st)
    out64 = train(REF_TRAIN, x.double(), dbl(w), dbl(b), as_double(make_state(C)))
    torch.testing.assert_close(out[0].double(), out64[0], rtol=1e-5, atol=1e-5)
    check_backward(x, torch.randn_like(x), w, out, out64, True)


def test_strided_buffers_are_updated_in_place():
    """Buffers that are not dense vectors go to the reference path, still updated in place."""
    C = 3
    backing = make_state(2 * C)
    st = {k: v if k == "num_batches_tracked" else v[::2] for k, v in backing.items()}
    ref = as_double(st)
    x = make_x((4, C, 5, 5), torch.float32, "channels_last")
    check_train_step(x, None, None, st, ref)
    assert_buffers_close(st, ref, exact_dtype=True)
    torch.testing.assert_close(backing["dbn_mean"][::2].double(), ref["dbn_mean"])


def test_empty_input():
    x = torch.empty(0, 3, 4, 4, device=DEVICE)
    y, invstd = EVAL(x, None, None, torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE),
                     EPS, True)
    assert y.shape == x.shape and invstd.shape == (3,)
    stat = torch.ones(3, device=DEVICE)
    dx, gw, gb = BACKWARD(x, x, None, stat, stat, stat, stat, stat.new_ones(()), True, True)
    assert dx.shape == x.shape and torch.equal(gb, torch.zeros(3, device=DEVICE))


# ---- determinism -----------------------------------------------------------------------------

@pytest.mark.parametrize("tuning", ["default", "tiny"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bitwise_deterministic(monkeypatch, layout, tuning):
    if tuning == "tiny":
        monkeypatch.setattr(launch, "TUNING", TINY)
    C = 5
    shape = (4, C, 7, 7) if tuning == "default" else (2, C, 4, 5)  # tiny tiles: many programs
    x = make_x(shape, torch.bfloat16, layout)
    dy = make_x(shape, torch.bfloat16, layout, 0.0, 1.0)
    w, b = params(C)
    runs = []
    for _ in range(2):
        st = make_state(C)
        outs = []
        for _ in range(2):
            out = train(TRAIN, x, w, b, st)
            outs += [*out, *BACKWARD(dy, x, w, *out[1:], True, True)]
        outs += [st[k] for k in BUFFER_ORDER]
        runs.append(outs)
    for first, second in zip(*runs):
        assert bits(first).shape == bits(second).shape
        assert torch.equal(bits(first), bits(second))


def bits(t):
    """The raw bytes of ``t``: bitwise equality, NaN included."""
    return t.reshape(-1).contiguous().view(torch.uint8)


# ---- launch planning -------------------------------------------------------------------------

RESNET_SHAPES = [(256, 64, 112, 112), (256, 256, 56, 56), (256, 512, 28, 28), (256, 1024, 14, 14),
                 (256, 2048, 7, 7), (32, 3, 224, 224), (8, 17, 1, 1), (1, 1, 1, 1000003)]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", RESNET_SHAPES, ids=str)
def test_launch_plans_cover_the_tensor(monkeypatch, shape, channels_last):
    """Pure planning logic (no kernels): every value is in exactly one tile, every split is
    non-empty, tiles are powers of two, and a GPU with 132 SMs gets at least one program per SM
    whenever there are enough tiles."""
    monkeypatch.setattr(launch, "_sm_count", lambda index: 132)
    N, C = shape[:2]
    S = math.prod(shape[2:])
    geo = launch.Geometry(N, C, S, channels_last)
    for elem in (2, 4):
        p = launch.reduce_plan(geo, elem, torch.device("cuda", 0))
        assert p.block_c & (p.block_c - 1) == 0 and p.block_r & (p.block_r - 1) == 0
        assert p.c_blocks * p.block_c >= C > (p.c_blocks - 1) * p.block_c
        reach = p.block_r if channels_last else p.block_r * p.s_blocks
        if channels_last:
            assert p.tiles * p.block_r >= geo.M > (p.tiles - 1) * p.block_r
        else:
            assert p.tiles == N * p.s_blocks and reach >= S > reach - p.block_r
        assert p.splits * p.tiles_per_split >= p.tiles > (p.splits - 1) * p.tiles_per_split
        if p.tiles * p.c_blocks >= 132:
            assert p.c_blocks * p.splits >= 132
        f = launch.finalize_plan(C, p.splits)
        assert f.programs * f.block_c >= C and f.block_split <= launch.TUNING.finalize_max_splits
        e = launch.elementwise_plan(geo, elem)
        extent_b = C if channels_last else S
        assert e.b_blocks * e.block_b >= extent_b > (e.b_blocks - 1) * e.block_b
        assert (e.programs // e.b_blocks) * e.block_a >= e.extent_a
        assert e.block_a * e.block_b * elem <= max(launch.TUNING.elementwise_tile_bytes,
                                                    e.block_b * elem)


# ---- the real compiler ------------------------------------------------------------------------

def test_every_kernel_variant_compiles_for_sm80_and_sm90(tmp_path):
    """The interpreter never runs Triton's compiler: compile every variant the launchers can
    produce, ahead of time (no GPU needed), in a process without TRITON_INTERPRET."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "dbn_kernels.triton_kernels.aot", "--arch", "80",
                           "90"], capture_output=True, text=True, env=env, timeout=600,
                          cwd=tmp_path)  # not the checkout: import the installed package
    if proc.returncode == importlib.import_module("dbn_kernels.triton_kernels.aot").API_MISMATCH:
        pytest.skip(proc.stdout.strip()[-500:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "0 failure(s)" in proc.stdout


# ---- end to end through the modules ------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_module_end_to_end(layout):
    C = 3
    torch.manual_seed(1)
    kwargs = {"alpha": dbn.inverse_power(1.0, scale=2.0), "momentum": None}
    tri = dbn.DiminishingBatchNorm2d(C, backend="triton", **kwargs).to(DEVICE)
    ref = dbn.DiminishingBatchNorm2d(C, backend="reference", dtype=torch.float64,
                                     **kwargs).to(DEVICE)
    with torch.no_grad():
        tri.weight.copy_(torch.rand(C) + 0.5)
        tri.bias.copy_(torch.randn(C))
    ref.load_state_dict(tri.state_dict())
    for step in range(3):
        x = make_x((4, C, 6, 6), torch.float32, layout)
        xa, xb = x.clone().requires_grad_(), x.double().requires_grad_()
        ya, yb = tri(xa), ref(xb)
        g = torch.randn_like(x)
        ya.backward(g)
        yb.backward(g.double())
        torch.testing.assert_close(ya.double(), yb, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xa.grad.double(), xb.grad, rtol=1e-5, atol=1e-5)
        assert is_channel_inner(ya) == is_channel_inner(x)
        assert is_channel_inner(xa.grad) == is_channel_inner(x)
        for name in ("weight", "bias"):
            torch.testing.assert_close(getattr(tri, name).grad.double(),
                                       getattr(ref, name).grad, rtol=1e-5, atol=1e-4)
        for name in ("dbn_mean", "dbn_std", "running_mean", "running_var"):
            torch.testing.assert_close(getattr(tri, name).double(), getattr(ref, name),
                                       rtol=1e-5, atol=1e-6)
        assert tri.num_batches_tracked.item() == ref.num_batches_tracked.item() == step + 1
    for eval_stats in ("dbn", "running"):
        tri.eval_stats = ref.eval_stats = eval_stats
        tri.eval(), ref.eval()
        x = make_x((2, C, 6, 6), torch.float32, layout)
        torch.testing.assert_close(tri(x).double(), ref(x.double()), rtol=1e-5, atol=1e-5)


def test_plain_batchnorm_module_matches_pytorch():
    C = 4
    tri = dbn.BatchNorm2d(C, backend="triton").to(DEVICE)
    pt = torch.nn.BatchNorm2d(C).to(DEVICE)
    for _ in range(2):
        x = make_x((3, C, 5, 5), torch.float32, "channels_last")
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = tri(xa), pt(xb)
        ya.sum().backward()
        yb.sum().backward()
        torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tri.weight.grad, pt.weight.grad, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(tri.running_var, pt.running_var, rtol=1e-5, atol=1e-6)
    assert tri.num_batches_tracked.item() == pt.num_batches_tracked.item() == 2
