"""The status view: one read-only join of desired, applied and counters.

`xdplb status`, `xdplb top` (through the control socket) and the
Prometheus exporter all read the same rows, built here from a source with
the daemon's attributes:

  pool       the running pool (what is desired)
  health     (service name, address) -> health_fsm.Health
  applied    plan.Applied (what the maps hold)
  slots      service name -> {backend id: slots in its live table}, counted
             when the table was planned (optional; {} without)
  macs       address -> MAC (optional)
  drained    (service name, address) pairs drained at run time (optional)
  telemetry  telemetry.Telemetry
  dp         anything with read_stats(service_ids, backend_ids)
  tls        tlstier.HaproxyTier (optional): HAProxy's counters of TLS services
             (refreshed by read_stats) and their certificates

A row costs O(1): the join is O(backends), whatever the table size.
"""
from __future__ import annotations

import time

from .desired import is_drained
from .haproxy import verdict_key
from .health_fsm import Health


def counter_ids(src) -> tuple[list[int], list[int]]:
    """The service and backend ids whose counters the rows need."""
    applied = src.applied
    return [a.id for a in applied.services.values()], [b.id for b in applied.backends.values()]


def read_stats(src):
    """The data plane's counters for the rows (a map read: the daemon runs it off the loop),
    after HAProxy's (a socket read) are refreshed in the TLS tier."""
    tier = getattr(src, "tls", None)
    if tier is not None:
        tier.refresh_counters()
    return src.dp.read_stats(*counter_ids(src))


def _tls_service(svc, tier) -> dict:
    now = time.time()
    running = bool(tier is not None and tier.running)
    master = getattr(tier, "master", None)
    running_master = master if running and master is not None else None
    certificates = [{"path": c.path, "subject": c.subject, "serial": c.serial, "not_after": c.not_after,
                     "expires_in": c.not_after - now}
                    for name, c in (tier.certificates if tier is not None else ()) if name == svc.name]
    return {"backend_protocol": svc.tls.backend_protocol, "backend_port": svc.tls.backend_port,
            "health_from": svc.tls.health_from or None, "certificates": certificates,
            "haproxy": running, "haproxy_pid": running_master.pid if running_master else None,
            "haproxy_adopted": bool(running_master and running_master.adopted)}  # left by an earlier xdplb


def rows(src, stats) -> list[dict]:
    """One dict per service of the pool, each with one dict per backend."""
    applied = src.applied
    slots = getattr(src, "slots", None) or {}
    macs = getattr(src, "macs", None) or {}
    drained = getattr(src, "drained", None) or ()
    telemetry = src.telemetry
    tier = getattr(src, "tls", None)
    haproxy = tier.counters if tier is not None else {}
    out = []
    for svc in src.pool.services:
        a = applied.services.get(svc.name)
        sc = stats.services.get(a.id) if a else None
        counts = slots.get(svc.name, {})
        backends = []
        for be in svc.backends:
            ident = str(be.address)
            judge = verdict_key(svc, be.address)   # a health_from follower shows the verdict and probe it acts on
            h = src.health.get(judge, Health())
            ab = applied.backends.get((svc.name, ident))
            bc = stats.backends.get(ab.id) if ab else None
            mac = macs.get(be.address)
            last = telemetry.last_probe.get((judge[0], ident))  # (ok, seconds, reason)
            backends.append({
                "name": be.name, "address": ident, "weight": be.weight,
                "drained": is_drained(svc.name, be, drained),
                "health": h.state.value, "since": h.since, "reason": h.reason,
                "mac": mac.hex(":") if mac else None, "id": ab.id if ab else None,
                "forwarding": bool(ab and ab.up),
                "packets": bc.packets if bc else 0, "bytes": bc.bytes if bc else 0,
                "new_flows": bc.new_flows if bc else 0,
                "table_slots": counts.get(ab.id, 0) if (a and ab) else 0,
                "probe_seconds": last[1] if last else None, "probe_ok": last[0] if last else None,
            })
            if svc.tls is not None:
                backends[-1]["tls"] = haproxy.get((svc.name, be.name))  # None while HAProxy does not answer
        out.append({
            "name": svc.name, "vip": str(svc.vip), "port": svc.port, "protocol": svc.protocol,
            "persistence": svc.persistence, "check": svc.health.check,
            "id": a.id if a else None,
            "packets": sc.packets if sc else 0, "bytes": sc.bytes if sc else 0,
            "new_flows": sc.new_flows if sc else 0, "backends": backends,
        })
        if svc.tls is not None:
            out[-1]["tls"] = _tls_service(svc, tier)
    return out
