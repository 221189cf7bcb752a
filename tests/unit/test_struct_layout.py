"""The C and Python views of every shared struct and constant must agree.

Compiles a tiny program against bpf/lb_structs.h with the host compiler, has
it print offsetof/sizeof for every field the Python side declares, and the
values of the shared constants, then compares. Fails on any drift: a field
added, moved, resized or renamed on one side only.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest

from xdplb import bpf_source, structs

CC = shutil.which("cc") or shutil.which("gcc")


def _c_fields(cls):
    names = getattr(cls, "C_NAMES", {})
    return [(name, names.get(name, name)) for name, _ in cls._fields_]


def _program() -> str:
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        '#include "lb_structs.h"',
        "int main(void) {",
    ]
    for cname in structs.SHARED_STRUCTS:
        cls = structs.SHARED_STRUCTS[cname]
        lines.append(f'printf("{cname} size %zu\\n", sizeof(struct {cname}));')
        for pyname, member in _c_fields(cls):
            lines.append(
                f'printf("{cname}.{pyname} %zu %zu\\n", offsetof(struct {cname}, {member}),'
                f" sizeof(((struct {cname} *)0)->{member}));"
            )
    for i, reason in enumerate(structs.REASONS):
        lines.append(f'printf("REASON_{reason.upper()} %d {i}\\n", REASON_{reason.upper()});')
    lines.append(f'printf("REASON_MAX %d {len(structs.REASONS)}\\n", REASON_MAX);')
    for i, event in enumerate(structs.EVENTS):
        lines.append(f'printf("EVENT_{event.upper()} %d {i}\\n", EVENT_{event.upper()});')
    lines.append(f'printf("EVENT_MAX %d {len(structs.EVENTS)}\\n", EVENT_MAX);')
    for i, stat in enumerate(structs.NAT_STATS):
        lines.append(f'printf("NAT_STAT_{stat.upper()} %d {i}\\n", NAT_STAT_{stat.upper()});')
    lines.append(f'printf("NAT_STAT_MAX %d {len(structs.NAT_STATS)}\\n", NAT_STAT_MAX);')
    for i, event in enumerate(structs.EVENTS6):
        name = "EVENT6_" + event.upper().removeprefix("IPV6_")
        lines.append(f'printf("{name} %d {i}\\n", {name});')
    lines.append(f'printf("EVENT6_MAX %d {len(structs.EVENTS6)}\\n", EVENT6_MAX);')
    lines.append(f'printf("PROG_IPV6 %d {structs.PROG_IPV6}\\n", PROG_IPV6);')
    lines.append(f'printf("PROG_MAX %d {len(structs.TAIL_MISSES)}\\n", PROG_MAX);')
    for flag in ("F_SVC_CLIENT_PERSIST", "F_SVC_NAT", "F_SVC_IPV6", "SVC_STATE_HALF", "F_BACKEND_UP", "F_BACKEND_READY",
                 "F_CFG_NO_BACKEND_DROP", "TABLES_PER_SERVICE", "PORT_WORDS", "LAYOUT_ENTRIES", "EXTRA_MACS"):
        lines.append(f'printf("{flag} %u {getattr(structs, flag)}\\n", (unsigned){flag});')
    lines.append(f'printf("ACTION_MAX %d {len(structs.ACTIONS)}\\n", ACTION_MAX);')
    lines += ["return 0;", "}"]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory):
    if CC is None:
        pytest.fail("no C compiler: install gcc (tools/setup.sh does)")
    work = tmp_path_factory.mktemp("layout")
    src = work / "layout.c"
    src.write_text(_program())
    exe = work / "layout"
    subprocess.run([CC, "-Wall", "-Werror", f"-I{bpf_source.BPF_DIR}", "-o", str(exe), str(src)], check=True)
    return subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines()


def test_struct_sizes_and_offsets_match(c_layout):
    mismatches = []
    for line in c_layout:
        name, *values = line.split()
        if name.endswith(("_MAX",)) or name.startswith(("REASON_", "EVENT_", "EVENT6_", "F_", "SVC_", "TABLES_",
                                                         "PORT_", "LAYOUT_", "EXTRA_", "NAT_STAT_", "PROG_")):
            continue
        if values[0] == "size":
            cls = structs.SHARED_STRUCTS[name]
            if ctypes.sizeof(cls) != int(values[1]):
                mismatches.append(f"sizeof {name}: C {values[1]}, Python {ctypes.sizeof(cls)}")
            continue
        cname, pyname = name.split(".")
        field = getattr(structs.SHARED_STRUCTS[cname], pyname)
        offset, size = int(values[0]), int(values[1])
        if (field.offset, field.size) != (offset, size):
            mismatches.append(f"{name}: C offset {offset} size {size}, Python offset {field.offset} size {field.size}")
    assert not mismatches, "\n".join(mismatches)


def test_every_python_field_was_checked(c_layout):
    checked = {line.split()[0] for line in c_layout}
    for cname, cls in structs.SHARED_STRUCTS.items():
        for pyname, _ in cls._fields_:
            assert f"{cname}.{pyname}" in checked


def test_shared_constants_match(c_layout):
    wrong = []
    for line in c_layout:
        name, *values = line.split()
        if name.startswith(("REASON_", "EVENT_", "EVENT6_", "F_", "SVC_", "TABLES_", "ACTION_", "PORT_", "LAYOUT_",
                            "EXTRA_", "NAT_STAT_", "PROG_")):
            c_value, py_value = values
            if c_value != py_value:
                wrong.append(f"{name}: C {c_value}, Python {py_value}")
    assert not wrong, "\n".join(wrong)


def test_maglev_table_type_size():
    assert ctypes.sizeof(structs.maglev_table_type(251)) == 251 * 4


def test_keys_have_no_hidden_padding():
    # The kernel hashes keys as raw bytes: every byte must belong to a named field.
    for cls in (structs.ServiceKey, structs.FlowKey, structs.LbAddr, structs.ServiceKey6, structs.FlowKey6):
        covered = sum(getattr(cls, name).size for name, _ in cls._fields_)
        assert covered == ctypes.sizeof(cls), cls.__name__


# ---- against the types bcc itself generates --------------------------------
#
# bcc compiles the program with its own embedded clang and builds a ctypes
# Key and Leaf for every map from that compiler's view of the structs. The
# gcc comparison above cannot see a difference between the two compilers;
# this one compares structs.py with bcc's types, map by map (needs root: bcc
# creates the maps to load the program).

def _bcc_field(ctype, cname: str):
    """(offset, size, type) of the field named `cname` in a bcc-generated
    type, looking through anonymous unions and structs."""
    for name, ftype, *_ in ctype._fields_:
        descr = getattr(ctype, name)
        if name == cname:
            return descr.offset, descr.size, ftype
        if name in getattr(ctype, "_anonymous_", ()):
            found = _bcc_field(ftype, cname)
            if found:
                return descr.offset + found[0], found[1], found[2]
    return None


def _drift(ours, theirs, where: str) -> list[str]:
    if ctypes.sizeof(ours) != ctypes.sizeof(theirs):
        return [f"{where}: {ctypes.sizeof(ours)} bytes in structs.py, {ctypes.sizeof(theirs)} as bcc built it"]
    if not (isinstance(ours, type) and issubclass(ours, ctypes.Structure)):
        return []
    problems = []
    names = getattr(ours, "C_NAMES", {})
    for pyname, ftype in ours._fields_:
        cname = names.get(pyname, pyname)
        found = _bcc_field(theirs, cname)
        field = getattr(ours, pyname)
        if found is None:
            problems.append(f"{where}.{cname}: no such field in bcc's type")
        elif (field.offset, field.size) != found[:2]:
            problems.append(f"{where}.{cname}: offset {field.offset} size {field.size} in structs.py, "
                            f"offset {found[0]} size {found[1]} as bcc built it")
        else:
            problems += _drift(ftype, found[2], f"{where}.{cname}")
    return problems


@pytest.fixture(scope="module")
def bcc_dataplane():
    import os

    if os.geteuid() != 0:
        pytest.skip("needs root: bcc creates the maps to load the program")
    from xdplb.config import Settings
    from xdplb.dataplane import BccDataplane

    dp = BccDataplane(Settings(maglev_size=251))
    yield dp
    dp.bpf.cleanup()


@pytest.mark.root
def test_every_map_type_matches_what_bcc_generates(bcc_dataplane):
    from xdplb import pinning

    problems = []
    for name, spec in pinning.map_specs(bcc_dataplane.settings).items():
        table = bcc_dataplane.map(name)
        problems += _drift(spec.key, table.Key, f"{name} key")
        # bcc's per-CPU tables keep the single-CPU value type in sLeaf.
        problems += _drift(spec.value, getattr(table, "sLeaf", table.Leaf), f"{name} value")
    assert not problems, "\n".join(problems)


def test_drift_check_sees_a_swapped_field():
    # The comparison itself must catch what the layout digest guards against.
    class Swapped(ctypes.Structure):
        _fields_ = [("service_id", ctypes.c_uint32), ("backend_id", ctypes.c_uint32)]

    assert _drift(structs.FlowValue, Swapped, "flows value") != []
    assert _drift(structs.FlowValue, structs.FlowValue, "flows value") == []
