"""What is specific to the cuda backend (csrc/): the access widths its planner picks, its grids,
the checks at its op boundary, and on a GPU the modules, torch.compile, CUDA graphs and 64-bit
indexing. The op contract itself (every op, every dtype and layout, against the float64
reference) is tests/test_op_contract.py's, on every backend, this one included.

Two runners:

* ``cuda`` (marked ``gpu``): the ``dbn::cuda_*`` ops of the built extension on a GPU;
* ``emulated`` (CPU, runs everywhere): ``dbn::emu_*``, the same host code and the same kernels
  compiled as host C++ (csrc/emulation, tests/emulation.py), every CUDA thread a fiber.
  It checks the index math, layouts, split/merge logic and planning without a GPU; it says
  nothing about speed or the GPU memory model, which only the ``cuda`` runner checks.

Tolerances of the module tests: float32 ~1e-5 relative (to the largest magnitude of the
quantity); float16 and bfloat16 outputs no worse than 2x PyTorch's own batch norm at that dtype
against the same float64 reference; gradient sums ~2e-5 relative.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import dbn_kernels as dbn
from contract import (EPS, Backend, check_backward, check_step, make_state, make_x,
                      offset_copy, poisoned_allocations)
from dbn_kernels import _extension
from emulation import last_plan, launches

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
F32_RTOL = 1e-5
SUM_RTOL = 2e-5  # float32 sums over M values (dgamma, dbeta): a few ulp more than one rounding


# ---- runners ----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def cuda_ops():
    reason = _extension.load()
    if reason is not None:
        pytest.fail(f"a GPU is present but the cuda backend is not: {reason}")
    return "cuda"


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.gpu), "emulated"])
def runner(request):
    """The backend under test, with every uninitialised allocation poisoned while the test runs
    (the module-level GPU tests below run as a user's code would, without it)."""
    if request.param == "cuda":
        backend = Backend(request.getfixturevalue("cuda_ops"), "cuda")
    else:
        backend = Backend(request.getfixturevalue("emulation"), "cpu")
    with poisoned_allocations():
        yield backend


# ---- access widths and grids --------------------------------------------------------------------

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
    x = make_x(shape, dtype, layout, runner.device)
    if storage_offset:
        x = offset_copy(x, storage_offset)
    check_step(runner, x)
    if runner.name != "emu":
        return
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
    st = make_state(16, dbn_buffers=False, device=dev)
    out = runner.op("train_forward")(x, None, None, st["running_mean"], st["running_var"], None,
                                     None, st["num_batches_tracked"], 0.1, EPS, 1.0, 0.0, 0.0)
    out64 = torch.ops.dbn.reference_train_forward(
        x.double(), None, None, None, None, None, None, None, 0.1, EPS, 1.0, 0.0, 0.0)
    saved = list(out)
    saved[3] = offset_copy(saved[3], offset)  # batch_mean
    dx, gw, gb, _ = check_backward(runner, x, gy, None, saved, out64, True)
    if runner.name == "emu":
        # The fused backward reads its dx coefficients from its own aligned workspace (batch_mean
        # is copied there): full width. The backward_dx pass reads them where the caller put them.
        assert last_plan()[1:] == [8, 1]
        sums = runner.op("backward_reduce")(gy, x, out[1])
        coef = runner.op("backward_finalize")(sums[None], None, *out[2:], True, True)[2]
        dx_pass, _ = runner.op("backward_dx")(gy, x, offset_copy(coef, offset))
        assert last_plan()[1:] == [width, int(width > 1)]
        assert torch.equal(dx_pass, dx)


@pytest.mark.parametrize("sms", ["1", "132"])
def test_split_grids(runner, monkeypatch, sms):
    """Other grid shapes (emulation: the SM count the planner sees): splits over N and S (NCS),
    over rows (NSC), long rows split into column chunks."""
    if runner.name != "emu":
        pytest.skip("the SM count is the device's")
    monkeypatch.setenv("DBN_EMULATION_SMS", sms)
    for shape, layout, dtype in (((1, 2, 96, 100), "contiguous", torch.float32),
                                 ((1, 2, 96, 100), "contiguous", torch.bfloat16),
                                 ((2, 3, 96, 96), "contiguous", torch.float16),
                                 ((16, 8, 16, 16), "channels_last", torch.bfloat16)):
        x = make_x(shape, dtype, layout, runner.device)
        check_step(runner, x)
        stack = torch.stack([runner.op("batch_stats")(x[:1], None),
                             runner.op("batch_stats")(x[1:], None)])
        merged = runner.op("finalize")(stack, None, None, None, None, None, None, None, 0.1, EPS,
                                       1.0, 0.0, 0.0)
        whole = runner.op("train_forward")(x, None, None, None, None, None, None, None, 0.1, EPS,
                                           1.0, 0.0, 0.0)
        torch.testing.assert_close(merged[2], whole[3], rtol=1e-5, atol=1e-5)  # batch_mean
        torch.testing.assert_close(merged[3], whole[4], rtol=1e-5, atol=1e-5)  # batch_invstd



# ---- the fused epilogue (residual, ReLU) ----------------------------------------------------------

def _other_layout(t: torch.Tensor) -> torch.Tensor:
    """t's values in the other memory format of a 4-D tensor."""
    if t.is_contiguous():
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


@pytest.mark.parametrize("shape,layout,dtype", [
    ((2, 1000, 2, 3), "channels_last", torch.bfloat16),
    ((2, 3, 28, 28), "contiguous", torch.float16),
    ((3, 12, 5, 7), "channels_last", torch.float32),
    ((3, 5, 7, 7), "contiguous", torch.float32),
], ids=str)
def test_epilogue_widths_and_launches(runner, shape, layout, dtype):
    """The epilogue's streams (residual; relu_output and grad_residual) take the plain pass's
    access width and add no launch; a residual in the other memory format is read in x's (one
    copy, as grad_y). The masked dy (grad_residual) exactly as the float64 reference's."""
    if runner.name != "emu":
        pytest.skip("plans and launch counts are the emulation's hooks")
    dev = runner.device
    x = make_x(shape, dtype, layout, dev)
    gy = torch.randn_like(x)
    res = torch.randn_like(x)
    step = (None, None, None, None, None, None, None, 0.1, EPS, 1.0, 0.0, 0.0)

    def run(op, *args):
        before = launches()
        out = runner.op(op)(*args)
        return out, launches() - before, last_plan()

    _, n_plain, plan = run("train_forward", x, *step)
    fused, n_fused, plan_fused = run("train_forward", x, *step, res, True)
    assert (n_fused, plan_fused) == (n_plain, plan)
    y64 = torch.ops.dbn.reference_train_forward(x.double(), *step, res.double(), True)[0]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fused[0].double(), y64, rtol=tol, atol=tol)
    _, n_other, plan_other = run("train_forward", x, *step, _other_layout(res), True)
    assert plan_other == plan and n_other >= n_plain  # + the residual's copy (an ATen op on CPU)
    y, saved = fused[0], fused[1:]
    _, n_plain, plan = run("backward", gy, x, None, *saved, True, True)
    grads, n_fused, plan_fused = run("backward", gy, x, None, *saved, True, True, y, True)
    assert (n_fused, plan_fused) == (n_plain, plan)
    grads64 = torch.ops.dbn.reference_backward(gy.double(), x.double(), None,
                                               *[t.double() for t in saved], True, True,
                                               y.double(), True)
    assert torch.equal(grads[3].double(), grads64[3])  # the masked dy, exactly
    assert grads[3].stride() == x.stride()
    # Without input gradient the element-wise pass still runs, for grad_residual alone.
    grads, n_res, _ = run("backward", gy, x, None, *saved, True, False, y, True)
    assert grads[0].numel() == 0 and torch.equal(grads[3].double(), grads64[3])
    _, n_none, _ = run("backward", gy, x, None, *saved, True, False, y, False)
    assert n_res == n_none + 1


def test_epilogue_validation(runner):
    """residual and relu_output must match x exactly (shape, dtype, device), checked before
    anything is written."""
    dev = runner.device
    x = make_x((4, 3, 5, 5), torch.float32, "contiguous", dev)
    k = torch.tensor(7, device=dev)
    step = (None, None, None, None, None, None, k, 0.1, EPS, 1.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="residual has shape"):
        runner.op("train_forward")(x, *step, x[:, :, :4], False)
    with pytest.raises(RuntimeError, match="residual has dtype"):
        runner.op("train_forward")(x, *step, x.half(), False)
    with pytest.raises(RuntimeError, match="residual has shape"):
        runner.op("train_forward")(x[:0], *step, x, True)  # an empty batch counts a step
    assert k.item() == 7
    coef = torch.zeros(3, 3, device=dev)
    with pytest.raises(RuntimeError, match="residual has dtype"):
        runner.op("normalize")(x, coef, x.double(), True)
    with pytest.raises(RuntimeError, match="residual has shape"):
        runner.op("eval_forward")(x, None, None, coef[0], coef[1] + 1, EPS, True, x[:2], True)
    mean = torch.zeros(3, device=dev)
    with pytest.raises(RuntimeError, match="relu_output has dtype"):
        runner.op("backward_reduce")(x, x, mean, x.half())
    with pytest.raises(RuntimeError, match="relu_output has shape"):
        runner.op("backward_dx")(x, x, coef[:1], x[:1], True)


# ---- the op boundary ---------------------------------------------------------------------------

def test_invalid_input_leaves_buffers_alone(runner):
    dev = runner.device
    x = make_x((4, 3, 5, 5), torch.float32, "contiguous", dev)
    st = make_state(3, device=dev)
    bufs = [st[k] for k in ("running_mean", "running_var", "dbn_mean", "dbn_std")]
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
    # the passes: stacks and coefficients of the wrong shape
    stats = runner.op("batch_stats")(x, None)
    with pytest.raises(RuntimeError, match=r"should have shape \(P, 3, C\)"):
        runner.op("finalize")(stats, None, None, *bufs, k, 0.1, EPS, 0.5, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="running_mean should contain 4 elements not 3"):
        runner.op("finalize")(torch.zeros(2, 3, 4, device=dev), None, None, *bufs, k, 0.1, EPS,
                              0.5, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="coef has shape"):
        runner.op("normalize")(x, torch.zeros(3, 4, device=dev))
    with pytest.raises(RuntimeError, match="coef has shape"):
        runner.op("backward_dx")(x, x, torch.zeros(3, 3, device=dev))
    for a, b in zip(bufs, before):
        assert torch.equal(a, b)
    assert k.item() == 7


def test_emulation_refuses_a_barrier_one_thread_never_reaches(emulation):
    """The emulator itself: a kernel where thread 0 returns before the others' __syncthreads
    (a hang on a GPU) raises instead of waiting forever, and the next launch runs normally."""
    with pytest.raises(RuntimeError, match="deadlock"):
        torch.ops.dbn.emu_divergent_barrier()
    x = make_x((4, 3, 5, 5), torch.float32, "contiguous", "cpu")
    stats = torch.ops.dbn.emu_batch_stats(x, None)  # rows (count, mean, M2)
    torch.testing.assert_close(stats[1].double(), x.double().mean(dim=(0, 2, 3)))


# ---- GPU only: the modules, torch.compile, CUDA graphs, 64-bit indexing -------------------------

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
        x = make_x((8, 32, 14, 14), dtype, layout, "cuda",
                   generator=torch.Generator().manual_seed(step))
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
    x = make_x((4, 32, 7, 7), dtype, layout, "cuda", generator=torch.Generator().manual_seed(9))
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
    dx, gw, gb, _ = torch.ops.dbn.cuda_backward(gy, x, None, *out[1:], True, True)
    assert gb[1].item() == pytest.approx(float(S), rel=1e-5)
    # dy = 1: dx = invstd * (1 - 1 - xhat * sum(xhat)/M) ~ 0 everywhere, including the tail.
    assert dx[0, 1, -4096:].float().abs().max().item() < 1e-2
