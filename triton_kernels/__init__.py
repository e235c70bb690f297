"""The ``triton`` backend: Triton kernels for every op of ``dbn_kernels.ops``.

Importing this package defines the ``dbn::triton_*`` ops. They run on CUDA tensors, and on CPU
tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set before this import), which is
how CI tests them.

* ``launch``   how inputs are viewed (NCS / NSC layouts) and every launch plan (tiles, splits,
  warps);
* ``tiling``   device helpers: tile offsets per layout, Welford/Chan merges;
* ``merge``    merging a stack of partial results in a fixed order;
* ``forward``  the passes batch_stats, finalize, normalize; train_forward and eval_forward;
* ``backward`` the passes backward_reduce, backward_finalize, backward_dx; backward.
"""

from dbn_kernels.ops import SCHEMAS, define_backend

from . import backward as _backward
from . import forward as _forward

# Registered by entry name; the submodules keep their names (nothing here shadows them).
define_backend("triton", {entry: getattr(_forward, entry, None) or getattr(_backward, entry)
                          for entry in SCHEMAS}, device_types=("cuda", "cpu"))
