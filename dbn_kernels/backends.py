"""Backend registry: which backends exist, which can run on a given input, and ``"auto"``.

Availability is decided once per (backend, device type) and cached; the checks import optional
pieces (the compiled extension, Triton) lazily so that ``import dbn_kernels`` never fails.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("cuda", "triton", "reference")
"""In order of preference for ``"auto"`` on a CUDA tensor."""

ENV_VAR = "DBN_BACKEND"


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_reference(device_type: str) -> str | None:
    return None


def _check_triton(device_type: str) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed; install it with `pip install 'dbn_kernels[triton]'`"
    if device_type != "cuda" and not (device_type == "cpu" and _triton_interpreted()):
        return (f"the input is on {device_type}; the triton backend needs a CUDA tensor "
                "(or a CPU tensor with TRITON_INTERPRET=1 set before import, for testing)")
    try:
        from . import triton_kernels  # noqa: F401  (defines the dbn::triton_* ops)
    except Exception as exc:  # pragma: no cover - depends on the installed Triton
        return f"the Triton kernels failed to load ({type(exc).__name__}: {exc})"
    return None


def _check_cuda(device_type: str) -> str | None:
    if device_type != "cuda":
        return f"the input is on {device_type}; the cuda backend needs a CUDA tensor"
    from . import _extension

    return _extension.load()


_CHECKS = {"cuda": _check_cuda, "triton": _check_triton, "reference": _check_reference}


@functools.lru_cache(maxsize=None)
def unavailable_reason(backend: str, device_type: str) -> str | None:
    """``None`` when ``backend`` can run on tensors of ``device_type``, else why not and the fix."""
    return _CHECKS[backend](device_type)


def available_backends(device=None) -> list[str]:
    """The backends that can run on ``device`` (default: the current CUDA device if any, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    return [b for b in BACKENDS if unavailable_reason(b, device_type) is None]


def validate_name(backend: str) -> str:
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    return backend


def resolve(backend: str, device: torch.device) -> str:
    """The backend a call with ``backend=`` on ``device`` runs, or ``RuntimeError`` saying why not.

    ``DBN_BACKEND`` is read on every call with ``"auto"``, so a change between calls is honoured
    (the read costs under a microsecond); the rest of the answer is looked up."""
    env = os.environ.get(ENV_VAR) if backend == "auto" else None
    if torch.compiler.is_compiling():
        # Resolved once while tracing; reading the cache there would make the compiled graph
        # guard on its contents, and recompile whenever an eager call adds an entry.
        return _resolve(backend, env, device.type)
    key = (backend, env, device.type)
    name = _RESOLVED.get(key)
    if name is None:
        name = _RESOLVED[key] = _resolve(*key)
    return name


_RESOLVED: dict[tuple[str, str | None, str], str] = {}
"""(backend, DBN_BACKEND, device type) -> backend name. Valid for the life of the process: the
answer depends only on the key and on ``unavailable_reason``, itself cached. Failures raise and
are not stored."""


# Under torch.compile the answer is a constant of the graph: Dynamo calls this in Python rather
# than tracing it (tracing reached the extension's schema check, which it cannot represent, and
# broke the graph on a GPU).
@torch.compiler.assume_constant_result
def _resolve(backend: str, env: str | None, device_type: str) -> str:
    validate_name(backend)
    if backend == "auto" and env:
        if env != "auto" and env not in BACKENDS:
            raise ValueError(f"{ENV_VAR} must be 'auto' or one of {BACKENDS}, got {env!r}")
        backend = env
    if backend == "auto":
        if device_type != "cuda":
            return "reference"
        return next(b for b in BACKENDS if unavailable_reason(b, device_type) is None)
    reason = unavailable_reason(backend, device_type)
    if reason is not None:
        raise RuntimeError(f"dbn_kernels backend {backend!r} cannot run here: {reason}")
    return backend
