"""Health probes: one async check of one backend, bounded by its timeout.

Each probe returns (ok, reason). A probe never takes longer than its
timeout, so one hung backend never delays another's probes (each backend
has its own task in the daemon).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    reason: str          # one sentence for the log
    seconds: float
    kind: str = "ok"     # short failure class for metrics: refused, timeout, error, ...


async def tcp_probe(address: str, port: int, timeout: float) -> ProbeResult:
    """Healthy when a TCP connection to address:port completes in time."""
    started = time.monotonic()
    target = f"{address}:{port}"
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_connection(address, port), timeout)
    except asyncio.TimeoutError:
        return ProbeResult(False, f"connect to {target} timed out after {timeout:g}s", time.monotonic() - started, "timeout")
    except ConnectionRefusedError:
        return ProbeResult(False, f"connect to {target} refused", time.monotonic() - started, "refused")
    except OSError as exc:
        return ProbeResult(False, f"connect to {target} failed: {exc.strerror or exc}", time.monotonic() - started, "error")
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), timeout)
    except (asyncio.TimeoutError, OSError):
        pass
    return ProbeResult(True, f"connect to {target} succeeded", time.monotonic() - started)


PROBES = {"tcp": tcp_probe}


async def probe(check: str, address: str, port: int, timeout: float) -> ProbeResult:
    return await PROBES[check](address, port, timeout)
