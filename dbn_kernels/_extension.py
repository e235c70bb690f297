"""Loading the compiled CUDA extension ``dbn_kernels._C`` (the ``dbn::cuda_*`` ops).

Importing ``dbn_kernels`` never fails because the extension is missing or stale: ``load()``
returns ``None`` once the ops are registered, or a sentence saying why they are not and how to
fix it, which ``backend="cuda"`` turns into a ``RuntimeError``.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def load() -> str | None:
    try:
        from . import _C  # noqa: F401  (registers dbn::cuda_* with torch.library)
    except ImportError as exc:
        return (f"the CUDA extension dbn_kernels._C is not built ({exc}); reinstall on a machine "
                "with nvcc and a CUDA-enabled torch: pip install --no-build-isolation .")
    from .ops import register_fakes

    register_fakes("cuda")
    return None
