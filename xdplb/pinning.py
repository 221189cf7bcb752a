"""Where the maps live in bpffs, and whether pinned maps fit this build.

Pin directory: <root>/<ifname>, or <root>/netns-<inode>/<ifname> outside
the initial network namespace (lab hosts all have an eth0). <root> is
/sys/fs/bpf/xdplb, or $XDPLB_BPFFS.

`ip netns exec` gives each command a private mount namespace with a fresh
/sys, so a bpffs mounted there vanishes with the command: in such a
namespace, point XDPLB_BPFFS at a bpffs mounted in the host's mount
namespace (the lab does). ensure_bpffs() mounts one where none is, and says
when the mount will not outlive this process's mount namespace.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
from pathlib import Path

from . import control, structs
from .config import Settings

DEFAULT_ROOT = "/sys/fs/bpf/xdplb"
BPF_FS_MAGIC = 0xCAFE4A11

BPF_MAP_TYPE = {"hash": 1, "array": 2, "percpu_array": 6, "lru_hash": 9}


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
        note += (" inside a private mount namespace (ip netns exec?): pinned maps will not outlive it; "
                 "set XDPLB_BPFFS to a bpffs mounted in the host namespace for hitless restarts")
    return note


def expected_shapes(settings: Settings) -> dict[str, tuple]:
    """map name -> (type, key size, value size, max entries) this build needs."""
    sz = ctypes.sizeof
    return {
        "services": ("hash", sz(structs.ServiceKey), sz(structs.ServiceInfo), settings.max_services),
        "vips": ("hash", sz(structs.LbAddr), 4, settings.max_services),
        "backends": ("array", 4, sz(structs.BackendInfo), settings.max_backends),
        "maglev_tables": ("array", 4, 4 * settings.maglev_size, settings.max_services * structs.TABLES_PER_SERVICE),
        "flows": ("lru_hash", sz(structs.FlowKey), sz(structs.FlowValue), settings.flow_table_size),
        "lb_config": ("array", 4, sz(structs.LbConfig), 1),
        "service_stats": ("percpu_array", 4, sz(structs.LbCounters), settings.max_services),
        "backend_stats": ("percpu_array", 4, sz(structs.LbCounters), settings.max_backends),
        "xdp_actions": ("percpu_array", 4, 8, len(structs.ACTIONS)),
        "not_forwarded": ("percpu_array", 4, 8, len(structs.REASONS)),
        "events": ("percpu_array", 4, 8, len(structs.EVENTS)),
        "service_ids": ("array", 4, sz(structs.ServiceKey), settings.max_services),
        "service_ports": ("array", 4, 4, structs.PORT_WORDS),
    }


def pinned_maps(directory: Path) -> list[str]:
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.name in expected_shapes(Settings()))


def check_compatible(directory: Path, settings: Settings) -> list[str]:
    """Differences between maps pinned in `directory` and what `settings` need.

    bcc would silently reuse a pinned map of another shape, and the program
    would then index past its end or misread it; so refuse instead.
    """
    from .bpfsys import pinned_map_info

    problems = []
    for name, (kind, key, value, entries) in expected_shapes(settings).items():
        path = directory / name
        if not path.exists():
            continue
        info = pinned_map_info(str(path))
        have = (info.type, info.key_size, info.value_size, info.max_entries)
        want = (BPF_MAP_TYPE[kind], key, value, entries)
        if have != want:
            problems.append(f"{name}: pinned type/key/value/entries {have}, this pool needs {want}")
    return problems


def remove(directory: Path) -> bool:
    """Unpin everything (the kernel frees maps no program uses any more)."""
    if not directory.exists():
        return False
    shutil.rmtree(directory)
    return True
