"""HAProxy as xdplb's TLS tier: its configuration, derived from the pool.

Each service with a [service.tls] table becomes one HAProxy `listen`
section that terminates TLS on vip:port and speaks cleartext
``backend_protocol`` to every backend's ``backend_port``. Every line is
derived from the pool and from xdplb's verdicts; nothing is kept by hand.

HAProxy's own health checks are off (no `check` on any server): xdplb's
probes, DICOM C-ECHO included, are the one health truth, pushed through the
runtime API (`set server ... state`, `set weight`). A reload starts a new
HAProxy process that knows nothing of what was pushed to the old one, so the
states are also written into the configuration: a down backend is
`disabled` (HAProxy's maintenance), a drained one has weight 0. A down PACS
therefore stays out across a reload, even before the first push.

Pure: ``server_states`` and ``render`` take data and return data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from .config import Pool, Service
from .desired import is_drained
from .health_fsm import Health, State

MAX_WEIGHT = 256          # HAProxy's largest server weight; xdplb's go to 1000
TIMEOUT_CONNECT = "5s"
TIMEOUT_IDLE = "30m"      # a DICOM association may sit idle between studies
_BIND_VERSIONS = {"1.2": "TLSv1.2", "1.3": "TLSv1.3"}


@dataclass(frozen=True)
class ServerState:
    """What HAProxy should do with one server: its runtime admin state and weight.

    state is "ready" (takes new connections), "drain" (keeps its connections,
    gets no new ones) or "maint" (down by xdplb's verdict)."""

    state: str
    weight: int


def tls_services(pool: Pool) -> tuple[Service, ...]:
    return tuple(s for s in pool.services if s.tls is not None)


def verdict_key(svc: Service, address) -> tuple:
    """The (service, address) whose verdict a backend of `svc` follows: its own, or
    that of the service named by tls.health_from."""
    followed = svc.tls.health_from if svc.tls is not None and svc.tls.health_from else svc.name
    return (followed, address)


def haproxy_weights(svc: Service) -> dict[str, int]:
    """Each backend's weight in HAProxy's 0-256: as written when the service's weights
    fit, else scaled so the largest is 256 and no non-zero weight becomes 0."""
    top = max((b.weight for b in svc.backends), default=0)
    if top <= MAX_WEIGHT:
        return {b.name: b.weight for b in svc.backends}
    return {b.name: max(1, round(b.weight * MAX_WEIGHT / top)) if b.weight else 0 for b in svc.backends}


def server_states(pool: Pool, health: Mapping[tuple, Health],
                  drained: frozenset | set = frozenset()) -> dict[tuple[str, str], ServerState]:
    """(service name, backend name) -> ServerState for every backend of every TLS service.

    A backend is "maint" unless its verdict is UP (unknown counts as down, as in
    the XDP tier, which gives it no slots); "drain" when drained by the pool
    (weight 0) or by `xdplb drain`; else "ready"."""
    states = {}
    for svc in tls_services(pool):
        weights = haproxy_weights(svc)
        for be in svc.backends:
            up = health.get(verdict_key(svc, be.address), Health()).state is State.UP
            if not up:
                state = "maint"
            elif is_drained(svc.name, be, drained):
                state = "drain"
            else:
                state = "ready"
            states[(svc.name, be.name)] = ServerState(state, weights[be.name])
    return states


def _balance(svc: Service) -> str:
    if svc.persistence == "client":
        return "source"       # as the XDP tier's client persistence: one client, one PACS
    return "roundrobin" if svc.tls.backend_protocol == "http" else "leastconn"


def _bind(svc: Service) -> str:
    tls = svc.tls
    words = [f"bind {svc.vip}:{svc.port} ssl", f'crt "{tls.certificate}"',
             f"ssl-min-ver {_BIND_VERSIONS[tls.min_version]}", f"ciphers {tls.ciphers}",
             f"ciphersuites {tls.ciphersuites}"]
    if tls.backend_protocol == "http":
        words.append("alpn h2,http/1.1")
    if tls.client_ca:
        words.append(f'ca-file "{tls.client_ca}" verify required')
    return " ".join(words)


def _server(svc: Service, be, state: ServerState) -> str:
    # A drained server is written with weight 0: the config cannot say "drain".
    weight = 0 if state.state == "drain" else state.weight
    line = f"server {be.name} {be.address}:{svc.tls.backend_port} weight {weight}"
    return line + " disabled" if state.state == "maint" else line


def _listen(svc: Service, states: Mapping[tuple[str, str], ServerState]) -> list[str]:
    http = svc.tls.backend_protocol == "http"
    lines = [f"listen {svc.name}",
             f"    mode {'http' if http else 'tcp'}",
             f"    {_bind(svc)}",
             f"    balance {_balance(svc)}"]
    if http:
        lines += ["    option forwardfor",                    # the PACS sees the client in X-Forwarded-For
                  "    http-request set-header X-Forwarded-Proto https"]
    for be in svc.backends:
        lines.append(f"    {_server(svc, be, states.get((svc.name, be.name), ServerState('maint', 0)))}")
    return lines


def render(pool: Pool, states: Mapping[tuple[str, str], ServerState], stats_socket: str) -> str:
    """HAProxy's whole configuration for the pool's TLS services, with the servers' states."""
    lines = [
        f"# Generated by xdplb from {pool.source}; xdplb rewrites it on every reload: do not edit.",
        "global",
        "    master-worker",
        # Runtime API for xdplb only: mode 0600 in xdplb's 0700 run directory. expose-fd
        # hands the listening sockets to the next process on a reload, so none is refused.
        f'    stats socket "{stats_socket}" mode 600 level admin expose-fd listeners',
        "    log stderr format short daemon notice",
        "",
        "defaults",
        "    log global",
        f"    timeout connect {TIMEOUT_CONNECT}",
        f"    timeout client {TIMEOUT_IDLE}",
        f"    timeout server {TIMEOUT_IDLE}",
        "    # No server has 'check': xdplb's probes decide, through the runtime API.",
    ]
    for svc in tls_services(pool):
        lines += ["", *_listen(svc, states)]
    return "\n".join(lines) + "\n"
