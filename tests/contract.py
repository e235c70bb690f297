"""What the op-level tests share: the backends under test, inputs, states and the checks of one
training step, one backward and one evaluation against the float64 reference.

Tolerances: float32 about 1e-5 relative; float16/bfloat16 no worse than twice the error of
PyTorch's own computation at that dtype, both measured against the float64 reference.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from dbn_kernels import _extension, ops

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "channels_last"]
EPS = 1e-5
SCHEDULE = (2.0, 1.0, 0.5)  # a_k = min(1, 2 / (k + 0.5)): 1, 0.8, 0.57, ...
BUFFER_ORDER = ("running_mean", "running_var", "dbn_mean", "dbn_std", "num_batches_tracked")


@dataclass(frozen=True)
class Backend:
    """One implementation of the contract: its op prefix and the device its tensors live on."""

    name: str
    device: str

    def op(self, entry: str):
        return ops.op(self.name, entry)

    def __repr__(self):
        return self.name


REFERENCE = Backend("reference", DEVICE)


@pytest.fixture(params=["reference", "triton", pytest.param("cuda", marks=pytest.mark.gpu),
                        "emu"])
def backend(request):
    """Every backend available here (a test module imports this fixture)."""
    name = request.param
    if name == "triton":
        pytest.importorskip("triton")
        pytest.importorskip("dbn_kernels.triton_kernels")
    elif name == "cuda":
        reason = _extension.load()
        if reason is not None:
            pytest.fail(f"a GPU is present but the cuda backend is not: {reason}")
        return Backend("cuda", "cuda")
    elif name == "emu":
        return Backend(request.getfixturevalue("emulation"), "cpu")
    return Backend(name, DEVICE)


@contextlib.contextmanager
def poisoned_allocations():
    """Every uninitialised allocation (``torch.empty`` in Python, ``at::empty`` in C++) filled
    with NaN (integers: their largest value), so an output element or a partial result that a
    kernel forgets to write shows up as a mismatch."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


# ---- inputs ------------------------------------------------------------------------------------

def to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``layout="channels_last"``: channels innermost in memory for any rank >= 3."""
    if layout != "channels_last" or x.dim() < 3:
        return x
    return x.movedim(1, -1).contiguous().movedim(-1, 1)


def make_x(shape, dtype, layout, device=DEVICE, mean=2.0, std=3.0, generator=None):
    x = (torch.randn(shape, dtype=torch.float64, generator=generator) * std + mean).to(dtype)
    return to_layout(x, layout).to(device)


def is_nsc(t: torch.Tensor) -> bool:
    """Channels innermost in memory: the NSC layout (channels_last)."""
    return t.movedim(1, -1).is_contiguous()


def offset_copy(t: torch.Tensor, offset: int) -> torch.Tensor:
    """t's values and strides, stored ``offset`` elements into a fresh buffer (so its data pointer
    is only ``offset * element_size`` aligned)."""
    buf = torch.empty(offset + t.numel(), dtype=t.dtype, device=t.device)
    out = buf.as_strided(t.shape, t.stride(), offset)
    out.copy_(t)
    return out


def make_state(C, dtype=torch.float32, dbn_buffers=True, running=True, counter=True, k0=0,
               device=DEVICE):
    g = torch.Generator().manual_seed(C)
    st = {
        "running_mean": torch.randn(C, generator=g, dtype=torch.float64) if running else None,
        "running_var": torch.rand(C, generator=g, dtype=torch.float64) + 0.5 if running else None,
        "dbn_mean": torch.randn(C, generator=g, dtype=torch.float64) if dbn_buffers else None,
        "dbn_std": torch.rand(C, generator=g, dtype=torch.float64) + 0.5 if dbn_buffers else None,
    }
    st = {k: None if v is None else v.to(dtype).to(device) for k, v in st.items()}
    st["num_batches_tracked"] = torch.tensor(k0, device=device) if counter else None
    return st


def as_double(st):
    return {k: None if v is None else (v.clone() if k == "num_batches_tracked" else v.double())
            for k, v in st.items()}


def params(C, dtype=torch.float32, affine=True, device=DEVICE):
    if not affine:
        return None, None
    w = torch.rand(C, dtype=torch.float64) + 0.5
    b = torch.randn(C, dtype=torch.float64)
    return w.to(dtype).to(device), b.to(dtype).to(device)


def dbl(t):
    return None if t is None else t.double()


def train(op, x, w, b, st, momentum=0.1, schedule=SCHEDULE, normalize_with_batch=False):
    args = (x, w, b, *(st[k] for k in BUFFER_ORDER), momentum, EPS, *schedule)
    if normalize_with_batch:
        return op(*args, normalize_with_batch=True)
    return op(*args)  # the keyword left out: its default is part of the contract


# ---- comparisons -------------------------------------------------------------------------------

def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if b.numel() else 0.0


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


def check_train_step(backend, x, w, b, st, ref, momentum=0.1, schedule=SCHEDULE,
                     normalize_with_batch=False):
    """One step on ``backend`` and on the float64 reference; compares everything and returns
    both outputs."""
    out = train(backend.op("train_forward"), x, w, b, st, momentum, schedule,
                normalize_with_batch)
    out64 = train(REFERENCE.op("train_forward"), x.double(), dbl(w), dbl(b), ref, momentum,
                  schedule, normalize_with_batch)
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
        assert a.dtype == ops.stat_dtype(x) and a.shape == e.shape, name
        assert_stats_close(a, e, name)
    return out, out64


def checked_step(backend, x):
    """One checked training step on ``x`` with fresh parameters and buffers: the weight and the
    outputs of ``backend`` and of the reference, for a backward to start from."""
    C = x.shape[1]
    w, b = params(C, device=backend.device)
    st = make_state(C, device=backend.device)
    out, out64 = check_train_step(backend, x, w, b, st, as_double(st))
    return w, out, out64


def check_backward(backend, x, dy, w, out, out64, grad_through_stats, input_grad=True):
    """Backward from the saved tensors of ``out`` (the reference from those of ``out64``)."""
    grads = backend.op("backward")(dy, x, w, *out[1:], grad_through_stats, input_grad)
    grads64 = REFERENCE.op("backward")(dy.double(), x.double(), dbl(w), *out64[1:],
                                       grad_through_stats, input_grad)
    dx, gw, gb, _ = grads
    dx64, gw64, gb64, _ = grads64
    dims = [0, *range(2, x.dim())]
    # sums over M: the float32 error scales with the sum of the terms' magnitudes
    centered = x.double() - out64[1].view(1, -1, *[1] * (x.dim() - 2))
    scale_w = (dy.double() * centered).abs().sum(dims) * out64[2]
    scale_b = dy.double().abs().sum(dims)
    assert gw.dtype == gb.dtype == ops.stat_dtype(x)
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


def check_eval(backend, x, w, b, mean, spread, spread_is_std):
    y, invstd = backend.op("eval_forward")(x, w, b, mean, spread, EPS, spread_is_std)
    y64, invstd64 = REFERENCE.op("eval_forward")(x.double(), dbl(w), dbl(b), mean.double(),
                                                 spread.double(), EPS, spread_is_std)
    assert y.dtype == x.dtype and y.stride() == torch.empty_like(x).stride()
    assert invstd.dtype == ops.stat_dtype(x) and invstd.shape == (x.shape[1],)
    assert_stats_close(invstd, invstd64, "invstd")
    if x.dtype == torch.float32:
        torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    else:
        baseline = torch_forward_error(x, w, b, mean.double(), invstd64, y64)
        assert_low_precision_close(y, y64, baseline, "y")


def check_step(backend, x, dy=None, steps=2):
    """Training steps on ``x`` from fresh parameters and buffers (the second with a_k < 1 and
    mu_k != m_B), backward with and without gradient through the statistics, evaluation with
    either stored statistic: each against the float64 reference."""
    C = x.shape[1]
    w, b = params(C, device=x.device)
    st = make_state(C, device=x.device)
    ref = as_double(st)
    for _ in range(steps):
        out, out64 = check_train_step(backend, x, w, b, st, ref)
        assert_buffers_close(st, ref, exact_dtype=True)
    dy = torch.randn_like(x) if dy is None else dy
    for grad_through_stats in (True, False):
        check_backward(backend, x, dy, w, out, out64, grad_through_stats)
    check_eval(backend, x, w, b, st["dbn_mean"], st["dbn_std"], True)
    check_eval(backend, x, w, b, st["running_mean"], st["running_var"], False)


def bits(t):
    """The raw bytes of ``t``: bitwise equality, NaN included."""
    return t.reshape(-1).contiguous().view(torch.uint8)
