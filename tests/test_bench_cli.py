"""Smoke tests of the benchmark CLI ``dbn-bench`` (CPU; the GPU test is marked and skipped)."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dbn_kernels.benchmark.cli import main
from dbn_kernels.benchmark.cases import CaseInputs
from dbn_kernels.benchmark.providers import Provider, Unsupported, all_providers
from dbn_kernels.benchmark.report import kernel_table
from dbn_kernels.benchmark.runner import Row, add_speedups, run_benchmark
from dbn_kernels.benchmark.shapes import (DTYPES, LAYOUTS, MODES, Shape, bytes_moved,
                                          resnet50_shapes)
from dbn_kernels.benchmark.timing import (CPU_SETTINGS, NOISE_THRESHOLD, CallFailed, Timer,
                                          TimerSettings, Timing, percentile)

REQUIRED = ("provider", "shape", "dtype", "layout", "mode", "median_ms", "gbps")
GPU_ONLY = {"cuda-bn", "cuda-dbn", "triton-bn", "triton-dbn", "cudnn"}


def check_document(document: dict) -> list[dict]:
    """The rows of a kernel-suite JSON are well formed; returns the timed ones."""
    env = document["environment"]
    assert env["torch"] == torch.__version__
    assert env["cpu_threads"] >= 1 and env["cpu_threads_set_by"]
    assert env["cpus_usable"] >= 1 and "load_average_1min" in env
    assert document["noise_threshold"] == NOISE_THRESHOLD
    assert document["copy_bandwidth"]["gbps"] > 0
    for skipped in document["skipped_providers"]:
        assert skipped["provider"] and skipped["reason"]
    timed = [row for row in document["rows"] if row["status"] == "ok"]
    assert timed
    for row in document["rows"]:
        for key in REQUIRED:
            assert key in row, key
        if row["status"] != "ok":
            assert row["reason"] and row["median_ms"] is None
    for row in timed:
        assert len(row["shape"]) == 4 and all(d > 0 for d in row["shape"])
        assert row["dtype"] in DTYPES and row["layout"] in LAYOUTS and row["mode"] in MODES
        assert math.isfinite(row["median_ms"]) and row["median_ms"] > 0
        assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        assert math.isfinite(row["gbps"]) and row["gbps"] > 0
        assert row["max_rel_err"] < 1e-4  # float32 on CPU
        assert row["calls_per_sample"] >= 1
        spread = (row["p80_ms"] - row["p20_ms"]) / row["median_ms"]
        assert row["spread"] == pytest.approx(spread)
        assert row["noisy"] is (spread > NOISE_THRESHOLD)
        assert isinstance(row["speedup_vs_torch_noisy"], bool)
    return timed


def test_quick_suite_json_and_csv(tmp_path):
    out, table = tmp_path / "out.json", tmp_path / "out.csv"
    assert main(["--suite", "quick", "--json", str(out), "--csv", str(table),
                 "--no-progress"]) == 0
    document = json.loads(out.read_text())
    timed = check_document(document)
    skipped = {s["provider"] for s in document["skipped_providers"]}
    if not torch.cuda.is_available():
        # Without a GPU: the reference against PyTorch's CPU batch norm, GPU providers skipped.
        assert GPU_ONLY <= skipped
        assert {row["provider"] for row in timed} == {"reference-bn", "reference-dbn", "torch"}
        assert all(row["impl"] == "native" for row in timed if row["provider"] == "torch")
        assert len(timed) == 3 * 2 * 4 * 3  # shapes x layouts x modes x providers
        assert any("need a GPU" in note for note in document["notes"])
    for row in timed:  # every row is compared with eager PyTorch on the same case
        assert row["speedup_vs_torch"] > 0
    lines = table.read_text().splitlines()
    assert len(lines) == 1 + len(document["rows"])
    assert "env_torch" in lines[0] and "median_ms" in lines[0]


def test_console_script(tmp_path):
    """The installed entry point (or ``python -m`` when the script is not on disk)."""
    script = Path(sys.executable).with_name("dbn-bench")
    command = [str(script)] if script.exists() else (
        [shutil.which("dbn-bench")] if shutil.which("dbn-bench")
        else [sys.executable, "-m", "dbn_kernels.benchmark"])
    out = tmp_path / "out.json"
    result = subprocess.run(
        [*command, "--suite", "quick", "--mode", "eval-fwd", "--layout", "nchw",
         "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "median ms" in result.stdout and "skipped providers" in result.stdout
    check_document(json.loads(out.read_text()))


def test_python_dash_m(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dbn_kernels.benchmark", "--help"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0 and "--suite" in result.stdout


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "out.png"
    assert main(["--suite", "quick", "--mode", "eval-fwd", "--plot", str(png),
                 "--no-progress"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_usage_errors(capsys):
    assert main(["--providers", "nonesuch"]) == 2
    assert main(["--dtype", "int8"]) == 2
    assert main(["--threads", "0"]) == 2
    assert "nonesuch" in capsys.readouterr().err


def _broken(name: str, build) -> Provider:
    return Provider(name=name, family="bn", description="test double", unavailable=lambda d: None,
                    build=build, implementation=lambda call, device: "test")


def test_wrong_results_are_reported_not_timed():
    torch_eager = next(p for p in all_providers() if p.name == "torch")
    wrong_calls = []

    def off_by_one_percent(inputs: CaseInputs, mode: str):
        call = torch_eager.setup(inputs, mode)

        def wrong():
            wrong_calls.append(mode)
            return {name: t * 1.01 for name, t in call().items()}
        return wrong

    def raises(inputs, mode):
        raise RuntimeError("kernel exploded")

    def rejects(inputs, mode):
        raise Unsupported("not this case")

    def dies_while_timed(inputs, mode):
        call, calls = torch_eager.setup(inputs, mode), []

        def dies():
            calls.append(None)
            if len(calls) > 2:  # the check's call and one warm-up call pass
                raise RuntimeError("died while timed")
            return call()
        return dies

    providers = [torch_eager, _broken("wrong", off_by_one_percent), _broken("error", raises),
                 _broken("rejects", rejects), _broken("dies", dies_while_timed)]
    timer = Timer(torch.device("cpu"), TimerSettings(0.0, 1.0, 3, 3))
    rows = run_benchmark([Shape((4, 8, 4, 4))], ["float32"], ["nchw"], ["train-fwd", "bwd"],
                         providers, torch.device("cpu"), timer)
    by_name = {(row.provider, row.mode): row for row in rows}
    assert wrong_calls == ["train-fwd", "bwd"]  # the checked call only: never timed
    for mode in ("train-fwd", "bwd"):
        assert by_name[("torch", mode)].status == "ok"
        wrong = by_name[("wrong", mode)]
        assert wrong.status == "failed" and wrong.timing is None
        assert "wrong result" in wrong.reason and wrong.max_rel_err > 1e-3
        assert by_name[("error", mode)].status == "failed"
        assert "kernel exploded" in by_name[("error", mode)].reason
        assert by_name[("rejects", mode)].status == "skipped"
        assert by_name[("rejects", mode)].reason == "not this case"
        dies = by_name[("dies", mode)]
        assert dies.status == "failed" and dies.timing is None
        assert dies.reason == "error while timing: RuntimeError: died while timed"


class FakeClock:
    """A nanosecond clock that only moves when a fake call says it took time."""

    def __init__(self) -> None:
        self.now_ns = 0

    def __call__(self) -> int:
        return self.now_ns


def test_providers_are_timed_in_interleaved_rounds():
    clock, order = FakeClock(), []
    per_call_ms = {"a": 0.2, "b": 0.07, "c": 0.6}

    def fake_call(name: str):
        def call():
            order.append(name)
            clock.now_ns += round(per_call_ms[name] * 1e6)
        return call

    settings = TimerSettings(warmup_ms=1.0, budget_ms=0.0, min_reps=5, max_reps=5,
                             min_sample_ms=0.5)
    timer = Timer(torch.device("cpu"), settings, clock=clock)
    timings = timer.time_interleaved({name: fake_call(name) for name in per_call_ms})

    # Calls shorter than 0.5 ms are repeated within a sample: a 3 times, b 8 times, c once.
    repeats = {"a": 3, "b": 8, "c": 1}
    one_round = [name for name in per_call_ms for _ in range(repeats[name])]
    # The measurement ends with 5 rounds of a's sample, b's, c's, not each call's block in turn.
    assert order[-5 * len(one_round):] == one_round * 5
    for name, ms in per_call_ms.items():
        timing = timings[name]
        assert timing.calls_per_sample == repeats[name]
        assert timing.samples_ms == pytest.approx([ms] * 5)  # per call, not per sample
        assert not timing.noisy


def test_a_failing_call_is_named():
    timer = Timer(torch.device("cpu"), TimerSettings(0.0, 1.0, 3, 3))
    with pytest.raises(CallFailed) as failure:
        timer.time_interleaved({"fine": lambda: None, "broken": lambda: 1 / 0})
    assert failure.value.name == "broken"
    assert isinstance(failure.value.error, ZeroDivisionError)
    with pytest.raises(ZeroDivisionError):  # time() of one call raises the call's own error
        timer.time(lambda: 1 / 0)


def test_noise_flag():
    # Six sorted samples: p20 is the 2nd, p80 the 5th, the median the mean of the 3rd and 4th.
    wide = Timing([1.2, 0.9, 1.0, 1.0, 1.07, 0.95])
    assert wide.spread == pytest.approx((1.07 - 0.95) / 1.0)  # 12%
    narrow = Timing([0.9, 0.96, 1.0, 1.0, 1.04, 1.2])
    assert narrow.spread == pytest.approx((1.04 - 0.96) / 1.0)  # 8%
    assert NOISE_THRESHOLD == 0.10 and wide.noisy and not narrow.noisy

    def row(provider: str, timing: Timing, shape=(4, 8, 4, 4)) -> Row:
        return Row(provider=provider, family="bn", shape=Shape(shape), dtype="float32",
                   layout="nchw", mode="fwd-bwd", status="ok", impl="test", timing=timing,
                   bytes=1000)

    def scaled(timing: Timing, factor: float) -> Timing:
        return Timing([sample * factor for sample in timing.samples_ms])

    noisy_case = [row("torch", wide), row("reference-bn", scaled(narrow, 2.0))]
    steady_case = [row("torch", narrow, (8, 8, 4, 4)),
                   row("reference-bn", scaled(narrow, 4.0), (8, 8, 4, 4))]
    rows = noisy_case + steady_case
    add_speedups(rows)
    torch_row, reference_row = noisy_case
    assert reference_row.speedup["torch"] == pytest.approx(1.0 / 2.0)
    assert reference_row.noisy_speedup["torch"]  # the baseline is noisy
    assert torch_row.noisy_speedup["torch"] is False  # its own 1.00x is exact
    assert steady_case[1].speedup["torch"] == pytest.approx(0.25)
    assert steady_case[1].noisy_speedup["torch"] is False
    assert reference_row.noisy_speedup["cudnn"] is None  # no cudnn row
    document = reference_row.to_dict()
    assert document["noisy"] is False and document["speedup_vs_torch_noisy"] is True
    assert torch_row.to_dict()["noisy"] is True

    table = kernel_table(rows)
    assert "0.50x?" in table and "0.25x?" not in table and "0.25x" in table
    assert "12% noisy" in table and " 8%" in table and "8% noisy" not in table
    assert "noisy: p20-p80 wider than 10% of the median" in table
    assert "noisy:" not in kernel_table(steady_case)


def test_cpu_threads_default_and_restored(tmp_path):
    """One thread on CPU unless --threads says otherwise, recorded in the JSON; main() leaves
    PyTorch's thread count as it found it."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        for extra, threads in (([], 1), (["--threads", "2"], 2)):
            out = tmp_path / "out.json"
            assert main(["--device", "cpu", "--mode", "eval-fwd", "--layout", "nchw",
                         "--providers", "torch", "--budget-ms", "1", "--json", str(out),
                         "--no-progress", *extra]) == 0
            env = json.loads(out.read_text())["environment"]
            assert env["cpu_threads"] == threads
            assert ("--threads" in env["cpu_threads_set_by"]) == bool(extra)
            assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert CPU_SETTINGS.budget_ms == 50.0  # --budget-ms changed that run's timer only


def test_dbn_state_differs_from_plain_batch_norm():
    """The DBN providers are checked at a_k = 0.25 (not the k = 1 step, which is plain BN): the
    plain providers' answer must fail the DBN check."""
    from dbn_kernels.benchmark.cases import compare, expected_outputs, make_inputs

    inputs = make_inputs(Shape((4, 8, 4, 4)), torch.float32, "nchw", torch.device("cpu"), 1)
    plain = expected_outputs(inputs, "bn", "train-fwd")
    dbn = expected_outputs(inputs, "dbn", "train-fwd")
    assert not compare({**dbn, "y": plain["y"]}, dbn, torch.float32).ok


def test_byte_model_and_resnet50_shapes():
    shape = Shape((64, 256, 56, 56))
    assert bytes_moved(shape, torch.bfloat16, "train-fwd") == 3 * shape.numel * 2
    assert bytes_moved(shape, torch.float32, "bwd") == 5 * shape.numel * 4
    assert bytes_moved(shape, torch.float32, "fwd-bwd") == 8 * shape.numel * 4
    shapes = resnet50_shapes(64)
    assert sum(s.count for s in shapes) == 53  # batch-norm layers of ResNet-50
    assert len(shapes) == 12
    assert shapes[0].dims == (64, 64, 112, 112)
    assert {s.dims for s in resnet50_shapes(8)} >= {(8, 2048, 7, 7), (8, 256, 56, 56)}


def test_percentile():
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert percentile([1.0, 2.0], 0.2) == pytest.approx(1.2)


def test_model_resnet50_tiny(tmp_path):
    # Batch 4, not 2: at 32 px the last stage is 1x1, and with M = 2 values per channel DBN's
    # averaged statistics do not bound the activations, so repeated SGD steps on one batch can
    # legitimately diverge (plain BN pins them to +-1 there).
    out = tmp_path / "model.json"
    assert main(["--model", "resnet50", "--batch", "4", "--image-size", "32", "--json", str(out),
                 "--providers", "torch,reference-bn,reference-dbn",
                 "--no-progress"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {row["provider"] for row in rows} == {"torch", "reference-bn", "reference-dbn"}
    for row in rows:
        assert row["status"] == "ok"
        assert row["images_per_s"] > 0 and math.isfinite(row["final_loss"])


@pytest.mark.gpu
def test_quick_suite_on_gpu(tmp_path):
    out = tmp_path / "out.json"
    # A small budget: this checks the rows, not the speed (with the default the suite ran past
    # 50 s beside three other test workers on an H200).
    rc = main(["--suite", "quick", "--device", "cuda", "--json", str(out), "--no-progress",
               "--budget-ms", "5",
               "--providers", "reference-bn,reference-dbn,torch,cudnn,cuda-bn,triton-bn"])
    document = json.loads(out.read_text())
    timed = check_document(document) if rc == 0 else []
    assert rc == 0, [r["reason"] for r in document["rows"] if r["status"] == "failed"]
    assert {row["impl"] for row in timed if row["provider"] == "torch"} <= {"cudnn", "native"}
    assert any(row["provider"] == "cudnn" for row in timed)


# ---- the fused epilogue (--epilogue) and the fused model variant --------------------------------

def test_epilogue_rows_are_checked_and_labelled(tmp_path):
    out, table = tmp_path / "out.json", tmp_path / "out.csv"
    assert main(["--shapes", "4x8x4x4", "--layout", "nchw", "--epilogue", "relu,add-relu",
                 "--providers", "reference-bn,reference-dbn,torch", "--budget-ms", "2",
                 "--json", str(out), "--csv", str(table), "--no-progress"]) == 0
    document = json.loads(out.read_text())
    timed = check_document(document)  # the correctness gate passed for every row
    assert document["epilogues"] == ["relu", "add-relu"]
    assert document["byte_model"]["fwd-bwd+add-relu"] == "8R+3W"
    rows = document["rows"]
    assert len(timed) == len(rows) == 4 * 2 * 3  # modes x epilogues x providers
    shape = Shape((4, 8, 4, 4))
    for row in rows:
        assert row["epilogue"] in ("relu", "add-relu")
        assert row["bytes"] == bytes_moved(shape, torch.float32, row["mode"], row["epilogue"])
        assert row["speedup_vs_torch"] > 0  # compared with torch on the same epilogue
    assert {(row["mode"], row["epilogue"]) for row in rows} == {
        (mode, epilogue) for mode in MODES for epilogue in ("relu", "add-relu")}
    assert "epilogue" in table.read_text().splitlines()[0].split(",")


def test_default_epilogue_is_none(tmp_path):
    out = tmp_path / "out.json"
    assert main(["--shapes", "4x8x4x4", "--layout", "nchw", "--mode", "train-fwd",
                 "--providers", "torch", "--budget-ms", "1", "--json", str(out),
                 "--no-progress"]) == 0
    document = json.loads(out.read_text())
    assert document["epilogues"] == ["none"]
    assert [row["epilogue"] for row in document["rows"]] == ["none"]
    assert document["byte_model"] == {mode: f"{r}R+{w}W" for mode, (r, w) in MODES.items()}


def test_epilogue_usage_errors(capsys):
    assert main(["--epilogue", "gelu", "--no-progress"]) == 2
    assert "unknown epilogue gelu" in capsys.readouterr().err
    assert main(["--model", "resnet50", "--epilogue", "relu", "--no-progress"]) == 2
    assert "--epilogue applies to the kernel suites" in capsys.readouterr().err


def test_epilogue_expected_outputs_and_gate():
    from dbn_kernels.benchmark.cases import expected_outputs, make_inputs

    shape = Shape((4, 8, 4, 4))
    inputs = make_inputs(shape, torch.float32, "nhwc", torch.device("cpu"), seed=3)
    assert inputs.residual.dtype == inputs.x.dtype and inputs.residual.shape == inputs.x.shape
    assert inputs.residual.is_contiguous(memory_format=torch.channels_last)
    plain = expected_outputs(inputs, "bn", "fwd-bwd")
    relu = expected_outputs(inputs.with_epilogue("relu"), "bn", "fwd-bwd")
    add_relu = expected_outputs(inputs.with_epilogue("add-relu"), "bn", "fwd-bwd")
    assert "dresidual" not in plain and "dresidual" not in relu
    torch.testing.assert_close(relu["y"], torch.relu(plain["y"]))
    y = torch.relu(plain["y"] + inputs.residual.double())
    torch.testing.assert_close(add_relu["y"], y)
    torch.testing.assert_close(add_relu["dresidual"],
                               torch.where(y > 0, inputs.dy.double(), torch.zeros_like(y)))
    assert 0.2 < float((y > 0).double().mean()) < 0.8  # the mask is neither all nor nothing
    for name in ("running_mean", "running_var"):  # the statistics do not see the epilogue
        torch.testing.assert_close(add_relu[name], plain[name])

    # A provider that ignores the epilogue fails the gate, and cuDNN declines it.
    torch_eager = next(p for p in all_providers() if p.name == "torch")
    cudnn = next(p for p in all_providers() if p.name == "cudnn")

    def ignores_epilogue(inputs, mode):
        return torch_eager.setup(inputs.with_epilogue("none"), mode)

    timer = Timer(torch.device("cpu"), TimerSettings(0.0, 1.0, 3, 3))
    rows = run_benchmark([shape], ["float32"], ["nchw"], ["fwd-bwd"],
                         [torch_eager, _broken("plain", ignores_epilogue)], torch.device("cpu"),
                         timer, epilogues=["none", "add-relu"])
    by_key = {(row.provider, row.epilogue): row for row in rows}
    assert by_key[("plain", "none")].status == "ok"
    assert by_key[("torch", "add-relu")].status == "ok"
    failed = by_key[("plain", "add-relu")]
    assert failed.status == "failed" and "wrong result" in failed.reason
    assert "epilogue" in kernel_table(rows) and "add-relu" in kernel_table(rows)
    with pytest.raises(Unsupported, match="epilogue relu"):
        cudnn.setup(inputs.with_epilogue("relu"), "fwd-bwd")


def test_byte_floors_per_epilogue():
    from dbn_kernels.benchmark.shapes import EPILOGUES, traffic

    assert set(EPILOGUES) == {"none", "relu", "add-relu"}
    for mode in MODES:  # none is the model as it was
        assert traffic(mode) == traffic(mode, "none") == MODES[mode]
    assert traffic("train-fwd", "relu") == (2, 1)
    assert traffic("eval-fwd", "relu") == (1, 1)
    assert traffic("bwd", "relu") == (5, 1)
    assert traffic("fwd-bwd", "relu") == (7, 2)
    assert traffic("train-fwd", "add-relu") == (3, 1)
    assert traffic("eval-fwd", "add-relu") == (2, 1)
    assert traffic("bwd", "add-relu") == (5, 2)
    assert traffic("fwd-bwd", "add-relu") == (8, 3)
    shape = Shape((64, 256, 56, 56))
    assert bytes_moved(shape, torch.bfloat16, "fwd-bwd", "add-relu") == 11 * shape.numel * 2
    assert bytes_moved(shape, torch.float32, "bwd", "relu") == 6 * shape.numel * 4


def test_gpu_check_plan_counts_epilogues():
    from dbn_kernels.benchmark.gpu_check_plan import Stage, estimate

    base = ["--suite", "quick", "--dtype", "float32", "--layout", "nhwc", "--mode", "fwd-bwd",
            "--providers", "cuda-bn,torch"]
    plain = Stage("k", 600, "required", "dbn-bench", base)
    fused = Stage("k", 600, "required", "dbn-bench", [*base, "--epilogue", "none,relu,add-relu"])
    estimate(plain)
    estimate(fused)
    assert plain.cases == 3 * 2 and fused.cases == 3 * 3 * 2
    assert "3 epilogues" in fused.breakdown and "epilogue" not in plain.breakdown
    assert fused.estimate_s > plain.estimate_s
    model = Stage("m", 600, "required", "dbn-bench",
                  ["--model", "resnet50", "--dtype", "bfloat16", "--layout", "nhwc", "--batch",
                   "64", "--providers", "torch,cuda-bn,cuda-bn-fused"])
    estimate(model)
    assert model.cases == 3


def test_model_variants_include_fused():
    from dbn_kernels.benchmark.e2e import _variant_model, model_variants, provider_of_variant
    from dbn_kernels.benchmark.resnet import ResNet50

    names = ["reference-bn", "reference-dbn", "torch", "cudnn", "torch-compile"]
    assert model_variants(names) == ["reference-bn", "reference-bn-fused", "reference-dbn",
                                     "reference-dbn-fused", "torch"]
    assert model_variants(names, ["torch", "reference-dbn-fused"]) == [
        "reference-dbn-fused", "torch"]
    assert provider_of_variant("cuda-dbn-fused") == "cuda-dbn"
    assert provider_of_variant("torch") == "torch"
    model = _variant_model(ResNet50(num_classes=10), "reference-dbn-fused")
    assert isinstance(model, torch.fx.GraphModule)
    fused = [name for name, what in model.fusions.items() if what in ("relu", "residual+relu")]
    assert len(fused) == 1 + 16 * 2 + 16  # stem; two per bottleneck; the residual add per block


def test_model_resnet50_fused_tiny(tmp_path):
    out = tmp_path / "model.json"
    assert main(["--model", "resnet50", "--batch", "4", "--image-size", "32", "--json", str(out),
                 "--providers", "torch,reference-bn-fused", "--no-progress"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {row["provider"] for row in rows} == {"torch", "reference-bn-fused"}
    for row in rows:
        assert row["status"] == "ok", row["reason"]
        assert row["images_per_s"] > 0 and math.isfinite(row["final_loss"])
