"""Aggregation of the per-sample records: the markdown table (with 95% confidence intervals) and the plots.

The interval of a mean over n samples is mean +- t(0.975, n - 1) * sd / sqrt(n) (Student's t; none for n = 1).
Plots need matplotlib (imported only when a plot is drawn; ``pip install matplotlib``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

from .methods import PATTERN_NAMES

# t(0.975, df) for df = 1..30; above, 1.96 + 2.5 / df is within 0.002 of it.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)
AVERAGE = "average"


def t_quantile_975(df: int) -> float:
    if df < 1:
        raise ValueError(f"df={df}; expected >= 1")
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.5 / df


def mean_ci(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """(mean, half-width of its 95% interval, None for one value)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = math.fsum(values) / n
    if n == 1:
        return mean, None
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, t_quantile_975(n - 1) * math.sqrt(var / n)


def aggregate(records: Sequence[dict]) -> list[dict]:
    """One row per (task, length, method), then per (length, method) an "average" row over all its samples.

    Each row: task, length, method, n, and (mean, ci) for ruler_score, strict_log_prob, strict_top1,
    computed_fraction, prefill_s.
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    order: list[tuple] = []
    for r in records:
        for key in ((r["task"], r["length"], r["method"]), (AVERAGE, r["length"], r["method"])):
            if key not in groups:
                order.append(key)
            groups[key].append(r)
    rows = []
    fields = ("ruler_score", "strict_log_prob", "strict_top1", "computed_fraction", "prefill_s")
    for key in sorted(order, key=lambda k: (k[0] == AVERAGE, k[1], order.index(k))):
        group = groups[key]
        row = {"task": key[0], "length": key[1], "method": key[2], "n": len(group)}
        for field in fields:
            row[field] = mean_ci([g[field] for g in group])
        rows.append(row)
    return rows


def coverage_table(records: Sequence[dict]) -> str:
    """Samples per cell, method x length: "n" when every task has n samples, else "min-max" over the tasks
    that ran and "(k tasks)" when some task has none. Methods and lengths in the order they first ran."""
    counts: dict[tuple[str, int], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    methods, lengths, tasks = {}, {}, {}
    for r in records:
        counts[r["method"], r["length"]][r["task"]] += 1
        methods.setdefault(r["method"], None)
        lengths.setdefault(r["length"], None)
        tasks.setdefault(r["task"], None)
    lengths_sorted = sorted(lengths)
    lines = [
        "| samples per task | " + " | ".join(str(n) for n in lengths_sorted) + " |",
        "|---|" + "---|" * len(lengths_sorted),
    ]
    for method in methods:
        cells = []
        for length in lengths_sorted:
            by_task = counts.get((method, length), {})
            if not by_task:
                cells.append("0")
                continue
            low, high = min(by_task.values()), max(by_task.values())
            cell = str(low) if low == high else f"{low}-{high}"
            if len(by_task) < len(tasks):
                cell += f" ({len(by_task)} of {len(tasks)} tasks)"
            cells.append(cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: tuple[float, Optional[float]], digits: int) -> str:
    mean, ci = value
    return f"{mean:.{digits}f}" if ci is None else f"{mean:.{digits}f} ± {ci:.{digits}f}"


def markdown_table(rows: Sequence[dict]) -> str:
    """The task x length x method table, averages last, both scores with their 95% intervals."""
    lines = [
        "| task | length | method | n | RULER score | strict log p | strict top-1 | computed share | prefill s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        task = f"**{r['task']}**" if r["task"] == AVERAGE else r["task"]
        lines.append(
            f"| {task} | {r['length']} | {r['method']} | {r['n']} | {_fmt(r['ruler_score'], 1)} | "
            f"{_fmt(r['strict_log_prob'], 3)} | {_fmt(r['strict_top1'], 3)} | {_fmt(r['computed_fraction'], 3)} | "
            f"{r['prefill_s'][0]:.3f} |"
        )
    return "\n".join(lines) + "\n"


def _pyplot():
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise ModuleNotFoundError("the plots need matplotlib: `pip install matplotlib` (or run with --no-plots)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_score_vs_fraction(rows: Sequence[dict], kinds: dict[str, str], path: Path) -> Path:
    """Suite-average scores against the mean computed share, one curve per method kind over its settings,
    one row of panels per length. ``kinds``: method label -> kind."""
    plt = _pyplot()
    averages = [r for r in rows if r["task"] == AVERAGE]
    lengths = sorted({r["length"] for r in averages})
    # (field, title, y range of the score or None)
    panels = (
        ("ruler_score", "RULER score", (-5, 105)),
        ("strict_log_prob", "strict mean log p", None),
        ("strict_top1", "strict top-1", (-0.05, 1.05)),
    )
    fig, axes = plt.subplots(len(lengths), len(panels), figsize=(4.2 * len(panels), 3.2 * len(lengths)), squeeze=False)
    # One colour per method kind across every panel: a kind missing at one length must not shift the others'.
    all_kinds = sorted({kinds.get(r["method"], r["method"]) for r in averages})
    colors = {kind: f"C{i % 10}" for i, kind in enumerate(all_kinds)}
    for row_axes, length in zip(axes, lengths):
        by_kind: dict[str, list[dict]] = defaultdict(list)
        for r in averages:
            if r["length"] == length:
                by_kind[kinds.get(r["method"], r["method"])].append(r)
        for ax, (field, title, limits) in zip(row_axes, panels):
            for kind, group in sorted(by_kind.items()):
                group = sorted(group, key=lambda r: r["computed_fraction"][0])
                x = [r["computed_fraction"][0] for r in group]
                y = [r[field][0] for r in group]
                err = [r[field][1] or 0.0 for r in group]
                ax.errorbar(x, y, yerr=err, marker="o", capsize=2, label=kind, color=colors[kind])
                if kind == "dense":  # the reference level, across the plot
                    ax.axhline(y[0], linestyle="--", linewidth=0.8, color=colors[kind])
            if limits is not None:
                ax.set_ylim(*limits)
            ax.set_title(f"{title}, {length} tokens")
            ax.set_xlabel("computed share of causal blocks")
            ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colors[k], marker="o", label=k) for k in all_kinds]
    axes[0][0].legend(handles=handles, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_heatmap(heatmap, path: Path) -> Path:
    """Layer x head maps of the computed fraction and of the pattern chosen, for one prompt."""
    plt = _pyplot()
    from matplotlib.colors import BoundaryNorm, ListedColormap

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 6))
    image = left.imshow(heatmap.computed_fraction, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=left, label="computed share of causal blocks")
    left.set_title(f"{heatmap.method}: computed share")
    codes = sorted(PATTERN_NAMES)
    cmap = ListedColormap(["#bbbbbb", "#1f77b4", "#d62728", "#2ca02c"][: len(codes)])
    norm = BoundaryNorm([c - 0.5 for c in codes] + [codes[-1] + 0.5], cmap.N)
    image = right.imshow(heatmap.pattern, aspect="auto", cmap=cmap, norm=norm)
    bar = fig.colorbar(image, ax=right, ticks=codes)
    bar.ax.set_yticklabels([PATTERN_NAMES[c] for c in codes])
    right.set_title(f"pattern ({heatmap.task}, {heatmap.length} tokens)")
    for ax in (left, right):
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
