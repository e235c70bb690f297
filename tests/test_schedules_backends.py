import math

import pytest
import torch

import dbn_kernels as dbn
from dbn_kernels import backends
from dbn_kernels.reference import schedule_alpha
from dbn_kernels.schedules import as_schedule


@pytest.mark.parametrize("schedule,expected", [
    (dbn.inverse_power(1.0), lambda k: 1 / k),
    (dbn.inverse_power(2.0), lambda k: 1 / k ** 2),
    (dbn.inverse_power(1.0, scale=5.0, offset=10.0), lambda k: min(1.0, 5 / (10 + k))),
    (as_schedule(0.25), lambda k: 0.25),
])
def test_device_evaluation_matches_formula(schedule, expected):
    ks = torch.arange(1, 40)
    a = schedule_alpha(ks, *schedule.params, torch.float64)
    want = torch.tensor([1.0] + [expected(k) for k in range(2, 40)], dtype=torch.float64)
    torch.testing.assert_close(a, want)
    assert [schedule(k) for k in range(1, 40)] == pytest.approx(want.tolist())


@pytest.mark.parametrize("kwargs,match", [
    ({"power": -0.5}, "power"), ({"scale": 0.0}, "scale"), ({"offset": -1.0}, "offset"),
    ({"power": math.nan}, "power"), ({"scale": math.inf}, "scale"), ({"power": "x"}, "power"),
])
def test_invalid_inverse_power(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dbn.inverse_power(**kwargs)


@pytest.mark.parametrize("alpha", [0, -0.1, 1.01, math.nan, True, "0.5", None])
def test_invalid_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        as_schedule(alpha)


def test_available_backends_on_cpu():
    names = dbn.available_backends("cpu")
    assert "reference" in names and "cuda" not in names
    assert set(names) <= set(backends.BACKENDS)


def test_auto_resolves_to_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("DBN_BACKEND", raising=False)
    assert backends.resolve("auto", torch.device("cpu")) == "reference"
    monkeypatch.setenv("DBN_BACKEND", "reference")
    assert backends.resolve("auto", torch.device("cpu")) == "reference"


def test_env_override_of_auto_is_used(monkeypatch):
    monkeypatch.setenv("DBN_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run here"):
        dbn.BatchNorm2d(3)(torch.randn(4, 3, 2, 2))
    # an explicit backend wins over the environment
    dbn.BatchNorm2d(3, backend="reference")(torch.randn(4, 3, 2, 2))


@pytest.mark.parametrize("backend", backends.BACKENDS)
def test_resolution_is_a_constant_under_torch_compile(backend):
    """Dynamo must not trace the availability checks: the cuda backend's reaches the compiled
    extension's schemas (a torch.FunctionSchema), which broke fullgraph compilation on a GPU.
    Run here on the CPU for every backend whose check passes for CUDA tensors (the extension's
    loads without a GPU)."""
    if backends.unavailable_reason(backend, "cuda") is not None:
        pytest.skip(f"{backend}: {backends.unavailable_reason(backend, 'cuda')}")
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        return x + len(backends._resolve(backend, None, "cuda"))

    assert torch.equal(f(torch.zeros(2)), torch.full((2,), float(len(backend))))
