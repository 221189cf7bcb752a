"""forwarding = "nat" over IPv6: the request and reply translations (bpf/nat6.h).

The real program under BPF_PROG_TEST_RUN (no XDP mode: the kernel runs it on
the test's buffer). Every translated frame is compared byte for byte with
the frame scapy builds from scratch with the new addresses and ports, and
the TCP/UDP checksum (IPv6 has no header checksum) is also recomputed by
scapy and compared on its own, so a failure names it.

Replies need bpf_fib_lookup with AF_INET6, so they run with the calling
thread inside a network namespace of their own (NatNet6): the gateway's
interface gw0 (MAC GW_MAC; 2001:db8:c::10/64 for the clients,
2001:db8:30::1/64 for the PACS) whose veth peer sits in a router namespace
answering Neighbour Solicitations for 2001:db8:c::1, which routes
2001:db8:50::/64; gw1 (2001:db8:16::1/64) is a second interface;
net.ipv6.conf.all.forwarding is 1.
"""
from __future__ import annotations

import ipaddress
import os
import subprocess
import time

import pytest
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6PacketTooBig, ICMPv6ParamProblem,
                                ICMPv6TimeExceeded, IPv6, IPv6ExtHdrFragment)
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Raw

from tools.bench.fibnet import FibNet
from xdplb import plan, structs

from . import packets as P
from . import packets6 as Q
from .conftest import mac_of
from .test_nat import (DICOM_PORT, FORWARDING_CASES, PACS_PORT, ROUTER_MAC, UDP_BACKEND_PORT, UDP_PORT, _mac,
                       assert_passes_uncounted, forwarding, nat_count, nat_services, reply_run)

pytestmark = pytest.mark.root

TX, PASS, DROP, REDIRECT = structs.XDP_TX, structs.XDP_PASS, structs.XDP_DROP, structs.XDP_REDIRECT
VIP6 = Q.VIP6
CLIENT6 = Q.CLIENT6                        # on gw0's client subnet
PACS6 = ("2001:db8:30::11", "2001:db8:30::12", "2001:db8:30::13")
GW_PACS6 = "2001:db8:30::1"                # the gateway's own address on the PACS subnet
ROUTER6 = "2001:db8:c::1"
REMOTE6 = "2001:db8:50::7"                 # behind the router
OTHER6 = "2001:db8:16::5"                  # on gw1
OTHER6_MAC = "02:00:ac:10:00:06"
NOWHERE6 = "2001:db8:dead::9"              # no route


def pacs6_backend(address: str, port: int = PACS_PORT) -> plan.BackendState:
    octet = int(address.rsplit(":", 1)[1])
    return plan.BackendState(f"pacs6-{octet}", ipaddress.IPv6Address(address), 1, mac_of(octet), True, port)


def nat6_services(backends=PACS6) -> tuple:
    return (
        plan.ServiceState("nat6-dicom", VIP6, DICOM_PORT, "tcp", "flow",
                          tuple(pacs6_backend(a) for a in backends), "nat"),
        plan.ServiceState("nat6-udp", VIP6, UDP_PORT, "udp", "flow",
                          tuple(pacs6_backend(a, UDP_BACKEND_PORT) for a in backends), "nat"),
    )


@pytest.fixture
def nat6(harness):
    harness.program(nat6_services())
    return harness


# ---- checksums, recomputed by scapy ----------------------------------------

def recomputed6(frame: bytes) -> Ether:
    """The frame as scapy rebuilds it with the TCP/UDP checksum computed afresh
    (scapy sends a computed UDP 0 as 0xffff, as RFC 8200 asks)."""
    pkt = Ether(frame)
    del (pkt[TCP] if TCP in pkt else pkt[UDP]).chksum
    return Ether(bytes(pkt))


def assert_checksum6(frame: bytes) -> None:
    got, want = Ether(frame), recomputed6(frame)
    layer = TCP if TCP in got else UDP
    assert got[layer].chksum == want[layer].chksum, \
        f"{layer.__name__} checksum {got[layer].chksum:#06x}, scapy {want[layer].chksum:#06x}"


def translated6(packet, *, dst=None, dport=None, src=None, sport=None, dst_mac, src_mac) -> bytes:
    pkt = Ether(bytes(packet))
    pkt.dst, pkt.src = dst_mac, src_mac
    l4 = pkt[TCP] if TCP in pkt else pkt[UDP]
    if dst is not None:
        pkt[IPv6].dst, l4.dport = dst, dport
    if src is not None:
        pkt[IPv6].src, l4.sport = src, sport
    return bytes(recomputed6(bytes(pkt)))


# ---- requests: [client] -> [VIP6]:104 becomes [client] -> [backend]:4242 ----

def request6(l4, chain=(), tag=None, src=CLIENT6):
    frame = P.eth()
    if tag is not None:
        frame = frame / Dot1Q(vlan=tag)
    pkt = frame / IPv6(src=src, dst=str(VIP6))
    for ext in chain:
        pkt = pkt / ext
    return pkt / l4


def syn_l4(sport, dport=DICOM_PORT):
    return TCP(sport=sport, dport=dport, flags="S", seq=1000)


REQUESTS6 = [
    ("TCP SYN", request6(syn_l4(41000)), "nat6-dicom", 41000, "tcp"),
    ("TCP ACK with payload", request6(TCP(sport=41001, dport=DICOM_PORT, flags="A") / Raw(b"P-DATA" * 30)),
     "nat6-dicom", 41001, "tcp"),
    ("UDP", request6(UDP(sport=41002, dport=UDP_PORT) / Raw(b"ping")), "nat6-udp", 41002, "udp"),
    ("802.1Q tag kept", request6(syn_l4(41003), tag=42), "nat6-dicom", 41003, "tcp"),
    ("hop-by-hop options", request6(syn_l4(41004), chain=(Q.hbh(),)), "nat6-dicom", 41004, "tcp"),
    ("destination options of 16 bytes", request6(syn_l4(41005), chain=(Q.dst_opts(pad=12),)),
     "nat6-dicom", 41005, "tcp"),
    ("routing header with segments left 0", request6(syn_l4(41006), chain=(Q.routing(0),)),
     "nat6-dicom", 41006, "tcp"),
    ("the longest chain, UDP", request6(UDP(sport=41007, dport=UDP_PORT) / Raw(b"x" * 33),
                                       chain=(Q.hbh(), Q.dst_opts(), Q.routing(0), Q.dst_opts())),
     "nat6-udp", 41007, "udp"),
    ("tagged, with a chain", request6(syn_l4(41008), chain=(Q.hbh(pad=4), Q.dst_opts()), tag=7),
     "nat6-dicom", 41008, "tcp"),
]


@pytest.mark.parametrize("what,packet,service,sport,proto", REQUESTS6, ids=[r[0] for r in REQUESTS6])
def test_request6_is_translated_to_the_backends_address_and_port(nat6, what, packet, service, sport, proto):
    dport, backend_port = (DICOM_PORT, PACS_PORT) if proto == "tcp" else (UDP_PORT, UDP_BACKEND_PORT)
    address = nat6.predict(service, CLIENT6, sport, dport, proto)
    octet = int(address.rsplit(":", 1)[1])
    before = nat_count(nat6, "request")
    verdict = nat6.run(packet)
    assert verdict.action == TX, verdict.action_name
    assert_checksum6(verdict.data)
    assert verdict.data == translated6(packet, dst=address, dport=backend_port, dst_mac=_mac(mac_of(octet)),
                                       src_mac=P.GW)
    assert nat_count(nat6, "request") == before + 1


def test_udp6_request_with_a_zero_checksum_is_dropped_and_counted(nat6):
    """RFC 8200 8.1: IPv6 UDP has no "no checksum"; a receiver discards it."""
    packet = request6(UDP(sport=41100, dport=UDP_PORT, chksum=0) / Raw(b"none"))
    before = nat_count(nat6, "untranslatable")
    assert nat6.run(packet).action == DROP
    assert nat_count(nat6, "untranslatable") == before + 1


def test_udp6_checksum_that_becomes_zero_is_sent_as_all_ones(nat6):
    sport = 41200
    address = nat6.predict("nat6-udp", CLIENT6, sport, UDP_PORT, "udp")
    for n in range(70000):
        payload = n.to_bytes(4, "big")
        out = IPv6(bytes(IPv6(src=CLIENT6, dst=address) / UDP(sport=sport, dport=UDP_BACKEND_PORT) / Raw(payload)))
        if out[UDP].chksum == 0xFFFF:   # scapy writes a computed 0 as 0xffff
            break
    else:
        pytest.fail("no payload found")
    verdict = nat6.run(request6(UDP(sport=sport, dport=UDP_PORT) / Raw(payload)))
    assert verdict.action == TX
    assert Ether(verdict.data)[UDP].chksum == 0xFFFF


def test_request6_to_a_backend_whose_target_is_unpublished_is_dropped(nat6):
    """nat_backends6 follows rule 1: with `ready` 0 (the controller rewriting
    it) the fields are not read and the request is dropped (TCP resends)."""
    sport = 41300
    address = nat6.predict("nat6-dicom", CLIENT6, sport, DICOM_PORT, "tcp")
    bid = nat6.backend_id("nat6-dicom", address)
    table = nat6.dp.map("nat_backends6")
    published = structs.NatBackend6.from_buffer_copy(bytes(table[bid]))
    hidden = structs.NatBackend6.from_buffer_copy(bytes(published))
    hidden.ready = 0
    table[bid] = hidden
    try:
        before = nat_count(nat6, "no_target")
        assert nat6.run(request6(syn_l4(sport))).action == DROP
        assert nat_count(nat6, "no_target") == before + 1
    finally:
        table[bid] = published
    assert nat6.run(request6(syn_l4(sport))).action == TX


def test_dsr_ipv6_service_beside_nat6_is_untouched_beyond_the_macs(nat6):
    nat6.program(nat6_services() + (Q.service6("dicom6-dsr", 11112),))
    packet = Q.syn6(dport=11112, sport=41400)
    verdict = nat6.run(packet)
    assert verdict.action == TX
    assert verdict.data == P.rewritten(packet, Q.mac_of_address(
        nat6.predict("dicom6-dsr", CLIENT6, 41400, 11112, "tcp")))


# ---- replies: [backend]:4242 -> [client] becomes [VIP6]:104 -> [client] -----

class NatNet6:
    """The IPv6 reply path's network (see the module's docstring)."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.gw = FibNet(f"xnat6gw{tag}")
        self.rtr = FibNet(f"xnat6rt{tag}")
        gw, rtr = self.gw.ip, self.rtr.ip
        gw("link", "add", "gw0", "address", P.GW, "type", "veth", "peer", "name", "rt0", "netns", self.rtr.name)
        gw("link", "add", "gw1", "type", "veth", "peer", "name", "gw1p")
        gw("-6", "addr", "add", "2001:db8:c::10/64", "dev", "gw0", "nodad")
        gw("-6", "addr", "add", f"{GW_PACS6}/64", "dev", "gw0", "nodad")
        gw("-6", "addr", "add", "2001:db8:16::1/64", "dev", "gw1", "nodad")
        rtr("link", "set", "rt0", "address", ROUTER_MAC)
        rtr("-6", "addr", "add", f"{ROUTER6}/64", "dev", "rt0", "nodad")
        rtr("link", "set", "rt0", "up")
        for link in ("gw0", "gw1", "gw1p"):
            gw("link", "set", link, "up")
        gw("-6", "route", "add", "2001:db8:50::/64", "via", ROUTER6)
        gw("-6", "neigh", "replace", CLIENT6, "lladdr", P.CLIENT_MAC, "dev", "gw0", "nud", "permanent")
        gw("-6", "neigh", "replace", OTHER6, "lladdr", OTHER6_MAC, "dev", "gw1", "nud", "permanent")
        self.gw.sysctl("net.ipv6.conf.all.forwarding=1")   # after gw0 and gw1 exist: it sets theirs too
        self.learn_router()
        self.ifindex = {name: self.gw.ifindex(name) for name in ("gw0", "gw1")}
        self.inside = self.gw.inside
        self.ip = self.gw.ip

    def learn_router(self) -> None:
        """The router's MAC, learnt by Neighbour Discovery (the kernel's own)."""
        deadline = time.monotonic() + 10
        while subprocess.run(["ip", "netns", "exec", self.gw.name, "ping", "-6", "-c", "1", "-W", "1", ROUTER6],
                             stdout=subprocess.DEVNULL).returncode != 0:
            assert time.monotonic() < deadline, f"{ROUTER6} never answered"

    def close(self) -> None:
        self.gw.close()
        self.rtr.close()


@pytest.fixture(scope="module")
def net6():
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces")
    n = NatNet6()
    yield n
    n.close()


def from_pacs6(l4, dst=CLIENT6, src=PACS6[0], tag=None, chain=(), **ip):
    frame = Ether(src=_mac(mac_of(int(src.rsplit(":", 1)[1], 16) % 256)), dst=P.GW)
    if tag is not None:
        frame = frame / Dot1Q(vlan=tag)
    pkt = frame / IPv6(src=src, dst=dst, **ip)
    for ext in chain:
        pkt = pkt / ext
    return pkt / l4


def tcp_reply(dport=41000, sport=PACS_PORT):
    return TCP(sport=sport, dport=dport, flags="SA", seq=5000, ack=1001)


REPLIES6 = [
    ("TCP to an on-link client", from_pacs6(tcp_reply()), P.CLIENT_MAC),
    ("TCP with data", from_pacs6(TCP(sport=PACS_PORT, dport=41000, flags="PA") / Raw(b"P-DATA-TF" * 20)),
     P.CLIENT_MAC),
    ("TCP to a client behind a router", from_pacs6(tcp_reply(), dst=REMOTE6), ROUTER_MAC),
    ("a flow label and traffic class", from_pacs6(tcp_reply(), fl=0xBEEF5, tc=0x28), P.CLIENT_MAC),
    ("destination options", from_pacs6(tcp_reply(), chain=(Q.dst_opts(pad=4),)), P.CLIENT_MAC),
    ("hop-by-hop options, then routing (segments left 0)", from_pacs6(tcp_reply(), chain=(Q.hbh(), Q.routing(0))),
     P.CLIENT_MAC),
    ("802.1Q tag kept", from_pacs6(tcp_reply(), tag=42), P.CLIENT_MAC),
    ("UDP", from_pacs6(UDP(sport=UDP_BACKEND_PORT, dport=41000) / Raw(b"pong")), P.CLIENT_MAC),
    ("UDP behind a router, with a chain", from_pacs6(UDP(sport=UDP_BACKEND_PORT, dport=41000) / Raw(b"pong!"),
                                                     dst=REMOTE6, chain=(Q.hbh(pad=12),)), ROUTER_MAC),
]


@pytest.mark.parametrize("what,packet,next_hop_mac", REPLIES6, ids=[r[0] for r in REPLIES6])
def test_reply6_is_translated_back_to_the_vip_and_service_port(nat6, net6, what, packet, next_hop_mac):
    vport = UDP_PORT if UDP in packet else DICOM_PORT
    before = nat_count(nat6, "reply_tx")
    verdict = reply_run(nat6, net6, packet)
    assert verdict.action == TX, verdict.action_name
    assert_checksum6(verdict.data)
    assert verdict.data == translated6(packet, src=str(VIP6), sport=vport, dst_mac=next_hop_mac, src_mac=P.GW)
    assert nat_count(nat6, "reply_tx") == before + 1


def test_reply6_whose_next_hop_is_on_another_interface_is_redirected(nat6, net6):
    packet = from_pacs6(tcp_reply(), dst=OTHER6)
    before = nat_count(nat6, "reply_redirect")
    verdict = reply_run(nat6, net6, packet)
    assert verdict.action == REDIRECT, verdict.action_name
    gw1_mac = Ether(verdict.data).src
    assert gw1_mac != P.GW
    assert verdict.data == translated6(packet, src=str(VIP6), sport=DICOM_PORT, dst_mac=OTHER6_MAC, src_mac=gw1_mac)
    assert nat_count(nat6, "reply_redirect") == before + 1


def test_tagged_reply6_whose_next_hop_is_on_another_interface_is_dropped(nat6, net6):
    before = nat_count(nat6, "untranslatable")
    assert reply_run(nat6, net6, from_pacs6(tcp_reply(), dst=OTHER6, tag=42)).action == DROP
    assert nat_count(nat6, "untranslatable") == before + 1


def test_udp6_reply_with_a_zero_checksum_is_dropped_and_counted_never_passed(nat6, net6):
    packet = from_pacs6(UDP(sport=UDP_BACKEND_PORT, dport=41000, chksum=0) / Raw(b"none"))
    before = nat_count(nat6, "untranslatable")
    assert reply_run(nat6, net6, packet).action == DROP
    assert nat_count(nat6, "untranslatable") == before + 1


@pytest.mark.parametrize("what,packet", [
    ("a port no NAT backend listens on", from_pacs6(TCP(sport=22, dport=41000, flags="SA"))),
    ("a NAT port from another address", from_pacs6(tcp_reply(), src="2001:db8:30::99")),
    ("a NAT port of another protocol", from_pacs6(UDP(sport=PACS_PORT, dport=41000))),
])
def test_reply6_without_state_passes_untouched(nat6, net6, what, packet):
    verdict = reply_run(nat6, net6, packet)
    assert verdict.action == PASS, verdict.action_name
    assert verdict.data == bytes(packet)


def test_backends_answer_to_the_gateway_itself_passes_untouched6(nat6, net6):
    packet = from_pacs6(tcp_reply(dport=50123), dst=GW_PACS6)
    before = nat_count(nat6, "stack")
    verdict = reply_run(nat6, net6, packet)
    assert verdict.action == PASS, verdict.action_name
    assert verdict.data == bytes(packet)
    assert nat_count(nat6, "stack") == before + 1


@pytest.mark.parametrize("kind", ["blackhole", "unreachable", "prohibit"])
def test_reply6_whose_route_forbids_forwarding_is_dropped_never_passed(nat6, net6, kind):
    net6.ip("-6", "route", "replace", kind, "2001:db8:dead::/64")
    try:
        before = nat_count(nat6, "no_route")
        assert reply_run(nat6, net6, from_pacs6(tcp_reply(), dst=NOWHERE6)).action == DROP
        assert nat_count(nat6, "no_route") == before + 1
    finally:
        net6.ip("-6", "route", "del", "2001:db8:dead::/64")


def test_reply6_without_any_route_passes_to_the_stack_which_cannot_forward_it_either(nat6, net6):
    packet = from_pacs6(tcp_reply(), dst=NOWHERE6)
    before = nat_count(nat6, "stack")
    verdict = reply_run(nat6, net6, packet)
    assert verdict.action == PASS and verdict.data == bytes(packet)
    assert nat_count(nat6, "stack") == before + 1


@FORWARDING_CASES
def test_reply6_is_forwarded_by_the_ingress_interfaces_own_forwarding_not_the_switch(nat6, net6, everywhere, own):
    packet = from_pacs6(tcp_reply())
    with forwarding(net6, 6, everywhere, own) as xdplb_reads:
        before = nat_count(nat6, "no_route")
        verdict = reply_run(nat6, net6, packet)
    if own:
        assert verdict.action == TX, verdict.action_name
        assert verdict.data == translated6(packet, src=str(VIP6), sport=DICOM_PORT, dst_mac=P.CLIENT_MAC,
                                           src_mac=P.GW)
    else:   # dropped, never passed untranslated
        assert verdict.action == DROP, verdict.action_name
        assert nat_count(nat6, "no_route") == before + 1
    assert xdplb_reads is own, "attach and reload read the setting the kernel's lookup reads"


def test_reply6_bigger_than_the_next_hops_mtu_is_dropped_never_passed(nat6, net6):
    net6.ip("link", "set", "gw0", "mtu", "1280")
    try:
        before = nat_count(nat6, "no_route")
        packet = from_pacs6(TCP(sport=PACS_PORT, dport=41000, flags="PA") / Raw(b"D" * 1400))
        assert reply_run(nat6, net6, packet).action == DROP
        assert nat_count(nat6, "no_route") == before + 1
    finally:
        net6.ip("link", "set", "gw0", "mtu", "1500")


def test_next_hop6_without_a_neighbour_drops_until_it_is_resolved(nat6, net6):
    net6.ip("-6", "neigh", "flush", "dev", "gw0", "to", ROUTER6)
    packet = from_pacs6(tcp_reply(), dst=REMOTE6)
    before = nat_count(nat6, "no_neigh")
    assert reply_run(nat6, net6, packet).action == DROP
    assert nat_count(nat6, "no_neigh") == before + 1
    net6.learn_router()
    verdict = reply_run(nat6, net6, packet)
    assert verdict.action == TX, verdict.action_name
    assert Ether(verdict.data).dst == ROUTER_MAC


def test_packet_too_big_to_the_vip_about_a_nat6_reply_is_dropped_and_counted(nat6):
    quoted = Q.reply6(sport=DICOM_PORT, dport=41000, src=str(VIP6), dst=CLIENT6)
    before = nat_count(nat6, "icmp")
    assert nat6.run(Q.too_big6(quoted)).action == DROP
    assert nat_count(nat6, "icmp") == before + 1


def test_nat6_flow_replies_survive_a_backend_leaving_and_joining(nat6, net6):
    owner = Ether(nat6.run(request6(syn_l4(41500))).data)[IPv6].dst
    others = [a for a in PACS6 if a != owner]
    packet = from_pacs6(tcp_reply(dport=41500), src=owner)
    nat6.program(nat6_services(backends=[owner, others[0]]))
    assert reply_run(nat6, net6, packet).action == TX
    assert Ether(nat6.run(request6(TCP(sport=41500, dport=DICOM_PORT, flags="A"))).data)[IPv6].dst == owner
    nat6.program(nat6_services())
    verdict = reply_run(nat6, net6, packet)
    assert verdict.action == TX
    assert Ether(verdict.data)[IPv6].src == str(VIP6)


# ---- both families on the same ports --------------------------------------------

def test_dual_stack_nat_on_the_same_ports_and_the_shared_port_bitmap(nat6, net6):
    """IPv4 and IPv6 NAT services whose backends listen on the same ports:
    each family translates with its own maps, and nat_ports (shared) keeps a
    port's bit while either family still has a backend on it."""
    from .test_nat import PACS, from_pacs

    nat6.program(nat_services() + nat6_services())
    reply4 = from_pacs(TCP(sport=PACS_PORT, dport=40000, flags="SA"), src=PACS[0], dst="10.30.0.200")
    request4 = P.syn(sport=40700)
    assert nat6.run(request4).action == TX and Ether(nat6.run(request4).data)[TCP].dport == PACS_PORT
    assert reply_run(nat6, net6, from_pacs6(tcp_reply())).action == TX
    nat6.program(nat6_services())                # IPv4 NAT goes: port 4242 still has IPv6 backends
    assert reply_run(nat6, net6, from_pacs6(tcp_reply())).action == TX
    assert reply_run(nat6, net6, reply4).action == PASS
    nat6.program(nat_services())                 # and back: IPv6 goes, IPv4 keeps the port
    verdict = reply_run(nat6, net6, from_pacs6(tcp_reply()))
    assert verdict.action == PASS and verdict.data == bytes(from_pacs6(tcp_reply()))
    word, bit = divmod(PACS_PORT, 32)
    assert nat6.dp.map("nat_ports")[word].value & (1 << bit)
    assert not list(nat6.dp.map("nat_reverse6").keys()) and not list(nat6.dp.map("nat_addrs6").keys())


def test_a_reverse6_value_replaced_in_place_is_followed_by_a_grace_period(nat6):
    """lb_maps6.h: a replaced nat_reverse6 element becomes the CPU's spare,
    which the next replacement reuses; the kernel layer waits a grace period
    after each replacement so no reader still holds it then. A new key needs
    none (its element comes from the free list)."""
    dp = nat6.dp
    dp.grace_period()                             # settle whatever the fixture wrote
    fresh = plan.PutNatReverse(ipaddress.IPv6Address("2001:db8:30::77"), 4242, "tcp", VIP6, DICOM_PORT)
    before = dp.grace_periods
    dp.apply([fresh])
    assert dp.grace_periods == before
    dp.apply([plan.replace(fresh, vport=11112)])
    assert dp.grace_periods == before + 1
    key = structs.NatRevKey6.of(fresh.address, 4242, "tcp")
    assert structs.NatRevValue6.from_buffer_copy(bytes(dp.map("nat_reverse6")[key])).vport == \
        structs.NatRevValue6.of(VIP6, 11112, 4242).vport
    dp.apply([plan.DelNatReverse(fresh.address, 4242, "tcp")])


# ---- what cannot be translated from an IPv6 NAT backend: dropped, never passed ----

def fragments6(packet, cut: int = 24) -> list:
    """`packet` (from_pacs6, no chain) cut in two IPv6 fragments, the first
    carrying `cut` bytes of the TCP/UDP header and payload."""
    eth = Ether(bytes(packet))
    ip = eth[IPv6]
    payload = bytes(ip.payload)
    head = Ether(src=eth.src, dst=eth.dst) / IPv6(src=ip.src, dst=ip.dst)
    return [head / IPv6ExtHdrFragment(nh=ip.nh, offset=0, m=1, id=9) / Raw(payload[:cut]),
            head / IPv6ExtHdrFragment(nh=ip.nh, offset=cut // 8, m=0, id=9) / Raw(payload[cut:])]


BACKEND_FRAGMENTS6 = [
    ("first TCP fragment", 0, TCP(sport=PACS_PORT, dport=41000, flags="PA") / Raw(b"P" * 60)),
    ("later TCP fragment", -1, TCP(sport=PACS_PORT, dport=41000, flags="PA") / Raw(b"P" * 60)),
    ("later UDP fragment", -1, UDP(sport=UDP_BACKEND_PORT, dport=41000) / Raw(b"U" * 60)),
    ("TCP fragment from another port", -1, TCP(sport=22, dport=41000, flags="PA") / Raw(b"S" * 60)),
]


@pytest.mark.parametrize("what,index,l4", BACKEND_FRAGMENTS6, ids=[f[0] for f in BACKEND_FRAGMENTS6])
@pytest.mark.parametrize("dst", [CLIENT6, REMOTE6])
def test_fragment_from_a_nat6_backend_to_a_client_is_dropped_and_counted(nat6, net6, what, index, l4, dst):
    packet = fragments6(from_pacs6(l4, dst=dst))[index]
    before = nat_count(nat6, "fragment")
    verdict = reply_run(nat6, net6, packet)
    assert verdict.action == DROP, verdict.action_name
    assert nat_count(nat6, "fragment") == before + 1


@pytest.mark.parametrize("what,packet", [
    ("to the gateway itself", fragments6(from_pacs6(tcp_reply() / Raw(b"H" * 60), dst=GW_PACS6))[-1]),
    ("from an address that is no NAT backend",
     fragments6(from_pacs6(tcp_reply() / Raw(b"H" * 60), src="2001:db8:30::99"))[-1]),
    ("an ICMPv6 fragment from a NAT backend", fragments6(from_pacs6(ICMPv6EchoReply(data=b"I" * 60)))[-1]),
])
def test_other_ipv6_fragments_still_pass_to_the_stack(nat6, net6, what, packet):
    assert_passes_uncounted(nat6, net6, packet, "fragment")


def truncated6(packet, keep: int) -> Ether:
    """`packet` cut `keep` bytes into its L4 header, payload length made to match."""
    eth = Ether(bytes(packet))
    ip = eth[IPv6]
    raw = bytes(ip)
    l4_at = len(raw) - len(bytes(ip[TCP] if TCP in ip else ip[UDP]))
    cut = raw[:l4_at + keep]
    head = IPv6(cut[:40])
    head.plen = len(cut) - 40
    return Ether(src=eth.src, dst=eth.dst) / IPv6(bytes(head) + cut[40:])


@pytest.mark.parametrize("l4", [tcp_reply(), UDP(sport=UDP_BACKEND_PORT, dport=41000)], ids=["TCP", "UDP"])
@pytest.mark.parametrize("chain", [(), (Q.dst_opts(),)], ids=["no chain", "destination options"])
def test_nat6_backend_reply_with_a_truncated_l4_header_is_dropped_and_counted(nat6, net6, l4, chain):
    packet = truncated6(from_pacs6(l4, chain=chain), 6)
    before = nat_count(nat6, "truncated")
    verdict = reply_run(nat6, net6, packet)
    assert verdict.action == DROP, verdict.action_name
    assert nat_count(nat6, "truncated") == before + 1


def test_truncated_l4_header6_to_the_gateway_itself_passes(nat6, net6):
    assert_passes_uncounted(nat6, net6, truncated6(from_pacs6(tcp_reply(dport=50123), dst=GW_PACS6), 6), "truncated")


# A chain the program does not walk to its end: more than IPV6_EXT_MAX (4)
# extension headers, or a routing header with Segments Left > 0. Its ports
# are never read, so from a NAT backend's address and routed on it could be a
# reply leaving untranslated: dropped, whatever its protocol and port.
UNWALKED6 = [
    ("over the limit", (Q.hbh(), Q.dst_opts(), Q.routing(0), Q.dst_opts(), Q.dst_opts()), "ipv6_ext_limit"),
    ("routing, segments left 1", (Q.routing(1),), "ipv6_routing"),
    ("segment routing (type 4), segments left 2", (Q.routing(2, 4),), "ipv6_routing"),
]
UNWALKED6_L4 = [
    ("TCP reply", tcp_reply()),
    ("UDP reply", UDP(sport=UDP_BACKEND_PORT, dport=41000) / Raw(b"pong")),
    ("TCP from another port", TCP(sport=22, dport=41000, flags="PA") / Raw(b"S")),
    ("ICMPv6 echo reply", ICMPv6EchoReply(data=b"I" * 8)),
]


def event_count(h, name: str) -> int:
    return h.stats().events[name]


@pytest.mark.parametrize("what,chain,event", UNWALKED6, ids=[u[0] for u in UNWALKED6])
@pytest.mark.parametrize("l4", [u[1] for u in UNWALKED6_L4], ids=[u[0] for u in UNWALKED6_L4])
@pytest.mark.parametrize("dst", [CLIENT6, REMOTE6])
def test_unwalked_chain_from_a_nat6_backend_routed_on_is_dropped_and_counted(nat6, net6, what, chain, event, l4,
                                                                              dst):
    packet = from_pacs6(l4, dst=dst, chain=chain)
    untranslatable, seen = nat_count(nat6, "untranslatable"), event_count(nat6, event)
    verdict = reply_run(nat6, net6, packet)
    assert verdict.action == DROP, verdict.action_name
    assert nat_count(nat6, "untranslatable") == untranslatable + 1
    assert event_count(nat6, event) == seen + 1


@pytest.mark.parametrize("what,chain,event", UNWALKED6, ids=[u[0] for u in UNWALKED6])
@pytest.mark.parametrize("whence,packet_of", [
    ("from an address that is no NAT backend", lambda chain: from_pacs6(tcp_reply(), src="2001:db8:30::99",
                                                                        chain=chain)),
    ("to the gateway itself", lambda chain: from_pacs6(tcp_reply(dport=50123), dst=GW_PACS6, chain=chain)),
], ids=["not a NAT backend", "to the gateway"])
def test_unwalked_chain6_still_passes_to_the_stack_and_counts_its_event(nat6, net6, what, chain, event, whence,
                                                                        packet_of):
    packet = packet_of(chain)
    seen = event_count(nat6, event)
    assert_passes_uncounted(nat6, net6, packet, "untranslatable")
    assert event_count(nat6, event) == seen + 1


@pytest.mark.parametrize("what,chain,event", UNWALKED6, ids=[u[0] for u in UNWALKED6])
def test_unwalked_chain6_to_a_vip_from_a_nat6_backend_passes_as_before(nat6, net6, what, chain, event):
    """To a VIP it is no reply to a client, and passes as before; the VIP is
    routed on (via the router) for the test, so the VIP, not the route, decides."""
    net6.ip("-6", "route", "add", f"{VIP6}/128", "via", ROUTER6)
    try:
        seen = event_count(nat6, event)
        assert_passes_uncounted(nat6, net6, from_pacs6(tcp_reply(), dst=str(VIP6), chain=chain), "untranslatable")
        assert event_count(nat6, event) == seen + 1
    finally:
        net6.ip("-6", "route", "del", f"{VIP6}/128", "via", ROUTER6)


def test_nat_addrs6_follow_the_nat6_backends(nat6, net6):
    packet = fragments6(from_pacs6(tcp_reply() / Raw(b"H" * 60), src=PACS6[2]))[-1]
    assert reply_run(nat6, net6, packet).action == DROP
    nat6.program(nat6_services(backends=PACS6[:2]))
    addrs = {bytes(k) for k in nat6.dp.map("nat_addrs6").keys()}
    assert addrs == {ipaddress.IPv6Address(a).packed for a in PACS6[:2]}
    assert reply_run(nat6, net6, packet).action == PASS


# ---- ICMPv6 errors an IPv6 NAT backend sends about a NAT flow: dropped and counted ----

def backend_icmp6(quoted_l4, icmp=None, dst=CLIENT6, backend=PACS6[0], chain=()):
    """An ICMPv6 error from `backend` to `dst` quoting what the backend got:
    dst -> backend:port (a translated request)."""
    quoted = IPv6(src=dst, dst=backend)
    for ext in chain:
        quoted = quoted / ext
    quoted = quoted / quoted_l4 / Raw(b"q" * 16)
    return from_pacs6((icmp or ICMPv6DestUnreach(code=4)) / bytes(quoted), dst=dst, src=backend)


BACKEND_ICMP6 = [
    ("UDP port unreachable", UDP(sport=41000, dport=UDP_BACKEND_PORT), None, CLIENT6, ()),
    ("TCP packet too big", TCP(sport=41000, dport=PACS_PORT), ICMPv6PacketTooBig(mtu=1280), CLIENT6, ()),
    ("TCP parameter problem", TCP(sport=41000, dport=PACS_PORT), ICMPv6ParamProblem(code=0), REMOTE6, ()),
    ("TCP time exceeded", TCP(sport=41000, dport=PACS_PORT), ICMPv6TimeExceeded(code=0), CLIENT6, ()),
    ("quoting a chain", TCP(sport=41000, dport=PACS_PORT), ICMPv6DestUnreach(code=1), CLIENT6, (Q.dst_opts(),)),
]


@pytest.mark.parametrize("what,quoted,icmp,dst,chain", BACKEND_ICMP6, ids=[b[0] for b in BACKEND_ICMP6])
def test_icmp6_error_from_a_nat6_backend_about_a_nat_flow_is_dropped_and_counted(nat6, net6, what, quoted, icmp,
                                                                                  dst, chain):
    before = nat_count(nat6, "icmp")
    verdict = reply_run(nat6, net6, backend_icmp6(quoted, icmp, dst, chain=chain))
    assert verdict.action == DROP, verdict.action_name
    assert nat_count(nat6, "icmp") == before + 1


@pytest.mark.parametrize("what,packet", [
    ("about a port that is no NAT backend's", backend_icmp6(TCP(sport=41000, dport=22))),
    ("to the gateway itself (a health check)", backend_icmp6(TCP(sport=50123, dport=PACS_PORT), dst=GW_PACS6)),
    ("an echo reply", from_pacs6(ICMPv6EchoReply(data=b"ping"))),
    ("sent elsewhere than the quoted packet's source",
     from_pacs6(ICMPv6DestUnreach(code=4) / bytes(IPv6(src=CLIENT6, dst=PACS6[0])
                                                  / UDP(sport=41000, dport=UDP_BACKEND_PORT)), dst=REMOTE6)),
])
def test_other_icmp6_from_a_nat6_backend_passes(nat6, net6, what, packet):
    assert_passes_uncounted(nat6, net6, packet, "icmp")


# ---- a hitless restart with adopted maps ----------------------------------------

from .test_pinning import bpffs, loaded  # noqa: E402,F401  (fixtures)


def test_nat6_flows_survive_a_restart_that_adopts_the_pinned_maps(bpffs, loaded, net6):
    """As for IPv4: a second controller adopting the pins reads nat_backends6 and
    nat_reverse6 back, plans no NAT write, and an established IPv6 NAT flow's
    request and reply both still translate."""
    from xdplb.config import Settings

    from .conftest import Harness

    settings = Settings(hash_seed=0x5EED, maglev_size=251)
    first = Harness(loaded(settings, bpffs / "eth0"), settings)
    first.program(nat6_services())
    owner = Ether(first.run(request6(syn_l4(41600))).data)[IPv6].dst

    dp = loaded(settings, bpffs / "eth0")
    assert dp.adopted
    state = dp.read_state()
    assert {(str(a), p, proto) for a, p, proto in state.nat_reverse} == \
        {(a, port, proto) for a in PACS6 for port, proto in ((PACS_PORT, "tcp"), (UDP_BACKEND_PORT, "udp"))}
    second = Harness(dp, settings)
    second.applied = plan.adopt(state, {s.key: s.name for s in nat6_services()})
    result = second.program(nat6_services())
    assert not [op for op in result.ops if isinstance(op, (plan.PutNatReverse, plan.DelNatReverse,
                                                            plan.PutBackend, plan.ClearBackend))]
    request = second.run(request6(TCP(sport=41600, dport=DICOM_PORT, flags="A")))
    assert request.action == TX and Ether(request.data)[IPv6].dst == owner
    assert Ether(request.data)[TCP].dport == PACS_PORT
    reply = reply_run(second, net6, from_pacs6(tcp_reply(dport=41600), src=owner))
    assert reply.action == TX and Ether(reply.data)[IPv6].src == str(VIP6)
    assert_checksum6(reply.data)
