"""Where the maps live in bpffs, and whether pinned maps fit this build.

Pin directory: <root>/<ifname>, or <root>/netns-<inode>/<ifname> outside
the initial network namespace (lab hosts all have an eth0). <root> is
/sys/fs/bpf/xdplb, or $XDPLB_BPFFS.

Before maps are adopted, each pinned map's shape (type, key and value
size, the max_entries the kernel really created, flags) and its layout (the
digest recorded in the pinned `layout` map) must be this build's.

`ip netns exec` gives each command a private mount namespace with a fresh
/sys, and a container has its own: a bpffs mounted there vanishes with it.
ensure_bpffs() mounts one where none is; a restart that finds no pins then
takes the maps from the attached program by id (adopt_program_maps).
"""
from __future__ import annotations

import dataclasses
import ctypes
import ctypes.util
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from . import control, structs
from .config import Settings

DEFAULT_ROOT = "/sys/fs/bpf/xdplb"
BPF_FS_MAGIC = 0xCAFE4A11

BPF_MAP_TYPE = {"hash": 1, "array": 2, "percpu_array": 6, "lru_hash": 9}
BPF_F_NO_COMMON_LRU = 1 << 1

# A common LRU hands each CPU free entries in batches of up to this many
# (LOCAL_FREE_TARGET in kernel/bpf/bpf_lru_list.c); entries cached by one CPU
# are not free for another until it steals them, so they do not count as
# capacity.
LRU_LOCAL_FREE_TARGET = 128


class PinError(RuntimeError):
    pass


def root() -> Path:
    return Path(os.environ.get("XDPLB_BPFFS", DEFAULT_ROOT))


def pin_dir(ifname: str) -> Path:
    ns = control._netns_id()
    return root() / ns / ifname if ns else root() / ifname


def _statfs_type(path: Path) -> int | None:
    class StatFs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_long * 15)]

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    buf = StatFs()
    if libc.statfs(os.fsencode(str(path)), ctypes.byref(buf)) != 0:
        return None
    return buf.f_type & 0xFFFFFFFF


def is_bpffs(path: Path) -> bool:
    return _statfs_type(path) == BPF_FS_MAGIC


def private_mount_namespace() -> bool:
    try:
        return os.stat("/proc/self/ns/mnt").st_ino != os.stat("/proc/1/ns/mnt").st_ino
    except OSError:
        return False


def ensure_bpffs(path: Path) -> str | None:
    """Make sure `path` lies on a bpffs; return a note when it had to mount one."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    if is_bpffs(probe):
        path.mkdir(parents=True, exist_ok=True)
        return None
    target = Path("/sys/fs/bpf") if str(path).startswith("/sys/fs/bpf") else root()
    target.mkdir(parents=True, exist_ok=True)
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.mount(b"bpf", os.fsencode(str(target)), b"bpf", 0, b"mode=0700") != 0:
        err = ctypes.get_errno()
        raise PinError(f"cannot mount bpffs at {target}: {os.strerror(err)}")
    path.mkdir(parents=True, exist_ok=True)
    note = f"mounted bpffs at {target}"
    if private_mount_namespace():
        note += " inside a private mount namespace (ip netns exec?): the pins will not outlive it"
    return note


@dataclass(frozen=True)
class MapSpec:
    """One map as this build declares it in bpf/lb_maps.h.

    `entries` is what the build asks for; the kernel may create another size
    (kernel_entries). `flags` are the ones this build creates the map with;
    `also_adopt` lists other flags an earlier build created it with that are
    still adopted (the map keeps them until `xdplb detach`).
    """

    kind: str
    key: type
    value: type          # per CPU for per-CPU maps
    entries: int
    flags: int = 0
    also_adopt: tuple = ()
    layout_value: type | None = None   # value layout to digest, where `value` has a compiled-in size

    def digest(self) -> int:
        """The layout digest the layout map records for this map."""
        return structs.layout_digest(self.key, self.layout_value or self.value)


def map_specs(settings: Settings) -> dict[str, MapSpec]:
    """map name -> what this build declares (bpf/lb_maps.h)."""
    u32, u64, index = ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int
    counted = ("percpu_array", index, u64)
    return {
        "services": MapSpec("hash", structs.ServiceKey, structs.ServiceInfo, settings.max_services),
        "vips": MapSpec("hash", structs.LbAddr, u32, settings.max_services),
        "backends": MapSpec("array", index, structs.BackendInfo, settings.max_backends),
        # The slot count (MAGLEV_SIZE) is part of the shape (value size), not of the layout.
        "maglev_tables": MapSpec("array", index, structs.maglev_table_type(settings.maglev_size),
                                 settings.max_services * structs.TABLES_PER_SERVICE,
                                 layout_value=structs.maglev_table_type(0)),
        # Maps pinned before the flow table became one shared LRU carry BPF_F_NO_COMMON_LRU.
        "flows": MapSpec("lru_hash", structs.FlowKey, structs.FlowValue, settings.flow_table_size,
                         also_adopt=(BPF_F_NO_COMMON_LRU,)),
        "lb_config": MapSpec("array", index, structs.LbConfig, 1),
        "flood_state": MapSpec("percpu_array", index, structs.FloodState, 1),
        "service_stats": MapSpec("percpu_array", index, structs.LbCounters, settings.max_services),
        "backend_stats": MapSpec("percpu_array", index, structs.LbCounters, settings.max_backends),
        "xdp_actions": MapSpec(*counted, len(structs.ACTIONS)),
        "not_forwarded": MapSpec(*counted, len(structs.REASONS)),
        "events": MapSpec(*counted, len(structs.EVENTS)),
        "service_ids": MapSpec("array", index, structs.ServiceRef, settings.max_services),
        "service_ports": MapSpec("array", index, u32, structs.PORT_WORDS),
        "layout": MapSpec("hash", structs.LayoutKey, u64, structs.LAYOUT_ENTRIES),
        # New with the IPv6 program's tail call: pins without it are adopted and bcc creates it.
        "tail_misses": MapSpec(*counted, len(structs.TAIL_MISSES)),
        **nat_map_specs(settings),
        **map_specs6(settings),
    }


def nat_map_specs(settings: Settings) -> dict[str, MapSpec]:
    """The NAT maps (bpf/lb_maps.h): new in this build, so pins without them are adopted and
    bcc creates them."""
    return {
        "nat_backends": MapSpec("array", ctypes.c_int, structs.NatBackend, settings.max_backends),
        "nat_reverse": MapSpec("hash", structs.NatRevKey, structs.NatRevValue, settings.max_backends),
        "nat_ports": MapSpec("array", ctypes.c_int, ctypes.c_uint32, structs.PORT_WORDS),
        "nat_addrs": MapSpec("hash", ctypes.c_uint32, ctypes.c_uint32, settings.max_backends),
        "nat_stats": MapSpec("percpu_array", ctypes.c_int, ctypes.c_uint64, len(structs.NAT_STATS)),
    }


def map_specs6(settings: Settings) -> dict[str, MapSpec]:
    """The IPv6 maps (bpf/lb_maps6.h). Maps pinned by a build without them are
    still adopted: bcc creates these beside them."""
    index = ctypes.c_int
    return {
        "services6": MapSpec("hash", structs.ServiceKey6, structs.ServiceInfo, settings.max_services),
        "service_ids6": MapSpec("array", index, structs.ServiceRef6,
                                settings.max_services * structs.TABLES_PER_SERVICE),
        "flows6": MapSpec("lru_hash", structs.FlowKey6, structs.FlowValue, settings.flows6_entries),
        "vips6": MapSpec("hash", structs.LbAddr, ctypes.c_uint32, settings.max_services),
        "events6": MapSpec("percpu_array", index, ctypes.c_uint64, len(structs.EVENTS6)),
        "nat_backends6": MapSpec("array", index, structs.NatBackend6, settings.max_backends),
        "nat_reverse6": MapSpec("hash", structs.NatRevKey6, structs.NatRevValue6, settings.max_backends),
        "nat_addrs6": MapSpec("hash", structs.LbAddr, ctypes.c_uint32, settings.max_backends),
    }


# Layout digests of the maps pinned by builds before the layout map existed
# (main up to 440b3ed): what those maps hold, frozen. Such maps are adopted
# once, when this build's layouts are the same, and get a layout map then.
UNRECORDED_LAYOUT = {
    "services": 0xa3d26cb1d3885958,
    "vips": 0x209b35e5d2958f6c,
    "backends": 0xa4023721ca3b0eeb,
    "maglev_tables": 0x5357daaa6cc50d83,
    "flows": 0xd80181ac843dfc7c,
    "lb_config": 0x6e39dbd55815922f,
    "service_stats": 0x9d261f4069b9b661,
    "backend_stats": 0x9d261f4069b9b661,
    "xdp_actions": 0xf03ff133cfc7e6a4,
    "not_forwarded": 0xf03ff133cfc7e6a4,
    "events": 0xf03ff133cfc7e6a4,
    "service_ids": 0xb6d62def06d4f932,
    "service_ports": 0x09b09021f9ad086a,
}


def cpu_list_count(text: str) -> int:
    """Number of CPUs in a kernel CPU list such as '0-3,8,10-11'."""
    count = 0
    for part in text.strip().split(","):
        if part:
            low, _, high = part.partition("-")
            count += int(high) - int(low) + 1 if high else 1
    if count == 0:
        raise ValueError(f"empty CPU list {text!r}")
    return count


def possible_cpus() -> int:
    """The kernel's num_possible_cpus(), which sizes per-CPU map state."""
    return cpu_list_count(Path("/sys/devices/system/cpu/possible").read_text())


def kernel_entries(kind: str, entries: int, flags: int, cpus: int) -> int:
    """max_entries of the map the kernel really creates for this request.

    An LRU hash with BPF_F_NO_COMMON_LRU gets one LRU list per possible CPU
    of equal length, so the kernel rounds max_entries up to a multiple of
    the possible CPUs (down, where rounding up would overflow 32 bits):
    kernel/bpf/hashtab.c, htab_map_alloc.
    """
    if kind == "lru_hash" and flags & BPF_F_NO_COMMON_LRU:
        up = -(-entries // cpus) * cpus
        return up if up <= 0xFFFFFFFF else entries // cpus * cpus
    return entries


@dataclass(frozen=True)
class FlowCapacity:
    entries: int       # max_entries of the flow table the kernel creates
    per_cpu: int       # flows the entries one CPU inserts can take before it evicts
    guaranteed: int    # flows held without eviction, whichever CPUs insert them
    shared: bool       # one LRU for all CPUs (False: one per CPU)


def flow_capacity(entries: int, flags: int, cpus: int) -> FlowCapacity:
    """What a flow table of `entries` holds on a machine with `cpus` possible CPUs.

    Per-CPU lists (BPF_F_NO_COMMON_LRU) cap each CPU at its own share, so a
    CPU that inserts more than entries/cpus flows evicts its own, even while
    the other shares stand empty. One common LRU lets any CPU use the whole
    table, less the free entries each CPU keeps cached.
    """
    created = kernel_entries("lru_hash", entries, flags, cpus)
    if flags & BPF_F_NO_COMMON_LRU:
        return FlowCapacity(created, created // cpus, created // cpus, False)
    usable = max(created - cpus * LRU_LOCAL_FREE_TARGET, 0)
    return FlowCapacity(created, usable, usable, True)


def describe_flow_capacity(entries: int, flags: int, cpus: int, table: str = "flow table") -> str:
    """One line for `xdplb check` and the attach log."""
    cap = flow_capacity(entries, flags, cpus)
    if cap.shared:
        return (f"{table}: {cap.entries} entries in one LRU shared by all {cpus} possible CPUs; "
                f"per-CPU capacity {cap.per_cpu} flows: any one CPU may fill the table, less "
                f"{LRU_LOCAL_FREE_TARGET} free entries cached per CPU, however RSS spreads the flows")
    return (f"{table}: {cap.entries} entries in {cpus} per-CPU LRU lists; per-CPU capacity "
            f"{cap.per_cpu} flows: a CPU that inserts more evicts its own flows")


def pinned_maps(directory: Path) -> list[str]:
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.name in map_specs(Settings()))


def check_compatible(directory: Path, settings: Settings, cpus: int | None = None) -> list[str]:
    """Differences between maps pinned in `directory` and what `settings` need.

    bcc would silently reuse a pinned map of another shape, and the program
    would then index past its end or misread it; so refuse instead. Sizes
    are compared with what the kernel creates, not with what was asked for.
    """
    from .bpfsys import pinned_map_info

    cpus = cpus or possible_cpus()
    problems = []
    for name, spec in map_specs(settings).items():
        path = directory / name
        if not path.exists():
            continue
        info = pinned_map_info(str(path))
        have = (info.type, info.key_size, info.value_size, info.max_entries, info.flags)
        flags = info.flags if info.flags in (spec.flags, *spec.also_adopt) else spec.flags
        want = (BPF_MAP_TYPE[spec.kind], ctypes.sizeof(spec.key), ctypes.sizeof(spec.value),
                kernel_entries(spec.kind, spec.entries, flags, cpus), flags)
        if have != want:
            problems.append(f"{name}: pinned type/key/value/entries/flags {have}, this pool needs {want}")
    return problems


def flows6_idle(directory: Path) -> bool:
    """Whether no IPv6 service is programmed in the maps pinned at
    `directory` (their services6 is empty or absent): then no packet is
    forwarded by flows6, and replacing it breaks no flow."""
    from .bpfsys import map_items, open_pinned

    services6 = directory / "services6"
    if not services6.exists():
        return True
    fd = open_pinned(str(services6))
    try:
        return not map_items(fd, ctypes.sizeof(structs.ServiceKey6), ctypes.sizeof(structs.ServiceInfo))
    finally:
        os.close(fd)


def replace_flows6(directory: Path, settings: Settings) -> str:
    """Unpin flows6, so that bcc creates it anew at the size `settings` need
    (only while flows6_idle); the note saying so. This is how a pool that
    gains its first IPv6 service (flows6 grows from the minimum to
    flow_table_size) restarts hitlessly."""
    from .bpfsys import pinned_map_info

    path = directory / "flows6"
    pinned = pinned_map_info(str(path)).max_entries
    path.unlink()
    return (f"flows6 (the IPv6 flow table) is created anew with {map_specs6(settings)['flows6'].entries} entries "
            f"instead of the pinned {pinned}: no IPv6 service was programmed, so no flow used it")


def flows6_resize_hint(directory: Path) -> str:
    """The steps that work when an explicit flow_table_size6 differs from the
    pinned flows6 while IPv6 services are programmed (no controller runs to
    reload: the first step is a start)."""
    from .bpfsys import pinned_map_info

    pinned = pinned_map_info(str(directory / "flows6")).max_entries
    return (f"flows6 (the IPv6 flow table) changes size across a restart only while no IPv6 service is "
            f"programmed, and the pinned services6 holds some: set flow_table_size6 = {pinned} (or remove it) "
            f"to start with the pinned table; to resize it, then reload a pool without IPv6 services and "
            f"restart with the new size")


def adopt_flows6(directory: Path, settings: Settings) -> tuple[Settings, str] | None:
    """`settings` with the pinned flows6's size, and the note saying so, where
    flow_table_size6 is unset (it only follows from the services) and that
    size alone differs from the pinned one; else None. Such a size never
    blocks a restart: the IPv6 services still programmed keep their flows."""
    from .bpfsys import pinned_map_info

    if not settings.flows6_size_implied:
        return None
    pinned = pinned_map_info(str(directory / "flows6")).max_entries
    adjusted = dataclasses.replace(settings, flow_table_size6=pinned)
    if check_compatible(directory, adjusted):
        return None
    return adjusted, (f"flows6 (the IPv6 flow table) keeps its pinned {pinned} entries instead of "
                      f"{settings.flow_table_size6}: the pinned services6 still holds IPv6 services, and "
                      f"flow_table_size6 is unset; it is resized at a restart once none is programmed")


def restart_note(directory: Path, reopen_denied: str | None) -> str:
    """What a start that had to mount its own bpffs says about restarts.

    Such a bpffs lasts as long as this mount namespace, which ends with the
    process under `ip netns exec` or in a container; a restart then relies on
    opening the attached program's maps by id, which `reopen_denied` (the
    error of trying it on our own program) says whether it may.
    """
    if reopen_denied is None:
        return (f"the pins at {directory} last as long as this mount namespace; where that ends with this "
                f"process (ip netns exec, a container), a restart takes the maps from the attached program, "
                f"but IPv6 frames pass to the stack from this process's exit until the restart attaches "
                f"(counted, reason no_ipv6_program: the kernel empties the IPv6 program's tail_calls array "
                f"with its last pin); for IPv6 too to be hitless, mount a bpffs that outlives this process "
                f"(`mount -t bpf bpf /sys/fs/bpf` on the host) and set XDPLB_BPFFS to a directory on it")
    return (f"a restart will not be hitless if this mount namespace ends with this process (ip netns exec, "
            f"a container): the pins at {directory} go with it, and this process may not reopen the "
            f"program's maps by id ({reopen_denied}; that needs CAP_SYS_ADMIN); mount a bpffs that outlives "
            f"it (`mount -t bpf bpf /sys/fs/bpf` on the host, passed into the container) and set "
            f"XDPLB_BPFFS to a directory on it")


def recorded_layout(directory: Path) -> dict[str, int] | None:
    """map name -> layout digest, from the layout map pinned in `directory`
    (None when there is none: maps pinned by a build before it existed)."""
    from .bpfsys import map_items, open_pinned

    path = directory / "layout"
    if not path.exists():
        return None
    fd = open_pinned(str(path))
    try:
        items = map_items(fd, ctypes.sizeof(structs.LayoutKey), 8)
    finally:
        os.close(fd)
    return {structs.LayoutKey.from_buffer_copy(k).name.decode(errors="replace"): int.from_bytes(v, "little")
            for k, v in items.items()}


def check_layout(directory: Path, settings: Settings) -> tuple[list[str], bool]:
    """(maps pinned in `directory` whose key or value layout is not this
    build's, whether their layout was unrecorded). Maps without a layout map
    were pinned by a build before it existed; their layout is UNRECORDED_LAYOUT."""
    pinned = [name for name in pinned_maps(directory) if name != "layout"]
    if not pinned:
        return [], False
    specs = map_specs(settings)
    recorded = recorded_layout(directory)
    unrecorded = recorded is None
    reference = UNRECORDED_LAYOUT if unrecorded else recorded
    problems = []
    for name in pinned:
        have, want = reference.get(name), specs[name].digest()
        if have is None and not unrecorded:
            problems.append(f"{name} has no recorded layout")
        elif have != want:
            problems.append(f"{name} layout {have or 0:016x}, this build {want:016x}")
    return problems, unrecorded


def adopt_program_maps(prog_id: int, directory: Path, settings: Settings) -> list[str]:
    """Pin, at `directory`, the maps of the attached xdplb program `prog_id`.

    For a restart where no pin survived: `ip netns exec` and containers give
    a process its own mount namespace, and a bpffs mounted there vanishes
    with it, while the attached program still holds every map (the layout
    map too: the loader binds it). Opening maps by id needs CAP_SYS_ADMIN.
    Returns the names pinned; the caller checks them as any pinned maps.
    """
    from .bpfsys import BPF_MAP_GET_FD_BY_ID, BPF_PROG_GET_FD_BY_ID, fd_by_id, map_info, pin, prog_map_ids

    prog_fd = fd_by_id(BPF_PROG_GET_FD_BY_ID, prog_id)
    try:
        ids = prog_map_ids(prog_fd)
    finally:
        os.close(prog_fd)
    wanted = map_specs(settings)
    directory.mkdir(parents=True, exist_ok=True)
    pinned = []
    for map_id in ids:
        fd = fd_by_id(BPF_MAP_GET_FD_BY_ID, map_id)
        try:
            name = map_info(fd).name
            if name in wanted and not (directory / name).exists():
                pin(fd, str(directory / name))
                pinned.append(name)
        finally:
            os.close(fd)
    return sorted(pinned)


@dataclass
class Pins:
    """What prepare() found at a pin directory."""

    settings: Settings | None = None  # the settings to compile with (flows6's size may be the pinned one)
    adopted: bool = False          # maps are pinned there for bcc to reuse
    mounted_bpffs: bool = False    # prepare() had to mount the bpffs (it may die with this mount namespace)
    notes: list = field(default_factory=list)


def prepare(directory: Path, settings: Settings, attached_prog_id: int | None = None) -> Pins:
    """Get `directory` ready for bcc to pin or reuse maps in; PinError where
    the maps there must not be adopted.

    Mounts a bpffs where none is; where an earlier xdplb program is attached
    (`attached_prog_id`) and nothing is pinned, pins that program's maps
    first; then checks every pinned map's shape and layout.
    """
    from .bpfsys import pinned_map_info

    pins = Pins()
    note = ensure_bpffs(directory)
    if note:
        pins.notes.append(note)
        pins.mounted_bpffs = True
    if attached_prog_id and not pinned_maps(directory):
        try:
            taken = adopt_program_maps(attached_prog_id, directory, settings)
        except OSError as exc:
            raise PinError(
                f"no maps are pinned at {directory} and the attached xdplb program's maps cannot be opened "
                f"by id ({exc.strerror}; that needs CAP_SYS_ADMIN): run `xdplb detach {directory.name}` "
                f"(established flows will break), or start xdplb where XDPLB_BPFFS points at the bpffs "
                f"the earlier instance pinned them in"
            ) from exc
        if not taken:
            raise PinError(f"the attached xdplb program (id {attached_prog_id}) holds none of this build's "
                           f"maps: run `xdplb detach {directory.name}` first (established flows will break)")
        pins.notes.append(f"no maps were pinned at {directory}: took {len(taken)} from the attached program "
                          f"(id {attached_prog_id}) and pinned them there")
    pins.settings = settings
    problems = check_compatible(directory, settings)
    # flows6 alone of another size, and no IPv6 service programmed: replaced
    # below, once every other check has passed (a refused start changes nothing).
    flows6_only = bool(problems) and all(p.startswith("flows6:") for p in problems) and flows6_idle(directory)
    adopted6 = None
    if problems and not flows6_only and all(p.startswith("flows6:") for p in problems):
        adopted6 = adopt_flows6(directory, settings)
        if adopted6:
            settings, problems = adopted6[0], []
    if problems and not flows6_only:
        hint = f" ({flows6_resize_hint(directory)})" if any(p.startswith("flows6:") for p in problems) else ""
        raise PinError(
            f"the maps pinned at {directory} do not fit this pool ({'; '.join(problems)}); "
            f"compiled-in sizes cannot change across a hitless restart: restore the old sizes{hint}, "
            f"or run `xdplb detach` first (established flows will break)"
        )
    problems, unrecorded = check_layout(directory, settings)
    if problems:
        raise PinError(
            f"the maps pinned at {directory} hold other structs than this build ({'; '.join(problems)}) "
            f"and would be misread: run `xdplb detach {directory.name}` first (established flows will break), "
            f"then attach again"
        )
    if flows6_only:
        pins.notes.append(replace_flows6(directory, settings))
    if adopted6:
        pins.settings = settings
        pins.notes.append(adopted6[1])
    pins.adopted = bool(pinned_maps(directory))
    if pins.adopted and unrecorded:
        pins.notes.append(f"the maps pinned at {directory} carry no layout record (pinned by an earlier "
                          f"version); their shapes and this build's layout match that version's, so they "
                          f"are adopted and their layout recorded now")
    flows = directory / "flows"
    if flows.exists():
        per_cpu_lists = pinned_map_info(str(flows)).flags & BPF_F_NO_COMMON_LRU
        if per_cpu_lists:
            pins.notes.append("the adopted flow table keeps the per-CPU LRU lists of an earlier version until "
                              "`xdplb detach`: " + describe_flow_capacity(settings.flow_table_size, per_cpu_lists,
                                                                          possible_cpus()))
    return pins


def remove(directory: Path) -> bool:
    """Unpin everything (the kernel frees maps no program uses any more)."""
    if not directory.exists():
        return False
    shutil.rmtree(directory)
    return True
