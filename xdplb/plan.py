"""Plan the map writes that take the kernel from what it holds to what it should.

Pure: `plan(applied, desired)` returns the ordered writes and the state the
kernel holds once they are done. The daemon hands the writes to the kernel
layer (xdplb/dataplane.py) and keeps the returned state; tests run it against
a fake. Nothing here touches the kernel or the network.

Order of the writes, so that no packet ever sees a half-done change:
  1. the interface config (source MAC, hash seed);
  2. counters of newly allocated ids are zeroed;
  3. backends are written (a new MAC, up -> down or down -> up takes effect
     at once for existing flows: a flow on a backend that went down stays
     on it for the down grace, counted from the `down_since` written here,
     then is re-chosen);
  4. each changed Maglev table is written into the service's idle half;
  5. each service entry is written, flipping to that half (one byte of its
     service_ids entry; the kernel layer adds the grace periods that
     bpf/lb_maps.h asks for between these steps);
  (NAT: each reverse translation is written with the early writes, before
  the backend it translates for can be chosen, and deleted with the late
  ones, after it is cleared: see _nat_reverse_ops.)
  6. VIP addresses are added;
  7. removed services are deleted, then their and other removed backends are
     retired (no live table names them any more), then unused VIPs go.

A removed backend follows the same grace as one marked down: it is written
down (not cleared) and its id stays reserved in `Applied.retired` until the
grace has passed, so flows on it keep going and no other backend takes the
id over meanwhile; a later plan (`retire_due` says when) clears it. Times
are CLOCK_MONOTONIC nanoseconds, the clock of bpf_ktime_get_ns().

Identity: a service is its name plus (VIP, port, protocol); a backend is its
address within a service. Renaming a backend moves nothing.

IPv6: the same writes; the kernel layer picks the IPv6 maps by the VIP's
family (NAT: nat_backends6, nat_reverse6 and nat_addrs6 by the backend's). An IPv6 service's client prefix goes with its Maglev half (service_ids6
in bpf/lb_maps6.h), so a change of it is written like a new table: into the
idle half, then flipped.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Mapping

from . import maglev
from .structs import F_SVC_CLIENT_PERSIST, F_SVC_NAT

# ---- what the controller wants -------------------------------------------


@dataclass(frozen=True)
class BackendState:
    name: str
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    weight: int
    mac: bytes | None      # None while the neighbour entry (ARP or NDP) is unresolved
    healthy: bool          # the health verdict (UNKNOWN counts as not healthy)
    port: int = 0          # NAT services: the port the backend listens on; DSR: 0

    @property
    def up(self) -> bool:
        """Usable by the data plane: healthy and reachable on the segment."""
        return self.healthy and self.mac is not None


@dataclass(frozen=True)
class ServiceState:
    name: str
    vip: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int
    protocol: str
    persistence: str
    backends: tuple[BackendState, ...]
    forwarding: str = "dsr"    # "dsr" | "nat"
    client_prefix: int = 128   # IPv6 client persistence: leading bits of the client address hashed

    @property
    def key(self) -> tuple:
        return (self.vip, self.port, self.protocol)

    @property
    def flags(self) -> int:
        return ((F_SVC_CLIENT_PERSIST if self.persistence == "client" else 0)
                | (F_SVC_NAT if self.forwarding == "nat" else 0))


@dataclass(frozen=True)
class Desired:
    """Defaults of the flow fields are the neutral ones (no grace, no UDP
    expiry, no flood guard); desired_state fills in the pool's."""

    services: tuple[ServiceState, ...]
    mac: bytes                 # the attached interface's MAC
    hash_seed: int
    maglev_size: int
    max_services: int
    max_backends: int
    drop_without_backend: bool = False   # pool no_backend = "drop"
    extra_macs: tuple[bytes, ...] = ()   # other unicast MACs whose frames are balanced
    udp_idle_ns: int = 0                 # UDP flow entries expire after this idle time; 0: never
    down_grace_ns: int = 0               # flows stay on a down or removed backend this long; 0: re-chosen at once
    flood_rate: int = 0                  # new flow entries per second per CPU before the guard; 0: no guard

    @property
    def config(self) -> tuple:
        """The lb_config entry, in SetConfig's field order."""
        return (self.mac, self.hash_seed, self.drop_without_backend, self.extra_macs,
                self.udp_idle_ns, self.down_grace_ns, self.flood_rate)


# ---- what the kernel holds ------------------------------------------------


@dataclass(frozen=True)
class AppliedService:
    id: int
    key: tuple
    flags: int
    half: int                  # live Maglev half, 0 or 1
    eligible: tuple            # ((address, weight, backend id), ...) the live table was built from
    table: tuple[int, ...]
    client_prefix: int = 128   # IPv6: written with the live half


@dataclass(frozen=True)
class AppliedBackend:
    id: int
    service_id: int
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    mac: bytes | None
    up: bool
    down_since: int = 0        # monotonic ns when it stopped being up; 0 while up or never up
    port: int = 0              # NAT: the port it listens on (nat_backends); 0: DSR


@dataclass(frozen=True)
class Applied:
    config: tuple | None = None                                   # Desired.config as written
    services: Mapping[str, AppliedService] = field(default_factory=lambda: MappingProxyType({}))
    backends: Mapping[tuple, AppliedBackend] = field(default_factory=lambda: MappingProxyType({}))
    vips: frozenset = frozenset()
    next_backend_id: int = 1                                      # allocation cursor (see _alloc_backend)
    # Removed backends inside their grace: (service name, address) -> (the
    # backend as written, down, monotonic ns when its id may be cleared).
    retired: Mapping[tuple, tuple] = field(default_factory=lambda: MappingProxyType({}))
    # NAT reverse translations written: (backend address, backend port, protocol) -> (VIP, service port)
    nat_reverse: Mapping[tuple, tuple] = field(default_factory=lambda: MappingProxyType({}))


# ---- the writes -----------------------------------------------------------


@dataclass(frozen=True)
class SetConfig:
    mac: bytes
    hash_seed: int
    drop_without_backend: bool = False
    extra_macs: tuple[bytes, ...] = ()
    udp_idle_ns: int = 0
    down_grace_ns: int = 0
    flood_rate: int = 0


@dataclass(frozen=True)
class ZeroCounters:
    kind: str                  # "service" | "backend"
    id: int


@dataclass(frozen=True)
class PutBackend:
    id: int
    service_id: int
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    mac: bytes
    up: bool
    down_since: int = 0        # monotonic ns (bpf_ktime_get_ns's clock) when it went down; 0 while up
    port: int = 0              # NAT: the port it listens on (nat_backends[id], nat_backends6[id] for IPv6);
                               # 0: DSR (both cleared)


@dataclass(frozen=True)
class ClearBackend:
    id: int


@dataclass(frozen=True)
class PutTable:
    service_id: int
    half: int
    slots: tuple[int, ...] = field(repr=False)


@dataclass(frozen=True)
class PutService:
    vip: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int
    protocol: str
    id: int
    flags: int
    half: int
    client_prefix: int = 128   # IPv6: written into service_ids6 with this half


@dataclass(frozen=True)
class DelService:
    vip: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int
    protocol: str


@dataclass(frozen=True)
class PutNatReverse:
    """nat_reverse[(address, port, protocol)] = (vip, vport); nat_reverse6 for
    an IPv6 address (the kernel layer picks the map, and nat_addrs or
    nat_addrs6, by the family; address and VIP share it)."""

    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int
    protocol: str
    vip: ipaddress.IPv4Address | ipaddress.IPv6Address
    vport: int


@dataclass(frozen=True)
class DelNatReverse:
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int
    protocol: str


@dataclass(frozen=True)
class PutVip:
    address: ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class DelVip:
    address: ipaddress.IPv4Address | ipaddress.IPv6Address


class PlanError(RuntimeError):
    """The desired state does not fit the compiled map sizes."""


@dataclass(frozen=True)
class Plan:
    ops: tuple
    applied: Applied
    rebuilt: tuple[str, ...]   # names of services whose Maglev table was rebuilt


def _alloc_backend(used: set[int], cursor: int, max_backends: int) -> int:
    """Next free id at or after the cursor, wrapping past max_backends-1 to 1.

    Ids are not reused at once: a flow entry that still names a just-removed
    id must not reach a different backend that took the id over.
    """
    span = max_backends - 1
    for step in range(span):
        candidate = (cursor - 1 + step) % span + 1
        if candidate not in used:
            return candidate
    raise PlanError(f"all {span} backend ids are in use; raise [xdplb] max_backends")


def _alloc_service(used: set[int], max_services: int) -> int:
    for candidate in range(max_services):
        if candidate not in used:
            return candidate
    raise PlanError(f"all {max_services} service ids are in use; raise [xdplb] max_services")


def retire_due(applied: Applied, now_ns: int) -> bool:
    """Whether a retired backend's grace has passed, so a plan would clear it."""
    return any(until <= now_ns for _be, until in applied.retired.values())


def _went_down(prev: AppliedBackend | None, up: bool, now_ns: int) -> int:
    """down_since for a backend that is `up` now and was `prev`."""
    if up:
        return 0
    if prev is not None and prev.up:
        return now_ns
    return prev.down_since if prev is not None else 0


def _address_order(address) -> tuple:
    """IPv4 before IPv6 (the two do not compare)."""
    return (address.version, address)


def plan(applied: Applied, desired: Desired, now_ns: int = 0) -> Plan:
    """`now_ns` is CLOCK_MONOTONIC in ns (time.monotonic_ns()), the clock the
    program compares a backend's down_since with."""
    early: list = []           # config, zeroed counters, backends
    tables: list = []
    services_ops: list = []
    late: list = []            # deletions

    config = desired.config
    if applied.config != config:
        early.append(SetConfig(*config))

    wanted = {(s.name, s.key) for s in desired.services}
    kept_services = {n: a for n, a in applied.services.items() if (n, a.key) in wanted}
    # Ids of everything the kernel holds stay reserved for this plan, even of
    # what it removes: those are cleared only at its end.
    service_ids = {a.id for a in applied.services.values()}
    new_services: dict[str, AppliedService] = {}
    new_backends: dict[tuple, AppliedBackend] = {}
    retired = dict(applied.retired)
    backend_ids = {b.id for b in applied.backends.values()} | {b.id for b, _ in retired.values()}
    cursor = applied.next_backend_id
    rebuilt: list[str] = []

    for svc in desired.services:
        old = kept_services.get(svc.name)
        if old is None:
            sid = _alloc_service(service_ids, desired.max_services)
            service_ids.add(sid)
            early.append(ZeroCounters("service", sid))
        else:
            sid = old.id

        eligible = []
        for be in svc.backends:
            bkey = (svc.name, str(be.address))
            prev = applied.backends.get(bkey) if old is not None else None
            if prev is None and old is not None and bkey in retired:
                prev = retired.pop(bkey)[0]   # back within its grace: same id, its flows never left
            if prev is None:
                bid = _alloc_backend(backend_ids, cursor, desired.max_backends)
                backend_ids.add(bid)
                cursor = bid % (desired.max_backends - 1) + 1
                early.append(ZeroCounters("backend", bid))
            else:
                bid = prev.id
            if be.mac is not None:
                state = AppliedBackend(bid, sid, be.address, be.mac, be.up, _went_down(prev, be.up, now_ns),
                                       be.port)
                if state != prev:
                    early.append(PutBackend(bid, sid, be.address, be.mac, be.up, state.down_since, be.port))
            elif prev is not None and prev.mac is not None:
                # The MAC is unknown for now: keep the old one, but not up.
                state = replace(prev, up=False, down_since=_went_down(prev, False, now_ns), port=be.port)
                if state != prev:
                    early.append(PutBackend(bid, sid, be.address, prev.mac, False, state.down_since, be.port))
            else:
                state = AppliedBackend(bid, sid, be.address, None, False, port=be.port)
            new_backends[bkey] = state
            if be.up and be.weight > 0:
                eligible.append((str(be.address), be.weight, bid))
        eligible_sig = tuple(sorted(eligible))

        if old is not None and old.eligible == eligible_sig and old.client_prefix == svc.client_prefix:
            half, table = old.half, old.table
        else:
            half = 0 if old is None else 1 - old.half
            table = tuple(
                maglev.build_table([maglev.MaglevBackend(a, w, i) for a, w, i in eligible_sig], desired.maglev_size)
            )
            tables.append(PutTable(sid, half, table))
            rebuilt.append(svc.name)
        if old is None or old.half != half or old.flags != svc.flags:
            services_ops.append(PutService(svc.vip, svc.port, svc.protocol, sid, svc.flags, half, svc.client_prefix))
        new_services[svc.name] = AppliedService(sid, svc.key, svc.flags, half, eligible_sig, table,
                                                svc.client_prefix)

    vips = frozenset(s.vip for s in desired.services)
    vip_ops = [PutVip(v) for v in sorted(vips - applied.vips, key=_address_order)]

    # A key that a desired service (renamed, or swapped with another) has
    # just been written under must not be deleted again.
    wanted_keys = {s.key for s in desired.services}
    for name, old in applied.services.items():
        if name not in kept_services and old.key not in wanted_keys:
            vip, port, protocol = old.key
            late.append(DelService(vip, port, protocol))
    for bkey, old_be in applied.backends.items():
        if bkey in new_backends and new_backends[bkey].id == old_be.id:
            continue
        down = replace(old_be, up=False, down_since=_went_down(old_be, False, now_ns))
        until = down.down_since + desired.down_grace_ns
        if old_be.mac is None or desired.down_grace_ns == 0 or until <= now_ns:
            late.append(ClearBackend(old_be.id))
            continue
        if down != old_be:
            late.append(PutBackend(down.id, down.service_id, down.address, down.mac, False, down.down_since,
                                   down.port))
        retired[bkey if bkey not in retired else (bkey, down.id)] = (down, until)
    for rkey, (down, until) in list(retired.items()):
        if until <= now_ns or desired.down_grace_ns == 0:
            late.append(ClearBackend(down.id))
            del retired[rkey]
    late += [DelVip(v) for v in sorted(applied.vips - vips, key=_address_order)]
    nat_reverse = _nat_reverse(desired, new_services, retired)
    nat_put, nat_del = _nat_reverse_ops(applied.nat_reverse, nat_reverse)
    early = nat_put + early
    late += nat_del

    new_applied = Applied(
        config=config,
        services=MappingProxyType(new_services),
        backends=MappingProxyType(new_backends),
        vips=vips,
        next_backend_id=cursor,
        retired=MappingProxyType(retired),
        nat_reverse=MappingProxyType(nat_reverse),
    )
    ops = tuple(early + tables + services_ops + vip_ops + late)
    return Plan(ops, new_applied, tuple(rebuilt))


def _nat_reverse(desired: Desired, services: Mapping[str, AppliedService], retired: Mapping) -> dict:
    """(backend address, backend port, protocol) -> (VIP, service port) for every
    backend of a NAT service, those kept within their grace after removal too
    (their flows still send replies)."""
    out: dict[tuple, tuple] = {}
    for svc in desired.services:
        if svc.forwarding == "nat":
            for be in svc.backends:
                out[(be.address, be.port, svc.protocol)] = (svc.vip, svc.port)
    key_of = {a.id: a.key for a in services.values()}
    for down, _until in retired.values():
        if down.port and down.service_id in key_of:
            vip, port, protocol = key_of[down.service_id]
            out.setdefault((down.address, down.port, protocol), (vip, port))
    return out


def _nat_reverse_ops(have: Mapping, want: Mapping) -> tuple[list, list]:
    """Writes that take nat_reverse from `have` to `want`: puts first (a
    changed value is one put), deletions of keys no longer wanted last."""
    puts = [PutNatReverse(a, p, proto, *want[(a, p, proto)]) for a, p, proto in sorted(want, key=str)
            if have.get((a, p, proto)) != want[(a, p, proto)]]
    dels = [DelNatReverse(a, p, proto) for a, p, proto in sorted(have, key=str) if (a, p, proto) not in want]
    return puts, dels


def adopt(kernel, service_names: Mapping[tuple, str]) -> Applied:
    """The Applied state matching maps left by an earlier controller.

    `kernel` is a dataplane.KernelState; `service_names` maps each
    (vip, port, protocol) of the new pool to its service name. Ids are kept
    as they are, so flow entries keep naming the right backends. Services the
    new pool lacks get a placeholder name, so the next plan deletes them.
    The `eligible` signature cannot be read back (weights are not in the
    maps), so the first plan rewrites each table into its idle half: the same
    table when nothing changed, since Maglev is deterministic.
    """
    services: dict[str, AppliedService] = {}
    name_of_id: dict[int, str] = {}
    for key, (sid, flags, half) in sorted(kernel.services.items(), key=lambda kv: kv[1][0]):
        name = service_names.get(key, f"(adopted service {sid})")
        name_of_id[sid] = name
        prefix = getattr(kernel, "refs6", {}).get(sid, (None, 128))[1]
        services[name] = AppliedService(sid, key, flags, half, ("(adopted)",), kernel.tables.get((sid, half), ()),
                                        prefix)
    backends: dict[tuple, AppliedBackend] = {}
    down_since = getattr(kernel, "down_since", {})
    for bid, (sid, address, mac, up) in sorted(kernel.backends.items()):
        name = name_of_id.get(sid)
        if name is None:
            name = f"(orphan backend {bid})"
        backends[(name, str(address))] = AppliedBackend(bid, sid, address, mac, up, down_since.get(bid, 0),
                                                        getattr(kernel, "nat_backends", {}).get(bid, 0))
    top = max(kernel.backends, default=0)
    return Applied(
        config=kernel.config,
        services=MappingProxyType(services),
        backends=MappingProxyType(backends),
        vips=frozenset(kernel.vips),
        next_backend_id=top + 1,
        nat_reverse=MappingProxyType(dict(getattr(kernel, "nat_reverse", {}))),
    )
