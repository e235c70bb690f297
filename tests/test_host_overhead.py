"""What the per-call fast paths must not change: caches that give the same answers as computing
afresh, the environment override still read on every call, an ordinary backward recording no graph,
and the host-overhead benchmark still running. (Speed itself is the benchmark's business, not a
test's.)"""

import json
import math

import pytest
import torch

import dbn_kernels as dbn
from dbn_kernels import backends


def test_resolution_follows_dbn_backend_changes_between_calls(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("DBN_BACKEND", raising=False)
    assert backends.resolve("auto", cpu) == "reference"
    monkeypatch.setenv("DBN_BACKEND", "cuda")
    for _ in range(2):  # a failure is never cached as an answer
        with pytest.raises(RuntimeError, match="backend 'cuda' cannot run here"):
            backends.resolve("auto", cpu)
    monkeypatch.setenv("DBN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="DBN_BACKEND"):
        backends.resolve("auto", cpu)
    monkeypatch.setenv("DBN_BACKEND", "reference")
    assert backends.resolve("auto", cpu) == "reference"
    monkeypatch.delenv("DBN_BACKEND")
    assert backends.resolve("auto", cpu) == "reference"
    layer = dbn.BatchNorm2d(3)
    layer(torch.randn(4, 3, 2, 2))
    monkeypatch.setenv("DBN_BACKEND", "cuda")  # the same layer, the next call
    with pytest.raises(RuntimeError, match="cuda backend needs a CUDA tensor"):
        layer(torch.randn(4, 3, 2, 2))


def test_gradients_without_create_graph_do_not_require_grad():
    layer = dbn.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    (grad_x,) = torch.autograd.grad(layer(x).square().sum(), x)
    assert not grad_x.requires_grad


# ---- Triton launch planning ---------------------------------------------------------------------

def _launch():
    pytest.importorskip("triton")
    from dbn_kernels.triton_kernels import launch

    return launch


def _layouts():
    cl, cl3 = torch.channels_last, torch.channels_last_3d
    return [
        torch.empty(6, 5), torch.empty(6, 5, 1, 1), torch.empty(6, 5, 3, 4),
        torch.empty(6, 5, 3, 4).to(memory_format=cl), torch.empty(6, 1, 3, 4).to(memory_format=cl),
        torch.empty(6, 5, 1, 1).to(memory_format=cl), torch.empty(1, 5, 3, 4).to(memory_format=cl),
        torch.empty(2, 5, 3, 4, 2).to(memory_format=cl3), torch.empty(6, 5, 3, 4)[:, :, ::2],
        torch.empty(4, 3, 5, 7).permute(1, 2, 3, 0), torch.empty(0, 5, 3, 4),
        torch.empty(6, 5, 3, 4)[:, 1:4], torch.empty(6, 5, 8).transpose(0, 2),
        torch.empty(1, 1, 1, 1), torch.empty(3, 4, 1, 5).as_strided((3, 4, 1, 5), (20, 5, 7, 1)),
    ]


@pytest.mark.parametrize("index", range(len(_layouts())))
def test_geometry_from_strides_matches_torch(index):
    """The cached classification reads shape and strides; torch decides contiguity itself."""
    launch = _launch()
    x = _layouts()[index]
    geo = launch.geometry(x)
    ncs = x.is_contiguous()
    nsc = x.movedim(1, -1).is_contiguous()
    S = math.prod(x.shape[2:])
    if nsc and (S == 1 or not ncs):
        assert geo is not None and geo.channels_last
    elif ncs:
        assert geo is not None and not geo.channels_last
    else:
        assert geo is None
    if geo is not None:
        assert (geo.N, geo.C, geo.S) == (x.shape[0], x.shape[1], S)


def test_launch_plans_are_cached_per_tuning(monkeypatch):
    launch = _launch()
    x = torch.empty(2, 8, 4, 4)
    geo = launch.geometry(x)
    assert launch.geometry(torch.empty(2, 8, 4, 4)) is geo
    device = x.device
    plans = (launch.reduce_plan(geo, 4, device), launch.elementwise_plan(geo, 4),
             launch.finalize_plan(8, 3))
    again = (launch.reduce_plan(geo, 4, device), launch.elementwise_plan(geo, 4),
             launch.finalize_plan(8, 3))
    assert all(a is b for a, b in zip(plans, again))
    # The tuning in force is part of the key: changing it changes the plans.
    tiny = launch.Tuning(elementwise_tile_bytes=64, unaligned_elementwise_tile=16, reduce_tile=8,
                         reduce_min_even_bytes=8, reduce_row_bytes=8, elementwise_max_block_c=4,
                         finalize_tile=8, finalize_max_splits=4, programs_per_sm=64,
                         interpreter_programs=64, max_warps=2)
    monkeypatch.setattr(launch, "TUNING", tiny)
    assert launch.reduce_plan(geo, 4, device) != plans[0]
    assert launch.elementwise_plan(geo, 4) != plans[1]
    assert launch.finalize_plan(8, 3) != plans[2]


def test_reduce_plan_follows_the_device_program_target(monkeypatch):
    launch = _launch()
    geo = launch.Geometry(256, 64, 56 * 56, False)
    monkeypatch.setattr(launch, "_sm_count", lambda index: 132)
    many = launch.reduce_plan(geo, 4, torch.device("cuda", 0))
    monkeypatch.setattr(launch, "_sm_count", lambda index: 8)
    few = launch.reduce_plan(geo, 4, torch.device("cuda", 0))
    assert many.splits > few.splits


# ---- the benchmark ------------------------------------------------------------------------------

def test_host_overhead_benchmark_runs(tmp_path, capsys):
    from dbn_kernels.benchmark import host_overhead

    threads = torch.get_num_threads()
    out = tmp_path / "host.json"
    assert host_overhead.main(["--device", "cpu", "--rounds", "2", "--calls", "2", "--warmup",
                               "1", "--json", str(out)]) == 0
    assert torch.get_num_threads() == threads
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert {r["mode"] for r in rows} == {"fwd-bwd", "fwd", "eval"}
    assert {r["provider"] for r in rows} == {"torch", "reference-bn", "reference-dbn"}
    assert all(r["median_us"] > 0 and len(r["rounds_us"]) == 2 for r in rows)
    assert all(r["ratio"] == 1.0 for r in rows if r["provider"] == "torch")
    assert report["settings"]["threads"] == 1 and report["environment"]["device"] == "cpu"
    assert "reference-dbn" in capsys.readouterr().out
