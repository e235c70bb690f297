"""The sync layers (``SyncBatchNorm``, ``SyncDiminishingBatchNorm``) on real process groups.

Every multi-process test starts 2 or 3 processes (tests/sync_worker.py) in a gloo group on
127.0.0.1, gives each rank its slice of a batch drawn here, and compares what the ranks computed
with one process running the local layer on the whole batch, on the same backend:

* y and dx: the ranks' slices concatenated equal the single process's;
* parameter gradients: the ranks' local sums add up to the single process's;
* every buffer (a_k's counter, the averages, PyTorch's running statistics, unbiased from the
  global count) equals the single process's on every rank, and is bit for bit the same on all
  ranks;
* evaluation is local, with the same buffers.

Cases: plain BN (exponential and cumulative momentum), DBN with a constant and an inverse-power
schedule, without gradient through the statistics; float64 and float32; NCHW and channels_last;
even, uneven and empty per-rank batches (a rank with one sample, a rank with none); inputs of
rank 2, 3 and 5. Backends: the reference, Triton under its interpreter and the CPU emulation of
the cuda backend (fewer cases for the slower two). Then a DDP-wrapped CNN trains as one process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import dbn_kernels as dbn
from contract import to_layout
from layer_backends import prepare_layer_backend
from sync_worker import BUFFERS, buffers, make_layer, schedule, small_cnn

WORKER = Path(__file__).resolve().parent / "sync_worker.py"
STEPS = 3
SPLITS = {
    2: {"even": [4, 4], "uneven": [6, 1], "empty": [0, 7]},
    3: {"even": [3, 3, 3], "uneven": [5, 1, 2], "empty": [4, 0, 3]},
}
KINDS = {
    "bn": dict(alpha=None, momentum=0.1, affine=True),
    "bn-cumulative": dict(alpha=None, momentum=None, affine=False),
    "dbn": dict(alpha=0.25, momentum=0.1, affine=True),
    "dbn-inverse-power": dict(alpha=("inverse_power", 1.0, 2.0, 0.5), momentum=0.2,
                              affine=True, eval_stats="running"),
    "dbn-stats-constant": dict(alpha=0.5, momentum=0.1, affine=True, grad_through_stats=False),
    # the authors' variant: batch norm's step over the group, the averages for evaluation
    "dbn-batch": dict(alpha=0.25, momentum=0.1, affine=True, normalize_with="batch"),
    # the fused epilogue: relu(norm(x) + residual), the mask and d_residual local to each rank
    "dbn-residual-relu": dict(alpha=0.25, momentum=0.1, affine=True, activation="relu",
                              residual=True),
}
TOLERANCES = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=2e-5, atol=2e-5)}
SUM_ULPS = 16


def sum_magnitudes(x: torch.Tensor, grad_y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per channel, an upper estimate of the sum of |terms| of each parameter gradient:
    sum |dy| for the bias; sum |dy| (|x| + max |x|) / std(x) for the weight, whose terms are
    dy (x - mean) / sigma with |mean| <= max |x| and sigma of the order of the batch std."""
    dims = [0, *range(2, x.dim())]
    x, dy = x.double(), grad_y.double().abs()
    if x.numel() == 0:
        return {"weight": x.new_zeros(x.shape[1]), "bias": x.new_zeros(x.shape[1])}
    size = x.abs()
    weight = (dy * (size + size.amax(dims, keepdim=True))).sum(dims) / x.std(dims).clamp_min(1e-3)
    return {"weight": weight, "bias": dy.sum(dims)}


@dataclass(frozen=True)
class Spec:
    kind: str
    dtype: torch.dtype
    layout: str
    split: str
    shape: tuple[int, ...]  # per sample: (C, *spatial)

    def __str__(self):
        rank = len(self.shape) + 1
        return (f"{self.kind}-{str(self.dtype)[6:]}-{self.layout}-{self.split}"
                + ("" if rank == 4 else f"-{rank}d"))


def _matrix(kinds, dtypes, layouts, splits, shape=(5, 3, 4)):
    return [Spec(k, d, lay, s, shape) for k in kinds for d in dtypes for lay in layouts
            for s in splits]


LAYOUTS = ("contiguous", "channels_last")
SPECS = {
    "reference": (
        _matrix(KINDS, (torch.float64, torch.float32), LAYOUTS, ("even", "uneven", "empty"))
        + _matrix(("bn", "dbn-inverse-power"), (torch.float64,), ("contiguous",),
                  ("uneven", "empty"), shape=(7,))
        + _matrix(("dbn",), (torch.float64,), ("contiguous",), ("uneven",), shape=(4, 5))
        + _matrix(("bn", "dbn-inverse-power"), (torch.float32,), LAYOUTS, ("uneven",),
                  shape=(3, 2, 3, 2))),
    # Interpreted Triton runs each kernel in Python: the layouts and the uneven/empty batches.
    "triton": _matrix(("bn", "dbn-inverse-power"), (torch.float32,), LAYOUTS,
                      ("uneven", "empty"))
              + _matrix(("dbn-residual-relu",), (torch.float32,), ("channels_last",),
                        ("empty",)),
    # The emulation runs every CUDA thread as a fiber, one at a time: each kind once, the layouts and
    # batch splits alternating.
    "emu": [Spec(kind, torch.float32, LAYOUTS[i % 2], ("uneven", "empty")[i % 2], (5, 3, 4))
            for i, kind in enumerate(KINDS)]
           + [Spec("dbn-inverse-power", torch.float32, "contiguous", "empty", (5, 3, 4)),
              Spec("bn", torch.float32, "channels_last", "uneven", (5, 3, 4))],
}
BACKENDS = ("reference", "triton", "emu")
WORLDS = (2, 3)


def fresh_seed() -> int:
    """A new seed per run (inputs the code was never tuned on); failures print it, and
    ``DBN_SYNC_SEED=N`` replays a run."""
    return int(os.environ.get("DBN_SYNC_SEED") or int.from_bytes(os.urandom(4), "little"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, data_dir: Path, world: int, backend: str, emulation_dir=None,
           device: str = "cpu", timeout: float = 600) -> list:
    """Run ``world`` worker processes on ``data_dir/cases.pt``; their results, by rank."""
    port = free_port()
    extra = ["--emulation-dir", str(emulation_dir)] if emulation_dir else []
    extra += ["--device", device]
    # PYTHONFAULTHANDLER: a rank killed by a signal (a C++ abort in gloo or the compiler) prints
    # every thread's Python stack, so the failure below says where it died.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    procs = [subprocess.Popen(
        [sys.executable, str(WORKER), mode, str(data_dir), "--rank", str(rank),
         "--world", str(world), "--port", str(port), "--backend", backend, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for rank in range(world)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            proc.kill()
    failed = [(rank, p.returncode, out) for rank, (p, out) in enumerate(zip(procs, outputs))
              if p.returncode != 0]
    if failed:
        saved = {rank: (data_dir / f"rank{rank}.pt").exists() for rank in range(world)}
        pytest.fail("\n".join(
            f"rank {rank} exited with {rc} ({'after' if saved[rank] else 'before'} saving its "
            f"results):\n{out[-4000:]}" for rank, rc, out in failed))
    return [torch.load(data_dir / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


def make_case(spec: Spec, world: int, gen: torch.Generator, seed: int) -> dict:
    splits = SPLITS[world][spec.split]
    shape = (sum(splits), *spec.shape)
    C = spec.shape[0]
    offset = torch.linspace(-1.0, 3.0, C, dtype=torch.float64).view(1, C, *([1] * (len(shape) - 2)))

    def draw(scale=1.0, shift=0.0):
        t = torch.randn(shape, dtype=torch.float64, generator=gen) * scale + shift + offset
        return to_layout(t.to(spec.dtype), spec.layout)

    return {
        **{"eval_stats": "dbn", "grad_through_stats": True}, **KINDS[spec.kind],
        "dtype": spec.dtype, "layout": spec.layout, "shape": shape, "splits": splits,
        "eps": 1e-5, "seed": seed,
        "weight": 1 + 0.3 * torch.randn(C, dtype=torch.float64, generator=gen).to(spec.dtype),
        "bias": 0.5 * torch.randn(C, dtype=torch.float64, generator=gen).to(spec.dtype),
        "x": [draw(3.0 - 0.5 * k, 2.0 + k) for k in range(STEPS)],
        "grad_y": [draw() for _ in range(STEPS)],
        "x_eval": draw(2.0, 1.0),
        "residual": ([draw(1.0, -1.0) for _ in range(STEPS + 1)]  # the last one for eval
                     if KINDS[spec.kind].get("residual") else None),
    }


_RUNS: dict = {}


@pytest.fixture
def group_run(tmp_path_factory, request):
    """``run(backend, world, device)``: every case of ``SPECS[backend]`` on ``world`` ranks,
    once per session (the first test of a (backend, world, device) pays for the processes)."""
    def run(backend: str, world: int, device: str):
        key = (backend, world, device)
        if key not in _RUNS:
            emulation_dir = None
            if backend == "triton":
                pytest.importorskip("triton")
                pytest.importorskip("dbn_kernels.triton_kernels")
            if backend == "emu":
                emulation_dir = request.getfixturevalue("emulation_build_dir")
            seed = fresh_seed()
            gen = torch.Generator().manual_seed(seed)
            specs = SPECS["reference" if device == "cuda" else backend]
            cases = [make_case(spec, world, gen, seed) for spec in specs]
            data_dir = tmp_path_factory.mktemp(f"sync-{backend}-{world}-{device}")
            torch.save(cases, data_dir / "cases.pt")
            try:
                _RUNS[key] = cases, launch("layers", data_dir, world, backend, emulation_dir,
                                           device)
            except pytest.fail.Exception as exc:  # remembered: the other cases fail at once
                _RUNS[key] = exc
                raise
        if isinstance(_RUNS[key], BaseException):
            pytest.fail(f"the run of every {backend} case on {world} ranks failed; the first "
                        f"of them shows why", pytrace=False)
        return _RUNS[key]
    return run




_NCCL = [pytest.mark.gpu,
         pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for NCCL")]


def _params():
    on_cpu = [pytest.param(backend, world, "cpu", i, id=f"{backend}-w{world}-{spec}")
              for backend in BACKENDS for world in WORLDS
              for i, spec in enumerate(SPECS[backend])]
    on_nccl = [pytest.param(backend, 2, "cuda", i, id=f"{backend}-nccl-w2-{spec}", marks=_NCCL)
               for backend in ("cuda", "triton") for i, spec in enumerate(SPECS["reference"])]
    return on_cpu + on_nccl


@pytest.mark.parametrize("backend,world,device,index", _params())
def test_sync_layer_matches_one_process_on_the_whole_batch(group_run, request, backend, world,
                                                           device, index):
    cases, ranks = group_run(backend, world, device)
    case = cases[index]
    results = [r[index] for r in ranks]
    tol = TOLERANCES[case["dtype"]]
    where = f"seed {case['seed']}"
    single = make_layer(case, prepare_layer_backend(backend, request), sync=False,
                        device=device)
    assert not isinstance(single, nn.SyncBatchNorm)

    residuals = case["residual"] or [None] * (STEPS + 1)
    for step, (x, grad_y) in enumerate(zip(case["x"], case["grad_y"])):
        x = x.to(device).requires_grad_()
        r = None if residuals[step] is None else residuals[step].to(device).requires_grad_()
        y = single(x, r)
        y.backward(grad_y.to(device))
        got = [r["steps"][step] for r in results]
        msg = lambda m, what="": f"step {step + 1} {what}: {m} ({where})"  # noqa: E731
        torch.testing.assert_close(torch.cat([g["y"] for g in got]), y.detach().cpu(), **tol,
                                   msg=lambda m: msg(m, "y"))
        torch.testing.assert_close(torch.cat([g["grad_x"] for g in got]), x.grad.cpu(), **tol,
                                   msg=lambda m: msg(m, "grad_x"))
        if r is not None:
            assert torch.equal(torch.cat([g["grad_residual"] for g in got]), r.grad.cpu()), \
                msg("differs", "grad_residual")
        for rank, g in enumerate(got):
            if case["layout"] == "channels_last" and g["y"].dim() == 4 and g["y"].numel():
                assert g["y"].is_contiguous(memory_format=torch.channels_last), rank
                assert g["grad_x"].is_contiguous(memory_format=torch.channels_last), rank
        if case["affine"]:
            for name, magnitude in sum_magnitudes(x.detach().cpu(), grad_y).items():
                local = torch.stack([g[f"grad_{name}"] for g in got]).sum(0)
                want = getattr(single, name).grad.cpu()
                # Sums in another order: rounding up to a few ulps of the sum of |terms|, which
                # cancellation can make large against the sum itself.
                err = (local.double() - want.double()).abs()
                bound = SUM_ULPS * torch.finfo(case["dtype"]).eps * magnitude
                assert (err <= bound + tol["rtol"] * want.double().abs()).all(), msg(
                    f"errors {err.tolist()} over bounds {bound.tolist()}", f"sum of grad_{name}")
        expected = buffers(single)
        assert set(got[0]["buffers"]) == set(expected)
        for name, value in expected.items():
            first = got[0]["buffers"][name]
            torch.testing.assert_close(first, value.cpu(), **tol, msg=lambda m: msg(m, name))
            for rank, g in enumerate(got[1:], start=1):
                assert torch.equal(g["buffers"][name], first), f"{name} differs on rank {rank}"
        single.zero_grad(set_to_none=True)

    single.eval()
    with torch.no_grad():
        r = residuals[-1]
        y_eval = single(case["x_eval"].to(device), None if r is None else r.to(device))
    torch.testing.assert_close(torch.cat([r["y_eval"] for r in results]), y_eval.cpu(), **tol)
    for r in results:  # evaluation changes nothing
        for name in BUFFERS:
            if name in r["buffers_after_eval"]:
                assert torch.equal(r["buffers_after_eval"][name], r["steps"][-1]["buffers"][name])


# ---- DDP ----------------------------------------------------------------------------------------

DDP_SPLITS = {2: [7, 3], 3: [2, 5, 3]}
DDP_ALPHAS = {"bn": None, "dbn-inverse-power": ("inverse_power", 1.0, 2.0, 0.5)}


@pytest.mark.parametrize("world", WORLDS)
def test_ddp_cnn_trains_as_one_process(tmp_path, world):
    """convert(sync=True) + DistributedDataParallel + SGD on uneven per-rank batches: the same
    losses, parameters, buffers and eval outputs as one process on the whole batch."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    n, steps = sum(DDP_SPLITS[world]), 4
    specs = {}
    for name, alpha in DDP_ALPHAS.items():
        model = small_cnn(torch.float64)
        specs[name] = {
            "alpha": alpha, "dtype": torch.float64, "splits": DDP_SPLITS[world],
            "state": {k: v.clone() for k, v in model.state_dict().items()},
            "x": [torch.randn(n, 3, 6, 6, dtype=torch.float64, generator=gen) * 2 + 1
                  for _ in range(steps)],
            "target": [torch.randint(0, 4, (n,), generator=gen) for _ in range(steps)],
            "x_eval": torch.randn(5, 3, 6, 6, dtype=torch.float64, generator=gen),
        }
    torch.save(specs, tmp_path / "cases.pt")
    ranks = launch("ddp", tmp_path, world, "reference")

    for name, spec in specs.items():
        model = small_cnn(torch.float64)
        model.load_state_dict(spec["state"])
        dbn.convert(model, alpha=schedule(spec["alpha"]), backend="reference")
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for step, (x, target) in enumerate(zip(spec["x"], spec["target"])):
            loss = nn.functional.cross_entropy(model(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            # Each rank's loss is its share of world * (mean loss): they add up to world times it.
            total = sum(r[name]["losses"][step] for r in ranks) / world
            torch.testing.assert_close(total, loss.detach(), rtol=1e-10, atol=1e-12,
                                       msg=lambda m: f"{name} step {step}: {m} (seed {seed})")
        model.eval()
        with torch.no_grad():
            y_eval = model(spec["x_eval"])
        for rank, r in enumerate(ranks):
            state = r[name]["state"]
            assert state.keys() == model.state_dict().keys()
            for key, value in model.state_dict().items():
                torch.testing.assert_close(state[key], value, rtol=1e-9, atol=1e-11,
                                           msg=lambda m: f"{name} rank {rank} {key}: {m}")
            torch.testing.assert_close(r[name]["y_eval"], y_eval, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compiled_sync_layer_matches_eager(tmp_path, backend):
    """torch.compile(fullgraph=True) of a sync layer on 2 ranks: the gathers are traced with the
    ops around them; outputs, gradients and buffers equal the eager sync layer's."""
    if backend == "triton":
        pytest.importorskip("dbn_kernels.triton_kernels")
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    specs = [Spec("dbn-inverse-power", torch.float32, "channels_last", "uneven", (5, 3, 4)),
             Spec("bn-cumulative", torch.float32, "contiguous", "empty", (5, 3, 4))]
    torch.save([make_case(spec, 2, gen, seed) for spec in specs], tmp_path / "cases.pt")
    ranks = launch("compile", tmp_path, 2, backend)
    for rank, r in enumerate(ranks):
        for case, compiled, eager in zip(specs, r["compiled"], r["eager"]):
            for step, (c, e) in enumerate(zip(compiled["steps"], eager["steps"])):
                for key in ("y", "grad_x", "grad_weight", "grad_bias"):
                    # Inductor computes the loss and its dy with fused kernels of its own, whose
                    # float32 rounding differs from eager's by an ulp here and there; summed
                    # into a parameter gradient that reaches a few 1e-6 (seed 1224154349).
                    tol = 1e-6 if key == "y" else 1e-5
                    torch.testing.assert_close(c[key], e[key], rtol=tol, atol=tol,
                                               msg=lambda m: f"{case} rank {rank} step {step} "
                                                             f"{key}: {m} (seed {seed})")
                for name, value in e["buffers"].items():
                    torch.testing.assert_close(c["buffers"][name], value, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(compiled["y_eval"], eager["y_eval"], rtol=1e-6, atol=1e-6)


# ---- one process ------------------------------------------------------------------------------

def _train(layer, xs):
    outs = []
    for x in xs:
        x = x.clone().requires_grad_()
        y = layer(x)
        y.backward(torch.ones_like(y) + x.detach())
        outs.append((y.detach(), x.grad, layer.weight.grad.clone()))
        layer.zero_grad(set_to_none=True)
    return outs


def _steps(n=3, shape=(6, 4, 3, 3)):
    return [torch.randn(shape) * 2 + 1 for _ in range(n)]


@pytest.mark.parametrize("cls,local", [(dbn.SyncBatchNorm, dbn.BatchNorm2d),
                                       (dbn.SyncDiminishingBatchNorm, dbn.DiminishingBatchNorm2d)])
def test_without_a_process_group_sync_layers_are_the_local_ones(cls, local):
    assert not dist.is_initialized()
    xs = _steps()
    sync_layer, local_layer = cls(4, momentum=None), local(4, momentum=None)
    for got, want in zip(_train(sync_layer, xs), _train(local_layer, xs)):
        for g, w in zip(got, want):
            assert torch.equal(g, w)
    assert torch.equal(sync_layer.running_var, local_layer.running_var)
    assert sync_layer.state_dict().keys() == local_layer.state_dict().keys()


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_a_group_of_one_rank_runs_the_local_step_without_a_collective(one_rank_group,
                                                                        monkeypatch):
    def no_collective(*args, **kwargs):
        raise AssertionError("a group of one rank has nothing to gather")

    monkeypatch.setattr(dist, "all_gather_into_tensor", no_collective)
    xs = _steps()
    got = _train(dbn.SyncDiminishingBatchNorm(4, alpha=dbn.inverse_power(1.0)), xs)
    want = _train(dbn.DiminishingBatchNorm2d(4, alpha=dbn.inverse_power(1.0)), xs)
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            assert torch.equal(a, b)


def test_functional_forms_sync_only_when_given_a_group(one_rank_group, monkeypatch):
    """``process_group=None`` (the default) is this call's batch even with an initialised
    group; eval never gathers."""
    calls = []
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: calls.append(group) or 2)
    x = torch.randn(4, 3, 2, 2)
    rm, rv = torch.zeros(3), torch.ones(3)
    dbn.functional.batch_norm(x, rm, rv, training=True)
    dbn.functional.batch_norm(x, rm, rv, training=False, process_group=dist.group.WORLD)
    assert calls == []


def test_compile_fullgraph_on_the_single_device_path():
    layer = dbn.SyncDiminishingBatchNorm(4, alpha=dbn.inverse_power(1.0))
    twin = dbn.DiminishingBatchNorm2d(4, alpha=dbn.inverse_power(1.0))
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for x in _steps(2):
        torch.testing.assert_close(compiled(x), twin(x))
    torch.testing.assert_close(layer.dbn_std, twin.dbn_std)


# ---- construction, conversion, bad input -------------------------------------------------------

def test_sync_layers_are_torch_sync_batch_norms_with_the_local_state_dicts():
    sync, local = dbn.SyncDiminishingBatchNorm(5, bias=False), dbn.DiminishingBatchNorm2d(5)
    assert isinstance(sync, nn.SyncBatchNorm) and sync.bias is None
    assert sync.state_dict().keys() == (local.state_dict().keys() - {"bias"})
    plain = dbn.SyncBatchNorm(5)
    assert plain.state_dict().keys() == nn.SyncBatchNorm(5).state_dict().keys()
    # any rank >= 2, as torch.nn.SyncBatchNorm
    for shape in [(4, 5), (4, 5, 3), (4, 5, 2, 2, 2)]:
        assert plain(torch.randn(shape)).shape == shape
    # a batch-norm checkpoint seeds the averages, as for the local layer
    sync.load_state_dict(nn.BatchNorm2d(5, affine=False).state_dict() | {"weight": torch.ones(5)})
    torch.testing.assert_close(sync.dbn_std, torch.full((5,), (1 + 1e-5) ** 0.5))


@pytest.mark.parametrize("alpha", [None, 0.5])
def test_convert_sync_replaces_torch_layers_reusing_their_tensors(alpha):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(4)),
                          nn.SyncBatchNorm(4))
    model[3].eval()
    tensors = {i: (bn.weight, bn.running_mean, bn.num_batches_tracked)
               for i, bn in ((1, model[1]), (2, model[2][0]), (3, model[3]))}
    group = object()
    dbn.convert(model, alpha=alpha, sync=True, process_group=group, backend="reference")
    expected = dbn.SyncBatchNorm if alpha is None else dbn.SyncDiminishingBatchNorm
    for i, layer in ((1, model[1]), (2, model[2][0]), (3, model[3])):
        assert type(layer) is expected and layer.process_group is group
        assert (layer.weight, layer.running_mean, layer.num_batches_tracked) == tensors[i]
        assert layer.backend == "reference"
    assert model[1].training and not model[3].training


def test_convert_keeps_a_torch_sync_layer_sync_with_its_group():
    group = object()
    model = nn.Sequential(nn.SyncBatchNorm(4, process_group=group), nn.BatchNorm2d(4))
    dbn.convert(model, alpha=0.25)
    assert type(model[0]) is dbn.SyncDiminishingBatchNorm and model[0].process_group is group
    assert type(model[1]) is dbn.DiminishingBatchNorm2d


def test_convert_sync_keeps_the_project_layers_kind_and_settings():
    schedule_ = dbn.inverse_power(1.5)
    model = nn.Sequential(
        dbn.DiminishingBatchNorm2d(4, alpha=schedule_, eval_stats="running",
                                   grad_through_stats=False, backend="reference",
                                   normalize_with="batch"),
        dbn.BatchNorm1d(4, momentum=None, affine=False))
    dbn_std = model[0].dbn_std
    model.eval()
    already = dbn.SyncBatchNorm(4)
    model.append(already)
    dbn.convert(model, sync=True)  # alpha=None: a Diminishing layer stays Diminishing
    first, second = model[0], model[1]
    assert type(first) is dbn.SyncDiminishingBatchNorm
    assert first.alpha is schedule_ and first.eval_stats == "running"
    assert not first.grad_through_stats and first.backend == "reference"
    assert first.normalize_with == "batch"
    assert first.dbn_std is dbn_std and not first.training
    assert type(second) is dbn.SyncBatchNorm and second.momentum is None and second.weight is None
    assert model[2] is already


def test_convert_sync_batchnorm_classmethod_keeps_diminishing_layers():
    """torch.nn.SyncBatchNorm.convert_sync_batchnorm turns a Diminishing layer into a plain
    torch.nn.SyncBatchNorm (dropping its averages); the project's classmethod does not."""
    model = nn.Sequential(dbn.DiminishingBatchNorm2d(3, alpha=0.1), nn.BatchNorm2d(3))
    dbn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(model[0]) is dbn.SyncDiminishingBatchNorm and model[0].alpha(5) == 0.1
    assert type(model[1]) is dbn.SyncBatchNorm
    lost = nn.SyncBatchNorm.convert_sync_batchnorm(
        nn.Sequential(dbn.DiminishingBatchNorm2d(3, alpha=0.1)))
    assert type(lost[0]) is nn.SyncBatchNorm and "0.dbn_mean" not in lost.state_dict()


def test_bad_input_is_refused_before_anything_changes():
    layer = dbn.SyncDiminishingBatchNorm(3)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"expected at least 2D input \(got 1D input\)"):
        layer(torch.randn(3))
    with pytest.raises(ValueError, match="number of input channels should be non-zero"):
        layer(torch.randn(2, 0, 3))
    with pytest.raises(RuntimeError, match="running_mean should contain 4 elements not 3"):
        layer(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        layer(torch.randn(1, 3))  # one process: its batch is the whole batch
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
