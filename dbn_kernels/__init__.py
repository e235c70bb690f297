"""dbn_kernels: fused kernels for Diminishing Batch Normalization (Ma & Klabjan, TNNLS 2024).

Drop-in replacements for ``torch.nn.BatchNorm1d/2d/3d`` (``BatchNorm*d``: plain batch norm,
``DiminishingBatchNorm*d``: DBN) and ``torch.nn.SyncBatchNorm`` (``SyncBatchNorm``,
``SyncDiminishingBatchNorm``) on CUDA and Triton kernels, with a pure-PyTorch reference.
"""

from . import functional, reference  # noqa: F401  (reference defines dbn::reference_*)
from .backends import available_backends
from .convert import convert, revert
from .fuse import FusionError, fuse, unfuse
from .modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, DiminishingBatchNorm1d,
                      DiminishingBatchNorm2d, DiminishingBatchNorm3d, SyncBatchNorm,
                      SyncDiminishingBatchNorm)
from .schedules import Schedule, inverse_power

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "DiminishingBatchNorm1d", "DiminishingBatchNorm2d", "DiminishingBatchNorm3d",
    "SyncBatchNorm", "SyncDiminishingBatchNorm",
    "Schedule", "inverse_power", "convert", "revert", "fuse", "unfuse", "FusionError",
    "available_backends", "functional",
]
