"""The analytic backward against autograd (gradcheck), the ops against torch.library's checks,
and torch.compile tracing a model of these layers without a graph break."""

import pytest
import torch
from torch import nn

import dbn_kernels as dbn
from dbn_kernels import functional as F
from dbn_kernels.ops import op


def _dbn_fn(training, grad_through_stats, step_k, alpha=0.4, eval_stats="dbn",
            normalize_with="average"):
    """A pure function of (x, weight, bias): fresh buffer copies each call, since gradcheck
    evaluates it many times."""
    C = 3
    dbn_mean = torch.randn(C, dtype=torch.float64)
    dbn_std = torch.rand(C, dtype=torch.float64) + 0.5
    rm, rv = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5
    nbt = torch.tensor(step_k - 1)

    def fn(x, w, b):
        return F.diminishing_batch_norm(
            x, dbn_mean.clone(), dbn_std.clone(), nbt.clone(), w, b, rm.clone(), rv.clone(),
            training=training, alpha=alpha, eval_stats=eval_stats,
            grad_through_stats=grad_through_stats, normalize_with=normalize_with)
    return fn


@pytest.mark.parametrize("grad_through_stats", [True, False])
@pytest.mark.parametrize("step_k", [1, 5])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck_training(grad_through_stats, step_k, channels_last):
    x = torch.randn(4, 3, 3, 2, dtype=torch.float64) * 2 + 1
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    fn = _dbn_fn(True, grad_through_stats, step_k)
    if grad_through_stats:
        assert torch.autograd.gradcheck(fn, (x, w, b))
    else:
        # A stop-gradient on the statistics is by design not the derivative of the forward in x,
        # so only the parameter gradients are checkable numerically here; dx is checked against
        # autograd with detached statistics below and over many steps in test_dbn_semantics.
        assert torch.autograd.gradcheck(lambda w, b: fn(x.detach(), w, b), (w, b))


def test_gradcheck_authors_variant():
    """normalize_with="batch" at a step with a_k < 1: batch norm's gradient, first and second
    order, through the backend's op and the differentiable double backward."""
    x = (torch.randn(4, 3, 3, 2, dtype=torch.float64) * 2 + 1).requires_grad_()
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    fn = _dbn_fn(True, True, 5, normalize_with="batch")
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("eval_stats", ["dbn", "running"])
def test_gradcheck_eval(eval_stats):
    x = torch.randn(5, 3, 2, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_dbn_fn(False, True, 3, eval_stats=eval_stats), (x, w, b))


def test_gradcheck_no_affine_and_no_buffers():
    x = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: F.batch_norm(x, None, None, training=True), (x,))


def test_gradcheck_against_oracle_autograd_of_plain_ops():
    """grad_through_stats=False equals autograd through plain ops with detached statistics."""
    x = torch.randn(4, 3, 5, dtype=torch.float64) + 2
    mean, std = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 1
    xa = x.clone().requires_grad_()
    F.diminishing_batch_norm(xa, mean.clone(), std.clone(), torch.tensor(3), training=True,
                             alpha=0.3, grad_through_stats=False).pow(2).sum().backward()
    xb = x.clone().requires_grad_()
    m_b = xb.mean((0, 2)).detach()
    s_b = torch.sqrt(xb.var((0, 2), correction=0) + 1e-5).detach()
    mu, sig = 0.3 * m_b + 0.7 * mean, 0.3 * s_b + 0.7 * std
    ((xb - mu[:, None]) / sig[:, None]).pow(2).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)


def _op_args():
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    train = (x, torch.rand(3), torch.rand(3), torch.zeros(3), torch.ones(3), torch.zeros(3),
             torch.ones(3), torch.tensor(0), None, 1e-5, 0.25, 0.0, 0.0)
    return x, train


def test_opcheck_reference_ops():
    x, train = _op_args()
    torch.library.opcheck(op("reference", "train_forward"), train)
    torch.library.opcheck(op("reference", "train_forward"),
                          (x, None, None, None, None, None, None, None, 0.1, 1e-5, 1.0, 0.0, 0.0))
    for spread_is_std in (True, False):
        torch.library.opcheck(op("reference", "eval_forward"),
                              (x, torch.rand(3), None, torch.zeros(3), torch.rand(3) + 0.5, 1e-5,
                               spread_is_std))
    saved = op("reference", "train_forward")(*train)[1:]
    for gts, input_grad in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(op("reference", "backward"),
                              (torch.randn_like(x), x, torch.rand(3), *saved, gts, input_grad))


def _model():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), dbn.DiminishingBatchNorm2d(8, alpha=dbn.inverse_power(1.0)),
        nn.ReLU(), nn.Conv2d(8, 8, 1), dbn.BatchNorm2d(8, momentum=None), nn.Flatten(),
        nn.Linear(8 * 6 * 6, 16), dbn.DiminishingBatchNorm1d(16), nn.Linear(16, 2))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_training_and_eval(compile_backend):
    torch._dynamo.reset()
    eager, compiled_src = _model(), _model()
    compiled_src.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_src, fullgraph=True, backend=compile_backend)
    for _ in range(3):
        x = torch.randn(6, 3, 8, 8)
        ye, yc = eager(x), compiled(x)
        torch.testing.assert_close(yc, ye, rtol=1e-4, atol=1e-4)
        ye.square().sum().backward()
        yc.square().sum().backward()
    for (name, pe), pc in zip(eager.named_parameters(), compiled_src.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-3, atol=1e-4, msg=name)
    for (name, be), bc in zip(eager.named_buffers(), compiled_src.buffers()):
        torch.testing.assert_close(bc, be, rtol=1e-4, atol=1e-5, msg=name)
    eager.eval()
    compiled_src.eval()
    x = torch.randn(6, 3, 8, 8)
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-4)
