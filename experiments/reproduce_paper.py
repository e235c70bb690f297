"""Does DBN help? The paper's experiments (Ma & Klabjan, Table 1) on data that installs offline.

Protocol: a fully connected net (two hidden layers of 100 units, the paper's MNIST model) and a
small CNN, on scikit-learn's handwritten digits (8x8 images, 1437 train / 360 test) and on
MNIST-1D (the ``mnist1d`` package generates it locally: 4000 train / 1000 test sequences of
length 40). Plain SGD, batch 32, a fixed number of epochs; each hidden layer is followed by

    none | LayerNorm | BatchNorm (torch.nn) | DBN, Algorithm 1 (normalize_with="average")
                                            | DBN, the authors' code (normalize_with="batch")

for the paper's alpha grid {1, .75, .5, .25, .1, .01, .001, 1/k, 1/k^2}, 5 seeds, two learning
rates. A DBN model is evaluated with the statistics it was trained with (eval_stats="dbn") and
also with PyTorch's running statistics (eval_stats="running"), to see when the latter is safe.

How the seeds run: the replicates of one configuration train as one model whose layers are
grouped (grouped convolutions, batched matrix products for the linear layers, per-channel
normalization, GroupNorm with one group per seed for LayerNorm), so no value crosses from one
seed's group to another's; each seed has its own initialisation and its own data order, and the
summed loss gives each group exactly its own gradient. ``check_seeds_independent`` verifies it
(a seed's trajectory does not change when another seed's data does), and
``check_alpha_one_is_batch_norm`` that DBN at alpha = 1 trains exactly as torch's batch norm.

Usage::

    pip install ".[experiments]"        # scikit-learn, mnist1d, matplotlib
    python experiments/reproduce_paper.py --quick --out /tmp/dbn-quick   # smoke test, ~1 min
    python experiments/reproduce_paper.py --out experiments/results      # full, ~30 min, 2 cores
    python experiments/reproduce_paper.py --resnet18 only --out DIR      # ResNet-18 (a GPU)
    python experiments/reproduce_paper.py --render --out DIR             # tables/plots again

Writes ``results.json`` (every run: per-epoch training loss and test errors), ``results.md``
(tables of best and final test error, mean +- std over seeds, and divergences) and one PNG of
training-loss curves per dataset and model.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import dbn_kernels as dbn

ALPHAS = ["1", "0.75", "0.5", "0.25", "0.1", "0.01", "0.001", "1/k", "1/k^2"]
VARIANTS = ("average", "batch")
CHANCE_ERROR = 0.9  # ten balanced classes: the test error of a diverged (NaN) model


# ---- data ----------------------------------------------------------------------------------------

@dataclass
class Data:
    name: str
    x_train: torch.Tensor  # (N, C, *S) float32
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits() -> Data:
    """scikit-learn's 8x8 digits, pixels scaled to [0, 1], a fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    x, y = sk_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)

    def images(a):
        return torch.tensor(a / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    return Data("digits", images(x_tr), torch.tensor(y_tr), images(x_te), torch.tensor(y_te))


def load_mnist1d() -> Data:
    """MNIST-1D as its package generates it (no download), the package's own split."""
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())

    def seqs(a):
        return torch.tensor(a, dtype=torch.float32).unsqueeze(1)
    return Data("mnist1d", seqs(d["x"]), torch.tensor(d["y"]), seqs(d["x_test"]),
                torch.tensor(d["y_test"]))


LOADERS = {"digits": load_digits, "mnist1d": load_mnist1d}


# ---- models: S seeds side by side, never mixing ---------------------------------------------------

@dataclass(frozen=True)
class Norm:
    """One normalization configuration: kind none | ln | bn | dbn, and for dbn the variant and
    alpha (a name from ALPHAS)."""

    kind: str
    variant: str = ""
    alpha: str = ""

    @property
    def label(self) -> str:
        if self.kind != "dbn":
            return {"none": "none", "ln": "LayerNorm", "bn": "BatchNorm"}[self.kind]
        return f"DBN-{self.variant} a={self.alpha}"

    def schedule(self):
        if self.alpha == "1/k":
            return dbn.inverse_power(1.0)
        if self.alpha == "1/k^2":
            return dbn.inverse_power(2.0)
        return float(self.alpha)


def norm_layer(norm: Norm, dim: int, channels: int, seeds: int) -> nn.Module:
    """The normalization of ``channels`` per seed for ``seeds`` groups side by side."""
    total = seeds * channels
    if norm.kind == "none":
        return nn.Identity()
    if norm.kind == "ln":  # per sample over each seed's features (and positions)
        return nn.GroupNorm(seeds, total)
    if norm.kind == "bn":
        return (nn.BatchNorm1d if dim == 1 else nn.BatchNorm2d)(total)
    cls = dbn.DiminishingBatchNorm1d if dim == 1 else dbn.DiminishingBatchNorm2d
    return cls(total, alpha=norm.schedule(), normalize_with=norm.variant)


def grouped(dim: int, c_in: int, c_out: int, seeds: int, kernel: int, **kw) -> nn.Module:
    """``seeds`` independent convolutions."""
    conv = nn.Conv1d if dim == 1 else nn.Conv2d
    return conv(seeds * c_in, seeds * c_out, kernel, groups=seeds, **kw)


class GroupedLinear(nn.Module):
    """``seeds`` independent linear layers on (B, seeds * in) -> (B, seeds * out), initialised
    as ``nn.Linear`` is (uniform in +-1/sqrt(in), weight and bias). One batched matmul: on a
    CPU several times faster than a grouped 1x1 convolution."""

    def __init__(self, c_in: int, c_out: int, seeds: int):
        super().__init__()
        bound = 1 / math.sqrt(c_in)
        self.weight = nn.Parameter(torch.empty(seeds, c_in, c_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(seeds, 1, c_out).uniform_(-bound, bound))

    def forward(self, x):
        batch, seeds = x.shape[0], self.weight.shape[0]
        h = torch.baddbmm(self.bias, x.view(batch, seeds, -1).transpose(0, 1), self.weight)
        return h.transpose(0, 1).reshape(batch, -1)


class Stacked(nn.Module):
    """``seeds`` copies of a model in one: input (B, seeds * C, *S), output (B, seeds, 10).
    The channels are seed-major, so flattening (B, seeds * C, *S) to (B, seeds * C * prod(S))
    keeps each seed's values together, as ``GroupedLinear`` reads them."""

    def __init__(self, body: nn.Sequential, seeds: int):
        super().__init__()
        self.body, self.seeds = body, seeds

    def forward(self, x):
        return self.body(x).view(x.shape[0], self.seeds, -1)


def fnn(data: Data, norm: Norm, seeds: int, hidden: int = 100) -> Stacked:
    """The paper's MNIST network: in -> 100 -> 100 -> 10, normalization before each ReLU."""
    features = data.x_train[0].numel()
    layers: list[nn.Module] = [nn.Flatten()]
    for c_in, c_out in ((features, hidden), (hidden, hidden)):
        layers += [GroupedLinear(c_in, c_out, seeds), norm_layer(norm, 1, c_out, seeds),
                   nn.ReLU()]
    layers.append(GroupedLinear(hidden, 10, seeds))
    return Stacked(nn.Sequential(*layers), seeds)


def cnn(data: Data, norm: Norm, seeds: int) -> Stacked:
    """Three convolutions with normalization and ReLU, then a linear classifier: 2-D for the
    8x8 digits (16-32-32 channels, one 2x2 max-pool, global average), 1-D for MNIST-1D's
    length-40 sequences (32 channels, two stride-2 convolutions, a linear layer over 10 x 32)."""
    dim = data.x_train.dim() - 2
    if dim == 2:
        widths, strides, pool = (16, 32, 32), (1, 1, 1), True
    else:
        widths, strides, pool = (32, 32, 32), (1, 2, 2), False
    layers, c_in, length = [], data.x_train.shape[1], data.x_train.shape[-1]
    for i, (c_out, stride) in enumerate(zip(widths, strides)):
        kernel = 5 if (dim == 1 and i == 0) else 3
        layers += [grouped(dim, c_in, c_out, seeds, kernel, stride=stride, padding=kernel // 2),
                   norm_layer(norm, dim, c_out, seeds), nn.ReLU()]
        length = (length + 2 * (kernel // 2) - kernel) // stride + 1
        if pool and i == 1:
            layers.append(nn.MaxPool2d(2))
        c_in = c_out
    if dim == 2:
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), GroupedLinear(c_in, 10, seeds)]
    else:
        layers += [nn.Flatten(), GroupedLinear(c_in * length, 10, seeds)]
    return Stacked(nn.Sequential(*layers), seeds)


MODELS = {"fnn": fnn, "cnn": cnn}


def stack_inputs(x: torch.Tensor) -> torch.Tensor:
    """(seeds, B, C, *S) -> (B, seeds * C, *S): seed s's batch in group s's channels."""
    seeds, batch = x.shape[:2]
    return x.transpose(0, 1).reshape(batch, seeds * x.shape[2], *x.shape[3:])


# ---- one configuration, all its seeds ---------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    dataset: str
    model: str
    norm: Norm
    lr: float
    seeds: tuple[int, ...]
    epochs: int
    batch: int = 32
    dtype: str = "float32"
    device: str = "cpu"


@dataclass
class Run:
    """One seed of one task: what results.json holds per run."""

    dataset: str
    model: str
    norm: str
    kind: str
    variant: str
    alpha: str
    lr: float
    seed: int
    train_loss: list = field(default_factory=list)  # mean per epoch
    test_error: list = field(default_factory=list)  # per epoch, eval with dbn/torch's default
    test_error_running: list = field(default_factory=list)  # DBN with eval_stats="running"
    diverged_epoch: int | None = None
    seconds: float = 0.0


def _data_order(seeds: tuple[int, ...], n: int, epochs: int) -> torch.Tensor:
    """(epochs, seeds, n): each seed's permutations of the training set."""
    orders = torch.empty(epochs, len(seeds), n, dtype=torch.long)
    for j, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(10_000 + seed)
        for e in range(epochs):
            orders[e, j] = torch.randperm(n, generator=g)
    return orders


@torch.no_grad()
def _test_errors(model: Stacked, data: Data, seeds: int) -> torch.Tensor:
    x = data.x_test.unsqueeze(0).expand(seeds, *data.x_test.shape)
    logits = model(stack_inputs(x))  # (B, seeds, 10)
    wrong = (logits.argmax(-1) != data.y_test.unsqueeze(1)).double().mean(0)
    return torch.where(logits.isfinite().all(-1).all(0), wrong, CHANCE_ERROR)


def _evaluate(model: Stacked, data: Data, seeds: int, stats: str | None) -> list[float]:
    for m in model.modules():
        if stats is not None and isinstance(m, dbn.DiminishingBatchNorm1d | dbn.DiminishingBatchNorm2d):
            m.eval_stats = stats
    model.eval()
    errors = _test_errors(model, data, seeds).tolist()
    model.train()
    return errors


def train(task: Task, data: Data, orders: torch.Tensor | None = None,
          on_step=None) -> list[Run]:
    """Train every seed of ``task``; the model's initialisation is drawn from the first seed."""
    dtype = getattr(torch, task.dtype)
    seeds = len(task.seeds)
    torch.manual_seed(task.seeds[0])
    model = MODELS[task.model](data, task.norm, seeds).to(task.device, dtype)
    opt = torch.optim.SGD(model.parameters(), lr=task.lr)
    x_all = data.x_train.to(task.device, dtype)
    y_all = data.y_train.to(task.device)
    test = Data(data.name, x_train=x_all, y_train=y_all,
                x_test=data.x_test.to(task.device, dtype), y_test=data.y_test.to(task.device))
    n = x_all.shape[0]
    steps = n // task.batch  # the last partial batch is dropped: every step has `batch` samples
    if orders is None:
        orders = _data_order(task.seeds, n, task.epochs)
    runs = [Run(task.dataset, task.model, task.norm.label, task.norm.kind, task.norm.variant,
                task.norm.alpha, task.lr, seed) for seed in task.seeds]
    diverged = torch.zeros(seeds, dtype=torch.bool)
    is_dbn = task.norm.kind == "dbn"
    start = time.perf_counter()
    for epoch in range(task.epochs):
        order = orders[epoch].to(task.device)
        loss_sum = torch.zeros(seeds, dtype=torch.float64, device=task.device)
        for step in range(steps):
            idx = order[:, step * task.batch:(step + 1) * task.batch]  # (seeds, batch)
            logits = model(stack_inputs(x_all[idx]))
            losses = F.cross_entropy(logits.permute(0, 2, 1), y_all[idx].t(),
                                     reduction="none").mean(0)  # (seeds,)
            opt.zero_grad(set_to_none=True)
            losses.sum().backward()  # each seed's parameters get their own loss's gradient
            opt.step()
            loss_sum += losses.detach()
            if on_step is not None:
                on_step(losses.detach())
        mean_loss = (loss_sum / steps).cpu()
        newly = ~mean_loss.isfinite() & ~diverged
        errors = _evaluate(model, test, seeds, "dbn" if is_dbn else None)
        errors_running = _evaluate(model, test, seeds, "running") if is_dbn else None
        for j, run in enumerate(runs):
            if newly[j]:
                run.diverged_epoch = epoch
            run.train_loss.append(float(mean_loss[j]))
            run.test_error.append(errors[j])
            if errors_running is not None:
                run.test_error_running.append(errors_running[j])
        diverged |= newly
    seconds = time.perf_counter() - start
    for run in runs:
        run.seconds = seconds / seeds
    return runs


# ---- ResNet-18 (on a GPU) --------------------------------------------------------------------------

RESNET_SEEDS = 3
RESNET_NORMS = (Norm("bn"), Norm("ln"), Norm("dbn", "average", "0.25"),
                Norm("dbn", "average", "1/k"), Norm("dbn", "batch", "0.25"))


def resnet18(norm: Norm) -> nn.Module:
    """torchvision's ResNet-18 for 32x32 inputs (3x3 stem, no max-pool), its batch norms
    replaced as ``norm`` says: ``dbn_kernels.convert`` for DBN, GroupNorm(1, C) for LayerNorm."""
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
    model.maxpool = nn.Identity()
    if norm.kind == "dbn":
        dbn.convert(model, alpha=norm.schedule(), normalize_with=norm.variant)
    elif norm.kind == "ln":
        for parent in list(model.modules()):
            for name, child in parent.named_children():
                if isinstance(child, nn.BatchNorm2d):
                    setattr(parent, name, nn.GroupNorm(1, child.num_features))
    return model


def resnet18_runs(data: Data, device: str, seeds, epochs: int, lr: float = 0.05,
                  batch: int = 64, on_run=None) -> list[dict]:
    """ResNet-18 on the digits upsampled to 32x32 (three equal channels), one seed at a time:
    SGD with momentum 0.9 and weight decay 5e-4, as usual for ResNets. ``on_run(runs)`` is called
    with the runs so far after each one (the caller saves them: a run cut short keeps them)."""
    def images(x):
        x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
        return ((x - 0.5) / 0.5).contiguous().to(device)
    x_train, x_test = images(data.x_train), images(data.x_test)
    y_train, y_test = data.y_train.to(device), data.y_test.to(device)
    out = []
    for norm in RESNET_NORMS:
        for seed in seeds:
            torch.manual_seed(seed)
            model = resnet18(norm).to(device)
            opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
            run = Run(data.name, "resnet18", norm.label, norm.kind, norm.variant, norm.alpha, lr,
                      seed)
            g = torch.Generator().manual_seed(10_000 + seed)
            start = time.perf_counter()
            for epoch in range(epochs):
                order = torch.randperm(len(y_train), generator=g).to(device)
                steps = len(order) // batch
                total = torch.zeros((), device=device)
                model.train()
                for step in range(steps):
                    idx = order[step * batch:(step + 1) * batch]
                    loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += loss.detach()
                run.train_loss.append(float(total / steps))
                if run.diverged_epoch is None and not math.isfinite(run.train_loss[-1]):
                    run.diverged_epoch = epoch
                for stats, errors in (("dbn", run.test_error), ("running", run.test_error_running)):
                    if norm.kind != "dbn" and stats == "running":
                        continue
                    for m in model.modules():
                        if isinstance(m, dbn.DiminishingBatchNorm2d):
                            m.eval_stats = stats
                    model.eval()
                    with torch.no_grad():
                        logits = model(x_test)
                    wrong = (logits.argmax(1) != y_test).double().mean().item()
                    errors.append(wrong if logits.isfinite().all() else CHANCE_ERROR)
            run.seconds = time.perf_counter() - start
            out.append(asdict(run))
            print(f"resnet18 {norm.label} seed {seed}: best {min(run.test_error) * 100:.2f}%, "
                  f"{run.seconds:.1f} s", flush=True)
            if on_run is not None:
                on_run(out)
    return out


# ---- the checks -------------------------------------------------------------------------------------

def _steps_losses(task: Task, data: Data, orders: torch.Tensor) -> torch.Tensor:
    losses = []
    train(task, data, orders, on_step=losses.append)
    return torch.stack(losses)


def check_alpha_one_is_batch_norm(data: Data, epochs: int = 2) -> dict:
    """DBN at alpha = 1 (both variants) against torch.nn.BatchNorm, float64, same
    initialisation and data order: every step's loss, and the error evaluated with running
    statistics, must agree to rounding."""
    seeds = (0, 1)
    orders = _data_order(seeds, data.x_train.shape[0], epochs)
    result = {}
    for model in MODELS:
        base = Task(data.name, model, Norm("bn"), 0.1, seeds, epochs, dtype="float64")
        want = _steps_losses(base, data, orders)
        for variant in VARIANTS:
            task = Task(data.name, model, Norm("dbn", variant, "1"), 0.1, seeds, epochs,
                        dtype="float64")
            got = _steps_losses(task, data, orders)
            diff = ((got - want).abs() / want.abs()).max().item()
            result[f"{model}-{variant}"] = diff
    result["passed"] = all(v < 1e-9 for v in result.values())
    return result


def check_seeds_independent(data: Data, epochs: int = 1) -> dict:
    """Seed 0's trajectory with seed 1 fed one data order, then another: identical when no
    value crosses between the seeds' groups (DBN, LayerNorm and a plain model, float64)."""
    n = data.x_train.shape[0]
    result = {}
    for norm in (Norm("dbn", "average", "0.25"), Norm("ln"), Norm("none")):
        task = Task(data.name, "cnn", norm, 0.1, (0, 1), epochs, dtype="float64")
        first = _data_order((0, 1), n, epochs)
        second = first.clone()
        second[:, 1] = _data_order((7,), n, epochs)[:, 0]
        a = _steps_losses(task, data, first)
        b = _steps_losses(task, data, second)
        result[norm.label] = {"seed0_max_diff": (a[:, 0] - b[:, 0]).abs().max().item(),
                              "seed1_max_diff": (a[:, 1] - b[:, 1]).abs().max().item()}
    result["passed"] = all(v["seed0_max_diff"] == 0.0 and v["seed1_max_diff"] > 0
                           for v in result.values() if isinstance(v, dict))
    return result


# ---- the grid -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    datasets: tuple[str, ...]
    models: tuple[str, ...]
    alphas: tuple[str, ...]
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    epochs: dict  # "dataset/model" -> epochs


# Epochs sized so that the full grid (168 configurations x 5 seeds) fits in about half an hour
# on two CPU cores (grouped convolutions are slow there: the CNNs get fewer epochs).
FULL = Plan(("digits", "mnist1d"), ("fnn", "cnn"), tuple(ALPHAS), (0.1, 0.02), (0, 1, 2, 3, 4),
            {"digits/fnn": 40, "digits/cnn": 20, "mnist1d/fnn": 30, "mnist1d/cnn": 20})
QUICK = Plan(("digits",), ("fnn", "cnn"), ("1", "0.25", "1/k"), (0.1,), (0, 1),
             {"digits/fnn": 2, "digits/cnn": 2})


def norms(alphas) -> list[Norm]:
    return ([Norm("none"), Norm("ln"), Norm("bn")]
            + [Norm("dbn", v, a) for v in VARIANTS for a in alphas])


def tasks(plan: Plan, device: str) -> list[Task]:
    out = [Task(d, m, norm, lr, plan.seeds, plan.epochs[f"{d}/{m}"], device=device)
           for d in plan.datasets for m in plan.models for lr in plan.lrs
           for norm in norms(plan.alphas)]
    # the longest first, so that two workers finish together
    per_epoch = {("mnist1d", "cnn"): 2.5, ("mnist1d", "fnn"): 0.7, ("digits", "cnn"): 1.5,
                 ("digits", "fnn"): 0.3}  # seconds, measured on one core
    return sorted(out, key=lambda t: -per_epoch[(t.dataset, t.model)] * t.epochs)


_DATA: dict[str, Data] = {}


def _run_task(task: Task) -> list[dict]:
    torch.set_num_threads(1)
    if task.dataset not in _DATA:
        _DATA[task.dataset] = LOADERS[task.dataset]()
    return [asdict(r) for r in train(task, _DATA[task.dataset])]


# ---- reports --------------------------------------------------------------------------------------------

def _mean_std(values) -> str:
    a = np.asarray(values, dtype=float) * 100
    return f"{a.mean():.2f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.2f}"


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (dataset, model, lr, norm): best and final test error over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["model"], r["lr"], r["norm"]), []).append(r)
    rows = []
    for (dataset, model, lr, norm), rs in groups.items():
        row = {"dataset": dataset, "model": model, "lr": lr, "norm": norm,
               "kind": rs[0]["kind"], "variant": rs[0]["variant"], "alpha": rs[0]["alpha"],
               "seeds": len(rs),
               "best": [min(r["test_error"]) for r in rs],
               "final": [r["test_error"][-1] for r in rs],
               "diverged": sum(r["diverged_epoch"] is not None for r in rs)}
        if rs[0]["test_error_running"]:
            row["final_running"] = [r["test_error_running"][-1] for r in rs]
        rows.append(row)
    return rows


def summary_table(rows: list[dict], meta: dict, lr: float) -> list[str]:
    """One line per normalization, one column per dataset and model: best / final test error
    (mean over seeds, %) at learning rate ``lr``, with the divergences when there are any."""
    settings = [(d, m) for d in meta["datasets"] for m in meta["models"]
                if any(r["dataset"] == d and r["model"] == m and r["lr"] == lr for r in rows)]
    lines = ["| normalization | " + " | ".join(f"{d} {m.upper()}" for d, m in settings) + " |",
             "|---|" + "---|" * len(settings)]
    for norm in norms(meta["alphas"]):
        cells = []
        for d, m in settings:
            r = next((r for r in rows if (r["dataset"], r["model"], r["lr"], r["norm"])
                      == (d, m, lr, norm.label)), None)
            if r is None:
                cells.append("")
                continue
            cell = f"{np.mean(r['best']) * 100:.2f} / {np.mean(r['final']) * 100:.2f}"
            if r["diverged"]:
                cell += f" ({r['diverged']} div)"
            cells.append(cell)
        if any(cells):
            lines.append(f"| {norm.label} | " + " | ".join(cells) + " |")
    return lines


def markdown(rows: list[dict], meta: dict) -> str:
    models = list(meta["models"])
    if "resnet18" not in models:
        seeds = f"{meta['seeds']} seeds"
    elif models == ["resnet18"]:
        seeds = f"{RESNET_SEEDS} seeds"
    else:
        seeds = f"{meta['seeds']} seeds, {RESNET_SEEDS} for ResNet-18"
    lines = ["# Does DBN help? Measured results", "",
             f"{meta['when']}, {meta['device']}, torch {meta['torch']}, "
             f"{meta['seconds']:.0f} s. Test error in % (mean ± std over {seeds}): best over "
             "epochs and final; `div`: seeds whose training loss became non-finite (their error "
             "counts as chance, 90 %, from then on); `final, running`: DBN evaluated with "
             "PyTorch's running statistics instead.", ""]
    if not meta.get("complete", True):
        lines += ["**Incomplete**: the run was stopped before its last configuration; the "
                  "tables hold the runs that finished.", ""]
    for lr in meta["lrs"]:
        table = summary_table(rows, meta, lr)
        if len(table) > 2:  # a header alone: no run at this learning rate
            lines += [f"## Summary, lr {lr}: best / final test error, %, mean over seeds", ""]
            lines += table + [""]
    for dataset in meta["datasets"]:
        for model in meta["models"]:
            sel = [r for r in rows if r["dataset"] == dataset and r["model"] == model]
            if not sel:
                continue
            lrs = sorted({r["lr"] for r in sel}, reverse=True)
            epochs = meta["epochs"][f"{dataset}/{model}"]
            setup = f"{epochs} epochs, {sel[0]['seeds']} seeds"
            if model == "resnet18":
                setup += ", 32x32, batch 64, SGD with momentum 0.9 and weight decay 5e-4"
            lines += [f"## {dataset}, {model.upper()} ({setup})", ""]
            head = "| normalization |"
            rule = "|---|"
            for lr in lrs:
                head += f" best, lr {lr} | final | div | final, running |"
                rule += "---|---|---|---|"
            lines += [head, rule]
            order = [n.label for n in norms(meta["alphas"])
                     if any(r["norm"] == n.label for r in sel)]
            for label in order:
                cells = f"| {label} |"
                for lr in lrs:
                    r = next((r for r in sel if r["norm"] == label and r["lr"] == lr), None)
                    if r is None:
                        cells += " | | | |"
                        continue
                    running = _mean_std(r["final_running"]) if "final_running" in r else ""
                    cells += (f" {_mean_std(r['best'])} | {_mean_std(r['final'])} |"
                              f" {r['diverged']} | {running} |")
                lines.append(cells)
            lines.append("")
    return "\n".join(lines)


def plot(runs: list[dict], meta: dict, out: Path) -> list[str]:
    """Per dataset and model: mean training loss per epoch, one panel per learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    shown = {"none", "LayerNorm", "BatchNorm"} | {
        f"DBN-{v} a={a}" for v in VARIANTS for a in ("0.25", "0.01", "1/k")}
    for dataset in meta["datasets"]:
        for model in meta["models"]:
            sel = [r for r in runs if r["dataset"] == dataset and r["model"] == model]
            if not sel:
                continue
            lrs = sorted({r["lr"] for r in sel}, reverse=True)
            fig, axes = plt.subplots(1, len(lrs), figsize=(6 * len(lrs), 4.5), squeeze=False)
            for ax, lr in zip(axes[0], lrs):
                for label in [n.label for n in norms(meta["alphas"])]:
                    rs = [r for r in sel if r["lr"] == lr and r["norm"] == label]
                    if not rs or label not in shown:
                        continue
                    curve = np.nanmean(np.array([r["train_loss"] for r in rs], dtype=float), 0)
                    style = "--" if "batch" in label else "-"
                    ax.plot(range(1, len(curve) + 1), curve, style, label=label)
                ax.set_yscale("log")
                ax.set_title(f"{dataset} {model.upper()}, lr {lr}")
                ax.set_xlabel("epoch")
                ax.set_ylabel("training loss (mean over seeds)")
                ax.legend(fontsize=7)
            fig.tight_layout()
            name = f"loss_{dataset}_{model}.png"
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            files.append(name)
    return files


def write_reports(runs: list[dict], meta: dict, out: Path) -> None:
    (out / "results.md").write_text(markdown(summarize(runs), meta))
    plots = plot(runs, meta, out)
    print(f"wrote {out}/results.md, {', '.join(plots)}")


# ---- main -------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke test: digits, 3 alphas, 2 seeds, 2 epochs, one learning rate "
                        "(under a minute on 2 cores)")
    p.add_argument("--out", type=Path, default=Path("experiments/results"),
                   help="output directory (default: experiments/results)")
    p.add_argument("--workers", type=int, default=None,
                   help="parallel processes (default: CPU cores, at most 8; 1 on a GPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resnet18", choices=("auto", "yes", "no", "only"), default="auto",
                   help="the ResNet-18 runs (torchvision): by default on a GPU only; 'only': "
                        "without the FNN/CNN grid")
    p.add_argument("--resnet18-epochs", type=int, default=None,
                   help="epochs of each ResNet-18 run (default 30; 2 with --quick)")
    p.add_argument("--render", action="store_true",
                   help="no training: rewrite results.md and the plots from OUT/results.json")
    args = p.parse_args(argv)
    if args.render:
        result = json.loads((args.out / "results.json").read_text())
        write_reports(result["runs"], result["meta"], args.out)
        return 0
    plan = QUICK if args.quick else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    workers = args.workers or (1 if args.device == "cuda" else min(8, os.cpu_count() or 1))
    start = time.perf_counter()

    torch.set_num_threads(1)
    digits = load_digits()
    checks = {"alpha_one_is_batch_norm": check_alpha_one_is_batch_norm(digits),
              "seeds_independent": check_seeds_independent(digits)}
    print("checks:", json.dumps(checks))

    todo = [] if args.resnet18 == "only" else tasks(plan, args.device)
    print(f"{len(todo)} configurations x {len(plan.seeds)} seeds on {workers} worker(s)",
          flush=True)
    runs: list[dict] = []
    if workers == 1:
        results = map(_run_task, todo)
    else:
        pool = multiprocessing.get_context("spawn").Pool(workers)
        results = pool.imap_unordered(_run_task, todo)
    for i, rs in enumerate(results, 1):
        runs += rs
        r = rs[0]
        print(f"[{i}/{len(todo)}] {r['dataset']} {r['model']} lr {r['lr']} {r['norm']}: "
              f"best {min(min(x['test_error']) for x in rs) * 100:.2f}%, "
              f"{sum(x['seconds'] for x in rs):.1f} s", flush=True)
    if workers != 1:
        pool.close()
        pool.join()
    with_resnet18 = args.resnet18 in ("yes", "only") or (args.resnet18 == "auto"
                                                         and args.device == "cuda")
    plan_models, epochs_of = plan.models, dict(plan.epochs)
    if args.resnet18 == "only":
        plan_models, epochs_of = (), {}
    if with_resnet18:
        epochs = args.resnet18_epochs or (2 if args.quick else 30)
        plan_models = (*plan_models, "resnet18")
        epochs_of["digits/resnet18"] = epochs

    def save(all_runs: list[dict], complete: bool) -> None:
        seconds = time.perf_counter() - start
        meta = {"when": time.strftime("%Y-%m-%d"), "quick": args.quick, "seconds": seconds,
                "complete": complete,
                "device": (torch.cuda.get_device_name() if args.device == "cuda"
                           else f"CPU ({platform.processor() or platform.machine()}, "
                                f"{workers} worker process(es), 1 thread each)"),
                "torch": torch.__version__, "datasets": plan.datasets, "models": plan_models,
                "alphas": plan.alphas, "lrs": plan.lrs, "seeds": len(plan.seeds),
                "epochs": epochs_of, "batch": 32, "optimizer": "SGD, no momentum",
                "checks": checks}
        (args.out / "results.json").write_text(json.dumps(
            {"meta": meta, "summary": summarize(all_runs), "runs": all_runs}))
        if complete:
            write_reports(all_runs, meta, args.out)
            print(f"wrote {args.out}/results.json in {seconds:.0f} s")

    if with_resnet18:
        # The ResNet-18 runs are slow and may be stopped by a time box: each finished run is
        # saved at once (meta "complete": false until the end).
        grid = list(runs)
        runs += resnet18_runs(digits, args.device, plan.seeds[:RESNET_SEEDS], epochs,
                              on_run=lambda done: save(grid + done, complete=False))
    save(runs, complete=True)
    ok = checks["alpha_one_is_batch_norm"]["passed"] and checks["seeds_independent"]["passed"]
    if not ok:
        print("a check failed: see 'checks' above", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
