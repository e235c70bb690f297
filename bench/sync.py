"""Synchronisation cost: a training step of the sync layers against the local layers.

``dbn_kernels.SyncBatchNorm`` and ``SyncDiminishingBatchNorm`` normalise a training batch with the
statistics of every rank. Their forward gathers each rank's (count, mean, M2) rows, their backward
each rank's (count, sum dy, sum dy * (x - mean)) rows: one ``all_gather_into_tensor`` of a (3, C)
tensor in the statistics' dtype (float64 for float64 input, else float32) each way. This
benchmark starts ``--sync-world`` processes on this machine, one rank each (gloo on CPU tensors,
NCCL on CUDA tensors with one GPU per rank), and for every per-rank shape, dtype and kind times a
training forward + backward (``layer(x).backward(dy)``, x requiring grad) of

* ``local``       the local layer (``BatchNorm2d`` / ``DiminishingBatchNorm2d``), no collective;
* ``sync``        the sync layer (``SyncBatchNorm`` / ``SyncDiminishingBatchNorm``) on the same
                  backend, statistics of all ranks;
* ``collective``  the two gathers alone: ``dbn_kernels.sync.all_gather_rows`` of a (3, C) tensor,
                  the call the sync layer makes, twice.

``sync - local`` is what synchronising costs the layer: the two collectives, the extra passes of
the split step (the local layer's step is fused where its backend fuses it), and waiting for the
slowest rank. The collective alone says how much of that is the transport.

Method: before timing a case every rank checks that the sync layer normalised with the statistics
of all ranks (each rank's batch is shifted by its rank, so the local statistics would not pass).
Then, after ``--warmup`` untimed rounds, ``--reps`` rounds each time local, sync and collective in
turn (interleaved, so that drift of the machine hits all three alike), every timed call after a
``barrier`` so that the ranks start it together. A rank's time of a call runs from the barrier's
return to the call's end: on CPU ``time.perf_counter_ns``; on CUDA CUDA events recorded around
the call on the current stream (the device idle at the start event: synchronised before the
barrier), which include the waits on NCCL's stream. Each round's time is the maximum over the
ranks (one ``all_reduce(MAX)`` after the measurement), since a synchronised step is as slow as its
slowest rank, and a row reports the median over the rounds.

    dbn-bench --sync-world 2 [--device cpu|cuda] [--shapes NxCxHxW,...] [--dtype ...]
              [--reps N] [--json PATH]
    python -m dbn_kernels.benchmark.sync [same options]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dbn_kernels as dbn
from dbn_kernels import backends
from dbn_kernels.ops import stat_dtype
from dbn_kernels.sync import all_gather_rows

from . import environment
from .cli import CPU_DEFAULT_THREADS, EXIT_FAILED_CHECK, EXIT_OK, EXIT_USAGE, comma_list
from .shapes import DTYPES, shape_list
from .timing import NOISE_THRESHOLD, Timing

KINDS = {
    # kind: (sync layer, local layer)
    "bn": (dbn.SyncBatchNorm, dbn.BatchNorm2d),
    "dbn": (dbn.SyncDiminishingBatchNorm, dbn.DiminishingBatchNorm2d),
}

SYNC_DTYPES = {**DTYPES, "float64": torch.float64}
"""The kernel suite's dtypes and float64, whose statistics (and gathers) are float64."""

DEFAULT_SHAPES = ((8, 64, 56, 56), (8, 128, 28, 28), (8, 256, 14, 14), (8, 512, 7, 7),
                  (8, 2048, 7, 7))
"""Per rank: batch-norm shapes of ResNet-50's stages at batch 8. Small enough that the default CPU
run takes about half a minute on two cores, and spanning 64 to 2048 channels, so the gathered
rows grow (3 x C values per rank) while each rank's arithmetic shrinks from 1.6 Mi values to
0.1 Mi."""

CALLS = ("local", "sync", "collective")

PROCESS_GROUP_BACKENDS = {"cpu": "gloo", "cuda": "nccl"}

RENDEZVOUS_TIMEOUT = datetime.timedelta(seconds=60)
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)
"""A rank that does not arrive fails the run after this, rather than leaving the others waiting
(gloo's default is 30 minutes)."""

DEFAULT_REPS = {"cpu": 30, "cuda": 100}
DEFAULT_WARMUP = 5

CHECK_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.bfloat16: 2e-2,
                   torch.float16: 4e-3}
"""Relative norm error of the sync layer's output against the float64 normalisation with the
group's statistics. A rank's local statistics miss by far more: its batch is shifted by its rank."""


@dataclass(frozen=True)
class Config:
    """What every rank runs; sent to the spawned processes, so plain values only."""

    world_size: int
    device_type: str
    shapes: tuple[tuple[int, int, int, int], ...]
    dtypes: tuple[str, ...]
    kinds: tuple[str, ...]
    backend: str
    reps: int
    warmup: int
    threads: int | None
    """torch.set_num_threads in every rank; ``None``: PyTorch's default."""
    store_port: int
    result_path: str
    """Rank 0 writes its rows here as JSON."""


@dataclass
class Row:
    shape: list[int]
    """Per rank; the group's batch is ``world_size`` times N."""
    kind: str
    dtype: str
    stat_dtype: str
    backend: str
    """The backend the layers ran (``--backend`` resolved on the device)."""
    local_ms: float
    sync_ms: float
    overhead_ms: float
    overhead_pct: float
    collective_ms: float
    """Two gathers: the forward's and the backward's."""
    gathered_bytes: int
    """What one gather delivers to each rank: world x 3 x C values of the statistics' dtype."""
    reps: int
    spread: dict[str, float]
    """(p80 - p20) / median per call."""
    noisy: bool
    """Some call's spread exceeds NOISE_THRESHOLD: its median, and the overhead, may not repeat."""
    samples_ms: dict[str, list[float]]
    """Per call, each round's time (the slowest rank's), sorted."""


# ---- on every rank ---------------------------------------------------------------------------

def _rank_main(rank: int, config: Config) -> None:
    """One rank: join the group, check and time every case; rank 0 writes the rows."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    if config.device_type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    store = dist.TCPStore("127.0.0.1", config.store_port, is_master=False,
                          timeout=RENDEZVOUS_TIMEOUT)
    init = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(PROCESS_GROUP_BACKENDS[device.type], store=store, rank=rank,
                            world_size=config.world_size, timeout=COLLECTIVE_TIMEOUT, **init)
    try:
        rows = [asdict(_measure_case(config, device, shape, kind, dtype))
                for shape in config.shapes for dtype in config.dtypes for kind in config.kinds]
        if rank == 0:
            with open(config.result_path, "w") as out:
                json.dump(rows, out)
        dist.barrier()  # no rank leaves while another may still need it
    finally:
        dist.destroy_process_group()


def _inputs(shape, dtype: torch.dtype, device: torch.device):
    """This rank's x (requiring grad) and dy. The batch is shifted by the rank, so the group's
    statistics differ clearly from each rank's own."""
    rank = dist.get_rank()
    generator = torch.Generator().manual_seed(1000 + rank)
    x = (torch.randn(shape, generator=generator, dtype=torch.float64) + rank)
    dy = torch.randn(shape, generator=generator, dtype=torch.float64)
    return x.to(device, dtype).requires_grad_(), dy.to(device, dtype)


def _check_synchronised(layer: torch.nn.Module, x: torch.Tensor) -> None:
    """The sync layer's first training step (plain batch norm for both kinds: the fresh layers
    have a_1 = 1 and weight 1, bias 0) normalises with the statistics of the whole group."""
    with torch.no_grad():
        y = layer(x).double()
        x64 = x.detach().double()
        dims = (0, 2, 3)
        count = torch.full((x.shape[1],), x64.numel() / x.shape[1], dtype=torch.float64,
                           device=x.device)
        sums = torch.stack((count, x64.sum(dims), x64.square().sum(dims)))
        dist.all_reduce(sums)
        mean = sums[1] / sums[0]
        var = sums[2] / sums[0] - mean.square()
        expected = (x64 - mean.view(1, -1, 1, 1)) * torch.rsqrt(var.view(1, -1, 1, 1) + layer.eps)
        error = (torch.linalg.vector_norm(y - expected) / torch.linalg.vector_norm(expected)).item()
    if not error <= CHECK_TOLERANCE[x.dtype]:
        raise RuntimeError(
            f"rank {dist.get_rank()}: {type(layer).__name__} on {tuple(x.shape)} {x.dtype} did not "
            f"normalise with the group's statistics (relative error {error:.2e}, tolerance "
            f"{CHECK_TOLERANCE[x.dtype]:.0e}): nothing to time")


def _training_step(layer: torch.nn.Module, x: torch.Tensor,
                   dy: torch.Tensor) -> Callable[[], None]:
    """Forward and backward, gradients set to None first so that no call accumulates into them
    (accumulating would add an x-sized pass to every call)."""
    layer.train()

    def step():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(dy)
    return step


def _collectives(channels: int, dtype: torch.dtype, device: torch.device) -> Callable[[], None]:
    """The sync layer's two gathers of a (3, C) tensor, without the layer."""
    rows = torch.zeros((3, channels), dtype=dtype, device=device)
    group = dist.group.WORLD

    def gathers():
        all_gather_rows(rows, group)
        all_gather_rows(rows, group)
    return gathers


class _RankClock:
    """A rank's time of one call from a common start: the barrier's return."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)

    def time_ms(self, call: Callable[[], None]) -> float:
        if self.cuda:
            torch.cuda.synchronize()  # the device idle: the start event runs when recorded
            dist.barrier()
            self.start.record()
            call()
            self.end.record()
            self.end.synchronize()
            return self.start.elapsed_time(self.end)
        dist.barrier()
        start = time.perf_counter_ns()
        call()
        return (time.perf_counter_ns() - start) / 1e6


def _measure_case(config: Config, device: torch.device, shape, kind: str, dtype_name: str) -> Row:
    dtype = SYNC_DTYPES[dtype_name]
    stats = stat_dtype(torch.empty((), dtype=dtype))
    # Parameters and buffers in float32 (mixed precision's usual layout), float64 beside float64.
    factory = {"device": device, "dtype": stats}
    sync_cls, local_cls = KINDS[kind]
    channels = shape[1]
    x, dy = _inputs(shape, dtype, device)
    _check_synchronised(sync_cls(channels, backend=config.backend, **factory), x)

    calls = {
        "local": _training_step(local_cls(channels, backend=config.backend, **factory), x, dy),
        "sync": _training_step(sync_cls(channels, backend=config.backend, **factory), x, dy),
        "collective": _collectives(channels, stats, device),
    }
    clock = _RankClock(device)
    for _ in range(config.warmup):
        for call in calls.values():
            clock.time_ms(call)
    samples = torch.tensor([[clock.time_ms(call) for call in calls.values()]
                            for _ in range(config.reps)], dtype=torch.float64)
    # The slowest rank's time of each round: a synchronised step waits for it.
    samples = samples.to(device)
    dist.all_reduce(samples, op=dist.ReduceOp.MAX)
    timings = {name: Timing(samples[:, i].tolist()) for i, name in enumerate(calls)}
    local, sync = timings["local"].median_ms, timings["sync"].median_ms
    return Row(shape=list(shape), kind=kind, dtype=dtype_name, stat_dtype=str(stats).split(".")[-1],
               backend=backends.resolve(config.backend, device), local_ms=local, sync_ms=sync,
               overhead_ms=sync - local, overhead_pct=100.0 * (sync - local) / local,
               collective_ms=timings["collective"].median_ms,
               gathered_bytes=config.world_size * 3 * channels * stats.itemsize,
               reps=config.reps, spread={name: t.spread for name, t in timings.items()},
               noisy=any(t.noisy for t in timings.values()),
               samples_ms={name: t.samples_ms for name, t in timings.items()})


# ---- in the launching process ------------------------------------------------------------------

def build_parser(prog: str = "python -m dbn_kernels.benchmark.sync") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Cost of synchronising batch norm: a training forward + backward of "
                    "SyncBatchNorm / SyncDiminishingBatchNorm against BatchNorm2d / "
                    "DiminishingBatchNorm2d, and the collective alone, with one process per rank "
                    "on this machine (gloo on CPU, NCCL with one GPU per rank on CUDA).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sync-world", "--world-size", dest="world_size", type=int, default=2,
                        metavar="N", help="number of ranks (processes), at least 2")
    parser.add_argument("--device", choices=tuple(PROCESS_GROUP_BACKENDS), default=None,
                        help="cpu: gloo; cuda: NCCL, rank r on GPU r (default: cuda when at least "
                             "N GPUs are visible, else cpu)")
    parser.add_argument("--shapes", type=shape_list, metavar="NxCxHxW[,...]", default=None,
                        help="per-rank input shapes (default: "
                             f"{','.join('x'.join(map(str, s)) for s in DEFAULT_SHAPES)})")
    parser.add_argument("--dtype", nargs="+", metavar="DTYPE", default=["float32"],
                        help=f"one or more of {', '.join(SYNC_DTYPES)}")
    parser.add_argument("--kinds", nargs="+", metavar="KIND", default=list(KINDS),
                        help=f"one or more of {', '.join(KINDS)}")
    parser.add_argument("--backend", choices=("auto", *backends.BACKENDS), default="auto",
                        help="the backend of both the local and the sync layer")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed rounds per case (default: "
                             + ", ".join(f"{n} on {d}" for d, n in DEFAULT_REPS.items()) + ")")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                        help="untimed rounds per case first")
    parser.add_argument("--threads", type=int, default=None,
                        help=f"torch.set_num_threads in every rank (default: {CPU_DEFAULT_THREADS} "
                             "on CPU, so the ranks do not compete for cores with threads that "
                             "wait for each other; PyTorch's default on CUDA)")
    parser.add_argument("--json", metavar="PATH", help="write rows and environment as JSON")
    return parser


class UsageError(Exception):
    pass


def _device_type(name: str | None, world_size: int) -> str:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if name is None:
        return "cuda" if gpus >= world_size else "cpu"
    if name == "cuda" and gpus < world_size:
        raise UsageError(f"--device cuda with {world_size} ranks needs {world_size} GPUs (one per "
                         f"rank); found {gpus}")
    return name


def _validate(args) -> tuple[str, list[str], list[str]]:
    if args.world_size < 2:
        raise UsageError("--sync-world must be at least 2 (one rank has nothing to synchronise)")
    if (args.reps is not None and args.reps < 1) or args.warmup < 0:
        raise UsageError("--reps must be at least 1, --warmup at least 0")
    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads must be at least 1")
    dtypes = comma_list(args.dtype)
    kinds = comma_list(args.kinds)
    for values, allowed, what in ((dtypes, SYNC_DTYPES, "dtype"), (kinds, KINDS, "kind")):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise UsageError(f"unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)}")
    device_type = _device_type(args.device, args.world_size)
    pg_backend = PROCESS_GROUP_BACKENDS[device_type]
    if not dist.is_available() or not getattr(dist, f"is_{pg_backend}_available")():
        raise UsageError(f"torch {torch.__version__} was built without {pg_backend}, which "
                         f"--device {device_type} needs")
    if args.backend != "auto" and (reason := backends.unavailable_reason(args.backend,
                                                                         device_type)):
        raise UsageError(f"--backend {args.backend} cannot run on {device_type}: {reason}")
    for shape in args.shapes or ():
        if shape[0] * shape[2] * shape[3] < 2:
            raise UsageError(f"shape {'x'.join(map(str, shape))}: training needs more than one "
                             "value per channel on each rank")
    return device_type, dtypes, kinds


def run(config_without_port: dict) -> list[dict]:
    """Spawn the ranks, each connecting to a TCP store served here (on a port the system chose,
    so no other program can hold it), and return rank 0's rows. A rank that raises stops all of
    them; its error is raised here."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=RENDEZVOUS_TIMEOUT)
    with tempfile.TemporaryDirectory(prefix="dbn-bench-sync-") as tmp:
        config = Config(**config_without_port, store_port=store.port,
                        result_path=os.path.join(tmp, "rows.json"))
        mp.spawn(_rank_main, args=(config,), nprocs=config.world_size, join=True)
        with open(config.result_path) as rows:
            return json.load(rows)


def format_table(rows: list[dict]) -> str:
    header = ("shape/rank", "kind", "dtype", "local ms", "sync ms", "overhead ms", "overhead",
              "collective ms (2 calls)")
    lines = [("x".join(map(str, row["shape"])), row["kind"], row["dtype"],
              f"{row['local_ms']:.3f}", f"{row['sync_ms']:.3f}", f"{row['overhead_ms']:+.3f}",
              f"{row['overhead_pct']:+.1f}%" + ("?" if row["noisy"] else ""),
              f"{row['collective_ms']:.3f}") for row in rows]
    widths = [max(len(header[i]), *(len(line[i]) for line in lines)) for i in range(len(header))]
    left = {0, 1, 2}

    def render(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    table = [render(header), "  ".join("-" * w for w in widths), *(render(line) for line in lines)]
    if any(row["noisy"] for row in rows):
        table.append(f"?: some call's p20-p80 is wider than {NOISE_THRESHOLD:.0%} of its median "
                     "(spread in the JSON)")
    return "\n".join(table)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(*([prog] if prog else []))
    args = parser.parse_args(argv)
    try:
        device_type, dtypes, kinds = _validate(args)
    except UsageError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    threads = args.threads or (CPU_DEFAULT_THREADS if device_type == "cpu" else None)
    shapes = tuple(args.shapes or DEFAULT_SHAPES)
    reps = args.reps or DEFAULT_REPS[device_type]
    pg_backend = PROCESS_GROUP_BACKENDS[device_type]
    env = environment.collect(torch.device(device_type, 0) if device_type == "cuda"
                              else torch.device("cpu"))
    env.update(cpu_threads=threads or torch.get_num_threads(),
               cpu_threads_set_by="--threads" if args.threads else
               (f"the default on CPU ({CPU_DEFAULT_THREADS})" if threads else "PyTorch's default"),
               cpus_usable=(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                            else os.cpu_count()),
               load_average_1min=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
               gpus_visible=torch.cuda.device_count() if torch.cuda.is_available() else 0)
    measured = ("per round, each call after a barrier: the slowest rank's time from the barrier "
                "to the call's end (" + ("CUDA events on the current stream, device idle at the "
                                         "start" if device_type == "cuda"
                                         else "time.perf_counter_ns") +
                f"); median over {reps} rounds after {args.warmup} warm-up rounds, local, sync "
                "and collective interleaved; collective = two all_gather_into_tensor of (3, C)")
    print(f"synchronisation cost on {environment.device_name(env)}: {args.world_size} ranks on "
          f"{device_type}, process group {pg_backend}, backend {args.backend}, "
          f"{threads or 'default'} thread(s) per rank")
    print(f"measured: {measured}", flush=True)
    try:
        rows = run(dict(world_size=args.world_size, device_type=device_type, shapes=shapes,
                        dtypes=tuple(dtypes), kinds=tuple(kinds), backend=args.backend,
                        reps=reps, warmup=args.warmup, threads=threads))
    except Exception as exc:  # a rank's error (with its traceback), or the spawn's own
        print(f"{parser.prog}: a rank failed, nothing was timed:\n{exc}", file=sys.stderr)
        return EXIT_FAILED_CHECK
    print()
    print(format_table(rows))
    if args.json:
        document = {
            "benchmark": "sync",
            "measures": measured,
            "world_size": args.world_size,
            "device": device_type,
            "backend": args.backend,
            "process_group_backend": pg_backend,
            "settings": {"shapes_per_rank": [list(s) for s in shapes], "dtypes": dtypes,
                         "kinds": kinds, "reps": reps, "warmup": args.warmup,
                         "threads_per_rank": threads, "noise_threshold": NOISE_THRESHOLD},
            "environment": env,
            "rows": rows,
        }
        with open(args.json, "w") as out:
            json.dump(document, out, indent=2)
        print(f"wrote {args.json}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
