"""Parsers for what the bench reads from tools and the kernel. Pure.

Each takes text and returns numbers; anything unexpected raises
ParseError with one sentence saying what was expected and what came.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass


class ParseError(ValueError):
    pass


# ---- iperf3 -J --------------------------------------------------------------

@dataclass(frozen=True)
class IperfResult:
    gbits: float          # receiver's goodput, 10**9 bits per second
    bytes: int            # bytes the receiver got
    seconds: float        # receiver's measuring interval
    retransmits: int      # sender's TCP retransmissions


def iperf3(text: str) -> IperfResult:
    """The receiver-side summary of `iperf3 -c ... -J` output."""
    try:
        doc = json.loads(text)
    except ValueError:
        raise ParseError(f"iperf3 output is not JSON: {text[:120]!r}") from None
    if not isinstance(doc, dict):
        raise ParseError(f"iperf3 output is not a JSON object: {text[:120]!r}")
    if doc.get("error"):
        raise ParseError(f"iperf3 failed: {doc['error']}")
    try:
        received = doc["end"]["sum_received"]
        sent = doc["end"]["sum_sent"]
        return IperfResult(received["bits_per_second"] / 1e9, int(received["bytes"]),
                           float(received["seconds"]), int(sent.get("retransmits", 0)))
    except (KeyError, TypeError) as exc:
        raise ParseError(f"iperf3 JSON has no end.sum_received/sum_sent summary (missing {exc})") from None


# ---- wrk ------------------------------------------------------------------

@dataclass(frozen=True)
class WrkResult:
    requests_per_s: float
    requests: int
    seconds: float
    socket_errors: int    # connect + read + write + timeout
    non_2xx: int


_WRK_RATE = re.compile(r"^Requests/sec:\s+([0-9.]+)\s*$", re.M)
_WRK_TOTAL = re.compile(r"^\s*(\d+) requests in ([0-9.]+)(us|ms|s|m)\b", re.M)
_WRK_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def wrk(text: str) -> WrkResult:
    """The totals of wrk's plain-text report."""
    rate, total = _WRK_RATE.search(text), _WRK_TOTAL.search(text)
    if not rate or not total:
        raise ParseError(f"wrk output has no 'Requests/sec' or 'N requests in' line: {text[-200:]!r}")
    errors = _WRK_ERRORS.search(text)
    non2xx = _WRK_NON2XX.search(text)
    return WrkResult(
        float(rate.group(1)), int(total.group(1)), float(total.group(2)) * _UNIT_SECONDS[total.group(3)],
        sum(int(g) for g in errors.groups()) if errors else 0,
        int(non2xx.group(1)) if non2xx else 0,
    )


# ---- /proc ----------------------------------------------------------------

@dataclass(frozen=True)
class CpuTicks:
    busy: int     # user + nice + system + irq + softirq + steal, in clock ticks
    total: int    # busy + idle + iowait


def proc_stat(text: str) -> CpuTicks:
    """The all-CPU line of /proc/stat. guest time is already inside user."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            values = [int(v) for v in fields[1:]] + [0] * 8
            user, nice, system, idle, iowait, irq, softirq, steal = values[:8]
            busy = user + nice + system + irq + softirq + steal
            return CpuTicks(busy, busy + idle + iowait)
    raise ParseError("/proc/stat has no 'cpu' line")


def fdinfo(text: str) -> dict[str, str]:
    """`key:\tvalue` lines of /proc/PID/fdinfo/FD."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def memlock(text: str) -> int:
    """Bytes a BPF map charges (the `memlock` line of its fdinfo)."""
    value = fdinfo(text).get("memlock")
    if value is None or not value.isdigit():
        raise ParseError(f"fdinfo has no numeric memlock line: {text[:200]!r}")
    return int(value)


def cpu_model(cpuinfo: str) -> str:
    """First 'model name' (x86) or 'Model'/'CPU part' (arm) of /proc/cpuinfo."""
    for key in ("model name", "Model", "CPU part"):
        for line in cpuinfo.splitlines():
            name, sep, value = line.partition(":")
            if sep and name.strip() == key and value.strip():
                return value.strip()
    return "unknown"


# ---- xdplb's own log --------------------------------------------------------

_COMPILED = re.compile(r"compiled and loaded in ([0-9.]+)s")


def compile_seconds(log: str) -> float:
    """The compile-and-load time `xdplb attach` logs."""
    match = _COMPILED.search(log)
    if not match:
        raise ParseError("the xdplb log has no 'compiled and loaded in N s' line")
    return float(match.group(1))


# ---- nft -j list table ------------------------------------------------------

def nft_counter_packets(text: str) -> list[int]:
    """Packet counts of every `counter` in a `nft -j list table` dump, in rule order."""
    try:
        doc = json.loads(text)
    except ValueError:
        raise ParseError(f"nft output is not JSON: {text[:120]!r}") from None
    counts = []
    for item in doc.get("nftables", []) if isinstance(doc, dict) else []:
        for expr in item.get("rule", {}).get("expr", []):
            if isinstance(expr, dict) and "counter" in expr:
                counts.append(int(expr["counter"]["packets"]))
    return counts
