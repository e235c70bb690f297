"""Smoke tests of the synchronisation benchmark (``dbn-bench --sync-world N``) on CPU with gloo.

The run starts two real ranks: a broken rendezvous, a rank that raises or a sync layer that does
not synchronise makes the command fail, and missing rows fail the checks below.
"""

import json
import math

import pytest
import torch

from dbn_kernels.benchmark.cli import main
from dbn_kernels.benchmark.sync import KINDS

ROW_FIELDS = ("shape", "kind", "dtype", "stat_dtype", "backend", "local_ms", "sync_ms",
              "overhead_ms", "overhead_pct", "collective_ms", "gathered_bytes", "reps", "spread",
              "noisy", "samples_ms")
SHAPE = (4, 8, 6, 6)
REPS = 3


@pytest.mark.timeout(120)
def test_two_ranks_on_cpu(tmp_path, capsys):
    out = tmp_path / "sync.json"
    rc = main(["--sync-world", "2", "--device", "cpu", "--shapes", "x".join(map(str, SHAPE)),
               "--dtype", "float32", "--reps", str(REPS), "--warmup", "1", "--json", str(out)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "collective ms (2 calls)" in printed.out

    document = json.loads(out.read_text())
    assert document["benchmark"] == "sync"
    assert document["world_size"] == 2 and document["device"] == "cpu"
    assert document["process_group_backend"] == "gloo" and document["backend"] == "auto"
    assert document["environment"]["torch"] == torch.__version__
    assert document["settings"]["reps"] == REPS

    rows = document["rows"]
    assert sorted(row["kind"] for row in rows) == sorted(KINDS)  # one row per kind, both there
    for row in rows:
        for field in ROW_FIELDS:
            assert field in row, field
        assert tuple(row["shape"]) == SHAPE and row["dtype"] == "float32"
        assert row["stat_dtype"] == "float32" and row["backend"] == "reference"
        for key in ("local_ms", "sync_ms", "collective_ms"):
            assert math.isfinite(row[key]) and row[key] > 0, key
        assert row["overhead_ms"] == pytest.approx(row["sync_ms"] - row["local_ms"])
        assert row["overhead_pct"] == pytest.approx(100 * row["overhead_ms"] / row["local_ms"])
        assert row["gathered_bytes"] == 2 * 3 * SHAPE[1] * 4  # world x (3, C) float32
        for call in ("local", "sync", "collective"):
            samples = row["samples_ms"][call]
            assert len(samples) == REPS and all(s > 0 for s in samples)
            assert samples[0] <= row[f"{call}_ms"] <= samples[-1]


def test_too_few_gpus_names_how_many(capsys):
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    world = max(2, found + 1)  # always more ranks than GPUs
    assert main(["--sync-world", str(world), "--device", "cuda"]) == 2
    assert f"found {found}" in capsys.readouterr().err


def test_usage_errors(capsys):
    assert main(["--sync-world", "1", "--device", "cpu"]) == 2
    assert main(["--sync-world", "2", "--device", "cpu", "--dtype", "int8"]) == 2
    assert main(["--sync-world", "2", "--device", "cpu", "--kinds", "ln"]) == 2
    err = capsys.readouterr().err
    assert "at least 2" in err and "int8" in err and "ln" in err
