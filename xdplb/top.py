"""`xdplb top`: a live view of each service and backend, from two status snapshots.

The daemon's status (over the control socket) carries cumulative counters;
rates are the difference between two snapshots over the time between them.
Everything here but `run` is pure: `view` turns two snapshots into rates,
`render` turns a view into text.
"""
from __future__ import annotations

import json
import time

from .addrtext import host_port

CLEAR_SCREEN = "\x1b[H\x1b[2J"


def rate(before: int | None, after: int | None, seconds: float) -> float | None:
    """Per-second rate of a counter, or None when it cannot be known
    (no earlier value, no time passed, or the counter restarted)."""
    if before is None or after is None or seconds <= 0 or after < before:
        return None
    return (after - before) / seconds


def _by_key(items: list, key) -> dict:
    return {key(item): item for item in items}


def _rates(prev: dict | None, cur: dict, seconds: float) -> dict:
    """pps, bps (bits per second) and flows/s of one service or backend entry.

    A counter is only comparable with the same map slot: a backend whose id
    changed (removed and re-added) starts again from zero."""
    same = prev is not None and prev.get("id") == cur.get("id")

    def r(field: str, scale: int = 1) -> float | None:
        value = rate(prev[field] if same else None, cur[field], seconds)
        return None if value is None else value * scale

    return {"pps": r("packets"), "bps": r("bytes", 8), "flows_per_s": r("new_flows")}


def view(prev: dict, cur: dict, seconds: float) -> dict:
    """What `top` shows, from two status snapshots `seconds` apart."""
    old_services = _by_key(prev.get("services", []), lambda s: s["name"])
    services = []
    for svc in cur["services"]:
        old = old_services.get(svc["name"])
        old_backends = _by_key(old["backends"] if old else [], lambda b: b["name"])
        backends = []
        for be in svc["backends"]:
            backends.append({
                "name": be["name"], "address": be["address"], "health": be["health"], "weight": be["weight"],
                "drained": bool(be.get("drained", be["weight"] == 0)),
                **_rates(old_backends.get(be["name"]), be, seconds),
                "probe_seconds": be.get("probe_seconds"), "probe_ok": be.get("probe_ok"),
            })
        services.append({
            "name": svc["name"], "vip": svc["vip"], "port": svc["port"], "protocol": svc["protocol"],
            **_rates(old, svc, seconds), "backends": backends,
        })

    def per_second(field: str) -> dict:
        before = prev.get(field, {})
        return {k: rate(before.get(k), v, seconds) for k, v in cur.get(field, {}).items()}

    return {
        "version": cur.get("version"), "interface": cur.get("interface"), "mode": cur.get("mode"),
        "interval": seconds, "services": services,
        "actions_per_s": per_second("actions"), "not_forwarded_per_s": per_second("not_forwarded"),
    }


def human(value: float | None, unit: str = "") -> str:
    """1234.5 -> "1.2k", None -> "-"; SI prefixes, as network tools print rates."""
    if value is None:
        return "-"
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.1f}{prefix}{unit}"
    return f"{value:.1f}{unit}" if value and abs(value) < 10 else f"{value:.0f}{unit}"


def _probe(be: dict) -> str:
    if be.get("probe_seconds") is None:
        return "-"
    text = f"{be['probe_seconds'] * 1000:.1f}ms"
    return text if be.get("probe_ok", True) else f"{text} fail"


def render(v: dict) -> str:
    """The text screen of one view."""
    lines = [f"xdplb {v['version']} on {v['interface']} ({v['mode']} mode), rates over {v['interval']:.1f}s"]
    for svc in v["services"]:
        lines.append("")
        lines.append(f"{svc['name']} {host_port(svc['vip'], svc['port'])}/{svc['protocol']}  "
                     f"{human(svc['pps'])} pps  {human(svc['bps'], 'b/s')}  {human(svc['flows_per_s'])} flows/s")
        width = max([15, *(len(be["address"]) for be in svc["backends"])])  # an IPv6 address is up to 39
        lines.append(f"  {'backend':<14} {'address':<{width}} {'health':<8} {'wt':>4} {'pps':>8} {'bps':>10} "
                     f"{'flows/s':>8} {'probe':>12}")
        for be in svc["backends"]:
            health = be["health"] + (" D" if be["drained"] else "")
            lines.append(f"  {be['name']:<14} {be['address']:<{width}} {health:<8} {be['weight']:>4} {human(be['pps']):>8} "
                         f"{human(be['bps'], 'b/s'):>10} {human(be['flows_per_s']):>8} {_probe(be):>12}")
    lines.append("")
    lines.append("xdp actions/s: " + ", ".join(f"{k} {human(r)}" for k, r in v["actions_per_s"].items()))
    lines.append("not forwarded/s: " + ", ".join(f"{k} {human(r)}" for k, r in v["not_forwarded_per_s"].items()))
    lines.append("(D = drained: keeps its flows, gets no new ones)")
    return "\n".join(lines)


def run(names: list[str], fetch, interval: float, once: bool, as_json: bool, single: bool, echo,
        tty: bool = False, clock=time.monotonic, sleep=time.sleep) -> None:
    """Poll `fetch(name)` for each instance every `interval` seconds and print views.

    `single`: -i named one instance, so JSON is one object rather than a list.
    Without `once` it runs until interrupted; JSON then comes one line per refresh.
    """
    def snapshot() -> dict:
        out = {}
        for name in names:
            started = clock()
            status = fetch(name)
            out[name] = ((started + clock()) / 2, status)  # the counters were read mid-request
        return out

    prev = snapshot()
    while True:
        sleep(interval)
        cur = snapshot()
        views = [view(prev[n][1], cur[n][1], cur[n][0] - prev[n][0]) for n in names]
        if as_json:
            data = views[0] if single else views
            echo(json.dumps(data, indent=2) if once else json.dumps(data))
        else:
            echo((CLEAR_SCREEN if tty and not once else "") + "\n\n".join(render(v) for v in views))
        if once:
            return
        prev = cur
