"""Fakes of the daemon's injected side-effect objects, for unit tests.

FakeDataplane keeps the kernel maps as plain dicts, written only through the
planner's ops, and refuses writes the real maps would refuse (ids out of a
compiled map's range, a table of the wrong size). FakeNetlink holds one or
more links, their addresses and a neighbour table the test edits. FakeProber
answers probes from a table the test edits. None of them needs root, bcc or
a network.
"""
from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import time
from collections import Counter

from xdplb import plan
from xdplb.dataplane import Counters, KernelState, Stats
from xdplb.netlink import Link, NetlinkProblem
from xdplb.probes import ProbeResult
from xdplb.structs import ACTIONS, EVENTS, REASONS, TAIL_MISSES


def _ip(address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(str(address))


def _key(vip, port: int, protocol: str) -> tuple:
    return (_ip(vip), port, protocol)


class AttachRefused(RuntimeError):
    """What FakeDataplane.attach raises for a mode in refuse_modes."""


class FakeDataplane:
    """The maps of one loaded program, as dicts.

    services: (vip, port, protocol) -> (id, flags, half)
    backends: id -> (service_id, address, mac, up); ClearBackend removes the id
    tables:   (service_id, half) -> tuple of slots
    vips:     set of VIP addresses
    config:   every field of the last SetConfig, in order (plan.Desired.config), or None
    down_since: id -> monotonic ns its PutBackend said it went down (0: up)
    nat_backends: id -> NAT port; nat_reverse: (address, port, protocol) -> (vip, vport)
    counters: ("service" | "backend", id) -> Counters, set by ZeroCounters
    log:      every op applied, in order
    """

    def __init__(self, settings, pin_dir=None, attached_prog_id=None):
        self.settings = settings
        self.pin_dir = pin_dir
        self.attached_prog_id = attached_prog_id  # the earlier program whose maps a real dataplane adopts
        self.adopted = False      # True would make the daemon adopt read_state()
        self.notes: list[str] = []
        self.unpinned = 0
        self.compile_seconds = 0.0
        self.log: list = []
        self.services: dict[tuple, tuple] = {}
        self.backends: dict[int, tuple] = {}
        self.tables: dict[tuple, tuple] = {}
        self.vips: set = set()
        self.config: tuple | None = None
        self.down_since: dict[int, int] = {}
        self.nat_backends: dict[int, int] = {}      # backend id -> NAT port
        self.nat_reverse: dict[tuple, tuple] = {}   # (address, port, protocol) -> (vip, vport)
        self.refs6: dict[tuple, tuple] = {}         # IPv6 (service id, half) -> (vip, client_prefix): service_ids6
        self.counters: dict[tuple, Counters] = {}
        self.attached: tuple[str, str] | None = None
        self.attach_calls: list[tuple] = []   # (ifname, mode) or (ifname, mode, "replace")
        self.detach_calls = 0
        self.refuse_modes: set[str] = set()
        self.apply_calls = 0                  # apply() calls that wrote at least one op
        self.action_counts: Counter = Counter()  # XDP action -> packets, what read_stats reports; tests bump it
        self.failures: list = []              # [op class name or None, writes to fail, writes to let through first]
        self.live_table_writes: list = []     # PutTable ops that rewrote a live table in place

    def fail_writes(self, times: int = 1, op: str | None = None, after: int = 0) -> None:
        """Make `times` writes (of op class `op`, or any) raise OSError, as a map
        update refused by the kernel does, after letting `after` such writes
        through. Ops before it in the same apply() are written, so a plan can
        be left half applied."""
        self.failures.append([op, times, after])

    # ---- attach -----------------------------------------------------------

    def attach(self, ifname: str, mode: str, replace: bool = False) -> None:
        self.attach_calls.append((ifname, mode, "replace") if replace else (ifname, mode))
        if self.attached is not None:
            raise AttachRefused(f"already attached to {self.attached[0]}")
        if mode in self.refuse_modes:
            raise AttachRefused(f"attaching to {ifname} in {mode} mode failed: Operation not supported")
        self.attached = (ifname, mode)

    def detach(self) -> None:
        self.detach_calls += 1
        self.attached = None

    def unpin(self) -> bool:
        self.unpinned += 1
        return False  # nothing is pinned in a fake

    # ---- writes -----------------------------------------------------------

    def _check_service_id(self, sid: int) -> None:
        if not 0 <= sid < self.settings.max_services:
            raise ValueError(f"service id {sid} outside the compiled map (max_services {self.settings.max_services})")

    def _check_backend_id(self, bid: int) -> None:
        # Array of max_backends entries; id 0 means "no backend" and is never written.
        if not 1 <= bid < self.settings.max_backends:
            raise ValueError(f"backend id {bid} outside 1..{self.settings.max_backends - 1}")

    def apply(self, ops) -> None:
        ops = list(ops)
        if ops:
            self.apply_calls += 1
        for op in ops:
            for failure in self.failures:
                if failure[1] > 0 and failure[0] in (None, type(op).__name__):
                    if failure[2] > 0:
                        failure[2] -= 1
                        continue
                    failure[1] -= 1
                    raise OSError(f"injected failure writing {type(op).__name__}")
            self.log.append(op)
            self._apply_one(op)

    def _apply_one(self, op) -> None:
        if isinstance(op, plan.SetConfig):
            self.config = dataclasses.astuple(op)
        elif isinstance(op, plan.ZeroCounters):
            if op.kind == "service":
                self._check_service_id(op.id)
            elif op.kind == "backend":
                self._check_backend_id(op.id)
            else:
                raise ValueError(f"unknown counter kind {op.kind!r}")
            self.counters[(op.kind, op.id)] = Counters()
        elif isinstance(op, plan.PutBackend):
            self._check_backend_id(op.id)
            self._check_service_id(op.service_id)
            if op.mac is None or len(op.mac) != 6:
                raise ValueError(f"backend {op.id}: MAC must be 6 bytes, got {op.mac!r}")
            self.backends[op.id] = (op.service_id, _ip(op.address), bytes(op.mac), bool(op.up))
            self.down_since[op.id] = op.down_since
            if op.port:
                self.nat_backends[op.id] = op.port
            else:
                self.nat_backends.pop(op.id, None)
        elif isinstance(op, plan.ClearBackend):
            self._check_backend_id(op.id)
            self.backends.pop(op.id, None)  # the real map zeroes the entry
            self.down_since.pop(op.id, None)
            self.nat_backends.pop(op.id, None)
        elif isinstance(op, plan.PutTable):
            self._check_service_id(op.service_id)
            if op.half not in (0, 1):
                raise ValueError(f"table half {op.half}")
            if len(op.slots) != self.settings.maglev_size:
                raise ValueError(f"table of {len(op.slots)} slots, compiled for {self.settings.maglev_size}")
            if any(sid == op.service_id and half == op.half for sid, _f, half in self.services.values()):
                self.live_table_writes.append(op)
            self.tables[(op.service_id, op.half)] = tuple(op.slots)
        elif isinstance(op, plan.PutService):
            self._check_service_id(op.id)
            if op.half not in (0, 1):
                raise ValueError(f"table half {op.half}")
            self.services[_key(op.vip, op.port, op.protocol)] = (op.id, op.flags, op.half)
            if _ip(op.vip).version == 6:
                self.refs6[(op.id, op.half)] = (_ip(op.vip), op.client_prefix)
        elif isinstance(op, plan.DelService):
            self.services.pop(_key(op.vip, op.port, op.protocol), None)
        elif isinstance(op, plan.PutNatReverse):
            if _ip(op.address).version != _ip(op.vip).version:   # the real maps are per family (nat_reverse6)
                raise ValueError(f"NAT backend {op.address} and VIP {op.vip} are of different families")
            self.nat_reverse[(_ip(op.address), op.port, op.protocol)] = (_ip(op.vip), op.vport)
        elif isinstance(op, plan.DelNatReverse):
            self.nat_reverse.pop((_ip(op.address), op.port, op.protocol), None)
        elif isinstance(op, plan.PutVip):
            self.vips.add(_ip(op.address))
        elif isinstance(op, plan.DelVip):
            self.vips.discard(_ip(op.address))
        else:
            raise TypeError(f"unknown map write {op!r}")

    # ---- reads ------------------------------------------------------------

    def read_stats(self, service_ids, backend_ids) -> Stats:
        return Stats(
            services={i: Counters() for i in service_ids},
            backends={i: Counters() for i in backend_ids},
            actions={a: self.action_counts[a] for a in ACTIONS},
            not_forwarded={r: 0 for r in REASONS + TAIL_MISSES},
            events={e: 0 for e in EVENTS},
        )

    def read_state(self) -> KernelState:
        """The maps as an adopting controller reads them back (live halves only)."""
        tables = {}
        for sid, _flags, half in self.services.values():
            if (sid, half) in self.tables:
                tables[(sid, half)] = self.tables[(sid, half)]
        refs6 = {sid: self.refs6[(sid, half)] for (vip, _p, _pr), (sid, _f, half) in self.services.items()
                 if vip.version == 6 and (sid, half) in self.refs6}
        return KernelState(dict(self.services), dict(self.backends), tables, set(self.vips), self.config,
                           dict(self.down_since), dict(self.nat_backends), dict(self.nat_reverse), refs6)

    def flows(self, limit: int = 100000) -> dict:
        return {}

    # ---- helpers for tests ------------------------------------------------

    def live_table(self, key) -> tuple | None:
        """The table a packet to key = (vip, port, protocol) is balanced with:
        the half the service entry names. None if the service is absent."""
        entry = self.services.get(_key(*key))
        if entry is None:
            return None
        sid, _flags, half = entry
        return self.tables.get((sid, half))

    def live_backends(self, key) -> Counter:
        """Address -> slots it owns in the live table of key (ids with no
        backend entry are counted under None)."""
        table = self.live_table(key) or ()
        out: Counter = Counter()
        for bid in table:
            if bid:
                entry = self.backends.get(bid)
                out[entry[1] if entry else None] += 1
        return out

    def backend_by_address(self, key, address) -> tuple | None:
        """(id, (service_id, address, mac, up)) of address in the service of key."""
        entry = self.services.get(_key(*key))
        if entry is None:
            return None
        for bid, value in self.backends.items():
            if value[0] == entry[0] and value[1] == _ip(address):
                return bid, value
        return None


class FakeNetlink:
    """Links, their addresses (both families) and a neighbour table, as dicts.

    addresses: link index -> set of every address on it (operator's and ours)
    ours:      link index -> set of addresses add_vip added (what `vips` lists)
    neighbours: address -> MAC bytes (or None: unresolved); edit freely
    """

    def __init__(self, links=(), neighbours=None, addresses=None, features=None):
        self.links: dict[str, Link] = {l.name: l for l in links}
        self.features: dict[str, frozenset] = dict(features or {})  # link name -> active ethtool features
        self.neighbours: dict = dict(neighbours or {})
        self.addresses: dict[int, set] = {l.index: set() for l in links}
        for index, addrs in (addresses or {}).items():
            self.addresses.setdefault(index, set()).update(_ip(a) for a in addrs)
        self.ours: dict[int, set] = {l.index: set() for l in links}
        self.solicited: list = []
        self.gateways: set = set()           # next hops of the routes out of the link (route_gateways)
        self.calls: list[tuple] = []
        self.dumps = 0                       # neighbour_macs calls
        self.lookups = 0                     # neighbour_mac calls
        self.failing: Counter = Counter()    # method name -> calls still to fail
        self.delay = 0.0                     # seconds each neighbour read blocks its caller
        self.routes: dict[int, set] = {}     # table -> VIPs announced there (xdplb's routes only)
        # Each interface's own IPv4 / IPv6 forwarding (net.ipv{4,6}.conf.<name>.forwarding, what
        # bpf_fib_lookup reads): `forwarding` / `forwarding6` for every interface (what writing
        # net.ipv4.ip_forward / net.ipv6.conf.all.forwarding sets), unless if_forwarding says otherwise.
        self.forwarding = True
        self.forwarding6 = True
        self.if_forwarding: dict[tuple[int, str], bool] = {}   # (version, name) -> on

    def fail(self, method: str, times: int = 1) -> None:
        """Make the next `times` calls of `method` raise NetlinkProblem."""
        self.failing[method] += times

    def _maybe_fail(self, method: str) -> None:
        if self.delay:
            time.sleep(self.delay)
        if self.failing[method] > 0:
            self.failing[method] -= 1
            raise NetlinkProblem(f"injected netlink failure in {method}")

    def link(self, name: str) -> Link:
        self.calls.append(("link", name))
        if name not in self.links:
            raise NetlinkProblem(f"interface {name!r} does not exist in this network namespace")
        return self.links[name]

    def active_features(self, name: str) -> frozenset:
        self.calls.append(("active_features", name))
        return frozenset(self.features.get(name, ()))

    def ip_forwarding(self, version: int, name: str) -> bool:
        self.calls.append(("ip_forwarding", version, name))
        self._maybe_fail("ip_forwarding")
        return self.if_forwarding.get((version, name), self.forwarding if version == 4 else self.forwarding6)

    def vips(self, index: int) -> set:
        return set(self.ours.get(index, ()))

    def has_address(self, index: int, address) -> bool:
        return _ip(address) in self.addresses.get(index, ())

    def add_vip(self, index: int, address) -> bool:
        self.calls.append(("add_vip", index, _ip(address)))
        if self.has_address(index, address):
            return False
        self.addresses.setdefault(index, set()).add(_ip(address))
        self.ours.setdefault(index, set()).add(_ip(address))
        return True

    def del_vip(self, index: int, address) -> None:
        self.calls.append(("del_vip", index, _ip(address)))
        self.addresses.get(index, set()).discard(_ip(address))
        self.ours.get(index, set()).discard(_ip(address))

    def announced(self, table: int) -> set:
        self._maybe_fail("announced")
        return set(self.routes.get(table, ()))

    def announce(self, table: int, address) -> None:
        self.calls.append(("announce", table, _ip(address)))
        self._maybe_fail("announce")
        self.routes.setdefault(table, set()).add(_ip(address))

    def withdraw(self, table: int, address) -> None:
        self.calls.append(("withdraw", table, _ip(address)))
        self._maybe_fail("withdraw")
        self.routes.get(table, set()).discard(_ip(address))

    def neighbour_macs(self, index: int) -> dict:
        self.dumps += 1
        self._maybe_fail("neighbour_macs")
        return {_ip(a): mac for a, mac in self.neighbours.items() if mac is not None}

    def neighbour_mac(self, index: int, address) -> bytes | None:
        self.lookups += 1
        self._maybe_fail("neighbour_mac")
        if _ip(address) in self.neighbours:
            return self.neighbours[_ip(address)]
        return self.neighbours.get(str(address))

    def solicit(self, address, index: int = 0) -> None:
        self.solicited.append(_ip(address))

    def route_gateways(self, index: int, versions=(4,)) -> set:
        return {g for g in self.gateways if g.version in versions}


class FakeProber:
    """An async probe function, called as the daemon calls xdplb.probes:
    `await prober(health_check, address)` (run_probe) or
    `await prober(check, address, port, timeout)` (the older probe).

    results: (address str, port) -> True (ok) / False (fail); `default` for
    any other target. Every call is counted per target and logged as
    (address, port, ok); `wait_calls` waits for a target's n-th probe, which
    the daemon has fully handled by the time the waiter runs.
    """

    def __init__(self, default: bool = True):
        self.default = default
        self.results: dict[tuple, bool] = {}
        self.counts: Counter = Counter()
        self.log: list[tuple] = []
        self._event: asyncio.Event | None = None

    def set(self, address, port: int, ok: bool) -> None:
        self.results[(str(address), port)] = ok

    async def __call__(self, *args) -> ProbeResult:
        if len(args) == 2:          # run_probe(HealthCheck, address)
            health, address = args
            port = health.port
        else:                       # probe(check, address, port, timeout)
            _check, address, port, _timeout = args
        target = (str(address), port)
        ok = self.results.get(target, self.default)
        self.counts[target] += 1
        self.log.append((str(address), port, ok))
        if self._event is not None:
            self._event.set()
        reason = f"connect to {address}:{port} " + ("succeeded" if ok else "refused")
        return ProbeResult(ok, reason, 0.0, "ok" if ok else "refused")

    async def wait_calls(self, address, port: int, n: int, timeout: float = 5.0) -> None:
        """Wait until (address, port) has been probed at least n times in all."""
        if self._event is None:
            self._event = asyncio.Event()
        target = (str(address), port)

        async def wait() -> None:
            while self.counts[target] < n:
                self._event.clear()
                await self._event.wait()

        await asyncio.wait_for(wait(), timeout)
