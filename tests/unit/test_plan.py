"""The planner: which map writes, in which order, and what the kernel holds after.

Every plan is also applied to tests/fakes.py's FakeDataplane, so the tests can
look at the maps as a packet would see them (the live half of a service's
Maglev table) and not only at the list of writes.
"""
from __future__ import annotations

import sys
from ipaddress import IPv4Address
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for fakes.py

from fakes import FakeDataplane  # noqa: E402

from xdplb.config import Settings  # noqa: E402
from xdplb.plan import (  # noqa: E402
    Applied,
    BackendState,
    ClearBackend,
    DelService,
    DelVip,
    Desired,
    PlanError,
    PutBackend,
    PutService,
    PutTable,
    PutVip,
    ServiceState,
    SetConfig,
    ZeroCounters,
    plan,
)
from xdplb.structs import F_SVC_CLIENT_PERSIST  # noqa: E402

GW_MAC = bytes.fromhex("02000a0a0001")
VIP = IPv4Address("10.10.0.100")
VIP2 = IPv4Address("10.10.0.200")
SIZE = 251


def mac_of(i: int) -> bytes:
    return bytes([2, 0, 10, 10, 0, i])


def addr(i: int) -> IPv4Address:
    return IPv4Address(f"10.10.0.{i}")


def be(i: int, weight: int = 1, healthy: bool = True, mac: bytes | None | bool = True) -> BackendState:
    if mac is True:
        mac = mac_of(i)
    return BackendState(f"pacs-{i}", addr(i), weight, mac or None, healthy)


def svc(name: str, backends, vip=VIP, port: int = 104, protocol: str = "tcp", persistence: str = "flow") -> ServiceState:
    return ServiceState(name, vip, port, protocol, persistence, tuple(backends))


def desired(*services, size: int = SIZE, max_services: int = 8, max_backends: int = 64, seed: int = 7) -> Desired:
    return Desired(tuple(services), GW_MAC, seed, size, max_services, max_backends)


class Kernel:
    """A FakeDataplane plus the Applied state the planner keeps for it."""

    def __init__(self, size: int = SIZE, max_services: int = 8, max_backends: int = 64):
        self.dp = FakeDataplane(Settings(maglev_size=size, max_services=max_services, max_backends=max_backends))
        self.applied = Applied()

    def step(self, d: Desired):
        result = plan(self.applied, d)
        self.dp.apply(result.ops)
        self.applied = result.applied
        self.check_consistent()
        return result

    def check_consistent(self) -> None:
        """What the planner believes the kernel holds is what the fake holds."""
        keys = {a.key for a in self.applied.services.values()}
        assert set(self.dp.services) == keys
        for a in self.applied.services.values():
            assert self.dp.services[a.key] == (a.id, a.flags, a.half)
            assert self.dp.live_table(a.key) == a.table
        written = {b.id: b for b in self.applied.backends.values() if b.mac is not None}
        assert set(self.dp.backends) == set(written)
        for bid, b in written.items():
            assert self.dp.backends[bid] == (b.service_id, b.address, b.mac, b.up)
        assert self.dp.vips == set(self.applied.vips)

    def live(self, key) -> dict:
        """Address -> slots in the live table of key."""
        return dict(self.dp.live_backends(key))

    def backend_id(self, service: str, i: int) -> int:
        return self.applied.backends[(service, str(addr(i)))].id


def index_of(ops, pred) -> list[int]:
    return [n for n, op in enumerate(ops) if pred(op)]


# ---- a fresh plan -----------------------------------------------------------

PHASE = {SetConfig: 0, ZeroCounters: 1, PutBackend: 1, PutTable: 2, PutService: 3, PutVip: 4,
         DelService: 5, ClearBackend: 6, DelVip: 7}


def test_fresh_plan_writes_config_counters_backends_tables_services_vips_in_order():
    k = Kernel()
    d = desired(
        svc("dicom", [be(11), be(12), be(13)]),
        svc("web", [be(11), be(12)], port=80, persistence="client"),
        svc("other", [be(21)], vip=VIP2),
    )
    ops = k.step(d).ops

    assert ops[0] == SetConfig(GW_MAC, 7)
    phases = [PHASE[type(op)] for op in ops]
    assert phases == sorted(phases), [type(op).__name__ for op in ops]
    assert set(phases) == {0, 1, 2, 3, 4}  # nothing deleted on a fresh start

    zeros = [op for op in ops if isinstance(op, ZeroCounters)]
    assert sorted(op.id for op in zeros if op.kind == "service") == [0, 1, 2]
    assert sorted(op.id for op in zeros if op.kind == "backend") == [1, 2, 3, 4, 5, 6]
    # Each new id's counters are zeroed before anything names that id.
    for op in ops:
        if isinstance(op, PutBackend):
            assert ops.index(ZeroCounters("backend", op.id)) < ops.index(op)
            assert ops.index(ZeroCounters("service", op.service_id)) < ops.index(op)

    tables = [op for op in ops if isinstance(op, PutTable)]
    services = [op for op in ops if isinstance(op, PutService)]
    assert [op.half for op in tables] == [0, 0, 0]
    assert [op.half for op in services] == [0, 0, 0]
    assert {op.service_id for op in tables} == {op.id for op in services} == {0, 1, 2}
    assert [op for op in ops if isinstance(op, PutVip)] == [PutVip(VIP), PutVip(VIP2)]
    assert {op.port: op.flags for op in services} == {104: 0, 80: F_SVC_CLIENT_PERSIST}

    # What a packet sees: each service balanced over exactly its own backends.
    assert set(k.live((VIP, 104, "tcp"))) == {addr(11), addr(12), addr(13)}
    assert set(k.live((VIP, 80, "tcp"))) == {addr(11), addr(12)}
    assert set(k.live((VIP2, 104, "tcp"))) == {addr(21)}
    assert sum(k.live((VIP, 104, "tcp")).values()) == SIZE  # no empty slot
    assert k.dp.config[:3] == (GW_MAC, 7, False)
    # The same address behind two services is two backends with two ids.
    assert k.backend_id("dicom", 11) != k.backend_id("web", 11)


def test_same_desired_state_twice_plans_nothing():
    k = Kernel()
    d = desired(svc("dicom", [be(11), be(12, weight=0), be(13, healthy=False), be(14, mac=None)]),
                svc("web", [be(11)], port=80))
    first = k.step(d)
    second = plan(first.applied, d)
    assert second.ops == ()
    assert second.rebuilt == ()
    assert second.applied == first.applied
    # A changed hash seed rewrites the config and nothing else.
    third = plan(first.applied, desired(*d.services, seed=8))
    assert third.ops == (SetConfig(GW_MAC, 8),)


# ---- health changes --------------------------------------------------------

def test_backend_going_down_rebuilds_only_its_service_into_the_other_half():
    k = Kernel()
    healthy = desired(svc("dicom", [be(11), be(12), be(13)]), svc("web", [be(21), be(22)], port=80))
    k.step(healthy)
    web_before = k.dp.live_table((VIP, 80, "tcp"))
    dicom_id = k.applied.services["dicom"].id
    b12 = k.backend_id("dicom", 12)
    old_half0 = k.dp.tables[(dicom_id, 0)]

    result = k.step(desired(svc("dicom", [be(11), be(12, healthy=False), be(13)]),
                            svc("web", [be(21), be(22)], port=80)))
    ops = result.ops
    assert result.rebuilt == ("dicom",)
    assert [type(op) for op in ops] == [PutBackend, PutTable, PutService]
    down, table, flip = ops
    assert down == PutBackend(b12, dicom_id, addr(12), mac_of(12), False)
    assert (table.service_id, table.half) == (dicom_id, 1)
    assert flip == PutService(VIP, 104, "tcp", dicom_id, 0, 1)
    assert b12 not in table.slots
    assert set(k.live((VIP, 104, "tcp"))) == {addr(11), addr(13)}
    assert k.dp.tables[(dicom_id, 0)] == old_half0  # the idle half is left as it was
    assert k.dp.live_table((VIP, 80, "tcp")) == web_before

    # Back up: rebuilt again, into half 0, with the same table as at first.
    back = k.step(healthy)
    assert [type(op) for op in back.ops] == [PutBackend, PutTable, PutService]
    assert back.ops[0].up is True and back.ops[2].half == 0
    assert k.dp.live_table((VIP, 104, "tcp")) == old_half0


def test_backend_down_is_written_before_the_table_flip():
    k = Kernel()
    k.step(desired(svc("dicom", [be(11), be(12)])))
    ops = k.step(desired(svc("dicom", [be(11), be(12, healthy=False)]))).ops
    (down,) = index_of(ops, lambda op: isinstance(op, PutBackend) and not op.up)
    (table,) = index_of(ops, lambda op: isinstance(op, PutTable))
    (flip,) = index_of(ops, lambda op: isinstance(op, PutService))
    assert down < table < flip


def test_drained_backend_stays_up_but_owns_no_slots():
    k = Kernel()
    ops = k.step(desired(svc("dicom", [be(11), be(12, weight=0)]))).ops
    b12 = k.backend_id("dicom", 12)
    assert PutBackend(b12, 0, addr(12), mac_of(12), True) in ops
    assert k.dp.backends[b12][3] is True
    assert k.live((VIP, 104, "tcp")) == {addr(11): SIZE}

    # Draining a backend that had slots: the table is rebuilt without it, the
    # backend entry is not touched (existing flows keep going to it).
    k2 = Kernel()
    k2.step(desired(svc("dicom", [be(11), be(12)])))
    b12 = k2.backend_id("dicom", 12)
    ops = k2.step(desired(svc("dicom", [be(11), be(12, weight=0)]))).ops
    assert [type(op) for op in ops] == [PutTable, PutService]
    assert k2.dp.backends[b12][3] is True
    assert k2.live((VIP, 104, "tcp")) == {addr(11): SIZE}


def test_weights_share_the_table():
    k = Kernel(size=1009)
    k.step(desired(svc("dicom", [be(11, weight=3), be(12, weight=1)]), size=1009))
    live = k.live((VIP, 104, "tcp"))
    assert abs(live[addr(11)] / 1009 - 0.75) < 0.02


def test_unresolved_mac_backend_is_not_written_nor_in_the_table():
    k = Kernel()
    ops = k.step(desired(svc("dicom", [be(11), be(12, mac=None)]))).ops
    b12 = k.backend_id("dicom", 12)
    assert not any(isinstance(op, PutBackend) and op.id == b12 for op in ops)
    assert b12 not in k.dp.backends
    assert set(k.live((VIP, 104, "tcp"))) == {addr(11)}

    # Resolved later: written, then put in the table.
    ops = k.step(desired(svc("dicom", [be(11), be(12)]))).ops
    assert [type(op) for op in ops] == [PutBackend, PutTable, PutService]
    assert ops[0] == PutBackend(b12, 0, addr(12), mac_of(12), True)
    assert set(k.live((VIP, 104, "tcp"))) == {addr(11), addr(12)}

    # Its MAC lost again: marked down with the last known MAC, out of the table.
    ops = k.step(desired(svc("dicom", [be(11), be(12, mac=None)]))).ops
    assert ops[0] == PutBackend(b12, 0, addr(12), mac_of(12), False)
    assert set(k.live((VIP, 104, "tcp"))) == {addr(11)}


def test_mac_change_rewrites_the_backend_only():
    k = Kernel()
    k.step(desired(svc("dicom", [be(11), be(12)])))
    b12 = k.backend_id("dicom", 12)
    new_mac = bytes.fromhex("02aabbccddee")
    ops = k.step(desired(svc("dicom", [be(11), be(12, mac=new_mac)]))).ops
    assert ops == (PutBackend(b12, 0, addr(12), new_mac, True),)


# ---- removals and identity -------------------------------------------------

def test_removed_service_is_deleted_after_everything_else_and_its_backends_cleared():
    k = Kernel()
    k.step(desired(svc("dicom", [be(11), be(12)]), svc("web", [be(21), be(22)], port=80)))
    web_ids = {k.backend_id("web", 21), k.backend_id("web", 22)}
    # Remove "web" while "dicom" gains a backend, so there are other writes.
    ops = k.step(desired(svc("dicom", [be(11), be(12), be(13)]))).ops

    (deleted,) = index_of(ops, lambda op: isinstance(op, DelService))
    assert ops[deleted] == DelService(VIP, 80, "tcp")
    others = index_of(ops, lambda op: not isinstance(op, (DelService, ClearBackend, DelVip)))
    assert others and max(others) < deleted
    cleared = index_of(ops, lambda op: isinstance(op, ClearBackend))
    assert {ops[n].id for n in cleared} == web_ids
    assert min(cleared) > deleted
    assert not any(isinstance(op, DelVip) for op in ops)  # VIP still used by dicom
    assert (VIP, 80, "tcp") not in k.dp.services
    assert not web_ids & set(k.dp.backends)
    assert set(k.live((VIP, 104, "tcp"))) == {addr(11), addr(12), addr(13)}


def test_removed_backend_id_is_not_reused_by_the_next_new_backend():
    k = Kernel()
    k.step(desired(svc("dicom", [be(11), be(12), be(13)])))
    assert [k.backend_id("dicom", i) for i in (11, 12, 13)] == [1, 2, 3]
    ops = k.step(desired(svc("dicom", [be(11), be(13)]))).ops
    assert ClearBackend(2) in ops
    k.step(desired(svc("dicom", [be(11), be(13), be(14)])))
    assert k.backend_id("dicom", 14) == 4
    # Removed and added in the same plan: the removed id is still reserved.
    k.step(desired(svc("dicom", [be(11), be(15)])))
    assert k.backend_id("dicom", 15) == 5
    assert set(k.dp.backends) == {1, 5}  # 3 (pacs-13) and 4 (pacs-14) were cleared


def test_backend_ids_wrap_past_max_backends_to_the_lowest_free_id():
    k = Kernel(max_backends=5)  # ids 1..4
    d = lambda *ids: desired(svc("dicom", [be(i) for i in ids]), max_backends=5)  # noqa: E731
    k.step(d(11, 12, 13))
    k.step(d(12, 13))          # frees id 1
    k.step(d(12, 13, 14))      # cursor is at 4: takes 4, not 1
    assert k.backend_id("dicom", 14) == 4
    k.step(d(12, 13, 14, 15))  # the cursor wrapped: 1 is next, and free
    assert k.backend_id("dicom", 15) == 1
    k.step(d(13, 14, 15))      # frees 2; the cursor is at 2
    k.step(d(13, 14, 15, 16))  # takes 2; the cursor moves to 3
    assert k.backend_id("dicom", 16) == 2
    k.step(d(13, 14, 16))      # frees 1; 3 and 4 are in use
    k.step(d(13, 14, 16, 17))  # from the cursor 3: 3, 4 in use, wraps to 1
    assert k.backend_id("dicom", 17) == 1


def test_renaming_a_backend_moves_nothing():
    k = Kernel()
    k.step(desired(svc("dicom", [be(11), be(12)])))
    renamed = BackendState("pacs-twelve", addr(12), 1, mac_of(12), True)
    assert plan(k.applied, desired(svc("dicom", [be(11), renamed]))).ops == ()


def test_service_whose_port_or_vip_changes_is_deleted_and_recreated():
    k = Kernel()
    k.step(desired(svc("dicom", [be(11), be(12)])))
    old_sid = k.applied.services["dicom"].id
    old_ids = {k.backend_id("dicom", 11), k.backend_id("dicom", 12)}

    ops = k.step(desired(svc("dicom", [be(11), be(12)], port=11112))).ops
    new_sid = k.applied.services["dicom"].id
    new_ids = {k.backend_id("dicom", 11), k.backend_id("dicom", 12)}
    assert new_sid != old_sid
    assert not new_ids & old_ids
    assert PutService(VIP, 11112, "tcp", new_sid, 0, 0) in ops
    assert ops.index(PutService(VIP, 11112, "tcp", new_sid, 0, 0)) < ops.index(DelService(VIP, 104, "tcp"))
    assert {op.id for op in ops if isinstance(op, ClearBackend)} == old_ids
    assert set(k.dp.services) == {(VIP, 11112, "tcp")}
    assert set(k.live((VIP, 11112, "tcp"))) == {addr(11), addr(12)}

    ops = k.step(desired(svc("dicom", [be(11), be(12)], vip=VIP2, port=11112))).ops
    assert PutVip(VIP2) in ops and DelVip(VIP) in ops
    assert ops.index(DelVip(VIP)) > ops.index(DelService(VIP, 11112, "tcp"))
    assert set(k.dp.services) == {(VIP2, 11112, "tcp")}
    assert k.dp.vips == {VIP2}


def test_service_renamed_under_the_same_key_stays_in_the_map():
    k = Kernel()
    k.step(desired(svc("dicom", [be(11), be(12)])))
    k.step(desired(svc("dicom-main", [be(11), be(12)])))
    assert set(k.dp.services) == {(VIP, 104, "tcp")}
    assert set(k.live((VIP, 104, "tcp"))) == {addr(11), addr(12)}


def test_two_services_swapping_ports_both_stay_in_the_map():
    k = Kernel()
    k.step(desired(svc("a", [be(11)], port=104), svc("b", [be(12)], port=80)))
    k.step(desired(svc("a", [be(11)], port=80), svc("b", [be(12)], port=104)))
    assert set(k.live((VIP, 80, "tcp"))) == {addr(11)}
    assert set(k.live((VIP, 104, "tcp"))) == {addr(12)}


def test_shared_vip_is_removed_only_with_its_last_service():
    k = Kernel()
    a = svc("a", [be(11)], port=104)
    b = svc("b", [be(11)], port=80)
    c = svc("c", [be(11)], vip=VIP2)
    ops = k.step(desired(a, b, c)).ops
    assert [op for op in ops if isinstance(op, PutVip)] == [PutVip(VIP), PutVip(VIP2)]

    ops = k.step(desired(b, c)).ops
    assert not any(isinstance(op, (DelVip, PutVip)) for op in ops)
    assert k.dp.vips == {VIP, VIP2}

    ops = k.step(desired(c)).ops
    assert [op for op in ops if isinstance(op, DelVip)] == [DelVip(VIP)]
    assert ops[-1] == DelVip(VIP)
    assert k.dp.vips == {VIP2}


# ---- capacity --------------------------------------------------------------

def test_more_services_than_max_services_is_a_plan_error():
    with pytest.raises(PlanError, match="max_services"):
        plan(Applied(), desired(svc("a", [be(11)]), svc("b", [be(12)], port=80), svc("c", [be(13)], port=81),
                                max_services=2))
    # Exactly max_services fits.
    plan(Applied(), desired(svc("a", [be(11)]), svc("b", [be(12)], port=80), max_services=2))


def test_more_backends_than_max_backends_allows_is_a_plan_error():
    # max_backends 4: id 0 is reserved, so three backends fit and four do not.
    plan(Applied(), desired(svc("a", [be(11), be(12), be(13)]), max_backends=4))
    with pytest.raises(PlanError, match="max_backends"):
        plan(Applied(), desired(svc("a", [be(11), be(12), be(13), be(14)]), max_backends=4))


def test_removed_ids_stay_reserved_until_the_end_of_the_plan():
    # With every backend id in use, replacing a backend needs one more id for
    # the length of the plan: it does not fit.
    k = Kernel(max_backends=3)
    k.step(desired(svc("a", [be(11), be(12)]), max_backends=3))
    with pytest.raises(PlanError, match="backend ids"):
        plan(k.applied, desired(svc("a", [be(11), be(13)]), max_backends=3))


# ---- Maglev disruption -----------------------------------------------------

@pytest.mark.parametrize("n", [3, 4, 8])
def test_adding_a_backend_moves_only_the_slots_it_takes(n):
    size = 65537  # the default; the <= 1% bound needs a table >> backends
    k = Kernel(size=size)
    key = (VIP, 104, "tcp")
    k.step(desired(svc("dicom", [be(10 + i) for i in range(n)]), size=size))
    old = k.dp.live_table(key)
    k.step(desired(svc("dicom", [be(10 + i) for i in range(n + 1)]), size=size))
    new = k.dp.live_table(key)
    newcomer = k.backend_id("dicom", 10 + n)

    moved = [n_ for n_ in range(size) if old[n_] != new[n_]]
    to_others = [n_ for n_ in moved if new[n_] != newcomer]
    assert new.count(newcomer) == pytest.approx(size / (n + 1), rel=0.05)
    assert len(to_others) <= 0.01 * size
    # And every slot the newcomer owns is one that moved (it had none before).
    assert new.count(newcomer) == len(moved) - len(to_others)


def test_removing_a_backend_moves_only_its_slots():
    size = 65537
    k = Kernel(size=size)
    key = (VIP, 104, "tcp")
    k.step(desired(svc("dicom", [be(11), be(12), be(13), be(14), be(15)]), size=size))
    old = k.dp.live_table(key)
    gone = k.backend_id("dicom", 13)
    k.step(desired(svc("dicom", [be(11), be(12), be(13, healthy=False), be(14), be(15)]), size=size))
    new = k.dp.live_table(key)
    assert gone not in new
    moved_others = sum(1 for a, b in zip(old, new) if a != b and a != gone)
    assert moved_others <= 0.01 * size
