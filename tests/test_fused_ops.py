"""The fused epilogue of the op contract, y = relu?(normalized + residual?), on every backend
against the unfused composition in float64: the reference's normalization at float64 followed by
the add and the ReLU as separate float64 ops. Backward: the ReLU's mask comes from the saved
output (the backend's own y, given to both sides), the residual's gradient is the masked dy.

Every uninitialised allocation is poisoned with NaN (a forgotten element shows up as a mismatch).
"""

from __future__ import annotations

import pytest
import torch

from contract import (BUFFER_ORDER, DTYPES, EPS, LAYOUTS, REFERENCE, SCHEDULE, as_double,
                      assert_buffers_close, backend, dbl, make_state, make_x, params,
                      poisoned_allocations)

__all__ = ["backend"]  # the fixture, imported for pytest

EPILOGUES = {"relu": (False, True), "residual": (True, False), "residual+relu": (True, True)}
# Absolute and relative tolerance of one element of y or dx against float64 (values are O(1)):
# one rounding into the dtype plus float32 arithmetic.
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 1e-2), torch.float16: (3e-3, 2e-3)}

# Odd sizes in both layouts; 8 cases x 5 (dtype, epilogue) pairs keeps the interpreted Triton
# and the emulation affordable on CI's two cores.
CASES = [((4, 3, 7, 7), "contiguous"), ((4, 3, 7, 7), "channels_last"),
         ((5, 1, 1, 1), "contiguous"), ((3, 5, 13, 11), "channels_last"), ((6, 5), "contiguous"),
         ((3, 1000, 1, 1), "channels_last"), ((4, 6, 17), "contiguous"),
         ((2, 4, 3, 5, 7), "channels_last")]
# Every epilogue in float32; the full one (residual + ReLU) in the half types.
VARIANTS = [(torch.float32, e) for e in EPILOGUES] + [(d, "residual+relu") for d in DTYPES[1:]]


@pytest.fixture(autouse=True)
def _poisoned():
    with poisoned_allocations():
        yield


def _residual(x, other_layout=False):
    r = torch.randn(x.shape, dtype=torch.float64).to(x.dtype).to(x.device)
    if other_layout and x.dim() > 2:
        # the other memory format than x's: the kernels read it in x's order
        return r if x.is_contiguous() else r.contiguous()
    return torch.empty_like(x).copy_(r)


def _epilogue64(y64, residual, relu):
    if residual is not None:
        y64 = y64 + residual.double()
    return y64.relu() if relu else y64


def _close(actual, expected64, what):
    atol, rtol = TOL[actual.dtype]
    torch.testing.assert_close(actual.double(), expected64, atol=atol, rtol=rtol, msg=what)


def _masked(dy, y):
    return torch.where(y > 0, dy, 0)


@pytest.mark.parametrize("dtype,epilogue", VARIANTS, ids=[f"{d}-{e}" for d, e in VARIANTS])
@pytest.mark.parametrize("shape,layout", CASES,
                         ids=[f"{'x'.join(map(str, s))}-{lay}" for s, lay in CASES])
def test_train_step_and_backward(backend, shape, layout, dtype, epilogue):
    has_residual, relu = EPILOGUES[epilogue]
    dev = backend.device
    C = shape[1]
    x = make_x(shape, dtype, layout, dev)
    residual = _residual(x, other_layout=shape[0] == 4) if has_residual else None
    w, b = params(C, device=dev)
    st = make_state(C, device=dev)
    ref = as_double(st)
    step = (0.1, EPS, *SCHEDULE)
    out = backend.op("train_forward")(x, w, b, *[st[k] for k in BUFFER_ORDER], *step,
                                      residual, relu)
    out64 = REFERENCE.op("train_forward")(x.double(), dbl(w), dbl(b),
                                          *[ref[k] for k in BUFFER_ORDER], *step)
    y = out[0]
    assert y.dtype == x.dtype and y.stride() == torch.empty_like(x).stride()
    _close(y, _epilogue64(out64[0], residual, relu), "y")
    assert_buffers_close(st, ref, exact_dtype=True)

    dy = make_x(shape, dtype, layout, dev, mean=0.0, std=1.0)
    relu_output = y if relu else None
    dx, gw, gb, gres = backend.op("backward")(dy, x, w, *out[1:], True, True, relu_output,
                                              has_residual)
    dy64 = _masked(dy.double(), y) if relu else dy.double()
    dx64, gw64, gb64, _ = REFERENCE.op("backward")(dy64, x.double(), dbl(w), *out64[1:], True,
                                                   True)
    # dx's error scales with |A * dy|, A = gamma / sigma: about 1/3 here
    _close(dx, dx64, "grad_x")
    M = x.numel() // C
    torch.testing.assert_close(gb.double(), gb64, atol=1e-5 * M ** 0.5, rtol=1e-4)
    torch.testing.assert_close(gw.double(), gw64, atol=1e-5 * M ** 0.5, rtol=1e-4)
    if has_residual and relu:
        # the masked dy itself, in x's dtype and memory format: exact
        assert gres.dtype == x.dtype and gres.stride() == torch.empty_like(x).stride()
        assert torch.equal(gres, _masked(dy, y))
    else:
        assert gres.numel() == 0  # without a ReLU the residual's gradient is dy: not written


@pytest.mark.parametrize("epilogue", list(EPILOGUES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_eval_forward(backend, layout, dtype, epilogue):
    has_residual, relu = EPILOGUES[epilogue]
    dev = backend.device
    x = make_x((3, 6, 5, 7), dtype, layout, dev)
    residual = _residual(x, other_layout=True) if has_residual else None
    w, b = params(6, device=dev)
    mean = torch.randn(6, device=dev) + 2
    spread = torch.rand(6, device=dev) + 2
    for spread_is_std in (True, False):
        y, invstd = backend.op("eval_forward")(x, w, b, mean, spread, EPS, spread_is_std,
                                               residual, relu)
        y64, _ = REFERENCE.op("eval_forward")(x.double(), dbl(w), dbl(b), mean.double(),
                                              spread.double(), EPS, spread_is_std)
        _close(y, _epilogue64(y64, residual, relu), f"y, spread_is_std={spread_is_std}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_passes_compose_to_the_fused_ops(backend, layout, dtype):
    """normalize, backward_reduce and backward_dx with the epilogue give what the fused ops
    give: the sync path (a collective between the passes) computes the same step."""
    dev = backend.device
    x = make_x((4, 5, 6, 6), dtype, layout, dev)
    residual = _residual(x)
    w, b = params(5, device=dev)
    step = (0.1, EPS, *SCHEDULE)
    st, st2 = make_state(5, device=dev), make_state(5, device=dev)
    out = backend.op("train_forward")(x, w, b, *[st[k] for k in BUFFER_ORDER], *step, residual,
                                      True)
    stats = backend.op("batch_stats")(x, st2["num_batches_tracked"])
    *saved, coef = backend.op("finalize")(stats[None], w, b, *[st2[k] for k in BUFFER_ORDER],
                                          *step)
    y = backend.op("normalize")(x, coef, residual, True)
    torch.testing.assert_close(y, out[0], atol=1e-5, rtol=0)

    dy = make_x(x.shape, dtype, layout, dev, mean=0.0, std=1.0)
    dx, gw, gb, gres = backend.op("backward")(dy, x, w, *out[1:], True, True, y, True)
    sums = backend.op("backward_reduce")(dy, x, saved[0], y)
    pgw, pgb, dx_coef = backend.op("backward_finalize")(sums[None], w, *saved[1:], True, True)
    pdx, pgres = backend.op("backward_dx")(dy, x, dx_coef, y, True)
    torch.testing.assert_close(pgw, gw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pgb, gb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pdx, dx, rtol=1e-5, atol=1e-5)
    assert torch.equal(pgres, gres) and torch.equal(gres, _masked(dy, y))


def test_residual_gradient_without_input_gradient(backend):
    """Only the residual (and the parameters) need gradients: grad_x stays empty, the residual's
    gradient is still the masked dy."""
    dev = backend.device
    x = make_x((3, 4, 5, 5), torch.float32, "channels_last", dev)
    w, b = params(4, device=dev)
    st = make_state(4, device=dev)
    out = backend.op("train_forward")(x, w, b, *[st[k] for k in BUFFER_ORDER], 0.1, EPS,
                                      *SCHEDULE, _residual(x), True)
    y = out[0]
    dy = torch.randn_like(x)
    dx, gw, gb, gres = backend.op("backward")(dy, x, w, *out[1:], True, False, y, True)
    assert dx.numel() == 0
    assert torch.equal(gres, _masked(dy, y))
    _, gw_full, gb_full, _ = backend.op("backward")(dy, x, w, *out[1:], True, True, y, True)
    torch.testing.assert_close(gw, gw_full)
    torch.testing.assert_close(gb, gb_full)
    pdx, pgres = backend.op("backward_dx")(dy, x, x.new_empty((0, 4)), y, True)
    assert pdx.numel() == 0 and torch.equal(pgres, gres)


def test_relu_mask_is_read_from_the_output(backend):
    """The mask is y > 0 of the tensor passed as relu_output, not recomputed: a hand-made
    output with a known sign pattern selects exactly those elements of dy."""
    dev = backend.device
    x = make_x((2, 3, 4, 4), torch.float32, "contiguous", dev)
    w, b = params(3, device=dev)
    st = make_state(3, device=dev)
    out = backend.op("train_forward")(x, w, b, *[st[k] for k in BUFFER_ORDER], 0.1, EPS,
                                      *SCHEDULE)
    pattern = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(dev)
    pattern[0, 0, 0, 0] = 0.0  # exactly 0: masked, as PyTorch's ReLU backward
    dy = torch.randn_like(x)
    dx, _, _, gres = backend.op("backward")(dy, x, w, *out[1:], True, True, pattern, True)
    assert torch.equal(gres, _masked(dy, pattern)) and gres[0, 0, 0, 0] == 0
    dx_ref, _, _, _ = backend.op("backward")(_masked(dy, pattern), x, w, *out[1:], True, True)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(backend, layout):
    """The epilogue's arguments keep the schemas honest: declared mutations, and fakes that
    agree with the kernels (shapes, dtypes, strides)."""
    dev = backend.device
    x = make_x((3, 4, 5, 5), torch.float32, layout, dev)
    r = _residual(x)
    w, b = params(4, device=dev)
    st = make_state(4, device=dev)
    bufs = [st[k] for k in BUFFER_ORDER]
    out = REFERENCE.op("train_forward")(x, w, b, *[t.clone() for t in bufs], 0.1, EPS,
                                        *SCHEDULE, r, True)
    y, saved = out[0], out[1:]
    dy = torch.randn_like(x)
    coef = torch.randn(3, 4, device=dev)
    cases = {
        "train_forward": (x, w, b, *bufs, 0.1, EPS, *SCHEDULE, r, True),
        "eval_forward": (x, w, b, saved[0], saved[1], EPS, True, r, True),
        "normalize": (x, coef, r, True),
        "backward_reduce": (dy, x, saved[0], y),
        "backward_dx": (dy, x, torch.randn(4, 4, device=dev), y, True),
        "backward": (dy, x, w, *saved, True, True, y, True),
    }
    for entry, args in cases.items():
        torch.library.opcheck(backend.op(entry).default, args,
                              test_utils=("test_schema", "test_faketensor"))


def test_bad_residual_is_refused_before_any_buffer_changes():
    """The layers validate the epilogue before a kernel runs: buffers are untouched."""
    import dbn_kernels as dbn

    layer = dbn.BatchNorm2d(3, activation="relu")
    x = torch.randn(2, 3, 4, 4)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    for residual, error, match in ((torch.randn(2, 3, 4), ValueError, "shape"),
                                   (torch.randn(2, 3, 4, 4, dtype=torch.float64), RuntimeError,
                                    "dtype"),
                                   ([1.0], TypeError, "Tensor")):
        with pytest.raises(error, match=match):
            layer(x, residual)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="activation"):
        dbn.BatchNorm2d(3, activation="gelu")
    with pytest.raises(ValueError, match="activation"):
        layer.activation = "sigmoid"
