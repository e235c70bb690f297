"""The backend contract: the passes of a DBN step as ``torch.library`` ops, one set per backend.

Every backend ``B`` (``reference``, ``triton``, ``cuda``, and ``emu``, the CUDA code emulated on
CPU for tests) provides, under the ``dbn`` namespace:

the passes, for callers that insert work between them (a collective for multi-GPU statistics)::

    dbn::B_batch_stats        x -> local statistics (count, mean, M2) per channel; counts a step
    dbn::B_finalize           a stack of statistics from any number of sources -> a_k, every
                              buffer update, the saved tensors, the normalize coefficients
    dbn::B_normalize          y = (x - center) * scale + shift, per channel (+ residual, ReLU)
    dbn::B_backward_reduce    (dy, x, mean) -> local sums (count, sum dy, sum dy * (x - mean)),
                              dy masked by a ReLU's saved output
    dbn::B_backward_finalize  a stack of sums -> grad_weight, grad_bias, the dx coefficients
    dbn::B_backward_dx        dx = A * dy + B * (x - center) + shift, per channel (and the
                              residual's gradient, the masked dy)

and their single-device compositions, fused (no statistics leave the device between passes; the
GPU backends merge their per-block partial results in ``finalize`` directly)::

    dbn::B_train_forward      batch_stats -> finalize -> normalize
    dbn::B_eval_forward       one element-wise pass with stored statistics
    dbn::B_backward           backward_reduce -> backward_finalize -> backward_dx

The schemas below are written once, here: the reference and Triton backends are defined from
them, and the C++ extension registers implementations only (``TORCH_LIBRARY_IMPL``) for the names
``define_schemas`` defines. The fake implementations (shapes and dtypes for ``torch.compile``) are
shared by every backend, so every output shape depends on the input shapes alone.

Per-channel statistics (the "stat dtype": float32, float64 for float64 input):

* statistics, the stack ``finalize`` merges: ``(P, 3, C)``; ``stats[p]`` holds source p's rows
  (count, mean, M2), M2 the sum of squared deviations from its mean. Sources merge with Chan's
  formula in ascending p (never E[x^2] - E[x]^2), so a result does not depend on scheduling.
  ``batch_stats`` returns one source, ``(3, C)``; stacking several (``torch.stack`` or
  ``all_gather_into_tensor``) gives the ``(P, 3, C)`` stack.
* sums, the stack ``backward_finalize`` adds: ``(P, 3, C)``, rows (count, sum dy,
  sum dy * (x - mean)); ``backward_reduce`` returns one source, ``(3, C)``.
* saved tensors, the same for every backend: ``mean`` = mu_k, ``invstd`` = 1/sig_k,
  ``batch_mean`` = m_B, ``batch_invstd`` = 1/s_B, each (C,), and ``alpha`` = a_k, 0-d.
* normalize coefficients: ``(3, C)`` rows (center, scale, shift) = (mu_k, gamma/sig_k, beta).
* dx coefficients: ``(4, C)`` rows (A, center, B, shift) with gradient through the statistics
  (center = m_B), ``(1, C)`` row A without (dx = A * dy, x unread), ``(0, C)`` without input
  gradient.

The fused epilogue (``normalize``, ``train_forward``, ``eval_forward``): ``y = relu(n + residual)``
where ``n`` is the normalized value, ``residual`` (optional) a tensor of x's shape and dtype and
``relu`` a flag; computed in the statistics' dtype and rounded once. Its backward (``backward``,
``backward_reduce``, ``backward_dx``) takes ``relu_output``, the forward's ``y`` when the forward
applied the ReLU: every pass then reads ``dy * (y > 0)`` in place of ``dy`` (the mask is recovered
from the output, not stored), which is also the residual's gradient. ``residual_grad`` asks for it:
``grad_residual`` is written by the same element-wise pass as ``grad_x``, in x's dtype and memory
format; it is ``(0,)``-empty unless ``residual_grad`` and ``relu_output`` (without a ReLU the
residual's gradient is ``dy`` itself, which the caller passes on).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

NAMESPACE = "dbn"

_BUFFERS = ("Tensor(a!)? running_mean, Tensor(b!)? running_var, "
            "Tensor(c!)? dbn_mean, Tensor(d!)? dbn_std")
_STEP = "float? momentum, float eps, float alpha_scale, float alpha_power, float alpha_offset"
# The authors' variant (keyword-only, last, so that positional callers are unaffected): normalize
# with the batch statistics and BN's gradient, alpha-average the mean and the inverse std.
_VARIANT = "bool normalize_with_batch=False"
_SAVED = "Tensor mean, Tensor invstd, Tensor batch_mean, Tensor batch_invstd, Tensor alpha"
# The fused epilogue y = relu?(normalized + residual?), and what its backward reads: the ReLU
# mask from the saved output (y > 0), the residual's gradient from the same element-wise pass.
_EPILOGUE = "Tensor? residual=None, bool relu=False"
_EPILOGUE_GRAD = "Tensor? relu_output=None, bool residual_grad=False"

SCHEMAS = {
    # ---- passes ----
    "batch_stats": "(Tensor x, Tensor(a!)? num_batches_tracked) -> Tensor",
    "finalize": (
        f"(Tensor stats, Tensor? weight, Tensor? bias, {_BUFFERS}, "
        f"Tensor? num_batches_tracked, {_STEP}, *, {_VARIANT}) -> ({_SAVED}, Tensor coef)"),
    "normalize": f"(Tensor x, Tensor coef, {_EPILOGUE}) -> Tensor",
    "backward_reduce": "(Tensor grad_y, Tensor x, Tensor mean, Tensor? relu_output=None) -> Tensor",
    "backward_finalize": (
        "(Tensor sums, Tensor? weight, Tensor invstd, Tensor batch_mean, Tensor batch_invstd, "
        "Tensor alpha, bool grad_through_stats, bool input_grad) "
        "-> (Tensor grad_weight, Tensor grad_bias, Tensor coef)"),
    "backward_dx": (
        f"(Tensor grad_y, Tensor x, Tensor coef, {_EPILOGUE_GRAD}) "
        "-> (Tensor grad_x, Tensor grad_residual)"),
    # ---- fused single-device compositions ----
    "train_forward": (
        f"(Tensor x, Tensor? weight, Tensor? bias, {_BUFFERS}, "
        f"Tensor(e!)? num_batches_tracked, {_STEP}, {_EPILOGUE}, *, {_VARIANT}) "
        f"-> (Tensor y, {_SAVED})"),
    "eval_forward": (
        "(Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor spread, float eps, "
        f"bool spread_is_std, {_EPILOGUE}) -> (Tensor y, Tensor invstd)"),
    "backward": (
        "(Tensor grad_y, Tensor x, Tensor? weight, Tensor mean, Tensor invstd, "
        "Tensor batch_mean, Tensor batch_invstd, Tensor alpha, bool grad_through_stats, "
        f"bool input_grad, {_EPILOGUE_GRAD}) "
        "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)"),
}
"""Every op of a backend, by entry name. Notes on the arguments:

* ``momentum=None`` is PyTorch's cumulative average (f = 1/k). Buffers that are ``None`` are not
  updated; without ``dbn_mean``/``dbn_std`` a_k = 1 (plain batch norm).
* ``batch_stats`` and ``train_forward`` increment ``num_batches_tracked``; ``finalize`` reads the
  incremented value as k (a_k, and f = 1/k for ``momentum=None``).
* ``finalize``: the batch variance is M2 / n and PyTorch's ``running_var`` takes M2 / (n - 1),
  n the total count of the stack.
* ``normalize_with_batch`` (``finalize``, ``train_forward``; ignored without ``dbn_mean``): the
  step normalizes with the batch statistics, and its saved tensors are those of batch norm
  (mean = batch_mean, invstd = batch_invstd, alpha = 1: BN's gradient), while the buffers take
  ``dbn_mean <- lerp(dbn_mean, m_B, a_k)`` and ``dbn_std <- 1 / lerp(1 / dbn_std, 1 / s_B, a_k)``
  (the average of the inverse std, which evaluation divides by).
* ``eval_forward``: ``spread`` is ``dbn_std`` (``spread_is_std``) or ``running_var`` (then
  invstd = 1/sqrt(var + eps)).
* ``backward``/``backward_finalize``: ``alpha`` is read only when ``grad_through_stats``;
  ``grad_x`` is empty unless ``input_grad``; ``grad_weight`` and ``grad_bias`` are (C,) in the
  stat dtype (callers cast them to the parameters').
"""

PASSES = ("batch_stats", "finalize", "normalize", "backward_reduce", "backward_finalize",
          "backward_dx")
FUSED = ("train_forward", "eval_forward", "backward")


def stat_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulation and saved-statistics dtype: float64 for float64 input, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def empty_like_preserving(x: torch.Tensor) -> torch.Tensor:
    """An output with ``x``'s shape, dtype and memory format (NCHW stays NCHW, NHWC stays NHWC)."""
    return torch.empty_like(x, memory_format=torch.preserve_format)


def dx_coef_rows(grad_through_stats: bool, input_grad: bool) -> int:
    """Rows of ``backward_finalize``'s dx coefficients (see the module docstring)."""
    if not input_grad:
        return 0
    return 4 if grad_through_stats else 1


# ---- fake implementations: shapes and dtypes only, shared by every backend -------------------

def _per_channel(like: torch.Tensor, C: int, dtype: torch.dtype, rows: int | None = None):
    return like.new_empty((C,) if rows is None else (rows, C), dtype=dtype)


def _saved(like: torch.Tensor, C: int, dtype: torch.dtype):
    return (*(_per_channel(like, C, dtype) for _ in range(4)), like.new_empty((), dtype=dtype))


def _fake_batch_stats(x, num_batches_tracked):
    return _per_channel(x, x.shape[1], stat_dtype(x), rows=3)


def _fake_finalize(stats, weight, bias, running_mean, running_var, dbn_mean, dbn_std,
                   num_batches_tracked, momentum, eps, alpha_scale, alpha_power, alpha_offset,
                   *, normalize_with_batch=False):
    C = stats.shape[-1]
    return (*_saved(stats, C, stats.dtype), _per_channel(stats, C, stats.dtype, rows=3))


def _fake_normalize(x, coef, residual=None, relu=False):
    return empty_like_preserving(x)


def _fake_backward_reduce(grad_y, x, mean, relu_output=None):
    return _per_channel(x, x.shape[1], stat_dtype(x), rows=3)


def _fake_backward_finalize(sums, weight, invstd, batch_mean, batch_invstd, alpha,
                            grad_through_stats, input_grad):
    C = sums.shape[-1]
    return (_per_channel(sums, C, sums.dtype), _per_channel(sums, C, sums.dtype),
            _per_channel(sums, C, sums.dtype, rows=dx_coef_rows(grad_through_stats, input_grad)))


def residual_grad_written(relu_output, residual_grad: bool) -> bool:
    """Whether the backward ops write ``grad_residual`` (see the module docstring)."""
    return residual_grad and relu_output is not None


def _grad_residual(x, relu_output, residual_grad):
    return empty_like_preserving(x) if residual_grad_written(relu_output, residual_grad) \
        else x.new_empty((0,))


def _fake_backward_dx(grad_y, x, coef, relu_output=None, residual_grad=False):
    grad_x = empty_like_preserving(x) if coef.shape[0] else x.new_empty((0,))
    return grad_x, _grad_residual(x, relu_output, residual_grad)


def _fake_train_forward(x, weight, bias, running_mean, running_var, dbn_mean, dbn_std,
                        num_batches_tracked, momentum, eps, alpha_scale, alpha_power, alpha_offset,
                        residual=None, relu=False, *, normalize_with_batch=False):
    return (empty_like_preserving(x), *_saved(x, x.shape[1], stat_dtype(x)))


def _fake_eval_forward(x, weight, bias, mean, spread, eps, spread_is_std, residual=None,
                       relu=False):
    return empty_like_preserving(x), _per_channel(x, x.shape[1], stat_dtype(x))


def _fake_backward(grad_y, x, weight, mean, invstd, batch_mean, batch_invstd, alpha,
                   grad_through_stats, input_grad, relu_output=None, residual_grad=False):
    grad_x = empty_like_preserving(x) if input_grad else x.new_empty((0,))
    C = x.shape[1]
    return (grad_x, _per_channel(x, C, stat_dtype(x)), _per_channel(x, C, stat_dtype(x)),
            _grad_residual(x, relu_output, residual_grad))


FAKES = {
    "batch_stats": _fake_batch_stats,
    "finalize": _fake_finalize,
    "normalize": _fake_normalize,
    "backward_reduce": _fake_backward_reduce,
    "backward_finalize": _fake_backward_finalize,
    "backward_dx": _fake_backward_dx,
    "train_forward": _fake_train_forward,
    "eval_forward": _fake_eval_forward,
    "backward": _fake_backward,
}


def qualname(backend: str, entry: str) -> str:
    return f"{NAMESPACE}::{backend}_{entry}"


def op(backend: str, entry: str):
    """The ``torch.ops`` overload packet for one backend entry point."""
    return getattr(torch.ops.dbn, f"{backend}_{entry}")


def define_schemas(backend: str) -> None:
    """Define every op of ``backend`` with its schema and shared fake, once per process (names
    already defined are left alone).

    For the compiled extension this runs right after it is loaded: the extension registers
    kernels only, the dispatcher checks each kernel's C++ signature against its schema when the
    schema arrives, and a mismatch (a build from older sources) raises here, where
    ``_extension.check_registration`` turns it into a clear message."""
    for entry, schema in SCHEMAS.items():
        name = qualname(backend, entry)
        if _is_defined(name):
            continue
        torch.library.define(name, schema)
        torch.library.register_fake(name)(FAKES[entry])


def _is_defined(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(name, "")
    except RuntimeError:
        return False
    return True


def missing_kernels(backend: str, dispatch_key: str) -> list[str]:
    """The ops of ``backend`` without a kernel for ``dispatch_key`` (an extension built from
    older sources registers fewer, or other, names)."""
    return [qualname(backend, entry) for entry in SCHEMAS
            if not torch._C._dispatch_has_kernel_for_dispatch_key(
                qualname(backend, entry), dispatch_key)]


def define_backend(backend: str, impls: dict[str, Callable], device_types: Sequence[str]) -> None:
    """Define the ops of a Python backend and register its kernels (every entry of SCHEMAS)."""
    missing = set(SCHEMAS) - set(impls)
    if missing:
        raise ValueError(f"backend {backend!r} lacks {sorted(missing)}")
    define_schemas(backend)
    for entry in SCHEMAS:
        torch.library.impl(qualname(backend, entry), tuple(device_types))(impls[entry])
