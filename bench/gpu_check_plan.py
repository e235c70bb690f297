"""The time plan of ``bench/gpu_check.sh``: what each stage will run and how long it should take.

gpu_check.sh lists its stages once. Before running them (and, with ``--dry-run``, instead of
running them) it writes that list to ``plan.tsv``, one stage a line::

    name <TAB> box_s <TAB> required|optional|alongside <TAB> command|dbn-bench <TAB> argument ...

and this module reads it back. A ``dbn-bench`` stage's arguments are parsed by dbn-bench's own
parser and expanded with the same suite definitions the benchmark uses, so the case count printed
here is the number of rows the real run produces: shapes x dtypes x layouts x modes x epilogues
x providers (for ``--model``: dtypes x layouts x variants). Its GPU time is estimated with the cost model
below; any other stage (build, tests) is not modelled and counts with its whole time box.

The plan fits when the time boxes of the required stages add up to at most the run's limit, and
every modelled estimate, times ``MARGIN``, fits its stage's box. An ``alongside`` stage runs in the
background beside the stage after it (tests, which are not timed, beside other tests) and must fit
within that stage's box, so it adds nothing to the total. Optional stages run only when the stages
before them left their whole box, so they do not count towards the limit either.

    python -m dbn_kernels.benchmark.gpu_check_plan PLAN.tsv --limit-s 540 [--json plan.json]

exits 0 when the plan fits, 1 when it does not (saying which stage), 2 on a malformed plan.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field

from .cli import comma_list, build_parser
from .e2e import FUSED_SUFFIX, GPU_STEP_SETTINGS, is_model_variant
from .providers import provider_names
from .shapes import DTYPES, EPILOGUES, LAYOUTS, MODES, bytes_moved, select_shapes
from .timing import GPU_SETTINGS, HIDE_EXTRA_MS, HIDE_MARGIN

# ---- the cost model ---------------------------------------------------------------------------
# Calibrated on the first H200 run (2026-12-01, bench/results/nvidia-h200/): with these constants
# the stages it measured come out at kernels-bf16 43 s (measured 47 and 46), kernels-fp32 42 s
# (40), kernels-bf16-b256 29 s (24), compile 20 s (22), train-step 54 s (54). The stage log of
# every run records each stage's duration beside its estimate (SUMMARY.md shows both), which is
# how they get corrected again.

ASSUMED_COPY_GBPS = 3000.0
"""Device-to-device copy, bytes read + written: about 3.0 TB/s on an H100, 4.3 on an H200. The
slower one: a call's GPU time is estimated as the byte model's floor traffic at this rate."""

FLUSH_BYTES = 256 * 2 ** 20
"""The timer overwrites at least 256 MiB (4x L2) before every sample; its time is spent between
the timed events, so it is not in the budget but is in the wall time."""

HOST_MS_PER_SAMPLE = {"eval-fwd": 0.05, "train-fwd": 0.1, "bwd": 0.15, "fwd-bwd": 0.3}
"""Host time to queue one sample (flush, two events and the call's launches through the module
and autograd). For small tensors the GPU finishes first and a sample costs this much (on the
H200's host a cuda-backend forward+backward took 0.26-0.29 ms, nn.BatchNorm2d's 0.2 ms)."""

FLOOR_EFFICIENCY = 0.5
"""A call's GPU time is its byte model's floor traffic at the copy rate divided by this: the
timer's sample count is budget / measured call time, and the measured rows ran at 10-80% of the
copy rate (most of it the host on small shapes)."""

ROW_SETUP_S = 0.03
"""Per row: build the provider, run and check its first call against the float64 reference,
read which implementation ran (the profiler, for ``torch``)."""

CASE_SETUP_S = 0.1
"""Per (shape, dtype, layout): draw the inputs, compute the float64 expected outputs per mode,
hand the memory back."""

TRITON_JIT_S = 0.3
"""Per (shape, dtype, layout) with a Triton provider: its first calls compile the case's kernel
variants (variants with the same block sizes come out of Triton's cache)."""

TORCH_COMPILE_S = 6.0
"""Per torch-compile row: the provider compiles afresh for every case (forward and backward
graphs): 6 s a case on the H200."""

STAGE_STARTUP_S = 8.0
"""Per dbn-bench process: Python and torch imports, the CUDA context, the L2-flush buffer and the
copy-bandwidth measurement."""

STEP_MS_PER_IMAGE = {"bfloat16": 1.5, "float32": 3.0}
"""ResNet-50 training step time per image (bf16 AMP channels_last about 100 ms at batch 64)."""

STEP_SETUP_S = 2.0
"""Per model variant: copy and convert the model, first step (cudnn.benchmark's autotuning,
once per process for the convolutions every variant shares)."""

MARGIN = 1.2
"""A modelled stage must fit its box with this factor to spare: the constants above are
assumptions until a run measures them."""


# ---- the plan ---------------------------------------------------------------------------------

@dataclass
class Stage:
    name: str
    box_s: int
    need: str
    """``required``, ``optional`` (runs only when its whole box is left) or ``alongside`` (runs
    in the background beside the next stage)."""
    kind: str
    """``dbn-bench`` (modelled: ``argv`` are dbn-bench's arguments) or ``command``."""
    argv: list[str]
    cases: int | None = None
    breakdown: str = ""
    estimate_s: float | None = None
    """Modelled GPU time; ``None`` for a command stage (it counts with its box)."""
    problems: list[str] = field(default_factory=list)

    @property
    def counted_s(self) -> float:
        return self.box_s if self.estimate_s is None else self.estimate_s


class PlanError(ValueError):
    pass


NEEDS = ("required", "optional", "alongside")


def read_plan(text: str) -> list[Stage]:
    stages = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) < 4 or not fields[1].isdigit() or fields[2] not in NEEDS \
                or fields[3] not in ("command", "dbn-bench"):
            raise PlanError(f"plan line {number}: expected name, box_s, {'|'.join(NEEDS)}, "
                            f"command|dbn-bench, arguments; got {line!r}")
        stages.append(Stage(fields[0], int(fields[1]), fields[2], fields[3], fields[4:]))
    if not stages:
        raise PlanError("the plan lists no stage")
    if stages[-1].need == "alongside":
        raise PlanError(f"{stages[-1].name} runs alongside the next stage, but it is the last")
    return stages


def _explicit(values: list[str] | None, option: str, allowed) -> list[str]:
    """gpu_check.sh states every dimension of a benchmark: dbn-bench's defaults depend on the
    machine it runs on, and the plan is made on another one."""
    if not values:
        raise PlanError(f"{option} must be given explicitly")
    bad = [value for value in values if value not in allowed]
    if bad:
        raise PlanError(f"{option}: unknown {', '.join(bad)}")
    return values


def _layouts(args) -> list[str]:
    if args.layout is None:
        raise PlanError("--layout must be given explicitly")
    return list(LAYOUTS) if args.layout == "both" else [args.layout]


def _parse(argv: list[str]):
    parser = build_parser()
    parser.exit_on_error = False
    try:
        args = parser.parse_args(argv)
    except (argparse.ArgumentError, SystemExit) as exc:
        raise PlanError(f"dbn-bench rejects the arguments: {exc}") from None
    return args


def _count(items: list, word: str) -> str:
    return f"{len(items)} {word}" + ("" if len(items) == 1 else "s")


def _transfer_ms(nbytes: int) -> float:
    """Moving ``nbytes`` (read + written) at the assumed copy rate."""
    return nbytes / (ASSUMED_COPY_GBPS * 1e9) * 1e3


def row_seconds(floor_bytes: int, mode: str, budget_ms: float) -> float:
    """A checked and timed row, with the timer's settings: warm-up, three calibration samples,
    then ``budget / call time`` samples within [min_reps, max_reps], each the call and the L2
    flush before it. When the timer hides the host, each sample also waits out a spin as long
    as HIDE_MARGIN times the host's issue time, and the budget counts that wall time."""
    settings = GPU_SETTINGS
    gpu_ms = _transfer_ms(floor_bytes) / FLOOR_EFFICIENCY
    host_ms = HOST_MS_PER_SAMPLE[mode]
    if settings.hide_host:
        sample_ms = gpu_ms + _transfer_ms(FLUSH_BYTES) + HIDE_MARGIN * host_ms + HIDE_EXTRA_MS
        per_sample_budget_ms = sample_ms
    else:  # the events see the GPU's time or, when the host is slower, the host's queuing
        per_sample_budget_ms = max(gpu_ms, host_ms)
        sample_ms = per_sample_budget_ms + _transfer_ms(FLUSH_BYTES)
    warmup_ms = max(settings.warmup_ms, settings.min_warmup_calls * sample_ms)
    samples = min(settings.max_reps, max(settings.min_reps, budget_ms / per_sample_budget_ms))
    return ROW_SETUP_S + (warmup_ms + (3 + samples) * sample_ms) / 1e3


def plan_kernels(stage: Stage, args) -> None:
    shapes = select_shapes(args.suite, args.batch, args.shapes)
    dtypes = _explicit(comma_list(args.dtype), "--dtype", DTYPES)
    layouts = _layouts(args)
    modes = _explicit(comma_list(args.mode), "--mode", MODES)
    providers = _explicit(comma_list(args.providers), "--providers", provider_names())
    # --epilogue's default (none) does not depend on the machine: it need not be stated.
    epilogues = _explicit(comma_list(args.epilogue) or ["none"], "--epilogue", EPILOGUES)
    budget_ms = args.budget_ms if args.budget_ms is not None else GPU_SETTINGS.budget_ms
    seconds = STAGE_STARTUP_S
    for shape in shapes:
        for dtype in dtypes:
            seconds += len(layouts) * CASE_SETUP_S
            if any(name.startswith("triton-") for name in providers):
                seconds += len(layouts) * TRITON_JIT_S
            for mode in modes:
                for epilogue in epilogues:
                    floor = bytes_moved(shape, DTYPES[dtype], mode, epilogue)
                    for name in providers:
                        row = row_seconds(floor, mode, budget_ms)
                        if name == "torch-compile":
                            row += TORCH_COMPILE_S
                        seconds += len(layouts) * row
    stage.cases = (len(shapes) * len(dtypes) * len(layouts) * len(modes) * len(epilogues)
                   * len(providers))
    dims = [(shapes, "shape"), (dtypes, "dtype"), (layouts, "layout"), (modes, "mode")]
    if epilogues != ["none"]:
        dims.append((epilogues, "epilogue"))
    stage.breakdown = (" x ".join(_count(items, word) for items, word in (
        *dims, (providers, "provider"))) + f", {budget_ms:g} ms budget per row")
    stage.estimate_s = seconds


def plan_model(stage: Stage, args) -> None:
    dtypes = _explicit(comma_list(args.dtype), "--dtype", ("float32", "bfloat16"))
    layouts = _layouts(args)
    names = provider_names()
    allowed = names + [name + FUSED_SUFFIX for name in names
                       if is_model_variant(name) and name != "torch"]
    providers = _explicit(comma_list(args.providers), "--providers", allowed)
    variants = [name for name in providers if is_model_variant(name)]
    if args.batch is None:
        raise PlanError("--batch must be given explicitly")
    settings = GPU_STEP_SETTINGS
    seconds = STAGE_STARTUP_S
    for dtype in dtypes:
        step_ms = STEP_MS_PER_IMAGE[dtype] * args.batch * (args.image_size / 224) ** 2
        warmup_ms = max(settings.warmup_ms, settings.min_warmup_calls * step_ms)
        steps = min(settings.max_reps, max(settings.min_reps, settings.budget_ms / step_ms))
        per_variant = STEP_SETUP_S + (warmup_ms + (3 + steps) * step_ms) / 1e3
        seconds += len(layouts) * len(variants) * per_variant
    stage.cases = len(dtypes) * len(layouts) * len(variants)
    stage.breakdown = (f"{_count(dtypes, 'precision')} x {_count(layouts, 'layout')} x "
                       f"{_count(variants, 'variant')}, batch {args.batch}")
    stage.estimate_s = seconds


def estimate(stage: Stage) -> None:
    if stage.kind != "dbn-bench":
        return
    args = _parse(stage.argv)
    if args.model:
        plan_model(stage, args)
    else:
        plan_kernels(stage, args)
    if stage.estimate_s * MARGIN > stage.box_s:
        stage.problems.append(
            f"estimate {stage.estimate_s:.0f} s x {MARGIN:g} margin exceeds its {stage.box_s} s "
            "box: fewer cases, a smaller --budget-ms or a larger box")


@dataclass
class Plan:
    limit_s: int
    stages: list[Stage]
    required_box_s: int
    required_estimate_s: float
    problems: list[str]

    @property
    def fits(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {
            "limit_s": self.limit_s, "fits": self.fits, "problems": self.problems,
            "required_box_s": self.required_box_s,
            "required_estimate_s": round(self.required_estimate_s, 1),
            "margin": MARGIN,
            "cost_model": {
                "assumed_copy_gbps": ASSUMED_COPY_GBPS, "flush_bytes": FLUSH_BYTES,
                "host_ms_per_sample": HOST_MS_PER_SAMPLE, "floor_efficiency": FLOOR_EFFICIENCY,
                "row_setup_s": ROW_SETUP_S,
                "case_setup_s": CASE_SETUP_S, "triton_jit_s": TRITON_JIT_S,
                "torch_compile_s": TORCH_COMPILE_S, "stage_startup_s": STAGE_STARTUP_S,
                "step_ms_per_image": STEP_MS_PER_IMAGE, "step_setup_s": STEP_SETUP_S,
                "timer": asdict(GPU_SETTINGS), "model_timer": asdict(GPU_STEP_SETTINGS),
            },
            "stages": [{**asdict(stage), "estimate_s": (None if stage.estimate_s is None
                                                        else round(stage.estimate_s, 1))}
                       for stage in self.stages],
        }


def make_plan(stages: list[Stage], limit_s: int) -> Plan:
    problems = []
    for stage, after in zip(stages, stages[1:] + [None]):
        try:
            estimate(stage)
        except PlanError as exc:
            stage.problems.append(str(exc))
        if stage.need == "alongside" and after is not None and stage.box_s > after.box_s:
            stage.problems.append(f"its {stage.box_s} s box must fit within the {after.box_s} s "
                                  f"box of {after.name}, which it runs beside")
        problems += [f"{stage.name}: {problem}" for problem in stage.problems]
    required = [stage for stage in stages if stage.need == "required"]
    box_total = sum(stage.box_s for stage in required)
    estimate_total = sum(stage.counted_s for stage in required)
    if box_total > limit_s:
        problems.append(f"the required stages' boxes add up to {box_total} s, over the "
                        f"{limit_s} s limit")
    if estimate_total > limit_s:
        problems.append(f"the required stages' estimate is {estimate_total:.0f} s, over the "
                        f"{limit_s} s limit")
    return Plan(limit_s, stages, box_total, estimate_total, problems)


def format_plan(plan: Plan) -> str:
    header = ("stage", "box s", "estimate s", "cases", "what")
    lines = []
    for stage in plan.stages:
        if stage.kind == "dbn-bench":
            what = stage.breakdown or "(not planned: see the problems)"
        else:
            what = "runs: " + " ".join(stage.argv)
        estimate = ("=box" if stage.estimate_s is None else f"{stage.estimate_s:.0f}")
        lines.append((stage.name + ("" if stage.need == "required" else f" ({stage.need})"),
                      str(stage.box_s),
                      estimate, "-" if stage.cases is None else str(stage.cases), what))
    widths = [max(len(header[i]), *(len(line[i]) for line in lines)) for i in range(4)]

    def render(cells):
        return "  ".join([cells[0].ljust(widths[0]),
                          *(cell.rjust(width) for cell, width in zip(cells[1:4], widths[1:])),
                          cells[4]])

    out = [render(header), render(tuple("-" * w for w in widths) + ("-" * 4,)),
           *(render(line) for line in lines),
           f"required stages: boxes {plan.required_box_s} s, estimate "
           f"{plan.required_estimate_s:.0f} s (command stages at their box), limit "
           f"{plan.limit_s} s; optional stages run only in the time the others leave, "
           "alongside stages within the next stage's box",
           f"cost model per row: {ROW_SETUP_S:g} s setup and check + max("
           f"{GPU_SETTINGS.warmup_ms:g} ms, {GPU_SETTINGS.min_warmup_calls} samples) warm-up + "
           f"(3 + budget / sample time within [{GPU_SETTINGS.min_reps}, {GPU_SETTINGS.max_reps}]) "
           f"samples of call + {FLUSH_BYTES >> 20} MiB flush + a spin of {HIDE_MARGIN:g} x host "
           f"queuing (the budget counting all three); call time = floor bytes at "
           f"{FLOOR_EFFICIENCY:g} x {ASSUMED_COPY_GBPS / 1000:g} TB/s; + "
           f"{TRITON_JIT_S:g} s Triton JIT per "
           f"case, + {TORCH_COMPILE_S:g} s per torch-compile row, + {STAGE_STARTUP_S:g} s per "
           f"process; every estimate x {MARGIN:g} must fit its box"]
    if plan.problems:
        out += ["PLAN DOES NOT FIT:", *(f"  {problem}" for problem in plan.problems)]
    else:
        out.append("plan fits")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dbn_kernels.benchmark.gpu_check_plan",
        description="Case counts and GPU-time estimates of bench/gpu_check.sh's stages.")
    parser.add_argument("plan", help="plan.tsv written by gpu_check.sh")
    parser.add_argument("--limit-s", type=int, required=True,
                        help="the whole run's time limit in seconds")
    parser.add_argument("--json", metavar="PATH", help="write the plan with its estimates")
    args = parser.parse_args(argv)
    try:
        with open(args.plan) as plan_file:
            stages = read_plan(plan_file.read())
    except (OSError, PlanError) as exc:
        print(f"gpu_check_plan: {exc}", file=sys.stderr)
        return 2
    plan = make_plan(stages, args.limit_s)
    print(format_plan(plan))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(plan.to_dict(), out, indent=1)
            out.write("\n")
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
