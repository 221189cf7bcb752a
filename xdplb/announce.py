"""Whether this node should attract a VIP's traffic, and telling the routers.

Several balancer nodes behind a router's ECMP route (BGP) or a VRRP pair
(keepalived) serve the same VIPs. Each node decides on its own, per VIP,
whether it can serve it; a router or keepalived moves traffic accordingly.
xdplb never speaks BGP or VRRP itself:

  BGP        the decision is a route per announced VIP in a kernel routing
             table of its own ([xdplb] announce_table):
                 blackhole <vip>/32 table N proto 120
             BIRD 2's `kernel` protocol imports that table (`learn`: the
             route was not made by BIRD, proto 120 is neither BIRD's 12 nor
             the kernel's 2, which BIRD learns only with `learn all`) and its
             `bgp` protocol announces it with the node as next hop. The route
             is a blackhole because nothing looks the table up: it only
             carries the decision (no `ip rule` must point at it). Proto 120
             (0x78, "x", the tag on xdplb's VIP addresses too) lets xdplb
             find and remove exactly its own routes, also after a crash.
  keepalived the decision is a number in [xdplb] ready_file, which
             keepalived's `track_file` reads: 0 when every VIP would be
             announced, otherwise how many would not.

The decision (`decide`) is pure: attached and ready, not draining, every
backend of the VIP has its first verdict (a node announcing earlier would
be handed flows it places on a partial table), and at least one service on
the VIP has a backend whose verdict is up. A drained backend still counts:
its established flows need the node. When the last backend goes down the
VIP is withdrawn; it comes back when a backend is up again, which the
health state machine allows only after `rise` good probes.

`Announcer` is the thin layer that applies decisions (netlink routes, the
ready file) from the daemon's loop, and retries a failed netlink call.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from .haproxy import verdict_key
from .health_fsm import Health, State

log = logging.getLogger("xdplb")

RETRY_MIN = 0.2      # seconds before retrying a failed route change, doubling ...
RETRY_MAX = 5.0      # ... up to this


@dataclass(frozen=True)
class VipDecision:
    announce: bool
    reason: str


def decide(pool, health: Mapping[tuple, Health], *, serving: bool, draining: bool) -> dict:
    """VIP -> VipDecision for every VIP of the pool.

    serving: the program is attached and the daemon ready; draining: the
    node is being drained (drain-node or a stop)."""
    by_vip: dict = {}
    for svc in pool.services:
        by_vip.setdefault(svc.vip, []).append(svc)
    out = {}
    for vip, services in by_vip.items():
        states = [(be.address, health.get(verdict_key(svc, be.address), Health()).state)
                  for svc in services for be in svc.backends]
        pending = len({address for address, s in states if s is State.UNKNOWN})
        up = len({address for address, s in states if s is State.UP})   # servers, not (service, server) pairs
        if not serving:
            out[vip] = VipDecision(False, "the program is not attached and ready")
        elif draining:
            out[vip] = VipDecision(False, "the node is draining")
        elif pending:
            out[vip] = VipDecision(False, f"waiting for the first verdict of {pending} backend(s)")
        elif not up:
            out[vip] = VipDecision(False, "no healthy backend")
        else:
            out[vip] = VipDecision(True, f"{up} backend(s) up")
    return out


def ready_value(decisions: Mapping) -> int:
    """What the ready file holds: how many VIPs would not be announced (0: all would)."""
    return sum(1 for d in decisions.values() if not d.announce)


def placement_fingerprint(settings, svc) -> str:
    """A short hash of what decides where the service's flows go, from the
    configuration (never the live table, which changes with health): the
    backends' addresses and weights, persistence, hash_seed, maglev_size.
    Nodes behind one ECMP route must show the same value for each service."""
    inputs = {
        "backends": sorted([str(be.address), be.weight] for be in svc.backends),
        "persistence": svc.persistence,
        "hash_seed": settings.hash_seed,
        "maglev_size": settings.maglev_size,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]


class StillWatch:
    """Decides when a packet counter has been still for `idle` seconds (pure: time is passed in)."""

    def __init__(self, idle: float, now: float, count: int) -> None:
        self.idle = idle
        self.count = count
        self.since = now
        self.first = count

    def observe(self, now: float, count: int) -> bool:
        if count != self.count:
            self.count, self.since = count, now
        return now - self.since >= self.idle

    @property
    def moved(self) -> int:
        """Packets counted since the watch started."""
        return self.count - self.first


async def wait_until_still(read: Callable[[], int], idle: float, timeout: float) -> dict:
    """Poll the counter `read` (a blocking call, run in a thread) until it has
    not moved for `idle` seconds, or `timeout` has passed. Returns still (bool),
    waited (seconds) and moved (counted meanwhile)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    watch = StillWatch(idle, started, await asyncio.to_thread(read))
    still = False
    while not still and loop.time() - started < timeout:
        await asyncio.sleep(min(0.25, idle / 4, max(0.0, timeout - (loop.time() - started))))
        still = watch.observe(loop.time(), await asyncio.to_thread(read))
    return {"still": still, "waited": round(loop.time() - started, 3), "moved": watch.moved}


def write_ready_file(path: str, value: int) -> None:
    """Replace the file atomically, so keepalived never reads half a number."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{value}\n")
    os.replace(tmp, target)


def record_path(run_dir: Path, ifname: str) -> Path:
    """Where the daemon notes its announce table, so `xdplb detach` can remove its routes after a crash."""
    return run_dir / f"{ifname}.announce"


class Announcer:
    """Applies announce decisions: the routes in `table`, the ready file.

    decisions: () -> {vip: VipDecision}, read at each pass. Passes run on
    `trigger()`; a failed netlink call is logged and retried with backoff.
    """

    def __init__(self, netlink, table: int | None, ready_file: str, decisions: Callable[[], dict],
                 record: Path | None = None) -> None:
        self.netlink = netlink
        self.table = table
        self.ready_file = ready_file
        self._decisions = decisions
        self.record = record
        self.decisions: dict = {}
        self.announced: set = set()       # VIPs whose route is in the table now
        self.ready_written: int | None = None
        self.error: str | None = None
        self.errors_total = 0
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()

    def configure(self, table: int | None, ready_file: str) -> None:
        """A reload may set a new table or ready file; the next pass moves to them."""
        self.table, self.ready_file = table, ready_file

    def trigger(self) -> None:
        self._wake.set()

    async def adopt(self) -> None:
        """Take the routes an earlier instance left (hitless restart): they stay until the first pass."""
        if self.table is not None:
            self.announced = set(await asyncio.to_thread(self.netlink.announced, self.table))

    async def sync(self) -> str | None:
        """One pass: make the table and the ready file say what the decisions say.
        Returns None, or the error (logged) when a step failed."""
        async with self._lock:
            decisions = self._decisions()
            self.decisions = decisions
            wanted = {vip for vip, d in decisions.items() if d.announce}
            try:
                await self._routes(wanted, decisions)
                self._ready(ready_value(decisions))
            except Exception as exc:  # netlink or the file system: retried, never fatal
                self.error = str(exc) or type(exc).__name__
                self.errors_total += 1
                log.error("announcing the VIPs failed: %s; retrying", self.error)
                return self.error
            self.error = None
            return None

    async def _routes(self, wanted: set, decisions: Mapping) -> None:
        if self.table is None:
            self.announced = set()
            return
        if self.record is not None and not self.record.exists():
            self.record.write_text(f"{self.table}\n")
        for vip in sorted(self.announced - wanted):
            await asyncio.to_thread(self.netlink.withdraw, self.table, vip)
            self.announced.discard(vip)
            why = decisions[vip].reason if vip in decisions else "no longer in the pool"
            log.info("withdrew VIP %s (route in table %d removed): %s", vip, self.table, why)
        for vip in sorted(wanted - self.announced):
            await asyncio.to_thread(self.netlink.announce, self.table, vip)
            self.announced.add(vip)
            log.info("announcing VIP %s (route in table %d): %s", vip, self.table, decisions[vip].reason)

    def _ready(self, value: int) -> None:
        if not self.ready_file or value == self.ready_written:
            return
        write_ready_file(self.ready_file, value)
        self.ready_written = value
        log.info("ready file %s: %d (%s)", self.ready_file, value,
                 "every VIP would be announced" if value == 0 else f"{value} VIP(s) would not be announced")

    async def withdraw_all(self) -> None:
        """Stop attracting traffic: remove every route of ours in the table and
        mark the ready file not ready (stop, drain). Raises on failure."""
        async with self._lock:
            if self.table is not None:
                for vip in sorted(self.announced | set(await asyncio.to_thread(self.netlink.announced, self.table))):
                    await asyncio.to_thread(self.netlink.withdraw, self.table, vip)
                    log.info("withdrew VIP %s (route in table %d removed)", vip, self.table)
                self.announced = set()
            if self.ready_file:
                value = max(1, ready_value(self._decisions()))
                write_ready_file(self.ready_file, value)
                self.ready_written = value

    def forget_record(self) -> None:
        if self.record is not None:
            self.record.unlink(missing_ok=True)

    async def run(self) -> None:
        """The long-running loop (supervised by the daemon)."""
        delay = RETRY_MIN
        while True:
            if self.error is None:
                await self._wake.wait()
            self._wake.clear()
            if await self.sync() is None:
                delay = RETRY_MIN
                continue
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

