"""Bad input fails with a clear error before any buffer is touched."""

import pytest
import torch

import dbn_kernels as dbn
from dbn_kernels import functional as F


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _unchanged(module, before):
    after = module.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k


LAYERS = [dbn.BatchNorm2d, dbn.DiminishingBatchNorm2d]


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("x,error,match", [
    (torch.randn(2, 3, 4), ValueError, r"expected 4D input \(got 3D input\)"),
    (torch.randn(2, 4, 3, 3), RuntimeError, "running_mean should contain 4 elements not 3"),
    (torch.randn(1, 3, 1, 1), ValueError, "Expected more than 1 value per channel when training"),
    (torch.randint(0, 5, (2, 3, 2, 2)), RuntimeError, "dtype torch.int64 is not supported"),
])
def test_bad_input_raises_before_buffers_change(cls, x, error, match):
    layer = cls(3)
    layer(torch.randn(4, 3, 2, 2))
    before = _snapshot(layer)
    with pytest.raises(error, match=match):
        layer(x)
    _unchanged(layer, before)


def test_m_equal_one_is_fine_in_eval():
    layer = dbn.DiminishingBatchNorm2d(3)
    layer(torch.randn(4, 3, 2, 2))
    layer.eval()
    assert layer(torch.randn(1, 3, 1, 1)).shape == (1, 3, 1, 1)


def test_rank_errors_per_dimension():
    with pytest.raises(ValueError, match=r"expected 2D or 3D input \(got 4D input\)"):
        dbn.BatchNorm1d(3)(torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match=r"expected 5D input \(got 4D input\)"):
        dbn.DiminishingBatchNorm3d(3)(torch.randn(2, 3, 4, 5))


def test_dtype_mismatch_of_parameters():
    layer = dbn.BatchNorm2d(3, dtype=torch.float16)
    before = _snapshot(layer)
    with pytest.raises(RuntimeError, match="running_mean has dtype torch.float16"):
        layer(torch.randn(4, 3, 2, 2, dtype=torch.bfloat16))
    _unchanged(layer, before)


def test_wrong_device_buffer():
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(RuntimeError, match="running_mean is on meta"):
        F.batch_norm(x, torch.zeros(3, device="meta"), torch.ones(3, device="meta"),
                     training=True)


def test_backend_that_cannot_run_says_why():
    layer = dbn.BatchNorm2d(3, backend="cuda")
    before = _snapshot(layer)
    with pytest.raises(RuntimeError, match="cuda backend needs a CUDA tensor"):
        layer(torch.randn(4, 3, 2, 2))
    _unchanged(layer, before)


def test_invalid_constructor_arguments_name_themselves():
    with pytest.raises(ValueError, match="alpha must lie in"):
        dbn.DiminishingBatchNorm2d(3, alpha=1.5)
    with pytest.raises(ValueError, match="alpha must lie in"):
        dbn.DiminishingBatchNorm2d(3, alpha=0.0)
    with pytest.raises(ValueError, match="alpha must be finite"):
        dbn.DiminishingBatchNorm2d(3, alpha=float("nan"))
    with pytest.raises(ValueError, match="eval_stats"):
        dbn.DiminishingBatchNorm2d(3, eval_stats="batch")
    with pytest.raises(ValueError, match="backend"):
        dbn.BatchNorm2d(3, backend="cudnn")
    with pytest.raises(ValueError, match="track_running_stats"):
        dbn.DiminishingBatchNorm2d(3, track_running_stats=False)
    switched_off = dbn.DiminishingBatchNorm2d(3)
    switched_off.track_running_stats = False  # torch's layers honour this after construction
    with pytest.raises(ValueError, match="track_running_stats"):
        switched_off(torch.randn(4, 3, 2, 2))
    assert switched_off.num_batches_tracked == 0 and switched_off.dbn_std.eq(1).all()
    layer = dbn.DiminishingBatchNorm2d(3)
    with pytest.raises(ValueError, match="eval_stats"):
        layer.eval_stats = "nope"
    with pytest.raises(ValueError, match="power"):
        layer.alpha = dbn.inverse_power(power=-1.0)


def test_host_callable_out_of_range_fails_before_buffers_change():
    layer = dbn.DiminishingBatchNorm2d(3, alpha=lambda k: 2.0)
    layer(torch.randn(4, 3, 2, 2))  # a_1 = 1 whatever the callable says
    before = _snapshot(layer)
    with pytest.raises(ValueError, match=r"alpha\(k\) must lie in \(0, 1\]"):
        layer(torch.randn(4, 3, 2, 2))
    _unchanged(layer, before)


def test_env_override_is_validated(monkeypatch):
    monkeypatch.setenv("DBN_BACKEND", "fastest")
    with pytest.raises(ValueError, match="DBN_BACKEND"):
        dbn.BatchNorm2d(3)(torch.randn(4, 3, 2, 2))
