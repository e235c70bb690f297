"""bench/gpu_check.sh and what it is built from, on CPU: the dry run end to end, the planner
(dbn_kernels.benchmark.gpu_check_plan), the summary (dbn_kernels.benchmark.summary) and
dbn-bench's --shapes. Expected numbers are computed here from the rows, not by the modules'
own functions."""

import json
import math
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from dbn_kernels.benchmark import gpu_check_plan, summary
from dbn_kernels.benchmark.cli import main as dbn_bench
from dbn_kernels.benchmark.shapes import resnet50_shapes, select_shapes, shape_list

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def product_geomean(values):
    """An independent geometric mean: the n-th root of the product."""
    return math.prod(values) ** (1 / len(values))


# ---- the dry run --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dry") / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], capture_output=True,
                          text=True, env=env, timeout=600)
    unpacked = out.parent / "unpacked"
    if (out / "gpu_check.tar.gz").exists():
        with tarfile.open(out / "gpu_check.tar.gz") as tar:
            tar.extractall(unpacked, filter="data")
    return proc, out, unpacked


def test_dry_run_succeeds_and_leaves_the_summary_and_one_tarball(dry_run):
    proc, out, unpacked = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["SUMMARY.md", "gpu_check.tar.gz"]
    text = (out / "SUMMARY.md").read_text()
    assert text.startswith("# gpu_check DRY RUN on CPU")
    assert (unpacked / "SUMMARY.md").read_text() == text
    for name in ("stages.tsv", "plan.tsv", "plan.json", "cpu-kernels.json",
                 "cpu-train-step.json", "collect-tests-gpu.log"):
        assert (unpacked / name).is_file(), name
    # the stdout ends with the summary, so a caller that keeps only the output's tail has it
    assert "## Goals" in proc.stdout and "plan fits" in proc.stdout
    # every test selection of the GPU run collects tests (the op-contract suite's among them)
    collected = re.findall(r"^- (\S+): (\d+)(?:/\d+)? tests? collected", text, re.MULTILINE)
    assert sorted(name for name, _ in collected) == ["deselected-test", "tests-gpu",
                                                      "tests-triton"], text
    assert all(int(n) > 0 for _, n in collected)
    assert "tests/test_op_contract.py" in (unpacked / "collect-tests-triton.log").read_text()


def test_dry_run_logs_every_stage_as_ok(dry_run):
    _, _, unpacked = dry_run
    meta, stages = summary.read_stage_log(unpacked / "stages.tsv")
    assert meta["mode"] == "dry-run"
    names = [stage.name for stage in stages]
    assert names[:2] == ["plan", "env"] and names[-1] == "summary"
    for stage in stages[:-1]:  # the summary was still running when it read the log
        assert stage.status == "ok", stage
        assert stage.exit_code == "0" and stage.seconds is not None


def test_dry_run_plan_counts_the_cases_of_the_gpu_run(dry_run):
    _, _, unpacked = dry_run
    plan = json.loads((unpacked / "plan.json").read_text())
    assert plan["fits"] and not plan["problems"]
    assert plan["required_box_s"] <= plan["limit_s"] <= 540
    stages = {stage["name"]: stage for stage in plan["stages"]}
    n_shapes = len(resnet50_shapes(64))
    # shapes x dtypes x layouts x modes x providers
    assert stages["kernels-bf16"]["cases"] == n_shapes * 1 * 2 * 2 * 6
    assert stages["kernels-fp32"]["cases"] == n_shapes * 1 * 2 * 2 * 6
    assert stages["compile"]["cases"] == 2
    assert stages["train-step"]["cases"] == 5
    assert stages["kernels-bf16-b256"]["need"] == "optional"
    # the fused layers: shapes x layouts x epilogues (relu, add-relu) x providers, fwd-bwd bf16
    assert stages["kernels-epilogue"]["cases"] == n_shapes * 2 * 2 * 3
    assert stages["train-step-fused"]["cases"] == 3
    assert all(stages[name]["need"] == "optional"
               for name in ("kernels-epilogue", "train-step-fused"))
    if "paper-resnet18" in stages:  # where torchvision and scikit-learn are installed
        assert stages["paper-resnet18"]["need"] == "optional"
        assert stages["paper-resnet18"]["estimate_s"] is None  # not modelled: its whole box
    for stage in stages.values():
        if stage["estimate_s"] is not None:
            assert stage["estimate_s"] * plan["margin"] <= stage["box_s"], stage["name"]


def test_dry_run_benchmarks_the_shapes_it_was_given(dry_run):
    _, _, unpacked = dry_run
    rows = json.loads((unpacked / "cpu-kernels.json").read_text())["rows"]
    assert {tuple(row["shape"]) for row in rows} == {(8, 64, 16, 16), (4, 256, 4, 4)}
    assert {row["provider"] for row in rows} == {"reference-bn", "reference-dbn", "torch"}


def test_usage_errors():
    assert subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True,
                          timeout=60).returncode == 2
    assert subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True,
                          timeout=60).returncode == 2


# ---- the planner --------------------------------------------------------------------------------

KERNEL_ARGS = ("--suite resnet50 --batch 64 --layout both --mode train-fwd fwd-bwd --providers "
               "cuda-bn,torch,cudnn --dtype bfloat16 float32 --budget-ms 20").split()


def plan_text(*lines):
    return "\n".join("\t".join(fields) for fields in lines) + "\n"


def test_planner_counts_cases_with_the_benchmarks_own_suites():
    stages = gpu_check_plan.read_plan(plan_text(
        ("build", "60", "required", "command", "pip", "install"),
        ("kernels", "300", "required", "dbn-bench", *KERNEL_ARGS),
        ("subset", "100", "required", "dbn-bench", "--suite", "resnet50", "--shapes",
         "64x64x112x112,3x3x3x3", "--dtype", "bfloat16", "--layout", "nhwc", "--mode",
         "fwd-bwd", "--providers", "torch-compile"),
        ("model", "100", "required", "dbn-bench", "--model", "resnet50", "--batch", "64",
         "--dtype", "bfloat16", "--layout", "both", "--providers", "torch,cuda-bn,cudnn")))
    plan = gpu_check_plan.make_plan(stages, 600)
    kernels, subset, model = plan.stages[1:]
    assert kernels.cases == len(resnet50_shapes(64)) * 2 * 2 * 2 * 3
    assert subset.cases == 2
    assert model.cases == 2 * 2  # layouts x model variants (cudnn is a kernel provider only)
    # every torch-compile row is charged its compile time
    assert subset.estimate_s >= 2 * gpu_check_plan.TORCH_COMPILE_S
    assert plan.required_estimate_s == pytest.approx(60 + kernels.estimate_s
                                                     + subset.estimate_s + model.estimate_s)


def test_planner_rejects_a_plan_over_the_limit(tmp_path, capsys):
    path = tmp_path / "plan.tsv"
    path.write_text(plan_text(("kernels", "5", "required", "dbn-bench", *KERNEL_ARGS),
                              ("tests", "400", "required", "command", "pytest")))
    assert gpu_check_plan.main([str(path), "--limit-s", "300"]) == 1
    printed = capsys.readouterr().out
    assert "PLAN DOES NOT FIT" in printed
    assert "kernels: estimate" in printed and "over the 300 s limit" in printed


def test_planner_checks_alongside_and_explicit_dimensions():
    stages = gpu_check_plan.read_plan(plan_text(
        ("side", "90", "alongside", "command", "pytest"),
        ("main", "60", "required", "command", "pytest"),
        ("implicit", "60", "required", "dbn-bench", "--suite", "quick")))
    plan = gpu_check_plan.make_plan(stages, 1000)
    assert plan.required_box_s == 120  # the alongside stage adds nothing
    assert any("side:" in p and "within the 60 s box of main" in p for p in plan.problems)
    assert any(p.startswith("implicit: --dtype must be given explicitly") for p in plan.problems)
    with pytest.raises(gpu_check_plan.PlanError):
        gpu_check_plan.read_plan("name\tnot-a-number\trequired\tcommand\n")


# ---- the summary on a real CPU dbn-bench run ----------------------------------------------------

def test_summary_of_a_real_cpu_run(tmp_path):
    assert dbn_bench(["--device", "cpu", "--threads", "1", "--suite", "quick", "--dtype",
                      "float32", "--layout", "nchw", "--mode", "fwd-bwd", "--providers",
                      "reference-bn,reference-dbn,torch", "--budget-ms", "2", "--no-progress",
                      "--json", str(tmp_path / "cpu.json")]) == 0
    rows = json.loads((tmp_path / "cpu.json").read_text())["rows"]
    torch_ms = {tuple(r["shape"]): r["median_ms"] for r in rows if r["provider"] == "torch"}
    bn_ms = {tuple(r["shape"]): r["median_ms"] for r in rows if r["provider"] == "reference-bn"}
    dbn_ms = {tuple(r["shape"]): r["median_ms"] for r in rows if r["provider"] == "reference-dbn"}
    assert len(torch_ms) == len(bn_ms) == 3
    speedup = product_geomean([torch_ms[s] / bn_ms[s] for s in bn_ms])
    dbn_over_bn = product_geomean([dbn_ms[s] / bn_ms[s] for s in bn_ms])

    text = summary.summarize(tmp_path)
    assert f"| cpu | float32 | nchw | reference-bn | - | {speedup:.2f}x (3) | - | - |" in text
    assert f"| reference | fwd-bwd | 3 | {dbn_over_bn:.3f} |" in text
    assert "No stage log" in text and "No junit xml" in text
    assert "No dbn-bench --model JSON" in text and "No host-overhead JSON" in text


# ---- the summary on hand-built rows -------------------------------------------------------------

BIG = [64, 64, 112, 112]    # x: 98 MiB in bfloat16
SMALL = [64, 512, 7, 7]     # x: 3 MiB in bfloat16


def kernel_row(provider, shape, median_ms, *, layout="nhwc", mode="fwd-bwd", pct_copy=None,
               status="ok"):
    return {"provider": provider, "shape": shape, "dtype": "bfloat16", "layout": layout,
            "mode": mode, "status": status, "reason": "", "median_ms": median_ms,
            "pct_copy": pct_copy, "noisy": False}


def write_doc(path, what, rows, **extra):
    path.write_text(json.dumps({"what": what, "environment": {"gpu": "Test GPU"}, **extra,
                                "rows": rows}))


@pytest.fixture
def hand_built(tmp_path):
    """cuda-bn against cudnn on three cases (speed-ups 2, 0.5 and 8), torch-compile on one case
    in a second file, a DBN that costs 1% on cuda and 10% on triton, two training steps."""
    rows = [
        kernel_row("cudnn", BIG, 4.0), kernel_row("cuda-bn", BIG, 2.0, pct_copy=90.0),
        kernel_row("cudnn", SMALL, 1.0), kernel_row("cuda-bn", SMALL, 2.0, pct_copy=20.0),
        kernel_row("cudnn", BIG, 8.0, layout="nchw"),
        kernel_row("cuda-bn", BIG, 1.0, layout="nchw", pct_copy=80.0),
        kernel_row("torch", BIG, 3.0), kernel_row("torch", SMALL, 3.0),
        kernel_row("cuda-dbn", BIG, 2.02), kernel_row("cuda-dbn", SMALL, 2.02),
        kernel_row("triton-bn", BIG, 1.0), kernel_row("triton-dbn", BIG, 1.1),
        kernel_row("triton-bn", SMALL, 1.0, status="failed"),
        kernel_row("cuda-bn", BIG, 5.0, mode="train-fwd", pct_copy=50.0),
    ]
    write_doc(tmp_path / "kernels.json", "suite=resnet50", rows,
              copy_bandwidth={"gbps": 4000.0})
    write_doc(tmp_path / "compile.json", "suite=resnet50", [kernel_row("torch-compile", BIG, 2.4)])
    write_doc(tmp_path / "step.json", "model=resnet50", [
        {"provider": "torch", "precision": "amp-bfloat16", "layout": "nhwc", "batch": 64,
         "status": "ok", "images_per_s": 1000.0, "speedup_vs_torch": 1.0},
        {"provider": "cuda-bn", "precision": "amp-bfloat16", "layout": "nhwc", "batch": 64,
         "status": "ok", "images_per_s": 1200.0, "speedup_vs_torch": 1.2},
        {"provider": "triton-dbn", "precision": "amp-bfloat16", "layout": "nhwc", "batch": 64,
         "status": "ok", "images_per_s": 900.0, "speedup_vs_torch": 0.9}])
    return tmp_path


def goal_row(text, goal, backend):
    return next(line for line in text.splitlines()
                if line.startswith(f"| {goal} | {backend} |"))


def test_summary_speedups_over_each_baseline(hand_built):
    text = summary.summarize(hand_built)
    nhwc = product_geomean([4.0 / 2.0, 1.0 / 2.0])
    vs_torch = product_geomean([3.0 / 2.0, 3.0 / 2.0])
    assert (f"| kernels | bfloat16 | nhwc | cuda-bn | {nhwc:.2f}x (2) | {vs_torch:.2f}x (2) "
            f"| {2.4 / 2.0:.2f}x (1) | 0.50x 64x512x7x7 |") in text
    assert "| kernels | bfloat16 | nchw | cuda-bn | 8.00x (1) | - | - | 8.00x 64x64x112x112 |" \
        in text
    assert "| compile |" not in text  # torch-compile's own file holds no project backend
    overall = product_geomean([2.0, 0.5, 8.0])
    assert f"{overall:.2f}x over 3 cases" in goal_row(text, "fwd-bwd geomean >= 1.3x cudnn",
                                                      "cuda-bn")
    assert goal_row(text, "fwd-bwd geomean >= 1.3x cudnn", "cuda-bn").endswith("| met |")
    never_slower = goal_row(text, "fwd-bwd never slower than cudnn or torch", "cuda-bn")
    assert "slowest 0.50x vs cudnn on 64x512x7x7 bfloat16 nhwc fwd-bwd" in never_slower
    assert never_slower.endswith("| **missed** |")
    assert goal_row(text, "fwd-bwd geomean >= 1.3x cudnn", "triton-bn").endswith(
        "| 4.00x over 1 cases | met |")  # its failed SMALL row is not a case
    assert goal_row(text, ">= 85% of copy bandwidth, x >= 64 MiB", "triton-bn").endswith(
        "| - | not measured |")


def test_summary_bandwidth_counts_large_tensors_only(hand_built):
    text = summary.summarize(hand_built)
    # the 3 MiB SMALL row at 20% does not count; the lowest large row is train-fwd at 50%
    bandwidth = goal_row(text, ">= 85% of copy bandwidth, x >= 64 MiB", "cuda-bn")
    assert "lowest 50% (64x64x112x112 bfloat16 nhwc train-fwd) of 3 rows" in bandwidth
    assert bandwidth.endswith("| **missed** |")
    assert "| cuda-bn | fwd-bwd | 2 | 85 | 80 (64x64x112x112 bfloat16 nchw) |" in text


def test_summary_dbn_cost_and_training_step(hand_built):
    text = summary.summarize(hand_built)
    cuda = goal_row(text, "DBN within 2% of BN (geomean time)", "cuda")
    assert f"DBN/BN {product_geomean([2.02 / 2.0, 2.02 / 2.0]):.3f} over 2 cases" in cuda
    assert cuda.endswith("| met |")
    triton = goal_row(text, "DBN within 2% of BN (geomean time)", "triton")
    assert "DBN/BN 1.100 over 1 cases" in triton and triton.endswith("| **missed** |")
    assert goal_row(text, "ResNet-50 step faster than nn.BatchNorm2d", "cuda-bn").endswith(
        "| 1.200x at batch 64 | met |")
    assert goal_row(text, "ResNet-50 step faster than nn.BatchNorm2d", "triton-dbn").endswith(
        "| 0.900x at batch 64 | **missed** |")
    assert "| amp-bfloat16 | nhwc | 64 | cuda-bn | 1,200 | 1.200x | ok |" in text


def test_summary_host_overhead_goal_counts_gpu_runs_only(hand_built):
    def host_doc(device, ratios):
        return {"benchmark": "host_overhead", "settings": {"device": device},
                "rows": [{"mode": "fwd-bwd", "provider": "torch", "median_us": 200.0,
                          "ratio": 1.0},
                         *({"mode": mode, "provider": provider, "median_us": 200.0 * ratio,
                            "ratio": ratio} for mode, provider, ratio in ratios)]}

    (hand_built / "host-overhead.json").write_text(json.dumps(host_doc("cuda", [
        ("fwd-bwd", "cuda-bn", 1.4), ("fwd-bwd", "cuda-dbn", 1.6), ("eval", "cuda-bn", 3.0),
        ("fwd-bwd", "triton-bn", 4.0)])))
    text = summary.summarize(hand_built)
    goal = "host time per fwd-bwd call within 1.5x nn.BatchNorm2d's"
    assert goal_row(text, goal, "cuda-bn").endswith("| 1.40x (280 us) | met |")
    assert goal_row(text, goal, "cuda-dbn").endswith("| 1.60x (320 us) | **missed** |")
    assert f"| {goal} | triton-bn |" not in text  # the goal is the cuda backend's
    # a CPU run (the dry run's) is no measurement of this goal
    (hand_built / "host-overhead.json").write_text(json.dumps(host_doc("cpu", [
        ("fwd-bwd", "cuda-bn", 1.4)])))
    assert goal not in summary.summarize(hand_built)


# ---- partial results ----------------------------------------------------------------------------

def test_summary_of_a_run_cut_short(hand_built):
    (hand_built / "step.json").unlink()  # the training step's file is missing
    (hand_built / "stages.tsv").write_text(
        "# gpu_check mode=run limit_s=540 gpu=test-gpu\n"
        "event\tstage\tbox_s\tlimit_s\tutc\tepoch_s\texit\tseconds\tstatus\tnote\n"
        "start\tbuild\t70\t70\tT\t1\t\t\trunning\t\n"
        "end\tbuild\t70\t70\tT\t2\t0\t41.5\tok\t\n"
        "start\tkernels-fp32\t100\t100\tT\t3\t\t\trunning\t\n"
        "end\tkernels-fp32\t100\t100\tT\t4\t124\t100.2\ttimeout\tstopped at its 100 s limit\n"
        "start\ttrain-step\t70\t70\tT\t5\t\t\trunning\t\n"
        "end\ttrain-step\t70\t70\tT\t6\t1\t3.0\tfailed\tsee train-step.log\n"
        "skip\tkernels-bf16-b256\t70\t0\tT\t7\t\t\tskipped\toptional, and only 9 s were left\n"
        "start\thost-overhead\t25\t25\tT\t8\t\t\trunning\t\n")  # killed mid-stage
    (hand_built / "plan.json").write_text(json.dumps({"stages": [
        {"name": "build", "box_s": 70, "estimate_s": None},
        {"name": "kernels-fp32", "box_s": 100, "estimate_s": 80.0},
        {"name": "compile", "box_s": 50, "estimate_s": 41.0}]}))
    (hand_built / "tests-gpu.junit.xml").write_text(
        '<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_cuda" name="test_a" />'
        '<testcase classname="tests.test_cuda" name="test_b"><failure message="x" /></testcase>'
        '<testcase classname="tests.test_cuda" name="test_c"><error message="y" /></testcase>'
        '<testcase classname="tests.test_cuda" name="test_d"><skipped message="z" /></testcase>'
        '<testcase time="0.000" /></testsuite></testsuites>')
    text = summary.summarize(hand_built)
    assert "| build | ok | 42 | 70 | =box | 0 |  |" in text
    assert "| kernels-fp32 | timeout | 100 | 100 | 80 | 124 | stopped at its 100 s limit |" in text
    assert "| host-overhead | running |" in text
    assert "| compile | not reached |" in text
    did_not = next(line for line in text.splitlines() if line.startswith("**Did not succeed:**"))
    for part in ("kernels-fp32 (timeout)", "train-step (failed)", "host-overhead (running)",
                 "compile (not reached)"):
        assert part in did_not
    assert "kernels-bf16-b256" not in did_not  # an optional stage skipped for time is no failure
    assert "Build of the CUDA extension: 42 s (ok" in text
    assert "| tests-gpu.junit.xml | 1 | 1 | 1 | 1 | 1 |" in text
    assert "`tests.test_cuda::test_b (failed)`" in text
    assert "`tests.test_cuda::test_c (error)`" in text
    assert "No dbn-bench --model JSON" in text
    # what exists is still summarised
    assert "| kernels | bfloat16 | nchw | cuda-bn | 8.00x (1) |" in text


def test_summary_reads_a_killed_test_stage_from_its_verbose_log(hand_built):
    """On the H200 a test stage hung in pytest-xdist's teardown after its last test and was
    killed before pytest wrote the junit xml: the outcomes its -v log printed still count."""
    (hand_built / "stages.tsv").write_text(
        "# gpu_check mode=run limit_s=540 gpu=test-gpu\n"
        "event\tstage\tbox_s\tlimit_s\tutc\tepoch_s\texit\tseconds\tstatus\tnote\n"
        "start\ttests-gpu\t85\t85\tT\t1\t\t\trunning\t\n"
        "end\ttests-gpu\t85\t85\tT\t2\t124\t85.6\ttimeout\tstopped at its 85 s limit\n"
        "start\ttests-triton\t85\t85\tT\t1\t\t\trunning\t\n"
        "end\ttests-triton\t85\t85\tT\t2\t0\t30.1\tok\t\n")
    (hand_built / "tests-gpu.log").write_text(
        "bringing up nodes...\n"
        "tests/test_cuda.py::test_a[cuda] \n"
        "[gw0] [ 25%] PASSED tests/test_cuda.py::test_a[cuda] \n"
        "[gw1] [ 50%] FAILED tests/test_cuda.py::test_b[cuda] \n"
        "[gw2] [ 75%] SKIPPED tests/test_cuda.py::test_c \n"
        "[gw3] [100%] ERROR tests/test_gpu_backends.py::test_d \n"
        "FAILED tests/test_cuda.py::test_b[cuda] - AssertionError\n")  # -rfE's summary line
    (hand_built / "tests-triton.log").write_text(
        "tests/test_triton.py::test_e PASSED                  [ 50%]\n"
        "tests/test_triton.py::test_f FAILED                  [100%]\n")
    text = summary.summarize(hand_built)
    assert "| tests-gpu.log (no junit xml; from the -v log) | 1 | 1 | 1 | 1 | ? |" in text
    assert "| tests-triton.log (no junit xml; from the -v log) | 1 | 1 | 0 | 0 | ? |" in text
    assert "`tests/test_cuda.py::test_b[cuda] (failed)`" in text
    assert "`tests/test_gpu_backends.py::test_d (error)`" in text
    assert "`tests/test_triton.py::test_f (failed)`" in text
    # with the junit xml present, the log is not read a second time
    (hand_built / "tests-triton.junit.xml").write_text(
        '<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_triton" name="test_e" /></testsuite></testsuites>')
    text = summary.summarize(hand_built)
    assert "tests-triton.log (no junit" not in text
    assert "| tests-triton.junit.xml | 1 | 0 | 0 | 0 |  |" in text


def test_summary_of_an_empty_directory(tmp_path):
    text = summary.summarize(tmp_path)
    assert "No stage log" in text and "No junit xml" in text
    assert "No dbn-bench suite JSON" in text
    assert "No measurement of the project's backends" in text
    assert summary.main([str(tmp_path)]) == 0
    assert (tmp_path / "SUMMARY.md").read_text().startswith("# gpu_check on an unknown device")


# ---- dbn-bench --shapes -------------------------------------------------------------------------

def test_shapes_subset_keeps_the_suites_layer_counts():
    counts = {shape.dims: shape.count for shape in resnet50_shapes(64)}
    chosen = select_shapes("resnet50", 64, shape_list("64x256x14x14, 64x2048x7x7,2x3x4x5"))
    assert [shape.dims for shape in chosen] == [(64, 256, 14, 14), (64, 2048, 7, 7), (2, 3, 4, 5)]
    assert [shape.count for shape in chosen] == [counts[(64, 256, 14, 14)],
                                                 counts[(64, 2048, 7, 7)], 1]
    assert select_shapes("quick") == select_shapes("quick", None, None)


@pytest.mark.parametrize("bad", ["2x3", "2x3x4x0", "axbxcxd", ","])
def test_bad_shapes_are_a_usage_error(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        dbn_bench(["--shapes", bad])
    assert exit_info.value.code == 2
    assert "--shapes" in capsys.readouterr().err


def test_summary_survives_a_file_it_does_not_understand(hand_built):
    (hand_built / "host.json").write_text(json.dumps({"benchmark": "host_overhead",
                                                      "rows": ["not a row"]}))
    (hand_built / "broken.json").write_text("{not json")
    text = summary.summarize(hand_built)
    assert "**host_section: could not be written** (AttributeError" in text
    assert "broken.json" in text.split("## Unreadable files")[1]
    assert "| kernels | bfloat16 | nchw | cuda-bn | 8.00x (1) |" in text  # the rest is there
