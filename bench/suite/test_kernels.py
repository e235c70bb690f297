"""pytest-benchmark suite over the same providers, shapes and checks as ``dbn-bench``.

Not part of the CI run (pytest's ``testpaths`` is ``tests/``); run it explicitly, e.g.

    pytest bench/suite/ --benchmark-only --benchmark-save=h100 -k "resnet or quick"
    pytest bench/suite/ --benchmark-only --benchmark-compare  # against the last saved run

``DBN_BENCH_SUITE`` (quick | resnet50 | sweep, default quick) and ``DBN_BENCH_DTYPE`` (default
float32) choose the cases. pytest-benchmark times with the host clock, so each call is followed by
a device synchronisation and there is no L2 flush: use it to track regressions between commits,
and ``dbn-bench`` (CUDA events, L2 flush, byte model) for the numbers that are reported.
"""

import os
import zlib

import pytest
import torch

from dbn_kernels.benchmark.cases import compare, expected_outputs, make_inputs
from dbn_kernels.benchmark.providers import Unsupported, all_providers
from dbn_kernels.benchmark.shapes import DTYPES, LAYOUTS, MODES, bytes_moved, suite_shapes

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SUITE = os.environ.get("DBN_BENCH_SUITE", "quick")
DTYPE = os.environ.get("DBN_BENCH_DTYPE", "float32")


@pytest.mark.parametrize("provider", all_providers(), ids=lambda p: p.name)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", suite_shapes(SUITE), ids=lambda s: s.label)
def test_kernel(benchmark, shape, layout, mode, provider):
    reason = provider.unavailable(DEVICE)
    if reason is None and DEVICE.type == "cpu":
        reason = provider.opt_in_on_cpu
    if reason:
        pytest.skip(reason)
    dtype = DTYPES[DTYPE]
    seed = zlib.crc32(f"{shape.label}-{layout}".encode())  # stable across processes
    inputs = make_inputs(shape, dtype, layout, DEVICE, seed)
    try:
        call = provider.setup(inputs, mode)
    except Unsupported as exc:
        pytest.skip(str(exc))
    check = compare(call(), expected_outputs(inputs, provider.family, mode), dtype)
    assert check.ok, check.message  # never time a wrong result

    if DEVICE.type == "cuda":
        def timed():
            call()
            torch.cuda.synchronize(DEVICE)
    else:
        timed = call
    benchmark.extra_info.update(provider=provider.name, shape=list(shape.dims), dtype=DTYPE,
                                layout=layout, mode=mode, device=str(DEVICE),
                                bytes=bytes_moved(shape, dtype, mode),
                                max_rel_err=check.max_rel_err)
    benchmark(timed)
    if benchmark.stats is not None:  # None under --benchmark-disable (a plain run of the checks)
        median_s = benchmark.stats.stats.median
        benchmark.extra_info["gbps"] = benchmark.extra_info["bytes"] / median_s / 1e9
