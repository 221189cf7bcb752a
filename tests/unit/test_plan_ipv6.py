"""Planning IPv6 and dual-stack pools (pure)."""
from __future__ import annotations

import ipaddress

from xdplb import plan

MAC = bytes.fromhex("02000a0a000a")
VIP4, VIP6 = ipaddress.IPv4Address("10.10.0.100"), ipaddress.IPv6Address("2001:db8::100")


def _be(addr, i):
    return plan.BackendState(f"be{i}", ipaddress.ip_address(addr), 1, bytes([2, 0, 0, 0, 0, i]), True)


def _desired(prefix=128):
    return plan.Desired((
        plan.ServiceState("dicom4", VIP4, 104, "tcp", "flow", (_be("10.10.0.11", 11), _be("10.10.0.12", 12))),
        plan.ServiceState("dicom6", VIP6, 104, "tcp", "client", (_be("2001:db8::11", 21), _be("2001:db8::12", 22)),
                          client_prefix=prefix),
    ), MAC, 0, 251, 64, 4096)


def test_a_dual_stack_pool_plans_both_vips_and_the_client_prefix():
    result = plan.plan(plan.Applied(), _desired(64))
    assert [op.address for op in result.ops if isinstance(op, plan.PutVip)] == [VIP4, VIP6]
    put6 = next(op for op in result.ops if isinstance(op, plan.PutService) and op.vip == VIP6)
    assert put6.client_prefix == 64
    assert result.applied.services["dicom6"].client_prefix == 64


def test_a_client_prefix_change_is_written_into_the_idle_half_and_flipped():
    first = plan.plan(plan.Applied(), _desired(128))
    again = plan.plan(first.applied, _desired(128))
    assert again.ops == ()
    changed = plan.plan(first.applied, _desired(56))
    half = first.applied.services["dicom6"].half
    assert [op.half for op in changed.ops if isinstance(op, plan.PutTable)] == [1 - half]
    put = [op for op in changed.ops if isinstance(op, plan.PutService)]
    assert [(op.vip, op.half, op.client_prefix) for op in put] == [(VIP6, 1 - half, 56)]
    assert changed.rebuilt == ("dicom6",)


def test_removing_the_ipv6_half_of_a_dual_stack_pool_deletes_its_vip():
    first = plan.plan(plan.Applied(), _desired())
    only4 = plan.Desired(_desired().services[:1], MAC, 0, 251, 64, 4096)
    result = plan.plan(first.applied, only4)
    assert [op.address for op in result.ops if isinstance(op, plan.DelVip)] == [VIP6]
    assert [op.vip for op in result.ops if isinstance(op, plan.DelService)] == [VIP6]
