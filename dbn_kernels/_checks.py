"""Input validation shared by every backend, run before any buffer is touched.

Messages follow PyTorch's where PyTorch has one, so code that matches on them keeps working.
Everything here reads shapes, dtypes and devices only: no host synchronisation.
"""

from __future__ import annotations

import math

import torch

INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ACTIVATIONS = (None, "relu")


def check_activation(activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def check_epilogue(x, residual, activation) -> bool:
    """The fused epilogue's arguments; returns whether it ends in a ReLU. The residual is added
    element by element in the kernels: it must match the input exactly (no broadcasting, no
    promotion), in any memory format."""
    check_activation(activation)
    if residual is not None and isinstance(x, torch.Tensor):
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"residual must be a Tensor or None, got {type(residual).__name__}")
        if residual.shape != x.shape:
            raise ValueError(f"residual must have the input's shape {tuple(x.shape)}, got "
                             f"{tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise RuntimeError(f"residual has dtype {residual.dtype} but the input has "
                               f"{x.dtype}; they must match")
        if residual.device != x.device:
            raise RuntimeError(f"residual is on {residual.device} but the input is on "
                               f"{x.device}")
    return activation == "relu"


def check_rank(x: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
    """PyTorch's ``_check_input_dim`` message: ``expected 4D input (got 3D input)``."""
    if x.dim() not in expected:
        raise ValueError(f"expected {what} input (got {x.dim()}D input)")


def _per_channel_error(name: str, t: torch.Tensor, C: int, x: torch.Tensor) -> Exception:
    """What is wrong with a per-channel tensor that failed the combined test in check_call."""
    if t.numel() != C:
        return RuntimeError(f"{name} should contain {C} elements not {t.numel()}")
    if t.device != x.device:
        return RuntimeError(f"{name} is on {t.device} but the input is on {x.device}")
    if not t.is_floating_point():
        return RuntimeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return RuntimeError(
        f"{name} has dtype {t.dtype}; with {x.dtype} input it must be float32 or {x.dtype}")


def check_call(x, *, weight, bias, running_mean, running_var, dbn_mean, dbn_std,
               num_batches_tracked, training, momentum, eps, needs_counter,
               batch_is_local=True) -> None:
    """``batch_is_local=False``: the batch statistics cover several ranks' batches, so a rank's
    own batch may hold a single value per channel (or none)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"expected an input of shape (N, C, *), got {x.dim()}D input")
    dtype = x.dtype
    if dtype not in INPUT_DTYPES:
        raise RuntimeError(
            f"input dtype {dtype} is not supported; expected one of "
            + ", ".join(str(d) for d in INPUT_DTYPES))
    C, device = x.shape[1], x.device
    # PyTorch's order, so the first complaint is the one PyTorch would make. Every call runs
    # this, so the common case is one combined test per tensor (float32 or the input's dtype
    # implies floating point); the message is worked out only on failure.
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias), ("dbn_mean", dbn_mean),
                    ("dbn_std", dbn_std)):
        if t is not None and (t.numel() != C or t.device != device
                              or (t.dtype != torch.float32 and t.dtype != dtype)):
            raise _per_channel_error(name, t, C, x)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if (dbn_mean is None) != (dbn_std is None):
        raise ValueError("dbn_mean and dbn_std must be given together")
    if num_batches_tracked is not None and num_batches_tracked.device != device:
        raise RuntimeError(
            f"num_batches_tracked is on {num_batches_tracked.device} but the input is on {device}")
    if training and needs_counter and num_batches_tracked is None:
        raise ValueError("num_batches_tracked is required to count steps (DBN statistics or "
                         "momentum=None)")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite float, got {eps!r}")
    if eps <= 0:
        check_eps_like_torch(eps, training)
    # PyTorch never reads momentum in eval, nor validates it; here it is checked where it is used,
    # when buffers are updated.
    updates_buffers = training and (running_mean is not None or dbn_mean is not None)
    if updates_buffers and momentum is not None and not (
            isinstance(momentum, (int, float)) and 0.0 <= momentum <= 1.0):
        raise ValueError(f"momentum must be None or a float in [0, 1], got {momentum!r}")
    if training and batch_is_local and x.numel() > 0 and x.numel() // C == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {x.size()}")


def check_eps_like_torch(eps: float, training: bool) -> None:
    """The installed PyTorch's rule for ``eps <= 0``, with its message: torch 2.11 refuses
    eps <= 0 always; later releases refuse it in training and eps < 0 in eval. Asked of torch
    itself on a two-value tensor (this path is rare), so every version is matched without a
    table. Where torch accepts eps = 0, so does the project (the step is still defined)."""
    try:
        torch.nn.functional.batch_norm(torch.ones(2, 1), torch.zeros(1), torch.ones(1),
                                       training=training, eps=eps)
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    if eps < 0:  # a torch without any check: a negative eps is still meaningless
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
