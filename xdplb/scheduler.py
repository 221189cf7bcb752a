"""The probe scheduler: owns the probe tasks and the health verdicts.

A backend's identity is (service name, address), as in the planner. One
probe task runs per (address, health check): services that check the same
server the same way share it, so a dead server shared by N such services
gives one probe result, N verdict changes at the same instant and one
"desired changed" signal (`on_change`), hence one plan rather than N.
Verdicts come from the pure health_fsm; the tasks are supervised, so a bug
in handling a result restarts the loop instead of freezing a verdict.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from . import probes
from .addrtext import host_port
from .health_fsm import Health, State, is_changing, step

log = logging.getLogger("xdplb")


class ProbeScheduler:
    def __init__(self, probe, telemetry, supervisor, on_change: Callable[[], None]) -> None:
        self.probe = probe
        self.telemetry = telemetry
        self.supervisor = supervisor
        self.on_change = on_change
        self.health: dict[tuple, Health] = {}            # (service name, address) -> Health
        self._groups: dict[tuple, list] = {}             # (address, HealthCheck) -> [(Service, Backend)]
        self.first_verdicts = asyncio.Event()

    @staticmethod
    def _task_name(group: tuple) -> tuple:
        address, hc = group
        return ("probe", f"{hc.check}://{host_port(address, hc.port)}", hc)

    def sync(self, pool) -> None:
        """Probe exactly the pool's backends: start new groups, stop removed ones."""
        groups: dict[tuple, list] = {}
        for svc in pool.services:
            if svc.tls is not None and svc.tls.health_from:
                continue  # it follows another service's verdicts (xdplb/haproxy.py verdict_key)
            for be in svc.backends:
                groups.setdefault((be.address, svc.health_of(be)), []).append((svc, be))
        for group in set(self._groups) - set(groups):
            self.supervisor.stop(self._task_name(group))
        keys = {(svc.name, be.address) for members in groups.values() for svc, be in members}
        for key in set(self.health) - keys:
            del self.health[key]
        for key in keys:
            self.health.setdefault(key, Health())
        self._groups = groups
        for group in groups:
            self.supervisor.start(self._task_name(group), lambda group=group: self._loop(group))
        self._check_first_verdicts()

    async def _loop(self, group: tuple) -> None:
        address, hc = group
        while group in self._groups:
            try:
                result = await self.probe(hc, str(address))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a probe bug must not freeze this backend's verdict
                log.exception("probe %s of %s crashed", hc.check, address)
                result = probes.ProbeResult(False, f"{hc.check} probe crashed: {exc!r}", 0.0, "error")
            changing = self.record(group, result)
            # While a verdict is in the balance (a streak toward rise or fall),
            # probe twice as often, as ExaBGP does: failover and recovery come
            # sooner, and a steady backend costs no extra probes.
            interval = hc.interval / 2 if changing else hc.interval
            await asyncio.sleep(max(0.0, interval - result.seconds))

    def record(self, group: tuple, result) -> bool:
        """Apply one probe result to every backend of the group; signal one
        change if any verdict moved. Returns True while a streak is in progress."""
        _address, hc = group
        changed = changing = False
        now = time.time()
        for svc, be in self._groups.get(group, ()):
            key = (svc.name, be.address)
            new, transition = step(self.health.get(key, Health()), result.ok, result.reason, now, hc.rise, hc.fall)
            self.health[key] = new
            changing = changing or is_changing(new)
            ident = str(be.address)
            self.telemetry.probe(svc.name, ident, hc.check, result.seconds, result.ok,
                                 getattr(result, "kind", "error"), result.reason)
            if transition is not None:
                changed = True
                self.telemetry.transition(svc.name, ident, transition.old.value, transition.new.value,
                                          transition.reason, transition.at)
                log.info("backend %s (%s) of %s: %s -> %s: %s", be.name, be.address, svc.name,
                         transition.old.value, transition.new.value, transition.reason)
        if changed:
            self.on_change()
        self._check_first_verdicts()
        return changing

    def _check_first_verdicts(self) -> None:
        if not self.first_verdicts.is_set() and all(h.state is not State.UNKNOWN for h in self.health.values()):
            self.first_verdicts.set()

    def up_count(self) -> int:
        return sum(1 for h in self.health.values() if h.state is State.UP)
