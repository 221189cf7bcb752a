"""PNG charts with matplotlib (Agg backend: no display needed).

Generic shapes only; each suite decides what goes into them. Every chart
carries the context line (kernel, CPU, repeat/runs, statistic) under its
title, so a PNG on its own still says what it measured.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

_WIDTH = 10.0


def _finish(fig, ax, path: Path, title: str, context: str) -> Path:
    ax.set_title(title + "\n" + textwrap.fill(context, 140), fontsize=9, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def hbars(path: Path, title: str, context: str, labels: Sequence[str], values: Sequence[float | None],
          unit: str, low_high: Sequence[tuple[float, float] | None] | None = None,
          notes: Sequence[str] | None = None, highlight: Sequence[bool] | None = None) -> Path:
    """Horizontal bars, one per label, top to bottom; a missing value shows as 'n/a'."""
    fig, ax = plt.subplots(figsize=(_WIDTH, 1.2 + 0.38 * len(labels)))
    ys = list(range(len(labels)))[::-1]
    shown = [v or 0.0 for v in values]
    colors = ["#c44e52" if (highlight and highlight[i]) else "#4c72b0" for i in range(len(labels))]
    ax.barh(ys, shown, color=colors)
    if low_high:
        for y, v, lh in zip(ys, shown, low_high):
            if lh:
                ax.plot([lh[0], lh[1]], [y, y], color="black", linewidth=1)
    top = max(shown) if shown and max(shown) > 0 else 1.0
    for i, (y, v) in enumerate(zip(ys, values)):
        text = "n/a" if v is None else f"{v:,.0f} {unit}" if abs(v) >= 100 else f"{v:.3g} {unit}"
        if notes and notes[i]:
            text += f"  ({notes[i]})"
        ax.text((v or 0.0) + top * 0.01, y, text, va="center", fontsize=8)
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlim(0, top * 1.45)
    ax.set_xlabel(unit)
    return _finish(fig, ax, path, title, context)


def grouped_bars(path: Path, title: str, context: str, groups: Sequence[str], series: dict[str, Sequence[float | None]],
                 unit: str, xlabel: str = "", reference: tuple[str, float] | None = None) -> Path:
    """Bars grouped along x: one group per entry of `groups`, one bar per series."""
    fig, ax = plt.subplots(figsize=(_WIDTH, 4.8))
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, [v or 0.0 for v in values], width, label=name)
    if reference:
        ax.axhline(reference[1], color="black", linestyle="--", linewidth=1, label=reference[0])
    top = max([v or 0.0 for values in series.values() for v in values] + [reference[1] if reference else 0.0])
    ax.set_ylim(0, (top or 1.0) * 1.35)  # room for the legend above the bars
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(unit)
    ax.legend(fontsize=8)
    return _finish(fig, ax, path, title, context)


def lines(path: Path, title: str, context: str, xs: Sequence[float], series: dict[str, Sequence[float | None]],
          unit: str, xlabel: str, logx: bool = False) -> Path:
    fig, ax = plt.subplots(figsize=(_WIDTH, 4.8))
    for name, values in series.items():
        points = [(x, v) for x, v in zip(xs, values) if v is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(unit)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    return _finish(fig, ax, path, title, context)
