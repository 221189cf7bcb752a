"""Text tables for the terminal and the README. Pure.

Tables are Markdown pipe tables with padded columns: readable as printed,
and pasted into the README unchanged.
"""
from __future__ import annotations

from typing import Sequence


def fmt(value, digits: int = 1, suffix: str = "") -> str:
    """A number with `digits` decimals (thousands separated), or '-' when missing."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:,.{digits}f}{suffix}"


def fmt_ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}×"


def markdown(headers: Sequence[str], rows: Sequence[Sequence], align: str | None = None) -> str:
    """A padded Markdown table. `align` has one letter per column, l or r (default: l then r...)."""
    if align is None:
        align = "l" + "r" * (len(headers) - 1)
    if len(align) != len(headers):
        raise ValueError(f"align {align!r} has {len(align)} letters for {len(headers)} columns")
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    for row in cells:
        if len(row) != len(headers):
            raise ValueError(f"row {row!r} has {len(row)} cells for {len(headers)} columns")
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        padded = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2)) for w, a in zip(widths, align)) + "|"
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def context_line(ctx: dict) -> str:
    """One line naming what the figures were measured on."""
    parts = [f"kernel {ctx.get('kernel', '?')}", f"CPU {ctx.get('cpu_model', '?')} × {ctx.get('cpus', '?')}"]
    for key, label in (("xdp_mode", "XDP mode"), ("repeat", "repeat"), ("runs", "runs"), ("statistic", "")):
        if ctx.get(key) not in (None, ""):
            value = f"{ctx[key]:,}" if isinstance(ctx[key], int) else ctx[key]
            parts.append(f"{label} {value}".strip())
    return "; ".join(parts)


def targets_table(targets: Sequence[dict]) -> str:
    """The issue's targets next to what was measured."""
    return markdown(["issue target", "measured", "met"],
                    [[t["target"], fmt_ratio(t["measured"]), "yes" if t["met"] else "no"] for t in targets], "lrl")
