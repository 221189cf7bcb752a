"""The XDP program and its maps, through bcc: compile, attach, write, read.

Part of the thin kernel layer: nothing else in xdplb imports bcc. The rest of
the controller talks to a `Dataplane` (apply planned writes, read counters),
which tests replace with tests/fakes.py's FakeDataplane.
"""
from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Protocol

from . import bpf_source, plan, structs
from .config import Settings

log = logging.getLogger(__name__)

PROG_NAME = "xdplb_ingress"
PROG6_NAME = "xdplb_ingress6"   # the IPv6 program, reached from PROG_NAME by a tail call
TAIL_CALLS_PIN = "tail_calls"   # the program array's pin, beside the maps (see _pin_tail_calls)

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
    nat: dict = field(default_factory=dict)   # NAT_STATS name -> packets


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
        "FLOW_TABLE_SIZE6": settings.flows6_entries,
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
    config: tuple | None      # plan.Desired.config as written, or None if never written
    down_since: dict = field(default_factory=dict)   # backend id -> monotonic ns it went down (0: up)
    nat_backends: dict = field(default_factory=dict) # backend id -> the port it listens on (NAT backends only)
    nat_reverse: dict = field(default_factory=dict)  # (address, port, protocol) -> (vip, service port)
    refs6: dict = field(default_factory=dict)        # IPv6 service id -> (vip, client_prefix) in its live half


MEMBARRIER_CMD_QUERY = 0
MEMBARRIER_CMD_GLOBAL = 1
_SYS_MEMBARRIER = {"x86_64": 324, "aarch64": 283, "ppc64le": 365, "s390x": 356, "riscv64": 283, "armv7l": 389}


def _membarrier(cmd: int) -> int:
    import platform

    number = _SYS_MEMBARRIER.get(platform.machine())
    if number is None:
        raise LoadError(f"membarrier's syscall number on {platform.machine()} is not known to xdplb")
    return ctypes.CDLL(None, use_errno=True).syscall(number, cmd, 0, 0)


def check_grace_periods() -> None:
    """LoadError unless membarrier(MEMBARRIER_CMD_GLOBAL) is available: the
    map writes wait for RCU grace periods with it (bpf/lb_maps.h). The kernel
    withholds it where CPUs run nohz_full."""
    supported = _membarrier(MEMBARRIER_CMD_QUERY)
    if supported < 0 or not supported & MEMBARRIER_CMD_GLOBAL:
        raise LoadError("this kernel does not offer membarrier(MEMBARRIER_CMD_GLOBAL) (it is withheld when CPUs "
                        "run nohz_full); xdplb needs it to wait for RCU grace periods between map writes")


def synchronize_rcu() -> None:
    """membarrier(MEMBARRIER_CMD_GLOBAL): returns after an RCU grace period."""
    import os

    if _membarrier(MEMBARRIER_CMD_GLOBAL) != 0:
        err = ctypes.get_errno()
        raise LoadError(f"membarrier(MEMBARRIER_CMD_GLOBAL) failed ({os.strerror(err)}): xdplb cannot wait "
                        f"for an RCU grace period between map writes")


@dataclass
class _Marker:
    """How a record is published: `published(v)`, and `cleared(v)`, v with its publish byte off."""

    field: str
    bit: int | None = None        # a flag bit of `field`; None: the whole byte (0 = unpublished)

    def published(self, value) -> bool:
        byte = getattr(value, self.field)
        return bool(byte & self.bit) if self.bit is not None else byte != 0

    def cleared(self, value):
        copy = type(value).from_buffer_copy(bytes(value))
        setattr(copy, self.field, getattr(value, self.field) & ~self.bit if self.bit is not None else 0)
        return copy


_BACKEND = _Marker("flags", structs.F_BACKEND_READY)
_VIPS = {4: "vips", 6: "vips6"}       # the VIP map of each family
_CONFIG = _Marker("ready")
_SERVICE_REF = _Marker("proto")
_NAT_BACKEND = _Marker("ready")
# The NAT maps of each family (bpf/lb_maps.h, bpf/lb_maps6.h).
_NAT_BACKENDS = {4: "nat_backends", 6: "nat_backends6"}
_NAT_REVERSE = {4: "nat_reverse", 6: "nat_reverse6"}
_NAT_ADDRS = {4: "nat_addrs", 6: "nat_addrs6"}


def _bytes_differing(a, b) -> int:
    return sum(x != y for x, y in zip(bytes(a), bytes(b)))


def _call_all(writes) -> None:
    for write in writes:
        write()


@dataclass
class _Writes:
    """One apply's map writes in the passes of bpf/lb_maps.h's rules, each in plan order."""

    retire: list = field(default_factory=list)    # one-byte writes that unpublish a record to be rewritten
    content: list = field(default_factory=list)   # writes to what no packet acts on (idle halves, unpublished)
    publish: list = field(default_factory=list)   # one-byte writes: publish, flip, up/down; services entries
    late: list = field(default_factory=list)      # removals, once the flips no longer name what goes
    scrub: list = field(default_factory=list)     # zeroing what `late` unpublished, a grace period later


class BccDataplane:
    """The compiled program and its maps. Not attached until attach().

    With `pin_dir`, every map is pinned there; maps already pinned there by
    an earlier controller are reused (`adopted` is then True), after their
    shapes and layouts were checked against this build and `settings`.
    `attached_prog_id` names the earlier xdplb program attached now: where
    none of its maps is pinned at `pin_dir` (its bpffs died with its mount
    namespace), they are taken from the program and pinned there first.
    """

    def __init__(self, settings: Settings, pin_dir=None, bpf_dir=None, extra_defines=None,
                 attached_prog_id: int | None = None):
        from bcc import BPF  # imported here so `xdplb --help` and `check` never need bcc

        check_grace_periods()
        self._BPF = BPF
        self.settings = settings
        self.pin_dir = pin_dir
        self.adopted = False
        self.notes: list[str] = []
        self._mounted_bpffs = False
        if pin_dir is not None:
            from . import pinning

            try:
                pins = pinning.prepare(pin_dir, settings, attached_prog_id)
            except pinning.PinError as exc:
                raise LoadError(str(exc)) from exc
            self.adopted, self._mounted_bpffs = pins.adopted, pins.mounted_bpffs
            self.notes += pins.notes
            self._settle_staged_tail_calls(Path(pin_dir), attached_prog_id)
            # flows6 may keep its pinned size (pinning.adopt_flows6): compile with it.
            self.settings = settings = pins.settings
        flags = defines(settings)
        # Tests and benches only: another source tree (an older build) and
        # test-only defines such as XDPLB_RACE_DELAY.
        flags.update(extra_defines or {})
        if pin_dir is not None:
            flags["PIN_DIR"] = str(pin_dir)
        self._other_source = bpf_dir is not None
        self.compile_seconds = 0.0
        self._maps: dict = {}
        started = time.monotonic()
        try:
            text = bpf_source.assemble() if bpf_dir is None else bpf_source.assemble(bpf_dir=Path(bpf_dir))
            self.bpf = BPF(text=text.encode(), cflags=bpf_source.cflags(flags))
            self.fn = self.bpf.load_func(PROG_NAME.encode(), BPF.XDP)
            self.fn6 = self._load_ipv6_program()
        except Exception as exc:  # bcc raises bare Exception for compile and verifier errors
            raise LoadError(f"the XDP program did not load: {exc}") from exc
        self.compile_seconds = time.monotonic() - started
        self._table_type = structs.maglev_table_type(settings.maglev_size)
        # An older build (bpf_dir: benches and tests only) may predate the IPv6 maps.
        self.absent = self._absent_maps() if bpf_dir is not None else frozenset()
        self._unsettled = False     # something was published or removed since the last grace period
        self.grace_periods = 0      # how many this dataplane waited for (tests and benches read it)
        self._check_layouts()
        self._bind_and_record_layout()
        if pin_dir is not None:
            self._note_restart(pin_dir)
        if self.adopted:
            self._rebuild_service_index()
        self.attached: tuple[str, str] | None = None  # (ifname, mode)

    def _load_ipv6_program(self):
        """Load the IPv6 program and put it in its tail_calls slot (bpf/xdplb.c),
        before the IPv4 program is ever attached, so no IPv6 frame finds the
        slot empty. None where the build has none (XDPLB_IPV6_PATH=0, or an
        older build): IPv6 frames then pass to the stack."""
        from bcc.libbcc import lib

        if not lib.bpf_function_start(self.bpf.module, PROG6_NAME.encode()):
            return None
        fn6 = self.bpf.load_func(PROG6_NAME.encode(), self._BPF.XDP)
        slots = self.map("tail_calls")
        slots[slots.Key(structs.PROG_IPV6)] = slots.Leaf(fn6.fd)
        return fn6

    def _bind_and_record_layout(self) -> None:
        """Make the program hold every map (the layout map is not used by it,
        but must be found through the attached program's map ids on a
        restart), and record each map's layout digest in the layout map."""
        from . import bpfsys, pinning

        layout = self.map("layout")
        for name, spec in self._specs().items():
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

    def _specs(self) -> dict:
        """This build's maps (pinning.map_specs); for another source tree (an
        older build, loaded by benches and tests) only the maps it has."""
        from . import pinning

        specs = {name: spec for name, spec in pinning.map_specs(self.settings).items() if name not in self.absent}
        if not self._other_source:
            return specs
        return {name: spec for name, spec in specs.items() if self._has_map(name)}

    def _has_map(self, name: str) -> bool:
        try:
            self.map(name)
        except KeyError:    # bcc's get_table for a map the program does not declare
            return False
        return True

    def _absent_maps(self) -> frozenset:
        """The IPv6 maps an older build's program does not declare."""
        from . import pinning

        absent = set()
        for name in pinning.map_specs6(self.settings):
            try:
                self.map(name)
            except KeyError:
                absent.add(name)
        return frozenset(absent)

    @property
    def prog_fd(self) -> int:
        return self.fn.fd

    def _check_layouts(self) -> None:
        """Fail loudly if bcc's view of a map type differs in size from
        structs.py (tests/unit/test_struct_layout.py compares every field)."""
        from . import pinning

        for name, spec in self._specs().items():
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
        staged = self._stage_tail_calls_pin()
        try:
            self._BPF.attach_xdp(ifname.encode(), self.fn, flags)
        except Exception as exc:
            if staged:
                staged.unlink(missing_ok=True)
            raise LoadError(f"attaching to {ifname} in {mode} mode failed: {exc}") from exc
        self.attached = (ifname, mode)
        if staged:
            self._pin_tail_calls(staged)

    # The kernel empties a program array when its last file descriptor or pin
    # goes, and the attached program holds its array by neither: without a
    # pin, IPv6 frames would pass to the stack (no_ipv6_program) from the
    # moment this controller exits. So the array is pinned beside the maps.
    # It is still this load's own (bpf/xdplb.c): a new load never adopts an
    # earlier one, whose slot holds the earlier IPv6 program; its pin takes
    # the earlier one's place once the new program is attached.

    def _staging_pin(self) -> Path:
        return Path(self.pin_dir) / f"{TAIL_CALLS_PIN}_new"   # bpffs refuses names with a dot

    def _settle_staged_tail_calls(self, pin_dir: Path, attached_prog_id: int | None) -> None:
        """Deal with a staging pin an earlier controller left (it stopped
        between its attach and the rename in _pin_tail_calls, or before its
        attach). Where it is the attached program's array it is the only pin
        holding that program's IPv6 path: it takes the tail_calls pin's place
        now, never deleted. Otherwise it belongs to a load never attached,
        and goes. LoadError where that cannot be told (changes nothing)."""
        staged, pin = self._staging_pin(), pin_dir / TAIL_CALLS_PIN
        if not staged.exists():
            return
        try:
            running = bool(attached_prog_id) and self._program_holds(attached_prog_id, staged)
            if running:
                os.replace(staged, pin)
                self.notes.append(f"{staged} held the attached program's tail_calls array (the earlier "
                                  f"controller stopped between its attach and renaming that pin): moved to {pin}")
            else:
                staged.unlink()
        except OSError as exc:
            raise LoadError(f"cannot tell whether {staged} holds the attached program's IPv6 path "
                            f"({exc.strerror}): start xdplb with CAP_SYS_ADMIN, or, if no xdplb program is "
                            f"attached, remove that pin") from exc

    @staticmethod
    def _program_holds(prog_id: int, pinned: Path) -> bool:
        """Whether the loaded program `prog_id` holds the map pinned at `pinned`."""
        from . import bpfsys

        prog_fd = bpfsys.fd_by_id(bpfsys.BPF_PROG_GET_FD_BY_ID, prog_id)
        try:
            return bpfsys.pinned_map_info(str(pinned)).id in bpfsys.prog_map_ids(prog_fd)
        finally:
            os.close(prog_fd)

    def _stage_tail_calls_pin(self) -> Path | None:
        """Pin this load's tail_calls under a staging name (LoadError if it
        cannot be: nothing is attached yet). None without pins or IPv6 program.
        A staging pin found here is a failed attach's of this process, or was
        left by an earlier controller and checked at load
        (_settle_staged_tail_calls): never the running program's array."""
        if self.pin_dir is None or self.fn6 is None:
            return None
        from . import bpfsys

        staged = self._staging_pin()
        try:
            staged.unlink(missing_ok=True)
            bpfsys.pin(self.map("tail_calls").map_fd, str(staged))
        except OSError as exc:
            raise LoadError(f"cannot pin the IPv6 program's tail_calls array at {staged}: {exc.strerror}") from exc
        return staged

    def _pin_tail_calls(self, staged: Path) -> None:
        """Put this load's tail_calls pin in the place of the earlier one, a
        grace period after the attach: packets of the replaced program still
        running by then would find its array emptied. The program is attached
        by then, so a failure here is a warning, never a failed attach (the
        caller would try another mode): the staging pin still holds the
        array, and the next start moves it into place."""
        synchronize_rcu()
        try:
            os.replace(staged, Path(self.pin_dir) / TAIL_CALLS_PIN)
        except OSError as exc:
            log.warning("attached, but the IPv6 program's tail_calls pin could not be renamed from %s to %s (%s): "
                        "IPv6 forwarding holds while that pin exists; the next start moves it into place",
                        staged, TAIL_CALLS_PIN, exc.strerror)

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
    #
    # Packets read these maps on other CPUs while they are written, and the
    # kernel copies a value with memcpy, in place for arrays. The writes
    # therefore follow the rules argued in bpf/lb_maps.h: a record a packet
    # acts on is published and unpublished by one byte (backend_info's
    # F_BACKEND_READY, service_ref.proto, lb_config.ready); its other fields
    # change only while it is unpublished and a grace period has passed
    # since; a Maglev table is written only into the idle half, a grace
    # period after it was last live, and flipped to a grace period after.
    # One apply sorts its writes into passes (_Writes) so that a whole plan
    # needs at most three grace periods, and usually one or none.

    def apply(self, ops: Iterable) -> None:
        writes = _Writes()
        for op in ops:
            self._plan_writes(op, writes)
        self._run(writes)

    def _run(self, w: "_Writes") -> None:
        _call_all(w.retire)
        if w.content:
            if w.retire or self._unsettled:
                self.grace_period()
            _call_all(w.content)
            if w.publish:
                self.grace_period()
        elif w.retire:
            self._unsettled = True
        _call_all(w.publish)
        _call_all(w.late)
        if w.publish or w.late:
            self._unsettled = True
        if w.scrub:
            self.grace_period()
            _call_all(w.scrub)

    def grace_period(self) -> None:
        """Wait until no packet that started before this call is still running.

        Each XDP run is one RCU read-side critical section, and
        membarrier(MEMBARRIER_CMD_GLOBAL) returns after synchronize_rcu().
        """
        synchronize_rcu()
        self._unsettled = False
        self.grace_periods += 1

    def _plan_writes(self, op, w: "_Writes") -> None:
        if isinstance(op, plan.SetConfig):
            self._stage(w, "lb_config", 0, _lb_config(op), _CONFIG)
        elif isinstance(op, plan.ZeroCounters):
            table = self.map("service_stats" if op.kind == "service" else "backend_stats")
            w.content.append(lambda: table.__setitem__(op.id, table.Leaf()))  # bcc's per-CPU Leaf holds every CPU
        elif isinstance(op, plan.PutBackend):
            flags = structs.F_BACKEND_READY | (structs.F_BACKEND_UP if op.up else 0)
            info = structs.BackendInfo(structs.LbAddr.of(op.address), (ctypes.c_uint8 * 6)(*op.mac), flags, 0,
                                       op.service_id, 0, op.down_since)
            self._stage_backend(w, op.id, info)
            self._stage_nat_backend(w, op.id, op.address, op.port)
        elif isinstance(op, plan.ClearBackend):
            self._clear_backend(op.id, w)
            self._stage_nat_backend(w, op.id, None, 0)
        elif isinstance(op, (plan.PutNatReverse, plan.DelNatReverse)):
            self._nat_reverse_write(op, w)
        elif isinstance(op, plan.PutTable):
            table = self._table_type()
            table.slots[:] = op.slots
            maglev = self.map("maglev_tables")
            w.content.append(lambda: maglev.__setitem__(op.service_id * structs.TABLES_PER_SERVICE + op.half, table))
        elif isinstance(op, plan.PutService):
            self._put_service(op, w)
        elif isinstance(op, plan.DelService):
            self._del_service(op, w)
        elif isinstance(op, plan.PutVip):
            vips = self.map(_VIPS[op.address.version])
            w.publish.append(lambda: vips.__setitem__(structs.LbAddr.of(op.address), ctypes.c_uint32(1)))
        elif isinstance(op, plan.DelVip):
            w.late.append(lambda: self._delete(self.map(_VIPS[op.address.version]), structs.LbAddr.of(op.address)))
        else:
            raise TypeError(f"unknown map write {op!r}")

    def _stage(self, w: "_Writes", name: str, key, new, marker: "_Marker") -> None:
        """Schedule table[key] = new so that no packet acts on a mix of versions.

        A change of one byte is atomic and goes straight into the publish
        pass. Any other change unpublishes the record first (one byte), has
        it rewritten while unpublished after a grace period, and publishes
        it (one byte) after another.
        """
        table = self.map(name)
        current = table[key]
        if _bytes_differing(current, new) <= 1:
            if bytes(current) != bytes(new):
                w.publish.append(lambda: table.__setitem__(key, new))
            return
        if marker.published(current):
            retired = marker.cleared(current)
            w.retire.append(lambda: table.__setitem__(key, retired))
        hidden = marker.cleared(new)
        w.content.append(lambda: table.__setitem__(key, hidden))
        if marker.published(new):
            w.publish.append(lambda: table.__setitem__(key, new))

    def _stage_backend(self, w: "_Writes", bid: int, new) -> None:
        """Schedule backends[bid] = new. A backend going down or coming back
        stays published, so its established flows keep their grace: the
        program reads down_since only once it sees UP clear. Going down,
        down_since is written (UP still set) a grace period before UP is
        cleared (one byte); coming up, UP is set (one byte) before down_since
        is cleared. Any other change goes through _stage."""
        table = self.map("backends")
        current = table[bid]
        ready, up = structs.F_BACKEND_READY, structs.F_BACKEND_UP

        def rest(value) -> bytes:
            copy = structs.BackendInfo.from_buffer_copy(bytes(value))
            copy.flags, copy.down_since = 0, 0
            return bytes(copy)

        if (current.flags & ready and new.flags & ready and current.down_since != new.down_since
                and rest(current) == rest(new)):
            if current.flags & up and not new.flags & up:
                noted = structs.BackendInfo.from_buffer_copy(bytes(current))
                noted.down_since = new.down_since
                w.content.append(lambda: table.__setitem__(bid, noted))
                w.publish.append(lambda: table.__setitem__(bid, new))
                return
            if not current.flags & up and new.flags & up:
                back = structs.BackendInfo.from_buffer_copy(bytes(current))
                back.flags = new.flags
                w.publish.append(lambda: table.__setitem__(bid, back))
                w.late.append(lambda: table.__setitem__(bid, new))
                return
        self._stage(w, "backends", bid, new, _BACKEND)

    def _clear_backend(self, bid: int, w: "_Writes") -> None:
        """Unpublish a removed backend after the flips (its tables no longer
        name it), then zero it a grace period later."""
        table = self.map("backends")
        current = table[bid]
        if not any(bytes(current)):
            return
        if current.flags:
            off = structs.BackendInfo.from_buffer_copy(bytes(current))
            off.flags = 0                      # one byte: READY and UP go together
            w.late.append(lambda: table.__setitem__(bid, off))
        w.scrub.append(lambda: table.__setitem__(bid, structs.BackendInfo()))

    # ---- NAT (bpf/nat.h, bpf/nat6.h; maps in bpf/lb_maps.h, lb_maps6.h) ---
    #
    # nat_backends[id] (nat_backends6[id] for an IPv6 backend) follows rule 1
    # with its own `ready` byte, staged with the backend. nat_reverse entries
    # are inserted in the content pass (before the backend they translate for
    # is published or chosen) and deleted late; nat_ports, shared by both
    # families, is a superset of their ports at every step, as service_ports
    # is of the services' ports. nat_reverse6 also keeps its elements from
    # being reused under a reader (bpf/lb_maps6.h): deletions only in the late
    # pass (the next content pass starts after a grace period), and a grace
    # period after each value replaced in place.

    def _stage_nat_backend(self, w: "_Writes", bid: int, address, port: int) -> None:
        version = address.version if port else None
        for family, name in _NAT_BACKENDS.items():
            if family != version and self._other_source and not self._has_map(name):
                continue    # an older build's program, without this map (benches compare with one)
            entry = structs.NAT_STRUCTS[family][0]
            new = entry.of(address, port) if family == version else entry()
            if family == version or any(bytes(self.map(name)[bid])):
                self._stage(w, name, bid, new, _NAT_BACKEND)

    def _nat_reverse_write(self, op, w: "_Writes") -> None:
        version = op.address.version
        table = self.map(_NAT_REVERSE[version])
        _entry, key_type, value_type = structs.NAT_STRUCTS[version]
        key = key_type.of(op.address, op.port, op.protocol)
        addrs = self.map(_NAT_ADDRS[version])   # nat_reverse's addresses (lb_maps.h)
        addr = addrs.Key.from_buffer_copy(bytes(key.addr)) if version == 4 else structs.LbAddr.of(op.address)
        if isinstance(op, plan.PutNatReverse):
            if op.vip.version != version:
                raise ValueError(f"NAT backend {op.address} and VIP {op.vip} are of different families")
            value = value_type.of(op.vip, op.vport, op.port)
            w.content.append(lambda: self._set_bit("nat_ports", op.port, True))
            w.content.append(lambda: addrs.__setitem__(addr, addrs.Leaf(1)))
            if version == 6 and table.get(key) is not None:
                w.content.append(lambda: self._replace_spaced(table, key, value))
            else:
                w.content.append(lambda: table.__setitem__(key, value))
            return

        def remove():
            self._delete(table, key)
            if not any(socket.ntohs(k.port) == op.port for name in self._nat_reverse_maps()
                       for k in self.map(name).keys()):
                self._set_bit("nat_ports", op.port, False)
            if not any(bytes(k.addr) == bytes(key.addr) for k in table.keys()):
                self._delete(addrs, addr)

        w.late.append(remove)

    def _replace_spaced(self, table, key, value) -> None:
        """table[key] = value for a key it holds, then a grace period: the
        replaced element is the CPU's spare, which the next replacement takes
        (bpf/lb_maps6.h), and no packet may still be reading it by then."""
        table[key] = value
        self.grace_period()

    def _nat_reverse_maps(self) -> tuple[str, ...]:
        """The nat_reverse maps this program declares (an older build's lacks nat_reverse6)."""
        return tuple(name for name in _NAT_REVERSE.values() if self._has_map(name))

    @staticmethod
    def _delete(table, key) -> None:
        try:
            del table[key]
        except KeyError:
            pass  # already gone: deleting is idempotent

    # ---- services and the two arrays derived from them ----------------------
    #
    # The program checks a service id through service_ids and skips every
    # lookup for a port no service uses (service_ports); see bpf/lb_maps.h.
    # service_ids[id] is bound (proto set) only while `services` maps its key
    # to the id: bound after the services entry is written, unbound before it
    # goes or moves to another id, so a match in the program always means the
    # services lookup would give that id. A port's bit is set before the
    # first service on the port is written and cleared after the last one
    # is gone. A flip changes one byte of service_ids[id].state; the services
    # entry mirrors it (flags, table) for a controller adopting the maps.

    def _put_service(self, op, w: "_Writes") -> None:
        services, key = self._service_key(op)
        w.content.append(lambda: self._set_port_bit(op.port, True))
        if op.vip.version == 6:
            self._put_ref6(op, w)
        old = services.get(key)
        if old is not None and old.id != op.id:
            w.publish.append(lambda: self._unbind(old.id, op))  # the key moves to another id (a renamed service)
        info = structs.ServiceInfo(op.id, op.flags, op.half, 0)
        w.publish.append(lambda: services.__setitem__(key, info))
        ref = structs.service_ref(op.vip, op.port, op.protocol, op.flags, op.half)
        self._stage(w, "service_ids", op.id, ref, _SERVICE_REF)

    def _service_key(self, op):
        """(services map of the op's family, its key there)."""
        if op.vip.version == 6:
            return self.map("services6"), structs.ServiceKey6.of(op.vip, op.port, op.protocol)
        return self.map("services"), structs.ServiceKey.of(op.vip, op.port, op.protocol)

    def _del_service(self, op, w: "_Writes") -> None:
        services, key = self._service_key(op)

        def remove():
            old = services.get(key)
            if old is None:
                return  # already gone: deleting is idempotent
            self._unbind(old.id, op)
            self._delete(services, key)
            if not any(socket.ntohs(k.port) == op.port
                       for name in ("services", "services6") for k in self.map(name).keys()):
                self._set_port_bit(op.port, False)

        w.late.append(remove)

    def _unbind(self, sid: int, op) -> None:
        """Unpublish service_ids[sid] if it is bound to the op's (VIP, port,
        protocol) (one byte: proto)."""
        ids = self.map("service_ids")
        ref = ids[sid]
        want = structs.service_ref(op.vip, op.port, op.protocol, 0, 0)
        if not ref.proto or bytes(ref)[:7] != bytes(want)[:7]:   # vip, port, proto: all but the state byte
            return
        if op.vip.version != (6 if ref.state & structs.F_SVC_IPV6 else 4):
            return
        if op.vip.version == 6 and bytes(self._ref6(sid, ref.state).vip) != op.vip.packed:
            return
        ids[sid] = _SERVICE_REF.cleared(ref)

    # IPv6: service_ids6[id * 2 + half] holds the VIP and client prefix and
    # is written with that half's Maglev table (bpf/lb_maps6.h): in the
    # content pass, into the half the flip goes to, which no packet reads.

    def _ref6(self, sid: int, state: int):
        return self._ref6_of_half(sid, 1 if state & structs.SVC_STATE_HALF else 0)

    def _ref6_of_half(self, sid: int, half: int):
        raw = self.map("service_ids6")[sid * structs.TABLES_PER_SERVICE + half]
        return structs.ServiceRef6.from_buffer_copy(bytes(raw))   # bcc's own type reads vip as 4 words

    def _put_ref6(self, op, w: "_Writes") -> None:
        table = self.map("service_ids6")
        index = op.id * structs.TABLES_PER_SERVICE + op.half
        new = structs.ServiceRef6.of(op.vip, op.client_prefix)
        if bytes(table[index]) != bytes(new):
            w.content.append(lambda: table.__setitem__(index, new))

    def _set_port_bit(self, port: int, on: bool) -> None:
        self._set_bit("service_ports", port, on)

    def _set_bit(self, name: str, port: int, on: bool) -> None:
        """One port's bit in a port bitmap (service_ports, nat_ports)."""
        ports = self.map(name)
        word, bit = divmod(port, 32)
        old = ports[word].value
        new = old | (1 << bit) if on else old & ~(1 << bit)
        if new != old:
            ports[word] = ctypes.c_uint32(new)

    def _rebuild_service_index(self) -> None:
        """Make service_ids, service_ports and the backends' READY flags agree
        with adopted maps (maps pinned by an earlier build may lack them, hold
        stale bits, or predate F_BACKEND_READY). An earlier program may still
        be forwarding with these maps, so the same staged writes are used."""
        ids, ports = self.map("service_ids"), self.map("service_ports")
        w = _Writes()
        want_ids, words = {}, [0] * structs.PORT_WORDS
        for (vip, port, protocol), (sid, flags, half) in self._read_services().items():
            want_ids[sid] = structs.service_ref(vip, port, protocol, flags, half)
            word, bit = divmod(port, 32)
            words[word] |= 1 << bit
        for word, bits in enumerate(words):
            have = ports[word].value
            if have | bits != have:
                ports[word] = ctypes.c_uint32(have | bits)  # set first: a superset at every step
        for sid in range(self.settings.max_services):
            want = want_ids.get(sid)
            if want is not None:
                self._stage(w, "service_ids", sid, want, _SERVICE_REF)
            elif ids[sid].proto:
                w.retire.append(lambda sid=sid: ids.__setitem__(sid, _SERVICE_REF.cleared(ids[sid])))
        backends = self.map("backends")
        for bid in range(1, self.settings.max_backends):
            be = backends[bid]
            if any(be.mac) and not be.flags & structs.F_BACKEND_READY:
                be.flags |= structs.F_BACKEND_READY
                w.publish.append(lambda bid=bid, be=be: backends.__setitem__(bid, be))
        self._unsettled = True       # whatever wrote these maps last may not be a grace period ago
        self._run(w)
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
            not_forwarded=self._sum_u64("not_forwarded", structs.REASONS)
            | (self._sum_u64("tail_misses", structs.TAIL_MISSES) if self._has_map("tail_misses") else {}),
            events=self._sum_u64("events", structs.EVENTS)
            | ({} if "events6" in self.absent else self._sum_u64("events6", structs.EVENTS6)),
            nat=self._sum_u64("nat_stats", structs.NAT_STATS) if self._has_map("nat_stats") else {},
        )

    def _read_services(self) -> dict:
        """(vip, port, protocol) -> (id, flags, half), of both families."""
        services = {}
        for name, key_type in (("services", structs.ServiceKey), ("services6", structs.ServiceKey6)):
            for key, info in self.map(name).items():
                key = key_type.from_buffer_copy(bytes(key))
                proto = {v: k for k, v in structs.IPPROTO.items()}.get(key.proto, str(key.proto))
                services[(key.ip(), socket.ntohs(key.port), proto)] = (info.id, info.flags, info.table & 1)
        return services

    def read_state(self) -> KernelState:
        """Read back what an earlier controller programmed (for adoption)."""
        services = self._read_services()
        family = {sid: vip.version for (vip, _port, _proto), (sid, _flags, _half) in services.items()}
        backends, down_since = {}, {}
        table = self.map("backends")
        for bid in range(1, self.settings.max_backends):
            be = table[bid]
            if any(be.mac):
                raw = structs.LbAddr.from_buffer_copy(bytes(be.addr))
                # An orphan's family is a guess: IPv4 leaves 12 bytes zero.
                addr = raw.ip(family.get(be.service_id, 6 if any(raw.raw[4:]) else 4))
                backends[bid] = (be.service_id, addr, bytes(be.mac), bool(be.flags & structs.F_BACKEND_UP))
                down_since[bid] = be.down_since
        tables, refs6 = {}, {}
        maglev = self.map("maglev_tables")
        for (vip, _port, _proto), (sid, _flags, half) in services.items():
            tables[(sid, half)] = tuple(maglev[sid * structs.TABLES_PER_SERVICE + half].slots)
            if vip.version == 6:
                ref6 = self._ref6_of_half(sid, half)
                refs6[sid] = (ipaddress.IPv6Address(bytes(ref6.vip)), ref6.client_prefix)
        vips = {structs.LbAddr.from_buffer_copy(bytes(k)).ip(version)
                for version, name in _VIPS.items() for k in self.map(name).keys()}
        cfg = self.map("lb_config")[0]
        config = _config_tuple(structs.LbConfig.from_buffer_copy(bytes(cfg))) if cfg.ready else None
        nat_backends, nat_reverse = self._read_nat(backends)
        return KernelState(services, backends, tables, vips, config, down_since, nat_backends, nat_reverse,
                           refs6)

    def _read_nat(self, backends) -> tuple[dict, dict]:
        """(backend id -> NAT port, (address, port, protocol) -> (vip, service port)),
        of both families, as KernelState holds them."""
        nat_backends, nat_reverse = {}, {}
        names = {v: k for k, v in structs.IPPROTO.items()}
        for name in _NAT_BACKENDS.values():
            if name in self.absent:
                continue
            table = self.map(name)
            for bid in backends:
                entry = table[bid]   # one map read per id (a syscall each)
                if entry.ready:
                    nat_backends[bid] = socket.ntohs(entry.port)
        for version, name in _NAT_REVERSE.items():
            if name in self.absent:
                continue
            _entry, key_type, value_type = structs.NAT_STRUCTS[version]
            address = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
            for raw, value in self.map(name).items():
                key = key_type.from_buffer_copy(bytes(raw))   # bcc's own types read __be32 as host-order ints
                rev = value_type.from_buffer_copy(bytes(value))
                proto = names.get(key.proto, str(key.proto))
                nat_reverse[(address(bytes(key.addr)), socket.ntohs(key.port), proto)] = (
                    address(bytes(rev.vip)), socket.ntohs(rev.vport))
        return nat_backends, nat_reverse

    def flows(self, limit: int = 100000) -> dict:
        """(client, client port, VIP, port, proto) -> backend id, at most `limit`
        entries (IPv4 first, then IPv6)."""
        out = {}
        for name, key_type, address in (("flows", structs.FlowKey, ipaddress.IPv4Address),
                                        ("flows6", structs.FlowKey6, ipaddress.IPv6Address)):
            for raw, value in self.map(name).items():
                if len(out) >= limit:
                    return out
                # bcc's own key type reads __be32 as a host-order int; ours keeps the bytes.
                key = key_type.from_buffer_copy(bytes(raw))
                src, dst = address(bytes(key.src)), address(bytes(key.dst))
                out[(src, socket.ntohs(key.sport), dst, socket.ntohs(key.dport), key.proto)] = value.backend_id
        return out


def _lb_config(op: "plan.SetConfig") -> structs.LbConfig:
    cfg = structs.LbConfig()
    cfg.mac[:] = op.mac
    cfg.ready = 1
    cfg.flags = structs.F_CFG_NO_BACKEND_DROP if op.drop_without_backend else 0
    cfg.hash_seed = op.hash_seed
    cfg.flood_rate = op.flood_rate
    cfg.udp_idle_ns = op.udp_idle_ns
    cfg.down_grace_ns = op.down_grace_ns
    if len(op.extra_macs) > structs.EXTRA_MACS:
        raise ValueError(f"{len(op.extra_macs)} extra MACs; the program holds {structs.EXTRA_MACS}")
    for i, mac in enumerate(op.extra_macs):
        cfg.extra_macs[6 * i:6 * i + 6] = mac
    cfg.extra_mac_count = len(op.extra_macs)
    return cfg


def _config_tuple(cfg: structs.LbConfig) -> tuple:
    """An lb_config entry as plan.Desired.config spells it."""
    return (bytes(cfg.mac), cfg.hash_seed, bool(cfg.flags & structs.F_CFG_NO_BACKEND_DROP),
            tuple(bytes(cfg.extra_macs[6 * i:6 * i + 6]) for i in range(min(cfg.extra_mac_count, structs.EXTRA_MACS))),
            cfg.udp_idle_ns, cfg.down_grace_ns, cfg.flood_rate)


def remove_program(ifname: str, mode: str | None) -> None:
    """Remove whatever XDP program is attached to ifname in the given mode."""
    from bcc import BPF

    BPF.remove_xdp(ifname.encode(), MODE_FLAGS.get(mode or "generic", 0))
