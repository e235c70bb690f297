"""One rank of a multi-process test of the sync layers (tests/test_sync.py starts one per rank).

    python tests/sync_worker.py MODE DATA_DIR --rank R --world W --port P --backend B
                                [--emulation-dir DIR]

joins a gloo group on 127.0.0.1:P, reads ``DATA_DIR/cases.pt`` (written by the test: every
global batch, gradient and initial parameter), runs this rank's slice of each case and writes
what it saw to ``DATA_DIR/rank{R}.pt`` for the test to compare with one process on the whole
batch. Modes:

* ``layers``: a sync layer per case, several training steps (y, dx, parameter gradients and
  every buffer after each step), then a local evaluation;
* ``ddp``: a small CNN converted with ``convert(sync=True)``, wrapped in
  ``DistributedDataParallel`` and trained with SGD (losses, parameters and buffers);
* ``compile``: the cases of ``layers`` through ``torch.compile(fullgraph=True)`` of the sync
  layer, with the eager sync layer's results beside them.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

TESTS = Path(__file__).resolve().parent


def use_backend(name: str, emulation_dir: str | None) -> str:
    """The layers' ``backend=`` for ``name``. The emulation is not a user-facing backend, so
    layers get the name through backend resolution's cache (a test-only shortcut)."""
    if name != "emu":
        return name
    sys.path.insert(0, str(TESTS))
    from emulation import build_emulation  # a build already done: this loads it

    from dbn_kernels import backends

    build_emulation(emulation_dir)
    backends._RESOLVED[("emu", None, "cpu")] = "emu"
    return "emu"


def make_layer(case: dict, backend: str, sync: bool, device: str = "cpu"):
    """The case's layer: the sync class, or the local one of the input's rank."""
    import dbn_kernels as dbn

    dims = {2: 1, 3: 1, 4: 2, 5: 3}[len(case["shape"])]
    options = dict(eps=case["eps"], momentum=case["momentum"], affine=case["affine"],
                   dtype=case["dtype"])
    diminishing = case["alpha"] is not None
    if diminishing:
        options.update(alpha=schedule(case["alpha"]), eval_stats=case["eval_stats"],
                       grad_through_stats=case["grad_through_stats"],
                       normalize_with=case.get("normalize_with", "average"))
        cls = (dbn.SyncDiminishingBatchNorm if sync
               else getattr(dbn, f"DiminishingBatchNorm{dims}d"))
    else:
        cls = dbn.SyncBatchNorm if sync else getattr(dbn, f"BatchNorm{dims}d")
    layer = cls(case["shape"][1], **options, device=device, activation=case.get("activation"))
    layer.backend = backend  # after construction: "emu" is not a name the layers validate
    if case["affine"]:
        with torch.no_grad():
            layer.weight.copy_(case["weight"])
            layer.bias.copy_(case["bias"])
    return layer


def schedule(alpha):
    """A case's alpha: a float, or ("inverse_power", power, scale, offset)."""
    import dbn_kernels as dbn

    if isinstance(alpha, tuple):
        _, power, scale, offset = alpha
        return dbn.inverse_power(power, scale=scale, offset=offset)
    return alpha


BUFFERS = ("running_mean", "running_var", "dbn_mean", "dbn_std", "num_batches_tracked")


def _on_cpu(tree):
    """Copies on the CPU (a clone there too: nothing the layer changes later aliases them)."""
    if isinstance(tree, dict):
        return {k: _on_cpu(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_on_cpu(v) for v in tree]
    return tree.detach().to("cpu", copy=True) if isinstance(tree, torch.Tensor) else tree


def buffers(layer) -> dict:
    return {name: getattr(layer, name).detach().clone() for name in BUFFERS
            if getattr(layer, name, None) is not None}


def rank_slice(t: torch.Tensor, splits: list[int], rank: int) -> torch.Tensor:
    return t.split(splits)[rank]


def run_layers(cases: list[dict], rank: int, backend: str, device: str = "cpu",
               compiled: bool = False) -> list[dict]:
    """Each case's steps on this rank; tensors returned on the CPU."""
    results = []
    for case in cases:
        module = make_layer(case, backend, sync=True, device=device)
        layer = torch.compile(module, fullgraph=True, backend="aot_eager") if compiled else module
        steps = []
        residuals = [None if r is None else rank_slice(r, case["splits"], rank).to(device)
                     for r in case.get("residual") or [None] * (len(case["x"]) + 1)]
        for x, grad_y, residual in zip(case["x"], case["grad_y"], residuals):
            x = rank_slice(x, case["splits"], rank).to(device).requires_grad_()
            if residual is not None:
                residual.requires_grad_()
            y = layer(x, residual)
            y.backward(rank_slice(grad_y, case["splits"], rank).to(device))
            steps.append(_on_cpu({
                "y": y.detach(), "grad_x": x.grad,
                "grad_residual": None if residual is None else residual.grad,
                "grad_weight": None if module.weight is None else module.weight.grad,
                "grad_bias": None if module.bias is None else module.bias.grad,
                "buffers": buffers(module),
            }))
            module.zero_grad(set_to_none=True)
        module.eval()
        with torch.no_grad():
            y_eval = layer(rank_slice(case["x_eval"], case["splits"], rank).to(device),
                           residuals[-1])
        results.append(_on_cpu({"steps": steps, "y_eval": y_eval,
                                "buffers_after_eval": buffers(module)}))
    return results


def small_cnn(dtype: torch.dtype) -> torch.nn.Module:
    """conv-BN-ReLU twice, pooled, linear: the model of the DDP test (torch's layers, to be
    converted)."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).to(dtype)


def run_ddp(spec: dict, rank: int, world: int, backend: str) -> dict:
    """SGD on a small CNN under DDP. Rank r's loss is its samples' summed loss times
    world / N (N the global batch): DDP averages the ranks' gradients, so the update is the one
    of the mean loss over the whole batch, however unevenly the samples are split."""
    from torch.nn.parallel import DistributedDataParallel

    import dbn_kernels as dbn

    model = small_cnn(spec["dtype"])
    model.load_state_dict(spec["state"])
    dbn.convert(model, alpha=schedule(spec["alpha"]), sync=True, backend=backend)
    # DDP refuses any torch.nn.SyncBatchNorm in a CPU module, a guard for torch's own sync
    # kernels (CUDA only). The project's run on gloo, so the guard is lifted for this CPU test;
    # on GPUs (NCCL) DDP takes the layers as they are.
    DistributedDataParallel._passing_sync_batchnorm_handle = lambda self, module: None
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    losses = []
    n = spec["x"][0].shape[0]
    for x, target in zip(spec["x"], spec["target"]):
        x = rank_slice(x, spec["splits"], rank)
        target = rank_slice(target, spec["splits"], rank)
        loss = F.cross_entropy(ddp(x), target, reduction="sum") * (world / n)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    model.eval()
    with torch.no_grad():
        y_eval = model(spec["x_eval"])
    return {"losses": losses, "state": {k: v.clone() for k, v in model.state_dict().items()},
            "y_eval": y_eval}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("layers", "ddp", "compile"))
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--emulation-dir")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: NCCL, rank r on GPU r; cpu: gloo")
    args = parser.parse_args()

    torch.set_num_threads(1)  # several ranks share the machine's cores
    backend = use_backend(args.backend, args.emulation_dir)
    device = args.device
    if device == "cuda":
        device = f"cuda:{args.rank}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{args.port}",
                            rank=args.rank, world_size=args.world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        data = torch.load(args.data_dir / "cases.pt", weights_only=False)
        if args.mode == "layers":
            out = run_layers(data, args.rank, backend, device)
        elif args.mode == "compile":
            out = {"compiled": run_layers(data, args.rank, backend, compiled=True),
                   "eager": run_layers(data, args.rank, backend)}
        else:
            out = {name: run_ddp(spec, args.rank, args.world, backend)
                   for name, spec in data.items()}
        torch.save(out, args.data_dir / f"rank{args.rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors: Triton only interpreted
    main()
