import os
import warnings

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's interpreter on CPU tensors. The variable is
# read when a kernel is decorated, so it must be set before dbn_kernels.triton_kernels is imported.
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run the kernels with the installed numpy, or ``None``.

    Triton 3.6's interpreter turns a loop bound computed in the kernel (``range(a, tl.minimum(b,
    c))``) into an int with ``int()`` of a 1-element array, which numpy 2.4 refuses. Every
    interpreted kernel test would then fail inside Triton, not in the kernels, so the run stops
    here with the fix instead. Probed on a two-line kernel rather than read off version numbers.
    """
    if HAS_CUDA or os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def loop_bound(out_ptr, n):
        total = 0
        for i in range(0, tl.minimum(n, 4)):
            total += i
        tl.store(out_ptr, total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        with warnings.catch_warnings():  # numpy < 2.4 only warns about the same conversion
            warnings.simplefilter("ignore", DeprecationWarning)
            loop_bound[(1,)](out, 3)
    except Exception as exc:  # noqa: BLE001 - any failure here is the interpreter's
        import numpy

        return (f"Triton {triton.__version__}'s interpreter cannot run a kernel loop with numpy "
                f"{numpy.__version__} ({type(exc).__name__}: {exc}); install a numpy it "
                "supports, e.g. pip install 'numpy<2.4'")
    return None


def pytest_configure(config):
    problem = _interpreter_problem()
    if problem:
        raise pytest.UsageError(problem)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def emulation_build_dir(tmp_path_factory):
    """The CPU emulation of the cuda backend (tests/emulation.py), built once per test session
    in a private directory; processes a test starts load it from there."""
    from emulation import CannotBuild, build_emulation

    build_dir = tmp_path_factory.mktemp("emulation_build")
    try:
        build_emulation(build_dir)
    except CannotBuild as exc:
        pytest.skip(f"cannot build the CPU emulation: {exc}")
    return build_dir


@pytest.fixture(scope="session")
def emulation(emulation_build_dir):
    """The emulation's op prefix, ``"emu"``: ``dbn::emu_*`` take CPU tensors."""
    from emulation import PREFIX

    return PREFIX

