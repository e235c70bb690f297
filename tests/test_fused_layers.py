"""Fused layers (``activation="relu"``, ``forward(x, residual)``) against the unfused composition
(the same layer without activation, then ``+ residual`` and ``torch.relu``) on every backend that
runs here, and ``dbn_kernels.fuse`` on torchvision's ResNets: outputs, gradients of the input,
the residual and the parameters, and buffers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dbn_kernels as dbn
from contract import DEVICE, to_layout
from layer_backends import prepare_layer_backend

BACKENDS = ["reference", "triton", "emu", pytest.param("cuda", marks=pytest.mark.gpu)]
LAYERS = {
    "bn2d": (dbn.BatchNorm2d, (4, 5, 7, 7)),
    "dbn2d": (dbn.DiminishingBatchNorm2d, (4, 5, 7, 7)),
    "bn1d": (dbn.BatchNorm1d, (6, 3)),
    "dbn3d": (dbn.DiminishingBatchNorm3d, (2, 3, 3, 4, 5)),
}


@pytest.fixture(params=BACKENDS)
def layer_backend(request):
    return prepare_layer_backend(request.param, request)


def _device(backend: str) -> str:
    """Where a backend's tensors live: the emulation takes CPU tensors, the others the GPU's
    when there is one (Triton runs interpreted on CPU only without one)."""
    return "cpu" if backend == "emu" else DEVICE


def _pair(cls, C, backend, dtype=torch.float32, **kwargs):
    """A fused layer and an unfused twin with the same state, on the backend's device."""
    kwargs["device"] = _device(backend)
    fused = cls(C, activation="relu", dtype=dtype, **kwargs)
    with torch.no_grad():
        fused.weight.uniform_(0.5, 1.5)
        fused.bias.uniform_(-0.5, 0.5)
    plain = cls(C, dtype=dtype, **kwargs)
    plain.load_state_dict(fused.state_dict())
    # set after construction: the emulation is no name the constructor accepts
    fused.backend = plain.backend = backend
    return fused, plain


def _leaf(t):
    return t.detach().clone().requires_grad_()


@pytest.mark.parametrize("with_residual", [True, False], ids=["add+relu", "relu"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_fused_layer_equals_the_composition(layer_backend, layer, layout, with_residual):
    cls, shape = LAYERS[layer]
    if layout == "channels_last" and len(shape) == 2:
        pytest.skip("no channels_last for (N, C)")
    fused, plain = _pair(cls, shape[1], layer_backend)
    dev = _device(layer_backend)
    for training in (True, True, False):  # two steps (a_k < 1 in the second), then eval
        fused.train(training)
        plain.train(training)
        x = to_layout(torch.randn(shape) * 2 + 1, layout).to(dev)
        r = torch.randn(shape, device=dev) if with_residual else None
        xf, xp = _leaf(x), _leaf(x)
        rf, rp = (_leaf(r), _leaf(r)) if with_residual else (None, None)
        y = fused(xf, rf)
        expected = plain(xp)
        expected = torch.relu(expected + rp if with_residual else expected)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
        assert (y == 0).any() and (y > 0).any()  # the ReLU does clip here
        dy = torch.randn_like(y)
        y.backward(dy)
        expected.backward(dy)
        torch.testing.assert_close(xf.grad, xp.grad, rtol=1e-4, atol=1e-5)
        if with_residual:
            torch.testing.assert_close(rf.grad, rp.grad, rtol=0, atol=0)
        for name in ("weight", "bias"):
            torch.testing.assert_close(getattr(fused, name).grad, getattr(plain, name).grad,
                                       rtol=1e-4, atol=1e-4)
        for (name, a), (_, b) in zip(fused.named_buffers(), plain.named_buffers()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
    assert fused.state_dict().keys() == plain.state_dict().keys()
    assert "activation='relu'" in repr(fused)


def test_half_precision_fused_layer(layer_backend):
    """bfloat16: the fused add rounds once, the composition twice; they agree to the dtype."""
    fused, plain = _pair(dbn.BatchNorm2d, 6, layer_backend)
    x = torch.randn(4, 6, 5, 5, dtype=torch.bfloat16, device=_device(layer_backend))
    r = torch.randn_like(x)
    y = fused(x, r)
    expected = torch.relu(plain(x) + r)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_residual_only_gradient_flows(layer_backend):
    """Only the residual asks for a gradient (the norm's input is a constant)."""
    fused, _ = _pair(dbn.BatchNorm2d, 3, layer_backend)
    fused.requires_grad_(False)
    dev = _device(layer_backend)
    x = torch.randn(2, 3, 4, 4, device=dev)
    r = torch.randn(2, 3, 4, 4, device=dev, requires_grad=True)
    y = fused(x, r)
    y.sum().backward()
    assert torch.equal(r.grad, (y > 0).float())


def test_gradcheck_and_double_backward():
    """float64 on the reference: first and second derivatives of the fused layer (ReLU's
    second derivative is 0 almost everywhere, the mask a constant)."""
    torch.manual_seed(0)
    layer = dbn.DiminishingBatchNorm2d(3, alpha=0.5, activation="relu", dtype=torch.float64)
    layer.train()
    x = torch.randn(3, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 3, 2, 2, dtype=torch.float64, requires_grad=True)

    def f(x, r):
        # fresh buffers each call, so every evaluation is the same first step
        layer.reset_running_stats()
        return layer(x, r)

    torch.autograd.gradcheck(f, (x, r))
    torch.autograd.gradgradcheck(f, (x, r))


def test_transforms_apply_the_epilogue():
    """Under torch.func the epilogue runs as ordinary ops after the transformable step."""
    fused, plain = _pair(dbn.BatchNorm2d, 3, "reference")
    fused.eval()
    plain.eval()
    x = torch.randn(2, 3, 4, 4)
    r = torch.randn(2, 3, 4, 4)
    tx, tr = torch.randn_like(x), torch.randn_like(r)
    y, ty = torch.func.jvp(lambda a, b: fused(a, b), (x, r), (tx, tr))
    ye, tye = torch.func.jvp(lambda a, b: torch.relu(plain(a) + b), (x, r), (tx, tr))
    torch.testing.assert_close(y, ye)
    torch.testing.assert_close(ty, tye)


def test_compiled_fused_layer_matches_eager():
    torch._dynamo.reset()
    fused, _ = _pair(dbn.DiminishingBatchNorm2d, 4, "reference")
    twin = copy.deepcopy(fused)
    x = torch.randn(3, 4, 5, 5)
    r = torch.randn(3, 4, 5, 5)
    xc, rc, xe, re = _leaf(x), _leaf(r), _leaf(x), _leaf(r)
    yc = torch.compile(fused, fullgraph=True, backend="aot_eager")(xc, rc)
    ye = twin(xe, re)
    torch.testing.assert_close(yc, ye)
    yc.square().sum().backward()
    ye.square().sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad)
    torch.testing.assert_close(rc.grad, re.grad)
    torch.testing.assert_close(fused.dbn_mean, twin.dbn_mean)


# ---- dbn_kernels.fuse ---------------------------------------------------------------------------

def _resnet(name):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10).double()
    # torchvision zero-initialises nothing by default; random affine parameters and statistics
    # make every norm matter
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return model


def _grads(model, x):
    x = _leaf(x)
    y = model(x)
    y.square().sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("name,fusions", [("resnet18", (9, 8)), ("resnet50", (33, 16))])
def test_fuse_torchvision_resnet(name, fusions):
    """Fusing keeps outputs, input and parameter gradients (float64, so any difference is the
    fusion's), names, checkpoints; the traced model is left alone."""
    model = _resnet(name)
    reference_model = copy.deepcopy(model)
    before = {n: type(m) for n, m in model.named_modules()}
    fused = dbn.fuse(model)
    assert {n: type(m) for n, m in model.named_modules()} == before  # the input is untouched
    relu, residual = fusions
    kinds = list(fused.fusions.values())
    assert kinds.count("relu") == relu and kinds.count("residual+relu") == residual
    for path, kind in fused.fusions.items():
        if "downsample" in path:
            assert kind.startswith("not fused"), path
    assert [n for n, _ in fused.named_parameters()] == \
        [n for n, _ in reference_model.named_parameters()]
    assert fused.state_dict().keys() == reference_model.state_dict().keys()
    reference_model.load_state_dict(fused.state_dict())  # checkpoints load either way
    fused.load_state_dict(reference_model.state_dict())

    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    for training in (True, False):
        fused.train(training)
        reference_model.train(training)
        y, gx, gp = _grads(fused, x)
        y0, gx0, gp0 = _grads(reference_model, x)
        torch.testing.assert_close(y, y0, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(gx, gx0, rtol=1e-9, atol=1e-9)
        for n in gp0:
            torch.testing.assert_close(gp[n], gp0[n], rtol=1e-8, atol=1e-8, msg=n)
        fused.zero_grad()
        reference_model.zero_grad()
    for (n, a), (_, b) in zip(fused.named_buffers(), reference_model.named_buffers()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=n)


def test_fuse_composes_with_convert_and_revert():
    model = _resnet("resnet18")
    original = copy.deepcopy(model).eval()
    fused = dbn.fuse(dbn.convert(model, alpha=0.5)).eval()
    bn2 = fused.get_submodule("layer1.0.bn2")
    assert isinstance(bn2, dbn.DiminishingBatchNorm2d) and bn2.activation == "relu"
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    # seeded from the running statistics, a converted DBN evaluates as the original
    torch.testing.assert_close(fused(x), original(x), rtol=1e-10, atol=1e-10)
    # convert after fuse turns the layers left unfused (downsample) too
    dbn.convert(fused, alpha=0.5)
    assert isinstance(fused.get_submodule("layer2.0.downsample.1"), dbn.DiminishingBatchNorm2d)
    reverted = dbn.revert(fused)
    assert not any(isinstance(m, dbn.modules._ProjectNorm) for m in reverted.modules())
    torch.testing.assert_close(reverted(x), original(x), rtol=1e-10, atol=1e-10)
    # torch's conv-BN folding applies to the reverted graph
    from torch.fx.experimental.optimization import fuse as fold_conv_bn

    folded = fold_conv_bn(reverted.eval())
    torch.testing.assert_close(folded(x), original(x), rtol=1e-9, atol=1e-9)


def test_fuse_leaves_shared_and_multi_use_norms_alone():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            self.shared = nn.BatchNorm2d(3)

        def forward(self, x):
            a = self.bn(x)
            b = torch.relu(a) + a  # a has two users
            return torch.relu(self.shared(b)) + torch.relu(self.shared(x))

    net = Net()
    fused = dbn.fuse(net)
    assert fused.fusions["bn"].startswith("not fused")
    assert "more than once" in fused.fusions["shared"]
    assert type(fused.bn) is nn.BatchNorm2d  # left as it was
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(fused(x), copy.deepcopy(net)(x))


def test_fuse_names_what_it_cannot_trace():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: torch.fx cannot trace it
                return torch.relu(self.bn(x))
            return x

    with pytest.raises(dbn.FusionError, match="cannot trace Branchy"):
        dbn.fuse(Branchy())


def test_revert_refuses_a_fused_layer_outside_a_graph():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), dbn.BatchNorm2d(3, activation="relu"))
    with pytest.raises(ValueError, match="activation='relu'"):
        dbn.revert(model)
    assert isinstance(model[1], dbn.BatchNorm2d)  # nothing changed
