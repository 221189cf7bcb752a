"""The program's shortcuts around the services hash, against the real planner.

An established packet is checked through service_ids (service id -> the key
it serves now) instead of the services lookup, and a packet to a port no
service uses skips every lookup through service_ports (bpf/lb_maps.h). Both
arrays are derived from `services` by the map writer; these tests change the
services under live flows and check the program answers as the services
lookup would.
"""
from __future__ import annotations

import ctypes
import ipaddress

import pytest

from xdplb import structs

from . import packets as P
from .conftest import default_services, service

pytestmark = pytest.mark.root


def _tx_to(verdict) -> int:
    assert verdict.action == structs.XDP_TX, verdict.action_name
    return verdict.data[5]


def _ids(dp) -> dict[int, bytes]:
    """Bound service_ids entries (proto set), as the service_key bytes they name."""
    table = dp.map("service_ids")
    return {i: bytes(table[i])[:7] + b"\0" for i in range(dp.settings.max_services) if table[i].proto}


def _port_bits(dp) -> dict[int, int]:
    table = dp.map("service_ports")
    return {w: table[w].value for w in range(structs.PORT_WORDS) if table[w].value}


def test_service_ids_and_ports_mirror_the_services(harness):
    dp = harness.dp
    want = {harness.service_state(s.name).id: bytes(structs.ServiceKey.of(s.vip, s.port, s.protocol))
            for s in default_services()}
    assert _ids(dp) == want
    bits = {}
    for s in default_services():
        bits[s.port // 32] = bits.get(s.port // 32, 0) | 1 << (s.port % 32)
    assert _port_bits(dp) == bits


def test_removed_service_stops_forwarding_its_established_flows(harness):
    _tx_to(harness.run(P.syn(sport=41001)))
    harness.program(default_services()[1:])            # dicom (port 104) goes
    before = harness.stats()
    verdict = harness.run(P.ack(sport=41001))
    assert verdict.action == structs.XDP_PASS
    after = harness.stats()
    assert after.not_forwarded["not_service"] == before.not_forwarded["not_service"] + 1
    assert after.events["flow_hit"] == before.events["flow_hit"]
    assert not any(bytes(structs.ServiceKey.of(s.vip, s.port, s.protocol)) == v
                   for s in default_services()[:1] for v in _ids(harness.dp).values())


def test_service_renamed_under_the_same_key_rechooses_old_flows(harness):
    _tx_to(harness.run(P.syn(sport=41002)))
    old_id = harness.service_state("dicom").id
    harness.program((service("dicom-renamed", 104),) + default_services()[1:])
    new_id = harness.service_state("dicom-renamed").id
    assert new_id != old_id
    assert old_id not in _ids(harness.dp), "the old id must no longer name the key"
    before = harness.stats().events
    _tx_to(harness.run(P.ack(sport=41002)))
    after = harness.stats().events
    # The flow's entry names the old service id and its (cleared) backend:
    # re-chosen in the new service, exactly as the services lookup decides.
    assert after["flow_reselect"] == before["flow_reselect"] + 1
    assert after["flow_hit"] == before["flow_hit"]
    _tx_to(harness.run(P.ack(sport=41002)))
    assert harness.stats().events["flow_hit"] == after["flow_hit"] + 1


class _CheckedMap:
    """A bcc map handle that runs `check` after each write made through it."""

    def __init__(self, table, check):
        self.table, self._check = table, check

    def __setitem__(self, key, value):
        self.table[key] = value
        self._check()

    def __delitem__(self, key):
        del self.table[key]
        self._check()

    def __getitem__(self, key):
        return self.table[key]

    def __getattr__(self, attr):
        return getattr(self.table, attr)


def test_service_ids_names_an_id_only_while_services_does(harness):
    # After every single write of a rename (the key moves to a new id) and
    # of a removal, each service_ids entry must name a key that `services`
    # maps to that same id: the program's shortcut may then never disagree
    # with the services lookup, whatever a packet sees in between.
    dp = harness.dp
    real = {name: dp.map(name) for name in ("services", "service_ids")}
    checked = []

    def check():
        services = {bytes(k): v.id for k, v in real["services"].items()}
        for sid, key in _ids(dp).items():
            assert services.get(key) == sid, f"service_ids[{sid}] names a key services gives to {services.get(key)}"
        checked.append(True)

    for name, table in real.items():
        dp._maps[name] = _CheckedMap(table, check)
    try:
        harness.program((service("dicom-renamed", 104),) + default_services()[1:])
        harness.program(default_services()[1:])
    finally:
        dp._maps.update(real)
    assert len(checked) >= 4       # the rename and the removal went through these maps
    assert set(_ids(dp).values()) == {bytes(structs.ServiceKey.of(s.vip, s.port, s.protocol))
                                      for s in default_services()[1:]}


def test_port_bit_stays_while_another_service_uses_the_port(harness):
    both = default_services() + (service("dicom-udp", 104, protocol="udp"),)
    harness.program(both)
    harness.program(default_services())                # the UDP service on 104 goes, TCP 104 stays
    assert _port_bits(harness.dp)[104 // 32] & 1 << (104 % 32)
    _tx_to(harness.run(P.syn(sport=41003)))
    _tx_to(harness.run(P.ack(sport=41003)))


def test_port_of_the_last_service_passes_then_comes_back(harness):
    harness.program(default_services()[:1] + default_services()[2:])   # web (port 80) goes
    assert not _port_bits(harness.dp).get(80 // 32, 0) & 1 << (80 % 32)
    before = harness.stats().not_forwarded["not_service"]
    assert harness.run(P.syn(dport=80, sport=41004)).action == structs.XDP_PASS
    assert harness.stats().not_forwarded["not_service"] == before + 1
    harness.program(default_services())
    _tx_to(harness.run(P.syn(dport=80, sport=41004)))


def test_rebuild_for_adopted_maps_restores_both_arrays(harness):
    dp = harness.dp
    _tx_to(harness.run(P.syn(sport=41005)))
    ids, bits = _ids(dp), _port_bits(dp)
    for i in range(dp.settings.max_services):      # as maps pinned by a build without them
        dp.map("service_ids")[i] = structs.ServiceRef()
    for w in range(structs.PORT_WORDS):
        dp.map("service_ports")[w] = ctypes.c_uint32(0xFFFFFFFF if w == 0 else 0)   # and a stale bit
    backends = dp.map("backends")
    for bid in {be.id for be in harness.applied.backends.values()}:    # and no F_BACKEND_READY yet
        entry = backends[bid]
        entry.flags &= ~structs.F_BACKEND_READY
        backends[bid] = entry
    assert harness.run(P.ack(sport=41005)).action != structs.XDP_TX
    dp._rebuild_service_index()
    assert _ids(dp) == ids and _port_bits(dp) == bits
    hits = harness.stats().events["flow_hit"]
    _tx_to(harness.run(P.ack(sport=41005)))
    assert harness.stats().events["flow_hit"] == hits + 1



def test_flow_table_reads_back_as_addresses(harness):
    # What an adopting controller reads from the kernel's flow table (bcc's
    # key type sees the IPv4 addresses as integers; the reader must not).
    sent_to = _tx_to(harness.run(P.syn(sport=41007)))
    flows = harness.dp.flows()
    key = (ipaddress.IPv4Address(P.CLIENT), 41007, P.VIP, 104, 6)
    assert list(flows) == [key]
    backend = harness.dp.read_state().backends[flows[key]]
    assert backend[2][5] == sent_to          # the entry names the backend the SYN went to
