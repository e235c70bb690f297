"""Drop-in modules: subclasses of ``torch.nn.BatchNorm1d/2d/3d`` and ``torch.nn.SyncBatchNorm``
on the project's kernels.

``BatchNorm*d`` and ``SyncBatchNorm`` have exactly PyTorch's parameters, buffers and state_dict.
``DiminishingBatchNorm*d`` and ``SyncDiminishingBatchNorm`` add the buffers ``dbn_mean`` and
``dbn_std``; a plain batch-norm checkpoint (which lacks them) loads under ``strict=True`` and seeds
them from the running statistics. The sync layers normalise a training batch with the statistics
of every rank of their process group and are the local layers otherwise.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn
from torch.fx import Proxy

from . import backends
from ._checks import check_activation, check_rank
from .functional import EVAL_STATS, NORMALIZE_WITH, batch_norm, diminishing_batch_norm
from .schedules import AlphaLike, as_schedule
from .sync import group_or_default

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "DiminishingBatchNorm1d",
           "DiminishingBatchNorm2d", "DiminishingBatchNorm3d", "SyncBatchNorm",
           "SyncDiminishingBatchNorm"]


@functools.lru_cache(maxsize=None)
def _takes_bias(torch_cls) -> bool:
    """torch >= 2.12's layers take ``bias=`` themselves; before, the layout is built here."""
    return "bias" in inspect.signature(torch_cls.__init__).parameters


_RANKS = {1: ((2, 3), "2D or 3D"), 2: ((4,), "4D"), 3: ((5,), "5D")}


class _ProjectNorm:
    """What the plain and the Diminishing layers share: construction, rank check, backend."""

    _dims: int
    _torch_cls: type

    def _setup(self, num_features, eps, momentum, affine, track_running_stats, device, dtype,
               bias, backend, activation=None, **torch_kwargs):
        kwargs = {"device": device, "dtype": dtype, **torch_kwargs}
        if _takes_bias(self._torch_cls):
            kwargs["bias"] = bias
        self._torch_cls.__init__(self, num_features, eps, momentum, affine, track_running_stats,
                                 **kwargs)
        if affine and not bias and self.bias is not None:
            self.register_parameter("bias", None)
        self.backend = backends.validate_name(backend)
        self.activation = activation

    # The fused epilogue, forward(x, residual) = activation(norm(x) + residual): a plain
    # attribute (no state_dict entry), validated where it is set.
    @property
    def activation(self) -> str | None:
        return self._activation

    @activation.setter
    def activation(self, value: str | None) -> None:
        check_activation(value)
        self._activation = value

    def _epilogue_repr(self) -> str:
        return "" if self._activation is None else f", activation={self._activation!r}"

    def _check_input_dim(self, input):
        ranks, what = _RANKS[self._dims]
        check_rank(input, ranks, what)

    def _updates_buffers(self) -> bool:
        return self.training and self.track_running_stats

    def _process_group(self):
        """The group a training step synchronises over; ``None`` for the local layers."""
        return None

    def _fx_node(self, input: Proxy, **kwargs) -> Proxy:
        """What ``forward`` returns under ``torch.fx.symbolic_trace``: one ``call_module`` node
        for the layer, as torch's own layers get. Tracing through ``forward`` instead would fail
        (the rank check branches on a traced shape) or, worse, freeze the train/eval branch and
        the buffer updates into the graph; as a node, the traced module calls this very layer,
        so ``.train()``/``.eval()`` and the buffers behave as in eager. ``forward`` calls this
        when its input is a ``torch.fx.Proxy``; keyword arguments left at ``None`` (their
        default) are not recorded, so the node calls the layer as the traced code did."""
        tracer = input.tracer
        path = tracer.path_of_module(self)
        if not path:  # the traced root itself: a call_module node needs a submodule to call
            raise RuntimeError(
                f"torch.fx traces a {type(self).__name__} only inside a module that holds it "
                "(as with torch's batch norm layers); trace e.g. nn.Sequential(layer)")
        kwargs = {name: value for name, value in kwargs.items() if value is not None}
        return tracer.create_proxy("call_module", path, (input,), kwargs)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling. The layers' Python
        # (backend dispatch, schedules, the autograd Function) is not TorchScript, and failing
        # here names the way out instead of a compiler error deep inside forward.
        raise RuntimeError(
            f"torch.jit.script cannot compile {type(self).__name__}: call "
            "dbn_kernels.revert(model) first, which turns every dbn_kernels layer into torch's "
            "own batch norm evaluating with the same statistics (for inference and export), or "
            "use torch.jit.trace on the model in eval mode")


class _BatchNormMixin(_ProjectNorm):
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, bias: bool = True, backend: str = "auto",
                 activation: str | None = None) -> None:
        self._setup(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias,
                    backend, activation)

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(input, Proxy):
            return self._fx_node(input, residual=residual)
        self._check_input_dim(input)
        tracked = not self.training or self.track_running_stats
        return batch_norm(
            input,
            self.running_mean if tracked else None,
            self.running_var if tracked else None,
            self.weight, self.bias, self.training, self.momentum, self.eps,
            num_batches_tracked=self.num_batches_tracked if self._updates_buffers() else None,
            backend=self.backend, process_group=self._process_group(), residual=residual,
            activation=self._activation)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}" + self._epilogue_repr()


class _DiminishingMixin(_ProjectNorm):
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, bias: bool = True, alpha: AlphaLike = 0.25, eval_stats: str = "dbn",
                 grad_through_stats: bool = True, backend: str = "auto",
                 activation: str | None = None, normalize_with: str = "average") -> None:
        self._setup_diminishing(num_features, eps, momentum, affine, track_running_stats, device,
                                dtype, bias, alpha, eval_stats, grad_through_stats, backend,
                                activation, normalize_with)

    def _setup_diminishing(self, num_features, eps, momentum, affine, track_running_stats,
                           device, dtype, bias, alpha, eval_stats, grad_through_stats, backend,
                           activation, normalize_with, **torch_kwargs):
        if not track_running_stats:
            raise self._needs_tracking()
        self._setup(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias,
                    backend, activation, **torch_kwargs)
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("dbn_mean", torch.zeros(num_features, **factory))
        self.register_buffer("dbn_std", torch.ones(num_features, **factory))
        self.alpha = alpha
        self.eval_stats = eval_stats
        self.grad_through_stats = grad_through_stats
        self.normalize_with = normalize_with

    # alpha, eval_stats and normalize_with are plain attributes a user may change between steps;
    # assignment validates so that a bad value fails where it is set, naming the argument.
    @property
    def alpha(self):
        return self._alpha

    @alpha.setter
    def alpha(self, value: AlphaLike) -> None:
        self._alpha = as_schedule(value)

    @property
    def eval_stats(self) -> str:
        return self._eval_stats

    @eval_stats.setter
    def eval_stats(self, value: str) -> None:
        if value not in EVAL_STATS:
            raise ValueError(f"eval_stats must be one of {EVAL_STATS}, got {value!r}")
        self._eval_stats = value

    @property
    def normalize_with(self) -> str:
        return self._normalize_with

    @normalize_with.setter
    def normalize_with(self, value: str) -> None:
        if value not in NORMALIZE_WITH:
            raise ValueError(f"normalize_with must be one of {NORMALIZE_WITH}, got {value!r}")
        self._normalize_with = value

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if hasattr(self, "dbn_mean"):
            self.dbn_mean.zero_()
            self.dbn_std.fill_(1.0)

    def _needs_tracking(self) -> ValueError:
        return ValueError(
            f"{type(self).__name__} keeps its averaged statistics in buffers and needs "
            "track_running_stats=True; use BatchNorm with track_running_stats=False for batch "
            "statistics only")

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(input, Proxy):
            return self._fx_node(input, residual=residual)
        self._check_input_dim(input)
        if not self.track_running_stats:  # switched off after construction
            raise self._needs_tracking()
        return diminishing_batch_norm(
            input, self.dbn_mean, self.dbn_std, self.num_batches_tracked, self.weight, self.bias,
            self.running_mean, self.running_var, self.training, self._alpha, self.momentum,
            self.eps, eval_stats=self._eval_stats, grad_through_stats=self.grad_through_stats,
            backend=self.backend, process_group=self._process_group(), residual=residual,
            activation=self._activation, normalize_with=self._normalize_with)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A plain batch-norm checkpoint: start the averages from its running statistics.
        mean_key, std_key = prefix + "dbn_mean", prefix + "dbn_std"
        rm_key, rv_key = prefix + "running_mean", prefix + "running_var"
        if mean_key not in state_dict and std_key not in state_dict \
                and rm_key in state_dict and rv_key in state_dict:
            state_dict[mean_key] = state_dict[rm_key].detach().clone()
            state_dict[std_key] = torch.sqrt(state_dict[rv_key].detach() + self.eps)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", alpha={self._alpha!r}, eval_stats={self._eval_stats!r}"
                f", grad_through_stats={self.grad_through_stats}"
                f", normalize_with={self._normalize_with!r}, backend={self.backend!r}"
                + self._epilogue_repr())


class BatchNorm1d(_BatchNormMixin, nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` on dbn_kernels' kernels; extra keyword ``backend``."""

    _torch_cls, _dims = nn.BatchNorm1d, 1


class BatchNorm2d(_BatchNormMixin, nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on dbn_kernels' kernels; extra keyword ``backend``."""

    _torch_cls, _dims = nn.BatchNorm2d, 2


class BatchNorm3d(_BatchNormMixin, nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` on dbn_kernels' kernels; extra keyword ``backend``."""

    _torch_cls, _dims = nn.BatchNorm3d, 3


class DiminishingBatchNorm1d(_DiminishingMixin, nn.BatchNorm1d):
    """Diminishing batch norm over (N, C) or (N, C, L); see ``DiminishingBatchNorm2d``."""

    _torch_cls, _dims = nn.BatchNorm1d, 1


class DiminishingBatchNorm2d(_DiminishingMixin, nn.BatchNorm2d):
    """Diminishing batch norm (Ma & Klabjan, TNNLS 2024) over (N, C, H, W).

    Normalises with mu_k = a_k m_B + (1 - a_k) mu_{k-1} and sig_k likewise for the batch std,
    kept in the buffers ``dbn_mean`` and ``dbn_std``. ``alpha`` is a float in (0, 1],
    ``dbn_kernels.inverse_power(...)`` or a callable ``k -> a_k`` (host-evaluated, not graph
    safe). ``eval_stats='dbn'`` evaluates with the averaged statistics, ``'running'`` with
    PyTorch's running statistics (updated alongside). ``grad_through_stats=False`` treats the
    statistics as constants in backward.

    ``normalize_with='batch'`` is the authors' released variant: training normalises with the
    batch statistics (batch norm's forward and gradient) while ``dbn_mean`` and the inverse std
    are a_k-averaged for evaluation (``dbn_std`` = 1 / the averaged inverse std).
    ``'average'`` (default) is Algorithm 1 as printed.
    """

    _torch_cls, _dims = nn.BatchNorm2d, 2


class DiminishingBatchNorm3d(_DiminishingMixin, nn.BatchNorm3d):
    """Diminishing batch norm over (N, C, D, H, W); see ``DiminishingBatchNorm2d``."""

    _torch_cls, _dims = nn.BatchNorm3d, 3


# ---- synchronised over a process group ---------------------------------------------------------

class _SyncMixin(_ProjectNorm):
    """``torch.nn.SyncBatchNorm``'s behaviour: any input of rank >= 2; in training, with
    ``torch.distributed`` initialised and more than one rank in ``process_group`` (``None``: the
    default group), the batch statistics of every rank; otherwise the local layer's step."""

    _torch_cls = nn.SyncBatchNorm

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
        self._check_non_zero_input_channels(input)  # reads dimension 1: after the rank check

    def _process_group(self):
        return group_or_default(self.process_group) if self.training else None

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Every batch norm in ``module`` as this project's sync layer: ``dbn_kernels.convert``
        with ``sync=True`` (torch's own version would turn Diminishing layers into plain
        ``torch.nn.SyncBatchNorm``)."""
        from .convert import convert

        return convert(module, alpha=cls._convert_alpha, sync=True, process_group=process_group)


class SyncBatchNorm(_SyncMixin, _BatchNormMixin, nn.SyncBatchNorm):
    """``torch.nn.SyncBatchNorm`` on dbn_kernels' kernels, on any device ``torch.distributed``
    serves (NCCL on CUDA, gloo on CPU); extra keyword ``backend``."""

    _convert_alpha = None

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None, *, bias: bool = True, backend: str = "auto",
                 activation: str | None = None) -> None:
        self._setup(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias,
                    backend, activation, process_group=process_group)


class SyncDiminishingBatchNorm(_SyncMixin, _DiminishingMixin, nn.SyncBatchNorm):
    """Diminishing batch norm whose training statistics cover every rank's batch: the averages
    ``dbn_mean``/``dbn_std``, a_k and every buffer advance identically on all ranks. Arguments
    as ``DiminishingBatchNorm2d``'s plus ``process_group``; same state_dict."""

    _convert_alpha = 0.25

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None, *, bias: bool = True, alpha: AlphaLike = 0.25,
                 eval_stats: str = "dbn", grad_through_stats: bool = True,
                 backend: str = "auto", activation: str | None = None,
                 normalize_with: str = "average") -> None:
        self._setup_diminishing(num_features, eps, momentum, affine, track_running_stats, device,
                                dtype, bias, alpha, eval_stats, grad_through_stats, backend,
                                activation, normalize_with, process_group=process_group)
