"""Loading the CUDA extension (the ``dbn::cuda_*`` ops).

Two routes give the ops:

1. ``dbn_kernels._C``, built at install time by setup.py when the build could see a CUDA-enabled
   torch and nvcc (``pip install --no-build-isolation .``);
2. otherwise, on first use with a CUDA device and nvcc present, the sources shipped in the package
   (``dbn_kernels/csrc``) are compiled once with ``torch.utils.cpp_extension.load`` (ninja, cached
   in torch's extensions directory, ``TORCH_EXTENSIONS_DIR``), with a one-line message while it
   compiles. ``DBN_KERNELS_NO_JIT=1`` switches this off.

The extension registers kernels only; the ops' schemas and fakes come from ``ops.SCHEMAS``.
Importing ``dbn_kernels`` never fails because the extension is missing or stale: ``load()``
returns ``None`` once every ``dbn::cuda_*`` op has its schema and its CUDA kernel, or a sentence
saying why not and how to fix it (not built; stale: built from older sources, with ops missing or
a kernel whose C++ signature does not match its schema), which ``backend="cuda"`` turns into a
``RuntimeError``. It never raises.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

JIT_NAME = "dbn_kernels_cuda"
SOURCES = ("binding.cpp", "ops_forward.cpp", "ops_backward.cpp", "planning.cpp", "checks.cpp",
           "collect_stats.cu", "finalize.cu", "elementwise.cu", "backward_reduce.cu")
"""Translation units of the extension (setup.py reads them from here): ninja compiles them in
parallel. This module's top level imports only the standard library, because setup.py loads it
standalone, before torch is known to be importable."""

FIX = ("build it at install with `pip install --no-build-isolation .` (needs a CUDA-enabled torch, "
       "nvcc of the same CUDA major version, ninja), or use backend='triton' / 'reference'")


def find_cuda_home() -> str | None:
    """A CUDA toolkit root with bin/nvcc and include/cuda_runtime_api.h (as setup.py finds it)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += [os.path.dirname(os.path.dirname(os.path.realpath(nvcc))),
                       os.path.dirname(os.path.dirname(nvcc))]
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
                os.path.join(home, "include", "cuda_runtime_api.h")):
            return home
    return None


def library_includes(cuda_home: str, cuda_major: str) -> list[str]:
    """``-isystem`` flags (searched after CUDA_HOME/include, so the toolkit's headers win) for the
    CUDA library headers (cusparse.h, cublas_v2.h, ...) that torch's CUDA headers may include: a
    full toolkit has them, a compiler-only install does not, and then the ones pip installed with
    torch (site-packages/nvidia/cu<major>/include) are used."""
    if os.path.isfile(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    try:
        import nvidia
    except ImportError:
        return []
    flags = []
    for base in getattr(nvidia, "__path__", []):
        inc = os.path.join(base, f"cu{cuda_major}", "include")
        if os.path.isfile(os.path.join(inc, "cusparse.h")):
            flags += ["-isystem", inc]
    return flags


def csrc_dir() -> Path | None:
    """The shipped CUDA sources: package data of dbn_kernels.csrc, or csrc/ of a source tree."""
    candidates = []
    try:
        spec = importlib.util.find_spec("dbn_kernels.csrc")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) for p in spec.submodule_search_locations]
    here = Path(__file__).resolve().parent
    candidates += [here / "csrc", here.parent / "csrc"]
    for d in candidates:
        if all((d / s).is_file() for s in SOURCES):
            return d
    return None


def _links_cxx_runtime_statically(compiler: str) -> bool:
    """True when a shared object that ``compiler`` links carries its own copy of the C++ runtime.

    Found by linking one: a tiny shared object that uses the runtime must then list libstdc++.so
    among its needed libraries (``objdump``). Without objdump, or when the test link itself
    fails, the toolchain is asked where its libstdc++.so is: a toolchain without one answers the
    bare name."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dbn_cxx_probe_") as tmp:
        source, library = os.path.join(tmp, "probe.cpp"), os.path.join(tmp, "probe.so")
        with open(source, "w") as out:
            out.write("#include <string>\nstd::string probe(long n) { return std::to_string(n); }\n")
        try:
            linked = subprocess.run([compiler, "-shared", "-fPIC", source, "-o", library],
                                    capture_output=True, timeout=120).returncode == 0
        except (OSError, subprocess.SubprocessError):
            linked = False
        shared = links_shared_cxx_runtime(library) if linked else None
        if shared is not None:
            return not shared
    try:
        answer = subprocess.run([compiler, "-print-file-name=libstdc++.so"], capture_output=True,
                                text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return False  # cannot tell: leave the choice alone
    return answer == "libstdc++.so"


def host_compilers() -> tuple[dict[str, str], str | None]:
    """The CC/CXX to build the extension with: ``({}, None)`` to keep the environment's, or the
    replacements and a sentence saying why.

    An extension that links its own copy of libstdc++ next to the one torch loaded crashes the
    first time it formats a number into an error message (seen on an H200 image whose
    CC/CXX=/opt/gcc/bin/gcc,g++ link the runtime statically: a segfault in ostream inside the
    extension). If CXX names such a compiler, the system's ``c++``/``cc`` (which link
    ``libstdc++.so``, as torch does) are used for both the host code and nvcc's ``-ccbin``, so
    every object of the extension comes from one compiler."""
    cxx = os.environ.get("CXX")
    if not cxx or not _links_cxx_runtime_statically(cxx):
        return {}, None
    problem = (f"CXX={cxx} links the C++ runtime statically (a shared object it links does not "
               "need libstdc++.so)")
    for cand_cxx, cand_cc in (("c++", "cc"), ("g++", "gcc")):
        path_cxx, path_cc = shutil.which(cand_cxx), shutil.which(cand_cc)
        if path_cxx and path_cc and not _links_cxx_runtime_statically(path_cxx):
            return ({"CXX": path_cxx, "CC": path_cc},
                    f"{problem}, which crashes inside torch's process; building with "
                    f"CXX={path_cxx} CC={path_cc} instead")
    raise RuntimeError(f"{problem}, and no other C++ compiler was found: an extension built with "
                       "it crashes inside torch's process. Set CXX and CC to a compiler that "
                       "links libstdc++.so (the system's g++)")


def needed_libraries(shared_object: str) -> list[str] | None:
    """The DT_NEEDED entries of an ELF shared object (``objdump -p``), or None if unknown."""
    objdump = shutil.which("objdump")
    if objdump is None:
        return None
    try:
        out = subprocess.run([objdump, "-p", shared_object], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return re.findall(r"^\s*NEEDED\s+(\S+)", out, flags=re.M)


def links_shared_cxx_runtime(shared_object: str) -> bool | None:
    """Whether the shared object needs libstdc++.so (None: cannot tell, no objdump)."""
    needed = needed_libraries(shared_object)
    return None if needed is None else any(lib.startswith("libstdc++") for lib in needed)


def checked_build_ext(cpp_extension):
    """torch's ``BuildExtension`` (ninja), then a check of what it linked: an extension with its
    own copy of the C++ runtime (no libstdc++.so among its needed libraries) crashes inside
    torch's process, so the build fails instead of installing it."""
    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildExtension(base):
        def build_extension(self, ext):
            super().build_extension(ext)
            path = self.get_ext_fullpath(ext.name)
            if links_shared_cxx_runtime(path) is False:
                raise RuntimeError(
                    f"{path} does not link libstdc++.so (it needs: "
                    f"{', '.join(needed_libraries(path))}): the "
                    f"compiler (CXX={os.environ.get('CXX', 'c++')}) linked the C++ runtime "
                    "statically, and such an extension crashes inside torch's process. Build "
                    "with a compiler that links libstdc++.so, e.g. CXX=g++ CC=gcc")

    return BuildExtension


def nvcc_release(cuda_home: str) -> str | None:
    """``"13.0"`` from ``nvcc --version``, or ``None``."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def _needs_compile(build_dir: str, sources: list[str]) -> bool:
    built = glob.glob(os.path.join(build_dir, f"{JIT_NAME}*.so"))
    if not built:
        return True
    newest_source = max(os.path.getmtime(s) for s in sources)
    return max(os.path.getmtime(b) for b in built) < newest_source


def _hold_build_directory(build_dir: str, wait_s: float = 20 * 60):
    """Take the build directory for this process's first-use build: the open file whose flock
    this process now holds (closing it lets the next build in), or ``None`` where flock is not
    available (then torch's lock file alone guards the directory, as before).

    torch's loader guards the directory with an empty ``lock`` file, removed when its build ends,
    and any other loader polls for that file to go away, without limit: a build killed mid-way
    leaves it behind, and every later first use waited forever without a word. The file cannot
    say whether its build still runs, so each first-use build also holds an flock, which the
    kernel drops when the holder dies however it ends. Holding it, a ``lock`` file still there
    was left by a dead build, and is removed. A live build in another process is waited for, at
    most ``wait_s`` (a first-use build takes minutes), then ``TimeoutError`` says so."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    import time

    holder = open(os.path.join(build_dir, "first_use_build.flock"), "a")
    deadline = time.monotonic() + wait_s
    waiting = False
    while True:
        try:
            fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            pass
        except OSError:  # a file system without flock
            holder.close()
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            holder.close()
            raise TimeoutError(f"another process has been building the CUDA kernels in "
                               f"{build_dir} for longer than this one waited ({wait_s:.0f} s); "
                               "try again once it has finished")
        if not waiting:
            print(f"dbn_kernels: another process is building the CUDA kernels in {build_dir}; "
                  f"waiting for it (at most {wait_s:.0f} s) ...", file=sys.stderr, flush=True)
            waiting = True
        time.sleep(min(1.0, left))
    stale = os.path.join(build_dir, "lock")
    if os.path.exists(stale):
        os.remove(stale)
        print(f"dbn_kernels: removed {stale}, left behind by a build that did not finish",
              file=sys.stderr, flush=True)
    return holder


def compile_on_first_use() -> str | None:
    """Compile and load the extension from the shipped sources; ``None`` or why it could not."""
    if os.environ.get("DBN_KERNELS_NO_JIT", "0") == "1":
        return "compiling on first use is switched off (DBN_KERNELS_NO_JIT=1)"
    try:
        import torch

        if not torch.version.cuda:
            return f"torch {torch.__version__} is not a CUDA build"
        if not torch.cuda.is_available():
            return "no CUDA device is visible, so it is not compiled on first use either"
        cuda_home = find_cuda_home()
        if cuda_home is None:
            return "nvcc was not found (set CUDA_HOME), so it cannot be compiled on first use"
        torch_major = torch.version.cuda.split(".")[0]
        release = nvcc_release(cuda_home)
        if release is None or release.split(".")[0] != torch_major:
            return (f"nvcc in {cuda_home} is CUDA {release} but torch was built with CUDA "
                    f"{torch.version.cuda}, so it cannot be compiled on first use")
        src = csrc_dir()
        if src is None:
            return "the CUDA sources (dbn_kernels/csrc) are missing from this install"

        from torch.utils import cpp_extension

        compilers, note = host_compilers()
        if note is not None:
            print(f"dbn_kernels: {note}", file=sys.stderr, flush=True)
        saved = {name: os.environ.get(name) for name in compilers}
        os.environ.update(compilers)  # read by cpp_extension.load (CXX, and CC for nvcc -ccbin)
        os.environ.setdefault("CUDA_HOME", cuda_home)
        cpp_extension.CUDA_HOME = cuda_home
        sources = [str(src / s) for s in SOURCES]
        includes = library_includes(cuda_home, torch_major)
        held = None
        try:
            build_dir = cpp_extension._get_build_directory(JIT_NAME, verbose=False)
            held = _hold_build_directory(build_dir)
            if _needs_compile(build_dir, sources):
                print("dbn_kernels: compiling the CUDA kernels for this GPU (first use only, a "
                      "few minutes; cached in torch's extensions directory) ...",
                      file=sys.stderr, flush=True)
            cpp_extension.load(
                name=JIT_NAME,
                sources=sources,
                extra_include_paths=[str(src)],
                extra_cflags=["-O3", *includes],
                extra_cuda_cflags=["-O3", "-lineinfo", *includes],
                build_directory=build_dir,
                is_python_module=False,
                verbose=False,
            )
        finally:  # the build directory free for the next process; the environment as it was
            if held is not None:
                held.close()
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    except Exception as exc:  # never raise at import or backend resolution
        detail = str(exc).strip().splitlines()
        return (f"compiling it on first use failed ({type(exc).__name__}: "
                f"{detail[-1] if detail else ''})")
    return None


@functools.lru_cache(maxsize=None)
def load() -> str | None:
    """Register the ``dbn::cuda_*`` ops (schemas, fakes, kernels); ``None``, or why not and the
    fix."""
    def import_built():
        from . import _C  # noqa: F401  (registers the dbn::cuda_* kernels on import)

    try:
        try:
            return check_registration("cuda", "CUDA", import_built,
                                      "the CUDA extension dbn_kernels._C")
        except Exception as exc:  # ImportError, or OSError/undefined symbols: not loadable
            first = str(exc).strip().splitlines()
            why = f"{type(exc).__name__}: {first[0] if first else ''}"
        jit = compile_on_first_use()  # registers the kernels when it succeeds
        if jit is not None:
            return f"the CUDA extension dbn_kernels._C is not built ({why}); {jit}. Fix: {FIX}"
        return check_registration("cuda", "CUDA", lambda: None,
                                  f"the CUDA extension {JIT_NAME} (compiled on first use)")
    except Exception as exc:
        return f"the CUDA extension's ops could not be registered ({type(exc).__name__}: {exc})"


STALE_FIX = ("rebuild it from these sources with `pip install --no-build-isolation .` (or remove "
             "it to compile them on first use), or use backend='triton' / 'reference'")


def check_registration(prefix: str, dispatch_key: str, import_kernels, what: str) -> str | None:
    """Load the kernels of backend ``prefix`` (``import_kernels()``, whose exceptions propagate:
    not built), define the backend's ops from ``ops.SCHEMAS`` and check that each has a kernel
    for ``dispatch_key``: ``None``, or why ``what`` is stale and the fix.

    The kernels are loaded first: the extension registers implementations only, and the
    dispatcher checks a kernel's C++ signature against its op's schema when the second of the two
    arrives. Arriving second in the extension's static initialisation, a mismatch would abort the
    process (an exception escapes the library's load); arriving second in ``define_schemas``, it
    is a ``RuntimeError`` here. A build from before the passes defined its own, older ops: the
    names it lacks show up as ops without a kernel."""
    from . import ops

    import_kernels()
    stale = f"{what} is stale (built from older sources)"
    try:
        ops.define_schemas(prefix)
    except RuntimeError as exc:
        return f"{stale}: {_signature_problem(exc)}. Fix: {STALE_FIX}"
    missing = ops.missing_kernels(prefix, dispatch_key)
    if missing:
        return (f"{stale}: it has no {dispatch_key} kernel for {', '.join(missing)}. "
                f"Fix: {STALE_FIX}")
    return None


def _signature_problem(exc: Exception) -> str:
    """The dispatcher's schema-check failure in one line: the op and the reason."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    op = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("operator:")), None)
    reason = next((ln.split(":", 1)[1].strip().rstrip(".") for ln in lines
                   if ln.startswith("reason:")), None)
    if op is None:
        return f"defining its ops failed ({lines[0] if lines else type(exc).__name__})"
    return (f"the C++ signature of its kernel for {op} does not match the schema"
            + (f" ({reason})" if reason else ""))
