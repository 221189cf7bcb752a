"""What the controller itself observes, for the exporter and `xdplb top`.

Probe durations and failures, health transitions, Maglev rebuild times and
reload outcomes. Plain data with no Prometheus dependency: the exporter
turns it into metric families at scrape time, alongside the data plane's
per-CPU counters read fresh from the maps.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

# Seconds; probe timeouts are usually 0.1-2 s.
PROBE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
REBUILD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass
class Histogram:
    buckets: tuple
    counts: list = field(default_factory=list)   # per bucket, not cumulative; last is +Inf
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """[(le, cumulative count), ...] ending with ("+Inf", count)."""
        out, running = [], 0
        for bound, n in zip(self.buckets, self.counts):
            running += n
            out.append((repr(float(bound)), running))
        out.append(("+Inf", self.count))
        return out


@dataclass
class Telemetry:
    """Keyed by the backend's identity: (service name, backend address as str),
    as health verdicts and drains are; the exporter labels it with the
    backend's current name."""

    probe_seconds: dict = field(default_factory=dict)               # (service, backend, check) -> Histogram
    last_probe: dict = field(default_factory=dict)                  # (service, backend) -> (ok, seconds, reason)
    probe_failures: collections.Counter = field(default_factory=collections.Counter)  # (service, backend, kind)
    transitions: collections.Counter = field(default_factory=collections.Counter)     # (service, backend, to)
    transition_log: collections.deque = field(default_factory=lambda: collections.deque(maxlen=200))
    rebuild_seconds: Histogram = field(default_factory=lambda: Histogram(REBUILD_BUCKETS))
    reloads: collections.Counter = field(default_factory=collections.Counter)         # result -> n

    def probe(self, service: str, backend: str, check: str, seconds: float, ok: bool, kind: str, reason: str) -> None:
        key = (service, backend, check)
        if key not in self.probe_seconds:
            self.probe_seconds[key] = Histogram(PROBE_BUCKETS)
        self.probe_seconds[key].observe(seconds)
        self.last_probe[(service, backend)] = (ok, seconds, reason)
        if not ok:
            self.probe_failures[(service, backend, kind)] += 1

    def transition(self, service: str, backend: str, old: str, new: str, reason: str, at: float) -> None:
        self.transitions[(service, backend, new)] += 1
        self.transition_log.append({"service": service, "backend": backend, "from": old, "to": new,
                                    "reason": reason, "at": at})

    def rebuilt(self, seconds: float) -> None:
        self.rebuild_seconds.observe(seconds)

    def reload(self, result: str) -> None:
        self.reloads[result] += 1

    def prune(self, backends: set) -> None:
        """Forget every backend not in `backends` ((service, backend) pairs):
        a backend removed from the pool leaves the metrics with it."""
        for table in (self.probe_seconds, self.last_probe, self.probe_failures, self.transitions):
            for key in [k for k in table if k[:2] not in backends]:
                del table[key]
