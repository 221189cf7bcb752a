"""Assemble the XDP program's C source for bcc.

bcc rewrites its map syntax (``flows.lookup(&key)``) only in the main file it
compiles, not in headers it includes. The data plane is split into headers
with one job each (parsing, maps, hashing, forwarding, counters), so this
module inlines every local ``#include "x.h"`` into one text before bcc sees
it, with ``#line`` markers so compiler errors still name the real file and
line. System includes (``<linux/...>``) are left to bcc.

Pure: reads files under ``bpf/``, returns text and flags.
"""
from __future__ import annotations

import re
from pathlib import Path

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
MAIN_FILE = "xdplb.c"

_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


def assemble(main: str = MAIN_FILE, bpf_dir: Path = BPF_DIR) -> str:
    """Return the program with local headers inlined once each, in order."""
    seen: set[str] = set()
    out: list[str] = []

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        path = bpf_dir / name
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise FileNotFoundError(f"BPF source {path} cannot be read: {exc.strerror}") from exc
        out.append(f'#line 1 "{path}"')
        for number, line in enumerate(lines, start=1):
            match = _LOCAL_INCLUDE.match(line)
            if match:
                visit(match.group(1))
                out.append(f'#line {number + 1} "{path}"')
            else:
                out.append(line)

    visit(main)
    return "\n".join(out) + "\n"


def cflags(defines: dict[str, int | str]) -> list[str]:
    """-D flags in a stable order: integers as numbers, strings as C string
    literals (bcc hands the flags to clang directly, no shell quoting)."""
    out = []
    for name, value in sorted(defines.items()):
        if isinstance(value, str):
            if '"' in value or "\\" in value:
                raise ValueError(f"-D{name}: {value!r} cannot be a C string literal")
            out.append(f'-D{name}="{value}"')
        else:
            out.append(f"-D{name}={int(value)}")
    return out
