"""The maps a loaded BPF program uses, with the kernel's memory accounting.

bcc's Python API cannot list a module's maps, so this asks the kernel:
BPF_OBJ_GET_INFO_BY_FD on the program gives its map ids, BPF_MAP_GET_FD_BY_ID
opens each, and /proc/self/fdinfo of that fd gives its `memlock` (the
kernel's own account of the map's memory). Layouts follow struct
bpf_prog_info and struct bpf_map_info in include/uapi/linux/bpf.h.
"""
from __future__ import annotations

import os
from pathlib import Path

from xdplb.bpfsys import BPF_MAP_GET_FD_BY_ID, fd_by_id, map_info, prog_map_ids

from . import parse


def program_maps(prog_fd: int) -> list[dict]:
    """name, type, sizes and memlock bytes of every map the program uses."""
    rows = []
    for map_id in prog_map_ids(prog_fd):
        fd = fd_by_id(BPF_MAP_GET_FD_BY_ID, map_id)
        try:
            name = map_info(fd).name
            text = Path(f"/proc/self/fdinfo/{fd}").read_text()
        finally:
            os.close(fd)
        fields = parse.fdinfo(text)
        rows.append({
            "map": name,
            "map_type": int(fields.get("map_type", -1)),
            "max_entries": int(fields.get("max_entries", 0)),
            "key_size": int(fields.get("key_size", 0)),
            "value_size": int(fields.get("value_size", 0)),
            "memlock_bytes": parse.memlock(text),
        })
    return sorted(rows, key=lambda r: -r["memlock_bytes"])
