"""Pure parts of xdplb/pinning.py: kernel sizes, flow-table capacity, layout digests."""
from __future__ import annotations

import ctypes

import pytest

from xdplb import pinning, structs
from xdplb.config import Settings

NO_COMMON = pinning.BPF_F_NO_COMMON_LRU


@pytest.mark.parametrize("cpus", [1, 2, 6, 12, 24, 48, 128])
def test_per_cpu_lru_sizes_round_up_to_a_multiple_of_the_cpus(cpus):
    created = pinning.kernel_entries("lru_hash", 262144, NO_COMMON, cpus)
    assert created % cpus == 0 and 262144 <= created < 262144 + cpus


def test_only_per_cpu_lrus_are_rounded():
    assert pinning.kernel_entries("lru_hash", 1025, NO_COMMON, 2) == 1026
    assert pinning.kernel_entries("lru_hash", 1025, 0, 2) == 1025
    assert pinning.kernel_entries("hash", 1025, NO_COMMON, 2) == 1025


def test_rounding_that_would_overflow_rounds_down():
    assert pinning.kernel_entries("lru_hash", 0xFFFFFFFF, NO_COMMON, 6) == 0xFFFFFFFF // 6 * 6


def test_a_32_cpu_gateway_holds_100k_flows_on_one_cpu_only_with_the_shared_lru():
    shared = pinning.flow_capacity(262144, 0, 32)
    assert shared.shared and shared.per_cpu == shared.guaranteed == 262144 - 32 * 128
    assert shared.per_cpu >= 100_000
    split = pinning.flow_capacity(262144, NO_COMMON, 32)
    assert not split.shared and split.per_cpu == 8192  # what one inserting CPU got before


def test_this_build_declares_the_shared_lru_and_a_default_that_holds_100k():
    flows = pinning.map_specs(Settings())["flows"]
    assert flows.flags == 0
    assert pinning.flow_capacity(flows.entries, flows.flags, 32).per_cpu >= 100_000


def test_cpu_lists():
    assert pinning.cpu_list_count("0-1\n") == 2
    assert pinning.cpu_list_count("0-3,8,10-11") == 7
    with pytest.raises(ValueError):
        pinning.cpu_list_count("")


class _Addr(ctypes.Structure):
    _fields_ = [("raw", ctypes.c_uint8 * 16)]


class _Record(ctypes.Structure):
    # The shapes the shared structs use: a nested struct, a byte array, scalars and their padding.
    _fields_ = [("addr", _Addr), ("mac", ctypes.c_uint8 * 6), ("flags", ctypes.c_uint8),
                ("pad", ctypes.c_uint8), ("service_id", ctypes.c_uint32), ("down_since", ctypes.c_uint64)]


class _Ids(ctypes.Structure):
    _fields_ = [("backend_id", ctypes.c_uint32), ("service_id", ctypes.c_uint32)]


def test_layout_text_names_every_field_offset_and_size():
    assert structs.layout_text(_Ids) == "struct8{backend_id@0:u32,service_id@4:u32}"
    assert structs.layout_text(_Record) == (
        "struct40{addr@0:struct16{raw@0:u8[16]},mac@16:u8[6],flags@22:u8,pad@23:u8,service_id@24:u32,"
        "down_since@32:u64}")
    assert structs.layout_text(ctypes.c_char * 16) == "c8[16]"
    assert structs.layout_text(ctypes.c_int) == "s32"


def test_a_swap_of_two_same_size_fields_changes_the_digest():
    class Swapped(ctypes.Structure):
        _fields_ = [("service_id", ctypes.c_uint32), ("backend_id", ctypes.c_uint32)]

    assert ctypes.sizeof(Swapped) == ctypes.sizeof(_Ids)
    assert structs.layout_digest(structs.FlowKey, Swapped) != structs.layout_digest(structs.FlowKey, _Ids)


def test_digests_do_not_depend_on_compiled_in_sizes():
    small, large = pinning.map_specs(Settings(maglev_size=251)), pinning.map_specs(Settings())
    assert {n: s.digest() for n, s in small.items()} == {n: s.digest() for n, s in large.items()}


def test_every_map_has_a_layout_entry_and_a_kernel_name():
    specs = pinning.map_specs(Settings())
    assert len(specs) <= structs.LAYOUT_ENTRIES
    for name in specs:
        structs.LayoutKey.of(name)  # a map name the kernel keeps whole (15 bytes)


def test_unrecorded_layout_names_the_maps_pinned_before_the_layout_map():
    # Maps added since (the layout map itself, the flood guard's state, the tail-call misses, NAT's,
    # the IPv6 maps) have no unrecorded layout.
    assert set(pinning.UNRECORDED_LAYOUT) == (set(pinning.map_specs(Settings())) - {"layout", "flood_state",
                                                                                   "tail_misses"}
                                              - set(pinning.nat_map_specs(Settings()))
                                              - set(pinning.map_specs6(Settings())))


def test_first_start_says_how_a_restart_adopts_where_pins_may_die():
    ok = pinning.restart_note(pinning.Path("/sys/fs/bpf/xdplb/eth0"), None)
    assert "a restart takes the maps from the attached program" in ok
    # The program array cannot be taken back: IPv6 is not hitless there, and the note says so.
    assert "IPv6 frames pass to the stack" in ok and "no_ipv6_program" in ok


def test_first_start_says_a_restart_will_not_be_hitless_and_the_fix_when_ids_cannot_be_opened():
    text = pinning.restart_note(pinning.Path("/sys/fs/bpf/xdplb/eth0"), "Operation not permitted")
    assert "a restart will not be hitless" in text and "Operation not permitted" in text
    assert "`mount -t bpf bpf /sys/fs/bpf`" in text and "XDPLB_BPFFS" in text
