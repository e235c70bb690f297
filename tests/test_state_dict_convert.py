import pytest
import torch
from torch import nn

import dbn_kernels as dbn
from torch_compat import torch_norm


def _trained(module, steps=2, shape=(4, 3, 5, 5)):
    module.train()
    for _ in range(steps):
        module(torch.randn(shape) * 2 + 1)
    return module


@pytest.mark.parametrize("kwargs", [{}, {"affine": False}, {"bias": False},
                                    {"track_running_stats": False}, {"momentum": None}])
def test_plain_state_dict_round_trips_strictly(kwargs):
    theirs = _trained(torch_norm(nn.BatchNorm2d, 3, **kwargs))
    ours = dbn.BatchNorm2d(3, **kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    back = torch_norm(nn.BatchNorm2d, 3, **kwargs)
    back.load_state_dict(_trained(ours).state_dict(), strict=True)
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value)


def test_batch_norm_checkpoint_initialises_dbn_buffers():
    theirs = _trained(nn.BatchNorm2d(3), steps=4)
    ours = dbn.DiminishingBatchNorm2d(3)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    torch.testing.assert_close(ours.dbn_mean, theirs.running_mean)
    torch.testing.assert_close(ours.dbn_std, torch.sqrt(theirs.running_var + theirs.eps))
    assert int(ours.num_batches_tracked) == 4
    # and its own state_dict carries and restores them
    _trained(ours)
    again = dbn.DiminishingBatchNorm2d(3)
    again.load_state_dict(ours.state_dict(), strict=True)
    torch.testing.assert_close(again.dbn_std, ours.dbn_std)


def test_missing_keys_still_reported():
    ours = dbn.DiminishingBatchNorm2d(3)
    with pytest.raises(RuntimeError, match="running_var"):
        ours.load_state_dict({"weight": torch.ones(3), "bias": torch.zeros(3),
                              "running_mean": torch.zeros(3),
                              "num_batches_tracked": torch.tensor(0)}, strict=True)


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Sequential(nn.Conv1d(4, 4, 1) if False else nn.Identity()),
                         nn.Flatten(2), nn.BatchNorm1d(4, affine=False), nn.Flatten(),
                         nn.Linear(4 * 36, 2))


@pytest.mark.parametrize("alpha", [None, 0.25])
def test_convert_replaces_in_place_and_reuses_tensors(alpha):
    torch.manual_seed(1)
    model = _net()
    _trained(model, shape=(4, 3, 8, 8))
    model.eval()
    bn = model[1]
    weight, running_mean = bn.weight, bn.running_mean
    x = torch.randn(4, 3, 8, 8)
    expected = model(x)
    out = dbn.convert(model, alpha=alpha)
    assert out is model
    new_cls = dbn.BatchNorm2d if alpha is None else dbn.DiminishingBatchNorm2d
    assert type(model[1]) is new_cls
    assert isinstance(model[5], dbn.BatchNorm1d if alpha is None else dbn.DiminishingBatchNorm1d)
    assert model[1].weight is weight and model[1].running_mean is running_mean
    assert not model[1].training
    if alpha is None:
        torch.testing.assert_close(model(x), expected)
    else:
        assert model[1].alpha == dbn.Schedule(0.25)
        # dbn statistics seeded from the running ones: eval with them equals the BN network's
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert dbn.convert(model, alpha=alpha) is model  # idempotent


def test_convert_passes_extra_keywords():
    model = nn.Sequential(nn.BatchNorm2d(2))
    dbn.convert(model, alpha=dbn.inverse_power(2.0), eval_stats="running",
                grad_through_stats=False, backend="reference", normalize_with="batch")
    layer = model[0]
    assert layer.eval_stats == "running" and layer.grad_through_stats is False
    assert layer.normalize_with == "batch"
    assert layer.backend == "reference"


def test_convert_diminishing_needs_tracking():
    with pytest.raises(ValueError, match="track_running_stats"):
        dbn.convert(nn.BatchNorm2d(2, track_running_stats=False), alpha=0.5)
