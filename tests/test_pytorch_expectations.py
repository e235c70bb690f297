"""What PyTorch's own tests expect of ``nn.BatchNorm1d/2d/3d``, asked of the project's layers.

The list of expectations is PyTorch's: the ModuleInfo entries of the three modules in
``torch/testing/_internal/common_modules.py`` (their forward samples, run in training and eval,
with first and second derivatives, and their error inputs) and the batch-norm tests of PyTorch's
``test/test_nn.py`` (memory formats, non-contiguous inputs, float16 overflow, a large batch,
``load_state_dict`` of old checkpoints, empty batches). Every check compares with PyTorch's own
layer run on the same input in the same state, never with numbers taken from the implementation:
outputs, every buffer (``num_batches_tracked`` exactly), input and parameter gradients, second
derivatives and the exception a bad call raises.

The project's layers: ``BatchNorm*d`` (kind ``bn``) and ``DiminishingBatchNorm*d`` with a_k = 1
evaluated on the running statistics (kind ``dbn-a1``), which is batch norm exactly. Backends: the
reference, Triton (its interpreter on CPU), the cuda backend's CPU emulation (``emu``) and, on a
GPU, ``cuda`` (marked ``gpu``). The interpreter and the emulation are slow, so they run a
representative subset of each test's cases. float64 runs the reference (the other backends
compute float64 with it too), so they are checked in float32.

``test_torch_parity.py`` checks the module samples in float32 on the reference and the
interpreter (taken from the installed torch's module_db); here they are the file's own table,
checked against module_db, in float64 on the reference and on the emulation too. Its
channels_last checks are extended here to 3d, to the emulation, and to an output gradient in the
other memory format.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import dbn_kernels as dbn
from layer_backends import prepare_layer_backend
from torch_compat import torch_norm

HAS_CUDA = torch.cuda.is_available()
TORCH_CLS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
PLAIN = {1: dbn.BatchNorm1d, 2: dbn.BatchNorm2d, 3: dbn.BatchNorm3d}
DIMINISHING = {1: dbn.DiminishingBatchNorm1d, 2: dbn.DiminishingBatchNorm2d,
               3: dbn.DiminishingBatchNorm3d}
DIMS_OF = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}

# The Diminishing layer's options per kind. a_k = 1 with eval on the running statistics is batch
# norm; "dbn" (a_k = 1/2 after the first step) has no counterpart in PyTorch and is used where a
# check needs none (gradgradcheck).
KINDS = {"bn": None,
         "dbn-a1": dict(alpha=1.0, eval_stats="running"),
         "dbn": dict(alpha=0.5, eval_stats="dbn")}

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12),
       torch.float32: dict(rtol=1e-5, atol=1e-5)}
# Parameter gradients are sums over the batch: their rounding grows with it.
GRAD_TOL = {torch.float64: dict(rtol=1e-10, atol=1e-11),
            torch.float32: dict(rtol=2e-5, atol=2e-5)}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """PyTorch's CPU kernels on one thread: these inputs are tiny, and on a loaded machine its
    thread pool's synchronisation costs a hundred times the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- backends ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Impl:
    """One backend under test: the layers' ``backend`` and the device its tensors live on."""

    name: str
    device: str
    slow: bool  # interpreted or emulated: a subset of the cases

    @property
    def dtype(self) -> torch.dtype:
        """float64 checks the reference tightly; the kernels compute float32 (their float64 is
        the reference's)."""
        return torch.float64 if self.name == "reference" else torch.float32


IMPLS = {
    "reference": Impl("reference", "cpu", False),
    "triton": Impl("triton", "cuda" if HAS_CUDA else "cpu", not HAS_CUDA),
    "emu": Impl("emu", "cpu", True),
    "cuda": Impl("cuda", "cuda", False),
}


def cases(items, *, slow_subset=None):
    """pytest params ``(backend, *item)`` for every backend (``cuda`` marked ``gpu``); the slow
    backends (the interpreter, the emulation) get only the items ``slow_subset(*item)``
    accepts."""
    params = []
    for name, impl in IMPLS.items():
        for item in items:
            item = item if isinstance(item, tuple) else (item,)
            if impl.slow and slow_subset is not None and not slow_subset(*item):
                continue
            params.append(pytest.param(
                name, *item, id="-".join([name, *map(_id, item)]),
                marks=[pytest.mark.gpu] if name == "cuda" else []))
    return params


def _id(value) -> str:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, torch.memory_format):
        return str(value).removeprefix("torch.")
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return str(value)


def use(backend: str, request) -> Impl:
    """Set the backend up for a test and return it."""
    prepare_layer_backend(backend, request)
    return IMPLS[backend]


# ---- layers ------------------------------------------------------------------------------------

def ours(kind: str, dims: int, *args, impl: Impl, dtype=None, **kwargs):
    """The project's layer of ``kind`` with PyTorch's constructor arguments."""
    cls = PLAIN[dims] if kind == "bn" else DIMINISHING[dims]
    layer = cls(*args, **kwargs, **(KINDS[kind] or {}))
    layer.backend = impl.name  # after construction: "emu" is not a name the layers validate
    return layer.to(impl.device, dtype or impl.dtype)


def theirs(dims: int, *args, impl: Impl, dtype=None, **kwargs):
    return torch_norm(TORCH_CLS[dims], *args, **kwargs).to(impl.device, dtype or impl.dtype)


def randomise(module, steps_tracked=3):
    """Parameters and running statistics away from their initial values, and a step count (so
    that momentum=None's 1/k reads it)."""
    with torch.no_grad():
        if module.weight is not None:
            module.weight.uniform_(0.5, 1.5)
        if module.bias is not None:
            module.bias.uniform_(-1, 1)
        if module.running_mean is not None:
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.num_batches_tracked.fill_(steps_tracked)


def pair(kind, dims, *args, impl, dtype=None, **kwargs):
    """PyTorch's layer, randomised, and the project's holding its state_dict (strictly)."""
    expected = theirs(dims, *args, impl=impl, dtype=dtype, **kwargs)
    randomise(expected)
    actual = ours(kind, dims, *args, impl=impl, dtype=dtype, **kwargs)
    actual.load_state_dict(expected.state_dict(), strict=True)
    return expected, actual


def make_x(shape, dtype, device, scale=2.0):
    """Per-channel offsets and spreads, so that every term of the statistics matters."""
    C = shape[1] if len(shape) > 1 else 1
    view = (1, C) + (1,) * (len(shape) - 2)
    offset = torch.linspace(-1.5, 2.0, C, dtype=torch.float64).view(view)
    spread = torch.linspace(0.5, scale, C, dtype=torch.float64).view(view)
    return (torch.randn(shape, dtype=torch.float64) * spread + offset).to(device, dtype)


def assert_buffers_equal(actual, expected, tol):
    """Every buffer PyTorch's layer has, equal in ours (num_batches_tracked exactly); the ones it
    lacks (``track_running_stats=False``) absent from ours too."""
    mine = dict(actual.named_buffers())
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        b = getattr(expected, name)
        if b is None:
            assert getattr(actual, name) is None, name
        elif b.dtype == torch.long:
            assert torch.equal(mine[name].cpu(), b.cpu()), (name, mine[name], b)
        else:
            torch.testing.assert_close(mine[name], b.to(mine[name].dtype), **tol,
                                       msg=lambda m: f"{name}: {m}")


def check_step(expected, actual, x, *, tol, grad_tol, grad_y=None, expected_dtype=None):
    """One call of each layer on (a copy of) ``x``, then a backward: outputs, input and parameter
    gradients and buffers equal. ``expected_dtype``: PyTorch's layer computes in this dtype
    (float64: the exact answer to compare a float32 result with); it is compared after rounding
    to ``x``'s dtype."""
    dtype = x.dtype
    xe = x.detach().to(expected_dtype or dtype).clone(memory_format=torch.preserve_format)
    xe.requires_grad_()
    xa = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    ye, ya = expected(xe), actual(xa)
    assert ya.shape == ye.shape and ya.dtype == dtype
    torch.testing.assert_close(ya, ye.to(dtype), **tol)
    g = torch.randn_like(ye, dtype=dtype) if grad_y is None else grad_y
    expected.zero_grad()
    actual.zero_grad()
    ye.backward(g.to(ye.dtype))
    ya.backward(g)
    torch.testing.assert_close(xa.grad, xe.grad.to(dtype), **grad_tol)
    for name, p in expected.named_parameters():
        q = dict(actual.named_parameters())[name]
        torch.testing.assert_close(q.grad, p.grad.to(q.dtype), **grad_tol,
                                   msg=lambda m: f"{name}: {m}")
    assert (actual.bias is None) == (expected.bias is None)
    assert_buffers_equal(actual, expected, tol)
    return ye, ya, xe, xa


def train_then_eval(expected, actual, shape, *, train_steps=2, eval_steps=1, dtype, device):
    for training, steps in ((True, train_steps), (False, eval_steps)):
        expected.train(training)
        actual.train(training)
        for _ in range(steps):
            check_step(expected, actual, make_x(shape, dtype, device), tol=TOL[dtype],
                       grad_tol=GRAD_TOL[dtype])


# ---- PyTorch's ModuleInfo samples ------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    """One forward sample of PyTorch's ModuleInfo for nn.BatchNorm{dims}d: constructor
    arguments and the input's shape."""

    dims: int
    desc: str
    args: tuple
    shape: tuple
    kwargs: tuple = ()  # sorted (name, value) pairs

    @property
    def kw(self) -> dict:
        return dict(self.kwargs)

    @property
    def tracks(self) -> bool:
        return self.args[4] if len(self.args) > 4 else self.kw.get("track_running_stats", True)

    def __str__(self):
        return f"{self.dims}d-{self.desc}"


# module_inputs_torch_nn_BatchNorm{1,2,3}d: default, eps with momentum None (the cumulative
# average), momentum, not affine, not tracking the statistics, an empty batch, no bias (torch >=
# 2.12 lists the last one; it is checked on every torch here).
SAMPLES = [
    Sample(1, "affine", (10,), (4, 10)),
    Sample(1, "3d_input", (5,), (4, 5, 3)),
    Sample(1, "affine_simple_average", (10, 1e-3, None), (4, 10)),
    Sample(1, "not_affine", (10, 1e-3, 0.3, False), (4, 10)),
    Sample(1, "not_tracking_stats", (10, 1e-3, 0.3, True, False), (4, 10)),
    Sample(1, "3d_input_not_affine", (5, 1e-3, 0.3, False), (4, 5, 3)),
    Sample(1, "zero_batch", (5, 1e-3, 0.3, False), (0, 5, 9)),
    Sample(1, "affine_not_bias", (10,), (4, 10), (("bias", False),)),
    Sample(2, "default", (3,), (2, 3, 6, 6)),
    Sample(2, "simple_average", (3, 1e-3, None), (2, 3, 6, 6)),
    Sample(2, "momentum", (3, 1e-3, 0.8), (2, 3, 6, 6)),
    Sample(2, "not_affine", (3, 1e-3, 0.8, False), (2, 3, 6, 6)),
    Sample(2, "not_tracking_stats", (3, 1e-3, 0.8, True, False), (2, 3, 6, 6)),
    Sample(2, "zero_batch", (5, 1e-3, 0.3, False), (0, 5, 2, 2)),
    Sample(2, "affine_not_bias", (3,), (2, 3, 6, 6), (("bias", False),)),
    Sample(3, "default", (3,), (2, 3, 4, 4, 4)),
    Sample(3, "simple_average", (3, 1e-3, None), (2, 3, 4, 4, 4)),
    Sample(3, "momentum", (3, 1e-3, 0.7), (2, 3, 4, 4, 4)),
    Sample(3, "not_affine", (3, 1e-3, 0.7, False), (2, 3, 4, 4, 4)),
    Sample(3, "not_tracking_stats", (3, 1e-3, 0.7, True, False), (2, 3, 4, 4, 4)),
    Sample(3, "zero_batch", (5, 1e-3, 0.3, False), (0, 5, 2, 2, 2)),
    Sample(3, "affine_not_bias", (3,), (2, 3, 4, 4, 4), (("bias", False),)),
]
SAMPLE_KINDS = [(s, kind) for s in SAMPLES for kind in ("bn", "dbn-a1")
                if kind == "bn" or s.tracks]

# What the interpreter and the emulation run: every rank, momentum None and a constant, no
# affine, no tracking, no bias, both kinds.
SLOW_SAMPLES = {("1d-affine_simple_average", "bn"), ("1d-3d_input_not_affine", "dbn-a1"),
                ("2d-not_tracking_stats", "bn"), ("2d-affine_not_bias", "dbn-a1"),
                ("3d-momentum", "bn")}


def test_sample_table_holds_every_module_db_sample():
    """The table above is PyTorch's list: every forward sample the installed torch's module_db
    has for the three modules is in it (a sample added by a later torch shows up here)."""
    common_modules = pytest.importorskip("torch.testing._internal.common_modules")
    table = {(s.dims, s.args, s.kwargs, s.shape) for s in SAMPLES}
    seen = 0
    for info in common_modules.module_db:
        if info.module_cls not in DIMS_OF:
            continue
        for sample in info.module_inputs_func(info, device="cpu", dtype=torch.float64,
                                              requires_grad=False, training=True):
            key = (DIMS_OF[info.module_cls], tuple(sample.constructor_input.args),
                   tuple(sorted(sample.constructor_input.kwargs.items())),
                   tuple(sample.forward_input.args[0].shape))
            assert key in table, f"{info.name} sample {sample.desc!r} is not in SAMPLES: {key}"
            seen += 1
    assert seen >= 19  # torch 2.11 lists 19, 2.14 21


@pytest.mark.parametrize("backend,sample,kind", cases(
    SAMPLE_KINDS, slow_subset=lambda s, kind: (str(s), kind) in SLOW_SAMPLES))
def test_module_samples_train_and_eval(request, backend, sample, kind):
    """Two training steps and one evaluation of each sample: outputs, every buffer, input and
    parameter gradients equal PyTorch's."""
    impl = use(backend, request)
    expected, actual = pair(kind, sample.dims, *sample.args, impl=impl, **sample.kw)
    train_then_eval(expected, actual, sample.shape, dtype=impl.dtype, device=impl.device)


# ---- second derivatives ------------------------------------------------------------------------

def pure(layer):
    """``(x, *parameters) -> layer(x)`` with the parameters as inputs and, in training, the
    buffers restored before every call, so that repeated calls (gradgradcheck's) see one state.
    (In eval nothing changes them, and a graph may hold them for its backward.)"""
    names = [name for name, _ in layer.named_parameters()]
    state = {k: v.clone() for k, v in layer.named_buffers()}

    def f(x, *params):
        if layer.training:
            with torch.no_grad():
                for k, v in layer.named_buffers():
                    v.copy_(state[k])
        return torch.func.functional_call(layer, dict(zip(names, params)), (x,))
    return f, [p.detach().clone().requires_grad_() for _, p in layer.named_parameters()]


# gradgradcheck numerically differentiates the first derivative: float64 only. Two samples get
# the full Jacobians; the others, and the interpreter and the emulation (whose float64 is the
# reference's anyway, on three samples), fast mode (random projections of them).
GRADGRAD_FULL = {"1d-affine", "1d-3d_input_not_affine"}
GRADGRAD_SLOW = {"1d-affine", "2d-affine_not_bias", "1d-3d_input_not_affine"}


@pytest.mark.parametrize("backend,sample,kind,training", cases(
    [(s, kind, training) for s in SAMPLES
     for kind in ("bn", "dbn-a1", "dbn") if kind == "bn" or s.tracks
     for training in (True, False)],
    slow_subset=lambda s, kind, training: str(s) in GRADGRAD_SLOW and kind != "dbn-a1"))
def test_gradgradcheck(request, backend, sample, kind, training):
    """test_modules' test_grad and test_gradgrad: first and second derivatives of the layer's
    output in x, weight and bias agree with finite differences (for the Diminishing layer too,
    with a_k < 1)."""
    impl = use(backend, request)
    layer = ours(kind, sample.dims, *sample.args, impl=impl, dtype=torch.float64, **sample.kw)
    randomise(layer)
    layer(make_x(sample.shape, torch.float64, impl.device))  # k = 4: a_k < 1 for kind "dbn"
    layer.train(training)
    f, params = pure(layer)
    x = make_x(sample.shape, torch.float64, impl.device).requires_grad_()
    fast = impl.slow or str(sample) not in GRADGRAD_FULL
    assert torch.autograd.gradcheck(f, (x, *params), fast_mode=fast)
    assert torch.autograd.gradgradcheck(f, (x, *params), fast_mode=fast)


def second_derivatives(layer, x, grad_y, weights):
    """Gradients of s = sum(w_i * g_i) + sum(g_x^2) / 2 with respect to (x, parameters, grad_y),
    g = (g_x, g_params) the first derivatives of <layer(x), grad_y>: second derivatives in both
    the Hessian-vector and the grad-output directions."""
    params = [p for p in layer.parameters()]
    inputs = [x, *params]
    y = layer(x)
    g = torch.autograd.grad(y, inputs, grad_y, create_graph=True)
    s = sum((gi * wi).sum() for gi, wi in zip(g, weights)) + g[0].square().sum() / 2
    return torch.autograd.grad(s, [*inputs, grad_y], allow_unused=True)


@pytest.mark.parametrize("backend,sample,kind,training", cases(
    [(s, kind, training) for s in SAMPLES
     for kind in ("bn", "dbn-a1") if kind == "bn" or s.tracks for training in (True, False)],
    slow_subset=lambda s, kind, training: str(s) in {"1d-affine", "2d-momentum"}))
def test_second_derivatives_equal_torch(request, backend, sample, kind, training):
    """Double backward (create_graph=True) gives PyTorch's second derivatives of batch norm."""
    impl = use(backend, request)
    dtype = impl.dtype
    expected, actual = pair(kind, sample.dims, *sample.args, impl=impl, **sample.kw)
    expected.train(training)
    actual.train(training)
    x = make_x(sample.shape, dtype, impl.device)
    grad_y = torch.randn(sample.shape, dtype=dtype, device=impl.device)
    weights = [torch.randn_like(t) for t in (x, *expected.parameters())]
    results = []
    for layer in (expected, actual):
        results.append(second_derivatives(layer, x.clone().requires_grad_(),
                                          grad_y.clone().requires_grad_(), weights))
    names = ["x", *[n for n, _ in expected.named_parameters()], "grad_y"]
    for name, e, a in zip(names, *results):
        if e is None:
            assert a is None or not a.any(), name
        else:
            torch.testing.assert_close(a, e, **GRAD_TOL[dtype], msg=lambda m: f"{name}: {m}")


# ---- error inputs ------------------------------------------------------------------------------

def torch_outcome(fn):
    """What calling ``fn`` does: ``(None, result)`` or ``(exception, None)``."""
    try:
        return None, fn()
    except Exception as exc:  # noqa: BLE001 - whatever PyTorch raises is the expectation
        return exc, None


def assert_same_outcome(expected_fn, actual_fn, tol):
    """``actual_fn`` raises what ``expected_fn`` (PyTorch) raises, the same type with a message
    matching PyTorch's, or returns what it returns."""
    exc, expected = torch_outcome(expected_fn)
    if exc is not None:
        with pytest.raises(type(exc), match=re.escape(str(exc))):
            actual_fn()
    else:
        torch.testing.assert_close(actual_fn(), expected, **tol)


ERROR_SHAPES = {1: (2, 10), 2: (2, 10, 5, 5), 3: (2, 10, 4, 4, 4)}  # the ModuleInfo's


@pytest.mark.parametrize("backend,dims,eps,training,kind,track", cases(
    [(dims, eps, training, kind, track) for dims in (1, 2, 3) for eps in (0.0, -1.0)
     for training in (True, False) for kind, track in (("bn", True), ("bn", False),
                                                       ("dbn-a1", True))],
    slow_subset=lambda dims, eps, training, kind, track: dims == 2 and track))
def test_eps_not_positive_like_torch(request, backend, dims, eps, training, kind, track):
    """module_error_inputs_torch_nn_BatchNorm1d_2d_3d: eps 0 and -1. The expectation is the
    installed torch's (2.11: ValueError in training and eval; from 2.13: eps must be positive in
    training and non-negative in eval): the same exception and message, or the same output."""
    impl = use(backend, request)
    expected, actual = pair(kind, dims, 10, eps, impl=impl, track_running_stats=track)
    expected.train(training)
    actual.train(training)
    x = make_x(ERROR_SHAPES[dims], impl.dtype, impl.device)
    assert_same_outcome(lambda: expected(x), lambda: actual(x), TOL[impl.dtype])


@pytest.mark.parametrize("backend,momentum,kind,track", cases(
    [(m, kind, track) for m in (2.0, -1.0) for kind, track in
     (("bn", True), ("bn", False), ("dbn-a1", True))],
    slow_subset=lambda m, kind, track: m == 2.0 and track))
def test_momentum_not_validated_in_eval(request, backend, momentum, kind, track):
    """PyTorch reads momentum in training only: a layer holding any momentum evaluates."""
    impl = use(backend, request)
    expected, actual = pair(kind, 2, 3, 1e-5, momentum, impl=impl, track_running_stats=track)
    expected.eval()
    actual.eval()
    x = make_x((4, 3, 3, 3), impl.dtype, impl.device)
    assert_same_outcome(lambda: expected(x), lambda: actual(x), TOL[impl.dtype])


@pytest.mark.parametrize("backend,dims,kind,training", cases(
    [(dims, kind, training) for dims in (1, 2, 3) for kind in ("bn", "dbn-a1")
     for training in (True, False)],
    slow_subset=lambda dims, kind, training: dims == 2 and training))
def test_wrong_rank_like_torch(request, backend, dims, kind, training):
    """Inputs of every rank from 0 to 6 the layer does not take: PyTorch's ValueError and
    message."""
    impl = use(backend, request)
    expected, actual = pair(kind, dims, 3, impl=impl)
    expected.train(training)
    actual.train(training)
    allowed = {1: (2, 3), 2: (4,), 3: (5,)}[dims]
    for rank in range(7):
        if rank in allowed:
            continue
        x = torch.randn((2, 3, 2, 2, 2, 2)[:rank], dtype=impl.dtype, device=impl.device)
        exc, _ = torch_outcome(lambda: expected(x))
        assert isinstance(exc, ValueError), (rank, exc)
        with pytest.raises(type(exc), match=re.escape(str(exc))):
            actual(x)


@pytest.mark.parametrize("backend,kind,affine,track,training", cases(
    [(kind, affine, track, training) for kind in ("bn", "dbn-a1") for affine in (True, False)
     for track in (True, False) for training in (True, False) if kind == "bn" or track],
    slow_subset=lambda kind, affine, track, training: kind == "bn" and training))
def test_wrong_channel_count_like_torch(request, backend, kind, affine, track, training):
    """An input with 4 channels into a layer of 3: PyTorch names the first per-channel tensor
    of the wrong size (running_mean, else weight); without either, it normalises the 4 channels."""
    impl = use(backend, request)
    expected, actual = pair(kind, 2, 3, impl=impl, affine=affine, track_running_stats=track)
    expected.train(training)
    actual.train(training)
    x = make_x((2, 4, 3, 3), impl.dtype, impl.device)
    assert_same_outcome(lambda: expected(x), lambda: actual(x), TOL[impl.dtype])


@pytest.mark.parametrize("backend,dims,kind", cases(
    [(dims, kind) for dims in (1, 2, 3) for kind in ("bn", "dbn-a1")],
    slow_subset=lambda dims, kind: dims == 1))
def test_one_value_per_channel_like_torch(request, backend, dims, kind):
    """Training needs more than one value per channel; evaluation does not."""
    impl = use(backend, request)
    expected, actual = pair(kind, dims, 3, impl=impl)
    x = make_x((1, 3) + (1,) * (dims if dims > 1 else 0), impl.dtype, impl.device)
    for training in (True, False):
        expected.train(training)
        actual.train(training)
        assert_same_outcome(lambda: expected(x), lambda: actual(x), TOL[impl.dtype])


# ---- memory formats and strides ----------------------------------------------------------------

def is_format(t, fmt):
    return t.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("backend,dims,kind,grad_format", cases(
    [(dims, kind, grad_format) for dims in (2, 3) for kind in ("bn", "dbn-a1")
     for grad_format in ("same", "contiguous")],
    slow_subset=lambda dims, kind, grad_format: kind == "bn" and grad_format == "same"))
def test_channels_last_like_torch(request, backend, dims, kind, grad_format):
    """channels_last (2d) and channels_last_3d (3d) input: outputs and input gradients in the
    memory format PyTorch gives them, with the same values, in training and eval; also with an
    output gradient in the other format."""
    impl = use(backend, request)
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    shape = (2, 5, 3, 4) if dims == 2 else (2, 5, 3, 2, 3)
    expected, actual = pair(kind, dims, 5, impl=impl)
    for training in (True, False):
        expected.train(training)
        actual.train(training)
        x = make_x(shape, impl.dtype, impl.device).to(memory_format=fmt)
        g = torch.randn(shape, dtype=impl.dtype, device=impl.device)
        g = g.to(memory_format=fmt) if grad_format == "same" else g.contiguous()
        ye, ya, xe, xa = check_step(expected, actual, x, tol=TOL[impl.dtype],
                                    grad_tol=GRAD_TOL[impl.dtype], grad_y=g)
        for memory_format in (fmt, torch.contiguous_format):
            assert is_format(ya, memory_format) == is_format(ye, memory_format)
            assert is_format(xa.grad, memory_format) == is_format(xe.grad, memory_format)


def _noncontiguous_inputs(dtype, device):
    """Views PyTorch's non-contiguous tests use: transposed, sliced along each dimension,
    expanded."""
    def x(*shape):
        return make_x(shape, dtype, device)
    return {
        "1d-transposed": x(5, 8).t(),
        "1d-3d-transposed": x(4, 6, 5).transpose(1, 2),
        "1d-sliced-rows": x(12, 5)[::3],
        "2d-transposed-hw": x(4, 3, 5, 6).transpose(2, 3),
        "2d-sliced-channels": x(4, 6, 5, 5)[:, ::2],
        "2d-sliced-width": x(3, 3, 4, 8)[..., 1::2],
        "2d-channels-last-sliced": x(4, 3, 6, 6).to(memory_format=torch.channels_last)[:, :, ::2],
        "2d-expanded": x(1, 3, 4, 4).expand(3, 3, 4, 4),
        "3d-permuted": x(2, 3, 4, 5, 3).permute(0, 4, 1, 2, 3),
    }


NONCONTIGUOUS = list(_noncontiguous_inputs(torch.float32, "meta"))


@pytest.mark.parametrize("backend,case,kind", cases(
    [(case, kind) for case in NONCONTIGUOUS for kind in ("bn", "dbn-a1")],
    slow_subset=lambda case, kind: kind == "bn" and case in {
        "1d-transposed", "2d-sliced-channels", "2d-channels-last-sliced", "3d-permuted"}))
def test_noncontiguous_input_like_torch(request, backend, case, kind):
    """Values of outputs, gradients and buffers equal PyTorch's for a view as input (the layout
    of the output is not compared here: for a dense permutation PyTorch returns its suggested
    memory format, the project keeps the input's strides)."""
    impl = use(backend, request)
    x = _noncontiguous_inputs(impl.dtype, impl.device)[case]
    assert not x.is_contiguous()
    dims = {2: 1, 3: 1, 4: 2, 5: 3}[x.dim()]
    expected, actual = pair(kind, dims, x.shape[1], impl=impl)
    for training in (True, False):
        expected.train(training)
        actual.train(training)
        # the view itself, not a copy: check_step's clone would make it dense
        xe, xa = x.detach().requires_grad_(), x.detach().requires_grad_()
        ye, ya = expected(xe), actual(xa)
        torch.testing.assert_close(ya, ye, **TOL[impl.dtype])
        g = torch.randn_like(ye)
        ye.backward(g)
        ya.backward(g)
        torch.testing.assert_close(xa.grad, xe.grad, **GRAD_TOL[impl.dtype])
        for name, p in expected.named_parameters():
            torch.testing.assert_close(dict(actual.named_parameters())[name].grad, p.grad,
                                       **GRAD_TOL[impl.dtype])
            p.grad = None
            dict(actual.named_parameters())[name].grad = None
        assert_buffers_equal(actual, expected, TOL[impl.dtype])


# ---- float16 overflow, a large batch -----------------------------------------------------------

# PyTorch's tests' precision for these dtypes (common_utils.dtype2prec_DONTUSE)
LOW_TOL = {torch.float16: dict(rtol=1e-2, atol=1e-2), torch.bfloat16: dict(rtol=1e-1, atol=1e-1)}


@pytest.mark.parametrize("backend,dtype,param_dtype,dims", cases(
    [(dtype, param_dtype, dims) for dtype in (torch.float16, torch.bfloat16)
     for param_dtype in ("input", "float32") for dims in (1, 2)],
    slow_subset=lambda dtype, param_dtype, dims: dtype == torch.float16 and dims == 2))
def test_half_overflow(request, backend, dtype, param_dtype, dims):
    """Values around 3e4 (float16's largest is 65504): their sum and their squares overflow
    float16, their variance does not. Outputs, gradients and buffers are finite and close to
    PyTorch's float32 computation on the same values."""
    impl = use(backend, request)
    shape = (64, 3) if dims == 1 else (4, 3, 4, 4)
    pdtype = dtype if param_dtype == "input" else torch.float32
    # momentum 1: evaluation with the last batch's statistics, in which the gradients fit
    expected, actual = pair("bn", dims, 3, 1e-5, 1.0, impl=impl, dtype=torch.float32)
    actual.to(pdtype)
    offset = torch.tensor([3.0e4, -2.0e4, 1.0e3]).view((1, 3) + (1,) * (len(shape) - 2))
    x = (torch.randn(shape) * 150 + offset).to(dtype).to(impl.device)
    if dtype == torch.float16:  # computed naively, the statistics would overflow
        assert not torch.isfinite(x.sum()) and not torch.isfinite((x * x).sum())
    g = torch.randn(shape, device=impl.device).to(dtype)
    for training in (True, False):
        expected.train(training)
        actual.train(training)
        if not training:
            # evaluate with the statistics as the project's layer holds them (rounded to its
            # buffers' dtype; compared above), so that only the computation differs
            with torch.no_grad():
                for name in ("running_mean", "running_var"):
                    getattr(expected, name).copy_(getattr(actual, name))
        xe = x.float().requires_grad_()
        xa = x.clone().requires_grad_()
        ye, ya = expected(xe), actual(xa)
        assert ya.dtype == dtype and torch.isfinite(ya).all()
        torch.testing.assert_close(ya.float(), ye, **LOW_TOL[dtype])
        ye.backward(g.float())
        ya.backward(g)
        assert xa.grad.dtype == dtype and torch.isfinite(xa.grad).all()
        torch.testing.assert_close(xa.grad.float(), xe.grad, **LOW_TOL[dtype])
        for name, p in expected.named_parameters():
            q = dict(actual.named_parameters())[name]
            assert q.grad.dtype == pdtype
            torch.testing.assert_close(q.grad.float(), p.grad, **LOW_TOL[dtype])
            p.grad = q.grad = None
        for name in ("running_mean", "running_var"):
            b = getattr(actual, name)
            assert torch.isfinite(b).all()
            torch.testing.assert_close(b.float(), getattr(expected, name), rtol=5e-3, atol=1e-2)
        assert torch.equal(actual.num_batches_tracked.cpu(), expected.num_batches_tracked.cpu())


def _large_batch_shape(impl):
    """test_batchnorm_large_batch: BatchNorm2d(1) on (880801, 1, 1, 1), more rows than a CUDA
    grid dimension holds; the interpreter gets a batch just over that limit."""
    return (65537, 1, 1, 1) if impl.name == "triton" and impl.slow else (880801, 1, 1, 1)


@pytest.mark.parametrize("backend,dims", cases([2, 1], slow_subset=lambda dims: dims == 2))
def test_large_batch(request, backend, dims):
    impl = use(backend, request)
    if dims == 2:
        shape = _large_batch_shape(impl)
        C = 1
    else:
        shape, C = (65536 + 3, 3), 3
    expected, actual = pair("bn", dims, C, impl=impl, dtype=torch.float32)
    # PyTorch's layer in float64 is the yardstick: its float32 CPU kernel itself is off by 1e-4
    # on this batch (a float32 sum of 880801 values)
    expected.double()
    x = torch.rand(shape, device=impl.device) * 4 - 1
    for training in (True, False):
        expected.train(training)
        actual.train(training)
        # the parameter gradients are sums of ~1e6 terms of magnitude ~1
        check_step(expected, actual, x, tol=TOL[torch.float32], expected_dtype=torch.float64,
                   grad_tol=dict(rtol=1e-5, atol=1e-5 * shape[0] ** 0.5))


# ---- load_state_dict ---------------------------------------------------------------------------

STATE_CONFIGS = {"default": {}, "cumulative": {"momentum": None}, "not_affine": {"affine": False},
                 "no_bias": {"bias": False}, "not_tracking": {"track_running_stats": False}}


@pytest.mark.parametrize("backend,dims,config,kind", cases(
    [(dims, config, kind) for dims in (1, 2, 3) for config in STATE_CONFIGS
     for kind in ("bn", "dbn-a1") if kind == "bn" or config != "not_tracking"],
    slow_subset=lambda dims, config, kind: dims == 2 and config == "cumulative"))
def test_state_dict_round_trip_keeps_outputs(request, backend, dims, config, kind):
    """A trained PyTorch layer's state_dict loads strictly into the project's layer: both then
    evaluate and train alike (with momentum=None the loaded step count sets 1/k). The
    project's state_dict loads strictly back into a fresh PyTorch layer, which then evaluates
    like the project's."""
    impl = use(backend, request)
    kwargs = STATE_CONFIGS[config]
    shape = {1: (6, 3), 2: (3, 3, 4, 4), 3: (2, 3, 3, 2, 2)}[dims]
    expected = theirs(dims, 3, impl=impl, **kwargs)
    randomise(expected, steps_tracked=5)
    expected.train()
    for _ in range(2):
        expected(make_x(shape, impl.dtype, impl.device))
    actual = ours(kind, dims, 3, impl=impl, **kwargs)
    actual.load_state_dict(expected.state_dict(), strict=True)
    assert_buffers_equal(actual, expected, dict(rtol=0, atol=0))
    for training in (False, True, False):
        expected.train(training)
        actual.train(training)
        check_step(expected, actual, make_x(shape, impl.dtype, impl.device), tol=TOL[impl.dtype],
                   grad_tol=GRAD_TOL[impl.dtype])
    back = theirs(dims, 3, impl=impl, **kwargs)
    state = actual.state_dict()
    if kind != "bn":
        state = {k: v for k, v in state.items() if not k.startswith("dbn_")}
    back.load_state_dict(state, strict=True)
    assert back.state_dict().keys() == expected.state_dict().keys()
    back.eval()
    actual.eval()
    x = make_x(shape, impl.dtype, impl.device)
    with torch.no_grad():
        torch.testing.assert_close(back(x), actual(x), **TOL[impl.dtype])


@pytest.mark.parametrize("kind", ["bn", "dbn-a1", "dbn"])
@pytest.mark.parametrize("version", [None, 1, 2])
@pytest.mark.parametrize("strict", [True, False])
def test_checkpoint_without_num_batches_tracked(kind, version, strict):
    """A checkpoint saved before num_batches_tracked existed (state_dict version < 2, or no
    version) loads like PyTorch: the layer keeps its own count. At version 2 the key is missing:
    an error under strict=True, listed as missing otherwise, as in PyTorch."""
    impl = IMPLS["reference"]
    source = theirs(2, 3, impl=impl)
    randomise(source, steps_tracked=7)
    state = source.state_dict()
    del state["num_batches_tracked"]
    if version is None:
        del state._metadata[""]["version"]
    else:
        state._metadata[""]["version"] = version
    results = []
    for layer in (theirs(2, 3, impl=impl), ours(kind, 2, 3, impl=impl)):
        layer.num_batches_tracked.fill_(4)
        results.append((layer, *torch_outcome(
            lambda: layer.load_state_dict(_copy_state(state), strict=strict))))
    (expected, exc_e, res_e), (actual, exc_a, res_a) = results
    if exc_e is not None:
        assert type(exc_a) is type(exc_e), exc_a
        missing = re.findall(r'Missing key\(s\) in state_dict: ([^.]*)\.', str(exc_e))
        assert missing and missing == re.findall(
            r'Missing key\(s\) in state_dict: ([^.]*)\.', str(exc_a)), (exc_a, exc_e)
        return
    assert exc_a is None, exc_a
    assert res_a.missing_keys == res_e.missing_keys
    assert res_a.unexpected_keys == res_e.unexpected_keys
    assert_buffers_equal(actual, expected, dict(rtol=0, atol=0))
    # the kept count is the one the next cumulative-average step reads
    for layer in (expected, actual):
        layer.momentum = None
        layer.train()
    if kind != "dbn":
        check_step(expected, actual, make_x((4, 3, 2, 2), impl.dtype, impl.device),
                   tol=TOL[impl.dtype], grad_tol=GRAD_TOL[impl.dtype])


def _copy_state(state):
    copy = type(state)((k, v.clone()) for k, v in state.items())
    copy._metadata = {k: dict(v) for k, v in state._metadata.items()}
    return copy


# ---- empty batches -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend,shape,momentum,kind", cases(
    [(shape, momentum, kind) for shape in ((0, 5), (0, 5, 9), (0, 5, 2, 2), (0, 5, 2, 2, 2))
     for momentum in (0.3, None) for kind in ("bn", "dbn-a1", "dbn")],
    slow_subset=lambda shape, momentum, kind: len(shape) == 4 and momentum is None
    and kind != "dbn-a1"))
def test_empty_batch_like_torch(request, backend, shape, momentum, kind):
    """A training step on an empty batch: output of the input's shape, gradients of their
    shapes (zero for the parameters), running statistics untouched and the step counted, as
    PyTorch does; the next step (whose 1/k reads the count with momentum=None) still agrees.
    DBN's averaged statistics are untouched too."""
    impl = use(backend, request)
    dims = {2: 1, 3: 1, 4: 2, 5: 3}[len(shape)]
    expected, actual = pair(kind if kind != "dbn" else "bn", dims, 5, 1e-3, momentum, impl=impl)
    if kind == "dbn":  # no PyTorch counterpart for a_k < 1: its buffers must not move
        actual = ours("dbn", dims, 5, 1e-3, momentum, impl=impl)
        actual.load_state_dict(expected.state_dict())
        actual.train()(make_x((3,) + shape[1:], impl.dtype, impl.device))
    full = (3,) + shape[1:]
    tol, grad_tol = TOL[impl.dtype], GRAD_TOL[impl.dtype]
    for training in (True, False):
        expected.train(training)
        actual.train(training)
        if kind != "dbn":
            check_step(expected, actual, make_x(full, impl.dtype, impl.device), tol=tol,
                       grad_tol=grad_tol)
        before = {k: v.clone() for k, v in actual.named_buffers()}
        x = make_x(shape, impl.dtype, impl.device)
        if kind == "dbn":
            xa = x.clone().requires_grad_()
            ya = actual(xa)
            ya.backward(torch.randn_like(ya))
            assert ya.shape == shape and xa.grad.shape == shape
            assert not actual.weight.grad.any() and not actual.bias.grad.any()
            actual.zero_grad()
        else:
            check_step(expected, actual, x, tol=tol, grad_tol=grad_tol)
        for name, value in actual.named_buffers():
            if name == "num_batches_tracked":
                assert int(value) == int(before[name]) + training
            else:
                assert torch.equal(value, before[name]), name


# ---- what test_modules.py asks of every module ---------------------------------------------

@pytest.mark.parametrize("backend,dims", cases([1, 2, 3], slow_subset=lambda dims: dims == 2))
def test_tracking_switched_off_after_construction(request, backend, dims):
    """test_batchnorm_buffer_update_when_stats_are_not_tracked: a layer built with running
    statistics whose ``track_running_stats`` is then set to False normalises with the batch in
    training without touching its buffers, and evaluates with the buffers it holds. (Plain
    batch norm only: the Diminishing layers need their buffers and are built only with
    tracking.)"""
    impl = use(backend, request)
    shape = {1: (4, 3), 2: (2, 3, 3, 3), 3: (2, 3, 2, 2, 2)}[dims]
    expected, actual = pair("bn", dims, 3, impl=impl)
    before = {k: v.clone() for k, v in expected.named_buffers()}
    for layer in (expected, actual):
        layer.track_running_stats = False
    for training in (True, False):
        expected.train(training)
        actual.train(training)
        check_step(expected, actual, make_x(shape, impl.dtype, impl.device), tol=TOL[impl.dtype],
                   grad_tol=GRAD_TOL[impl.dtype])
    for name, value in before.items():
        assert torch.equal(getattr(expected, name), value), name  # PyTorch's behaviour ...
        assert torch.equal(getattr(actual, name), value), name  # ... is the project's


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("kind", ["bn", "dbn"])
@pytest.mark.parametrize("factory", [
    dict(dtype=torch.float64), dict(dtype=torch.float16), dict(device="meta"),
    dict(device="meta", dtype=torch.bfloat16)], ids=lambda f: "-".join(map(_id, f.values())))
def test_factory_kwargs_like_torch(dims, kind, factory):
    """test_factory_kwargs: parameters and buffers on the device and in the dtype asked for, as
    PyTorch's layer places them (num_batches_tracked stays int64); the Diminishing buffers
    follow the running statistics."""
    expected = torch_norm(TORCH_CLS[dims], 4, **factory)
    cls = PLAIN[dims] if kind == "bn" else DIMINISHING[dims]
    actual = cls(4, **factory, **(KINDS[kind] or {}))
    mine = actual.state_dict()
    for name, t in expected.state_dict().items():
        assert (mine[name].dtype, mine[name].device, mine[name].shape) == \
            (t.dtype, t.device, t.shape), name
    for name in set(mine) - set(expected.state_dict()):
        t = expected.running_mean
        assert (mine[name].dtype, mine[name].device, mine[name].shape) == \
            (t.dtype, t.device, t.shape), name
    assert [n for n, _ in actual.named_parameters()] == \
        [n for n, _ in expected.named_parameters()]


@pytest.mark.parametrize("kind", ["bn", "dbn-a1", "dbn"])
def test_save_and_load_whole_module(kind):
    """test_save_load: a trained layer saved with torch.save and loaded again is the same layer
    (class, options, state) and computes the same outputs; its state_dict alone loads with
    weights_only=True."""
    impl = IMPLS["reference"]
    layer = ours(kind, 2, 3, impl=impl, momentum=None)
    randomise(layer)
    for _ in range(2):
        layer(make_x((4, 3, 2, 2), impl.dtype, impl.device))
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is type(layer) and repr(loaded) == repr(layer)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    from_state = ours(kind, 2, 3, impl=impl, momentum=None)
    from_state.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    for other in (loaded, from_state):
        assert_buffers_equal(other, layer, dict(rtol=0, atol=0))
        for training in (True, False):  # training: the step count sets the cumulative average
            x = make_x((4, 3, 2, 2), impl.dtype, impl.device)
            state = {k: v.clone() for k, v in layer.state_dict().items()}
            other.train(training)
            layer.train(training)
            torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)
            assert_buffers_equal(other, layer, dict(rtol=0, atol=0))
            layer.load_state_dict(state)
            other.load_state_dict(state)
