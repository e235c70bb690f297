"""With a_k = 1 the project's layers are batch norm: outputs, gradients and buffers must match
``torch.nn.BatchNorm*d``, on PyTorch's own sample inputs for those modules and on our own."""

import copy

import pytest
import torch
from torch import nn

import dbn_kernels as dbn
from torch_compat import torch_norm

PAIRS = [(nn.BatchNorm1d, dbn.BatchNorm1d, dbn.DiminishingBatchNorm1d),
         (nn.BatchNorm2d, dbn.BatchNorm2d, dbn.DiminishingBatchNorm2d),
         (nn.BatchNorm3d, dbn.BatchNorm3d, dbn.DiminishingBatchNorm3d)]
OURS = {torch_cls: (plain, dimin) for torch_cls, plain, dimin in PAIRS}

# Every backend that runs on CPU tensors here: the reference, and the Triton kernels when they
# run under the interpreter (no GPU). GPU backends get the same checks in the GPU tests.
BACKENDS = pytest.mark.parametrize("backend", dbn.available_backends("cpu"))


def _torch_sample_inputs():
    try:
        from torch.testing._internal.common_modules import module_db
    except ImportError as exc:  # PyTorch's test helpers need expecttest (the test extra has it)
        return [pytest.param(None, None, id="module_db",
                             marks=pytest.mark.skip(reason=f"PyTorch's module_db: {exc}"))]

    cases = []
    for info in module_db:
        if info.module_cls in OURS:
            for sample in info.module_inputs_func(info, device="cpu", dtype=torch.float32,
                                                  requires_grad=True, training=True):
                cases.append(pytest.param(info.module_cls, sample,
                                          id=f"{info.name}-{sample.desc or 'default'}"))
    return cases


def _randomise_affine(module):
    with torch.no_grad():
        if module.weight is not None:
            module.weight.uniform_(0.5, 1.5)
        if module.bias is not None:
            module.bias.uniform_(-1, 1)


def _compare(expected_module, actual_module, make_input, steps=3, *, check_buffers=True):
    for training in (True, False):
        expected_module.train(training)
        actual_module.train(training)
        for _ in range(steps):
            x = make_input()
            xe = x.detach().clone().requires_grad_()
            xa = x.detach().clone().requires_grad_()
            ye, ya = expected_module(xe), actual_module(xa)
            torch.testing.assert_close(ya, ye, rtol=1e-5, atol=1e-5)
            assert ya.shape == ye.shape
            assert ya.is_contiguous() == ye.is_contiguous()
            if ya.dim() == 4:
                cl = torch.channels_last
                assert ya.is_contiguous(memory_format=cl) == ye.is_contiguous(memory_format=cl)
            g = torch.randn_like(ye)
            expected_module.zero_grad()
            actual_module.zero_grad()
            ye.backward(g)
            ya.backward(g)
            torch.testing.assert_close(xa.grad, xe.grad, rtol=1e-4, atol=1e-5)
            for name, p in expected_module.named_parameters():
                torch.testing.assert_close(dict(actual_module.named_parameters())[name].grad,
                                           p.grad, rtol=1e-4, atol=1e-4)
            if check_buffers:
                for name, b in expected_module.named_buffers():
                    torch.testing.assert_close(dict(actual_module.named_buffers())[name], b,
                                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("torch_cls,sample", _torch_sample_inputs())
@pytest.mark.parametrize("kind", ["plain", "diminishing-alpha-1"])
@BACKENDS
def test_pytorch_module_samples(torch_cls, sample, kind, backend):
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    expected = torch_cls(*args, **kwargs)
    plain_cls, dimin_cls = OURS[torch_cls]
    if kind == "plain":
        actual = plain_cls(*args, **kwargs, backend=backend)
    else:
        track = args[4] if len(args) > 4 else kwargs.get("track_running_stats", True)
        if not track:
            pytest.skip("the Diminishing layers need their buffers (ValueError, tested elsewhere)")
        # alpha = 1 with eval on the running statistics is exactly batch norm.
        actual = dimin_cls(*args, **kwargs, alpha=1.0, eval_stats="running", backend=backend)
    _randomise_affine(expected)
    actual.load_state_dict(expected.state_dict(), strict=kind == "plain")
    shape = sample.forward_input.args[0].shape
    _compare(expected, actual, lambda: torch.randn(shape) * 2 + 0.5)


@pytest.mark.parametrize("torch_cls", [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d])
@pytest.mark.parametrize("momentum", [None, 0.1, 0.6])
@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, True)])
@BACKENDS
def test_plain_matches_torch(torch_cls, momentum, affine, bias, backend):
    shape = {nn.BatchNorm1d: (7, 5, 3), nn.BatchNorm2d: (3, 5, 7, 7),
             nn.BatchNorm3d: (2, 5, 3, 1, 4)}[torch_cls]
    expected = torch_norm(torch_cls, 5, momentum=momentum, affine=affine, bias=bias)
    actual = OURS[torch_cls][0](5, momentum=momentum, affine=affine, bias=bias, backend=backend)
    _randomise_affine(expected)
    actual.load_state_dict(expected.state_dict())
    _compare(expected, actual, lambda: torch.randn(shape) * 3 - 1, steps=4)


@pytest.mark.parametrize("shape", [(8, 3, 1, 1), (2, 1, 7, 7), (3, 1000, 2, 1)])
@BACKENDS
def test_channels_last_in_and_out(shape, backend):
    expected = nn.BatchNorm2d(shape[1])
    actual = dbn.BatchNorm2d(shape[1], backend=backend)
    _randomise_affine(expected)
    actual.load_state_dict(expected.state_dict())
    _compare(expected, actual,
             lambda: torch.randn(shape).to(memory_format=torch.channels_last), steps=2)
    x = torch.randn(shape).to(memory_format=torch.channels_last).requires_grad_()
    y = actual.train()(x)
    y.backward(torch.randn_like(y))
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


@BACKENDS
def test_channels_last_3d(backend):
    expected, actual = nn.BatchNorm3d(4), dbn.BatchNorm3d(4, backend=backend)
    actual.load_state_dict(expected.state_dict())
    _compare(expected, actual,
             lambda: torch.randn(2, 4, 3, 2, 5).to(memory_format=torch.channels_last_3d))


@BACKENDS
def test_track_running_stats_false(backend):
    expected = nn.BatchNorm2d(3, track_running_stats=False)
    actual = dbn.BatchNorm2d(3, track_running_stats=False, backend=backend)
    assert actual.running_mean is None and actual.num_batches_tracked is None
    actual.load_state_dict(expected.state_dict())
    _compare(expected, actual, lambda: torch.randn(4, 3, 5, 5))


@pytest.mark.parametrize("training", [True, False])
def test_zero_batch_like_torch(training):
    expected, actual = nn.BatchNorm2d(3), dbn.BatchNorm2d(3)
    _randomise_affine(expected)
    actual.load_state_dict(expected.state_dict())
    for m in (expected, actual):
        m.train(training)
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    ye, ya = expected(x), actual(x)
    assert ya.shape == ye.shape == x.shape
    ya.sum().backward()
    for name, b in expected.named_buffers():
        torch.testing.assert_close(dict(actual.named_buffers())[name], b)


def test_dbn_alpha_one_is_batch_norm_including_dbn_eval():
    """With a_k = 1 the averaged statistics are the last batch's: eval with them is batch norm
    with the last batch's mean and biased std."""
    layer = dbn.DiminishingBatchNorm2d(3, alpha=1.0)
    torch_bn = nn.BatchNorm2d(3)
    for _ in range(3):
        x = torch.randn(4, 3, 5, 5) * 2 + 1
        torch.testing.assert_close(layer(x), torch_bn(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.dbn_mean, x.mean((0, 2, 3)))
    torch.testing.assert_close(layer.dbn_std, torch.sqrt(x.var((0, 2, 3), correction=0) + 1e-5))


def test_deepcopy_and_repr():
    layer = dbn.DiminishingBatchNorm2d(4, alpha=dbn.inverse_power(2.0))
    clone = copy.deepcopy(layer)
    assert clone.alpha == layer.alpha
    assert "inverse_power(power=2.0" in repr(layer)
    assert isinstance(layer, nn.BatchNorm2d) and isinstance(dbn.BatchNorm1d(3), nn.BatchNorm1d)
