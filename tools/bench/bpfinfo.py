"""The maps a loaded BPF program uses, with the kernel's memory accounting.

bcc's Python API cannot list a module's maps, so this asks the kernel:
BPF_OBJ_GET_INFO_BY_FD on the program gives its map ids, BPF_MAP_GET_FD_BY_ID
opens each, and /proc/self/fdinfo of that fd gives its `memlock` (the
kernel's own account of the map's memory). Layouts follow struct
bpf_prog_info and struct bpf_map_info in include/uapi/linux/bpf.h.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

from xdplb.bpfsys import BPF_MAP_GET_FD_BY_ID, fd_by_id, obj_info

from . import parse

_PROG_NR_MAP_IDS = 52      # struct bpf_prog_info: __u32 nr_map_ids
_PROG_MAP_IDS = 56         # __aligned_u64 map_ids
_MAP_INFO_SIZE = 128
_MAP_NAME = 24             # struct bpf_map_info: char name[16]


def program_maps(prog_fd: int) -> list[dict]:
    """name, type, sizes and memlock bytes of every map the program uses."""
    count = int.from_bytes(obj_info(prog_fd)[_PROG_NR_MAP_IDS:_PROG_NR_MAP_IDS + 4], "little")
    ids = (ctypes.c_uint32 * max(count, 1))()
    request = bytearray(_PROG_MAP_IDS + 8)   # obj_info zero-fills the rest of struct bpf_prog_info
    request[_PROG_NR_MAP_IDS:_PROG_NR_MAP_IDS + 4] = count.to_bytes(4, "little")
    request[_PROG_MAP_IDS:_PROG_MAP_IDS + 8] = ctypes.addressof(ids).to_bytes(8, "little")
    obj_info(prog_fd, request=bytes(request))
    rows = []
    for map_id in list(ids)[:count]:
        fd = fd_by_id(BPF_MAP_GET_FD_BY_ID, map_id)
        try:
            raw = obj_info(fd, _MAP_INFO_SIZE)
            text = Path(f"/proc/self/fdinfo/{fd}").read_text()
        finally:
            os.close(fd)
        fields = parse.fdinfo(text)
        rows.append({
            "map": raw[_MAP_NAME:_MAP_NAME + 16].split(b"\0", 1)[0].decode(),
            "map_type": int(fields.get("map_type", -1)),
            "max_entries": int(fields.get("max_entries", 0)),
            "key_size": int(fields.get("key_size", 0)),
            "value_size": int(fields.get("value_size", 0)),
            "memlock_bytes": parse.memlock(text),
        })
    return sorted(rows, key=lambda r: -r["memlock_bytes"])
