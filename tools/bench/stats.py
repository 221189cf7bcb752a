"""Statistics of benchmark samples. Pure.

Every figure the bench reports is the median of several runs, with the
lowest and highest run next to it so a reader can see the spread.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Iterable


@dataclass(frozen=True)
class Summary:
    median: float
    low: float
    high: float
    runs: int

    @property
    def spread(self) -> float:
        """(high - low) / median: 0.05 means the runs lie within 5 % of the median."""
        return (self.high - self.low) / self.median if self.median else 0.0

    def as_dict(self) -> dict:
        return dict(asdict(self), spread=round(self.spread, 4))


def summarize(samples: Iterable[float]) -> Summary:
    """Median, lowest and highest of the samples; ValueError when there are none."""
    values = [float(v) for v in samples]
    if not values:
        raise ValueError("no samples to summarize")
    return Summary(statistics.median(values), min(values), max(values), len(values))


def ratio(value: float | None, base: float | None) -> float | None:
    """value / base, or None when either is missing or the base is not positive."""
    if value is None or base is None or base <= 0:
        return None
    return value / base


def per_gb(cpu_seconds: float, nbytes: int) -> float | None:
    """CPU seconds per 10**9 bytes, or None when nothing was transferred."""
    if nbytes <= 0:
        return None
    return cpu_seconds / (nbytes / 1e9)


def interleave(cases: list, runs: int) -> list:
    """The order to measure in: every case once per round, `runs` rounds.

    Measuring round by round (not all runs of one case, then the next) spreads
    slow drifts of a shared machine over every case alike.
    """
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    return [case for _ in range(runs) for case in cases]
