"""IPv6 in a program of its own, reached by a tail call (bpf/xdplb6.h).

The IPv4 program (xdplb_ingress) hands every IPv6 frame to xdplb_ingress6
through the `tail_calls` program array after the Ethernet step, so it holds
no IPv6 code: its instructions load none of the IPv6 maps. Every IPv6 packet
test (test_ipv6.py, test_fuzz.py) runs the IPv4 program, so it goes through
the tail call. An empty slot passes the frame to the stack, counted.

The kernel empties a program array when its last descriptor or pin goes,
and an attached program does not hold its array that way: the controller
pins it at attach, so the IPv6 path outlives the controller (a hitless
restart), as the maps do.

BPF_PROG_TEST_RUN on the real program, loaded as `xdplb attach` loads it;
the pinning test also attaches it in generic mode to a veth in a network
namespace of its own (no traffic: the frames go through BPF_PROG_TEST_RUN).
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import time

import pytest

from tools.bench.fibnet import FibNet
from xdplb import bpfsys, structs
from xdplb.config import Settings

from . import packets as P
from . import packets6 as Q
from .conftest import Harness

pytestmark = pytest.mark.root

IPV6_MAPS = {"flows6", "services6", "service_ids6", "vips6", "events6", "nat_backends6", "nat_reverse6", "nat_addrs6"}


def _insn_map_names(prog_fd: int) -> set[str]:
    names = set()
    for map_id in bpfsys.prog_insn_map_ids(prog_fd):
        fd = bpfsys.fd_by_id(bpfsys.BPF_MAP_GET_FD_BY_ID, map_id)
        try:
            names.add(bpfsys.map_info(fd).name)
        finally:
            os.close(fd)
    return names


def test_the_ipv4_program_refers_to_no_ipv6_map(dataplane):
    ipv4 = _insn_map_names(dataplane.prog_fd)
    # The reading is real: the IPv4 program's own maps are found.
    assert {"flows", "services", "service_ids", "backends", "lb_config"} <= ipv4, ipv4
    assert ipv4 & IPV6_MAPS == set(), f"the IPv4 program loads IPv6 maps: {sorted(ipv4 & IPV6_MAPS)}"


def test_the_ipv4_program_is_the_build_without_ipv6_plus_the_tail_call(dataplane):
    from xdplb.dataplane import BccDataplane

    alone = BccDataplane(dataplane.settings, extra_defines={"XDPLB_IPV6_PATH": 0})
    try:
        assert alone.fn6 is None
        without, with_ipv6 = bpfsys.prog_insn_count(alone.prog_fd), bpfsys.prog_insn_count(dataplane.prog_fd)
    finally:
        alone.bpf.cleanup()
    # The tail call and its miss counter replace one counted pass: a few instructions, where
    # the IPv6 steps inlined into this program took about 2,500 (5,610 against 3,047).
    assert without > 1000 and 0 <= with_ipv6 - without <= 16, (with_ipv6, without)


def test_an_empty_ipv6_slot_passes_the_frame_to_the_stack_and_counts_it(harness):
    harness.program(Q.dual_stack_services())
    frame, ipv4 = bytes(Q.syn6()), bytes(P.syn(104))
    slots = harness.dp.map("tail_calls")
    key = slots.Key(structs.PROG_IPV6)
    assert harness.run(frame).action_name == "tx"   # balanced by the IPv6 program
    before = harness.stats()
    del slots[key]
    try:
        verdict, ipv4_verdict = harness.run(frame), harness.run(ipv4)
    finally:
        slots[key] = slots.Leaf(harness.dp.fn6.fd)
    after = harness.stats()
    assert verdict.action_name == "pass" and verdict.data == frame
    moved = {k: after.not_forwarded[k] - v for k, v in before.not_forwarded.items() if after.not_forwarded[k] != v}
    assert moved == {"no_ipv6_program": 1}, moved
    assert after.events["flow_new"] == before.events["flow_new"] + 1   # the IPv4 SYN only
    assert ipv4_verdict.action_name == "tx"   # IPv4 never needs the slot
    assert harness.run(frame).action_name == "tx"


@pytest.fixture
def bpffs(tmp_path):
    mount = tmp_path / "bpffs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _verdicts_until_pass(prog_fd: int, frame: bytes, seconds: float = 5.0) -> list[int]:
    """Run `frame` until the program passes it (the kernel empties an array in deferred work)."""
    seen, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen.append(bpfsys.prog_test_run(prog_fd, frame).retval)
        if seen[-1] == structs.XDP_PASS:
            break
        time.sleep(0.01)
    return seen


class _Loads:
    """BccDataplane loads sharing one pin directory, on a namespace with a
    veth t0 (generic XDP goes there); close() drops every loader's
    descriptors, as when the controller exits."""

    def __init__(self, net: FibNet, settings, pin_dir):
        self.net, self.settings, self.pin_dir, self.all = net, settings, pin_dir, []

    def load(self, **kwargs):
        from xdplb.dataplane import BccDataplane

        self.all.append(BccDataplane(self.settings, pin_dir=self.pin_dir, **kwargs))
        return self.all[-1]

    def first_attached(self):
        """A first load, programmed with the dual-stack services, attached to t0."""
        first = self.load()
        Harness(first, self.settings).program(Q.dual_stack_services())
        with self.net.inside():
            first.attach("t0", "generic")
        return first

    def close(self):
        for dp in self.all:
            dp.bpf.cleanup()
        self.all.clear()


@contextlib.contextmanager
def _veth_loads(name: str, settings, pin_dir):
    net = FibNet(f"{name}{os.getpid() % 100000}")
    loads = _Loads(net, settings, pin_dir)
    try:
        net.ip("link", "add", "t0", "type", "veth", "peer", "name", "t0p")
        yield loads
    finally:
        loads.close()
        net.close()


def test_the_attached_program_keeps_its_ipv6_path_after_the_controller_exits(bpffs, dataplane):
    settings, pin_dir = dataplane.settings, bpffs / "eth0"
    pin = pin_dir / "tail_calls"
    with _veth_loads("xdplbtail", settings, pin_dir) as loads:
        loads.first_attached()
        # A restart: the next load adopts the maps, brings its own array and replaces the program.
        second = loads.load()
        assert second.adopted
        with loads.net.inside():
            second.attach("t0", "generic", replace=True)
        assert sorted(p.name for p in pin_dir.iterdir() if p.name.startswith("tail_calls")) == ["tail_calls"]
        assert bpfsys.pinned_map_info(str(pin)).id == bpfsys.map_info(second.map("tail_calls").map_fd).id
        attached = bpfsys.fd_by_id(bpfsys.BPF_PROG_GET_FD_BY_ID, bpfsys.prog_id(second.prog_fd))
        loads.close()   # every descriptor of the loaders goes, as when the controller exits
        try:
            frame = bytes(Q.syn6())
            assert _verdicts_until_pass(attached, frame, seconds=0.5)[-1] == structs.XDP_TX
            # What the pin is for: without it the kernel empties the array.
            pin.unlink()
            assert _verdicts_until_pass(attached, frame)[-1] == structs.XDP_PASS
        finally:
            os.close(attached)
        assert loads.load().read_stats([], []).not_forwarded["no_ipv6_program"] == 1   # the pinned counter


def test_a_start_after_a_controller_died_between_attach_and_rename_keeps_the_running_ipv6_path(bpffs, dataplane):
    # The earlier controller attached its program and died before renaming
    # tail_calls_new over tail_calls: that staging pin alone holds the
    # running program's array. The next start must not delete it, even when
    # its own attach then fails. Generic XDP on a veth in a namespace of its own.
    from xdplb.dataplane import MODE_FLAGS, LoadError

    settings, pin_dir = dataplane.settings, bpffs / "eth0"
    pin = pin_dir / "tail_calls"

    def pins():
        return sorted(p.name for p in pin_dir.iterdir() if p.name.startswith("tail_calls"))

    with _veth_loads("xdplbstg", settings, pin_dir) as loads:
        net, load = loads.net, loads.load
        loads.first_attached()
        second = load()
        with net.inside():   # attach() up to its attach, then the controller dies
            second._stage_tail_calls_pin()
            second._BPF.attach_xdp(b"t0", second.fn, MODE_FLAGS["generic"])
        running_id = bpfsys.prog_id(second.prog_fd)
        running_array = bpfsys.map_info(second.map("tail_calls").map_fd).id
        attached = bpfsys.fd_by_id(bpfsys.BPF_PROG_GET_FD_BY_ID, running_id)
        loads.close()
        try:
            frame = bytes(Q.syn6())
            assert pins() == ["tail_calls", "tail_calls_new"]
            assert _verdicts_until_pass(attached, frame, seconds=0.5)[-1] == structs.XDP_TX
            third = load(attached_prog_id=running_id)
            assert third.adopted
            assert pins() == ["tail_calls"] and bpfsys.pinned_map_info(str(pin)).id == running_array
            assert any("held the attached program's tail_calls array" in n for n in third.notes)
            with net.inside(), pytest.raises(LoadError, match="attaching to nosuch0"):
                third.attach("nosuch0", "generic", replace=True)
            assert _verdicts_until_pass(attached, frame, seconds=0.5)[-1] == structs.XDP_TX
            assert bpfsys.pinned_map_info(str(pin)).id == running_array
            with net.inside():
                third.attach("t0", "generic", replace=True)
            assert pins() == ["tail_calls"]
            assert bpfsys.pinned_map_info(str(pin)).id == bpfsys.map_info(third.map("tail_calls").map_fd).id
        finally:
            os.close(attached)


def test_an_attach_whose_pin_rename_fails_stays_attached_and_keeps_its_staging_pin(bpffs, dataplane, caplog):
    # The rename comes after a successful attach: it must not fail the attach
    # (the daemon would try another mode with the program attached).
    # A non-empty directory where the pin goes makes the rename fail. Generic XDP on a veth.
    settings, pin_dir = dataplane.settings, bpffs / "eth0"
    with _veth_loads("xdplbren", settings, pin_dir) as loads:
        dp = loads.load()
        (pin_dir / "tail_calls" / "blocker").mkdir(parents=True)
        with loads.net.inside():
            dp.attach("t0", "generic")
        assert dp.attached == ("t0", "generic")
        assert any("tail_calls pin could not be renamed" in r.getMessage() for r in caplog.records)
        assert bpfsys.pinned_map_info(str(pin_dir / "tail_calls_new")).id == \
            bpfsys.map_info(dp.map("tail_calls").map_fd).id


def test_a_tagged_ipv6_frame_counts_its_tag_and_its_action_once_across_both_programs(harness):
    from scapy.layers.l2 import Dot1Q, Ether

    harness.program(Q.dual_stack_services())
    plain = Q.syn6()
    tagged = bytes(Ether(src=plain[Ether].src, dst=plain[Ether].dst) / Dot1Q(vlan=42) / plain[Ether].payload)
    before = harness.stats()
    assert harness.run(tagged).action_name == "tx"
    after = harness.stats()
    assert after.events["vlan"] - before.events["vlan"] == 1
    assert after.events["flow_new"] - before.events["flow_new"] == 1
    assert {a: after.actions[a] - before.actions[a] for a in after.actions if after.actions[a] != before.actions[a]} \
        == {"tx": 1}
