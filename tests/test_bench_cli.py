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
from dbn_kernels.benchmark.oracle import CaseInputs
from dbn_kernels.benchmark.providers import Provider, Unsupported, all_providers
from dbn_kernels.benchmark.runner import run_benchmark
from dbn_kernels.benchmark.shapes import (DTYPES, LAYOUTS, MODES, Shape, bytes_moved,
                                          resnet50_shapes)
from dbn_kernels.benchmark.timing import Timer, TimerSettings, percentile

# One CPU thread: CI machines are small and shared, and PyTorch's multi-threaded CPU kernels stall
# (tens of ms per call) when another process holds the other core.
THREADS = ["--threads", "1"]
REQUIRED = ("provider", "shape", "dtype", "layout", "mode", "median_ms", "gbps")
GPU_ONLY = {"cuda-bn", "cuda-dbn", "triton-bn", "triton-dbn", "cudnn"}


def check_document(document: dict) -> list[dict]:
    """The rows of a kernel-suite JSON are well formed; returns the timed ones."""
    assert document["environment"]["torch"] == torch.__version__
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
    return timed


def test_quick_suite_json_and_csv(tmp_path):
    out, table = tmp_path / "out.json", tmp_path / "out.csv"
    assert main(["--suite", "quick", "--json", str(out), "--csv", str(table),
                 "--no-progress", *THREADS]) == 0
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
         "--json", str(out), *THREADS], capture_output=True, text=True, timeout=300)
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
                 "--no-progress", *THREADS]) == 0
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

    def off_by_one_percent(inputs: CaseInputs, mode: str):
        call = torch_eager.setup(inputs, mode)
        return lambda: {name: t * 1.01 for name, t in call().items()}

    def raises(inputs, mode):
        raise RuntimeError("kernel exploded")

    def rejects(inputs, mode):
        raise Unsupported("not this case")

    providers = [torch_eager, _broken("wrong", off_by_one_percent), _broken("error", raises),
                 _broken("rejects", rejects)]
    timer = Timer(torch.device("cpu"), TimerSettings(0.0, 1.0, 3, 3))
    rows = run_benchmark([Shape((4, 8, 4, 4))], ["float32"], ["nchw"], ["train-fwd", "bwd"],
                         providers, torch.device("cpu"), timer)
    by_name = {(row.provider, row.mode): row for row in rows}
    for mode in ("train-fwd", "bwd"):
        assert by_name[("torch", mode)].status == "ok"
        wrong = by_name[("wrong", mode)]
        assert wrong.status == "failed" and wrong.timing is None
        assert "wrong result" in wrong.reason and wrong.max_rel_err > 1e-3
        assert by_name[("error", mode)].status == "failed"
        assert "kernel exploded" in by_name[("error", mode)].reason
        assert by_name[("rejects", mode)].status == "skipped"
        assert by_name[("rejects", mode)].reason == "not this case"


def test_dbn_state_differs_from_plain_batch_norm():
    """The DBN providers are checked at a_k = 0.25 (not the k = 1 step, which is plain BN): the
    plain providers' answer must fail the DBN check."""
    from dbn_kernels.benchmark.oracle import compare, expected_outputs, make_inputs

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
                 "--providers", "torch,reference-bn,reference-dbn", "--no-progress",
                 *THREADS]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {row["provider"] for row in rows} == {"torch", "reference-bn", "reference-dbn"}
    for row in rows:
        assert row["status"] == "ok"
        assert row["images_per_s"] > 0 and math.isfinite(row["final_loss"])


@pytest.mark.gpu
def test_quick_suite_on_gpu(tmp_path):
    out = tmp_path / "out.json"
    rc = main(["--suite", "quick", "--device", "cuda", "--json", str(out), "--no-progress",
               "--providers", "reference-bn,reference-dbn,torch,cudnn,cuda-bn,triton-bn"])
    document = json.loads(out.read_text())
    timed = check_document(document) if rc == 0 else []
    assert rc == 0, [r["reason"] for r in document["rows"] if r["status"] == "failed"]
    assert {row["impl"] for row in timed if row["provider"] == "torch"} <= {"cudnn", "native"}
    assert any(row["provider"] == "cudnn" for row in timed)
