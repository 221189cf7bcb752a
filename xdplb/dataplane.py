"""The XDP program and its maps, through bcc: compile, attach, write, read.

Part of the thin kernel layer: nothing else in xdplb imports bcc. The rest of
the controller talks to a `Dataplane` (apply planned writes, read counters),
which tests replace with tests/fakes.py's FakeDataplane.
"""
from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
import time
from dataclasses import dataclass
from typing import Iterable, Protocol

from . import bpf_source, plan, structs
from .config import Settings

PROG_NAME = "xdplb_ingress"

XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
MODE_FLAGS = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}


@dataclass(frozen=True)
class Counters:
    packets: int = 0
    bytes: int = 0
    new_flows: int = 0


@dataclass(frozen=True)
class Stats:
    services: dict            # service id -> Counters
    backends: dict            # backend id -> Counters
    actions: dict             # "pass" | "tx" | ... -> packets
    not_forwarded: dict       # reason -> packets
    events: dict              # event -> count


class Dataplane(Protocol):
    def apply(self, ops: Iterable) -> None: ...
    def read_stats(self, service_ids: Iterable[int], backend_ids: Iterable[int]) -> Stats: ...


def defines(settings: Settings) -> dict[str, int]:
    """-D overrides of lb_consts.h from the pool's [xdplb] settings."""
    return {
        "MAGLEV_SIZE": settings.maglev_size,
        "MAX_SERVICES": settings.max_services,
        "MAX_BACKENDS": settings.max_backends,
        "FLOW_TABLE_SIZE": settings.flow_table_size,
    }


class LoadError(RuntimeError):
    pass


@dataclass(frozen=True)
class KernelState:
    """What the maps hold, as read back by a controller adopting them."""

    services: dict            # (vip, port, protocol) -> (id, flags, half)
    backends: dict            # id -> (service_id, address, mac, up)
    tables: dict              # (service_id, half) -> tuple of backend ids (live halves only)
    vips: set
    config: tuple | None      # (mac, hash_seed) or None if never written


class BccDataplane:
    """The compiled program and its maps. Not attached until attach().

    With `pin_dir`, every map is pinned there; maps already pinned there by
    an earlier controller are reused (`adopted` is then True), after their
    shapes and layouts were checked against this build and `settings`.
    `attached_prog_id` names the earlier xdplb program attached now: where
    none of its maps is pinned at `pin_dir` (its bpffs died with its mount
    namespace), they are taken from the program and pinned there first.
    """

    def __init__(self, settings: Settings, pin_dir=None, attached_prog_id: int | None = None):
        from bcc import BPF  # imported here so `xdplb --help` and `check` never need bcc

        self._BPF = BPF
        self.settings = settings
        self.pin_dir = pin_dir
        self.adopted = False
        self.notes: list[str] = []
        self._mounted_bpffs = False
        flags = defines(settings)
        if pin_dir is not None:
            from . import pinning

            try:
                pins = pinning.prepare(pin_dir, settings, attached_prog_id)
            except pinning.PinError as exc:
                raise LoadError(str(exc)) from exc
            self.adopted, self._mounted_bpffs = pins.adopted, pins.mounted_bpffs
            self.notes += pins.notes
            flags["PIN_DIR"] = str(pin_dir)
        self.compile_seconds = 0.0
        started = time.monotonic()
        try:
            self.bpf = BPF(text=bpf_source.assemble().encode(), cflags=bpf_source.cflags(flags))
            self.fn = self.bpf.load_func(PROG_NAME.encode(), BPF.XDP)
        except Exception as exc:  # bcc raises bare Exception for compile and verifier errors
            raise LoadError(f"the XDP program did not load: {exc}") from exc
        self.compile_seconds = time.monotonic() - started
        self._table_type = structs.maglev_table_type(settings.maglev_size)
        self._maps: dict = {}
        self._check_layouts()
        self._bind_and_record_layout()
        if pin_dir is not None:
            self._note_restart(pin_dir)
        if self.adopted:
            self._rebuild_service_index()
        self.attached: tuple[str, str] | None = None  # (ifname, mode)

    def _bind_and_record_layout(self) -> None:
        """Make the program hold every map (the layout map is not used by it,
        but must be found through the attached program's map ids on a
        restart), and record each map's layout digest in the layout map."""
        from . import bpfsys, pinning

        layout = self.map("layout")
        for name, spec in pinning.map_specs(self.settings).items():
            bpfsys.bind_map(self.fn.fd, self.map(name).map_fd)
            layout[structs.LayoutKey.of(name)] = ctypes.c_uint64(spec.digest())

    def _note_restart(self, pin_dir) -> None:
        """Say at the first start, not at the restart, how a restart will adopt the maps."""
        from . import bpfsys, pinning

        if not self._mounted_bpffs:
            return
        try:
            os.close(bpfsys.fd_by_id(bpfsys.BPF_PROG_GET_FD_BY_ID, bpfsys.prog_id(self.fn.fd)))
            denied = None
        except OSError as exc:
            denied = exc.strerror
        self.notes.append(pinning.restart_note(pin_dir, denied))

    def map(self, name: str):
        """bcc's handle of a map, built once: bcc builds a new Table object
        (with its ctypes types) on every get_table call."""
        table = self._maps.get(name)
        if table is None:
            table = self._maps[name] = self.bpf.get_table(name.encode())
        return table

    @property
    def prog_fd(self) -> int:
        return self.fn.fd

    def _check_layouts(self) -> None:
        """Fail loudly if bcc's view of a map type differs in size from
        structs.py (tests/unit/test_struct_layout.py compares every field)."""
        from . import pinning

        for name, spec in pinning.map_specs(self.settings).items():
            table = self.map(name)
            # bcc's per-CPU tables keep the single-CPU value type in sLeaf.
            for ours, theirs in ((spec.key, table.Key), (spec.value, getattr(table, "sLeaf", table.Leaf))):
                if ctypes.sizeof(ours) != ctypes.sizeof(theirs):
                    raise LoadError(
                        f"map {name}: {ours.__name__} is {ctypes.sizeof(ours)} bytes in structs.py "
                        f"but {ctypes.sizeof(theirs)} in bpf/lb_structs.h"
                    )

    # ---- attach -----------------------------------------------------------

    def attach(self, ifname: str, mode: str, replace: bool = False) -> None:
        """Attach in `mode`. With replace, swap out the program attached now
        (an earlier xdplb's) in one netlink call: the kernel switches the
        program pointer, so no packet goes unprocessed."""
        flags = MODE_FLAGS[mode] | (0 if replace else XDP_FLAGS_UPDATE_IF_NOEXIST)
        try:
            self._BPF.attach_xdp(ifname.encode(), self.fn, flags)
        except Exception as exc:
            raise LoadError(f"attaching to {ifname} in {mode} mode failed: {exc}") from exc
        self.attached = (ifname, mode)

    def detach(self) -> None:
        if self.attached is None:
            return
        ifname, mode = self.attached
        self._BPF.remove_xdp(ifname.encode(), MODE_FLAGS[mode])
        self.attached = None

    def unpin(self) -> bool:
        """Remove the pinned maps (a clean stop); False if nothing was pinned."""
        from . import pinning

        return self.pin_dir is not None and pinning.remove(self.pin_dir)

    # ---- writes -----------------------------------------------------------

    def apply(self, ops: Iterable) -> None:
        for op in ops:
            self._apply_one(op)

    def _apply_one(self, op) -> None:
        if isinstance(op, plan.SetConfig):
            flags = structs.F_CFG_NO_BACKEND_DROP if op.drop_without_backend else 0
            cfg = structs.LbConfig((ctypes.c_uint8 * 6)(*op.mac), 1, flags, op.hash_seed)
            self.map("lb_config")[0] = cfg
        elif isinstance(op, plan.ZeroCounters):
            table = self.map("service_stats" if op.kind == "service" else "backend_stats")
            table[op.id] = table.Leaf()  # bcc's per-CPU Leaf is already one value per CPU
        elif isinstance(op, plan.PutBackend):
            flags = structs.F_BACKEND_UP if op.up else 0
            info = structs.BackendInfo(structs.LbAddr.of(op.address), (ctypes.c_uint8 * 6)(*op.mac), flags, 0, op.service_id)
            self.map("backends")[op.id] = info
        elif isinstance(op, plan.ClearBackend):
            self.map("backends")[op.id] = structs.BackendInfo()
        elif isinstance(op, plan.PutTable):
            table = self._table_type()
            table.slots[:] = op.slots
            self.map("maglev_tables")[op.service_id * structs.TABLES_PER_SERVICE + op.half] = table
        elif isinstance(op, plan.PutService):
            self._put_service(op)
        elif isinstance(op, plan.DelService):
            self._del_service(op)
        elif isinstance(op, plan.PutVip):
            self.map("vips")[structs.LbAddr.of(op.address)] = ctypes.c_uint32(1)
        elif isinstance(op, plan.DelVip):
            try:
                del self.map("vips")[structs.LbAddr.of(op.address)]
            except KeyError:
                pass
        else:
            raise TypeError(f"unknown map write {op!r}")

    # ---- services and the two arrays derived from them ----------------------
    #
    # The program checks an established flow's service through service_ids
    # and skips every lookup for a port no service uses (service_ports); see
    # bpf/lb_maps.h. Both must agree with `services` whenever a packet can
    # see them, hence the order of the writes: service_ids[id] holds a key
    # only while `services` maps that key to the id (written after the
    # services entry, cleared before it goes or moves), so a match in the
    # program always means the services lookup would give that id; a missing
    # entry only sends a packet the long way. A port's bit is set before the
    # first service on the port is written and cleared after the last one
    # is gone.

    def _put_service(self, op) -> None:
        key = structs.ServiceKey.of(op.vip, op.port, op.protocol)
        services = self.map("services")
        self._set_port_bit(op.port, True)
        old = services.get(key)
        if old is not None and old.id != op.id:
            self._release_service_id(old.id, key)  # the key moves to another id (a renamed service)
        services[key] = structs.ServiceInfo(op.id, op.flags, op.half, 0)
        self.map("service_ids")[op.id] = key

    def _del_service(self, op) -> None:
        key = structs.ServiceKey.of(op.vip, op.port, op.protocol)
        services = self.map("services")
        old = services.get(key)
        if old is None:
            return  # already gone: deleting is idempotent
        self._release_service_id(old.id, key)
        try:
            del services[key]
        except KeyError:
            pass
        if not any(socket.ntohs(k.port) == op.port for k in services.keys()):
            self._set_port_bit(op.port, False)

    def _release_service_id(self, sid: int, key) -> None:
        ids = self.map("service_ids")
        if bytes(ids[sid]) == bytes(key):
            ids[sid] = structs.ServiceKey()

    def _set_port_bit(self, port: int, on: bool) -> None:
        ports = self.map("service_ports")
        word, bit = divmod(port, 32)
        old = ports[word].value
        new = old | (1 << bit) if on else old & ~(1 << bit)
        if new != old:
            ports[word] = ctypes.c_uint32(new)

    def _rebuild_service_index(self) -> None:
        """Make service_ids and service_ports agree with adopted `services`
        (maps pinned by an earlier build may lack them or hold stale bits)."""
        services = [(structs.ServiceKey.from_buffer_copy(bytes(k)), v.id) for k, v in self.map("services").items()]
        ids, ports = self.map("service_ids"), self.map("service_ports")
        want_ids = {sid: key for key, sid in services}
        words = [0] * structs.PORT_WORDS
        for key, _ in services:
            word, bit = divmod(socket.ntohs(key.port), 32)
            words[word] |= 1 << bit
        for word, bits in enumerate(words):
            have = ports[word].value
            if have | bits != have:
                ports[word] = ctypes.c_uint32(have | bits)  # set first: a superset at every step
        for sid in range(self.settings.max_services):
            want = bytes(want_ids.get(sid, structs.ServiceKey()))
            if bytes(ids[sid]) != want:
                ids[sid] = structs.ServiceKey.from_buffer_copy(want)
        for word, bits in enumerate(words):
            if ports[word].value != bits:
                ports[word] = ctypes.c_uint32(bits)

    # ---- reads ------------------------------------------------------------

    @staticmethod
    def _sum_counters(per_cpu) -> Counters:
        return Counters(
            sum(c.packets for c in per_cpu), sum(c.bytes for c in per_cpu), sum(c.new_flows for c in per_cpu)
        )

    def _sum_u64(self, name: str, labels) -> dict:
        table = self.map(name)
        return {label: int(sum(table[i])) for i, label in enumerate(labels)}

    def read_stats(self, service_ids: Iterable[int], backend_ids: Iterable[int]) -> Stats:
        svc, be = self.map("service_stats"), self.map("backend_stats")
        return Stats(
            services={i: self._sum_counters(svc[i]) for i in service_ids},
            backends={i: self._sum_counters(be[i]) for i in backend_ids},
            actions=self._sum_u64("xdp_actions", structs.ACTIONS),
            not_forwarded=self._sum_u64("not_forwarded", structs.REASONS),
            events=self._sum_u64("events", structs.EVENTS),
        )

    def read_state(self) -> KernelState:
        """Read back what an earlier controller programmed (for adoption)."""
        services = {}
        for key, info in self.map("services").items():
            addr = structs.ServiceKey.from_buffer_copy(bytes(key)).ip()
            proto = {v: k for k, v in structs.IPPROTO.items()}.get(key.proto, str(key.proto))
            services[(addr, socket.ntohs(key.port), proto)] = (info.id, info.flags, info.table & 1)
        backends = {}
        table = self.map("backends")
        for bid in range(1, self.settings.max_backends):
            be = table[bid]
            if any(be.mac):
                addr = structs.LbAddr.from_buffer_copy(bytes(be.addr)).ip()
                backends[bid] = (be.service_id, addr, bytes(be.mac), bool(be.flags & structs.F_BACKEND_UP))
        tables = {}
        maglev = self.map("maglev_tables")
        for sid, _flags, half in services.values():
            tables[(sid, half)] = tuple(maglev[sid * structs.TABLES_PER_SERVICE + half].slots)
        vips = {structs.LbAddr.from_buffer_copy(bytes(k)).ip() for k in self.map("vips").keys()}
        cfg = self.map("lb_config")[0]
        config = ((bytes(cfg.mac), cfg.hash_seed, bool(cfg.flags & structs.F_CFG_NO_BACKEND_DROP))
                  if cfg.ready else None)
        return KernelState(services, backends, tables, vips, config)

    def flows(self, limit: int = 100000) -> dict:
        """(client, client port, VIP, port, proto) -> backend id, at most `limit` entries."""
        out = {}
        for raw, value in self.map("flows").items():
            # bcc's own key type reads __be32 as a host-order int; ours keeps the bytes.
            key = structs.FlowKey.from_buffer_copy(bytes(raw))
            src = ipaddress.IPv4Address(bytes(key.src))
            dst = ipaddress.IPv4Address(bytes(key.dst))
            out[(src, socket.ntohs(key.sport), dst, socket.ntohs(key.dport), key.proto)] = value.backend_id
            if len(out) >= limit:
                break
        return out


def remove_program(ifname: str, mode: str | None) -> None:
    """Remove whatever XDP program is attached to ifname in the given mode."""
    from bcc import BPF

    BPF.remove_xdp(ifname.encode(), MODE_FLAGS.get(mode or "generic", 0))
