"""Flow-table behaviour of the real program across table changes.

Each test picks flows whose Maglev slot changes owner between the old and the
new table, so only the flow table can explain the result.
"""
from __future__ import annotations

from dataclasses import replace

import pytest

from xdplb import structs

from . import packets as P
from .conftest import backend, default_services, mac_of, service

pytestmark = pytest.mark.root


def _backend_of(verdict) -> int:
    """Last octet of the backend a forwarded frame went to (from its dst MAC)."""
    assert verdict.action == structs.XDP_TX, verdict.action_name
    return verdict.data[5]


def test_established_flow_keeps_backend_when_table_changes(harness):
    from xdplb import flowhash, plan

    # Backend 13 leaves and a new backend 14 arrives: many slots change owner.
    changed = (service("dicom", 104, backends=(backend(11), backend(12), backend(14))),) + default_services()[1:]
    preview = plan.plan(harness.applied, plan.Desired(changed, harness.desired.mac, harness.settings.hash_seed,
                                                       harness.settings.maglev_size, 64, 4096))
    new_table = preview.applied.services["dicom"].table
    id_14 = preview.applied.backends[("dicom", "10.10.0.14")].id
    # Flows that sit on 11 or 12 now and whose slot belongs to 14 in the new table.
    sports = [
        p for p in range(20000, 40000)
        if harness.predict("dicom", "10.10.0.2", p, 104) in ("10.10.0.11", "10.10.0.12")
        and new_table[flowhash.flow_hash_v4(harness.settings.hash_seed, "10.10.0.2", "10.10.0.100", p, 104, 6)
                      % len(new_table)] == id_14
    ][:5]
    assert len(sports) == 5
    first = {p: _backend_of(harness.run(P.syn(sport=p))) for p in sports}

    result = harness.program(changed)
    assert "dicom" in result.rebuilt
    assert harness.service_state("dicom").half == 1, "the new table must go into the idle half"

    hits = harness.stats().events["flow_hit"]
    for p in sports:
        assert _backend_of(harness.run(P.ack(sport=p))) == first[p], f"flow {p} moved"
        # Without its flow entry, the same flow would now go to backend 14.
        assert harness.predict("dicom", "10.10.0.2", p, 104) == "10.10.0.14"
    assert harness.stats().events["flow_hit"] == hits + len(sports)
    # New flows do reach the new backend.
    assert 14 in {_backend_of(harness.run(P.syn(sport=p))) for p in range(41000, 41100)}


def test_drained_backend_keeps_flows_but_gets_no_new_ones(harness):
    sports = []
    for p in range(30000, 30400):
        if harness.predict("dicom", "10.10.0.2", p, 104) == "10.10.0.12":
            sports.append(p)
        if len(sports) == 5:
            break
    for p in sports:
        assert _backend_of(harness.run(P.syn(sport=p))) == 12

    drained = (service("dicom", 104, backends=(backend(11), backend(12, weight=0), backend(13))),) + default_services()[1:]
    harness.program(drained)
    for p in sports:
        assert _backend_of(harness.run(P.ack(sport=p))) == 12, "existing flow left a drained backend"
    new_choices = {_backend_of(harness.run(P.syn(sport=p))) for p in range(31000, 31200)}
    assert 12 not in new_choices
    assert new_choices == {11, 13}


def test_flow_on_a_down_backend_is_rechosen(harness):
    sport = next(p for p in range(32000, 33000) if harness.predict("dicom", "10.10.0.2", p, 104) == "10.10.0.13")
    assert _backend_of(harness.run(P.syn(sport=sport))) == 13
    before = harness.stats().events["flow_reselect"]

    down = (service("dicom", 104, backends=(backend(11), backend(12), backend(13, healthy=False))),) + default_services()[1:]
    harness.program(down)
    moved_to = _backend_of(harness.run(P.ack(sport=sport)))
    assert moved_to in (11, 12)
    assert moved_to == int(harness.predict("dicom", "10.10.0.2", sport, 104).rsplit(".", 1)[1])
    assert harness.stats().events["flow_reselect"] == before + 1
    # ...and it stays there once re-chosen, even after 13 comes back.
    harness.program(default_services())
    assert _backend_of(harness.run(P.ack(sport=sport))) == moved_to


def test_removed_backend_flow_is_rechosen(harness):
    sport = next(p for p in range(33000, 34000) if harness.predict("dicom", "10.10.0.2", p, 104) == "10.10.0.11")
    assert _backend_of(harness.run(P.syn(sport=sport))) == 11
    harness.program((service("dicom", 104, backends=(backend(12), backend(13))),) + default_services()[1:])
    assert _backend_of(harness.run(P.ack(sport=sport))) in (12, 13)


def test_no_healthy_backend_passes_to_the_stack_to_be_reset(harness):
    """Default no_backend = "reset": the gateway's stack holds the VIP and answers RST."""
    none_up = (service("dicom", 104, backends=(backend(11, healthy=False), backend(12, healthy=False))),)
    harness.program(none_up)
    before = harness.stats().not_forwarded["no_backend"]
    syn = bytes(P.syn(sport=45000))
    verdict = harness.run(syn)
    assert verdict.action == structs.XDP_PASS
    assert verdict.data == syn
    assert harness.stats().not_forwarded["no_backend"] == before + 1


def test_no_healthy_backend_drops_when_configured(harness):
    none_up = (service("dicom", 104, backends=(backend(11, healthy=False),)),)
    harness.program(none_up, drop_without_backend=True)
    before = harness.stats().not_forwarded["no_backend"]
    assert harness.run(P.syn(sport=45001)).action == structs.XDP_DROP
    assert harness.stats().not_forwarded["no_backend"] == before + 1


def test_unresolved_mac_keeps_backend_out(harness):
    harness.program((service("dicom", 104, backends=(backend(11), backend(12, mac=False))),))
    assert {_backend_of(harness.run(P.syn(sport=p))) for p in range(46000, 46100)} == {11}


def test_client_persistence_pins_all_connections_of_a_client(harness):
    seen = {_backend_of(harness.run(P.syn(dport=80, sport=p))) for p in range(47000, 47050)}
    assert len(seen) == 1
    # Flow persistence on port 104 spreads the same client's connections.
    spread = {_backend_of(harness.run(P.syn(dport=104, sport=p))) for p in range(47000, 47050)}
    assert spread == {11, 12, 13}


def test_service_counters_count_frames_and_bytes(harness):
    sid = harness.service_state("udp-echo").id
    before = harness.dp.read_stats([sid], []).services[sid]
    frames = [P.udp(sport=48000, payload=b"x" * n) for n in (10, 100, 1000)]
    for f in frames:
        harness.run(f)
    after = harness.dp.read_stats([sid], []).services[sid]
    assert after.packets - before.packets == 3
    assert after.bytes - before.bytes == sum(len(bytes(f)) for f in frames)
    assert after.new_flows - before.new_flows == 1


def test_backend_counters_follow_the_chosen_backend(harness):
    ids = {int(str(be.address).rsplit(".", 1)[1]): be.id for k, be in harness.applied.backends.items() if k[0] == "dicom"}
    before = harness.dp.read_stats([], ids.values()).backends
    chosen = [_backend_of(harness.run(P.syn(sport=p))) for p in range(49000, 49060)]
    after = harness.dp.read_stats([], ids.values()).backends
    for octet, bid in ids.items():
        assert after[bid].packets - before[bid].packets == chosen.count(octet)
        assert after[bid].new_flows - before[bid].new_flows == chosen.count(octet)


def test_backend_mac_change_holds_its_flows_then_follows_the_new_mac(harness):
    """A new MAC is written while the backend is unpublished (bpf/lb_maps.h,
    rule 1): packets of its established flows are dropped meanwhile (TCP
    resends), never moved to another backend, and then go to the new MAC."""
    sport = next(p for p in range(34000, 35000) if harness.predict("dicom", "10.10.0.2", p, 104) == "10.10.0.12")
    assert _backend_of(harness.run(P.syn(sport=sport))) == 12
    new_mac = bytes([2, 0, 10, 11, 1, 12])    # three bytes change: not a one-byte write
    moved = (service("dicom", 104, backends=(backend(11), replace(backend(12), mac=new_mac), backend(13))),) + default_services()[1:]
    dp = harness.dp
    seen = []
    real_grace = dp.grace_period

    def grace_and_look():
        seen.append(harness.run(P.ack(sport=sport)))
        real_grace()

    before = harness.stats()
    dp.grace_period = grace_and_look
    try:
        harness.program(moved)
    finally:
        del dp.grace_period
    assert len(seen) == 2, "a MAC change takes two grace periods: after the retire and before the publish"
    assert [v.action for v in seen] == [structs.XDP_DROP, structs.XDP_DROP]
    after = harness.stats()
    assert after.events["flow_reselect"] == before.events["flow_reselect"]
    assert after.not_forwarded["backend_gone"] == before.not_forwarded["backend_gone"] + 2
    verdict = harness.run(P.ack(sport=sport))
    assert verdict.action == structs.XDP_TX and verdict.data[:6] == new_mac
