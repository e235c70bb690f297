"""Host overhead: the per-call cost of a tiny layer, where Python rather than arithmetic decides.

On a GPU in eager mode a small batch-norm layer's kernels take a few microseconds, so the time a
training step spends in such a layer is the host's: argument checks, backend dispatch, the
autograd Function, launch planning. This benchmark measures that path on a tensor small enough
(2x8x4x4 by default) that the arithmetic is negligible, for ``nn.BatchNorm2d``,
``dbn_kernels.BatchNorm2d`` and ``dbn_kernels.DiminishingBatchNorm2d`` on every backend that can
run on the device, in three modes:

* ``fwd-bwd``  a training forward and its backward: ``layer(x).backward(dy)``, x requiring grad;
* ``fwd``      the training forward alone (autograd records the graph, nothing runs backward);
* ``eval``     the evaluation forward under ``torch.no_grad()``.

Method: rounds are interleaved (A, B, C, A, B, C, ...) so that drift of the machine (frequency,
other processes) hits every provider alike; each round times ``--calls`` back-to-back calls, and
a provider's result is the median over rounds of the per-call time, with p20-p80, and its ratio
to ``nn.BatchNorm2d``'s median in the same mode.

What is measured:

* CPU: wall time per call (``time.perf_counter``), with ``torch.set_num_threads(1)`` by default
  so the numbers do not depend on how many cores happen to be free.
* CUDA: the wall time of *issuing* ``--calls`` calls without synchronising between them, plus
  one ``torch.cuda.synchronize()`` at the end of the round (the device is idle when a round
  starts). With tiny tensors the GPU finishes each kernel long before the host has issued the
  next, so the wall time per call is the host time. The column ``cpu us`` is the CPU time of the
  issuing thread (``time.thread_time``) over the issuing loop only, excluding the final
  synchronisation, which isolates the host's own work from any waiting.

The Triton backend on CPU runs under Triton's interpreter (``TRITON_INTERPRET=1``), which
executes every program in numpy: its cost says nothing about Triton's launch path on a GPU, so it
is left out unless asked for with ``--backends triton``.

    python -m dbn_kernels.benchmark.host_overhead [--device cpu|cuda] [--backends ...]
                                                  [--json PATH] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

import dbn_kernels as dbn
from dbn_kernels import backends

from .environment import collect
from .timing import percentile

MODES = ("fwd-bwd", "fwd", "eval")
BASELINE = "torch"


@dataclass
class Provider:
    name: str
    layer: str
    backend: str | None
    make: Callable[[], nn.Module]


@dataclass
class Row:
    mode: str
    provider: str
    layer: str
    backend: str | None
    median_us: float
    p20_us: float
    p80_us: float
    cpu_median_us: float
    ratio: float | None = None
    """median_us over nn.BatchNorm2d's median_us in the same mode."""
    rounds_us: list[float] = field(default_factory=list)


def _providers(backend_names: list[str], channels: int, device: torch.device) -> list[Provider]:
    factory = {"device": device, "dtype": torch.float32}
    providers = [Provider(BASELINE, "nn.BatchNorm2d", None,
                          lambda: nn.BatchNorm2d(channels, **factory))]
    for name in backend_names:
        providers.append(Provider(f"{name}-bn", "dbn.BatchNorm2d", name,
                                  lambda name=name: dbn.BatchNorm2d(channels, backend=name,
                                                                    **factory)))
        providers.append(Provider(f"{name}-dbn", "dbn.DiminishingBatchNorm2d", name,
                                  lambda name=name: dbn.DiminishingBatchNorm2d(
                                      channels, backend=name, **factory)))
    return providers


def _step(mode: str, layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    """One call of ``mode``; the layer is put in the matching train/eval state here."""
    layer.train(mode != "eval")
    if mode == "fwd-bwd":
        def step():
            layer(x).backward(dy)
    else:
        def step():
            layer(x)
    return step


def _time_block(step: Callable[[], None], calls: int, mode: str,
                device: torch.device) -> tuple[float, float]:
    """(wall, issuing thread's CPU) seconds per call over ``calls`` back-to-back calls."""
    cuda = device.type == "cuda"
    grad_mode = torch.no_grad() if mode == "eval" else contextlib.nullcontext()
    if cuda:
        torch.cuda.synchronize(device)  # start from an idle device, outside the timed region
    with grad_mode:
        wall0, cpu0 = time.perf_counter(), time.thread_time()
        for _ in range(calls):
            step()
        cpu1 = time.thread_time()
        if cuda:
            torch.cuda.synchronize(device)
        wall1 = time.perf_counter()
    return (wall1 - wall0) / calls, (cpu1 - cpu0) / calls


def measure(providers: list[Provider], mode: str, shape: tuple[int, ...], device: torch.device,
            rounds: int, calls: int, warmup: int) -> list[Row]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator).to(device).requires_grad_(mode != "eval")
    dy = torch.randn(shape, generator=generator).to(device)
    steps = []
    for provider in providers:
        step = _step(mode, provider.make(), x, dy)
        _time_block(step, warmup, mode, device)  # first-call costs: compilation, caches
        steps.append(step)
    wall = [[] for _ in providers]
    cpu = [[] for _ in providers]
    for _ in range(rounds):
        for i, step in enumerate(steps):  # interleaved: A, B, C, A, B, C, ...
            per_call, per_call_cpu = _time_block(step, calls, mode, device)
            wall[i].append(per_call * 1e6)
            cpu[i].append(per_call_cpu * 1e6)
    rows = []
    for provider, samples, cpu_samples in zip(providers, wall, cpu):
        ordered = sorted(samples)
        rows.append(Row(mode=mode, provider=provider.name, layer=provider.layer,
                        backend=provider.backend, median_us=percentile(ordered, 0.5),
                        p20_us=percentile(ordered, 0.2), p80_us=percentile(ordered, 0.8),
                        cpu_median_us=statistics.median(cpu_samples), rounds_us=samples))
    baseline = next(r for r in rows if r.provider == BASELINE).median_us
    for row in rows:
        row.ratio = row.median_us / baseline
    return rows


def format_table(rows: list[Row]) -> str:
    header = ("mode", "provider", "median us", "p20-p80 us", "cpu us", "vs torch")
    lines = []
    last_mode = None
    for row in rows:
        lines.append((row.mode if row.mode != last_mode else "", row.provider,
                      f"{row.median_us:.1f}", f"{row.p20_us:.1f}-{row.p80_us:.1f}",
                      f"{row.cpu_median_us:.1f}", f"{row.ratio:.2f}x"))
        last_mode = row.mode
    widths = [max(len(header[i]), *(len(line[i]) for line in lines)) for i in range(len(header))]
    left = {0, 1}

    def render(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([render(header), "  ".join("-" * w for w in widths),
                      *(render(line) for line in lines)])


def _default_backends(device: torch.device) -> list[str]:
    names = backends.available_backends(device)
    if device.type == "cpu":
        # Interpreted Triton is numpy emulating a GPU, not a launch path worth measuring.
        names = [name for name in names if name != "triton"]
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dbn_kernels.benchmark.host_overhead",
        description="Per-call time of a tiny batch-norm layer (host overhead), "
                    "against nn.BatchNorm2d.")
    parser.add_argument("--device", default=None,
                        help="cpu or cuda[:i] (default: cuda when available, else cpu)")
    parser.add_argument("--backends", nargs="+", default=None, choices=backends.BACKENDS,
                        help="project backends to measure (default: every one that runs on the "
                             "device; on CPU not the interpreted triton)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--shape", type=int, nargs=4, default=(2, 8, 4, 4),
                        metavar=("N", "C", "H", "W"))
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds (default 30)")
    parser.add_argument("--calls", type=int, default=200, help="calls per round (default 200)")
    parser.add_argument("--warmup", type=int, default=50, help="untimed calls first (default 50)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (default 1)")
    parser.add_argument("--json", metavar="PATH", default=None, help="write the results as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if min(args.rounds, args.calls, args.threads) < 1 or args.warmup < 0:
        parser.error("--rounds, --calls and --threads must be at least 1, --warmup at least 0")
    names = args.backends if args.backends is not None else _default_backends(device)
    for name in names:
        reason = backends.unavailable_reason(name, device.type)
        if reason is not None:
            parser.error(f"backend {name!r} cannot run on {device.type}: {reason}")

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        providers = _providers(names, args.shape[1], device)
        rows = [row for mode in args.modes
                for row in measure(providers, mode, tuple(args.shape), device, args.rounds,
                                   args.calls, args.warmup)]
        env = collect(device)
    finally:
        torch.set_num_threads(threads)  # main() may run inside another program

    measured = ("wall time per call of back-to-back calls; cpu us: the thread's CPU time"
                if device.type == "cpu" else
                "wall time per call of issuing back-to-back calls, one synchronize at the end of "
                "each round (the host is the bottleneck with tiny tensors); cpu_median_us is the "
                "issuing thread's CPU time without that synchronize")
    print(f"host overhead on {env['gpu'] or env['cpu']} ({device}), input "
          f"{'x'.join(map(str, args.shape))} float32, {args.threads} thread(s), "
          f"{args.rounds} rounds x {args.calls} calls, median over rounds")
    print(f"measured: {measured}")
    print(format_table(rows))
    if args.json:
        report = {
            "benchmark": "host_overhead",
            "measures": measured,
            "settings": {"device": str(device), "shape": list(args.shape), "dtype": "float32",
                         "threads": args.threads, "rounds": args.rounds, "calls": args.calls,
                         "warmup": args.warmup, "backends": names, "modes": args.modes},
            "environment": env,
            "rows": [asdict(row) for row in rows],
        }
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
