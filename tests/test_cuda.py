"""The cuda backend (csrc/) against the float64 reference.

Two runners execute the same op-level checks:

* ``cuda`` (marked ``gpu``): the ``dbn::cuda_*`` ops of the built extension on a GPU;
* ``emulated`` (CPU, runs everywhere): ``dbn::emu_*``, the same host code (binding.cpp) and the same
  kernels compiled as host C++ (csrc/emulation) with every CUDA thread a CPU thread. It checks the
  index math, layouts, split/merge logic, a_k and every buffer update without a GPU; it says
  nothing about speed or the GPU memory model, which only the ``cuda`` runner checks.

GPU-only tests at the end: the modules with ``backend="cuda"``, ``torch.compile(fullgraph=True)``,
CUDA-graph capture and replay, and 64-bit indexing on a tensor of more than 2^31 elements.

Tolerances: float32 ~1e-5 relative (to the largest magnitude of the quantity); float16 and
bfloat16 outputs no worse than 2x PyTorch's own batch norm at that dtype against the same float64
reference; statistics and gradient sums (float32 in every case) ~1e-5 relative.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dbn_kernels as dbn
from dbn_kernels import _extension

from emulation import CannotBuild, build_emulation, last_plan

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-5
F32_RTOL = 1e-5
SUM_RTOL = 2e-5  # float32 sums over M values (dgamma, dbeta): a few ulp more than one rounding


# ---- runners ----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def emulation(tmp_path_factory):
    """Build the CPU emulation (tests/emulation.py) once per test session, privately."""
    try:
        return build_emulation(tmp_path_factory.mktemp("emulation_build"))
    except CannotBuild as exc:
        pytest.skip(f"cannot build the CPU emulation: {exc}")


@pytest.fixture(scope="session")
def cuda_ops():
    reason = _extension.load()
    if reason is not None:
        pytest.fail(f"a GPU is present but the cuda backend is not: {reason}")
    return "cuda"


class Runner:
    def __init__(self, prefix: str, device: str):
        self.prefix, self.device = prefix, device

    def op(self, entry: str):
        return getattr(torch.ops.dbn, f"{self.prefix}_{entry}")

    def __repr__(self):
        return self.prefix


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.gpu), "emulated"])
def runner(request):
    if request.param == "cuda":
        return Runner(request.getfixturevalue("cuda_ops"), "cuda")
    return Runner(request.getfixturevalue("emulation"), "cpu")


# ---- inputs -----------------------------------------------------------------------------------

SHAPES = [
    (4, 3, 7, 7),       # 7x7: rows not a multiple of the vector width
    (8, 16, 8, 8),      # vectorised in both layouts
    (2, 1, 5, 5),       # C = 1
    (5, 1000),          # BatchNorm1d on (N, C), C = 1000
    (3, 1000, 1, 1),    # spatial 1x1
    (3, 5, 13, 11),     # M = 429: a multiple of nothing
    (4, 6, 17),         # 3-D (N, C, L)
    (2, 4, 3, 5, 7),    # 5-D
]


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """(N, *S, C) in memory for any rank >= 3."""
    if x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    perm = [0, *range(2, x.dim()), 1]
    inv = [perm.index(i) for i in range(x.dim())]
    return x.permute(perm).contiguous().permute(inv)


def make_x(shape, dtype, layout, device, *, offset=3.0, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype)
    x = x.to(device)
    if layout == "channels_last":
        x = channels_last(x)
    return x


def offset_copy(t: torch.Tensor, offset: int) -> torch.Tensor:
    """t's values and strides, stored ``offset`` elements into a fresh buffer (so its data pointer
    is only ``offset * element_size`` aligned)."""
    buf = torch.empty(offset + t.numel(), dtype=t.dtype, device=t.device)
    out = buf.as_strided(t.shape, t.stride(), offset)
    out.copy_(t)
    return out


def layouts_for(shape):
    return ["contiguous", "channels_last"] if len(shape) >= 3 else ["contiguous"]


CASES = [(shape, layout) for shape in SHAPES for layout in layouts_for(shape)]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (0 for empty tensors)."""
    if expected.numel() == 0:
        return 0.0
    a, e = actual.double().cpu(), expected.double().cpu()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def assert_rel(actual, expected, tol, what):
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.3e}"


def native_errors(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gy: torch.Tensor):
    """PyTorch's own batch norm at x's dtype (training, same device) against float64: relative
    errors of y and dx, the yardstick for float16/bfloat16 outputs."""
    def run(xi, gi):
        xi = xi.detach().clone().requires_grad_()
        w = weight.detach().clone().to(torch.float64 if xi.dtype == torch.float64 else
                                       torch.float32)
        b = bias.detach().clone().to(w.dtype)
        y = F.batch_norm(xi, None, None, w, b, training=True, eps=EPS)
        y.backward(gi)
        return y.detach(), xi.grad.detach()

    y64, dx64 = run(x.double(), gy.double())
    y, dx = run(x, gy)
    return rel_err(y, y64), rel_err(dx, dx64)


def output_tol(x: torch.Tensor, native_err: float, expected: torch.Tensor) -> float:
    """float32: F32_RTOL. float16/bfloat16: 2x PyTorch's own error at that dtype, where PyTorch's
    error on this quantity is taken as no less than the error of rounding the exact (float64)
    result to the dtype: the max-relative error of a rounded output depends on where its largest
    values fall in their binade, so two different quantities' errors are compared fairly only
    through that floor."""
    if x.dtype == torch.float32:
        return F32_RTOL
    rounding = rel_err(expected.to(x.dtype), expected)
    return 2.0 * max(native_err, rounding) + 1e-6


# ---- one training step, both backward variants, eval ----------------------------------------

def init_buffers(C, device, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    rm = torch.randn(C, generator=g, dtype=torch.float64)
    rv = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    dm = torch.randn(C, generator=g, dtype=torch.float64)
    ds = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    return [t.to(device=device, dtype=dtype) for t in (rm, rv, dm, ds)]


def reference_step(x, weight, bias, buffers, nbt, momentum, schedule, gy, got):
    """The float64 reference on float64 copies: outputs and updated buffers; then backward and
    eval from the runner's saved tensors and updated buffers (``got``), so that each op is checked
    on its own inputs (float32 statistics carry their own rounding: with |mean| >> std the float32
    batch mean alone moves x - m_B by an ulp of the mean, whoever computes it)."""
    xd = x.double()
    bufs = [b.double().clone() for b in buffers]
    k = nbt.clone()
    w = None if weight is None else weight.double()
    b = None if bias is None else bias.double()
    op = lambda e: getattr(torch.ops.dbn, f"reference_{e}")  # noqa: E731
    out = op("train_forward")(xd, w, b, *bufs, k, momentum, EPS, *schedule)
    saved = [t.double() for t in got[0][1:]]
    grads = {g: op("backward")(gy.double(), xd, w, *saved, g, True) for g in (True, False)}
    eb = [t.double() for t in got[1]]
    evals = {s: op("eval_forward")(xd, w, b, eb[2] if s else eb[0], eb[3] if s else eb[1], EPS, s)
             for s in (True, False)}
    return out, bufs, k, grads, evals


def runner_step(runner, x, weight, bias, buffers, nbt, momentum, schedule, gy):
    bufs = [b.clone() for b in buffers]
    k = nbt.clone()
    out = runner.op("train_forward")(x, weight, bias, *bufs, k, momentum, EPS, *schedule)
    grads = {g: runner.op("backward")(gy, x, weight, *out[1:], g, True) for g in (True, False)}
    evals = {s: runner.op("eval_forward")(x, weight, bias, bufs[2] if s else bufs[0],
                                          bufs[3] if s else bufs[1], EPS, s) for s in (True, False)}
    return out, bufs, k, grads, evals


def check_step(runner, shape, layout, dtype, *, momentum=0.1, schedule=(0.5, 1.0, 0.0), k0=3,
               affine=True, param_dtype=torch.float32, offset=3.0, scale=2.0, storage_offset=0):
    dev = runner.device
    x = make_x(shape, dtype, layout, dev, offset=offset, scale=scale)
    if storage_offset:
        x = offset_copy(x, storage_offset)
    C = shape[1]
    g = torch.Generator().manual_seed(2)
    weight = (torch.rand(C, generator=g) + 0.5).to(dev, param_dtype) if affine else None
    bias = torch.randn(C, generator=g).to(dev, param_dtype) if affine else None
    gy = torch.randn(shape, generator=g).to(dev, dtype)
    if layout == "channels_last":
        gy = channels_last(gy)
    buffers = init_buffers(C, dev, param_dtype)
    nbt = torch.tensor(k0, device=dev)

    got = runner_step(runner, x, weight, bias, buffers, nbt, momentum, schedule, gy)
    ref = reference_step(x, weight, bias, buffers, nbt, momentum, schedule, gy, got)

    w_nat = weight if weight is not None else torch.ones(C, device=dev)
    b_nat = bias if bias is not None else torch.zeros(C, device=dev)
    y_err, dx_err = native_errors(x, w_nat.float(), b_nat.float(), gy)
    buf_tol = F32_RTOL if param_dtype == torch.float32 else (
        2 ** -10 if param_dtype == torch.float16 else 2 ** -7)

    (y, mean, invstd, bmean, binvstd, alpha), bufs, k, grads, evals = got
    (ry, rmean, rinvstd, rbmean, rbinvstd, ralpha), rbufs, rk, rgrads, revals = ref
    # Output tensor: x's shape, dtype and memory format.
    assert y.shape == x.shape and y.dtype == x.dtype and y.stride() == x.stride()
    assert_rel(y, ry, output_tol(x, y_err, ry), "y")
    for name, a, e in (("mean", mean, rmean), ("invstd", invstd, rinvstd),
                       ("batch_mean", bmean, rbmean), ("batch_invstd", binvstd, rbinvstd),
                       ("alpha", alpha, ralpha)):
        assert a.dtype == torch.float32, name
        assert a.shape == e.shape, name
        assert_rel(a, e, F32_RTOL, name)
    for name, a, e in zip(("running_mean", "running_var", "dbn_mean", "dbn_std"), bufs, rbufs):
        assert a.dtype == param_dtype, name
        assert_rel(a, e, buf_tol, name)
    assert k.item() == rk.item() == k0 + 1
    for gts in (True, False):
        dx, gw, gb = grads[gts]
        rdx, rgw, rgb = rgrads[gts]
        assert dx.shape == x.shape and dx.dtype == x.dtype and dx.stride() == x.stride()
        assert_rel(dx, rdx, output_tol(x, dx_err, rdx), f"grad_x (grad_through_stats={gts})")
        assert_rel(gw, rgw, SUM_RTOL, f"grad_weight (grad_through_stats={gts})")
        assert_rel(gb, rgb, SUM_RTOL, f"grad_bias (grad_through_stats={gts})")
    for spread_is_std in (True, False):
        ey, einv = evals[spread_is_std]
        rey, reinv = revals[spread_is_std]
        assert ey.stride() == x.stride()
        assert_rel(ey, rey, output_tol(x, y_err, rey), f"eval y (spread_is_std={spread_is_std})")
        assert_rel(einv, reinv, F32_RTOL, f"eval invstd (spread_is_std={spread_is_std})")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CASES, ids=lambda v: "x".join(map(str, v))
                         if isinstance(v, tuple) else v)
def test_step_matches_reference(runner, shape, layout, dtype):
    check_step(runner, shape, layout, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_params_in_input_dtype(runner, dtype):
    """weight, bias and every buffer in the input's dtype (not float32)."""
    check_step(runner, (4, 8, 5, 5), "channels_last", dtype, param_dtype=dtype)


def test_no_affine_plain_bn_first_step(runner):
    """No weight/bias, k = 1 (a_1 = 1 whatever the schedule), momentum=None (f = 1/k)."""
    check_step(runner, (6, 5, 4, 4), "contiguous", torch.float32, affine=False, momentum=None,
               schedule=(0.25, 0.0, 0.0), k0=0)


def test_large_mean_small_std(runner):
    """|mean| >> std: Welford/Chan keeps the variance accurate where E[x^2] - E[x]^2 would not."""
    check_step(runner, (16, 4, 9, 9), "contiguous", torch.float32, offset=1000.0, scale=0.5)
    check_step(runner, (16, 4, 9, 9), "channels_last", torch.float32, offset=1000.0, scale=0.5)


# (shape, layout, dtype, storage offset in elements) -> the emulation's plans [reduction width,
# element-wise width, element-wise across] in the forward and the backward.
VECTOR_CASES = [
    # contiguous: the reduction loads the widest power of two dividing S; the element-wise pass
    # loads 16 bytes whenever S >= 16 bytes of elements (vectors may cross a channel boundary),
    # with the numel % width last elements done one by one.
    ((3, 5, 7, 7), "contiguous", torch.bfloat16, 0, [1, 8, 0]),      # S = 49, tail of 7
    ((2, 3, 14, 14), "contiguous", torch.bfloat16, 0, [4, 8, 0]),    # S = 196
    ((2, 3, 28, 28), "contiguous", torch.float16, 0, [8, 8, 0]),     # S = 784
    ((5, 3, 6), "contiguous", torch.bfloat16, 0, [2, 4, 0]),         # S = 6, tail of 2
    ((5, 3, 3), "contiguous", torch.float16, 0, [1, 2, 0]),          # S = 3, tail of 1
    ((3, 5, 7, 7), "contiguous", torch.float32, 0, [1, 4, 0]),       # S = 49, tail of 3
    ((3, 3, 6), "contiguous", torch.float32, 0, [2, 4, 0]),          # S = 6, tail of 2
    ((2, 3, 14, 14), "contiguous", torch.bfloat16, 2, [2, 2, 0]),    # 4-byte aligned x
    ((3, 5, 7, 7), "contiguous", torch.float16, 1, [1, 1, 0]),       # 2-byte aligned x
    # channels last: vectors of consecutive channels with vector coefficient loads, as wide as
    # C and the alignment allow.
    ((2, 1000, 2, 3), "channels_last", torch.bfloat16, 0, [8, 8, 1]),
    ((6, 1000), "contiguous", torch.float16, 0, [8, 8, 1]),          # (N, C): channels last
    ((3, 12, 5, 7), "channels_last", torch.float16, 0, [1, 4, 1]),
    ((4, 10, 3, 3), "channels_last", torch.bfloat16, 0, [1, 2, 1]),
    ((3, 7, 3, 3), "channels_last", torch.float16, 0, [1, 1, 0]),
    ((3, 12, 5, 7), "channels_last", torch.float32, 0, [4, 4, 1]),
    ((4, 10, 3, 3), "channels_last", torch.float32, 0, [1, 2, 1]),
    ((4, 16, 3, 3), "channels_last", torch.bfloat16, 4, [1, 4, 1]),  # 8-byte aligned x
]


@pytest.mark.parametrize("shape,layout,dtype,storage_offset,plan", VECTOR_CASES,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_vector_widths(runner, shape, layout, dtype, storage_offset, plan):
    """Every access width of the reductions and the element-wise pass, in both layouts: outputs,
    statistics and gradients against the reference; in the emulation, the planned widths too."""
    check_step(runner, shape, layout, dtype, storage_offset=storage_offset)
    if runner.prefix != "emu":
        return
    dev = runner.device
    x = make_x(shape, dtype, layout, dev)
    if storage_offset:
        x = offset_copy(x, storage_offset)
    out = runner.op("train_forward")(x, None, None, None, None, None, None, None, 0.1, EPS,
                                     1.0, 0.0, 0.0)
    assert last_plan() == plan, "forward"
    runner.op("backward")(torch.randn_like(x), x, None, *out[1:], True, True)
    assert last_plan() == plan, "backward"


@pytest.mark.parametrize("offset,width", [(1, 1), (2, 2), (4, 8)])
def test_misaligned_coefficients(runner, offset, width):
    """A batch_mean whose storage is only 4 or 8 bytes aligned: the channels-last element-wise
    pass narrows its vectors to what its coefficient loads allow (scalars, 2 floats)."""
    dev = runner.device
    x = make_x((4, 16, 3, 3), torch.bfloat16, "channels_last", dev)
    gy = torch.randn_like(x)
    out = runner.op("train_forward")(x, None, None, None, None, None, None, None, 0.1, EPS,
                                     1.0, 0.0, 0.0)
    saved = list(out[1:])
    saved[2] = offset_copy(saved[2], offset)  # batch_mean
    dx, gw, gb = runner.op("backward")(gy, x, None, *saved, True, True)
    if runner.prefix == "emu":
        # The fused backward reads its dx coefficients from its own aligned workspace (batch_mean
        # is copied there): full width. The backward_dx pass reads them where the caller put them.
        assert last_plan()[1:] == [8, 1]
        sums = runner.op("backward_reduce")(gy, x, out[1])
        coef = runner.op("backward_finalize")(sums[None], None, *out[2:], True, True)[2]
        dx_pass = runner.op("backward_dx")(gy, x, offset_copy(coef, offset))
        assert last_plan()[1:] == [width, int(width > 1)]
        assert torch.equal(dx_pass, dx)
    rdx, rgw, rgb = torch.ops.dbn.reference_backward(gy.double(), x.double(), None,
                                                     *[t.double() for t in out[1:]], True, True)
    _, dx_err = native_errors(x, torch.ones(16, device=dev), torch.zeros(16, device=dev), gy)
    assert_rel(dx, rdx, output_tol(x, dx_err, rdx), "grad_x")
    assert_rel(gw, rgw, SUM_RTOL, "grad_weight")
    assert_rel(gb, rgb, SUM_RTOL, "grad_bias")


@pytest.mark.parametrize("sms", ["1", "132"])
def test_split_grids(runner, monkeypatch, sms):
    """Other grid shapes (emulation: the SM count the planner sees): splits over N and S (NCS),
    over rows (NSC), long rows split into column chunks."""
    if runner.prefix != "emu":
        pytest.skip("the SM count is the device's")
    monkeypatch.setenv("DBN_EMULATION_SMS", sms)
    check_step(runner, (1, 2, 96, 100), "contiguous", torch.float32)
    check_step(runner, (1, 2, 96, 100), "contiguous", torch.bfloat16)
    check_step(runner, (2, 3, 96, 96), "contiguous", torch.float16)
    check_step(runner, (16, 8, 16, 16), "channels_last", torch.bfloat16)


def test_several_steps_every_buffer(runner):
    """Five training steps through one set of buffers: a_k follows the schedule from the device
    counter, and dbn_mean/dbn_std/running_mean/running_var/num_batches_tracked track the reference
    after every step (dbn and plain batch norm, momentum and cumulative average)."""
    dev = runner.device
    C = 6
    for dbn_buffers, momentum in ((True, 0.1), (True, None), (False, 0.2)):
        bufs = init_buffers(C, dev)
        ref_bufs = [b.double().clone() for b in bufs]
        if not dbn_buffers:
            bufs[2:] = [None, None]
            ref_bufs[2:] = [None, None]
        k, rk = torch.tensor(0, device=dev), torch.tensor(0, device=dev)
        w = torch.rand(C, device=dev) + 0.5
        b = torch.randn(C, device=dev)
        sched = (1.0, 1.0, 1.0)  # a_k = 1 / (k + 1) after the first step
        for step in range(5):
            x = make_x((4, C, 5, 3), torch.float32, "channels_last", dev, seed=step)
            out = runner.op("train_forward")(x, w, b, *bufs, k, momentum, EPS, *sched)
            rout = torch.ops.dbn.reference_train_forward(x.double(), w.double(), b.double(),
                                                         *ref_bufs, rk, momentum, EPS, *sched)
            assert k.item() == rk.item() == step + 1
            expected_alpha = 1.0 if (step == 0 or not dbn_buffers) else 1.0 / (step + 2)
            assert out[5].item() == pytest.approx(expected_alpha, rel=1e-6)
            for name, a, e in zip(("y", "mean", "invstd", "batch_mean", "batch_invstd"), out,
                                  rout):
                assert_rel(a, e, F32_RTOL, f"step {step}: {name}")
            for name, a, e in zip(("running_mean", "running_var", "dbn_mean", "dbn_std"), bufs,
                                  ref_bufs):
                if e is not None:
                    assert_rel(a, e, F32_RTOL, f"step {step}: {name}")


def test_no_buffers(runner):
    """track_running_stats=False: batch statistics only, no counter, a_k = 1."""
    dev = runner.device
    x = make_x((5, 3, 6, 6), torch.bfloat16, "contiguous", dev)
    out = runner.op("train_forward")(x, None, None, None, None, None, None, None, 0.1, EPS,
                                     0.25, 0.0, 0.0)
    rout = torch.ops.dbn.reference_train_forward(x.double(), None, None, None, None, None, None,
                                                 None, 0.1, EPS, 0.25, 0.0, 0.0)
    assert out[5].item() == 1.0
    for name, a, e in zip(("mean", "invstd", "batch_mean", "batch_invstd"), out[1:5], rout[1:5]):
        assert_rel(a, e, F32_RTOL, name)


def test_deterministic(runner):
    """Fixed-order merges: two runs are bitwise equal (outputs, buffers, gradients)."""
    for layout in ("contiguous", "channels_last"):
        x = make_x((8, 12, 9, 9), torch.bfloat16, layout, runner.device)
        gy = torch.randn_like(x)
        results = []
        for _ in range(2):
            bufs = init_buffers(12, runner.device)
            k = torch.tensor(4, device=runner.device)
            out = runner.op("train_forward")(x, None, None, *bufs, k, 0.1, EPS, 0.5, 1.0, 0.0)
            grad = runner.op("backward")(gy, x, None, *out[1:], True, True)
            results.append([*out, *bufs, *grad])
        for a, b in zip(*results):
            assert torch.equal(a, b)


def test_float64_routes_to_reference(runner):
    x = make_x((4, 3, 5, 5), torch.float64, "contiguous", runner.device)
    bufs = init_buffers(3, runner.device, torch.float64)
    rbufs = [b.clone() for b in bufs]
    k, rk = torch.tensor(2, device=runner.device), torch.tensor(2, device=runner.device)
    out = runner.op("train_forward")(x, None, None, *bufs, k, 0.1, EPS, 0.5, 1.0, 0.0)
    rout = torch.ops.dbn.reference_train_forward(x, None, None, *rbufs, rk, 0.1, EPS, 0.5, 1.0,
                                                 0.0)
    for a, b in zip([*out, *bufs, k], [*rout, *rbufs, rk]):
        assert torch.equal(a, b)
    assert out[1].dtype == torch.float64


def test_strided_input_and_mixed_grad_layout(runner):
    """Other strides go through a copy; dy in another memory format than x; outputs keep x's."""
    dev = runner.device
    base = make_x((6, 4, 10, 12), torch.float32, "contiguous", dev)
    x = base[:, :, ::2, 1:]  # not dense
    out = runner.op("train_forward")(x, None, None, None, None, None, None, None, 0.1, EPS,
                                     1.0, 0.0, 0.0)
    rout = torch.ops.dbn.reference_train_forward(x.double(), None, None, None, None, None, None,
                                                 None, 0.1, EPS, 1.0, 0.0, 0.0)
    assert out[0].stride() == torch.empty_like(x).stride()
    assert_rel(out[0], rout[0], F32_RTOL, "y")
    xc = channels_last(make_x((4, 6, 5, 5), torch.float32, "contiguous", dev))
    out = runner.op("train_forward")(xc, None, None, None, None, None, None, None, 0.1, EPS,
                                     1.0, 0.0, 0.0)
    gy = torch.randn(xc.shape, device=dev)  # contiguous, x is channels_last
    dx, gw, gb = runner.op("backward")(gy, xc, None, *out[1:], True, True)
    rdx, rgw, rgb = torch.ops.dbn.reference_backward(gy.double(), xc.double(), None,
                                                     *[t.double() for t in out[1:]], True, True)
    assert dx.stride() == xc.stride()
    assert_rel(dx, rdx, F32_RTOL, "grad_x")
    assert_rel(gb, rgb, SUM_RTOL, "grad_bias")


def test_backward_without_input_grad(runner):
    x = make_x((4, 3, 5, 5), torch.float16, "contiguous", runner.device)
    out = runner.op("train_forward")(x, None, None, None, None, None, None, None, 0.1, EPS,
                                     1.0, 0.0, 0.0)
    dx, gw, gb = runner.op("backward")(torch.ones_like(x), x, None, *out[1:], True, False)
    assert dx.numel() == 0
    assert_rel(gb, torch.full((3,), 100.0), SUM_RTOL, "grad_bias")


def test_invalid_input_leaves_buffers_alone(runner):
    dev = runner.device
    x = make_x((4, 3, 5, 5), torch.float32, "contiguous", dev)
    bufs = init_buffers(3, dev)
    before = [b.clone() for b in bufs]
    k = torch.tensor(7, device=dev)
    with pytest.raises(RuntimeError, match="weight should contain 3 elements not 4"):
        runner.op("train_forward")(x, torch.ones(4, device=dev), None, *bufs, k, 0.1, EPS, 0.5,
                                   1.0, 0.0)
    with pytest.raises(RuntimeError, match="dtype"):
        runner.op("train_forward")(x, None, None, bufs[0].half(), bufs[1], *bufs[2:], k, 0.1, EPS,
                                   0.5, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        runner.op("train_forward")(x, None, None, *bufs, None, 0.1, EPS, 0.5, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="Expected more than 1 value per channel"):
        runner.op("train_forward")(x[:1, :, :1, :1], None, None, *bufs, k, 0.1, EPS, 0.5, 1.0,
                                   0.0)
    for a, b in zip(bufs, before):
        assert torch.equal(a, b)
    assert k.item() == 7


# ---- GPU only: the modules, torch.compile, CUDA graphs, 64-bit indexing -------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(cuda_ops, layout):
    """The declared mutations are the real ones, and the fakes agree with the kernels (shapes,
    dtypes, strides)."""
    x = make_x((4, 8, 6, 6), torch.bfloat16, layout, "cuda")
    bufs = init_buffers(8, "cuda")
    k = torch.tensor(2, device="cuda")
    w, b = torch.rand(8, device="cuda") + 0.5, torch.randn(8, device="cuda")
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.dbn.cuda_train_forward.default,
                          (x, w, b, *bufs, k, 0.1, EPS, 0.5, 1.0, 0.0), test_utils=utils)
    out = torch.ops.dbn.cuda_train_forward(x, w, b, *bufs, k, 0.1, EPS, 0.5, 1.0, 0.0)
    torch.library.opcheck(torch.ops.dbn.cuda_eval_forward.default,
                          (x, w, b, bufs[2], bufs[3], EPS, True), test_utils=utils)
    for input_grad in (True, False):
        torch.library.opcheck(torch.ops.dbn.cuda_backward.default,
                              (torch.randn_like(x), x, w, *out[1:], True, input_grad),
                              test_utils=utils)


def _module_pair(cls, C, dtype_params=torch.float32, **kwargs):
    torch.manual_seed(0)
    m = cls(C, backend="cuda", **kwargs).cuda()
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_()
    ref = copy.deepcopy(m).double()
    ref.backend = "reference"
    return m, ref


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_module_training_and_eval(cuda_ops, dtype, layout):
    m, ref = _module_pair(dbn.DiminishingBatchNorm2d, 32, alpha=dbn.inverse_power(1.0))
    for step in range(3):
        x = make_x((8, 32, 14, 14), dtype, layout, "cuda", seed=step)
        gy = torch.randn_like(x)
        xa = x.detach().clone().requires_grad_()
        xr = x.detach().double().requires_grad_()
        y = m(xa)
        yr = ref(xr)
        y.backward(gy)
        yr.backward(gy.double())
        y_err, dx_err = native_errors(x, m.weight.detach(), m.bias.detach(), gy)
        assert_rel(y, yr, output_tol(x, y_err, yr), f"step {step}: y")
        assert_rel(xa.grad, xr.grad, output_tol(x, dx_err, xr.grad), f"step {step}: grad_x")
        assert_rel(m.weight.grad, ref.weight.grad, SUM_RTOL, "grad_weight")
        assert_rel(m.bias.grad, ref.bias.grad, SUM_RTOL, "grad_bias")
        for name in ("running_mean", "running_var", "dbn_mean", "dbn_std"):
            assert_rel(getattr(m, name), getattr(ref, name), F32_RTOL, f"step {step}: {name}")
        assert m.num_batches_tracked.item() == ref.num_batches_tracked.item() == step + 1
    m.eval()
    ref.eval()
    x = make_x((4, 32, 7, 7), dtype, layout, "cuda", seed=9)
    for eval_stats in ("dbn", "running"):
        m.eval_stats = ref.eval_stats = eval_stats
        y_err, _ = native_errors(x, m.weight.detach(), m.bias.detach(), torch.randn_like(x))
        yr = ref(x.double())
        assert_rel(m(x), yr, output_tol(x, y_err, yr), f"eval ({eval_stats})")


@pytest.mark.gpu
def test_plain_batchnorm_matches_torch(cuda_ops):
    """a_k = 1: BatchNorm2d(backend='cuda') is nn.BatchNorm2d (outputs, grads, buffers)."""
    torch.manual_seed(0)
    ours = dbn.BatchNorm2d(64, backend="cuda").cuda()
    theirs = torch.nn.BatchNorm2d(64).cuda()
    theirs.load_state_dict(ours.state_dict())
    for _ in range(3):
        x = torch.randn(16, 64, 28, 28, device="cuda")
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        gy = torch.randn_like(ya)
        ya.backward(gy)
        yb.backward(gy)
        assert_rel(ya, yb, 1e-5, "y")
        assert_rel(xa.grad, xb.grad, 1e-4, "grad_x")
        for name in ("running_mean", "running_var"):
            assert_rel(getattr(ours, name), getattr(theirs, name), 1e-5, name)
        assert torch.equal(ours.num_batches_tracked, theirs.num_batches_tracked)


@pytest.mark.gpu
def test_torch_compile_fullgraph(cuda_ops):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1),
                                dbn.DiminishingBatchNorm2d(8, backend="cuda"),
                                torch.nn.ReLU()).cuda()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    for step in range(3):
        x = torch.randn(4, 3, 16, 16, device="cuda")
        y = compiled(x)
        ye = eager(x)
        y.sum().backward()
        ye.sum().backward()
        assert_rel(y, ye, 1e-5, f"step {step}: y")
        assert_rel(model[0].weight.grad, eager[0].weight.grad, 1e-4, "conv grad")
    bn, bn_e = model[1], eager[1]
    assert bn.num_batches_tracked.item() == bn_e.num_batches_tracked.item() == 3
    for name in ("running_mean", "running_var", "dbn_mean", "dbn_std"):
        assert_rel(getattr(bn, name), getattr(bn_e, name), 1e-5, name)


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay(cuda_ops):
    """A training step (forward, backward) captured once and replayed: the counter, a_k and the
    buffers advance on every replay exactly as eager steps would."""
    torch.manual_seed(0)
    C = 16
    bn = dbn.DiminishingBatchNorm2d(C, alpha=dbn.inverse_power(1.0), backend="cuda").cuda()
    eager = copy.deepcopy(bn)
    static_x = torch.randn(8, C, 10, 10, device="cuda", requires_grad=True)

    def step(module, x):
        y = module(x)
        y.square().mean().backward()
        return y

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    warmup = 3
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step(bn, static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = step(bn, static_x)
    replays = 4
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    for _ in range(warmup + replays):
        ye = step(eager, static_x)
    assert bn.num_batches_tracked.item() == eager.num_batches_tracked.item() == warmup + replays
    for name in ("running_mean", "running_var", "dbn_mean", "dbn_std"):
        assert_rel(getattr(bn, name), getattr(eager, name), 1e-5, name)
    assert_rel(static_y, ye, 1e-5, "y of the last replay")


@pytest.mark.gpu
@pytest.mark.slow
def test_64bit_indexing(cuda_ops):
    """More than 2^31 elements: every offset past 2^31 is computed in 64 bits."""
    S = (1 << 30) + (1 << 19) + 8  # two channels: 2^31 + 2^20 + 16 elements
    numel = 2 * S
    need = numel * 2 * 4  # x, y, dy, dx in bfloat16
    free, _ = torch.cuda.mem_get_info()
    if free < need + (8 << 30):
        pytest.skip(f"needs about {(need + (8 << 30)) >> 30} GiB of free GPU memory")
    x = torch.empty(1, 2, S, device="cuda", dtype=torch.bfloat16)
    x[0, 0].normal_(0.0, 1.0)
    x[0, 1].normal_(5.0, 2.0)
    out = torch.ops.dbn.cuda_train_forward(x, None, None, None, None, None, None, None, 0.1, EPS,
                                           1.0, 0.0, 0.0)
    y, mean, invstd = out[0], out[1], out[2]
    for c in range(2):
        var, m = torch.var_mean(x[0, c].float(), correction=0)
        assert mean[c].item() == pytest.approx(m.item(), rel=1e-4, abs=1e-4)
        assert invstd[c].item() == pytest.approx((var + EPS).rsqrt().item(), rel=1e-4)
        for sl in (slice(0, 4096), slice(S - 4096, S)):
            expect = (x[0, c, sl].float() - mean[c]) * invstd[c]
            # within one bfloat16 ulp of the float32 value
            assert ((y[0, c, sl].float() - expect).abs() <= expect.abs() * 2 ** -7 + 2 ** -9).all()
    del y
    gy = torch.ones_like(x)
    dx, gw, gb = torch.ops.dbn.cuda_backward(gy, x, None, *out[1:], True, True)
    assert gb[1].item() == pytest.approx(float(S), rel=1e-5)
    # dy = 1: dx = invstd * (1 - 1 - xhat * sum(xhat)/M) ~ 0 everywhere, including the tail.
    assert dx[0, 1, -4096:].float().abs().max().item() < 1e-2
