"""IPv6 through the real program under BPF_PROG_TEST_RUN: a fixture table
(extension-header chains of every kind walked, one over the limit, routing
with segments left, fragments, ICMPv6), every truncation of a frame with a
chain, flows and client persistence over the IPv6 tuple, a dual-stack pool,
and ICMPv6 Packet Too Big sent to the backend that owns the quoted flow.

Expected backends come from xdplb.flowhash and the planner's Maglev table,
never from the program. Counters named per case must move by one.
"""
from __future__ import annotations

import ctypes

import pytest
from scapy.layers.inet import TCP
from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6
from scapy.layers.l2 import Ether

from xdplb import structs

from . import packets as P
from . import packets6 as Q
from .conftest import mac_of

pytestmark = pytest.mark.root

TX, PASS, DROP = structs.XDP_TX, structs.XDP_PASS, structs.XDP_DROP
FORWARD, UNCHANGED, DROPPED = "forward", "unchanged", None


@pytest.fixture
def harness6(harness):
    harness.program(Q.dual_stack_services())
    return harness


def _counter(harness, counter):
    kind, name = counter.split(":")
    stats = harness.stats()
    return (stats.events if kind == "event" else stats.not_forwarded)[name]


def _expect(harness, raw, action, output, counter, flow=None):
    before = _counter(harness, counter)
    verdict = harness.run(raw)
    assert verdict.action_name == structs.ACTIONS[action]
    if output == UNCHANGED:
        assert verdict.data == raw
    elif output == FORWARD:
        service, sport, dport, proto = flow
        address = harness.predict(service, Q.CLIENT6, sport, dport, proto)
        assert verdict.data == P.rewritten(raw, Q.mac_of_address(address))
    assert _counter(harness, counter) == before + 1, f"{counter} did not count"
    return verdict


FIVE = (Q.hbh(), Q.dst_opts(), Q.routing(), Q.dst_opts(), Q.dst_opts())

# (description, input, flow or None, action, output, counter)
CASES = [
    ("TCP SYN to [VIP6]:104 goes to the Maglev-chosen backend", Q.syn6(), ("dicom6", 40000, 104, "tcp"),
     TX, FORWARD, "event:flow_new"),
    ("TCP ACK without an entry is a miss, placed by Maglev", Q.ack6(sport=40100), ("dicom6", 40100, 104, "tcp"),
     TX, FORWARD, "event:flow_miss"),
    ("UDP to [VIP6]:5000", Q.udp6(), ("udp6", 40000, 5000, "udp"), TX, FORWARD, "event:flow_new"),
    ("hop-by-hop options are walked", Q.syn6(sport=40201, chain=(Q.hbh(),)), ("dicom6", 40201, 104, "tcp"),
     TX, FORWARD, "event:ipv6_ext_headers"),
    ("hop-by-hop options of 16 bytes are walked", Q.syn6(sport=40202, chain=(Q.hbh(pad=12),)),
     ("dicom6", 40202, 104, "tcp"), TX, FORWARD, "event:ipv6_ext_headers"),
    ("destination options are walked", Q.syn6(sport=40203, chain=(Q.dst_opts(),)), ("dicom6", 40203, 104, "tcp"),
     TX, FORWARD, "event:ipv6_ext_headers"),
    ("a routing header with segments left 0 is walked", Q.syn6(sport=40204, chain=(Q.routing(0),)),
     ("dicom6", 40204, 104, "tcp"), TX, FORWARD, "event:ipv6_ext_headers"),
    ("the longest chain (hop-by-hop, dest opts, routing, dest opts: the limit 4)",
     Q.syn6(sport=40205, chain=FIVE[:4]), ("dicom6", 40205, 104, "tcp"), TX, FORWARD, "event:ipv6_ext_headers"),
    ("five extension headers (over the limit) pass to the stack", Q.syn6(sport=40206, chain=FIVE), None,
     PASS, UNCHANGED, "event:ipv6_ext_limit"),
    ("a routing header with segments left 1 passes to the stack", Q.syn6(sport=40207, chain=(Q.routing(1),)),
     None, PASS, UNCHANGED, "event:ipv6_routing"),
    ("a segment-routing header (type 4) with segments left passes", Q.syn6(sport=40208, chain=(Q.routing(2, 4),)),
     None, PASS, UNCHANGED, "event:ipv6_routing"),
    ("hop-by-hop after another header is malformed: the stack answers it",
     Q.syn6(sport=40209, chain=(Q.dst_opts(), Q.hbh())), None, PASS, UNCHANGED, "reason:malformed"),
    ("client persistence on web6", Q.syn6(dport=80, sport=41000), ("web6", 41000, 80, "tcp"), TX, FORWARD,
     "event:flow_new"),
    ("first TCP fragment to the VIP is dropped", Q.frag_tcp6(True), None, DROP, DROPPED, "reason:fragment"),
    ("later TCP fragment to the VIP is dropped", Q.frag_tcp6(False), None, DROP, DROPPED, "reason:fragment"),
    ("first ICMPv6 fragment to the VIP passes to the stack", Q.frag_icmp6(True), None, PASS, UNCHANGED,
     "reason:not_service"),
    ("later ICMPv6 fragment to the VIP passes to the stack", Q.frag_icmp6(False), None, PASS, UNCHANGED,
     "reason:not_service"),
    ("a TCP fragment to another host passes", Q.frag_tcp6(True, dst=Q.GATEWAY6), None, PASS, UNCHANGED,
     "reason:not_service"),
    ("ICMPv6 echo to the VIP passes", Q.echo6(), None, PASS, UNCHANGED, "reason:not_service"),
    ("a unicast Neighbour Solicitation for the VIP passes to the stack", Q.neighbour_solicitation_unicast(), None,
     PASS, UNCHANGED, "reason:not_service"),
    ("TCP to the VIP on a port no service uses passes", Q.syn6(dport=8443), None, PASS, UNCHANGED,
     "reason:not_service"),
    ("TCP to another address on a service port passes", Q.syn6(dst=Q.GATEWAY6), None, PASS, UNCHANGED,
     "reason:not_service"),
    ("UDP to [VIP6]:104 (the service is TCP) passes", Q.udp6(dport=104), None, PASS, UNCHANGED,
     "reason:not_service"),
    ("IPv6 with version 4 in its header passes", bytes(Q.syn6())[:14] + bytes([0x40]) + bytes(Q.syn6())[15:], None,
     PASS, UNCHANGED, "reason:malformed"),
    ("TCP header cut short to the VIP is dropped", bytes(Q.syn6())[:14 + 40 + 10], None, DROP, DROPPED,
     "reason:malformed"),
]


@pytest.mark.parametrize("description,packet,flow,action,output,counter", CASES, ids=[c[0] for c in CASES])
def test_fixture6(harness6, description, packet, flow, action, output, counter):
    _expect(harness6, bytes(packet), action, output, counter, flow)


def test_ipv4_keys_keep_their_sizes():
    """IPv6 lives in its own maps: the IPv4 keys hashed per packet stay 16 and 8 bytes."""
    assert ctypes.sizeof(structs.FlowKey) == 16 and ctypes.sizeof(structs.ServiceKey) == 8
    assert ctypes.sizeof(structs.FlowKey6) == 40 and ctypes.sizeof(structs.ServiceKey6) == 20


def _truncation_expected(length: int, ip6_end: int, chain_end: int, tcp_end: int):
    """(action, reason) for the frame cut to `length` bytes."""
    if length < ip6_end or length < chain_end:
        return PASS, "malformed"        # Ethernet, IPv6 header or chain cut short: the stack judges it
    if length < tcp_end:
        return DROP, "malformed"        # TCP header cut short, to a VIP
    return TX, None


@pytest.mark.parametrize("chain", [(), (Q.hbh(),), (Q.hbh(pad=12), Q.dst_opts(), Q.routing(), Q.dst_opts(pad=4))],
                         ids=["no chain", "hop-by-hop", "four headers"])
def test_every_truncation(harness6, chain):
    """Every prefix of a SYN to the VIP, from the Ethernet header alone (the
    shortest frame BPF_PROG_TEST_RUN takes) to the whole frame."""
    full = bytes(Q.syn6(sport=40300, chain=chain))
    ip6_end = 14 + 40
    chain_end = ip6_end + sum(len(bytes(ext)) for ext in chain)
    tcp_end = chain_end + 20
    assert len(full) == tcp_end
    for length in range(14, len(full) + 1):
        raw = full[:length]
        action, reason = _truncation_expected(length, ip6_end, chain_end, tcp_end)
        before = harness6.stats().not_forwarded.get(reason, 0) if reason else None
        verdict = harness6.run(raw)
        assert verdict.action_name == structs.ACTIONS[action], f"cut at {length} of {len(full)}"
        if action == PASS:
            assert verdict.data == raw
        if reason:
            assert harness6.stats().not_forwarded[reason] == before + 1, f"cut at {length}: {reason} not counted"
    address = harness6.predict("dicom6", Q.CLIENT6, 40300, 104, "tcp")
    assert harness6.run(full).data == P.rewritten(full, Q.mac_of_address(address))


def test_flow_entry_keeps_an_ipv6_flow_on_its_backend(harness6):
    """The SYN's entry in flows6 holds the flow when the table changes."""
    syn = bytes(Q.syn6(sport=40400))
    first = harness6.run(syn)
    assert first.action_name == "tx"
    mac = first.data[0:6]
    services = list(Q.dual_stack_services())
    services[3] = Q.service6("dicom6", 104, backends=tuple(Q.backend6(i) for i in (11, 12, 13, 14)))
    harness6.program(services)
    ack = bytes(Q.ack6(sport=40400))
    assert harness6.run(ack).data[0:6] == mac
    flows = harness6.dp.flows()
    assert any(str(k[0]) == Q.CLIENT6 and k[1] == 40400 for k in flows)


def test_client_persistence_hashes_the_client_prefix(harness6):
    """web6 keeps the first 64 bits: every client of one /64 lands on one
    backend, and the program agrees with xdplb.flowhash for every client."""
    macs = set()
    for host in range(1, 40):
        src = f"2001:db8:c::{host:x}:{host * 7:x}"
        raw = bytes(Q.syn6(dport=80, sport=42000 + host, src=src))
        verdict = harness6.run(raw)
        address = harness6.predict("web6", src, 42000 + host, 80, "tcp")
        assert verdict.data == P.rewritten(raw, Q.mac_of_address(address))
        macs.add(verdict.data[0:6])
    assert len(macs) == 1
    spread = set()
    for net in range(1, 40):
        src = f"2001:db8:{net:x}::2"
        raw = bytes(Q.syn6(dport=80, sport=43000 + net, src=src))
        verdict = harness6.run(raw)
        assert verdict.data == P.rewritten(raw, Q.mac_of_address(harness6.predict("web6", src, 43000 + net, 80)))
        spread.add(verdict.data[0:6])
    assert len(spread) == 3, "clients of different /64s should spread over the three backends"


def test_flow_persistence_spreads_and_matches_the_prediction(harness6):
    seen = set()
    for sport in range(44000, 44060):
        raw = bytes(Q.syn6(sport=sport))
        verdict = harness6.run(raw)
        assert verdict.data == P.rewritten(raw, Q.mac_of_address(harness6.predict("dicom6", Q.CLIENT6, sport, 104)))
        seen.add(verdict.data[0:6])
    assert len(seen) == 3


def test_dual_stack_families_stay_apart(harness6):
    """One port, an IPv4 and an IPv6 service: each family reaches its own backends."""
    v4 = harness6.run(bytes(P.syn(sport=45000)))
    v6 = harness6.run(bytes(Q.syn6(sport=45000)))
    assert v4.action_name == v6.action_name == "tx"
    assert v4.data[0:6] == mac_of(int(harness6.predict("dicom", "10.10.0.2", 45000, 104).rsplit(".", 1)[1]))
    address = harness6.predict("dicom6", Q.CLIENT6, 45000, 104)
    assert v6.data[0:6] == Q.mac_of_address(address)


# ---- ICMPv6 Packet Too Big ---------------------------------------------------

def test_packet_too_big_goes_to_the_backend_that_owns_the_flow(harness6):
    """The flow is placed by its SYN; the table then changes so Maglev would
    place it elsewhere: the message follows the flow entry."""
    for sport in range(46000, 46100):
        if harness6.run(bytes(Q.syn6(sport=sport))).action_name == "tx":
            owner = harness6.run(bytes(Q.syn6(sport=sport))).data[0:6]
            services = list(Q.dual_stack_services())
            services[3] = Q.service6("dicom6", 104, backends=tuple(
                Q.backend6(i, weight=1 if Q.BACKEND6[f"2001:db8::{i}"] == owner else 5) for i in (11, 12, 13)))
            harness6.program(services)
            if Q.mac_of_address(harness6.predict("dicom6", Q.CLIENT6, sport, 104)) != owner:
                break
    else:
        pytest.fail("no flow whose Maglev backend moved")
    raw = Q.too_big6(Q.reply6(dport=sport))
    before = _counter(harness6, "event:icmp_too_big")
    verdict = harness6.run(raw)
    assert verdict.action_name == "tx"
    assert verdict.data == P.rewritten(raw, owner)
    assert _counter(harness6, "event:icmp_too_big") == before + 1


def test_packet_too_big_without_an_entry_goes_where_maglev_puts_the_flow(harness6):
    for sport, proto, service in ((47000, "tcp", "dicom6"), (47001, "udp", "udp6")):
        port = 104 if proto == "tcp" else 5000
        raw = Q.too_big6(Q.reply6(sport=port, dport=sport, proto=proto))
        before = _counter(harness6, "event:icmp_too_big")
        verdict = harness6.run(raw)
        assert verdict.action_name == "tx"
        assert verdict.data == P.rewritten(raw, Q.mac_of_address(harness6.predict(service, Q.CLIENT6, sport, port, proto)))
        assert _counter(harness6, "event:icmp_too_big") == before + 1


def test_packet_too_big_quoting_a_reply_with_extension_headers_is_forwarded(harness6):
    raw = Q.too_big6(Q.reply6(dport=47100, chain=(Q.dst_opts(),)))
    verdict = harness6.run(raw)
    assert verdict.data == P.rewritten(raw, Q.mac_of_address(harness6.predict("dicom6", Q.CLIENT6, 47100, 104)))


QUOTE_START = 14 + 40 + 8      # Ethernet, the router's IPv6 header, the ICMPv6 header

PTB_PASSES = [
    ("quoting a reply from another source", Q.too_big6(Q.reply6(src=Q.GATEWAY6)), "reason:not_service"),
    ("quoting a port no service uses", Q.too_big6(Q.reply6(sport=8443)), "reason:not_service"),
    ("to an address that is not a VIP", Q.too_big6(Q.reply6(src=Q.GATEWAY6), dst=Q.GATEWAY6), "reason:not_service"),
    ("quoting a later fragment", Q.too_big6(IPv6(src=str(Q.VIP6), dst=Q.CLIENT6) / Q.fragment6(8, nh=6)
                                            / (b"z" * 16)), "reason:not_service"),
    ("quote cut inside the inner IPv6 header", Q.too_big6()[:QUOTE_START + 30], "reason:malformed"),
    ("quote cut before the ports", Q.too_big6()[:QUOTE_START + 40 + 2], "reason:malformed"),
    ("ICMPv6 header cut short", Q.too_big6()[:14 + 40 + 3], "reason:malformed"),
]


@pytest.mark.parametrize("description,raw,counter", PTB_PASSES, ids=[c[0] for c in PTB_PASSES])
def test_packet_too_big_that_is_not_about_a_flow_passes(harness6, description, raw, counter):
    _expect(harness6, raw, PASS, UNCHANGED, counter)


def test_every_truncation_of_a_packet_too_big(harness6):
    full = Q.too_big6(Q.reply6(dport=47200))
    ports_end = QUOTE_START + 40 + 4
    for length in range(14 + 40, len(full) + 1):
        raw = full[:length]
        verdict = harness6.run(raw)
        if length < 14 + 40 + 8 or length < ports_end:
            assert verdict.action_name == "pass" and verdict.data == raw, f"cut at {length}"
        else:
            assert verdict.action_name == "tx", f"cut at {length}"


def test_removing_ipv6_services_unbinds_their_ids_and_clears_their_maps(harness6):
    """A pool without the IPv6 services leaves no IPv6 service, VIP or bound id."""
    harness6.program(harness6.desired.services[:3])
    ids = harness6.dp.map("service_ids")
    assert [sid for sid in range(harness6.settings.max_services)
            if ids[sid].proto and ids[sid].state & structs.F_SVC_IPV6] == []
    assert len(harness6.dp.map("services6")) == 0 and len(harness6.dp.map("vips6")) == 0
    assert harness6.run(bytes(Q.syn6())).action_name == "pass"
    assert harness6.run(bytes(P.syn())).action_name == "tx"


def test_adopting_maps_reads_ipv6_services_backends_and_vips_back(harness6):
    state = harness6.dp.read_state()
    assert (Q.VIP6, 104, "tcp") in state.services
    assert Q.VIP6 in state.vips
    assert {str(addr) for _sid, addr, _mac, _up in state.backends.values()} >= set(Q.BACKEND6) - {"2001:db8::14"}


def test_the_reconciler_sees_no_drift_in_a_dual_stack_pool(harness6):
    """What the kernel layer reads back (services6, vips6, IPv6 backends) is
    what the planner wrote, so the reconciler does not repair it again."""
    from xdplb.reconciler import drift

    assert drift(harness6.dp.read_state(), harness6.applied) == []


def test_the_reconciler_sees_a_client_prefix_rewritten_in_service_ids6(harness6):
    """service_ids6's live half is read back (VIP and client prefix), so an
    outside write to it is drift."""
    from xdplb.reconciler import drift

    state = harness6.dp.read_state()
    sid, _flags, half = state.services[(Q.VIP6, 80, "tcp")]
    assert state.refs6[sid] == (Q.VIP6, 64)
    table = harness6.dp.map("service_ids6")
    table[sid * structs.TABLES_PER_SERVICE + half] = structs.ServiceRef6.of(Q.VIP6, 128)
    assert harness6.dp.read_state().refs6[sid] == (Q.VIP6, 128)
    assert drift(harness6.dp.read_state(), harness6.applied) == ["IPv6 VIPs and client prefixes (service_ids6)"]
