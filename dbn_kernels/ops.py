"""The backend contract: three ``torch.library`` ops per backend under the ``dbn`` namespace.

Every backend ``B`` provides

* ``dbn::B_train_forward``  one training step: batch statistics, a_k from the device counter,
  every buffer update, the normalised output and the tensors backward needs;
* ``dbn::B_eval_forward``   one element-wise pass with stored statistics;
* ``dbn::B_backward``       the analytic DBN backward (two reductions, one element-wise pass).

The schemas below are the single source of truth: the reference and Triton backends are defined
from them here, the CUDA extension defines the same schemas in C++ and a test checks they agree.
The fake implementations (shape/dtype propagation for ``torch.compile``) are shared by all.

Saved tensors, the same for every backend (all ``stat_dtype``: float32, float64 for float64 input):
``mean`` = mu_k, ``invstd`` = 1/sig_k, ``batch_mean`` = m_B, ``batch_invstd`` = 1/s_B, each (C,),
and ``alpha`` = a_k, a 0-d tensor.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

NAMESPACE = "dbn"

TRAIN_FORWARD_SCHEMA = (
    "(Tensor x, Tensor? weight, Tensor? bias, "
    "Tensor(a!)? running_mean, Tensor(b!)? running_var, "
    "Tensor(c!)? dbn_mean, Tensor(d!)? dbn_std, Tensor(e!)? num_batches_tracked, "
    "float? momentum, float eps, float alpha_scale, float alpha_power, float alpha_offset) "
    "-> (Tensor y, Tensor mean, Tensor invstd, Tensor batch_mean, Tensor batch_invstd, Tensor alpha)"
)
"""Training step. ``momentum=None`` is PyTorch's cumulative average (f = 1/k). Buffers that are
``None`` are not updated; without ``dbn_mean``/``dbn_std`` a_k = 1 (plain batch norm)."""

EVAL_FORWARD_SCHEMA = (
    "(Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor spread, float eps, "
    "bool spread_is_std) -> (Tensor y, Tensor invstd)"
)
"""Evaluation: ``spread`` is ``dbn_std`` (``spread_is_std``) or ``running_var`` (then
invstd = 1/sqrt(var + eps))."""

BACKWARD_SCHEMA = (
    "(Tensor grad_y, Tensor x, Tensor? weight, Tensor mean, Tensor invstd, Tensor batch_mean, "
    "Tensor batch_invstd, Tensor alpha, bool grad_through_stats, bool input_grad) "
    "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)"
)
"""``alpha`` is read only when ``grad_through_stats``; ``grad_x`` is empty unless ``input_grad``.
``grad_weight`` and ``grad_bias`` are (C,) in ``stat_dtype`` (callers cast to the parameters')."""

SCHEMAS = {
    "train_forward": TRAIN_FORWARD_SCHEMA,
    "eval_forward": EVAL_FORWARD_SCHEMA,
    "backward": BACKWARD_SCHEMA,
}


def stat_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulation and saved-statistics dtype: float64 for float64 input, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def empty_like_preserving(x: torch.Tensor) -> torch.Tensor:
    """An output with ``x``'s shape, dtype and memory format (NCHW stays NCHW, NHWC stays NHWC)."""
    return torch.empty_like(x, memory_format=torch.preserve_format)


# ---- fake implementations: shapes and dtypes only, shared by every backend -------------------

def _fake_train_forward(x, weight, bias, running_mean, running_var, dbn_mean, dbn_std,
                        num_batches_tracked, momentum, eps, alpha_scale, alpha_power, alpha_offset):
    C = x.shape[1]
    stat = x.new_empty((C,), dtype=stat_dtype(x))
    return (empty_like_preserving(x), stat, torch.empty_like(stat), torch.empty_like(stat),
            torch.empty_like(stat), x.new_empty((), dtype=stat_dtype(x)))


def _fake_eval_forward(x, weight, bias, mean, spread, eps, spread_is_std):
    return empty_like_preserving(x), x.new_empty((x.shape[1],), dtype=stat_dtype(x))


def _fake_backward(grad_y, x, weight, mean, invstd, batch_mean, batch_invstd, alpha,
                   grad_through_stats, input_grad):
    grad_x = empty_like_preserving(x) if input_grad else x.new_empty((0,))
    stat = x.new_empty((x.shape[1],), dtype=stat_dtype(x))
    return grad_x, stat, torch.empty_like(stat)


FAKES = {
    "train_forward": _fake_train_forward,
    "eval_forward": _fake_eval_forward,
    "backward": _fake_backward,
}


def qualname(backend: str, entry: str) -> str:
    return f"{NAMESPACE}::{backend}_{entry}"


def op(backend: str, entry: str):
    """The ``torch.ops`` overload packet for one backend entry point."""
    return getattr(torch.ops.dbn, f"{backend}_{entry}")


def define_backend(backend: str, impls: dict[str, Callable], device_types: Sequence[str]) -> None:
    """Define the three ops of a Python backend, register its kernels and the shared fakes."""
    for entry, schema in SCHEMAS.items():
        name = qualname(backend, entry)
        torch.library.define(name, schema)
        torch.library.impl(name, tuple(device_types))(impls[entry])
        torch.library.register_fake(name)(FAKES[entry])


def register_fakes(backend: str) -> None:
    """Attach the shared fakes to ops whose schemas were defined elsewhere (the C++ extension)."""
    for entry in SCHEMAS:
        torch.library.register_fake(qualname(backend, entry))(FAKES[entry])
