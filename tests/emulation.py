"""The CPU emulation of the cuda backend: ``dbn::emu_*``, the same host code and the same kernels
as ``dbn::cuda_*`` (csrc/) compiled as host C++ (csrc/emulation), every CUDA thread a fiber on one host thread.

``build_emulation(build_dir)`` defines the ``emu`` ops from ``dbn_kernels.ops`` and the test hooks,
then builds and loads the emulation; the ops then take CPU tensors. The hooks:

* ``last_plan()``: [reduction width, element-wise width, element-wise across] of the last launch
  of each kind;
* ``launches()``: kernel launches so far (every ``DBN_LAUNCH``), to count launches per op;
* ``torch.ops.dbn.emu_divergent_barrier()``: a kernel whose barrier one thread never reaches,
  which the emulation must refuse (RuntimeError) rather than hang on.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dbn_kernels import _extension, ops

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "emu"
HOOK_SCHEMAS = {"last_plan": "() -> int[]", "launches": "() -> int",
                "divergent_barrier": "() -> ()"}


class CannotBuild(RuntimeError):
    """No usable host compiler here: nothing to emulate with."""


def define_hooks() -> None:
    for entry, schema in HOOK_SCHEMAS.items():
        name = ops.qualname(PREFIX, entry)
        try:
            torch._C._dispatch_find_schema_or_throw(name, "")
        except RuntimeError:
            torch.library.define(name, schema)


def build_emulation(build_dir: str | os.PathLike) -> str:
    """Define the emu ops and hooks, build csrc/emulation/emulate.cpp into ``build_dir`` and load
    it; returns the op prefix, ``"emu"``.

    ``build_dir`` is private to the caller: torch's shared extensions directory is guarded by a
    lock file that a run killed mid-build leaves behind, and every later run would wait on it
    forever. The host compiler is the one the extension's own build would pick (not one that
    links its own copy of the C++ runtime, which crashes in torch's process the first time it
    formats an error). ``CannotBuild`` when there is no usable one."""
    from torch.utils import cpp_extension

    ops.define_schemas(PREFIX)
    define_hooks()
    try:
        compilers, _ = _extension.host_compilers()
    except RuntimeError as exc:
        raise CannotBuild(str(exc)) from exc
    saved = {name: os.environ.get(name) for name in compilers}
    os.environ.update(compilers)
    try:
        cpp_extension.load(
            name="dbn_kernels_emulation",
            sources=[str(ROOT / "csrc" / "emulation" / "emulate.cpp")],
            extra_cflags=["-DDBN_EMULATION", "-O2", "-Wno-unknown-pragmas"],
            build_directory=str(build_dir),
            is_python_module=False, verbose=False)
    except OSError as exc:  # FileNotFoundError: no compiler at all
        raise CannotBuild(str(exc)) from exc
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return PREFIX


def last_plan() -> list[int]:
    return list(torch.ops.dbn.emu_last_plan())


def launches() -> int:
    return int(torch.ops.dbn.emu_launches())
