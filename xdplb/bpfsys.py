"""The few raw bpf(2) commands that bcc 0.26's Python API does not offer.

- BPF_PROG_TEST_RUN: run the loaded XDP program on a packet in the kernel
  (packet tests and the benchmark use it; bcc added a wrapper only later).
- BPF_PROG_GET_FD_BY_ID + BPF_OBJ_GET_INFO_BY_FD: the name of the program
  attached to an interface, so `xdplb detach` removes only its own, and the
  ids of the maps it uses, so a restart can adopt them where no pin survived.
- BPF_MAP_GET_FD_BY_ID, BPF_OBJ_GET, BPF_OBJ_PIN: open a map by id or by
  pin, and pin it again.
- BPF_MAP_LOOKUP_ELEM, BPF_MAP_GET_NEXT_KEY: read a pinned map (the layout
  map) before bcc loads anything.
- BPF_PROG_BIND_MAP: make a loaded program hold a map it does not use, so
  the map lives, and is found, with the program.
- BPF_OBJ_GET_INFO_BY_FD's translated instructions: the maps a program's
  own code refers to (bound maps aside), so a test can tell that the IPv4
  program holds no IPv6 code.

Layouts follow union bpf_attr and struct bpf_prog_info in the kernel's
include/uapi/linux/bpf.h.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from dataclasses import dataclass

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351, "riscv64": 280}

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_BIND_MAP = 35

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class _TestRunAttr(ctypes.Structure):
    """union bpf_attr, the `test` member."""

    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


class _IdAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32), ("open_flags", ctypes.c_uint32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


class _ObjGetAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32), ("file_flags", ctypes.c_uint32)]


class _ElemAttr(ctypes.Structure):
    """union bpf_attr, the map element commands."""

    _fields_ = [("map_fd", ctypes.c_uint32), ("_pad", ctypes.c_uint32), ("key", ctypes.c_uint64),
                ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _BindAttr(ctypes.Structure):
    _fields_ = [("prog_fd", ctypes.c_uint32), ("map_fd", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class _MapInfo(ctypes.Structure):
    """The head of struct bpf_map_info."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


_PROG_INFO_NAME_OFFSET = 64  # struct bpf_prog_info: name[16] follows map_ids
_PROG_XLATED_LEN = 20        # __u32 xlated_prog_len
_PROG_XLATED_INSNS = 32      # __aligned_u64 xlated_prog_insns
_PROG_NR_MAP_IDS = 52        # struct bpf_prog_info: __u32 nr_map_ids
_PROG_MAP_IDS = 56           # __aligned_u64 map_ids
_PROG_INFO_SIZE = 256
MAP_INFO_SIZE = 128


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    number = _SYS_BPF.get(platform.machine())
    if number is None:
        raise OSError(f"bpf(2) syscall number unknown for {platform.machine()}")
    ret = _libc.syscall(number, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf cmd {cmd}: {os.strerror(err)}")
    return ret


@dataclass(frozen=True)
class TestRun:
    retval: int        # the XDP action the program returned
    data: bytes        # the packet as the program left it
    duration_ns: int   # mean time per repetition, as measured by the kernel


def prog_test_run(prog_fd: int, packet: bytes, repeat: int = 1, ingress_ifindex: int = 0) -> TestRun:
    """Run an XDP program on `packet` in the kernel (needs root).

    The kernel rejects packets shorter than an Ethernet header (14 bytes).
    `ingress_ifindex` (in the calling thread's network namespace) is the
    interface the frame seems to arrive on, for bpf_fib_lookup; 0: loopback.
    """
    data_in = ctypes.create_string_buffer(bytes(packet), len(packet))
    out_size = max(len(packet) + 256, 4096)
    data_out = ctypes.create_string_buffer(out_size)
    attr = _TestRunAttr(
        prog_fd=prog_fd,
        data_size_in=len(packet),
        data_size_out=out_size,
        data_in=ctypes.addressof(data_in),
        data_out=ctypes.addressof(data_out),
        repeat=max(1, repeat),
    )
    if ingress_ifindex:
        # struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
        ctx = (ctypes.c_uint32 * 6)(0, len(packet), 0, ingress_ifindex, 0, 0)
        attr.ctx_size_in, attr.ctx_in = ctypes.sizeof(ctx), ctypes.addressof(ctx)
    _bpf(BPF_PROG_TEST_RUN, attr)
    return TestRun(attr.retval, data_out.raw[: attr.data_size_out], attr.duration)


def fd_by_id(cmd: int, obj_id: int) -> int:
    """A new fd for the program or map with this id (BPF_PROG_GET_FD_BY_ID or
    BPF_MAP_GET_FD_BY_ID as `cmd`); the caller closes it."""
    return _bpf(cmd, _IdAttr(id=obj_id))


def obj_info(fd: int, size: int = _PROG_INFO_SIZE, request: bytes = b"") -> bytes:
    """BPF_OBJ_GET_INFO_BY_FD: the kernel's info struct for a program or map
    fd. `request` pre-fills the struct, for the fields that ask the kernel to
    copy arrays out (a program's map ids)."""
    buf = ctypes.create_string_buffer(request.ljust(size, b"\0"), size)
    _bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=size, info=ctypes.addressof(buf)))
    return buf.raw


def prog_name(prog_id: int) -> str:
    """Name of a loaded BPF program, from its id (as netlink reports it)."""
    fd = fd_by_id(BPF_PROG_GET_FD_BY_ID, prog_id)
    try:
        raw = obj_info(fd)[_PROG_INFO_NAME_OFFSET:_PROG_INFO_NAME_OFFSET + 16]
        return raw.split(b"\0", 1)[0].decode()
    finally:
        os.close(fd)


@dataclass(frozen=True)
class MapInfo:
    type: int
    key_size: int
    value_size: int      # per CPU for per-CPU maps
    max_entries: int
    flags: int
    name: str = ""
    id: int = 0


def map_info(fd: int) -> MapInfo:
    """Shape, name and id of an open map."""
    head = _MapInfo.from_buffer_copy(obj_info(fd, MAP_INFO_SIZE)[: ctypes.sizeof(_MapInfo)])
    return MapInfo(head.type, head.key_size, head.value_size, head.max_entries, head.map_flags,
                   head.name.decode(errors="replace"), head.id)


def open_pinned(path: str) -> int:
    """A new fd for the object pinned at `path` (BPF_OBJ_GET); the caller closes it."""
    raw = os.fsencode(path) + b"\0"
    buf = ctypes.create_string_buffer(raw, len(raw))
    return _bpf(BPF_OBJ_GET, _ObjGetAttr(pathname=ctypes.addressof(buf)))


def pin(fd: int, path: str) -> None:
    """Pin the object behind `fd` at `path` on a bpffs (BPF_OBJ_PIN)."""
    raw = os.fsencode(path) + b"\0"
    buf = ctypes.create_string_buffer(raw, len(raw))
    _bpf(BPF_OBJ_PIN, _ObjGetAttr(pathname=ctypes.addressof(buf), bpf_fd=fd))


def pinned_map_info(path: str) -> MapInfo:
    """Shape of a map pinned in bpffs (needs root)."""
    fd = open_pinned(path)
    try:
        return map_info(fd)
    finally:
        os.close(fd)


def map_items(fd: int, key_size: int, value_size: int) -> dict[bytes, bytes]:
    """Every key and value of a (non-per-CPU) map, as raw bytes."""
    items: dict[bytes, bytes] = {}
    key = ctypes.create_string_buffer(key_size)
    value = ctypes.create_string_buffer(value_size)
    prev = None
    while True:
        attr = _ElemAttr(map_fd=fd, key=ctypes.addressof(prev) if prev is not None else 0,
                         value=ctypes.addressof(key))
        try:
            _bpf(BPF_MAP_GET_NEXT_KEY, attr)
        except OSError as exc:
            if exc.errno == 2:  # ENOENT: no more keys
                return items
            raise
        try:
            _bpf(BPF_MAP_LOOKUP_ELEM, _ElemAttr(map_fd=fd, key=ctypes.addressof(key), value=ctypes.addressof(value)))
        except OSError as exc:
            if exc.errno != 2:  # deleted meanwhile
                raise
        else:
            items[key.raw] = value.raw
        prev = ctypes.create_string_buffer(key.raw, key_size)


def prog_id(prog_fd: int) -> int:
    """The id of a loaded program (struct bpf_prog_info.id)."""
    return int.from_bytes(obj_info(prog_fd)[4:8], "little")


def prog_map_ids(prog_fd: int) -> list[int]:
    """Ids of every map a loaded program holds (uses, or was bound to)."""
    count = int.from_bytes(obj_info(prog_fd)[_PROG_NR_MAP_IDS:_PROG_NR_MAP_IDS + 4], "little")
    ids = (ctypes.c_uint32 * max(count, 1))()
    request = bytearray(_PROG_MAP_IDS + 8)   # obj_info zero-fills the rest of struct bpf_prog_info
    request[_PROG_NR_MAP_IDS:_PROG_NR_MAP_IDS + 4] = count.to_bytes(4, "little")
    request[_PROG_MAP_IDS:_PROG_MAP_IDS + 8] = ctypes.addressof(ids).to_bytes(8, "little")
    obj_info(prog_fd, request=bytes(request))
    return list(ids)[:count]


BPF_LD_IMM64 = 0x18                       # BPF_LD | BPF_IMM | BPF_DW: a 64-bit constant, two slots
BPF_PSEUDO_MAP_FD, BPF_PSEUDO_MAP_VALUE = 1, 2


def prog_insn_count(prog_fd: int) -> int:
    """Instructions of a loaded program as the verifier left them (translated)."""
    return int.from_bytes(obj_info(prog_fd)[_PROG_XLATED_LEN:_PROG_XLATED_LEN + 4], "little") // 8


def prog_insn_map_ids(prog_fd: int) -> set[int]:
    """Ids of the maps a loaded program's instructions load (a lookup, an
    update, a tail call's program array), from its translated instructions:
    the kernel writes each map reference there as the map's id (with root's
    rights). Maps only bound to the program (bind_map) are not among them."""
    length = prog_insn_count(prog_fd) * 8
    insns = ctypes.create_string_buffer(max(length, 8))
    request = bytearray(_PROG_XLATED_INSNS + 8)
    request[_PROG_XLATED_LEN:_PROG_XLATED_LEN + 4] = length.to_bytes(4, "little")
    request[_PROG_XLATED_INSNS:_PROG_XLATED_INSNS + 8] = ctypes.addressof(insns).to_bytes(8, "little")
    obj_info(prog_fd, request=bytes(request))
    raw, ids = insns.raw[:length], set()
    for at in range(0, len(raw) - 8, 8):   # struct bpf_insn: code, dst:4 src:4, off, imm
        if raw[at] == BPF_LD_IMM64 and raw[at + 1] >> 4 in (BPF_PSEUDO_MAP_FD, BPF_PSEUDO_MAP_VALUE):
            ids.add(int.from_bytes(raw[at + 4:at + 8], "little"))
    return ids


def bind_map(prog_fd: int, map_fd: int) -> None:
    """BPF_PROG_BIND_MAP: the program holds the map from now on (a no-op
    for a map it already uses)."""
    _bpf(BPF_PROG_BIND_MAP, _BindAttr(prog_fd=prog_fd, map_fd=map_fd))
