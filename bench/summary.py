"""SUMMARY.md of a ``bench/gpu_check.sh`` run, written from the files the run left behind.

    python -m dbn_kernels.benchmark.summary OUTDIR [--output PATH]

Reads from OUTDIR whatever is there:

* ``stages.tsv``   the stage log: each stage's start, end, exit code, duration and status;
* ``plan.json``    each stage's time box and estimate (``gpu_check_plan``);
* ``*.junit.xml``  pytest's results;
* ``*.json``       dbn-bench's kernel suites (``"what": "suite=..."``) and training steps
                   (``"what": "model=..."``), and the host-overhead benchmark
                   (``"benchmark": "host_overhead"``).

Every number in the summary is read or computed from those files; a stage that is missing, failed
or was cut short is named, and each section summarises what exists. The project's goals are
checked against the measurements and marked met, missed or not measured.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import xml.etree.ElementTree as ElementTree
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

BASELINES = ("cudnn", "torch", "torch-compile")
"""Providers the project's backends are compared with; every other kernel provider is one of the
project's (``<backend>-bn`` / ``<backend>-dbn``)."""

GOAL_VS_CUDNN = 1.3
GOAL_VS_TORCH = 1.5
GOAL_PCT_COPY = 85.0
GOAL_DBN_OVER_BN = 1.02
GOAL_HOST_RATIO = 1.5
"""On a GPU, the cuda backend's host time per forward + backward over nn.BatchNorm2d's."""
LARGE_TENSOR_BYTES = 64 * 2 ** 20
""""Large": an input tensor (x) of at least 64 MiB, where bandwidth, not launch cost, decides."""

ELEMENT_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
MAX_LISTED_FAILURES = 40


# ---- reading the run's files --------------------------------------------------------------------

@dataclass
class StageRecord:
    name: str
    box_s: int | None = None
    limit_s: int | None = None
    status: str = "running"
    """ok, failed, timeout, skipped, or running (started, never ended: the run stopped)."""
    exit_code: str = ""
    seconds: float | None = None
    note: str = ""
    started_s: int | None = None
    """Epoch seconds of the start (and end) events."""
    ended_s: int | None = None


def read_stage_log(path: Path) -> tuple[dict[str, str], list[StageRecord]]:
    """``# key=value`` header comments and the stages in the order they started (or were skipped).

    The log is tab-separated: event (start, end or skip), stage, box_s, limit_s, utc, epoch_s,
    exit, seconds, status, note.
    """
    meta: dict[str, str] = {}
    stages: dict[str, StageRecord] = {}
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            for item in line[1:].split():
                key, _, value = item.partition("=")
                if value:
                    meta[key] = value
            continue
        fields = line.split("\t")
        if len(fields) < 10 or fields[0] not in ("start", "end", "skip"):
            continue  # the column header, or a line cut short when the run was killed
        event, name, box, limit, _, epoch, exit_code, seconds, status, note = fields[:10]
        record = stages.setdefault(name, StageRecord(name))
        record.box_s = int(box) if box.isdigit() else record.box_s
        record.limit_s = int(limit) if limit.isdigit() else record.limit_s
        if event == "start":
            record.status = "running"
            record.started_s = int(epoch) if epoch.isdigit() else None
        else:
            record.ended_s = int(epoch) if epoch.isdigit() else None
            record.status, record.exit_code, record.note = status, exit_code, note
            record.seconds = float(seconds) if seconds else None
    return meta, list(stages.values())


@dataclass
class JunitCounts:
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    interrupted: int = 0
    """Test cases without a name: the test that was running when pytest was interrupted."""
    failing_ids: list[str] = field(default_factory=list)

    def add(self, other: "JunitCounts") -> None:
        self.passed += other.passed
        self.failed += other.failed
        self.errors += other.errors
        self.skipped += other.skipped
        self.interrupted += other.interrupted
        self.failing_ids += other.failing_ids


def read_junit(path: Path) -> JunitCounts:
    counts = JunitCounts()
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = case.get("name")
        if name is None:
            counts.interrupted += 1
            continue
        test_id = f"{case.get('classname', '')}::{name}"
        if case.find("failure") is not None:
            counts.failed += 1
            counts.failing_ids.append(f"{test_id} (failed)")
        elif case.find("error") is not None:
            counts.errors += 1
            counts.failing_ids.append(f"{test_id} (error)")
        elif case.find("skipped") is not None:
            counts.skipped += 1
        else:
            counts.passed += 1
    return counts


# pytest -v lines, with pytest-xdist ("[gw0] [ 12%] PASSED tests/a.py::t") and without
# ("tests/a.py::t PASSED   [ 12%]").
_VERBOSE_XDIST = re.compile(r"^\[gw\d+\] \[\s*\d+%\] (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+)")
_VERBOSE_PLAIN = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def read_verbose_log(path: Path) -> JunitCounts | None:
    """The outcomes a ``pytest -v`` log printed as each test ended: what is left of a test stage
    killed before pytest wrote its junit xml. None when the log has no such line."""
    counts, seen = JunitCounts(), False
    for line in path.read_text(errors="replace").splitlines():
        match = _VERBOSE_XDIST.match(line)
        if match:
            outcome, test_id = match.groups()
        else:
            match = _VERBOSE_PLAIN.match(line)
            if not match:
                continue
            test_id, outcome = match.groups()
        seen = True
        if outcome == "FAILED":
            counts.failed += 1
            counts.failing_ids.append(f"{test_id} (failed)")
        elif outcome == "ERROR":
            counts.errors += 1
            counts.failing_ids.append(f"{test_id} (error)")
        elif outcome in ("SKIPPED", "XFAIL"):
            counts.skipped += 1
        else:
            counts.passed += 1
    return counts if seen else None


@dataclass
class Results:
    kernel_docs: list[tuple[str, dict]] = field(default_factory=list)
    model_docs: list[tuple[str, dict]] = field(default_factory=list)
    host_docs: list[tuple[str, dict]] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)

    @property
    def kernel_rows(self) -> list[dict]:
        return [row for _, doc in self.kernel_docs for row in doc.get("rows", [])]

    @property
    def model_rows(self) -> list[dict]:
        return [row for _, doc in self.model_docs for row in doc.get("rows", [])]


def read_results(directory: Path) -> Results:
    results = Results()
    for path in sorted(directory.glob("*.json")):
        if path.name == "plan.json":
            continue
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            results.unreadable.append(f"{path.name}: {exc}")
            continue
        what = str(doc.get("what", "")) if isinstance(doc, dict) else ""
        if what.startswith("suite="):
            results.kernel_docs.append((path.name, doc))
        elif what.startswith("model="):
            results.model_docs.append((path.name, doc))
        elif isinstance(doc, dict) and doc.get("benchmark") == "host_overhead":
            results.host_docs.append((path.name, doc))
    return results


# ---- the arithmetic -----------------------------------------------------------------------------

def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def case_key(row: dict) -> tuple:
    """(shape, dtype, layout, mode, epilogue); files written before ``--epilogue`` existed have
    no epilogue field: their rows are ``none``."""
    return (tuple(row["shape"]), row["dtype"], row["layout"], row["mode"],
            row.get("epilogue") or "none")


def mode_label(mode: str, epilogue: str | None) -> str:
    """``fwd-bwd``, ``fwd-bwd+relu``."""
    return mode if epilogue in (None, "none") else f"{mode}+{epilogue}"


def shape_label(key: tuple) -> str:
    return "x".join(str(d) for d in key[0])


def timed_medians(rows: list[dict]) -> dict[tuple, dict[str, float]]:
    """case key -> provider -> median ms, over rows that were checked and timed. A case timed
    twice for one provider (two files) keeps its first median."""
    medians: dict[tuple, dict[str, float]] = defaultdict(dict)
    for row in rows:
        if row.get("status") == "ok" and row.get("median_ms"):
            medians[case_key(row)].setdefault(row["provider"], row["median_ms"])
    return medians


def project_providers(rows: list[dict]) -> list[str]:
    names = dict.fromkeys(row["provider"] for row in rows)
    return [name for name in names if name not in BASELINES]


@dataclass
class Ratios:
    """One number per case, over the cases where both providers were timed."""

    per_case: list[tuple[tuple, float]]

    @property
    def count(self) -> int:
        return len(self.per_case)

    @property
    def geomean(self) -> float | None:
        return geomean([r for _, r in self.per_case]) if self.per_case else None

    @property
    def lowest(self) -> tuple[tuple, float] | None:
        return min(self.per_case, key=lambda item: item[1]) if self.per_case else None

    @property
    def highest(self) -> tuple[tuple, float] | None:
        return max(self.per_case, key=lambda item: item[1]) if self.per_case else None


def time_ratios(medians: dict[tuple, dict[str, float]], numerator: str, denominator: str,
                select=lambda key: True) -> Ratios:
    """``numerator``'s median time over ``denominator``'s, per case."""
    return Ratios([(key, by[numerator] / by[denominator]) for key, by in medians.items()
                   if select(key) and numerator in by and denominator in by])


def speedups(medians: dict[tuple, dict[str, float]], provider: str, baseline: str,
             select=lambda key: True) -> Ratios:
    """Speed-up of ``provider`` over ``baseline``: baseline time / provider time, per case."""
    return time_ratios(medians, baseline, provider, select)


def dbn_cost(medians: dict[tuple, dict[str, float]], backend: str,
             select=lambda key: True) -> Ratios:
    """DBN's time over plain BN's on one backend, per case: 1.0 means DBN is free."""
    return time_ratios(medians, f"{backend}-dbn", f"{backend}-bn", select)


def tensor_bytes(row: dict) -> int:
    return math.prod(row["shape"]) * ELEMENT_BYTES.get(row["dtype"], 4)


# ---- the document -------------------------------------------------------------------------------

def _x(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}x"


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(line) + " |" for line in lines)]


def _case(key: tuple) -> str:
    return f"{shape_label(key)} {key[1]} {key[2]} {mode_label(key[3], key[4])}"


@dataclass
class Goal:
    goal: str
    subject: str
    measured: str
    met: bool | None
    """None: not measured."""

    @property
    def verdict(self) -> str:
        return {True: "met", False: "**missed**", None: "not measured"}[self.met]


def _is_fwd_bwd(key: tuple) -> bool:
    """The goals' cases: fwd-bwd of the norm alone (an epilogue's rows compare a fused layer
    with unfused compositions: reported in the tables, not counted towards the goals)."""
    return key[3] == "fwd-bwd" and key[4] == "none"


def _large_rows(rows: list[dict]) -> list[dict]:
    return [row for row in rows if row.get("status") == "ok" and row.get("pct_copy") is not None
            and tensor_bytes(row) >= LARGE_TENSOR_BYTES]


def check_goals(kernel_rows: list[dict], model_rows: list[dict],
                host_rows: list[dict] | None = None) -> list[Goal]:
    """The project's goals, per backend, against whatever was measured."""
    medians = timed_medians(kernel_rows)
    providers = project_providers(kernel_rows)
    goals = []
    for name in providers:
        for baseline, target in (("cudnn", GOAL_VS_CUDNN), ("torch", GOAL_VS_TORCH)):
            ratios = speedups(medians, name, baseline, _is_fwd_bwd)
            goals.append(Goal(f"fwd-bwd geomean >= {target}x {baseline}", name,
                              f"{_x(ratios.geomean)} over {ratios.count} cases" if ratios.count
                              else "-", None if not ratios.count else ratios.geomean >= target))
        slowest = [(baseline, ratios.lowest) for baseline in ("cudnn", "torch")
                   if (ratios := speedups(medians, name, baseline, _is_fwd_bwd)).count]
        if slowest:
            baseline, (key, ratio) = min(slowest, key=lambda item: item[1][1])
            goals.append(Goal("fwd-bwd never slower than cudnn or torch", name,
                              f"slowest {_x(ratio)} vs {baseline} on {_case(key)}", ratio >= 1.0))
        else:
            goals.append(Goal("fwd-bwd never slower than cudnn or torch", name, "-", None))
        large = [row for row in _large_rows(kernel_rows) if row["provider"] == name]
        goal = f">= {GOAL_PCT_COPY:g}% of copy bandwidth, x >= 64 MiB"
        if large:
            low = min(large, key=lambda row: row["pct_copy"])
            goals.append(Goal(goal, name, f"lowest {low['pct_copy']:.0f}% "
                                          f"({_case(case_key(low))}) of {len(large)} rows",
                              low["pct_copy"] >= GOAL_PCT_COPY))
        else:
            goals.append(Goal(goal, name, "-", None))
    for backend in _backends(providers):
        cost = dbn_cost(medians, backend, lambda key: key[4] == "none")
        if cost.count:
            goals.append(Goal(f"DBN within {GOAL_DBN_OVER_BN - 1:.0%} of BN (geomean time)",
                              backend, f"DBN/BN {cost.geomean:.3f} over {cost.count} cases",
                              cost.geomean <= GOAL_DBN_OVER_BN))
    # Host time per call (a GPU run): the cuda backend's forward + backward within
    # GOAL_HOST_RATIO of nn.BatchNorm2d's.
    for row in host_rows or []:
        if (row.get("mode") == "fwd-bwd" and str(row.get("provider", "")).startswith("cuda-")
                and row.get("ratio") is not None):
            goals.append(Goal(f"host time per fwd-bwd call within {GOAL_HOST_RATIO:g}x "
                              "nn.BatchNorm2d's", row["provider"],
                              f"{row['ratio']:.2f}x ({row['median_us']:.0f} us)",
                              row["ratio"] <= GOAL_HOST_RATIO))
    steps = [row for row in model_rows if row.get("status") == "ok"]
    for variant in dict.fromkeys(row["provider"] for row in steps if row["provider"] != "torch"):
        measured = [(row["speedup_vs_torch"], row.get("batch")) for row in steps
                    if row["provider"] == variant and row.get("speedup_vs_torch")]
        goals.append(Goal("ResNet-50 step faster than nn.BatchNorm2d", variant,
                          ", ".join(_x(r, 3) + ("" if batch is None else f" at batch {batch}")
                                    for r, batch in measured) or "-",
                          None if not measured else min(r for r, _ in measured) > 1.0))
    return goals


def _backends(providers: list[str]) -> list[str]:
    """``cuda-bn``, ``cuda-dbn`` -> ``cuda``."""
    return list(dict.fromkeys(name.rsplit("-", 1)[0] for name in providers))


def _stage_section(meta: dict[str, str], stages: list[StageRecord], plan: dict | None,
                   dry_run: bool) -> list[str]:
    out = ["## Stages", ""]
    if not stages:
        return out + ["No stage log (stages.tsv): nothing is known about the stages.", ""]
    planned = {} if dry_run else {s["name"]: s for s in (plan or {}).get("stages", [])}
    lines = []
    for stage in stages:
        status = stage.status
        if stage.name == "summary" and status == "running":
            status = "writing this file"
        estimate = planned.get(stage.name, {}).get("estimate_s")
        lines.append([stage.name, status,
                      "-" if stage.seconds is None else f"{stage.seconds:.0f}",
                      "-" if stage.box_s is None else str(stage.box_s),
                      "-" if stage.name not in planned else
                      "=box" if estimate is None else f"{estimate:.0f}",
                      stage.exit_code or "-", stage.note])
    seen = {stage.name for stage in stages}
    lines += [[name, "not reached", "-", str(spec.get("box_s", "-")), "-", "-", ""]
              for name, spec in planned.items() if name not in seen]
    out += _table(["stage", "status", "took s", "box s", "planned s", "exit", "note"], lines)
    starts = [stage.started_s for stage in stages if stage.started_s is not None]
    ends = [stage.ended_s for stage in stages if stage.ended_s is not None]
    out.append("")
    if starts and ends:
        span = max(ends) - min(starts)
        out.append(f"From the first stage's start to the last one's end: {span} s (the run's "
                   f"limit: {meta.get('limit_s', '?')} s).")
    problems = [f"{stage.name} ({stage.status})" for stage in stages
                if stage.status in ("failed", "timeout")
                or (stage.status == "running" and stage.name != "summary")
                or (stage.status == "skipped" and not stage.note.startswith("optional"))]
    problems += [f"{name} (not reached)" for name in planned if name not in seen]
    if problems:
        out.append("**Did not succeed:** " + ", ".join(problems) + ".")
    build = next((stage for stage in stages if stage.name == "build"), None)
    if build is not None and build.seconds is not None:
        out.append(f"Build of the CUDA extension: {build.seconds:.0f} s ({build.status}; "
                   "log build.log).")
    return out + [""]


def _plan_section(plan: dict | None) -> list[str]:
    """The GPU run's plan, as checked by a dry run."""
    out = ["## Plan of the GPU run", ""]
    if plan is None:
        return out + ["No plan.json: the plan was not checked.", ""]
    lines = [[stage["name"], stage.get("need", "-"), str(stage["box_s"]),
              "=box" if stage.get("estimate_s") is None else f"{stage['estimate_s']:.0f}",
              "-" if stage.get("cases") is None else str(stage["cases"]),
              stage.get("breakdown", "")] for stage in plan.get("stages", [])]
    out += _table(["stage", "need", "box s", "estimate s", "cases", "what"], lines)
    out += ["", f"Required stages: boxes {plan.get('required_box_s')} s, estimate "
                f"{plan.get('required_estimate_s')} s, limit {plan.get('limit_s')} s: "
                + ("the plan fits." if plan.get("fits") else "**the plan does not fit**:")]
    out += [f"- {problem}" for problem in plan.get("problems", [])]
    return out + [""]


def _collected(directory: Path) -> list[str]:
    """A dry run's test collection: pytest's closing line of each collect-*.log (framed in
    ``=`` under ``-v``)."""
    lines = []
    for path in sorted(directory.glob("collect-*.log")):
        found = re.findall(r"^=*\s*(\d+(?:/\d+)? tests? collected.*?)(?: in [\d.]+s)?\s*=*$",
                           path.read_text(errors="replace"), re.MULTILINE)
        lines.append(f"- {path.stem.removeprefix('collect-')}: "
                     + (found[-1] if found else "no collection line (see the log)"))
    return lines


def _tests_section(directory: Path, stages: list[StageRecord]) -> list[str]:
    out = ["## Tests", ""]
    cut_short = {f"{stage.name}.junit.xml": stage.status for stage in stages
                 if stage.status in ("timeout", "running")}
    paths = sorted(directory.glob("*.junit.xml"))
    # A test stage killed before pytest wrote its junit xml: what its -v log recorded.
    from_logs = [(f"{stage.name}.log", counts) for stage in stages
                 if stage.name.startswith("tests-")
                 and not (directory / f"{stage.name}.junit.xml").exists()
                 and (directory / f"{stage.name}.log").exists()
                 and (counts := read_verbose_log(directory / f"{stage.name}.log")) is not None]
    if not paths and not from_logs:
        collected = _collected(directory)
        if collected:
            return out + ["Collected, not run (no GPU):", *collected, ""]
        return out + ["No junit xml: the tests did not run (or were killed before writing it).",
                      ""]
    total = JunitCounts()
    lines = []
    for path in paths:
        try:
            counts = read_junit(path)
        except ElementTree.ParseError as exc:
            lines.append([path.name, "unreadable", "", "", "", str(exc)])
            continue
        total.add(counts)
        lines.append([path.name, str(counts.passed), str(counts.failed), str(counts.errors),
                      str(counts.skipped), str(counts.interrupted) if counts.interrupted else ""])
    for name, counts in from_logs:
        total.add(counts)
        lines.append([f"{name} (no junit xml; from the -v log)", str(counts.passed),
                      str(counts.failed), str(counts.errors), str(counts.skipped), "?"])
    out += _table(["file", "passed", "failed", "errors", "skipped", "interrupted"], lines)
    out.append("")
    for name, status in cut_short.items():
        if (directory / name).exists():
            out.append(f"`{name}`: its stage ended in a {status}; the tests after the "
                       "interrupted one did not run and are not counted.")
    if total.failing_ids:
        out.append(f"Failing ({len(total.failing_ids)}):")
        out += [f"- `{test_id}`" for test_id in total.failing_ids[:MAX_LISTED_FAILURES]]
        if len(total.failing_ids) > MAX_LISTED_FAILURES:
            out.append(f"- ... and {len(total.failing_ids) - MAX_LISTED_FAILURES} more "
                       "(see the junit xml)")
    else:
        out.append("No test failed or errored.")
    return out + [""]


def _kernel_section(results: Results) -> list[str]:
    out = ["## Kernels: fwd-bwd speed-up (geometric mean over the cases both timed)", ""]
    rows = results.kernel_rows
    if not rows:
        return out + ["No dbn-bench suite JSON: the kernel benchmark did not run or did not "
                      "finish.", ""]
    for name, doc in results.kernel_docs:
        statuses = defaultdict(int)
        for row in doc.get("rows", []):
            statuses[row.get("status")] += 1
        noisy = sum(1 for row in doc.get("rows", []) if row.get("noisy"))
        copy = (doc.get("copy_bandwidth") or {}).get("gbps")
        out.append(f"- `{name}`: {doc.get('what')}, "
                   + ", ".join(f"{n} {status}" for status, n in statuses.items())
                   + (f", {noisy} noisy" if noisy else "")
                   + (f"; device copy {copy:,.0f} GB/s" if copy else ""))
    out.append("")
    medians = timed_medians(rows)
    providers = project_providers(rows)
    lines = []
    # One group per file, dtype and layout: a file is one run of a suite (one batch size); the
    # baselines' rows may come from another file (torch-compile's), matched case by case.
    for file_name, doc in results.kernel_docs:
        doc_rows = [row for row in doc.get("rows", []) if row["mode"] == "fwd-bwd"]
        groups = dict.fromkeys((row["dtype"], row["layout"], row.get("epilogue") or "none")
                               for row in doc_rows)
        for dtype, layout, epilogue in groups:
            cases = {key for key in map(case_key, doc_rows)
                     if (key[1], key[2], key[4]) == (dtype, layout, epilogue)}
            for name in [p for p in providers if any(r["provider"] == p for r in doc_rows)]:
                cells = []
                for baseline in BASELINES:
                    ratios = speedups(medians, name, baseline, cases.__contains__)
                    cells.append(f"{_x(ratios.geomean)} ({ratios.count})" if ratios.count
                                 else "-")
                worst = speedups(medians, name, "cudnn", cases.__contains__).lowest
                cells.append(f"{_x(worst[1])} {shape_label(worst[0])}" if worst else "-")
                layout_cell = layout if epilogue == "none" else f"{layout} +{epilogue}"
                lines.append([Path(file_name).stem, dtype, layout_cell, name, *cells])
    if lines:
        out += _table(["run", "dtype", "layout", "backend", "vs cudnn (n)", "vs torch (n)",
                       "vs torch-compile (n)", "worst vs cudnn"], lines)
    else:
        out.append("No fwd-bwd row of the project's backends.")
    out += ["", "## Kernels: bandwidth on large tensors (x >= 64 MiB), % of device copy", ""]
    large = defaultdict(list)
    for row in _large_rows(rows):
        large[(row["provider"], mode_label(row["mode"], row.get("epilogue")))].append(row)
    if large:
        lines = []
        for (provider, mode), group in large.items():
            low = min(group, key=lambda row: row["pct_copy"])
            lines.append([provider, mode, str(len(group)),
                          f"{statistics.median(r['pct_copy'] for r in group):.0f}",
                          f"{low['pct_copy']:.0f} ({shape_label(case_key(low))} {low['dtype']} "
                          f"{low['layout']})"])
        out += _table(["provider", "mode", "rows", "median %copy", "lowest %copy"], lines)
    else:
        out.append("No timed row has an input of 64 MiB or more.")
    out += ["", "## Kernels: DBN's cost over plain BN on the same backend", ""]
    lines = []
    for backend in _backends(providers):
        for mode, epilogue in dict.fromkeys(case_key(row)[3:] for row in rows):
            cost = dbn_cost(medians, backend,
                            lambda key, m=(mode, epilogue): (key[3], key[4]) == m)
            if cost.count:
                key, worst = cost.highest
                lines.append([backend, mode_label(mode, epilogue), str(cost.count),
                              f"{cost.geomean:.3f}",
                              f"{worst:.3f} ({_case(key)})"])
    out += (_table(["backend", "mode", "cases", "geomean DBN/BN time", "worst"], lines) if lines
            else ["No case has both a -bn and a -dbn row timed."])
    return out + [""]


def _model_section(results: Results) -> list[str]:
    out = ["## ResNet-50 training step", ""]
    rows = results.model_rows
    if not rows:
        return out + ["No dbn-bench --model JSON: the training step was not measured.", ""]
    lines = [[row.get("precision", "-"), row.get("layout", "-"), str(row.get("batch", "-")),
              row["provider"],
              "-" if row.get("images_per_s") is None else f"{row['images_per_s']:,.0f}",
              _x(row.get("speedup_vs_torch"), 3),
              row.get("status", "-") + (f": {row['reason']}" if row.get("reason") else "")]
             for row in rows]
    return out + _table(["precision", "layout", "batch", "variant", "images/s", "vs torch",
                         "status"], lines) + [""]


def _host_section(results: Results) -> list[str]:
    out = ["## Host overhead (per call, tiny tensor)", ""]
    if not results.host_docs:
        return out + ["No host-overhead JSON.", ""]
    lines = []
    for _, doc in results.host_docs:
        for row in doc.get("rows", []):
            median = row.get("median_us")
            lines.append([str(row.get("mode", "-")), str(row.get("provider", "-")),
                          "-" if median is None else f"{median:.1f}",
                          "-" if row.get("ratio") is None else f"{row['ratio']:.2f}"])
    return out + _table(["mode", "provider", "median us", "time / torch's"], lines) + [""]


def summarize(directory: Path) -> str:
    directory = Path(directory)
    log_path = directory / "stages.tsv"
    meta, stages = read_stage_log(log_path) if log_path.exists() else ({}, [])
    plan = None
    if (directory / "plan.json").exists():
        try:
            plan = json.loads((directory / "plan.json").read_text())
        except ValueError:
            plan = None
    results = read_results(directory)
    env = next((doc.get("environment", {}) for _, doc in
                results.kernel_docs + results.model_docs + results.host_docs), {})
    dry_run = meta.get("mode") == "dry-run"
    probed_gpu = meta.get("gpu") if meta.get("gpu") not in (None, "none") else None
    device = env.get("gpu") or probed_gpu or env.get("cpu") or "an unknown device"
    title = (f"# gpu_check DRY RUN on CPU ({device})" if dry_run
             else f"# gpu_check on {device}")
    out = [title, ""]
    if dry_run:
        out += ["A dry run on a machine without a GPU: it checked the plan and ran what a CPU "
                "can (test collection, the reference backend against PyTorch's CPU batch norm, "
                "this summary). Its numbers say nothing about the GPU kernels.", ""]
    facts = [f"{key} {env[key]}" for key in ("driver", "torch", "triton", "cuda", "cudnn",
                                             "python") if env.get(key)]
    if meta.get("commit"):
        facts.append(f"commit {meta['commit']}")
    if env.get("date_utc") or meta.get("started_utc"):
        facts.append(f"started {meta.get('started_utc') or env.get('date_utc')}")
    if facts:
        out += ["; ".join(facts) + ".", ""]
    out += _section(_goals_section, results)
    out += _section(_stage_section, meta, stages, plan, dry_run)
    if dry_run or (plan is not None and not plan.get("fits", True)):
        out += _section(_plan_section, plan)
    out += _section(_tests_section, directory, stages)
    out += _section(_kernel_section, results)
    out += _section(_model_section, results)
    out += _section(_host_section, results)
    if results.unreadable:
        out += ["## Unreadable files", "", *(f"- {item}" for item in results.unreadable), ""]
    return "\n".join(out)


def _section(write, *args) -> list[str]:
    """One section; a file this module did not expect costs that section, not the summary."""
    try:
        return write(*args)
    except Exception as exc:  # noqa: BLE001 - reported in the summary itself
        return [f"**{write.__name__.strip('_')}: could not be written** ({type(exc).__name__}: "
                f"{exc})", ""]


def _goals_section(results: Results) -> list[str]:
    goals = check_goals(results.kernel_rows, results.model_rows,
                        [row for _, doc in results.host_docs
                         if "cuda" in str(doc.get("settings", {}).get("device", ""))
                         for row in doc.get("rows", [])])
    out = ["## Goals", ""]
    if goals:
        tally = defaultdict(int)
        for goal in goals:
            tally[goal.verdict.strip("*")] += 1
        out += [", ".join(f"{n} {verdict}" for verdict, n in tally.items()) + ".", ""]
        out += _table(["goal", "backend", "measured", "verdict"],
                      [[g.goal, g.subject, g.measured, g.verdict] for g in goals])
    else:
        out.append("No measurement of the project's backends to check the goals against.")
    return out + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dbn_kernels.benchmark.summary",
        description="Write SUMMARY.md for a bench/gpu_check.sh output directory.")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--output", type=Path, default=None,
                        help="where to write (default DIRECTORY/SUMMARY.md; - for stdout)")
    args = parser.parse_args(argv)
    if not args.directory.is_dir():
        print(f"summary: {args.directory} is not a directory", file=sys.stderr)
        return 2
    text = summarize(args.directory)
    if str(args.output) == "-":
        print(text)
    else:
        (args.output or args.directory / "SUMMARY.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
