"""NAT over IPv6 in the planner and the fake kernel layer: the same writes as
for IPv4 (the kernel layer picks nat_backends6 / nat_reverse6 / nat_addrs6 by
the backend's family). Pure logic and fakes, no root.

The planner is family-agnostic: these tests pin down that an IPv6 NAT
service, alone or beside an IPv4 one on the same ports, gets exactly the
writes, order and removals an IPv4 one gets. The real map writes are shown
by tests/packet/test_nat6.py against the kernel.
"""
from __future__ import annotations

import sys
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for fakes.py

from fakes import FakeDataplane  # noqa: E402

from xdplb import plan  # noqa: E402
from xdplb.config import Settings  # noqa: E402
from xdplb.structs import F_SVC_NAT  # noqa: E402

MAC = bytes.fromhex("02000a1e000b")
VIP4, VIP6 = IPv4Address("10.20.0.100"), IPv6Address("2001:db8::100")
PACS4 = ("10.30.0.11", "10.30.0.12")
PACS6 = ("2001:db8:30::11", "2001:db8:30::12")


def backends(addresses, port=4242, version=6):
    make = IPv6Address if version == 6 else IPv4Address
    return tuple(plan.BackendState(f"pacs{i}", make(a), 1, MAC, True, port) for i, a in enumerate(addresses))


def nat6(addresses=PACS6, port=4242, name="pacs6", vport=104) -> plan.ServiceState:
    return plan.ServiceState(name, VIP6, vport, "tcp", "flow", backends(addresses, port), "nat")


def nat4(addresses=PACS4, port=4242) -> plan.ServiceState:
    return plan.ServiceState("pacs4", VIP4, 104, "tcp", "flow", backends(addresses, port, 4), "nat")


def desired(*services, grace=0) -> plan.Desired:
    return plan.Desired(tuple(services), bytes(6), 0x5EED, 251, 16, 64, down_grace_ns=grace)


def reverse_of(ops) -> dict:
    return {(op.address, op.port, op.protocol): (op.vip, op.vport) for op in ops if isinstance(op, plan.PutNatReverse)}


def test_ipv6_nat_service_writes_reverse_translations_before_its_backends_and_their_ports():
    result = plan.plan(plan.Applied(), desired(nat6()))
    kinds = [type(op).__name__ for op in result.ops]
    assert kinds.index("PutNatReverse") < kinds.index("PutBackend")
    assert reverse_of(result.ops) == {(IPv6Address(a), 4242, "tcp"): (VIP6, 104) for a in PACS6}
    puts = [op for op in result.ops if isinstance(op, plan.PutBackend)]
    assert sorted((str(op.address), op.port) for op in puts) == [(a, 4242) for a in PACS6]
    (svc_op,) = [op for op in result.ops if isinstance(op, plan.PutService)]
    assert svc_op.flags & F_SVC_NAT and svc_op.vip == VIP6


def test_dual_stack_nat_keeps_each_family_apart_and_a_reload_writes_nothing():
    want = desired(nat4(), nat6())
    first = plan.plan(plan.Applied(), want)
    assert reverse_of(first.ops) == ({(IPv4Address(a), 4242, "tcp"): (VIP4, 104) for a in PACS4}
                                     | {(IPv6Address(a), 4242, "tcp"): (VIP6, 104) for a in PACS6})
    for op in first.ops:
        if isinstance(op, plan.PutNatReverse):
            assert op.address.version == op.vip.version
    assert plan.plan(first.applied, want).ops == ()


def test_removed_ipv6_nat_backend_keeps_its_reverse_translation_for_its_grace_then_loses_it():
    first = plan.plan(plan.Applied(), desired(nat6(), grace=1000), now_ns=0)
    gone = desired(nat6(PACS6[:1]), grace=1000)
    second = plan.plan(first.applied, gone, now_ns=10)
    assert not any(isinstance(op, plan.DelNatReverse) for op in second.ops)
    key = (IPv6Address(PACS6[1]), 4242, "tcp")
    assert key in second.applied.nat_reverse
    third = plan.plan(second.applied, gone, now_ns=2000)
    kinds = [type(op).__name__ for op in third.ops]
    assert kinds.index("ClearBackend") < kinds.index("DelNatReverse")
    assert [(op.address, op.port) for op in third.ops if isinstance(op, plan.DelNatReverse)] == [key[:2]]
    assert key not in third.applied.nat_reverse


def test_removing_an_ipv6_nat_service_clears_its_backends_and_reverse_translations_last():
    first = plan.plan(plan.Applied(), desired(nat4(), nat6()))
    second = plan.plan(first.applied, desired(nat4()))
    kinds = [type(op).__name__ for op in second.ops]
    assert kinds.count("ClearBackend") == 2 and kinds.count("DelNatReverse") == 2
    assert max(i for i, k in enumerate(kinds) if k == "ClearBackend") < kinds.index("DelNatReverse")
    assert {op.address for op in second.ops if isinstance(op, plan.DelNatReverse)} == {IPv6Address(a) for a in PACS6}
    assert set(second.applied.nat_reverse) == {(IPv4Address(a), 4242, "tcp") for a in PACS4}


def test_an_ipv6_backend_moved_to_another_port_rewrites_target_and_reverse_translation():
    first = plan.plan(plan.Applied(), desired(nat6()))
    moved = plan.plan(first.applied, desired(nat6(port=4243)), now_ns=5)
    assert sorted(op.port for op in moved.ops if isinstance(op, plan.PutBackend)) == [4243, 4243]
    changes = [(type(op).__name__, op.port) for op in moved.ops
               if isinstance(op, (plan.PutNatReverse, plan.DelNatReverse))]
    assert changes == [("PutNatReverse", 4243)] * 2 + [("DelNatReverse", 4242)] * 2


def test_an_ipv6_backend_moved_to_another_nat_service_is_one_put_of_the_new_value():
    """The same (address, port, protocol) behind another VIP port: one put with
    the new value (the kernel layer spaces such replacements by a grace period,
    bpf/lb_maps6.h), no deletion."""
    first = plan.plan(plan.Applied(), desired(nat6()))
    moved = plan.plan(first.applied, desired(nat6(name="pacs6-other", vport=11112)), now_ns=5)
    assert reverse_of(moved.ops) == {(IPv6Address(a), 4242, "tcp"): (VIP6, 11112) for a in PACS6}
    assert not any(isinstance(op, plan.DelNatReverse) for op in moved.ops)


def test_adopted_ipv6_nat_maps_give_the_same_state_so_a_restart_writes_nothing():
    dp = FakeDataplane(Settings(max_services=16, max_backends=64, maglev_size=251))
    want = desired(nat4(), nat6())
    first = plan.plan(plan.Applied(), want)
    dp.apply(first.ops)
    assert dp.nat_backends == {op.id: 4242 for op in first.ops if isinstance(op, plan.PutBackend)}
    adopted = plan.adopt(dp.read_state(), {s.key: s.name for s in want.services})
    again = plan.plan(adopted, want)
    assert not [op for op in again.ops if isinstance(op, (plan.PutNatReverse, plan.DelNatReverse, plan.PutBackend))]
    assert again.applied.nat_reverse == first.applied.nat_reverse


def test_the_fake_refuses_a_reverse_translation_across_families_as_the_kernel_layer_does():
    dp = FakeDataplane(Settings(max_services=16, max_backends=64, maglev_size=251))
    with pytest.raises(ValueError, match="different families"):
        dp.apply([plan.PutNatReverse(IPv6Address(PACS6[0]), 4242, "tcp", VIP4, 104)])
    assert dp.nat_reverse == {}
