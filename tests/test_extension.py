"""The CUDA extension's build and registration (CPU tests: no GPU needed).

When dbn_kernels._C is built (CI builds it for sm_80 and sm_90): it imports and registers a CUDA
kernel for every dbn::cuda_* op, whose schemas and fakes come from ``ops.SCHEMAS``. When it is
not, or is stale (built from older sources): ``import dbn_kernels`` still works and
``backend="cuda"`` raises a ``RuntimeError`` saying why and how to fix it.

With DBN_KERNELS_REQUIRE_CUDA_BUILD=1 (CI) a missing extension fails here instead of skipping.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import dbn_kernels as dbn
from dbn_kernels import _extension, backends, ops

ROOT = Path(__file__).resolve().parents[1]
BUILT = importlib.util.find_spec("dbn_kernels._C") is not None
REQUIRED = os.environ.get("DBN_KERNELS_REQUIRE_CUDA_BUILD", "0") == "1"


@pytest.fixture
def built():
    if not BUILT:
        if REQUIRED:
            pytest.fail("DBN_KERNELS_REQUIRE_CUDA_BUILD=1 but dbn_kernels._C is not built")
        pytest.skip("dbn_kernels._C is not built in this install")
    reason = _extension.load()
    assert reason is None, reason


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env}, cwd=tempfile.gettempdir())


def _tree_cpu_s(pid: int) -> float | None:
    """CPU seconds used so far by process ``pid`` and all its descendants, the finished ones
    included (a parent's cutime/cstime holds its reaped children's); ``None`` without /proc."""
    try:
        entries = [int(e) for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return None
    children, ticks = {}, {}
    for p in entries:
        try:
            with open(f"/proc/{p}/stat") as f:
                stat = f.read()
        except OSError:  # ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # from field 3 (state) on
        children.setdefault(int(fields[1]), []).append(p)
        ticks[p] = sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
    tree, todo = set(), [pid]
    while todo:
        p = todo.pop()
        tree.add(p)
        todo += [c for c in children.get(p, []) if c not in tree]
    return sum(ticks.get(p, 0) for p in tree) / os.sysconf("SC_CLK_TCK")


STALL_CPU_S = 0.25
"""CPU time a build in progress uses within any stall window, however loaded the machine: a
compiler burns CPU the whole time, a process polling for a lock file to go away next to none."""


def _run_build(what: str, code: str, *, limit_s: float, stall_s: float,
               **env) -> subprocess.CompletedProcess:
    """``_run`` for a build: fails the test, saying which, when ``code`` is stuck (``stall_s``
    seconds in which it and its compilers used under ``STALL_CPU_S`` of CPU: waiting on
    something, not compiling) or still running after ``limit_s``. A slow build on a loaded
    machine is neither: a fixed deadline close to the build time fails there (113 s on two idle
    cores ran past 300 s under load)."""
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **env},
                            cwd=tempfile.gettempdir(), start_new_session=True)
    cpu_s, progressed = 0.0, start
    while True:
        try:
            out, err = proc.communicate(timeout=2)
            return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        except subprocess.TimeoutExpired:
            pass
        now, used = time.monotonic(), _tree_cpu_s(proc.pid)
        if used is None or used >= cpu_s + STALL_CPU_S:
            cpu_s, progressed = used or cpu_s, now
        if now - progressed > stall_s:
            problem = (f"stuck: it and its child processes used under {STALL_CPU_S} s of CPU "
                       f"in the last {stall_s:.0f} s (waiting on a lock?)")
        elif now - start > limit_s:
            problem = f"still running after {limit_s:.0f} s"
        else:
            continue
        os.killpg(proc.pid, signal.SIGKILL)  # the compilers too: start_new_session
        _, err = proc.communicate()
        pytest.fail(f"{what}: {problem}, after {now - start:.0f} s and {cpu_s:.0f} s of CPU "
                    f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores); "
                    f"killed. Its stderr ends:\n{err[-3000:]}")


# ---- built -------------------------------------------------------------------------------------

def test_extension_imports_and_loads(built):
    import dbn_kernels._C  # noqa: F401

    assert backends.unavailable_reason("cuda", "cuda") is None


@pytest.mark.parametrize("entry", list(ops.SCHEMAS))
def test_every_op_has_its_kernel(built, entry):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(ops.qualname("cuda", entry), "CUDA")


def test_fakes_registered(built):
    """torch.compile traces the ops through the shared fakes: shapes, dtypes, memory format."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4, 3, 5, 5, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        stat = torch.empty(3)
        k = torch.zeros((), dtype=torch.long)
        y, *saved = torch.ops.dbn.cuda_train_forward(x, stat, stat, stat, stat, stat, stat, k,
                                                     0.1, 1e-5, 0.25, 0.0, 0.0)
        assert y.shape == x.shape and y.dtype == x.dtype and y.stride() == x.stride()
        assert [t.shape for t in saved] == [(3,)] * 4 + [()]
        assert all(t.dtype == torch.float32 for t in saved)
        y2, invstd = torch.ops.dbn.cuda_eval_forward(x, None, None, stat, stat, 1e-5, True)
        assert y2.stride() == x.stride() and invstd.shape == (3,)
        dx, gw, gb, gres = torch.ops.dbn.cuda_backward(y, x, None, *saved, True, True)
        assert dx.stride() == x.stride() and gw.shape == gb.shape == (3,)
        assert gres.shape == (0,)
        dx, _, _, gres = torch.ops.dbn.cuda_backward(y, x, None, *saved, True, False, y, True)
        assert dx.numel() == 0 and gres.stride() == x.stride() and gres.dtype == x.dtype
    # Meta tensors take the same path.
    xm = torch.empty(2, 4, 3, device="meta")
    out = torch.ops.dbn.cuda_train_forward(xm, None, None, None, None, None, None, None, 0.1,
                                           1e-5, 1.0, 0.0, 0.0)
    assert out[0].shape == xm.shape and out[1].shape == (4,)


# ---- not built, or not runnable here ------------------------------------------------------------

def test_cpu_input_with_cuda_backend_raises():
    with pytest.raises(RuntimeError, match="cuda backend needs a CUDA tensor"):
        dbn.BatchNorm2d(3, backend="cuda")(torch.randn(2, 3, 4, 4))


@pytest.mark.parametrize("jit", ["off", "default"])
def test_missing_extension_never_breaks_import(jit):
    """As if dbn_kernels._C were not built: import works, load() returns the reason and the fix,
    backend='cuda' raises RuntimeError. Without a GPU nothing is compiled on first use."""
    if jit == "default" and torch.cuda.is_available():
        pytest.skip("would compile the extension on first use (a GPU is present)")
    code = (
        "import sys\n"
        "sys.modules['dbn_kernels._C'] = None  # import of it fails as when not built\n"
        "import torch, dbn_kernels\n"
        "from dbn_kernels import _extension, backends\n"
        "reason = _extension.load()\n"
        "print('REASON', reason)\n"
        "try:\n"
        "    backends.resolve('cuda', torch.device('cuda'))\n"
        "except RuntimeError as exc:\n"
        "    print('RAISED', exc)\n"
        "print('BACKENDS', dbn_kernels.available_backends('cpu'))\n")
    env = {"DBN_KERNELS_NO_JIT": "1"} if jit == "off" else {}
    proc = _run(code, **env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "REASON the CUDA extension dbn_kernels._C is not built" in out
    assert "pip install --no-build-isolation ." in out
    assert "RAISED dbn_kernels backend 'cuda' cannot run here" in out
    assert "BACKENDS" in out and "'reference'" in out
    if jit == "off":
        assert "DBN_KERNELS_NO_JIT=1" in out
    elif torch.version.cuda:
        assert "no CUDA device is visible" in out
    else:
        assert "is not a CUDA build" in out


@pytest.mark.slow
@pytest.mark.timeout(45 * 60)  # _run_build's limits, with room: it fails first, saying why
def test_compile_on_first_use(tmp_path):
    """The plain `pip install .` route: no _C, so the shipped sources are compiled once with
    ninja into torch's extensions dir (here a private one; a one-line message), and a second
    process reuses the build silently. Without a GPU here, torch.cuda.is_available is patched
    and one arch is built."""
    if _extension.find_cuda_home() is None or not torch.version.cuda:
        pytest.skip("needs nvcc and a CUDA-enabled torch")
    code = (
        "import sys\n"
        "sys.modules['dbn_kernels._C'] = None\n"
        "import torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "import dbn_kernels\n"
        "from dbn_kernels import _extension\n"
        "print('LOAD', _extension.load())\n"
        "print('SCHEMA', torch.ops.dbn.cuda_backward.default._schema.name)\n")
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path), "TORCH_CUDA_ARCH_LIST": "9.0",
           "DBN_KERNELS_NO_JIT": "0"}
    # Limits that only a stuck or runaway build reaches: a build that keeps compiling, however
    # slowly, is stopped only by the first (113 s on two idle cores).
    first = _run_build("the first-use build", code, limit_s=30 * 60, stall_s=180, **env)
    assert first.returncode == 0, "the first-use build failed:\n" + first.stderr[-3000:]
    assert "LOAD None" in first.stdout and "SCHEMA dbn::cuda_backward" in first.stdout, \
        first.stdout[-2000:] + first.stderr[-3000:]
    assert "dbn_kernels: compiling the CUDA kernels" in first.stderr
    second = _run_build("loading the cached build", code, limit_s=10 * 60, stall_s=120, **env)
    assert "LOAD None" in second.stdout, second.stdout[-2000:] + second.stderr[-3000:]
    assert "compiling" not in second.stderr


def test_first_use_build_clears_a_lock_left_by_a_dead_build(tmp_path):
    """A build killed mid-way leaves torch's ``lock`` file in the build directory, and torch's
    loader waits for that file to go away, without limit (a stale lock once stalled the suite for
    14 minutes without a word). The first-use build removes it, saying so, and builds. torch's
    loader and lock are the real ones; faked are the machine (a CUDA device and nvcc) and the
    sources: one C++ file, built in seconds."""
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        pytest.skip("needs ninja")
    _system_compilers()
    src = tmp_path / "src"
    src.mkdir()
    (src / "tiny.cpp").write_text("int dbn_kernels_tiny() { return 1; }\n")
    build_dir = tmp_path / "extensions" / _extension.JIT_NAME
    build_dir.mkdir(parents=True)
    lock = build_dir / "lock"
    lock.touch()  # what the killed build left: torch's lock, no process behind it
    code = (
        "import torch\n"
        "from pathlib import Path\n"
        "from dbn_kernels import _extension\n"
        "torch.version.cuda = torch.version.cuda or '13.0'\n"
        "torch.cuda.is_available = lambda: True\n"
        f"_extension.find_cuda_home = lambda: {str(src)!r}\n"
        "_extension.nvcc_release = lambda home: torch.version.cuda\n"
        f"_extension.csrc_dir = lambda: Path({str(src)!r})\n"
        "_extension.SOURCES = ('tiny.cpp',)\n"
        "print('RESULT', _extension.compile_on_first_use())\n")
    # Stuck after 60 s without CPU: torch's loader polling for the lock file.
    proc = _run_build("the first-use build with a dead build's lock in its directory", code,
                      limit_s=300, stall_s=60, TORCH_EXTENSIONS_DIR=str(build_dir.parent),
                      DBN_KERNELS_NO_JIT="0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RESULT None" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"dbn_kernels: removed {lock}" in proc.stderr
    if hasattr(cpp_extension, "FileBaton"):
        # torch 2.11's loader: a lock file blocks by existing, and a build removes its own at
        # the end. torch 2.14's holds an flock on the file instead and leaves it in place.
        assert not lock.exists()
    assert list(build_dir.glob(f"{_extension.JIT_NAME}*.so"))


def test_first_use_build_waits_for_a_live_build_within_a_bound(tmp_path):
    """Another process building into the directory is waited for, not forever: at the bound a
    ``TimeoutError`` says what is going on (compile_on_first_use reports it as the reason). Its
    ``lock`` file is left alone; once that build is gone the next one goes ahead."""
    live = _extension._hold_build_directory(str(tmp_path))  # the other build, in progress
    if live is None:
        pytest.skip("no flock here")
    lock = tmp_path / "lock"
    try:
        lock.touch()  # torch's, of the live build
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="another process has been building"):
            _extension._hold_build_directory(str(tmp_path), wait_s=1)
        assert time.monotonic() - start < 30
        assert lock.exists()
    finally:
        live.close()  # that build ends without removing its lock, as a killed one
    _extension._hold_build_directory(str(tmp_path), wait_s=1).close()
    assert not lock.exists()


# ---- a stale extension: built from older sources -------------------------------------------------

# Kernels as an extension built before a change of the contract registers them: `stale_*` has a
# normalize kernel with an older signature (without the fused epilogue's residual and relu),
# `partial_*` only its normalize.
STALE_SOURCE = r"""
#include <torch/library.h>

at::Tensor normalize_before(const at::Tensor& x, const at::Tensor& coef) { return x; }
at::Tensor normalize(const at::Tensor& x, const at::Tensor& coef,
                     const std::optional<at::Tensor>& residual, bool relu) { return x; }

TORCH_LIBRARY_IMPL(dbn, CPU, m) {
  m.impl("stale_normalize", &normalize_before);
  m.impl("partial_normalize", &normalize);
}
"""


@pytest.fixture(scope="module")
def load_stale_extension(tmp_path_factory):
    """Builds (once, with the host compiler the real build would use, in a private directory)
    and loads the extension above; for ``check_registration``'s ``import_kernels``."""
    from torch.utils import cpp_extension

    try:
        compilers, _ = _extension.host_compilers()
    except RuntimeError as exc:
        pytest.skip(f"no usable host compiler: {exc}")
    build_dir = tmp_path_factory.mktemp("stale_build")

    def load():
        monkeypatch = pytest.MonkeyPatch()
        for name, value in compilers.items():
            monkeypatch.setenv(name, value)
        try:
            cpp_extension.load_inline("dbn_kernels_stale_probe", cpp_sources=[STALE_SOURCE],
                                      build_directory=str(build_dir), is_python_module=False)
        finally:
            monkeypatch.undo()
    return load


def test_stale_signature_is_reported(load_stale_extension):
    """A kernel whose C++ signature no longer matches its schema: a clear sentence, no crash
    (the check runs where the dispatcher's error is a Python exception)."""
    reason = _extension.check_registration("stale", "CPU", load_stale_extension,
                                           "the test extension")
    assert reason is not None
    assert reason.startswith("the test extension is stale (built from older sources): the C++ "
                             "signature of its kernel for dbn::stale_normalize does not match "
                             "the schema (")
    assert "Fix: rebuild it from these sources with `pip install --no-build-isolation .`" in reason


def test_missing_kernels_are_reported(load_stale_extension):
    reason = _extension.check_registration("partial", "CPU", load_stale_extension,
                                           "the test extension")
    missing = [ops.qualname("partial", e) for e in ops.SCHEMAS if e != "normalize"]
    assert reason == ("the test extension is stale (built from older sources): it has no CPU "
                      f"kernel for {', '.join(missing)}. Fix: {_extension.STALE_FIX}")


# ---- the build's inputs ----------------------------------------------------------------------------

def test_sources_listed_and_shipped():
    """Every translation unit in csrc/ is built, and the sources are found for a first-use build."""
    on_disk = {p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".cu", ".cpp")}
    assert on_disk == set(_extension.SOURCES)
    found = _extension.csrc_dir()
    assert found is not None
    assert all((found / s).is_file() for s in _extension.SOURCES)
    for header in ("dbn_common.cuh", "dbn_launch.h", "reduce_common.cuh", "ops.h", "checks.h",
                   "planning.h"):
        assert (found / header).is_file()


def test_setup_without_cuda_build_installs_pure_python():
    proc = subprocess.run([sys.executable, "setup.py", "--version"], capture_output=True,
                          text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "DBN_KERNELS_NO_CUDA_BUILD": "1",
                               "DBN_KERNELS_REQUIRE_CUDA_BUILD": "0"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == dbn.__version__
    assert "installing the pure-Python package" in proc.stderr


# ---- the host compiler: one shared C++ runtime with torch ---------------------------------------

def _fake_compiler(directory: Path, name: str, real: str, *, claims_shared: bool) -> str:
    """A wrapper of the system compiler that links libstdc++ statically, like the GPU image's
    /opt/gcc (where the extension crashed formatting an error message); with
    ``claims_shared=False`` it also answers -print-file-name as a toolchain without
    libstdc++.so does."""
    lines = ["#!/bin/sh"]
    if not claims_shared:
        lines.append('for a in "$@"; do [ "$a" = "-print-file-name=libstdc++.so" ] && '
                     '{ echo libstdc++.so; exit 0; }; done')
    lines += [f'for a in "$@"; do [ "$a" = "-shared" ] && exec {real} "$@" -static-libstdc++; '
              'done', f'exec {real} "$@"']
    path = directory / name
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)
    return str(path)


def _system_compilers():
    import shutil

    cxx, cc = shutil.which("g++"), shutil.which("gcc")
    if cxx is None or cc is None:
        pytest.skip("needs the system's g++ and gcc")
    return cxx, cc


def test_host_compilers_keep_a_compiler_with_a_shared_runtime(monkeypatch):
    cxx, cc = _system_compilers()
    monkeypatch.setenv("CXX", cxx)
    monkeypatch.setenv("CC", cc)
    assert _extension.host_compilers() == ({}, None)
    monkeypatch.delenv("CXX")
    assert _extension.host_compilers() == ({}, None)


@pytest.mark.parametrize("claims_shared", [False, True])
def test_host_compilers_replace_a_static_runtime_toolchain(tmp_path, monkeypatch, claims_shared):
    """Found by linking a probe, whatever the toolchain says about its libstdc++.so."""
    cxx, _ = _system_compilers()
    fake = _fake_compiler(tmp_path, "g++", cxx, claims_shared=claims_shared)
    monkeypatch.setenv("CXX", fake)
    chosen, note = _extension.host_compilers()
    assert set(chosen) == {"CXX", "CC"} and fake not in chosen.values()
    assert "statically" in note and fake in note
    if claims_shared:
        return  # below, without binutils on PATH, only the toolchain's own answer is left
    # Nothing else on PATH: a clear error naming the fix, not a silent static build.
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="Set CXX and CC"):
        _extension.host_compilers()


def test_build_refuses_an_extension_with_its_own_cxx_runtime(tmp_path):
    """The check after linking, on a one-file C++ extension built with torch's BuildExtension:
    with a compiler that claims a shared runtime but links it statically the build fails naming
    the problem; with the system compiler it succeeds and the library needs libstdc++.so."""
    cxx, cc = _system_compilers()
    if _extension.needed_libraries(sys.executable) is None:
        pytest.skip("needs objdump")
    (tmp_path / "tiny.cpp").write_text(
        '#include <sstream>\n#include <string>\n'
        'std::string describe(long n) { std::ostringstream s; s << n; return s.str(); }\n')
    script = (
        "import sys\n"
        "from setuptools import setup\n"
        "from torch.utils import cpp_extension\n"
        f"sys.path.insert(0, {str(ROOT / 'dbn_kernels')!r})\n"
        "import _extension\n"
        "setup(name='tiny', ext_modules=[cpp_extension.CppExtension('tiny', ['tiny.cpp'])],\n"
        "      cmdclass={'build_ext': _extension.checked_build_ext(cpp_extension)},\n"
        "      script_args=['build_ext', '--inplace'])\n")
    (tmp_path / "build_tiny.py").write_text(script)

    def build(cxx_path: str, cc_path: str):
        return subprocess.run([sys.executable, "build_tiny.py"], capture_output=True, text=True,
                              timeout=600, cwd=tmp_path,
                              env={**os.environ, "CXX": cxx_path, "CC": cc_path,
                                   "MAX_JOBS": "2"})

    fakes = tmp_path / "fake"
    fakes.mkdir()
    bad = build(_fake_compiler(fakes, "g++", cxx, claims_shared=True),
                _fake_compiler(fakes, "gcc", cc, claims_shared=True))
    assert bad.returncode != 0
    assert "does not link libstdc++.so" in bad.stdout + bad.stderr
    good = build(cxx, cc)
    assert good.returncode == 0, good.stderr[-3000:]
    built = list(tmp_path.glob("tiny*.so"))
    assert len(built) == 1
    assert any(lib.startswith("libstdc++") for lib in _extension.needed_libraries(str(built[0])))
