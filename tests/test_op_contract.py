"""The op contract (dbn_kernels/ops.py), checked on every backend available here against the
float64 reference:

* ``reference`` on CPU (and on the GPU when there is one);
* ``triton``: under Triton's interpreter on CPU tensors without a GPU (conftest sets
  TRITON_INTERPRET before the kernels are imported), on CUDA tensors with one;
* ``cuda`` (marked ``gpu``): the compiled extension;
* ``emu``: the cuda backend's host code and kernels compiled as host C++, every CUDA thread a
  fiber (tests/emulation.py). It checks the index math, layouts, split/merge logic, a_k and every
  buffer update without a GPU; it says nothing about speed or the GPU memory model.

Every uninitialised allocation is poisoned with NaN, so an output element that a kernel forgets
to write shows up as a mismatch. What is specific to one backend (its launch planning, vector
widths, tuning, compiler) lives in that backend's test file.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from contract import (BUFFER_ORDER, DTYPES, EPS, LAYOUTS, REFERENCE, SCHEDULE, as_double,
                      assert_buffers_close, assert_low_precision_close, backend, bits,
                      check_backward, check_eval, check_step, check_train_step, checked_step, dbl,
                      is_nsc, make_state, make_x, max_err, params, poisoned_allocations, train)
from dbn_kernels import ops

__all__ = ["backend"]  # the fixture (tests/contract.py), imported for pytest


# ---- backends ----------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _poisoned():
    with poisoned_allocations():
        yield


# ---- one training step, backward and evaluation ------------------------------------------------

SHAPES = [
    (4, 3, 7, 7),      # C not a power of two, 7x7: rows not a multiple of any vector width
    (8, 16, 8, 8),     # vectorised in both layouts
    (2, 1, 5, 5),      # C = 1
    (5, 1, 1, 1),      # C = 1, 1x1
    (3, 5, 16, 16),    # M larger than one tile in both layouts
    (3, 5, 13, 11),    # M = 429: a multiple of nothing
    (6, 5),            # BatchNorm1d on (N, C)
    (5, 1000),         # C = 1000
    (3, 1000, 1, 1),   # C = 1000, 1x1
    (4, 6, 17),        # BatchNorm1d on (N, C, L)
    (2, 4, 3, 5, 7),   # BatchNorm3d
]
CASES = [(shape, layout) for shape in SHAPES for layout in (LAYOUTS if len(shape) > 2 else
                                                            LAYOUTS[:1])]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CASES,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
def test_training_backward_eval(backend, shape, layout, dtype):
    """Two training steps, backward with and without gradient through the statistics,
    evaluation with either stored statistic."""
    dev = backend.device
    check_step(backend, make_x(shape, dtype, layout, dev),
               make_x(shape, dtype, layout, dev, mean=0.3, std=1.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_parameters_and_buffers_in_input_dtype(backend, dtype):
    C = 5
    dev = backend.device
    w, b = params(C, dtype, device=dev)
    st = make_state(C, dtype, device=dev)
    for _ in range(3):
        ref = as_double(st)  # resynchronised: each step rounds the buffers once
        x = make_x((4, C, 5, 5), dtype, "channels_last", dev)
        check_train_step(backend, x, w, b, st, ref)
        assert all(st[k].dtype == dtype for k in BUFFER_ORDER[:-1])
        assert_buffers_close(st, ref, exact_dtype=False)
    check_eval(backend, x, w, b, st["dbn_mean"], st["dbn_std"], True)


@pytest.mark.parametrize("shape", [(7, 6), (2, 6, 1, 1), (2, 1, 9, 9)], ids=str)
def test_eval_statistics_in_input_dtype(backend, shape):
    C = shape[1]
    dev = backend.device
    x = make_x(shape, torch.bfloat16, "channels_last", dev)
    mean = torch.randn(C).bfloat16().to(dev)
    std = (torch.rand(C) + 0.5).bfloat16().to(dev)
    check_eval(backend, x, None, None, mean, std, True)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", ["plain_bn", "cumulative", "no_buffers", "no_affine",
                                  "weight_only", "fresh_no_affine_cumulative"])
def test_buffer_variants(backend, case, layout):
    C, shape = 3, (4, 3, 6, 6)
    dev = backend.device
    w, b = params(C, affine="no_affine" not in case, device=dev)
    if case == "weight_only":
        b = None
    momentum = None if "cumulative" in case else 0.1
    st = make_state(C, dbn_buffers=case not in ("plain_bn", "cumulative", "no_buffers"),
                    running=case != "no_buffers", counter=case != "no_buffers",
                    k0=0 if case.startswith("fresh") else 2, device=dev)
    ref = as_double(st)
    for _ in range(3):
        out, _ = check_train_step(backend, make_x(shape, torch.float32, layout, dev), w, b, st,
                                  ref, momentum=momentum)
        assert_buffers_close(st, ref, exact_dtype=True)
        if st["dbn_mean"] is None:
            assert out[5].item() == 1.0  # plain batch norm: a_k = 1


def test_several_steps_follow_the_schedule(backend):
    """Five steps through one set of buffers: a_k from the device counter after every step, for
    DBN and plain batch norm, with momentum and with the cumulative average."""
    dev = backend.device
    C = 6
    w, b = params(C, device=dev)
    for dbn_buffers, momentum in ((True, 0.1), (True, None), (False, 0.2)):
        st = make_state(C, dbn_buffers=dbn_buffers, device=dev)
        ref = as_double(st)
        for step in range(5):
            x = make_x((4, C, 5, 3), torch.float32, "channels_last", dev)
            out, _ = check_train_step(backend, x, w, b, st, ref, momentum=momentum,
                                      schedule=(1.0, 1.0, 1.0))
            assert_buffers_close(st, ref, exact_dtype=True)
            assert st["num_batches_tracked"].item() == step + 1
            expected = 1.0 if (step == 0 or not dbn_buffers) else 1.0 / (step + 2)
            assert out[5].item() == pytest.approx(expected, rel=1e-6)


def test_first_step_copies_batch_statistics(backend):
    """a_1 = 1 whatever the schedule says (here a constant 0.25)."""
    C = 4
    dev = backend.device
    st = make_state(C, device=dev)
    x = make_x((3, C, 5, 5), torch.float32, "contiguous", dev)
    out = train(backend.op("train_forward"), x, None, None, st, schedule=(0.25, 0.0, 0.0))
    assert st["num_batches_tracked"].item() == 1 and out[5].item() == 1.0
    torch.testing.assert_close(st["dbn_mean"], out[3], rtol=0, atol=0)
    torch.testing.assert_close(st["dbn_std"], 1 / out[4], rtol=1e-6, atol=0)
    torch.testing.assert_close(out[3].double(), x.double().mean((0, 2, 3)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("schedule", [(0.25, 0.0, 0.0), SCHEDULE], ids=["constant", "diminishing"])
def test_authors_variant(backend, layout, schedule):
    """``normalize_with_batch``, steps k = 1, 2, 3 against the float64 reference: the step is
    batch norm's (output, saved tensors with alpha = 1, hence BN's backward) while ``dbn_mean``
    and ``dbn_std`` take the averages of the mean and the inverse std; ``finalize`` (the passes)
    does the same as ``train_forward``."""
    C, shape = 5, (4, 5, 3, 7)
    dev = backend.device
    w, b = params(C, device=dev)
    st, passes = make_state(C, device=dev), make_state(C, device=dev)
    ref = as_double(st)
    for _ in range(3):
        x = make_x(shape, torch.float32, layout, dev)
        out, out64 = check_train_step(backend, x, w, b, st, ref, schedule=schedule,
                                      normalize_with_batch=True)
        assert_buffers_close(st, ref, exact_dtype=True)
        assert out[5].item() == 1.0
        assert torch.equal(out[1], out[3]) and torch.equal(out[2], out[4])
        # The reference itself is batch norm here, by PyTorch's float64 batch_norm.
        bn64 = F.batch_norm(x.double(), None, None, dbl(w), dbl(b), True, 0.0, EPS)
        torch.testing.assert_close(out64[0], bn64, rtol=1e-12, atol=1e-12)

        stats = backend.op("batch_stats")(x, passes["num_batches_tracked"])
        *saved, coef = backend.op("finalize")(stats[None], w, b,
                                              *(passes[k] for k in BUFFER_ORDER), 0.1, EPS,
                                              *schedule, normalize_with_batch=True)
        torch.testing.assert_close(coef, torch.stack((out[1], out[2] * w, b)), rtol=1e-6,
                                   atol=1e-6)  # (center, scale, shift) of batch norm
        torch.testing.assert_close(backend.op("normalize")(x, coef), out[0], rtol=1e-5,
                                   atol=1e-5)
        for a, e in zip(saved, out[1:]):
            torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)
        for k in BUFFER_ORDER:
            torch.testing.assert_close(passes[k], st[k], rtol=1e-6, atol=1e-6)
    check_backward(backend, x, make_x(shape, torch.float32, layout, dev, 0.0, 1.0), w, out,
                   out64, grad_through_stats=True)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_statistics_accurate_when_mean_dwarfs_std(backend, layout):
    """Welford/Chan: E[x^2] - E[x]^2 in float32 would lose every digit here."""
    C = 3
    dev = backend.device
    st = make_state(C, dbn_buffers=False, device=dev)
    ref = as_double(st)
    x = make_x((4, C, 9, 9), torch.float32, layout, dev, mean=3000.0, std=0.5)
    out = train(backend.op("train_forward"), x, None, None, st)
    out64 = train(REFERENCE.op("train_forward"), x.double(), None, None, ref)
    torch.testing.assert_close(out[4].double(), out64[4], rtol=1e-4, atol=0)  # batch_invstd
    torch.testing.assert_close(st["running_var"].double(), ref["running_var"], rtol=1e-4, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_elementwise_passes_accurate_when_mean_dwarfs_std(backend, layout):
    """The element-wise passes are centered: y = (x - mu) * scale + beta and
    dx = A*dy + B*(x - m_B) + shift. Folded into x * scale + (beta - mu*scale) (or B*x + C) they
    lose about |mu/sigma| * 2**-24 absolutely: ~4e-4 here.

    The float64 reference gets the backend's own float32 statistics (exact in float64): those
    carry their own rounding (|mu| * 2**-25 is ~1e-4 at mu = 3000, ~2e-4 in y), whatever form
    the element-wise pass takes; this test is about the element-wise pass."""
    C, shape = 3, (4, 3, 9, 9)
    dev = backend.device
    g = torch.Generator().manual_seed(7)
    w = (torch.rand(C, generator=g, dtype=torch.float64) * 0.4 + 0.8).float().to(dev)
    b = torch.randn(C, generator=g, dtype=torch.float64).float().to(dev)
    chan_mean = torch.tensor([3000.0, -2500.0, 3900.0], dtype=torch.float64)
    x64 = torch.randn(shape, generator=g, dtype=torch.float64) * 0.5 + chan_mean.view(1, C, 1, 1)
    x = x64.float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(dev)
    xd = x.double()
    st = make_state(C, device=dev)  # dbn_mean ~ 0: the first step copies the batch statistics
    for _ in range(2):  # the second step has a_k < 1 and mu_k != m_B
        out = train(backend.op("train_forward"), x, w, b, st)
    stats64 = [t.double() for t in out[1:]]
    mean64, invstd64 = stats64[0], stats64[1]

    y64, _ = REFERENCE.op("eval_forward")(xd, dbl(w), dbl(b), mean64, invstd64.reciprocal(),
                                          EPS, True)
    torch.testing.assert_close(out[0].double(), y64, rtol=0, atol=2e-5)

    # backward through the statistics; dy correlated with xhat so that B (and B*x) is large
    xhat = (xd - mean64.view(1, C, 1, 1)) * invstd64.view(1, C, 1, 1)
    noise = torch.randn(shape, generator=g, dtype=torch.float64).to(dev)
    dy = (xhat + 0.3 * noise).float()
    if layout == "channels_last":
        dy = dy.contiguous(memory_format=torch.channels_last)
    dx, _, _, _ = backend.op("backward")(dy, x, w, *out[1:], True, True)
    dx64, _, _, _ = REFERENCE.op("backward")(dy.double(), xd, dbl(w), *stats64, True, True)
    assert dx.stride() == x.stride()
    torch.testing.assert_close(dx.double(), dx64, rtol=0, atol=2e-5)

    # evaluation with stored float32 statistics of the same magnitude
    y, _ = backend.op("eval_forward")(x, w, b, st["dbn_mean"], st["dbn_std"], EPS, True)
    y64, _ = REFERENCE.op("eval_forward")(xd, dbl(w), dbl(b), st["dbn_mean"].double(),
                                          st["dbn_std"].double(), EPS, True)
    torch.testing.assert_close(y.double(), y64, rtol=0, atol=2e-5)


def test_float64_computes_in_float64(backend):
    """float64 input: every output float64, equal to the reference's (the compiled backends
    hand it to the reference)."""
    C = 3
    dev = backend.device
    x = make_x((4, C, 5, 5), torch.float64, "contiguous", dev)
    w, b = params(C, torch.float64, device=dev)
    st, st_ref = make_state(C, torch.float64, device=dev), make_state(C, torch.float64, device=dev)
    out = train(backend.op("train_forward"), x, w, b, st)
    out_ref = train(REFERENCE.op("train_forward"), x, w, b, st_ref)
    for a, e in zip([*out, *st.values()], [*out_ref, *st_ref.values()]):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    dy = torch.randn_like(x)
    for a, e in zip(backend.op("backward")(dy, x, w, *out[1:], True, True),
                    REFERENCE.op("backward")(dy, x, w, *out_ref[1:], True, True)):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_matches_pytorch_batch_norm(backend, dtype):
    """Plain batch norm (a_k = 1): gradients agree with PyTorch's, within its own error."""
    C, shape = 3, (4, 3, 5, 5)
    dev = backend.device
    x = make_x(shape, dtype, "channels_last", dev)
    w, b = params(C, device=dev)
    dy = make_x(shape, dtype, "channels_last", dev, mean=0.0, std=1.0)
    out = train(backend.op("train_forward"), x, w, None,
                make_state(C, dbn_buffers=False, device=dev))
    dx, gw, gb, _ = backend.op("backward")(dy, x, w, *out[1:], True, True)
    x64 = x.double().requires_grad_()
    w64, b64 = w.double().requires_grad_(), b.double().requires_grad_()
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
def test_backward_grad_in_another_layout(backend, dy_layout):
    shape = (2, 3, 5, 6)
    dev = backend.device
    x = make_x(shape, torch.float32, "channels_last", dev)
    w, out, out64 = checked_step(backend, x)
    if dy_layout == "other":
        dy = make_x(shape, torch.float32, "contiguous", dev)
    elif dy_layout == "expanded":  # what y.sum().backward() delivers
        dy = torch.ones((), device=dev).expand(shape)
    else:
        dy = make_x((2, 3, 5, 12), torch.float32, "contiguous", dev)[..., ::2]
    grads = check_backward(backend, x, dy, w, out, out64, True)
    assert is_nsc(grads[0])


def test_backward_without_input_grad(backend):
    shape = (3, 5, 4, 4)
    x = make_x(shape, torch.float16, "contiguous", backend.device)
    w, out, out64 = checked_step(backend, x)
    check_backward(backend, x, make_x(shape, torch.float16, "contiguous", backend.device), w, out,
                   out64, True, input_grad=False)


@pytest.mark.parametrize("kind", ["sliced", "permuted"])
def test_non_dense_input(backend, kind):
    dev = backend.device
    if kind == "sliced":
        x = make_x((4, 3, 8, 7), torch.float32, "contiguous", dev)[:, :, ::2]
    else:  # dense, but W outermost: neither supported order
        x = make_x((7, 4, 3, 5), torch.float32, "contiguous", dev).permute(1, 2, 3, 0)
    w, out, out64 = checked_step(backend, x)
    check_backward(backend, x, torch.randn_like(x), w, out, out64, True)


def test_strided_buffers_are_updated_in_place(backend):
    C = 3
    dev = backend.device
    backing = make_state(2 * C, device=dev)
    st = {k: v if k == "num_batches_tracked" else v[::2] for k, v in backing.items()}
    ref = as_double(st)
    x = make_x((4, C, 5, 5), torch.float32, "channels_last", dev)
    check_train_step(backend, x, None, None, st, ref)
    assert_buffers_close(st, ref, exact_dtype=True)
    torch.testing.assert_close(backing["dbn_mean"][::2].double(), ref["dbn_mean"])


def test_empty_input(backend):
    dev = backend.device
    x = torch.empty(0, 3, 4, 4, device=dev)
    y, invstd = backend.op("eval_forward")(x, None, None, torch.zeros(3, device=dev),
                                           torch.ones(3, device=dev), EPS, True)
    assert y.shape == x.shape and invstd.shape == (3,)
    stat = torch.ones(3, device=dev)
    dx, gw, gb, _ = backend.op("backward")(x, x, None, stat, stat, stat, stat, stat.new_ones(()),
                                        True, True)
    assert dx.shape == x.shape and torch.equal(gb, torch.zeros(3, device=dev))
    k = torch.tensor(4, device=dev)
    stats = backend.op("batch_stats")(x, k)
    assert k.item() == 5  # an empty batch still counts a step
    assert torch.equal(stats[0], torch.zeros(3, device=dev))  # and adds nothing
    sums = backend.op("backward_reduce")(x, x, stat)
    assert torch.equal(sums, torch.zeros(3, 3, device=dev))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bitwise_deterministic(backend, layout):
    """Fixed-order merges: two runs agree bit for bit (outputs, buffers, gradients)."""
    C = 5
    dev = backend.device
    x = make_x((4, C, 7, 7), torch.bfloat16, layout, dev)
    dy = make_x((4, C, 7, 7), torch.bfloat16, layout, dev, 0.0, 1.0)
    w, b = params(C, device=dev)
    runs = []
    for _ in range(2):
        st = make_state(C, device=dev)
        outs = []
        for _ in range(2):
            out = train(backend.op("train_forward"), x, w, b, st)
            outs += [*out, *backend.op("backward")(dy, x, w, *out[1:], True, True)]
        outs += [st[k] for k in BUFFER_ORDER]
        runs.append(outs)
    for first, second in zip(*runs):
        assert torch.equal(bits(first), bits(second))


# ---- the passes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_passes_compose_to_the_fused_ops(backend, layout, dtype):
    """batch_stats -> finalize -> normalize is train_forward; backward_reduce ->
    backward_finalize -> backward_dx is backward: same outputs, buffers and gradients."""
    C, shape = 5, (4, 5, 6, 7)
    dev = backend.device
    w, b = params(C, device=dev)
    fused, passes = make_state(C, k0=3, device=dev), make_state(C, k0=3, device=dev)
    x = make_x(shape, dtype, layout, dev)
    out = train(backend.op("train_forward"), x, w, b, fused)
    stats = backend.op("batch_stats")(x, passes["num_batches_tracked"])
    assert stats.shape == (3, C) and stats.dtype == torch.float32
    *saved, coef = backend.op("finalize")(stats[None], w, b,
                                          *(passes[k] for k in BUFFER_ORDER), 0.1, EPS,
                                          *(2.0, 1.0, 0.5))
    y = backend.op("normalize")(x, coef)
    assert coef.shape == (3, C)
    assert y.dtype == x.dtype and y.stride() == out[0].stride()
    rtol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y, out[0], rtol=rtol, atol=rtol)
    for a, e in zip(saved, out[1:]):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)
    for k in BUFFER_ORDER:
        torch.testing.assert_close(passes[k], fused[k], rtol=1e-6, atol=1e-6)

    dy = make_x(shape, dtype, layout, dev, 0.0, 1.0)
    for grad_through_stats in (True, False):
        dx, gw, gb, _ = backend.op("backward")(dy, x, w, *out[1:], grad_through_stats, True)
        sums = backend.op("backward_reduce")(dy, x, out[1])
        assert sums.shape == (3, C)
        assert torch.equal(sums[0], torch.full((C,), x.numel() // C, device=dev,
                                               dtype=torch.float32))
        pgw, pgb, dx_coef = backend.op("backward_finalize")(sums[None], w, *out[2:],
                                                            grad_through_stats, True)
        assert dx_coef.shape == (ops.dx_coef_rows(grad_through_stats, True), C)
        pdx, _ = backend.op("backward_dx")(dy, x, dx_coef)
        torch.testing.assert_close(pgw, gw, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pgb, gb, rtol=1e-5, atol=1e-5)
        assert pdx.dtype == x.dtype and pdx.stride() == dx.stride()
        torch.testing.assert_close(pdx, dx, rtol=rtol, atol=rtol)
    _, _, none = backend.op("backward_finalize")(sums[None], w, *out[2:], True, False)
    assert none.shape == (0, C)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_statistics_from_several_sources(backend, layout):
    """What multi-GPU training does: each process's batch reduced on its own, the statistics
    stacked and finalized together, each part normalized with the common coefficients; backward
    likewise. Uneven parts and an empty one give the single-batch result (up to reassociation)."""
    C = 4
    dev = backend.device
    x = make_x((9, C, 5, 3), torch.float32, layout, dev, mean=5.0, std=2.0)
    dy = make_x((9, C, 5, 3), torch.float32, layout, dev, 0.0, 1.0)
    parts = [slice(0, 2), slice(2, 2), slice(2, 7), slice(7, 9)]  # 2, 0, 5 and 2 samples
    w, b = params(C, device=dev)
    whole, split = make_state(C, k0=5, device=dev), make_state(C, k0=5, device=dev)
    out = train(backend.op("train_forward"), x, w, b, whole)
    grads = backend.op("backward")(dy, x, w, *out[1:], True, True)

    # only the first part counts the step: the counter is one buffer
    counters = [split["num_batches_tracked"]] + [None] * (len(parts) - 1)
    stack = torch.stack([backend.op("batch_stats")(x[p], k) for p, k in zip(parts, counters)])
    *saved, coef = backend.op("finalize")(stack, w, b, *(split[k] for k in BUFFER_ORDER), 0.1,
                                          EPS, 2.0, 1.0, 0.5)
    ys = [backend.op("normalize")(x[p], coef) for p in parts]
    assert all(is_nsc(t) == is_nsc(x) for t in ys if t.numel())
    y = torch.cat(ys)
    torch.testing.assert_close(y, out[0], rtol=1e-5, atol=1e-5)
    for a, e in zip(saved, out[1:]):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    for k in BUFFER_ORDER:
        torch.testing.assert_close(split[k], whole[k], rtol=1e-5, atol=1e-6)

    sums = torch.stack([backend.op("backward_reduce")(dy[p], x[p], saved[0]) for p in parts])
    assert sums[:, 0, 0].tolist() == [30.0, 0.0, 75.0, 30.0]  # the count row: 15 values a sample
    gw, gb, dx_coef = backend.op("backward_finalize")(sums, w, *saved[1:], True, True)
    dx = torch.cat([backend.op("backward_dx")(dy[p], x[p], dx_coef)[0] for p in parts])
    torch.testing.assert_close(gw, grads[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb, grads[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, grads[0], rtol=1e-5, atol=1e-5)


def test_stats_merge_is_accurate_when_mean_dwarfs_std(backend):
    """Chan's merge of sources whose means are large and close: no E[x^2] - E[x]^2."""
    C = 2
    dev = backend.device
    x = make_x((8, C, 9, 9), torch.float32, "contiguous", dev, mean=4000.0, std=0.25)
    stack = torch.stack([backend.op("batch_stats")(x[i:i + 2], None) for i in range(0, 8, 2)])
    _, _, batch_mean, batch_invstd, _, _ = backend.op("finalize")(
        stack, None, None, None, None, None, None, None, 0.1, EPS, 1.0, 0.0, 0.0)
    var64 = x.double().var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(batch_invstd.double(), (var64 + EPS).rsqrt(), rtol=1e-4, atol=0)
    torch.testing.assert_close(batch_mean.double(), x.double().mean((0, 2, 3)), rtol=1e-7,
                               atol=0)


# ---- the schemas, the fakes and the launches ------------------------------------------------------

def _opcheck_cases(dev, layout):
    C = 6
    x = make_x((4, C, 5, 5), torch.bfloat16, layout, dev)
    w, b = params(C, device=dev)
    st = make_state(C, k0=2, device=dev)
    bufs = [st[k] for k in BUFFER_ORDER]
    step = (0.1, EPS, 0.5, 1.0, 0.0)
    saved = REFERENCE.op("train_forward")(x, w, b, *[t.clone() for t in bufs], *step)[1:]
    dy = torch.randn_like(x)
    stats = torch.rand(2, 3, C, device=dev) + 1.0
    coef = torch.randn(3, C, device=dev)
    cases = {
        "batch_stats": (x, bufs[4]),
        "finalize": (stats, w, b, *bufs, *step),
        "normalize": (x, coef),
        "backward_reduce": (dy, x, saved[0]),
        "train_forward": (x, w, b, *bufs, *step),
        "eval_forward": (x, w, b, bufs[2], bufs[3], EPS, True),
    }
    for gts, input_grad in ((True, True), (False, True), (True, False)):
        cases[f"backward_finalize-{gts}-{input_grad}"] = (stats, w, *saved[1:], gts, input_grad)
        cases[f"backward-{gts}-{input_grad}"] = (dy, x, w, *saved, gts, input_grad)
    for rows in (4, 1):
        cases[f"backward_dx-{rows}"] = (dy, x, torch.randn(rows, C, device=dev))
    return cases


@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(backend, layout):
    """Every op's declared mutations are its real ones, and the shared fakes agree with the
    kernels (shapes, dtypes, strides)."""
    for case, args in _opcheck_cases(backend.device, layout).items():
        entry = case.split("-")[0]
        torch.library.opcheck(backend.op(entry).default, args,
                              test_utils=("test_schema", "test_faketensor"))


class _CountAten(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _launch_counter(backend, monkeypatch):
    """A function running a callable and returning how many kernels it launched."""
    if backend.name == "reference":
        # Each ATen call is a kernel launch on a GPU (and an op dispatch on CPU): count the calls
        # made by the Python implementation itself, which the op's dispatch would hide.
        reference = importlib.import_module("dbn_kernels.reference")

        def count(entry, *args):
            with _CountAten() as mode:
                getattr(reference, entry)(*args)
            return mode.calls
        return count
    if backend.name == "triton":
        launches = []

        class Counted:
            def __init__(self, kernel):
                self.kernel = kernel

            def __getitem__(self, grid):
                launches.append(grid)
                return self.kernel[grid]

        for module in ("forward", "backward", "merge"):
            module = importlib.import_module(f"dbn_kernels.triton_kernels.{module}")
            for name in dir(module):
                if name.endswith("_kernel"):
                    monkeypatch.setattr(module, name, Counted(getattr(module, name)))

        def count(entry, *args):
            launches.clear()
            backend.op(entry)(*args)
            return len(launches)
        return count
    if backend.name == "emu":
        emulation = importlib.import_module("emulation")

        def count(entry, *args):
            before = emulation.launches()
            backend.op(entry)(*args)
            return emulation.launches() - before
        return count

    def count(entry, *args):  # cuda: the kernels the profiler sees
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            backend.op(entry)(*args)
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return count


# Launches per call with weight, bias, every buffer, momentum 0.1 and a constant schedule. The
# reference's numbers are ATen calls (the last line of host overhead on a GPU); the others, kernel
# launches: the fused ops are the passes with the splits merged in the finalize, so each pass
# that hands statistics to the caller costs one launch more than its share of the fused op.
LAUNCHES = {
    "reference": {"train_forward": 28, "train_forward bn": 20, "eval_forward": 9,
                  "backward": 20, "backward no input grad": 8, "backward affine only": 10},
    "triton": {"train_forward": 3, "train_forward bn": 3, "eval_forward": 1, "backward": 3,
               "backward no input grad": 2, "backward affine only": 3,
               "batch_stats": 2, "finalize": 1, "normalize": 1, "backward_reduce": 2,
               "backward_finalize": 1, "backward_dx": 1},
    "gpu": {"train_forward": 3, "train_forward bn": 3, "eval_forward": 2, "backward": 3,
            "backward no input grad": 2, "backward affine only": 3,
            "batch_stats": 2, "finalize": 1, "normalize": 1, "backward_reduce": 2,
            "backward_finalize": 1, "backward_dx": 1},
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_launches_per_call(backend, layout, monkeypatch):
    """Launch counts of the fused ops and of the passes, pinned: a change here is a change of the
    host overhead and the memory traffic of every training step."""
    # No poisoning here: on a GPU each poisoned allocation is a fill kernel the profiler counts.
    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", False)
    count = _launch_counter(backend, monkeypatch)
    expected = LAUNCHES.get(backend.name, LAUNCHES["gpu"])
    dev = backend.device
    C = 6
    x = make_x((4, C, 5, 5), torch.float32, layout, dev)
    dy = torch.randn_like(x)
    w, b = params(C, device=dev)
    step = (0.1, EPS, 0.5, 0.0, 0.0)
    st = make_state(C, device=dev)
    bufs = [st[k] for k in BUFFER_ORDER]
    bn = [*bufs[:2], None, None, bufs[4]]
    saved = REFERENCE.op("train_forward")(x, w, b, *[t.clone() for t in bufs], *step)[1:]
    stats = REFERENCE.op("batch_stats")(x, None)[None]
    sums = REFERENCE.op("backward_reduce")(dy, x, saved[0])[None]
    calls = {
        "train_forward": ("train_forward", x, w, b, *bufs, *step),
        "train_forward bn": ("train_forward", x, w, b, *bn, *step),
        "eval_forward": ("eval_forward", x, w, b, bufs[0], bufs[1], EPS, False),
        "backward": ("backward", dy, x, w, *saved, True, True),
        "backward no input grad": ("backward", dy, x, w, *saved, True, False),
        "backward affine only": ("backward", dy, x, w, *saved, False, True),
        "batch_stats": ("batch_stats", x, bufs[4]),
        "finalize": ("finalize", stats, w, b, *bufs, *step),
        "normalize": ("normalize", x, torch.randn(3, C, device=dev)),
        "backward_reduce": ("backward_reduce", dy, x, saved[0]),
        "backward_finalize": ("backward_finalize", sums, w, *saved[1:], True, True),
        "backward_dx": ("backward_dx", dy, x, torch.randn(4, C, device=dev)),
    }
    measured = {name: count(*calls[name]) for name in expected}
    assert measured == expected
