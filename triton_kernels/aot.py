"""Compile every kernel variant for a GPU architecture, ahead of time and without a GPU.

The interpreter (what CI runs the kernels with) executes Python, not the compiler: a kernel can
pass every interpreter test and still fail to compile. This module runs Triton's real compiler
(down to a cubin, with the ptxas Triton ships) on each combination of the kernels' switches that
the launchers use, with block sizes from the launch planner, and can report each variant's
registers and how wide its global loads and stores are.

    python -m dbn_kernels.triton_kernels.aot --arch 90 --report

Must run without TRITON_INTERPRET (the kernels have to be JIT functions, not interpreted ones).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class Variant:
    kernel: object
    args: dict  # name -> "*fp32" (pointer), "i32", "fp32", or an int (specialised like the JIT)
    constexprs: dict
    num_warps: int

    def describe(self) -> str:
        flags = ",".join(f"{k}={v}" for k, v in self.constexprs.items())
        ptrs = ",".join(v[1:] for v in self.args.values() if isinstance(v, str) and v[0] == "*")
        return f"{self.kernel.__name__}[{ptrs}]({flags})"


def _modules():
    return tuple(importlib.import_module(f"dbn_kernels.triton_kernels.{name}")
                 for name in ("forward", "backward", "merge", "launch"))


def variants():
    """The kernel variants the launchers can produce (switch combinations), sized by the planner
    for a representative input per layout (divisible by 16, as the JIT would specialise)."""
    fwd, bwd, merge, launch = _modules()
    device = torch.device("cpu")
    geos = [launch.Geometry(32, 64, 28 * 28, False), launch.Geometry(32, 64, 28 * 28, True)]
    out = []
    for geo, dtype, int64 in itertools.product(geos, _DTYPES, (False, True)):
        dt = "*" + _DTYPES[dtype]
        es = dtype.itemsize
        rp = launch.reduce_plan(geo, es, device)
        ep = launch.elementwise_plan(geo, es)
        layout = {"CHANNELS_LAST": geo.channels_last, "ALIGN": geo.align, "INT64": int64}
        shape = {"C": geo.C, "S": geo.S}
        reduce_args = {**shape, "M": geo.M, "s_blocks": rp.s_blocks, "tiles": rp.tiles,
                       "tiles_per_split": rp.tiles_per_split}
        stats_args = {**reduce_args, "full_tiles": rp.full_tiles}
        reduce_blocks = {"BLOCK_C": rp.block_c, "BLOCK_R": rp.block_r}
        ew_args = {**shape, "extent_a": ep.extent_a, "b_blocks": ep.b_blocks}
        ew_blocks = {"BLOCK_A": ep.block_a, "BLOCK_B": ep.block_b, "EMULATE_RTNE": False}
        for bump in (True, False):
            out.append(Variant(fwd.collect_stats_kernel,
                               {"x_ptr": dt, "stack_ptr": "*fp32", "counter_ptr": "*i64",
                                **stats_args},
                               {**reduce_blocks, **layout, "BUMP_COUNTER": bump}, rp.num_warps))
        # the fused epilogue: (residual, relu), each switch on its own and both
        for residual, relu in itertools.product((False, True), repeat=2):
            epilogue = {"HAS_RESIDUAL": residual, "RELU": relu}
            out.append(Variant(fwd.normalize_kernel,
                               {"x_ptr": dt, "y_ptr": dt, "coef_ptr": "*fp32", "residual_ptr": dt,
                                **ew_args}, {**ew_blocks, **layout, **epilogue}, ep.num_warps))
            for spread_is_std, affine in itertools.product((True, False), (True, False)):
                out.append(Variant(fwd.eval_normalize_kernel,
                                   {"x_ptr": dt, "y_ptr": dt, "mean_ptr": dt,
                                    "spread_ptr": "*fp32", "weight_ptr": "*fp32", "bias_ptr": dt,
                                    "invstd_ptr": "*fp32", "residual_ptr": dt, "eps": 1e-5,
                                    **ew_args},
                                   {**ew_blocks, **layout, "SPREAD_IS_STD": spread_is_std,
                                    "HAS_WEIGHT": affine, "HAS_BIAS": affine, **epilogue},
                                   ep.num_warps))
        for relu_output in (False, True):
            out.append(Variant(bwd.backward_reduce_kernel,
                               {"dy_ptr": dt, "x_ptr": dt, "mean_ptr": "*fp32",
                                "relu_output_ptr": dt, "stack_ptr": "*fp32", **reduce_args},
                               {**reduce_blocks, **layout, "HAS_RELU_OUTPUT": relu_output},
                               rp.num_warps))
        # (input_grad, grad_through_stats) as the dx coefficients' rows 4, 1, 0, crossed with
        # the ReLU mask and the residual's gradient (written only after a ReLU); 0 rows only
        # when the pass writes the residual's gradient alone.
        for (input_grad, gts), (relu_output, residual_grad) in itertools.product(
                ((True, True), (True, False), (False, False)),
                ((False, False), (True, False), (True, True))):
            if not input_grad and not residual_grad:
                continue
            out.append(Variant(bwd.backward_dx_kernel,
                               {"dy_ptr": dt, "x_ptr": dt, "dx_ptr": dt, "coef_ptr": "*fp32",
                                "relu_output_ptr": dt, "grad_residual_ptr": dt, **ew_args},
                               {**ew_blocks, **layout, "INPUT_GRAD": input_grad,
                                "GRAD_THROUGH_STATS": gts, "HAS_RELU_OUTPUT": relu_output,
                                "RESIDUAL_GRAD": residual_grad},
                               ep.num_warps))

    fin = launch.finalize_plan(64, 37)
    fin_blocks = {"BLOCK_C": fin.block_c, "BLOCK_SPLIT": fin.block_split}
    # (counter, dbn, running, cumulative, weight, bias, normalize_with_batch): DBN layer, plain
    # BN with momentum, plain BN cumulative, DBN without running stats, no buffers at all, DBN
    # layer normalizing with the batch statistics.
    switches = [(True, True, True, False, True, True, False),
                (True, False, True, False, True, False, False),
                (True, False, True, True, False, True, False),
                (True, True, False, False, False, False, False),
                (False, False, False, False, True, True, False),
                (True, True, True, False, True, True, True)]
    for (counter, dbn, running, cumulative, weight, bias, normalize_with_batch), buf in (
            itertools.product(switches, ("*fp32", "*bf16"))):
        out.append(Variant(
            fwd.finalize_kernel,
            {"stack_ptr": "*fp32", "sources": 37, "C": 64, "counter_ptr": "*i64",
             "dbn_mean_ptr": buf, "dbn_std_ptr": buf, "running_mean_ptr": buf,
             "running_var_ptr": buf, "weight_ptr": buf, "bias_ptr": buf,
             **{name: "*fp32" for name in ("mean_ptr", "invstd_ptr", "batch_mean_ptr",
                                           "batch_invstd_ptr", "alpha_ptr", "coef_ptr")},
             "momentum": 0.1, "eps": 1e-5, "alpha_scale": 1.0,
             "alpha_power": 1.0, "alpha_offset": 0.0},
            {"HAS_COUNTER": counter, "HAS_DBN": dbn, "HAS_RUNNING": running,
             "CUMULATIVE": cumulative, "HAS_WEIGHT": weight, "HAS_BIAS": bias,
             "NORMALIZE_WITH_BATCH": normalize_with_batch, **fin_blocks, "EMULATE_RTNE": False},
            fin.num_warps))
    for weight, input_grad, gts in itertools.product((True, False), repeat=3):
        out.append(Variant(
            bwd.backward_finalize_kernel,
            {"stack_ptr": "*fp32", "sources": 37, "C": 64, "weight_ptr": "*bf16",
             **{name: "*fp32" for name in ("invstd_ptr", "batch_mean_ptr", "batch_invstd_ptr",
                                           "alpha_ptr", "grad_weight_ptr", "grad_bias_ptr",
                                           "coef_ptr")}},
            {"HAS_WEIGHT": weight, "INPUT_GRAD": input_grad, "GRAD_THROUGH_STATS": gts,
             **fin_blocks}, fin.num_warps))
    for stats in (True, False):
        out.append(Variant(merge.merge_kernel,
                           {"stack_ptr": "*fp32", "sources": 37, "C": 64, "out_ptr": "*fp32"},
                           {"STATS": stats, **fin_blocks}, fin.num_warps))
    return out


def compile_variant(v: Variant, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = v.kernel
    signature, attrs, constexprs = {}, {}, dict(v.constexprs)
    for i, name in enumerate(fn.arg_names):
        if name in v.constexprs:
            signature[name] = "constexpr"
            continue
        value = v.args[name]
        if isinstance(value, str):
            signature[name] = value
            if value.startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:  # the JIT turns integer arguments equal to 1 into constants
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": v.num_warps})


def report(kernel) -> str:
    """Registers (from the cubin, when cuobjdump is at hand) and global access widths (PTX)."""
    ptx = kernel.asm["ptx"]
    widths = []
    for op in ("ld", "st"):
        found = re.findall(rf"{op}\.global(?:\.[a-z0-9_]+)*?(?:\.v(\d))?\.[bfu](\d+) ", ptx)
        counts = {}
        for vec, bits in found:
            key = f"{int(vec or 1) * int(bits) // 8}B"
            counts[key] = counts.get(key, 0) + 1
        widths.append(f"{op}:" + ",".join(f"{n}x{k}" for k, n in sorted(counts.items())))
    regs = "?"
    try:
        from triton.backends.nvidia import driver  # noqa: F401  (locates the bundled tools)
        import os

        import triton.backends.nvidia as nv
        tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            dump = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                                  text=True).stdout
        m = re.search(r"REG:(\d+)", dump)
        regs = m.group(1) if m else "?"
    except Exception:  # pragma: no cover - reporting only
        pass
    return f"regs={regs} {' '.join(widths)}"


def _probe_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def probe(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1.0, mask=offs < n)

    return Variant(probe, {"x_ptr": "*fp32", "n": 7}, {"BLOCK": 16}, 1)


API_MISMATCH = 2
"""Exit status when even a trivial kernel does not compile this way: this Triton's
ahead-of-time API differs from what this module knows, which says nothing about our kernels."""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90])
    parser.add_argument("--report", action="store_true", help="registers and access widths")
    args = parser.parse_args(argv)
    import dbn_kernels.triton_kernels  # noqa: F401

    try:
        compile_variant(_probe_kernel(), args.arch[0])
    except Exception as exc:
        print(f"cannot compile a trivial kernel ahead of time: {type(exc).__name__}: {exc}")
        return API_MISMATCH
    failures = 0
    for arch in args.arch:
        for v in variants():
            try:
                kernel = compile_variant(v, arch)
            except Exception as exc:
                failures += 1
                print(f"sm_{arch} FAILED {v.describe()}: {type(exc).__name__}: {exc}")
                continue
            if args.report:
                print(f"sm_{arch} {v.describe()} {report(kernel)}")
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
