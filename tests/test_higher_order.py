"""Autograd beyond one backward, on every backend: double backward (gradgradcheck, and second
derivatives equal to nn.BatchNorm's and to the float64 oracle's), forward-mode AD, and the
torch.func transforms (jacrev/jacfwd, vmap, per-sample gradients, model ensembles).

The forward of every case runs on the backend under test; the higher-order rules themselves are
backend-independent ops, so these tests also check that each backend saves what they read."""

import pytest
import torch
from torch import nn
from torch.autograd import forward_ad
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, stack_module_state, vmap

import dbn_kernels as dbn
from dbn_kernels import derivatives
from dbn_kernels import functional as F
from layer_backends import prepare_layer_backend
from oracle import DBNOracle

D = torch.float64


@pytest.fixture(params=["reference", "triton", "emu",
                        pytest.param("cuda", marks=pytest.mark.gpu)])
def backend(request):
    """(backend name for ``backend=``, device)."""
    name = prepare_layer_backend(request.param, request)
    device = "cuda" if name in ("cuda", "triton") and torch.cuda.is_available() else "cpu"
    return name, device


def _state(C, device, k, dtype):
    """Buffers after k - 1 steps (any values a run could hold)."""
    state = {"dbn_mean": torch.randn(C, dtype=D), "dbn_std": torch.rand(C, dtype=D) + 0.5,
             "running_mean": torch.randn(C, dtype=D), "running_var": torch.rand(C, dtype=D) + 0.5}
    state = {key: t.to(device, dtype) for key, t in state.items()}
    state["num_batches_tracked"] = torch.tensor(k - 1, device=device)
    return state


def _step_fn(backend, training, alpha=0.4, eval_stats="dbn", grad_through_stats=True, k=5,
             dtype=D):
    """A pure function of (x, weight, bias): every call starts from the same buffers, since the
    checks evaluate it many times. ``alpha=None``: plain batch norm."""
    name, device = backend
    C = 3
    state = _state(C, device, k, dtype)

    def fn(x, w, b):
        s = {key: t.clone() for key, t in state.items()}
        if alpha is None:
            return F.batch_norm(x, s["running_mean"], s["running_var"], w, b, training,
                                num_batches_tracked=s["num_batches_tracked"], backend=name)
        return F.diminishing_batch_norm(
            x, s["dbn_mean"], s["dbn_std"], s["num_batches_tracked"], w, b, s["running_mean"],
            s["running_var"], training, alpha, eval_stats=eval_stats,
            grad_through_stats=grad_through_stats, backend=name)
    return fn


def _inputs(device, shape=(3, 3, 2, 2), channels_last=False):
    x = torch.randn(shape, dtype=D, device=device) * 2 + 1
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.rand(3, dtype=D, device=device) + 0.5
    b = torch.randn(3, dtype=D, device=device)
    return tuple(t.requires_grad_() for t in (x, w, b))


# ---- double backward ----------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [None, 0.4], ids=["bn", "dbn"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["ncs", "nsc"])
def test_gradgradcheck_training(backend, alpha, channels_last):
    args = _inputs(backend[1], channels_last=channels_last)
    assert torch.autograd.gradgradcheck(_step_fn(backend, True, alpha), args)


@pytest.mark.parametrize("eval_stats", ["dbn", "running"])
def test_gradgradcheck_eval(backend, eval_stats):
    args = _inputs(backend[1], shape=(2, 3, 3))
    assert torch.autograd.gradgradcheck(_step_fn(backend, False, eval_stats=eval_stats), args)


def _second_derivatives(y_fn, x, w):
    """d/d(x, w) of a scalar function of the first gradients, through create_graph=True."""
    y = y_fn()
    g_x, g_w = torch.autograd.grad((y.sin() * y).sum(), (x, w), create_graph=True)
    return torch.autograd.grad((g_x.square().sum() + (g_w * g_w.cos()).sum()), (x, w))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_second_derivatives_equal_torch_batch_norm(backend, training):
    name, device = backend
    ours = dbn.BatchNorm2d(3, dtype=D, device=device)
    ours.backend = name
    theirs = nn.BatchNorm2d(3, dtype=D, device=device)
    with torch.no_grad():
        for layer in (ours, theirs):
            layer.weight.copy_(torch.linspace(0.5, 1.5, 3))
            layer.bias.copy_(torch.linspace(-1, 1, 3))
            layer.running_mean.copy_(torch.linspace(-0.3, 0.2, 3))
            layer.running_var.copy_(torch.linspace(0.5, 2.0, 3))
    ours.train(training), theirs.train(training)
    x = (torch.randn(4, 3, 3, 2, dtype=D, device=device) * 1.5 + 0.5).requires_grad_()
    got = _second_derivatives(lambda: ours(x), x, ours.weight)
    want = _second_derivatives(lambda: theirs(x), x, theirs.weight)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, key), getattr(theirs, key))


@pytest.mark.parametrize("grad_through_stats", [True, False])
def test_second_derivatives_equal_the_oracle(backend, grad_through_stats):
    """Against autograd of the plain-op model of Algorithm 1 at step 3 (a_k < 1), including the
    stop-gradient variant, which gradgradcheck cannot check numerically."""
    name, device = backend
    layer = dbn.DiminishingBatchNorm2d(3, alpha=0.4, dtype=D, device=device,
                                       grad_through_stats=grad_through_stats)
    layer.backend = name
    oracle = DBNOracle(3, layer.eps, layer.momentum, ("const", 0.4))
    w = torch.linspace(0.5, 1.5, 3, dtype=D).requires_grad_()
    b = torch.linspace(-1, 1, 3, dtype=D).requires_grad_()
    with torch.no_grad():
        layer.weight.copy_(w), layer.bias.copy_(b)
    for _ in range(2):
        x = torch.randn(4, 3, 2, 2, dtype=D) * 2 + 1
        layer(x.to(device))
        oracle.train_step(x, w, b)
    x = (torch.randn(4, 3, 2, 2, dtype=D) * 2 + 1).requires_grad_()
    x_dev = x.detach().to(device).requires_grad_()
    got = _second_derivatives(lambda: layer(x_dev), x_dev, layer.weight)
    want = _second_derivatives(lambda: oracle.train_step(x, w, b, grad_through_stats), x, w)
    for g, o in zip(got, want):
        torch.testing.assert_close(g.cpu(), o, rtol=1e-9, atol=1e-11)


def test_double_backward_in_float32_follows_float64(backend):
    """Half the suite's dtypes reach the rules through float32 statistics: the result tracks the
    float64 one to float32 accuracy (the rules accumulate in float32 and cast back)."""
    name, device = backend
    args64 = _inputs(device)
    args32 = tuple(t.detach().float().requires_grad_() for t in args64)
    results = []
    for args in (args64, args32):
        torch.manual_seed(1)  # the same buffers, in each dtype
        fn = _step_fn(backend, True, dtype=args[0].dtype)
        x, w, _ = args
        results.append(_second_derivatives(lambda: fn(*args), x, w))
    for g32, g64 in zip(results[1], results[0]):
        assert g32.dtype == torch.float32
        # float32 rounding of terms that partly cancel: judged at the scale of the result
        torch.testing.assert_close(g32.double(), g64, rtol=1e-3, atol=1e-4 * g64.abs().max())


def test_ordinary_backward_keeps_the_backend_op(monkeypatch):
    """The differentiable rules serve create_graph and torch.func only: a plain backward must not
    reach them (they are several times slower than the fused op)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the differentiable backward ran for an ordinary backward")

    monkeypatch.setattr(derivatives, "backward", refuse)
    layer = dbn.DiminishingBatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad is not None and not x.grad.requires_grad


# ---- forward mode and torch.func ---------------------------------------------------------------

_MODES = [pytest.param(True, True, id="train"), pytest.param(True, False, id="train-stopgrad"),
          pytest.param(False, True, id="eval")]


@pytest.mark.parametrize("training, grad_through_stats", _MODES)
def test_jvp_equals_the_jacobian(backend, training, grad_through_stats):
    device = backend[1]
    fn = _step_fn(backend, training, grad_through_stats=grad_through_stats)
    x, w, b = (t.detach() for t in _inputs(device))
    tangents = tuple(torch.randn_like(t) for t in (x, w, b))
    _, y_tangent = jvp(fn, (x, w, b), tangents)
    jacobians = jacrev(fn, argnums=(0, 1, 2))(x, w, b)
    want = sum((j.reshape(x.numel(), -1) @ t.reshape(-1)).reshape(x.shape)
               for j, t in zip(jacobians, tangents))
    torch.testing.assert_close(y_tangent, want, rtol=1e-10, atol=1e-12)
    # jacfwd builds the same Jacobian from the jvp rule, batched over the tangents by vmap.
    torch.testing.assert_close(jacfwd(fn)(x, w, b), jacobians[0], rtol=1e-10, atol=1e-12)
    # and the dual-tensor API, outside torch.func
    with forward_ad.dual_level():
        y = fn(forward_ad.make_dual(x, tangents[0]), w, b)
        x_only = forward_ad.unpack_dual(y).tangent
    torch.testing.assert_close(x_only, jvp(lambda x: fn(x, w, b), (x,), tangents[:1])[1])


def test_vmap_in_eval_equals_a_loop(backend):
    name, device = backend
    layer = dbn.DiminishingBatchNorm2d(3, dtype=D, device=device).eval()
    layer.backend = name
    with torch.no_grad():
        layer.dbn_mean.uniform_(-1, 1), layer.dbn_std.uniform_(0.5, 2)
    xs = torch.randn(5, 2, 3, 2, 2, dtype=D, device=device)
    torch.testing.assert_close(vmap(layer)(xs), torch.stack([layer(x) for x in xs]))


def test_per_sample_gradients_in_eval(backend):
    """The functorch recipe, vmap(grad(loss)) over samples with functional_call, against a loop
    of ordinary backward passes."""
    name, device = backend
    model = nn.Sequential(nn.Conv2d(2, 3, 1), dbn.DiminishingBatchNorm2d(3, backend="auto"),
                          nn.Flatten(), nn.Linear(12, 1)).to(device, D)
    model[1].backend = name
    model.train()
    model(torch.randn(8, 2, 2, 2, dtype=D, device=device))  # non-trivial statistics
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    xs = torch.randn(6, 1, 2, 2, 2, dtype=D, device=device)

    def loss(p, x):
        return functional_call(model, (p, buffers), (x,)).square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, xs)
    for i, x in enumerate(xs):
        model.zero_grad()
        model(x).square().sum().backward()
        for key, p in model.named_parameters():
            torch.testing.assert_close(per_sample[key][i], p.grad)


def test_vmap_training_without_buffers_equals_torch(backend):
    name, device = backend
    ours = dbn.BatchNorm2d(3, track_running_stats=False, dtype=D, device=device)
    ours.backend = name
    theirs = nn.BatchNorm2d(3, track_running_stats=False, dtype=D, device=device)
    xs = torch.randn(4, 5, 3, 2, 2, dtype=D, device=device) * 2 + 1
    torch.testing.assert_close(vmap(ours)(xs), vmap(theirs)(xs))


def test_vmap_ensemble_training_updates_each_member(backend):
    """Model ensembling: parameters and buffers stacked (torch.func.stack_module_state), one
    training step of every member under vmap, against each member stepped on its own."""
    name, device = backend
    members = [dbn.DiminishingBatchNorm2d(3, alpha=0.4, dtype=D, device=device)
               for _ in range(3)]
    for m in members:
        m.backend = name
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5), m.dbn_mean.uniform_(-1, 1), m.running_var.uniform_(1, 2)
    params, buffers = stack_module_state(members)
    xs = torch.randn(3, 4, 3, 2, 2, dtype=D, device=device)

    def step(p, b, x):
        return functional_call(members[0], (p, b), (x,))

    ys = vmap(step)(params, buffers, xs)
    for i, (m, x) in enumerate(zip(members, xs)):
        torch.testing.assert_close(ys[i], m(x))
        for key, value in m.named_buffers():
            torch.testing.assert_close(buffers[key][i], value, msg=key)


def test_vmap_training_with_shared_buffers_is_refused_untouched(backend):
    name, device = backend
    layer = dbn.DiminishingBatchNorm2d(3, dtype=D, device=device)
    layer.backend = name
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(RuntimeError, match="buffers are not batched.*stack_module_state"):
        vmap(layer)(torch.randn(4, 5, 3, 2, 2, dtype=D, device=device))
    for key, value in layer.state_dict().items():
        torch.testing.assert_close(value, before[key], msg=key)


def test_hessian_by_forward_over_reverse_equals_double_backward(backend):
    """torch.func.hessian (jacfwd over jacrev: forward mode through the differentiable backward)
    against torch.autograd.functional.hessian (double backward)."""
    fn = _step_fn(backend, True)
    x, w, b = (t.detach() for t in _inputs(backend[1], shape=(3, 3, 2)))

    def loss(x):
        return (fn(x, w, b) * torch.linspace(-1, 2, x.numel(), dtype=D, device=x.device)
                .view(x.shape)).sin().sum()

    torch.testing.assert_close(torch.func.hessian(loss)(x),
                               torch.autograd.functional.hessian(loss, x),
                               rtol=1e-10, atol=1e-12)
