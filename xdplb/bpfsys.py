"""The few raw bpf(2) commands that bcc 0.26's Python API does not offer.

- BPF_PROG_TEST_RUN: run the loaded XDP program on a packet in the kernel
  (packet tests and the benchmark use it; bcc added a wrapper only later).
- BPF_PROG_GET_FD_BY_ID + BPF_OBJ_GET_INFO_BY_FD: the name of the program
  attached to an interface, so `xdplb detach` removes only its own.

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

BPF_OBJ_GET = 7
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15

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
_PROG_INFO_SIZE = 256


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


def prog_test_run(prog_fd: int, packet: bytes, repeat: int = 1) -> TestRun:
    """Run an XDP program on `packet` in the kernel (needs root).

    The kernel rejects packets shorter than an Ethernet header (14 bytes).
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


def pinned_map_info(path: str) -> MapInfo:
    """Shape of a map pinned in bpffs (needs root)."""
    raw = os.fsencode(path) + b"\0"
    buf = ctypes.create_string_buffer(raw, len(raw))
    fd = _bpf(BPF_OBJ_GET, _ObjGetAttr(pathname=ctypes.addressof(buf)))
    try:
        head = _MapInfo.from_buffer_copy(obj_info(fd)[: ctypes.sizeof(_MapInfo)])
        return MapInfo(head.type, head.key_size, head.value_size, head.max_entries, head.map_flags)
    finally:
        os.close(fd)
