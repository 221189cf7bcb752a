"""ICMP to a VIP, under BPF_PROG_TEST_RUN: path-MTU discovery through the
balancer (bpf/handle_icmp.h) and ICMP fragments to the gateway's stack.

A router that cannot forward a backend's large DSR reply sends ICMP type 3
code 4 to the reply's source, the VIP. The message quotes the reply
(VIP:port -> client:port); the program must send it on to the backend that
owns the client's flow: the flow table's backend if there is an entry, else
the one Maglev gives the turned-round tuple. Everything else ICMP passes to
the gateway's stack unchanged.

Fixture table as in test_fixtures.py: description, input, expected action,
expected output, the counter it must move.
"""
from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Dot1Q
from scapy.packet import Raw

from xdplb import structs

from . import packets as P
from .conftest import CLIENT, VIP, backend, default_services, mac_of, service

pytestmark = pytest.mark.root

ROUTER = "10.10.0.1"          # the router next to the gateway that found the link too small
GATEWAY = "10.10.0.10"        # the gateway's own address (not a VIP)
TX, PASS = structs.XDP_TX, structs.XDP_PASS
FORWARD, UNCHANGED = "forward", "unchanged"


def reply(sport=104, dport=40000, proto="tcp", src=str(VIP), dst=CLIENT, payload=b"x" * 120, **ip):
    """The backend's DSR reply that was too big (as the router quotes it)."""
    l4 = TCP(sport=sport, dport=dport, flags="A", seq=5000, ack=1001) if proto == "tcp" else UDP(sport=sport, dport=dport)
    return IP(src=src, dst=dst, flags="DF", **ip) / l4 / Raw(payload)


def too_big(quoted=None, dst=str(VIP), type_=3, code=4, mtu=1400, vlan=None) -> bytes:
    """ICMP from the router to `dst` quoting `quoted` (default: a TCP reply VIP:104 -> client:40000)."""
    quoted = reply() if quoted is None else quoted
    icmp = ICMP(type=type_, code=code, nexthopmtu=mtu) if (type_, code) == (3, 4) else ICMP(type=type_, code=code)
    l2 = P.eth() if vlan is None else P.eth() / Dot1Q(vlan=vlan)
    return bytes(l2 / IP(src=ROUTER, dst=dst) / icmp / bytes(quoted))


def cut(frame: bytes, quote_bytes: int) -> bytes:
    """`frame` (Ethernet + 20-byte IP + 8-byte ICMP + quote) with only `quote_bytes` of the quote."""
    return frame[:14 + 20 + 8 + quote_bytes]


def icmp_fragment(first: bool) -> bytes:
    """One fragment of a 3000-byte ping to the VIP."""
    if first:
        return bytes(P.eth() / IP(src=CLIENT, dst=str(VIP), flags="MF", frag=0, proto=1) / ICMP() / Raw(b"p" * 1472))
    return bytes(P.eth() / IP(src=CLIENT, dst=str(VIP), frag=185, proto=1) / Raw(b"p" * 1480))


def _counter(harness, counter):
    kind, name = counter.split(":")
    stats = harness.stats()
    return (stats.events if kind == "event" else stats.not_forwarded)[name]


def _check(harness, raw, action, output, counter):
    """Run `raw`; check the action, the frame (UNCHANGED, or the MAC of the
    backend named by `output`) and that `counter` moved by one."""
    before = _counter(harness, counter)
    verdict = harness.run(raw)
    assert verdict.action_name == structs.ACTIONS[action]
    if output == UNCHANGED:
        assert verdict.data == raw
    else:
        assert verdict.data == P.rewritten(raw, mac_of(int(output.rsplit(".", 1)[1])))
    assert _counter(harness, counter) == before + 1, f"{counter} did not count"
    return verdict


# (description, input, action, output, counter); output FORWARD means the
# backend Maglev gives the quoted flow turned round, `flow` = (service, client port, service port, proto).
MAGLEV_CASES = [
    ("too-big about a TCP reply with no flow entry: Maglev on the turned-round tuple",
     too_big(), ("dicom", 40000, 104, "tcp")),
    ("802.1Q-tagged too-big keeps its tag", too_big(reply(dport=40010), vlan=42), ("dicom", 40010, 104, "tcp")),
    ("too-big about a UDP reply", too_big(reply(sport=5000, dport=40020, proto="udp")), ("udp-echo", 40020, 5000, "udp")),
    ("too-big quoting the minimum RFC 792 quote (IP header + 8 bytes)",
     cut(too_big(reply(dport=40030)), 28), ("dicom", 40030, 104, "tcp")),
    ("too-big quoting a reply with IP options (IHL 8)",
     too_big(reply(dport=40040, options=b"\x07\x0b\x04" + b"\x00" * 9)), ("dicom", 40040, 104, "tcp")),
    ("too-big quoting a first fragment (MF, offset 0) still has ports",
     too_big(IP(src=str(VIP), dst=CLIENT, flags="MF") / TCP(sport=104, dport=40050)), ("dicom", 40050, 104, "tcp")),
]

PASS_CASES = [
    ("ICMP echo request to the VIP (ping)", bytes(P.icmp_to_vip()), "reason:not_service"),
    ("port unreachable (3/3) about a VIP reply", too_big(code=3), "reason:not_service"),
    ("host unreachable (3/1) about a VIP reply", too_big(code=1), "reason:not_service"),
    ("time exceeded (11) about a VIP reply", too_big(type_=11, code=0), "reason:not_service"),
    ("redirect (5) to the VIP", too_big(type_=5, code=1), "reason:not_service"),
    ("too-big to the gateway's own address about its own SSH",
     too_big(reply(sport=22, src=GATEWAY), dst=GATEWAY), "reason:not_service"),
    ("too-big to a non-VIP quoting a VIP reply", too_big(dst=GATEWAY), "reason:not_service"),
    ("too-big to the VIP quoting a packet from another source",
     too_big(reply(src=GATEWAY)), "reason:not_service"),
    ("too-big quoting VIP on a port no service uses", too_big(reply(sport=8443)), "reason:not_service"),
    ("too-big quoting UDP from VIP:104 (service is TCP)", too_big(reply(sport=104, proto="udp")), "reason:not_service"),
    ("too-big quoting an ICMP packet", too_big(IP(src=str(VIP), dst=CLIENT) / ICMP(type=0)), "reason:not_service"),
    ("too-big quoting a later fragment (no ports)",
     too_big(IP(src=str(VIP), dst=CLIENT, frag=100, proto=6) / Raw(b"y" * 16)), "reason:not_service"),
    ("ICMP header cut short", cut(too_big(), -4), "reason:malformed"),
    ("quote cut inside the IP header", cut(too_big(), 12), "reason:malformed"),
    ("quote cut before the ports", cut(too_big(), 20), "reason:malformed"),
    ("quote cut inside the ports", cut(too_big(), 22), "reason:malformed"),
    ("quoted IHL 8 with the options cut", cut(too_big(reply(options=b"\x07\x0b\x04" + b"\x00" * 9)), 24),
     "reason:malformed"),
    ("quoted IHL 4", too_big(b"\x44" + bytes(reply())[1:]), "reason:malformed"),
    ("quoted IPv6-version header", too_big(b"\x65" + bytes(reply())[1:]), "reason:malformed"),
    ("first fragment of a large ping to the VIP goes to the stack", icmp_fragment(True), "reason:not_service"),
    ("later fragment of a large ping to the VIP goes to the stack", icmp_fragment(False), "reason:not_service"),
    ("GRE fragment to the VIP goes to the stack",
     bytes(P.eth() / IP(src=CLIENT, dst=str(VIP), flags="MF", proto=47) / Raw(b"g" * 64)), "reason:not_service"),
]


@pytest.mark.parametrize("description,raw,flow", MAGLEV_CASES, ids=[c[0] for c in MAGLEV_CASES])
def test_too_big_without_entry_goes_where_maglev_puts_the_flow(harness, description, raw, flow):
    service_name, client_port, port, proto = flow
    address = harness.predict(service_name, CLIENT, client_port, port, proto)
    _check(harness, raw, TX, address, "event:icmp_too_big")
    assert len(harness.dp.map("flows")) == 0, "an ICMP message must not create a flow entry"


@pytest.mark.parametrize("description,raw,counter", PASS_CASES, ids=[c[0] for c in PASS_CASES])
def test_other_icmp_passes_to_the_stack_unchanged(harness, description, raw, counter):
    forwarded = _counter(harness, "event:icmp_too_big")
    _check(harness, raw, PASS, UNCHANGED, counter)
    assert _counter(harness, "event:icmp_too_big") == forwarded


def _address_of(harness, service_name, backend_id):
    return next(address for (name, address), be in harness.applied.backends.items()
                if name == service_name and be.id == backend_id)


def _sport_on(harness, address, service_name="dicom", port=104, start=30000):
    return next(p for p in range(start, start + 2000) if harness.predict(service_name, CLIENT, p, port) == address)


def test_too_big_follows_the_flow_entry_not_maglev(harness):
    """A flow on backend 12, which is then drained: Maglev no longer gives it
    12, only the flow table does, and the too-big message must follow the flow."""
    sport = _sport_on(harness, "10.10.0.12")
    assert harness.run(P.syn(sport=sport)).data[5] == 12
    drained = (service("dicom", 104, backends=(backend(11), backend(12, weight=0), backend(13))),) + default_services()[1:]
    harness.program(drained)
    assert harness.predict("dicom", CLIENT, sport, 104) != "10.10.0.12"

    _check(harness, too_big(reply(dport=sport)), TX, "10.10.0.12", "event:icmp_too_big")


def test_too_big_for_a_flow_on_a_down_backend_goes_where_maglev_now_puts_it(harness):
    """The entry names a backend that is down: its next packet will be
    re-chosen by Maglev, so the message goes there too."""
    sport = _sport_on(harness, "10.10.0.13")
    assert harness.run(P.syn(sport=sport)).data[5] == 13
    harness.program((service("dicom", 104, backends=(backend(11), backend(12), backend(13, healthy=False))),)
                    + default_services()[1:])
    expected = harness.predict("dicom", CLIENT, sport, 104)
    assert expected != "10.10.0.13"
    _check(harness, too_big(reply(dport=sport)), TX, expected, "event:icmp_too_big")


def test_too_big_on_a_client_persistence_service_uses_the_client_hash(harness):
    """The web service hashes the client address only. Pick a client port
    where the 5-tuple hash would give another backend, so only the client
    hash explains the result."""
    from xdplb import flowhash

    table = harness.service_state("web").table
    by_client = harness.predict("web", CLIENT, 40000, 80)
    client_port = next(
        p for p in range(40000, 42000)
        if _address_of(harness, "web", table[flowhash.slot_for(harness.settings.hash_seed, len(table), "flow",
                                                                 CLIENT, VIP, p, 80, 6)]) != by_client)
    _check(harness, too_big(reply(sport=80, dport=client_port)), TX, by_client, "event:icmp_too_big")


def test_too_big_with_no_backend_up_passes(harness):
    harness.program((service("dicom", 104, backends=(backend(11, healthy=False),)),) + default_services()[1:])
    _check(harness, too_big(), PASS, UNCHANGED, "reason:no_backend")


def test_tcp_fragments_to_a_vip_are_still_dropped(harness):
    before = _counter(harness, "reason:fragment")
    for raw in (bytes(P.fragment(True)), bytes(P.fragment(False)),
                bytes(P.eth() / IP(src=CLIENT, dst=str(VIP), flags="MF") / UDP(sport=1, dport=5000) / Raw(b"u" * 40))):
        assert harness.run(raw).action == structs.XDP_DROP
    assert _counter(harness, "reason:fragment") == before + 3
