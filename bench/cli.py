"""``dbn-bench``: the command line.

    dbn-bench --suite resnet50 --dtype float32 bfloat16 --layout both \\
              --json out.json --csv out.csv --plot out.png
    dbn-bench --suite quick --epilogue none relu add-relu   # the fused ReLU / residual epilogue
    dbn-bench --model resnet50                  # images/s of a training step
    dbn-bench --sync-world 2 --device cpu       # cost of the synchronised layers (bench/sync.py)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from . import environment, report
from .providers import provider_names, select
from .shapes import (DTYPES, EPILOGUES, LAYOUTS, MODES, SUITES, select_shapes, shape_list,
                     traffic)

EXIT_OK, EXIT_FAILED_CHECK, EXIT_USAGE = 0, 1, 2
"""1: some row failed its check or errored (or nothing could be timed); 2: bad arguments."""

CPU_DEFAULT_THREADS = 1
"""PyTorch threads on CPU unless --threads says otherwise (see --help)."""


def comma_list(values: list[str] | None) -> list[str] | None:
    """``--x a,b c`` -> [a, b, c]; both spellings are accepted."""
    if values is None:
        return None
    items = [item.strip() for value in values for item in value.split(",")]
    return list(dict.fromkeys(item for item in items if item))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dbn-bench",
        description="Time dbn_kernels' batch-norm kernels against cuDNN, PyTorch's native batch "
                    "norm and torch.compile (every output checked against a float64 reference "
                    "first), or a ResNet-50 training step with --model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--suite", choices=SUITES, default="quick",
                        help="quick: a few small shapes; resnet50: every batch-norm shape of "
                             "ResNet-50 at --batch (default 64); sweep: a C x spatial x batch grid")
    parser.add_argument("--model", choices=("resnet50",), default=None,
                        help="time a whole training step instead of single layers (images/s)")
    parser.add_argument("--dtype", nargs="+", metavar="DTYPE", default=None,
                        help=f"one or more of {', '.join(DTYPES)} (default: float32 and "
                             "bfloat16 on a GPU, float32 on CPU; with --model: bfloat16 = AMP "
                             "on a GPU, float32 on CPU)")
    parser.add_argument("--layout", choices=(*LAYOUTS, "both"), default=None,
                        help="memory format; nhwc = channels_last (default: both; with --model: "
                             "nhwc on a GPU, nchw on CPU)")
    parser.add_argument("--mode", nargs="+", metavar="MODE", default=None,
                        help=f"one or more of {', '.join(MODES)} (default: all)")
    parser.add_argument("--epilogue", nargs="+", metavar="EPILOGUE", default=None,
                        help=f"one or more of {', '.join(EPILOGUES)} (default: none): what "
                             "follows the norm. relu / add-relu: the project's providers time "
                             "the fused layer (activation='relu', residual passed for add-relu), "
                             "torch the eager nn.BatchNorm2d [+ residual] then torch.relu, "
                             "torch-compile that composition compiled; cudnn skips it; kernel "
                             "suites only")
    parser.add_argument("--providers", nargs="+", metavar="NAME", default=None,
                        help=f"comma-separated subset of {', '.join(provider_names())} "
                             "(default: all that can run here)")
    parser.add_argument("--batch", type=int, default=None,
                        help="N of every shape (resnet50 suite default 64; sweep: keep only this "
                             "N; --model default 64 on a GPU, 2 on CPU)")
    parser.add_argument("--shapes", type=shape_list, metavar="NxCxHxW[,...]", default=None,
                        help="time exactly these shapes instead of the suite's (a shape the "
                             "suite has keeps its layer count); kernel suites only")
    parser.add_argument("--image-size", type=int, default=224,
                        help="input resolution for --model")
    parser.add_argument("--device", default=None,
                        help="cuda, cuda:1, cpu, ... (default: cuda when available, else cpu)")
    parser.add_argument("--budget-ms", type=float, default=None,
                        help="time spent repeating each measurement (default 150 on a GPU, "
                             "50 on CPU)")
    parser.add_argument("--json", metavar="PATH", help="write rows and environment as JSON")
    parser.add_argument("--csv", metavar="PATH", help="write rows and environment as CSV")
    parser.add_argument("--plot", metavar="PATH",
                        help="write a PNG of GB/s per shape and provider (needs matplotlib)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for PyTorch (torch.set_num_threads). Default on CPU: "
                             f"{CPU_DEFAULT_THREADS}, because PyTorch's multi-threaded CPU kernels "
                             "wait at the end of every parallel loop for their slowest thread: "
                             "when another process holds a core, each call then waits whole "
                             "scheduler time slices (milliseconds) and the times measure the "
                             "machine's load, not the kernel. Default on a GPU: PyTorch's choice "
                             "(host threads do not run the kernels)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--sync-world", type=int, metavar="N", default=None,
                        help="time the synchronised layers over N ranks on this machine instead "
                             "of the kernels; its own options (--device, --shapes, --dtype, "
                             "--reps, --json, ...): python -m dbn_kernels.benchmark.sync --help")
    return parser


class UsageError(Exception):
    pass


def _choices(values: list[str] | None, allowed, what: str) -> list[str] | None:
    if values is None:
        return None
    bad = [v for v in values if v not in allowed]
    if bad:
        raise UsageError(f"unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)}")
    return values


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is visible to torch "
                         f"{torch.__version__} (torch.version.cuda={torch.version.cuda})")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _cpu_notes(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return []
    gpu = "no GPU on this machine" if not torch.cuda.is_available() else "--device cpu"
    return [f"{gpu}: the GPU kernels (cuda, triton) and cuDNN need a GPU; on CPU this compares "
            "the reference backend with PyTorch's CPU batch norm, and CPU times say nothing "
            "about the GPU kernels"]


def _sync_world_given(argv: list[str]) -> bool:
    probe = argparse.ArgumentParser(prog="dbn-bench", add_help=False)
    probe.add_argument("--sync-world")
    return probe.parse_known_args(argv)[0].sync_world is not None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if _sync_world_given(argv):  # a benchmark of its own: its parser reads every option, --help too
        from .sync import main as sync_main

        return sync_main(argv, prog="dbn-bench")
    args = build_parser().parse_args(argv)
    try:
        device = _device(args.device)
        dtypes = _choices(comma_list(args.dtype), list(DTYPES), "dtype")
        modes = _choices(comma_list(args.mode), list(MODES), "mode")
        epilogues = _choices(comma_list(args.epilogue), list(EPILOGUES), "epilogue")
        if args.model and epilogues and epilogues != ["none"]:
            raise UsageError("--epilogue applies to the kernel suites; with --model the "
                             "<backend>-bn-fused / -dbn-fused variants fuse the model's ReLUs")
        requested = comma_list(args.providers)
        if args.model and requested:
            from .e2e import provider_of_variant

            selection = select(list(dict.fromkeys(map(provider_of_variant, requested))), device)
        else:
            selection = select(requested, device)
        if args.plot and (reason := report.plot_available()):
            raise UsageError(reason)
        if args.threads is not None and args.threads < 1:
            raise UsageError("--threads must be at least 1")
        if args.batch is not None and args.batch < 2:
            raise UsageError("--batch must be at least 2 (training needs more than one value "
                             "per channel)")
    except (UsageError, ValueError) as exc:
        print(f"dbn-bench: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # The process is not also pinned to a core (os.sched_setaffinity): on a shared 2-core machine
    # that changed neither medians nor spreads measurably, and a pinned process cannot move off
    # a core another process is holding.
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
        args.threads_set_by = "--threads"  # recorded in the environment by _meta
    elif device.type == "cpu":
        torch.set_num_threads(CPU_DEFAULT_THREADS)
        args.threads_set_by = f"dbn-bench's default on CPU ({CPU_DEFAULT_THREADS})"
    else:
        args.threads_set_by = "PyTorch's default"
    try:
        if args.model:
            return _main_model(args, device, dtypes, selection, requested)
        return _main_kernels(args, device, dtypes, modes, selection, epilogues)
    finally:
        torch.set_num_threads(threads)  # main() may run inside another program (the tests)


def _meta(what: str, device: torch.device, selection, timing_method: str, *,
          threads_set_by: str, **extra) -> dict:
    env = environment.collect(device)  # cpu_threads: what main() set
    # How loaded the machine was, beside the thread count: on a shared CPU it decides how noisy
    # the numbers are.
    env.update(cpu_threads_set_by=threads_set_by,
               cpus_usable=(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                            else os.cpu_count()),
               load_average_1min=os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
    return {
        "what": what,
        "environment": env,
        "timing_method": timing_method,
        "skipped_providers": [{"provider": name, "reason": reason}
                              for name, reason in selection.skipped],
        "notes": _cpu_notes(device),
        **extra,
    }


def _write_outputs(args, meta: dict, rows, *, plot: bool) -> None:
    if args.json:
        report.write_json(args.json, meta, rows)
    if args.csv:
        report.write_csv(args.csv, meta, rows)
    written = [path for path in (args.json, args.csv) if path]
    if plot and args.plot:
        try:
            report.write_plot(args.plot, meta, rows)
            written.append(args.plot)
        except ValueError as exc:
            print(f"no plot written: {exc}")
    for path in written:
        print(f"wrote {path}")


def _main_kernels(args, device, dtypes, modes, selection, epilogues=None) -> int:
    from .runner import run_benchmark
    from .timing import NOISE_THRESHOLD, Timer, copy_bandwidth

    dtypes = dtypes or (["float32", "bfloat16"] if device.type == "cuda" else ["float32"])
    layouts = list(LAYOUTS) if args.layout in (None, "both") else [args.layout]
    modes = modes or list(MODES)
    epilogues = epilogues or ["none"]
    shapes = select_shapes(args.suite, args.batch, args.shapes)

    timer = Timer(device)
    if args.budget_ms is not None:
        timer.settings.budget_ms = args.budget_ms
    bandwidth = copy_bandwidth(timer)
    meta = _meta(f"suite={args.suite}", device, selection, timer.method,
                 threads_set_by=args.threads_set_by, noise_threshold=NOISE_THRESHOLD,
                 suite=args.suite, dtypes=dtypes, layouts=layouts, modes=modes,
                 epilogues=epilogues,
                 copy_bandwidth={"gbps": bandwidth.gbps, "bytes": bandwidth.nbytes,
                                 "median_ms": bandwidth.timing.median_ms,
                                 "description": bandwidth.description},
                 byte_model={mode + ("" if epilogue == "none" else f"+{epilogue}"):
                             "{}R+{}W".format(*traffic(mode, epilogue))
                             for epilogue in epilogues for mode in MODES})
    if device.type == "cpu":
        meta["notes"].append("small tensors stay in the CPU's caches, so %copy can exceed 100")
    print(report.header_text(meta), flush=True)

    total = (len(shapes) * len(dtypes) * len(layouts) * len(modes) * len(epilogues)
             * len(selection.runnable))
    progress = report.Progress(total, enabled=False if args.no_progress else None)
    try:
        rows = run_benchmark(shapes, dtypes, layouts, modes, selection.runnable, device, timer,
                             copy_gbps=bandwidth.gbps, progress=progress, epilogues=epilogues)
    finally:
        progress.close()
    print()
    print(report.kernel_table(rows))
    _write_outputs(args, meta, rows, plot=True)
    return _exit_status(rows)


def _main_model(args, device, dtypes, selection, requested) -> int:
    from .e2e import is_model_variant, model_variants, run_model_benchmark

    on_gpu = device.type == "cuda"
    dtypes = dtypes or (["bfloat16"] if on_gpu else ["float32"])
    if "float16" in dtypes:
        print("dbn-bench: error: --model supports float32 and bfloat16 (fp16 AMP would need a "
              "gradient scaler)", file=sys.stderr)
        return EXIT_USAGE
    if args.layout is None:
        layouts = ["nhwc"] if on_gpu else ["nchw"]
    else:
        layouts = list(LAYOUTS) if args.layout == "both" else [args.layout]
    batch = args.batch or (64 if on_gpu else 2)

    variants = model_variants([p.name for p in selection.runnable], requested)
    # cudnn and torch-compile are kernel providers only: listed when asked for, else left out.
    selection.skipped = [(name, reason) for name, reason in selection.skipped
                         if is_model_variant(name) or requested]
    selection.skipped += [(p.name, "not a model variant (kernel benchmark only)")
                          for p in selection.runnable if not is_model_variant(p.name) and requested]
    meta = _meta(f"model={args.model}", device, selection,
                 "training step (zero_grad, forward, loss, backward, SGD step) timed as a whole, "
                 + ("CUDA events, median after warm-up" if on_gpu else
                    "time.perf_counter_ns, median of 3 steps after 1 warm-up step"),
                 threads_set_by=args.threads_set_by, model=args.model, batch=batch,
                 image_size=args.image_size)
    print(report.header_text(meta), flush=True)
    total = len(dtypes) * len(layouts) * len(variants)
    progress = report.Progress(total, enabled=False if args.no_progress else None)
    try:
        rows, source = run_model_benchmark(args.model, variants, batch, args.image_size, dtypes,
                                           layouts, device, progress=progress)
    finally:
        progress.close()
    meta["model_definition"] = source
    print(f"model definition: {source}")
    print()
    print(report.model_table(rows))
    _write_outputs(args, meta, rows, plot=False)
    if args.plot:
        print("note: --plot applies to the kernel suites; no plot for --model")
    return _exit_status(rows)


def _exit_status(rows) -> int:
    if not any(row.status == "ok" for row in rows):
        print("\nnothing was timed: every provider was skipped or failed", file=sys.stderr)
        return EXIT_FAILED_CHECK
    failed = [row for row in rows if row.status == "failed"]
    if failed:
        print(f"\n{len(failed)} row(s) FAILED (wrong result or error): not timed; see the notes",
              file=sys.stderr)
        return EXIT_FAILED_CHECK
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
