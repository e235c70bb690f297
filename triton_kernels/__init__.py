"""The ``triton`` backend: fused Triton kernels for the three ops of ``dbn_kernels.ops``.

Importing this module defines ``dbn::triton_train_forward``, ``dbn::triton_eval_forward`` and
``dbn::triton_backward``. They run on CUDA tensors, and on CPU tensors under the Triton
interpreter (``TRITON_INTERPRET=1`` set before this import), which is how CI tests them.

* ``launch``   how inputs are viewed (layouts) and every launch heuristic (tiles, splits, warps);
* ``tiling``   device helpers: tile offsets per layout, Welford/Chan merges;
* ``forward``  collect_stats, finalize, normalize (training) and eval_normalize (evaluation);
* ``backward`` backward_reduce, backward_finalize, backward_dx.
"""

from dbn_kernels.ops import define_backend

from .backward import backward
from .forward import eval_forward, train_forward

define_backend("triton", {"train_forward": train_forward, "eval_forward": eval_forward,
                          "backward": backward}, device_types=("cuda", "cpu"))

__all__ = ["train_forward", "eval_forward", "backward"]
