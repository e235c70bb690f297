"""End-to-end: images/s of a ResNet-50 training step (``dbn-bench --model resnet50``).

One step = zero the gradients, forward under autocast (bf16) or in float32, cross-entropy loss,
backward, SGD with momentum. Variants (named like the kernel providers, so ``--providers``
selects them):

* ``torch``: the model as built, with ``nn.BatchNorm2d`` (PyTorch picks cuDNN or native);
* ``<backend>-bn``: ``dbn.convert(model, backend=...)``, the project's plain batch norm;
* ``<backend>-dbn``: ``dbn.convert(model, alpha=0.25, backend=...)``, Diminishing batch norm;
* ``<backend>-bn-fused``, ``<backend>-dbn-fused``: the same, then ``dbn.fuse`` (a ``torch.fx``
  GraphModule whose norms carry the ReLU and residual add that follow them, in their kernels).

Without ``--providers`` every project variant runs with and without ``fuse``; ``--providers``
names variants (``reference-bn-fused`` needs the ``reference-bn`` provider to be available).

Every variant starts from the same weights and trains on the same random batch. A step whose loss
is not finite is reported as failed. On a GPU the usual training settings apply
(``cudnn.benchmark``, channels_last, AMP bf16); on CPU a tiny float32 batch shows the command
works and says little about speed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..convert import convert
from ..fuse import fuse
from .resnet import resnet50
from .shapes import DTYPES, memory_format
from .timing import Timer, TimerSettings, Timing

MODELS = ("resnet50",)
MODEL_VARIANT_FAMILIES = ("torch", "bn", "dbn")
"""Which providers are model variants: ``torch`` and the project's ``*-bn`` / ``*-dbn``."""

GPU_STEP_SETTINGS = TimerSettings(warmup_ms=3000.0, budget_ms=4000.0, min_reps=10, max_reps=100,
                                  min_warmup_calls=5)
CPU_STEP_SETTINGS = TimerSettings(warmup_ms=0.0, budget_ms=0.0, min_reps=3, max_reps=3,
                                  min_warmup_calls=1)


FUSED_SUFFIX = "-fused"


def provider_of_variant(name: str) -> str:
    """``cuda-bn-fused`` -> ``cuda-bn`` (the provider whose availability decides); others as they
    are."""
    base = name.removesuffix(FUSED_SUFFIX)
    return base if base != name and base.endswith(("-bn", "-dbn")) else name


def is_model_variant(provider_name: str) -> bool:
    name = provider_of_variant(provider_name)
    return name == "torch" or name.endswith(("-bn", "-dbn"))


def model_variants(providers: list[str], requested: list[str] | None = None) -> list[str]:
    """The variants for available ``providers``: each project provider gives its converted model
    and its converted-then-fused one. With ``requested``, only the variants named there."""
    variants = []
    for name in providers:
        if not is_model_variant(name) or name != provider_of_variant(name):
            continue
        candidates = [name] if name == "torch" else [name, name + FUSED_SUFFIX]
        variants += [v for v in candidates if not requested or v in requested]
    return variants


@dataclass
class ModelRow:
    model: str
    variant: str
    batch: int
    image_size: int
    precision: str
    layout: str
    status: str
    reason: str = ""
    timing: Timing | None = None
    final_loss: float | None = None
    speedup_vs_torch: float | None = None

    @property
    def median_ms(self) -> float | None:
        return self.timing.median_ms if self.timing else None

    @property
    def images_per_s(self) -> float | None:
        return self.batch / (self.timing.median_ms * 1e-3) if self.timing else None

    def to_dict(self) -> dict:
        timing = self.timing
        return {
            "model": self.model, "provider": self.variant, "batch": self.batch,
            "image_size": self.image_size, "precision": self.precision, "layout": self.layout,
            "status": self.status, "reason": self.reason,
            "median_ms": timing.median_ms if timing else None,
            "p20_ms": timing.p20_ms if timing else None,
            "p80_ms": timing.p80_ms if timing else None,
            "reps": timing.reps if timing else None,
            "images_per_s": self.images_per_s, "speedup_vs_torch": self.speedup_vs_torch,
            "final_loss": self.final_loss,
        }


def precision_name(dtype_name: str) -> str:
    return "fp32" if dtype_name == "float32" else f"amp-{dtype_name}"


def _variant_model(base: torch.nn.Module, variant: str) -> torch.nn.Module:
    model = copy.deepcopy(base)
    if variant == "torch":
        return model
    fused = variant != provider_of_variant(variant)
    backend, family = provider_of_variant(variant).rsplit("-", 1)
    model = convert(model, alpha=0.25 if family == "dbn" else None, backend=backend)
    return fuse(model) if fused else model


def time_training_step(base: torch.nn.Module, variant: str, batch: int, image_size: int,
                       dtype_name: str, layout: str, device: torch.device,
                       timer: Timer) -> ModelRow:
    row = ModelRow(model="resnet50", variant=variant, batch=batch, image_size=image_size,
                   precision=precision_name(dtype_name), layout=layout, status="failed")
    fmt = memory_format(layout)
    model = _variant_model(base, variant).to(device=device, memory_format=fmt).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=gen, device=device)
    images = images.contiguous(memory_format=fmt)
    labels = torch.randint(0, 1000, (batch,), generator=gen, device=device)
    amp = dtype_name != "float32"
    last_loss = []

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=DTYPES[dtype_name], enabled=amp):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        last_loss[:] = [loss.detach()]

    try:
        step()
        first = float(last_loss[0])
        if not torch.isfinite(torch.tensor(first)):
            row.reason = f"the first step's loss is {first}, not timed"
            return row
        row.timing = timer.time(step)
        row.final_loss = float(last_loss[0])
    except Exception as exc:
        row.reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
        row.timing = None
        return row
    if not torch.isfinite(torch.tensor(row.final_loss)):
        row.reason, row.timing = f"the loss became {row.final_loss} while timing", None
        return row
    row.status = "ok"
    return row


def run_model_benchmark(model_name: str, variants: list[str], batch: int, image_size: int,
                        dtypes: list[str], layouts: list[str], device: torch.device,
                        progress=None) -> tuple[list[ModelRow], str]:
    """Rows for every (precision, layout, variant) and where the ResNet-50 definition came from."""
    if model_name not in MODELS:
        raise ValueError(f"unknown model {model_name!r}; choose one of {MODELS}")
    torch.manual_seed(0)
    base, source = resnet50()
    timer = Timer(device, GPU_STEP_SETTINGS if device.type == "cuda" else CPU_STEP_SETTINGS)
    rows: list[ModelRow] = []
    cudnn = torch.backends.cudnn
    # cudnn.benchmark on, as a training script with fixed shapes sets it; the flags context
    # restores everything afterwards (and is allowed where global flag mutation is not).
    with cudnn.flags(enabled=cudnn.enabled, benchmark=True, deterministic=cudnn.deterministic,
                     allow_tf32=cudnn.allow_tf32):
        for dtype_name in dtypes:
            for layout in layouts:
                group = []
                for variant in variants:
                    if progress:
                        progress(f"{model_name} {precision_name(dtype_name)} {layout} {variant}")
                    group.append(time_training_step(base, variant, batch, image_size,
                                                    dtype_name, layout, device, timer))
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                torch_row = next((r for r in group if r.variant == "torch" and r.timing), None)
                for r in group:
                    if torch_row and r.timing:
                        r.speedup_vs_torch = torch_row.median_ms / r.median_ms
                rows += group
    return rows, source
