"""Presenting results: the terminal table, a progress bar, JSON, CSV and a PNG plot.

matplotlib and tqdm (the ``bench`` extra) are optional and imported only when used.
"""

from __future__ import annotations

import csv
import json
import sys
import textwrap
from typing import Iterable, Sequence

from .shapes import EPILOGUES, MODES
from .timing import NOISE_THRESHOLD

# ---- progress ---------------------------------------------------------------------------------


class Progress:
    """A progress bar on stderr for long runs: tqdm's when installed, else a one-line counter.
    Silent when stderr is not a terminal (CI logs, pipes)."""

    def __init__(self, total: int, enabled: bool | None = None) -> None:
        self.total, self.done = total, 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.bar = None
        if self.enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, unit="row", leave=False, dynamic_ncols=True)

    def __call__(self, label: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            if self.done:
                self.bar.update(1)
            self.bar.set_description_str(label)
        else:
            sys.stderr.write(f"\r[{self.done + 1}/{self.total}] {label:<60.60}")
            sys.stderr.flush()
        self.done += 1

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.close()
        else:
            sys.stderr.write("\r" + " " * 80 + "\r")
            sys.stderr.flush()


# ---- terminal table ---------------------------------------------------------------------------

def _format_table(header: Sequence[str], lines: Iterable[Sequence[str]],
                  right_aligned: set[int]) -> str:
    lines = [list(line) for line in lines]
    # The last column (notes) is free-running text and does not set the widths.
    widths = [max([len(header[i])] + [len(line[i]) for line in lines])
              for i in range(len(header) - 1)]

    def render(cells):
        parts = [cell.rjust(widths[i]) if i in right_aligned else cell.ljust(widths[i])
                 for i, cell in enumerate(cells[:-1])]
        return ("  ".join(parts) + "  " + cells[-1]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([render(header), rule, *(render(line) for line in lines)])


def _number(value, fmt: str, missing: str = "-") -> str:
    return missing if value is None else format(value, fmt)


def _ms(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if value < 1 else f"{value:.3f}"


def header_text(meta: dict) -> str:
    env = meta["environment"]
    versions = "  ".join(f"{name} {env[name]}" for name in ("torch", "triton", "cuda", "cudnn")
                         if env.get(name) is not None)
    device = env["gpu"] or env["cpu"]
    lines = [f"dbn-bench  {meta['what']}  on {env['device']} ({device}"
             + (f", driver {env['driver']}" if env.get("driver") else "") + ")",
             f"versions: {versions}  dbn_kernels {env['dbn_kernels']}",
             f"timing: {meta['timing_method']}"]
    if env["device"] == "cpu":
        load = env.get("load_average_1min")
        lines.append(f"threads: {env['cpu_threads']} PyTorch thread(s), set by "
                     f"{env.get('cpu_threads_set_by', '?')}"
                     + (f"; load average {load:.1f} over {env.get('cpus_usable')} usable cores"
                        if load is not None else ""))
    if meta.get("copy_bandwidth"):
        lines.append(f"device copy bandwidth: {meta['copy_bandwidth']['description']}")
    if meta.get("byte_model"):
        lines.append("GB/s = floor bytes / median time, x-sized tensors moved per call: "
                     + ", ".join(f"{mode} {rw}" for mode, rw in meta["byte_model"].items()))
    for note in meta.get("notes", []):
        lines.append(f"note: {note}")
    skipped = meta.get("skipped_providers", [])
    if skipped:
        lines.append("skipped providers:")
        width = max(len(s["provider"]) for s in skipped)
        lines += [f"  {s['provider']:<{width}}  {s['reason']}" for s in skipped]
    return "\n".join(lines)


def _speedup(row, baseline: str) -> str:
    """``1.23x``; ``1.23x?`` when either timing is noisy; ``-`` without a baseline."""
    value = row.speedup.get(baseline)
    if not value:
        return "-"
    return f"{value:.2f}x" + ("?" if row.noisy_speedup.get(baseline) else "")


def _spread(timing) -> str:
    if timing is None:
        return "-"
    # Percentages right-aligned within the left-aligned column, the flag after them.
    return f"{timing.spread:>4.0%}" + (" noisy" if timing.noisy else "")


NOISE_FOOTER = textwrap.fill(
    f"noisy: p20-p80 wider than {NOISE_THRESHOLD:.0%} of the median (spread = (p80 - p20) / "
    "median): the samples scattered, so the median, and a speed-up marked '?' (one of its two "
    "rows is noisy), may not repeat on a rerun. The spread measures the machine as much as the "
    "kernel: rerun on a quieter machine.", width=100)


def kernel_table(rows) -> str:
    header = ["shape", "dtype", "layout", "mode", "epilogue", "provider", "impl", "median ms",
              "p20-p80 ms", "spread", "GB/s", "%copy", "vs cudnn", "vs torch", "note"]
    lines, previous = [], None
    for row in rows:
        key = (row.shape.label, row.dtype, row.layout, row.mode, getattr(row, "epilogue", "none"))
        # Print a case's description once, on its first provider's line.
        shown = [""] * len(key) if key == previous else list(key)
        previous = key
        timing = row.timing
        p20_p80 = f"{_ms(timing.p20_ms)}-{_ms(timing.p80_ms)}" if timing else "-"
        note = "" if row.status == "ok" else f"{row.status.upper()}: {row.reason}"
        lines.append([
            *shown, row.provider, row.impl or "-", _ms(row.median_ms), p20_p80, _spread(timing),
            _number(row.gbps, ",.1f"), _number(row.pct_copy, ".0f"),
            _speedup(row, "cudnn"), _speedup(row, "torch"), note])
    table = _format_table(header, lines, right_aligned={7, 8, 10, 11, 12, 13})
    if any(row.noisy for row in rows):
        table += "\n\n" + NOISE_FOOTER
    return table


def model_table(rows) -> str:
    header = ["model", "variant", "batch", "image", "precision", "layout", "median ms/step",
              "p20-p80 ms", "images/s", "vs torch", "note"]
    lines = []
    for row in rows:
        timing = row.timing
        lines.append([
            row.model, row.variant, str(row.batch), str(row.image_size), row.precision,
            row.layout, _ms(row.median_ms),
            f"{_ms(timing.p20_ms)}-{_ms(timing.p80_ms)}" if timing else "-",
            _number(row.images_per_s, ",.1f"),
            _number(row.speedup_vs_torch, ".2f") + ("x" if row.speedup_vs_torch else ""),
            "" if row.status == "ok" else f"{row.status.upper()}: {row.reason}"])
    return _format_table(header, lines, right_aligned={2, 3, 6, 7, 8, 9})


# ---- files ------------------------------------------------------------------------------------

def write_json(path: str, meta: dict, rows) -> None:
    document = {**meta, "rows": [row.to_dict() for row in rows]}
    with open(path, "w") as out:
        json.dump(document, out, indent=1)
        out.write("\n")


def write_csv(path: str, meta: dict, rows) -> None:
    """One line per row; the environment is repeated in ``env_*`` columns on every line so each
    line stands alone when files from several machines are concatenated."""
    env_columns = {f"env_{key}": value for key, value in meta["environment"].items()}
    records = []
    for row in rows:
        record = row.to_dict()
        if isinstance(record.get("shape"), list):
            record["shape"] = "x".join(str(d) for d in record["shape"])
        records.append({**record, **env_columns})
    fieldnames = list(records[0]) if records else ["provider"]
    with open(path, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(records)


def plot_available() -> str | None:
    """``None`` when ``--plot`` can work, else how to make it work."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "--plot needs matplotlib: pip install 'dbn_kernels[bench]'"
    return None


def write_plot(path: str, meta: dict, rows) -> None:
    """GB/s per shape per provider, one panel per (mode + epilogue, dtype, layout), with the copy
    line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [row for row in rows if row.status == "ok"]
    if not ok:
        raise ValueError("nothing to plot: no provider was timed")
    modes = [(m, e) for m in MODES for e in EPILOGUES
             if any((row.mode, row.epilogue) == (m, e) for row in ok)]
    columns = list(dict.fromkeys((row.dtype, row.layout) for row in ok))
    shapes = list(dict.fromkeys(row.shape.label for row in rows))
    providers = list(dict.fromkeys(row.provider for row in ok))
    markers = "osD^v<>ph*"

    fig, axes = plt.subplots(len(modes), len(columns), squeeze=False, sharex=True,
                             figsize=(max(6.0, 0.45 * len(shapes) + 2) * len(columns),
                                      3.2 * len(modes)))
    copy_gbps = (meta.get("copy_bandwidth") or {}).get("gbps")
    for r, (mode, epilogue) in enumerate(modes):
        for c, (dtype, layout) in enumerate(columns):
            ax = axes[r][c]
            for index, provider in enumerate(providers):
                points = {row.shape.label: row.gbps for row in ok
                          if (row.provider, row.mode, row.epilogue, row.dtype, row.layout)
                          == (provider, mode, epilogue, dtype, layout)}
                if points:
                    xs = [i for i, label in enumerate(shapes) if label in points]
                    ax.plot(xs, [points[shapes[i]] for i in xs], marker=markers[index % 10],
                            linewidth=1, markersize=4, label=provider)
            if copy_gbps:
                ax.axhline(copy_gbps, color="black", linestyle="--", linewidth=1,
                           label="device copy")
            label = mode if epilogue == "none" else f"{mode}+{epilogue}"
            ax.set_title(f"{label}  {dtype}  {layout}", fontsize=9)
            ax.set_ylabel("GB/s (floor bytes)", fontsize=8)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels(shapes, rotation=60, ha="right", fontsize=7)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes.flat:  # gather every provider that appears in any panel
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    env = meta["environment"]
    fig.suptitle(f"dbn-bench {meta['what']} on {env['gpu'] or env['cpu']}", fontsize=10)
    fig.legend(handles, labels, loc="upper right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.88, 0.96))
    fig.savefig(path, dpi=120)
    plt.close(fig)
