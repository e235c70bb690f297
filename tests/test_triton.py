"""What is specific to the triton backend: its launch planning (layouts, tiles, splits, finalize
steps, 64-bit offsets), its bitwise determinism under other tunings, its kernels through Triton's
real compiler, and the modules end to end. The op contract itself (every op, every dtype and
layout, against the float64 reference) is tests/test_op_contract.py's, on every backend.

Without a GPU these run under Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET
before the kernels are imported); with one, on CUDA tensors. Allocations are poisoned with NaN.
"""

from __future__ import annotations

import importlib
import itertools
import math
import os
import subprocess
import sys

import pytest
import torch

import dbn_kernels as dbn
from contract import (BUFFER_ORDER, DEVICE, EPS, LAYOUTS, REFERENCE, SCHEDULE, Backend,
                      as_double, assert_buffers_close, assert_stats_close, bits, check_backward,
                      check_train_step, dbl, is_nsc, make_state, make_x, params,
                      poisoned_allocations, to_layout)

pytest.importorskip("triton")
pytest.importorskip("dbn_kernels.triton_kernels")
launch = importlib.import_module("dbn_kernels.triton_kernels.launch")

TRITON = Backend("triton", DEVICE)


@pytest.fixture(autouse=True)
def _poisoned():
    with poisoned_allocations():
        yield


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
        out, out64 = check_train_step(TRITON, x, w, b, st, ref)
        assert_buffers_close(st, ref, exact_dtype=True)
    dy = make_x(shape, torch.float32, layout, mean=0.0, std=1.0)
    for gts in (True, False):
        check_backward(TRITON, x, dy, w, out, out64, gts)
    # the passes that merge their splits into one source: merge_kernel in several steps
    stats = TRITON.op("batch_stats")(x, None)
    assert_stats_close(stats, REFERENCE.op("batch_stats")(x.double(), None), "batch_stats")
    sums = TRITON.op("backward_reduce")(dy, x, out[1])
    assert_stats_close(sums, REFERENCE.op("backward_reduce")(dy.double(), x.double(),
                                                             out[1].double()), "sums")


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
    out, out64 = check_train_step(TRITON, x, w, b, st, as_double(st))
    dy = make_x(shape, torch.float32, layout)
    check_backward(TRITON, x, dy, w, out, out64, True)
    y, _ = TRITON.op("eval_forward")(x, w, b, st["dbn_mean"], st["dbn_std"], EPS, True)
    y64, _ = REFERENCE.op("eval_forward")(x.double(), dbl(w), dbl(b), st["dbn_mean"].double(),
                                          st["dbn_std"].double(), EPS, True)
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    sums = TRITON.op("backward_reduce")(dy, x, out[1])  # the count row from 64-bit tile indices
    assert torch.equal(sums[0], torch.full((C,), x.numel() // C, dtype=torch.float32))


def test_layout_classification():
    """Which (N, C, S) view the kernels take: the contiguous dimension must be the inner one."""
    def kind(t):
        geo = launch.geometry(t)
        return None if geo is None else ("NSC" if geo.channels_last else "NCS")

    cl = torch.channels_last
    assert kind(torch.empty(6, 5)) == "NSC"
    assert kind(torch.empty(6, 5, 1, 1)) == "NSC"  # S = 1: channels are contiguous
    assert kind(torch.empty(6, 5, 1, 1).to(memory_format=cl)) == "NSC"
    assert kind(torch.empty(6, 5, 3, 4)) == "NCS"
    assert kind(torch.empty(6, 5, 3, 4).to(memory_format=cl)) == "NSC"
    assert kind(torch.empty(6, 1, 3, 4).to(memory_format=cl)) == "NCS"  # C = 1
    assert kind(torch.empty(2, 5, 3, 4, 2).to(memory_format=torch.channels_last_3d)) \
        == "NSC"
    assert kind(torch.empty(6, 5, 3, 4)[:, :, ::2]) is None
    assert kind(torch.empty(4, 3, 5, 7).permute(1, 2, 3, 0)) is None
    geo = launch.geometry(torch.empty(4, 8, 14, 14))
    assert (geo.N, geo.C, geo.S, geo.M, geo.align) == (4, 8, 196, 784, 4)


def test_int64_threshold():
    small = launch.Geometry(N=2, C=3, S=4, channels_last=False)
    big = launch.Geometry(N=2**16, C=2**8, S=2**7, channels_last=True)  # 2**31 elements
    assert not small.int64 and big.int64


# ---- determinism -----------------------------------------------------------------------------

@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bitwise_deterministic_with_many_programs(monkeypatch, layout, fused):
    """Tiny tiles: many splits, finalize steps and programs, still two identical runs (fused:
    with a residual and a ReLU, and the masked backward writing the residual's gradient)."""
    monkeypatch.setattr(launch, "TUNING", TINY)
    C = 5
    shape = (2, C, 4, 5)
    x = make_x(shape, torch.bfloat16, layout)
    dy = make_x(shape, torch.bfloat16, layout, 0.0, 1.0)
    residual = make_x(shape, torch.bfloat16, layout, 0.0, 3.0) if fused else None
    w, b = params(C)
    runs = []
    for _ in range(2):
        st = make_state(C)
        outs = []
        for _ in range(2):
            out = TRITON.op("train_forward")(x, w, b, *(st[k] for k in BUFFER_ORDER), 0.1, EPS,
                                             *SCHEDULE, residual, fused)
            outs += [*out, *TRITON.op("backward")(dy, x, w, *out[1:], True, True,
                                                  out[0] if fused else None, fused)]
            outs.append(TRITON.op("batch_stats")(x, None))
        outs += [st[k] for k in BUFFER_ORDER]
        runs.append(outs)
    for first, second in zip(*runs):
        assert torch.equal(bits(first), bits(second))


# ---- the fused epilogue (residual, ReLU) -------------------------------------------------------
# Its values on every backend, dtype and layout are tests/test_fused_ops.py's; here what is
# Triton's own: tiny tiles and 64-bit offsets, operands in another memory format than x, exact
# residual gradients, and that fusing adds no launch.

def _other(layout):
    return "contiguous" if layout == "channels_last" else "channels_last"


def _train_step(backend, x, w, b, st, residual, relu):
    return backend.op("train_forward")(x, w, b, *(st[k] for k in BUFFER_ORDER), 0.1, EPS,
                                       *SCHEDULE, residual, relu)


def _assert_close(actual, expected64, what, scale=1.0):
    torch.testing.assert_close(actual.double(), expected64, rtol=1e-5, atol=1e-5 * scale,
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("int64", [False, True], ids=["int32", "int64"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fused_epilogue_tiny_tiles(monkeypatch, layout, int64):
    """The residual + ReLU forward and its masked backward under tiny tiles (many splits,
    partial tiles, several channel blocks and element-wise programs), also with 64-bit offsets,
    against the float64 reference. The residual and dy come in the other memory format (read in
    x's order after a copy); the outputs keep x's, and grad_residual is the masked dy exactly."""
    monkeypatch.setattr(launch, "TUNING", TINY)
    if int64:
        monkeypatch.setattr(launch, "_INT32_LIMIT", 0)
    shape = (3, 5, 6, 7)
    C = shape[1]
    x = make_x(shape, torch.float32, layout)
    assert launch.geometry(x).int64 == int64
    residual = make_x(shape, torch.float32, _other(layout), mean=0.0, std=1.0)
    dy = make_x(shape, torch.float32, _other(layout), mean=0.0, std=1.0)
    w, b = params(C)
    st = make_state(C)
    ref = as_double(st)
    for _ in range(2):  # the second step with a_k < 1: mu_k != m_B
        out = _train_step(TRITON, x, w, b, st, residual, True)
        out64 = _train_step(REFERENCE, x.double(), dbl(w), dbl(b), ref, residual.double(), True)
        assert_buffers_close(st, ref, exact_dtype=True)
    y = out[0]
    assert y.stride() == torch.empty_like(x).stride()
    assert (y == 0).any() and (y > 0).any()  # the ReLU clips some values, not all
    _assert_close(y, out64[0], "y")
    # the mask both backends apply: from the same output
    y64 = y.double()
    for gts, input_grad in itertools.product((True, False), repeat=2):
        grads = TRITON.op("backward")(dy, x, w, *out[1:], gts, input_grad, y, True)
        grads64 = REFERENCE.op("backward")(dy.double(), x.double(), dbl(w), *out64[1:], gts,
                                           input_grad, y64, True)
        grad_x, grad_weight, grad_bias, grad_residual = grads
        assert torch.equal(grad_residual, torch.where(y > 0, dy, 0))
        assert grad_residual.stride() == torch.empty_like(x).stride()
        _assert_close(grad_weight, grads64[1], "grad_weight", scale=10.0)
        _assert_close(grad_bias, grads64[2], "grad_bias", scale=10.0)
        if input_grad:
            assert grad_x.stride() == torch.empty_like(x).stride()
            _assert_close(grad_x, grads64[0], "grad_x")
        else:
            assert grad_x.numel() == 0
        # the same through the passes: reduce -> finalize -> dx
        sums = TRITON.op("backward_reduce")(dy, x, out[1], y)
        assert_stats_close(sums, REFERENCE.op("backward_reduce")(
            dy.double(), x.double(), out[1].double(), y64), "sums")
        coef = TRITON.op("backward_finalize")(sums[None], w, *out[2:], gts, input_grad)[2]
        dx, dres = TRITON.op("backward_dx")(dy, x, coef, y, True)
        dx64, _ = REFERENCE.op("backward_dx")(dy.double(), x.double(), coef.double(), y64, True)
        assert torch.equal(dres, grad_residual)
        if input_grad:
            _assert_close(dx, dx64, "backward_dx")
        else:
            assert dx.numel() == 0
    for spread, spread_is_std in ((st["dbn_std"], True), (st["running_var"], False)):
        mean = st["dbn_mean"] if spread_is_std else st["running_mean"]
        ye, _ = TRITON.op("eval_forward")(x, w, b, mean, spread, EPS, spread_is_std, residual,
                                          True)
        ye64, _ = REFERENCE.op("eval_forward")(x.double(), dbl(w), dbl(b), mean.double(),
                                               spread.double(), EPS, spread_is_std,
                                               residual.double(), True)
        assert ye.stride() == torch.empty_like(x).stride()
        _assert_close(ye, ye64, "eval y")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fused_epilogue_bfloat16_rounds_once(layout):
    """bfloat16: y = relu(n + residual) is rounded once, from float32: within half an ulp (and
    float32's error) of the exact value, which rounding n first and then the sum is not;
    grad_residual is dy bit for bit where y > 0."""
    shape = (4, 3, 7, 7)
    x = make_x(shape, torch.bfloat16, layout)
    residual = make_x(shape, torch.bfloat16, layout, mean=0.0, std=1.0)
    C = shape[1]
    coef = torch.stack((torch.randn(C), torch.rand(C) + 0.5, torch.randn(C))).to(DEVICE)
    y = TRITON.op("normalize")(x, coef, residual, True)
    y64 = REFERENCE.op("normalize")(x.double(), coef.double(), residual.double(), True)
    assert y.dtype == torch.bfloat16 and y.stride() == x.stride()
    # half an ulp of bfloat16 at |y64| = m * 2**e (m in [0.5, 1)) is 2**(e - 9)
    half_ulp = torch.ldexp(torch.ones_like(y64), torch.frexp(y64).exponent - 9)
    bound = half_ulp * (1 + 2.0**-12) + 1e-30

    def beyond(t):
        return ((t.double() - y64).abs() > bound).sum().item()

    twice = (REFERENCE.op("normalize")(x, coef, None, False) + residual).relu()
    assert beyond(y) == 0 and beyond(twice) > 0  # the bound tells the two apart
    dy = make_x(shape, torch.bfloat16, layout, mean=0.0, std=1.0)
    dx, dres = TRITON.op("backward_dx")(dy, x, coef[:0], y, True)
    assert dx.numel() == 0 and torch.equal(dres, torch.where(y > 0, dy, 0))


class _Launches:
    """Records every kernel launch of the triton backend: (kernel name, constexpr switches)."""

    MODULES = ("forward", "backward", "merge")

    def __init__(self, monkeypatch):
        self.log = []
        for module in self.MODULES:
            mod = importlib.import_module(f"dbn_kernels.triton_kernels.{module}")
            for name in dir(mod):
                if name.endswith("_kernel"):
                    monkeypatch.setattr(mod, name, self._wrap(name, getattr(mod, name)))

    def _wrap(self, name, kernel):
        log = self.log

        class Counted:
            def __getitem__(self, grid):
                def launch_(*args, **kwargs):
                    log.append((name, {k: v for k, v in kwargs.items() if k.isupper()}))
                    return kernel[grid](*args, **kwargs)
                return launch_
        return Counted()

    def take(self):
        names = [name for name, _ in self.log]
        switches = {name: flags for name, flags in self.log}
        self.log.clear()
        return names, switches


def test_fused_epilogue_adds_no_launch(monkeypatch):
    """The residual is read in the normalize pass and the ReLU's mask in the reduce and dx
    passes: the fused ops launch what the unfused ones do (the residual's gradient without input
    gradient is the one pass more, writing it alone), and a 0-row backward_dx that writes
    nothing launches nothing."""
    launches = _Launches(monkeypatch)
    shape = (2, 3, 4, 5)
    C = shape[1]
    x = make_x(shape, torch.float32, "channels_last")
    residual = make_x(shape, torch.float32, "channels_last", mean=0.0, std=1.0)
    dy = make_x(shape, torch.float32, "channels_last", mean=0.0, std=1.0)
    w, b = params(C)
    forward = ["collect_stats_kernel", "finalize_kernel", "normalize_kernel"]
    for fused in (False, True):
        out = _train_step(TRITON, x, w, b, make_state(C), residual if fused else None, fused)
        names, switches = launches.take()
        assert names == forward
        assert switches["normalize_kernel"]["HAS_RESIDUAL"] == switches["normalize_kernel"][
            "RELU"] == fused
        TRITON.op("eval_forward")(x, w, b, out[1], out[2], EPS, True, residual if fused else None,
                                  fused)
        assert launches.take()[0] == ["eval_normalize_kernel"]
    backward = ["backward_reduce_kernel", "backward_finalize_kernel", "backward_dx_kernel"]
    y = out[0]
    for input_grad, relu_output, residual_grad in itertools.product(
            (True, False), (None, y), (False, True)):
        TRITON.op("backward")(dy, x, w, *out[1:], True, input_grad, relu_output, residual_grad)
        names, switches = launches.take()
        writes_residual = residual_grad and relu_output is not None
        assert names == (backward if input_grad or writes_residual else backward[:2])
        assert switches["backward_reduce_kernel"]["HAS_RELU_OUTPUT"] == (relu_output is not None)
        if len(names) == 3:
            assert switches["backward_dx_kernel"]["RESIDUAL_GRAD"] == writes_residual
            assert switches["backward_dx_kernel"]["INPUT_GRAD"] == input_grad
    for relu_output, residual_grad in itertools.product((None, y), (False, True)):
        grad_x, grad_residual = TRITON.op("backward_dx")(dy, x, x.new_empty((0, C)),
                                                         relu_output, residual_grad)
        writes_residual = residual_grad and relu_output is not None
        assert launches.take()[0] == (["backward_dx_kernel"] if writes_residual else [])
        assert grad_x.numel() == 0 and grad_residual.numel() == (x.numel() if writes_residual
                                                                 else 0)


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


# ---- accuracy of the batch statistics ----------------------------------------------------------

# Few channels and few rows (one value per lane of a channels_last tile), a single channel, many
# channels with one row each, rows that no tile size divides (495 rows: with the default tuning a
# full tile of 256 and a partial one), and several channel blocks with a partial tile.
ACCURACY_SHAPES = [(2, 3, 6, 6), (4, 1, 7, 7), (8, 1000, 1, 1), (5, 7, 9, 11), (3, 130, 5, 5)]


@pytest.mark.parametrize("shape", ACCURACY_SHAPES, ids=str)
def test_batch_statistics_as_accurate_as_pytorch(shape):
    """float32 batch mean and saved batch invstd against float64, in both memory formats: within
    4x the error PyTorch has on the same values plus one float32 ulp of the mean, and
    channels_last within 2x the contiguous path's error plus half an ulp.

    Inputs of mean 3 and std 2: a merge that rounds at the size of the lane means once per lane
    errs in proportion to their spread, while a correctly rounded mean errs by half an ulp of
    |mean|; here channels_last used to be off by 4 to 6 ulp, the contiguous path by about one.
    PyTorch's errors are those of torch.var_mean for the mean and of batch norm's saved invstd on
    the contiguous input (its channels_last CPU kernel is less accurate, which would excuse the
    very error this test is for). The worst error over a dozen or more channel samples (several
    draws when C is small), so that no single lucky rounding decides."""
    C = shape[1]
    dims = [0, *range(2, len(shape))]
    gen = torch.Generator().manual_seed(20240)
    forward = TRITON.op("train_forward")
    mean_err = {layout: 0.0 for layout in (*LAYOUTS, "torch")}
    invstd_err = dict(mean_err)
    magnitude = 0.0
    for _ in range(min(4, -(-12 // C))):
        x = (torch.randn(shape, dtype=torch.float64, generator=gen) * 2.0 + 3.0).float()
        var64, mean64 = torch.var_mean(x.double(), dims, unbiased=False)
        invstd64 = (var64 + EPS).rsqrt()
        magnitude = max(magnitude, mean64.abs().max().item())

        def record(layout, mean, invstd):
            mean_err[layout] = max(mean_err[layout],
                                   (mean.double().cpu() - mean64).abs().max().item())
            rel = (invstd.double().cpu() - invstd64) / invstd64
            invstd_err[layout] = max(invstd_err[layout], rel.abs().max().item())

        for layout in LAYOUTS:
            out = forward(to_layout(x, layout).to(DEVICE), None, None, None, None, None, None,
                          None, 0.1, EPS, 1.0, 0.0, 0.0)
            record(layout, out[3], out[4])  # the saved batch mean and batch invstd
        xd = x.to(DEVICE)
        torch_mean = torch.var_mean(xd, dims, unbiased=False)[1]
        torch_invstd = torch.ops.aten.native_batch_norm(xd, None, None, None, None, True, 0.0,
                                                        EPS)[2]
        record("torch", torch_mean, torch_invstd)
    mag32 = torch.tensor(magnitude, dtype=torch.float32)
    ulp = (torch.nextafter(mag32, torch.tensor(math.inf)) - mag32).item()
    rel_ulp = 2.0**-23  # invstd's error is relative: one ulp of a value in [1, 2)
    found = f"mean errors {mean_err}, invstd errors {invstd_err}, ulp of the mean {ulp:.2e}"
    for layout in LAYOUTS:
        assert mean_err[layout] <= 4 * mean_err["torch"] + ulp, found
        assert invstd_err[layout] <= 4 * invstd_err["torch"] + rel_ulp, found
    assert mean_err["channels_last"] <= 2 * mean_err["contiguous"] + ulp / 2, found
    assert invstd_err["channels_last"] <= 2 * invstd_err["contiguous"] + rel_ulp / 2, found


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
        assert is_nsc(ya) == is_nsc(x)
        assert is_nsc(xa.grad) == is_nsc(x)
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
