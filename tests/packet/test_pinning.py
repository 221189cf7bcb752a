"""Adopting pinned maps: exact kernel sizes, recorded layouts, maps taken by id.

The real program is loaded through bcc with its maps pinned on a private
bpffs (no XDP attach: nothing here needs a mode). Each test loads the
dataplane twice, as a restart does, and looks at what the second load adopts.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from xdplb import bpf_source, bpfsys, pinning, structs
from xdplb.config import Settings, parse_pool

pytestmark = pytest.mark.root

LEGACY = Path(__file__).resolve().parent / "legacy_maps"


@pytest.fixture
def bpffs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root: loads BPF and mounts a bpffs")
    mount = tmp_path / "bpffs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def loaded():
    """Load BccDataplanes; every one still loaded is unloaded afterwards."""
    from xdplb.dataplane import BccDataplane

    made = []

    def load(settings, pin_dir, **kwargs):
        dp = BccDataplane(settings, pin_dir=pin_dir, **kwargs)
        made.append(dp)
        return dp

    yield load
    for dp in made:
        dp.bpf.cleanup()


def odd_flow_table_size() -> int:
    cpus = pinning.possible_cpus()
    assert cpus > 1, "a size that does not divide by the CPU count needs more than one possible CPU"
    return 1024 * cpus + 1


def load_legacy_maps(settings: Settings, pin_dir: Path):
    """Pin the maps as the previous version did (see legacy_maps/maps_only.c)."""
    from bcc import BPF

    flags = {"MAGLEV_SIZE": settings.maglev_size, "MAX_SERVICES": settings.max_services,
             "MAX_BACKENDS": settings.max_backends, "FLOW_TABLE_SIZE": settings.flow_table_size,
             "PIN_DIR": str(pin_dir)}
    pin_dir.mkdir(parents=True, exist_ok=True)
    return BPF(text=bpf_source.assemble("maps_only.c", LEGACY).encode(), cflags=bpf_source.cflags(flags))


class SwappedFlowValue(ctypes.Structure):
    """flow_value with its two ids swapped: same size, another layout."""

    _fields_ = [("service_id", ctypes.c_uint32), ("backend_id", ctypes.c_uint32), ("atime", ctypes.c_uint64)]


def pin_without_layout_record(settings: Settings, pin_dir: Path, loaded) -> None:
    """Maps of this build's shapes pinned as a build before the layout map left them."""
    loaded(settings, pin_dir).bpf.cleanup()
    (pin_dir / "layout").unlink()


def test_restart_adopts_a_flow_table_whose_size_the_cpus_do_not_divide(bpffs, loaded):
    settings = Settings(maglev_size=251, flow_table_size=odd_flow_table_size())
    loaded(settings, bpffs / "eth0").bpf.cleanup()
    second = loaded(settings, bpffs / "eth0")   # refused before: the kernel's size was compared with the asked one
    assert second.adopted


def test_kernel_rounds_a_per_cpu_lru_as_kernel_entries_says(bpffs, loaded):
    # The previous version's flow table (BPF_F_NO_COMMON_LRU) at a size the
    # CPUs do not divide: the kernel creates more entries than were asked.
    settings = Settings(maglev_size=251, flow_table_size=odd_flow_table_size())
    legacy = load_legacy_maps(settings, bpffs / "eth0")
    info = bpfsys.pinned_map_info(str(bpffs / "eth0" / "flows"))
    assert info.flags == pinning.BPF_F_NO_COMMON_LRU
    cpus = pinning.possible_cpus()
    assert info.max_entries == pinning.kernel_entries("lru_hash", settings.flow_table_size, info.flags, cpus)
    assert info.max_entries > settings.flow_table_size
    legacy.cleanup()
    # This build's records are larger than that version's (a flow's UDP
    # idle time, a backend's down_since, lb_config's flow settings): the
    # first upgrade from it is refused in one sentence, not misread.
    from xdplb.dataplane import LoadError

    with pytest.raises(LoadError, match=r"do not fit this pool \(backends: .*flows: .*run `xdplb detach` first"):
        loaded(settings, bpffs / "eth0")


def test_unrecorded_maps_of_this_layout_are_adopted_once_and_recorded(bpffs, loaded, monkeypatch):
    settings = Settings(maglev_size=251)
    pin_without_layout_record(settings, bpffs / "eth0", loaded)
    # A previous version whose structs were this build's.
    specs = pinning.map_specs(settings)
    monkeypatch.setattr(pinning, "UNRECORDED_LAYOUT", {n: s.digest() for n, s in specs.items() if n != "layout"})
    dp = loaded(settings, bpffs / "eth0")
    assert dp.adopted
    assert "carry no layout record" in " ".join(dp.notes)
    # Adopted once: the layout is recorded now, for the next restart.
    assert pinning.recorded_layout(bpffs / "eth0") == {n: s.digest() for n, s in specs.items()}


def test_pinned_maps_of_another_layout_are_refused_with_detach_first(bpffs, loaded, monkeypatch):
    from xdplb.dataplane import LoadError

    settings = Settings(maglev_size=251)
    loaded(settings, bpffs / "eth0").bpf.cleanup()
    monkeypatch.setattr(structs, "FlowValue", SwappedFlowValue)  # an upgrade that swapped two fields
    with pytest.raises(LoadError) as refused:
        loaded(settings, bpffs / "eth0")
    message = str(refused.value)
    assert "flows layout" in message and "run `xdplb detach eth0` first" in message
    assert "services" not in message, "only the map whose layout changed is named"


def test_unrecorded_maps_are_refused_when_this_build_changed_a_layout(bpffs, loaded, monkeypatch):
    from xdplb.dataplane import LoadError

    settings = Settings(maglev_size=251)
    pin_without_layout_record(settings, bpffs / "eth0", loaded)
    # A previous version whose flow_value held the same bytes in another order.
    specs = pinning.map_specs(settings)
    unrecorded = {n: s.digest() for n, s in specs.items() if n != "layout"}
    unrecorded["flows"] = structs.layout_digest(structs.FlowKey, SwappedFlowValue)
    monkeypatch.setattr(pinning, "UNRECORDED_LAYOUT", unrecorded)
    with pytest.raises(LoadError, match=r"flows layout .*run `xdplb detach eth0` first"):
        loaded(settings, bpffs / "eth0")


def test_maps_of_the_attached_program_are_taken_by_id_when_no_pin_survived(bpffs, loaded):
    settings = Settings(maglev_size=251)
    first = loaded(settings, bpffs / "old" / "eth0")
    key = structs.FlowKey((ctypes.c_uint8 * 4)(10, 0, 0, 2), (ctypes.c_uint8 * 4)(10, 0, 0, 100), 1, 2, 6)
    first.map("flows")[key] = structs.FlowValue(7, 3)
    shutil.rmtree(bpffs / "old")   # the pins die with their mount namespace; the program holds the maps
    prog = bpfsys.prog_id(first.prog_fd)
    second = loaded(settings, bpffs / "new" / "eth0", attached_prog_id=prog)
    assert second.adopted
    assert f"took {len(pinning.map_specs(settings))} from the attached program" in " ".join(second.notes)
    assert sorted(p.name for p in (bpffs / "new" / "eth0").iterdir()) == sorted(pinning.map_specs(settings))
    value = second.map("flows")[key]
    assert (value.backend_id, value.service_id) == (7, 3)


# ---- flows6's own size (flow_table_size6) -------------------------------------

IPV4_FLOW = structs.FlowKey((ctypes.c_uint8 * 4)(10, 0, 0, 2), (ctypes.c_uint8 * 4)(10, 0, 0, 100), 1, 2, 6)


def test_the_loaded_flows6_has_flow_table_size6_entries(bpffs, loaded):
    dp = loaded(Settings(maglev_size=251, flow_table_size=4096, flow_table_size6=1024), bpffs / "eth0")
    assert bpfsys.map_info(dp.map("flows6").map_fd).max_entries == 1024      # what the program uses
    assert bpfsys.pinned_map_info(str(bpffs / "eth0" / "flows6")).max_entries == 1024
    assert bpfsys.map_info(dp.map("flows").map_fd).max_entries == 4096


def test_a_restart_creates_flows6_anew_at_its_new_size_while_no_ipv6_service_is_programmed(bpffs, loaded):
    # An IPv4-only pool (flows6 at the minimum) gains its first IPv6 service.
    first = loaded(Settings(maglev_size=251, flow_table_size=4096, flow_table_size6=1024), bpffs / "eth0")
    first.map("flows")[IPV4_FLOW] = structs.FlowValue(7, 3)
    first.bpf.cleanup()
    second = loaded(Settings(maglev_size=251, flow_table_size=4096, flow_table_size6=4096), bpffs / "eth0")
    assert second.adopted
    assert ("flows6 (the IPv6 flow table) is created anew with 4096 entries instead of the pinned 1024: "
            "no IPv6 service was programmed, so no flow used it") in second.notes
    assert bpfsys.map_info(second.map("flows6").map_fd).max_entries == 4096
    assert bpfsys.pinned_map_info(str(bpffs / "eth0" / "flows6")).max_entries == 4096
    value = second.map("flows")[IPV4_FLOW]                      # the IPv4 flows are kept
    assert (value.backend_id, value.service_id) == (7, 3)


def test_a_restart_refuses_to_resize_flows6_while_an_ipv6_service_is_programmed(bpffs, loaded):
    from xdplb.dataplane import LoadError

    first = loaded(Settings(maglev_size=251, flow_table_size=4096, flow_table_size6=4096), bpffs / "eth0")
    first.map("services6")[structs.ServiceKey6.of("fd00::100", 104, "tcp")] = structs.ServiceInfo(1, 0, 0, 0)
    first.bpf.cleanup()
    with pytest.raises(LoadError) as refused:
        loaded(Settings(maglev_size=251, flow_table_size=4096, flow_table_size6=1024), bpffs / "eth0")
    message = str(refused.value)
    # flow_table_size6 = 1024 is set explicitly: refused, naming only steps a
    # start can take (no controller runs to reload a pool first).
    assert "flows6: pinned type/key/value/entries/flags" in message
    assert ("flows6 (the IPv6 flow table) changes size across a restart only while no IPv6 service is "
            "programmed, and the pinned services6 holds some: set flow_table_size6 = 4096 (or remove it) to start "
            "with the pinned table; to resize it, then reload a pool without IPv6 services and restart with the "
            "new size") in message
    assert bpfsys.pinned_map_info(str(bpffs / "eth0" / "flows6")).max_entries == 4096   # left as it was


POOL4_ONLY = """\
[xdplb]
maglev_size = 251
flow_table_size = 4096

[[service]]
name = "dicom"
vip = "10.0.0.100"
port = 104

  [[service.backend]]
  name = "pacs-a"
  address = "10.0.0.11"
"""


def test_a_restart_with_a_pool_that_lost_its_ipv6_services_adopts_the_pinned_flows6(bpffs, loaded):
    # The last IPv6 service was removed from the pool on disk (a reload the
    # running controller accepted, or an edit before a crash): flow_table_size6
    # is unset, so the pool implies 1024 entries; services6 still holds the
    # IPv6 service, so flows6 cannot be replaced. The start keeps it as it is.
    settings = parse_pool(POOL4_ONLY).settings
    assert settings.flow_table_size6 == 1024 and settings.flows6_size_implied
    first = loaded(Settings(maglev_size=251, flow_table_size=4096, flow_table_size6=4096), bpffs / "eth0")
    service6 = structs.ServiceKey6.of("fd00::100", 104, "tcp")
    first.map("services6")[service6] = structs.ServiceInfo(1, 0, 0, 0)
    first.map("flows")[IPV4_FLOW] = structs.FlowValue(7, 3)
    first.bpf.cleanup()
    second = loaded(settings, bpffs / "eth0")
    assert second.adopted
    assert ("flows6 (the IPv6 flow table) keeps its pinned 4096 entries instead of 1024: the pinned services6 "
            "still holds IPv6 services, and flow_table_size6 is unset; it is resized at a restart once none is "
            "programmed") in second.notes
    assert second.settings.flow_table_size6 == 4096                               # what the program was built with
    assert bpfsys.map_info(second.map("flows6").map_fd).max_entries == 4096
    assert bpfsys.pinned_map_info(str(bpffs / "eth0" / "flows6")).max_entries == 4096
    value = second.map("flows")[IPV4_FLOW]                                      # the IPv4 flows are kept
    assert (value.backend_id, value.service_id) == (7, 3)
    assert service6 in second.map("services6")
    # Once the IPv6 service is gone from services6, the next restart shrinks flows6.
    del second.map("services6")[service6]
    second.bpf.cleanup()
    third = loaded(settings, bpffs / "eth0")
    assert bpfsys.map_info(third.map("flows6").map_fd).max_entries == 1024
    value = third.map("flows")[IPV4_FLOW]
    assert (value.backend_id, value.service_id) == (7, 3)


def test_a_refused_restart_leaves_an_idle_flows6_pinned_as_it_was(bpffs, loaded):
    # flows6 could be replaced, but maglev_size changed too: the start is
    # refused, and a refused start changes nothing.
    from xdplb.dataplane import LoadError

    loaded(Settings(maglev_size=251, flow_table_size=4096, flow_table_size6=1024), bpffs / "eth0").bpf.cleanup()
    with pytest.raises(LoadError, match=r"maglev_tables: pinned"):
        loaded(Settings(maglev_size=509, flow_table_size=4096, flow_table_size6=4096), bpffs / "eth0")
    assert bpfsys.pinned_map_info(str(bpffs / "eth0" / "flows6")).max_entries == 1024
