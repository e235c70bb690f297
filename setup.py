"""Build script. Pure-Python package everywhere; the CUDA extension ``dbn_kernels._C`` (csrc/) is
added when the build can see a CUDA-enabled torch and an nvcc of the same CUDA major version:

    pip install --no-build-isolation .     # builds the extension now (needs torch, ninja, nvcc)
    pip install .                          # isolated build: no torch visible, pure Python; the
                                           # extension is compiled on first use (_extension.py)

Environment: TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX"), MAX_JOBS (parallel nvcc jobs, read by
torch's ninja build), CUDA_HOME (otherwise found from nvcc), DBN_KERNELS_NO_CUDA_BUILD=1 (skip),
DBN_KERNELS_REQUIRE_CUDA_BUILD=1 (CI: a missing prerequisite fails the install instead).
A compile error in csrc/ fails the install; a missing prerequisite only skips the extension, with
one line saying why.
"""

import importlib.util
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"

# The Triton kernels live in top-level triton_kernels/ but install as dbn_kernels.triton_kernels:
# the bare name belongs to another PyPI package. The benchmark's source lives in bench/, beside its
# recorded results, and installs as dbn_kernels.benchmark (dbn-bench); only bench/'s own modules
# are the package: the pytest-benchmark suite (bench/suite/) and the results have no __init__.py.
# The CUDA sources ship as package data of dbn_kernels.csrc so that an install without the
# compiled extension can build it on first use.
PACKAGES = sorted(set(find_packages(include=["dbn_kernels", "dbn_kernels.*"]))
                  | {"dbn_kernels.triton_kernels", "dbn_kernels.benchmark", "dbn_kernels.csrc"})
PACKAGE_DIR = {"dbn_kernels": "dbn_kernels", "dbn_kernels.triton_kernels": "triton_kernels",
               "dbn_kernels.benchmark": "bench", "dbn_kernels.csrc": "csrc"}
PACKAGE_DATA = {"dbn_kernels.csrc": ["*.cu", "*.cuh", "*.h", "*.cpp"]}

NVCC_FLAGS = ["-O3", "-lineinfo"]  # -lineinfo: source lines in Nsight Compute, no cost
CXX_FLAGS = ["-O3"]


def _load_helpers():
    """dbn_kernels/_extension.py, loaded standalone (its top level imports only the standard
    library): the list of translation units and the CUDA discovery are shared with the
    compile-on-first-use route."""
    path = os.path.join(ROOT, "dbn_kernels", "_extension.py")
    spec = importlib.util.spec_from_file_location("_dbn_kernels_build_helpers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HELPERS = _load_helpers()


def _note(message: str) -> None:
    print(f"dbn_kernels setup: {message}", file=sys.stderr, flush=True)


def _skip(message: str):
    """No extension: one line saying why (or, with DBN_KERNELS_REQUIRE_CUDA_BUILD=1, an error)."""
    if os.environ.get("DBN_KERNELS_REQUIRE_CUDA_BUILD", "0") == "1":
        raise RuntimeError(f"DBN_KERNELS_REQUIRE_CUDA_BUILD=1 but the CUDA extension cannot be "
                           f"built: {message}")
    _note(message)
    return [], {}


def cuda_build():
    """(ext_modules, cmdclass) for the extension, or ([], {}) with a one-line note why not."""
    if os.environ.get("DBN_KERNELS_NO_CUDA_BUILD", "0") == "1":
        return _skip("DBN_KERNELS_NO_CUDA_BUILD=1: installing the pure-Python package "
                     "(the CUDA kernels compile on first use)")
    try:
        import torch
    except ImportError:
        return _skip("torch is not importable in this build environment (pip's build "
                     "isolation?): installing the pure-Python package; the CUDA kernels compile "
                     "on first use, or build them now with `pip install --no-build-isolation .`")
    if not torch.version.cuda:
        return _skip(f"torch {torch.__version__} is not a CUDA build: installing the pure-Python "
                     "package")
    cuda_home = HELPERS.find_cuda_home()
    if cuda_home is None:
        return _skip("nvcc not found (set CUDA_HOME): installing the pure-Python package; the "
                     "CUDA kernels compile on first use once nvcc is available")
    release = HELPERS.nvcc_release(cuda_home)
    torch_major = torch.version.cuda.split(".")[0]
    if release is None or release.split(".")[0] != torch_major:
        return _skip(f"nvcc in {cuda_home} is CUDA {release} but torch {torch.__version__} was "
                     f"built with CUDA {torch.version.cuda}: installing the pure-Python package "
                     "(install an nvcc of the same major version and reinstall)")

    try:
        compilers, compiler_note = HELPERS.host_compilers()
    except RuntimeError as exc:
        return _skip(str(exc))
    if compiler_note is not None:
        _note(compiler_note)
    os.environ.update(compilers)  # torch's build reads CXX, and CC for nvcc's -ccbin
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = cuda_home  # in case it was imported before with another guess
    # -isystem: searched after CUDA_HOME/include, so the toolkit's own headers win.
    lib_includes = HELPERS.library_includes(cuda_home, torch_major)
    ext = cpp_extension.CUDAExtension(
        name="dbn_kernels._C",
        sources=[os.path.join("csrc", s) for s in HELPERS.SOURCES],
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": CXX_FLAGS + lib_includes, "nvcc": NVCC_FLAGS + lib_includes},
    )
    _note(f"building the CUDA extension dbn_kernels._C with {cuda_home}/bin/nvcc (CUDA {release}) "
          f"for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']!r}, "
          f"MAX_JOBS={os.environ.get('MAX_JOBS', 'all cores')}")
    return [ext], {"build_ext": HELPERS.checked_build_ext(cpp_extension)}


EXT_MODULES, CMDCLASS = cuda_build()

setup(packages=PACKAGES, package_dir=PACKAGE_DIR, package_data=PACKAGE_DATA,
      ext_modules=EXT_MODULES, cmdclass=CMDCLASS)
