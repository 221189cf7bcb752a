"""The reconciler: owns what the maps hold and keeps it equal to the desired state.

After cilium/statedb's reconciler contract:
  - desired state in (a callable that returns the current plan.Desired),
    idempotent map writes out (xdplb/plan.py plans them, the dataplane
    applies them; deleting what is gone is not an error);
  - a failed pass is recorded (log, `errors_total` for the exporter, `error`
    for `xdplb status`) and retried with backoff;
  - a periodic full pass reads the maps back and repairs any drift.

A failed pass is never simply run again. The planner writes each new table
into the idle half (1 - applied.half) and then flips the service entry, so
a pass that failed half way may already have flipped a table: planning again
from the old `applied` would write into what is now the live half. Instead,
before the next pass the applied state is rebuilt from the kernel
(dataplane.read_state + plan.adopt) and planned from there.

Planning (the Maglev builds) and the map writes run on one worker thread,
so the event loop keeps probing while a 64-service table set is built; one
thread keeps the kernel writes in order.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Mapping

from . import maglev
from .plan import Applied, Desired, Plan, adopt, plan

log = logging.getLogger("xdplb")

RETRY_MIN = 0.1                 # seconds before the first retry of a failed pass
RETRY_MAX = 5.0                 # ... doubling up to this
FULL_RECONCILE_SECONDS = 30.0   # how often the maps are read back and compared


@dataclass(frozen=True)
class Prepared:
    """A plan made ahead of time (a reload's dry run), valid only from `applied`
    towards `desired`."""

    applied: Applied
    desired: Desired
    plan: Plan
    slots: Mapping[str, dict]


def expected_kernel(applied: Applied) -> tuple:
    """What the maps hold when `applied` is true, in dataplane.KernelState's terms:
    (services, backends, tables, vips, config, refs6)."""
    services = {a.key: (a.id, a.flags, a.half) for a in applied.services.values()}
    # Retired backends (removed, within their down grace) stay in the kernel marked down.
    every = [*applied.backends.values(), *(b for b, _until in applied.retired.values())]
    backends = {b.id: (b.service_id, b.address, b.mac, b.up) for b in every if b.mac is not None}
    tables = {(a.id, a.half): tuple(a.table) for a in applied.services.values()}
    refs6 = {a.id: (a.key[0], a.client_prefix) for a in applied.services.values() if a.key[0].version == 6}
    return services, backends, tables, set(applied.vips), applied.config, refs6


def drift(kernel, applied: Applied) -> list[str]:
    """How the maps (a dataplane.KernelState) differ from `applied`; [] when they agree."""
    services, backends, tables, vips, config, refs6 = expected_kernel(applied)
    found = []
    if dict(kernel.services) != services:
        found.append("services")
    if dict(kernel.backends) != backends:
        found.append("backends")
    if {k: tuple(v) for k, v in kernel.tables.items()} != tables:
        found.append("Maglev tables")
    if dict(kernel.refs6) != refs6:
        found.append("IPv6 VIPs and client prefixes (service_ids6)")
    if set(kernel.vips) != vips:
        found.append("vips")
    if kernel.config != config:
        found.append("lb_config")
    return found


def _slots_of(applied: Applied, names) -> dict:
    return {name: maglev.slot_counts(applied.services[name].table) for name in names if name in applied.services}


def _plan_and_count(applied: Applied, desired: Desired) -> tuple[Plan, dict]:
    """The plan plus the slot counts of every table it rebuilds (worker thread)."""
    result = plan(applied, desired, time.monotonic_ns())
    return result, _slots_of(result.applied, result.rebuilt)


class Reconciler:
    def __init__(self, dp, desired: Callable[[], Desired], service_names: Callable[[], Mapping],
                 telemetry=None, on_applied: Callable[[], None] | None = None) -> None:
        self.dp = dp
        self._on_applied = on_applied               # called after every pass that succeeded
        self._desired = desired
        self._service_names = service_names       # () -> {(vip, port, protocol): service name}
        self.telemetry = telemetry
        self.applied = Applied()
        self.slots: dict[str, dict] = {}          # service name -> {backend id: slots in its live table}
        self.error: dict | None = None            # the last failed pass, until one succeeds
        self.errors_total = 0
        self.passes = 0                           # passes that wrote something
        self.drifts = 0
        self._stale = False                       # the maps may not match `applied`: read them back first
        self._full_pending = False                # the periodic read-back is due
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reconcile")

    async def _in_worker(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- applied state from the kernel ----------------------------------------

    def _adopt(self, kernel) -> None:
        self.applied = adopt(kernel, self._service_names())
        self.slots = _slots_of(self.applied, self.applied.services)

    async def adopt_kernel(self):
        """Take what the maps hold now as the applied state (an adopted restart); returns the KernelState."""
        kernel = await self._in_worker(self.dp.read_state)
        self._adopt(kernel)
        return kernel

    # ---- one pass ---------------------------------------------------------------

    def trigger(self) -> None:
        """The desired state changed: run a pass soon. Calls made while a pass
        runs, or in the same turn of the loop, coalesce into one pass."""
        self._wake.set()

    async def prepare(self, desired: Desired) -> Prepared:
        """Plan towards `desired` without writing (raises plan.PlanError if it does not fit)."""
        async with self._lock:
            applied = self.applied
            result, slots = await self._in_worker(_plan_and_count, applied, desired)
            return Prepared(applied, desired, result, slots)

    async def reconcile(self, prepared: Prepared | None = None) -> str | None:
        """One pass: make the maps hold the desired state. Returns None, or the
        error (already logged and recorded) when the pass failed."""
        async with self._lock:
            started = time.monotonic()
            try:
                if self._stale:
                    self._adopt(await self._in_worker(self.dp.read_state))
                    log.info("rebuilt the applied state from the maps before planning again")
                    self._stale = False
                desired = self._desired()
                if prepared is not None and prepared.applied is self.applied and prepared.desired == desired:
                    result, slots = prepared.plan, prepared.slots
                else:
                    result, slots = await self._in_worker(_plan_and_count, self.applied, desired)
                if result.ops:
                    self._stale = True           # until every write is known to have happened
                    await self._in_worker(self.dp.apply, result.ops)
                    self._stale = False
            except Exception as exc:  # a map write, a read-back or a plan that does not fit
                self._failed(exc)
                return self.error["error"]
            self.applied = result.applied
            self.slots.update(slots)
            for name in set(self.slots) - set(self.applied.services):
                del self.slots[name]
            if self.error is not None:
                log.info("map writes succeed again after %d failed attempt(s)", self.error["attempts"])
                self.error = None
            if result.ops:
                self.passes += 1
            if result.rebuilt:
                seconds = time.monotonic() - started
                if self.telemetry is not None:
                    self.telemetry.rebuilt(seconds)
                log.info("Maglev table rebuilt and flipped for %s (%d writes, %.0f ms)",
                         ", ".join(result.rebuilt), len(result.ops), seconds * 1000)
            if self._on_applied is not None:
                self._on_applied()
            return None

    def _failed(self, exc: Exception) -> None:
        text = str(exc) or type(exc).__name__
        attempts = (self.error or {}).get("attempts", 0) + 1
        self.error = {"error": text, "at": time.time(), "attempts": attempts}
        self.errors_total += 1
        log.error("writing the maps failed (attempt %d): %s; retrying with backoff", attempts, text)

    async def check_drift(self) -> list[str]:
        """Read the maps back; if they differ from the applied state, mark it
        stale so the next pass rebuilds it from the kernel and rewrites."""
        async with self._lock:
            applied = self.applied
            kernel = await self._in_worker(self.dp.read_state)
            found = await self._in_worker(drift, kernel, applied)
            if found and applied is self.applied:
                self.drifts += 1
                self._stale = True
                log.warning("the maps drifted from what xdplb wrote (%s); rewriting them", ", ".join(found))
            return found

    # ---- the long-running loop (supervised by the daemon) -----------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = RETRY_MIN
        timer = loop.call_later(FULL_RECONCILE_SECONDS, self._full_due)
        try:
            while True:
                if self.error is None:
                    await self._wake.wait()
                self._wake.clear()
                if self._full_pending:
                    self._full_pending = False
                    timer = loop.call_later(FULL_RECONCILE_SECONDS, self._full_due)
                    try:
                        await self.check_drift()
                    except Exception as exc:
                        self._failed(exc)
                        self._stale = True
                if await self.reconcile() is None:
                    delay = RETRY_MIN
                    continue
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
        finally:
            timer.cancel()

    def _full_due(self) -> None:
        self._full_pending = True
        self._wake.set()
