"""The layers against the independent oracle of the DBN step (tests/oracle.py), over many steps and every schedule kind."""

import pytest
import torch

import dbn_kernels as dbn
from oracle import DBNOracle

SCHEDULES = {
    "const-0.25": (0.25, ("const", 0.25)),
    "const-1": (1.0, ("const", 1.0)),
    "inverse-k": (dbn.inverse_power(1.0), ("inv", 1.0, 1.0, 0.0)),
    "inverse-k2": (dbn.inverse_power(2.0), ("inv", 2.0, 1.0, 0.0)),
    "5/(10+k)": (dbn.inverse_power(1.0, scale=5.0, offset=10.0), ("inv", 1.0, 5.0, 10.0)),
    "callable": (lambda k: 0.5 / k ** 0.5, ("call", lambda k: 0.5 / k ** 0.5)),
}

SHAPES = {1: [(6, 4), (5, 3, 7)], 2: [(4, 3, 5, 6)], 3: [(3, 2, 3, 4, 2)]}
LAYERS = {1: dbn.DiminishingBatchNorm1d, 2: dbn.DiminishingBatchNorm2d,
          3: dbn.DiminishingBatchNorm3d}


def _input(shape, dtype=torch.float64):
    # Non-zero mean and non-unit spread, different per channel, so every term matters.
    C = shape[1]
    view = (1, C) + (1,) * (len(shape) - 2)
    return (torch.randn(shape, dtype=dtype) * (0.5 + torch.rand(view, dtype=dtype) * 3)
            + torch.randn(view, dtype=dtype) * 4)


def _run_steps(layer, oracle, shape, steps, grad_through_stats, channels_last=False):
    C = shape[1]
    gamma = (torch.rand(C, dtype=torch.float64) + 0.5).requires_grad_()
    beta = torch.randn(C, dtype=torch.float64).requires_grad_()
    with torch.no_grad():
        layer.weight.copy_(gamma)
        layer.bias.copy_(beta)
    for _ in range(steps):
        x = _input(shape)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        x_ref = x.clone().requires_grad_()
        x_dut = x.clone().requires_grad_()
        y_ref = oracle.train_step(x_ref, gamma, beta, grad_through_stats)
        y_dut = layer(x_dut)
        g = torch.randn_like(y_ref)
        gamma.grad = beta.grad = None
        layer.zero_grad()
        y_ref.backward(g)
        y_dut.backward(g)
        torch.testing.assert_close(y_dut, y_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(x_dut.grad, x_ref.grad, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(layer.weight.grad, gamma.grad, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(layer.bias.grad, beta.grad, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(layer.dbn_mean, oracle.mu, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.dbn_std, oracle.sig, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.running_mean, oracle.rm, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.running_var, oracle.rv, rtol=1e-10, atol=1e-12)
        assert int(layer.num_batches_tracked) == oracle.k
    return gamma, beta


@pytest.mark.parametrize("normalize_with", ["average", "batch"])
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("grad_through_stats", [True, False])
def test_training_steps_match_oracle(schedule, dims, grad_through_stats, normalize_with):
    alpha, kind = SCHEDULES[schedule]
    for shape in SHAPES[dims]:
        layer = LAYERS[dims](shape[1], momentum=0.3, alpha=alpha,
                             grad_through_stats=grad_through_stats, dtype=torch.float64,
                             normalize_with=normalize_with)
        oracle = DBNOracle(shape[1], layer.eps, 0.3, kind, normalize_with)
        gamma, beta = _run_steps(layer, oracle, shape, 6, grad_through_stats)
        layer.eval()
        for eval_stats in ("dbn", "running"):
            layer.eval_stats = eval_stats
            x = _input(shape)
            torch.testing.assert_close(layer(x), oracle.eval_step(x, gamma, beta, eval_stats),
                                       rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("momentum", [None, 0.1])
def test_cumulative_momentum_and_channels_last(momentum):
    shape = (3, 5, 4, 4)
    layer = dbn.DiminishingBatchNorm2d(5, momentum=momentum, dtype=torch.float64)
    oracle = DBNOracle(5, layer.eps, momentum, ("const", 0.25))
    _run_steps(layer, oracle, shape, 5, True, channels_last=True)


def test_authors_variant_trains_as_batch_norm():
    """normalize_with="batch": outputs, gradients and running statistics are batch norm's (the
    averages only change evaluation), whatever alpha."""
    shape = (5, 3, 4, 4)
    layer = dbn.DiminishingBatchNorm2d(3, alpha=0.1, momentum=0.2, normalize_with="batch",
                                       dtype=torch.float64)
    bn = torch.nn.BatchNorm2d(3, momentum=0.2, dtype=torch.float64)
    for _ in range(4):
        x = _input(shape)
        xs = (x.clone().requires_grad_(), x.clone().requires_grad_())
        ys = layer(xs[0]), bn(xs[1])
        g = torch.randn_like(x)
        for y in ys:
            y.backward(g)
        torch.testing.assert_close(ys[0], ys[1], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.weight.grad, bn.weight.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.running_var, bn.running_var, rtol=1e-12, atol=1e-14)
    # ... while evaluation uses the alpha-averaged statistics, not batch norm's running ones
    # (test_training_steps_match_oracle checks their values).
    assert not torch.allclose(layer.dbn_std, torch.sqrt(bn.running_var + bn.eps))


def test_attributes_changed_between_steps_are_honoured():
    shape = (4, 3, 3, 3)
    layer = dbn.DiminishingBatchNorm2d(3, dtype=torch.float64)
    oracle = DBNOracle(3, layer.eps, 0.1, ("const", 0.25))
    _run_steps(layer, oracle, shape, 2, True)
    layer.normalize_with = oracle.normalize_with = "batch"
    _run_steps(layer, oracle, shape, 2, True)
    layer.normalize_with = oracle.normalize_with = "average"
    layer.alpha = 0.75
    oracle.schedule = ("const", 0.75)
    layer.grad_through_stats = False
    _run_steps(layer, oracle, shape, 2, False)
    layer.alpha = dbn.inverse_power(2.0, scale=3.0)
    oracle.schedule = ("inv", 2.0, 3.0, 0.0)
    _run_steps(layer, oracle, shape, 2, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("backend", dbn.available_backends("cpu"))
def test_low_precision_against_float64(dtype, channels_last, backend):
    """fp32 within ~1e-5; 16-bit no worse than 2x PyTorch's own batch norm error at that dtype."""
    shape = (4, 6, 7, 7)
    layer = dbn.DiminishingBatchNorm2d(6, alpha=0.5, backend=backend)
    ref = dbn.DiminishingBatchNorm2d(6, alpha=0.5, dtype=torch.float64)
    torch_bn = torch.nn.BatchNorm2d(6)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for step in range(3):
        x64 = _input(shape).to(memory_format=fmt)
        x = x64.to(dtype)
        y = layer(x)
        assert y.dtype == dtype and y.is_contiguous(memory_format=fmt)
        y_ref = ref(x.double())  # the same rounded input, in float64
        err = (y.double() - y_ref).abs().max().item()
        if dtype == torch.float32:
            assert err < 1e-5 * max(1.0, y_ref.abs().max().item())
        else:
            torch_bn.train()
            if step == 0:  # a_1 = 1: DBN is batch norm, so PyTorch's error is the yardstick
                y_torch = torch_bn.to(dtype)(x)
                torch_err = (y_torch.double() - y_ref).abs().max().item()
                assert err <= 2 * torch_err + 1e-6
            else:
                assert err <= 2 * torch.finfo(dtype).eps * y_ref.abs().max().item() * 4
    torch.testing.assert_close(layer.dbn_mean.double(), ref.dbn_mean, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(layer.dbn_std.double(), ref.dbn_std, rtol=2e-3, atol=2e-3)


def test_large_mean_small_spread_stays_accurate():
    """|mean| >> std: a float32 E[x^2] - E[x]^2 would lose about 0.1 of a unit variance here."""
    x = (torch.randn(64, 4, 8, 8, dtype=torch.float64) + 1e3).float()
    layer = dbn.BatchNorm2d(4)
    y = layer(x)
    ref = dbn.BatchNorm2d(4, dtype=torch.float64)
    y_ref = ref(x.double())
    assert (y.double() - y_ref).abs().max().item() < 1e-3
    torch.testing.assert_close(layer.running_var.double(), ref.running_var, rtol=1e-4, atol=0)


@pytest.mark.parametrize("backend", dbn.available_backends("cpu"))
@pytest.mark.parametrize("channels_last", [False, True])
def test_large_mean_outputs_and_gradients_within_float32_limit(backend, channels_last):
    """With |mean| / std = R, float32 statistics alone cost about R * 2^-25 in y and dx (the mean
    itself is rounded); an implementation may lose a small multiple of that, not more."""
    R = 1000.0
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    layer = dbn.DiminishingBatchNorm2d(4, alpha=0.5, backend=backend)
    ref = dbn.DiminishingBatchNorm2d(4, alpha=0.5, dtype=torch.float64)
    bound = 4 * R * 2.0 ** -24
    for _ in range(3):
        x = (torch.randn(16, 4, 5, 5, dtype=torch.float64) + R).float().to(memory_format=fmt)
        g = torch.randn(x.shape, dtype=torch.float64)
        xa, xb = x.clone().requires_grad_(), x.double().requires_grad_()
        ya, yb = layer(xa), ref(xb)
        ya.backward(g.float())
        yb.backward(g)
        assert (ya.double() - yb).abs().max().item() < bound
        scale = xb.grad.abs().max().item()
        assert (xa.grad.double() - xb.grad).abs().max().item() < bound * scale


@pytest.mark.parametrize("backend", dbn.available_backends("cpu"))
@pytest.mark.parametrize("layer", [dbn.DiminishingBatchNorm2d, dbn.BatchNorm2d])
@pytest.mark.parametrize("training", [True, False])
def test_calls_without_a_graph_match_the_recorded_path(backend, layer, training, monkeypatch):
    """With no gradient to compute (torch.no_grad(), or nothing requiring grad) the layer calls
    its op directly, without the autograd Function. Output and every buffer must equal the
    autograd path's, step after step, and the output must carry no graph, as nn.BatchNorm2d's
    does not."""
    import copy

    from dbn_kernels.autograd import DiminishingBatchNormFunction

    def apply_with_graph_only(*args):
        assert torch.is_grad_enabled(), "the Function was applied under no_grad"
        assert any(isinstance(a, torch.Tensor) and a.requires_grad for a in args[:3]), \
            "the Function was applied with nothing requiring grad"
        return apply(*args)

    apply = DiminishingBatchNormFunction.apply
    monkeypatch.setattr(DiminishingBatchNormFunction, "apply", apply_with_graph_only)
    torch.manual_seed(0)
    recorded = layer(3, backend=backend).train(training)
    with torch.no_grad():
        recorded.weight.uniform_(0.5, 1.5)
        recorded.bias.uniform_(-1, 1)
    direct = copy.deepcopy(recorded)
    frozen = copy.deepcopy(recorded).requires_grad_(False)
    for _ in range(3):
        x = torch.randn(4, 3, 5, 6, dtype=torch.float64) * 2 + 1
        y_recorded = recorded(x)
        with torch.no_grad():
            y_direct = direct(x)
        y_frozen = frozen(x)  # grad mode on, but nothing requires grad
        assert y_recorded.grad_fn is not None
        for y in (y_direct, y_frozen):
            assert y.grad_fn is None and not y.requires_grad
            assert torch.equal(y, y_recorded.detach())
    expected = dict(recorded.named_buffers())
    for other in (direct, frozen):
        for name, buffer in other.named_buffers():
            assert torch.equal(buffer, expected[name]), name
