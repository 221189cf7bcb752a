"""forwarding = "nat": the request and reply translations (bpf/nat.h).

The real program under BPF_PROG_TEST_RUN (no XDP mode: the kernel runs it on
the test's buffer). Every translated frame is compared byte for byte with
the frame scapy builds from scratch with the new addresses and ports, and
each checksum (IPv4 header, TCP/UDP) is also recomputed by scapy and
compared on its own, so a failure names the checksum that is wrong.

Replies need bpf_fib_lookup, so they run with the calling thread inside a
network namespace of their own (NatNet): the gateway's interface gw0 (MAC
GW_MAC, 10.10.0.10/24 for the clients, 10.30.0.1/24 for the PACS) whose
veth peer sits in a router namespace answering ARP for 10.10.0.1, which
routes 192.168.50.0/24; gw1 (172.16.0.1/24) is a second interface.
"""
from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import subprocess
import time

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, TCPerror
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Raw

from xdplb import bpfsys, plan, structs
from tools.bench.fibnet import FibNet
from xdplb.netlink import Netlink

from . import packets as P
from .conftest import CLIENT, GW_MAC, VIP, mac_of

pytestmark = pytest.mark.root

TX, PASS, DROP, REDIRECT = structs.XDP_TX, structs.XDP_PASS, structs.XDP_DROP, structs.XDP_REDIRECT
PACS = ("10.30.0.11", "10.30.0.12", "10.30.0.13")
DICOM_PORT, PACS_PORT = 104, 4242          # modalities call 104, Orthanc listens on 4242
UDP_PORT, UDP_BACKEND_PORT = 5000, 6000
ROUTER_MAC = "02:00:0a:0a:00:01"
REMOTE_CLIENT = "192.168.50.7"             # behind the router 10.10.0.1
OTHER_SIDE = "172.16.0.5"                  # on gw1
OTHER_SIDE_MAC = "02:00:ac:10:00:05"
UNRESOLVED = "10.10.0.77"                  # on-link, no neighbour entry
GW_ADDR = "10.10.0.10"


def pacs_backend(address: str, port: int = PACS_PORT) -> plan.BackendState:
    octet = int(address.rsplit(".", 1)[1])
    return plan.BackendState(f"pacs{octet}", ipaddress.IPv4Address(address), 1, mac_of(octet), True, port)


def nat_services(backends=PACS) -> tuple:
    return (
        plan.ServiceState("nat-dicom", VIP, DICOM_PORT, "tcp", "flow",
                          tuple(pacs_backend(a) for a in backends), "nat"),
        plan.ServiceState("nat-udp", VIP, UDP_PORT, "udp", "flow",
                          tuple(pacs_backend(a, UDP_BACKEND_PORT) for a in backends), "nat"),
    )


@pytest.fixture
def nat(harness):
    harness.program(nat_services())
    return harness


# ---- checksums, recomputed by scapy ----------------------------------------

def recomputed(frame: bytes) -> Ether:
    """The frame as scapy rebuilds it with every checksum computed afresh
    (a UDP checksum of 0, "none", stays 0)."""
    pkt = Ether(frame)
    del pkt[IP].chksum
    if TCP in pkt:
        del pkt[TCP].chksum
    elif UDP in pkt and pkt[UDP].chksum != 0:
        del pkt[UDP].chksum
    return Ether(bytes(pkt))


def assert_checksums(frame: bytes) -> None:
    got, want = Ether(frame), recomputed(frame)
    assert got[IP].chksum == want[IP].chksum, f"IPv4 header checksum {got[IP].chksum:#06x}, scapy {want[IP].chksum:#06x}"
    layer = TCP if TCP in got else UDP
    assert got[layer].chksum == want[layer].chksum, \
        f"{layer.__name__} checksum {got[layer].chksum:#06x}, scapy {want[layer].chksum:#06x}"


def translated(packet, *, dst=None, dport=None, src=None, sport=None, dst_mac, src_mac) -> bytes:
    """`packet` as the translation must leave it: new addresses, ports and
    MACs, every checksum computed from scratch by scapy."""
    pkt = Ether(bytes(packet))
    pkt.dst, pkt.src = dst_mac, src_mac
    l4 = pkt[TCP] if TCP in pkt else pkt[UDP]
    if dst is not None:
        pkt[IP].dst, l4.dport = dst, dport
    if src is not None:
        pkt[IP].src, l4.sport = src, sport
    return bytes(recomputed(bytes(pkt)))


def nat_count(h, name: str) -> int:
    return h.stats().nat[name]


# ---- requests: client -> VIP:104 becomes client -> backend:4242 -------------

def _mac(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def expect_request(h, packet, service, sport, dport, proto, backend_port):
    address = h.predict(service, CLIENT, sport, dport, proto)
    octet = int(address.rsplit(".", 1)[1])
    return translated(packet, dst=address, dport=backend_port, dst_mac=_mac(mac_of(octet)), src_mac=P.GW)


REQUESTS = [
    ("TCP SYN", P.syn(), "nat-dicom", 40000, "tcp"),
    ("TCP ACK with payload", P.ack(sport=40100), "nat-dicom", 40100, "tcp"),
    ("IPv4 options (IHL 9)", P.with_options(), "nat-dicom", 40003, "tcp"),
    ("802.1Q tag kept", P.vlan_syn(Dot1Q), "nat-dicom", 40001, "tcp"),
    ("UDP", P.udp(), "nat-udp", 40000, "udp"),
    ("UDP with a zero checksum", P.eth() / IP(src=CLIENT, dst=str(VIP)) / UDP(sport=40005, dport=UDP_PORT, chksum=0)
     / Raw(b"no checksum"), "nat-udp", 40005, "udp"),
]


@pytest.mark.parametrize("what,packet,service,sport,proto", REQUESTS, ids=[r[0] for r in REQUESTS])
def test_request_is_translated_to_the_backends_address_and_port(nat, what, packet, service, sport, proto):
    dport = DICOM_PORT if proto == "tcp" else UDP_PORT
    backend_port = PACS_PORT if proto == "tcp" else UDP_BACKEND_PORT
    before = nat_count(nat, "request")
    verdict = nat.run(packet)
    assert verdict.action == TX, verdict.action_name
    assert_checksums(verdict.data)
    assert verdict.data == expect_request(nat, packet, service, sport, dport, proto, backend_port)
    if "zero checksum" in what:
        assert Ether(verdict.data)[UDP].chksum == 0
    assert nat_count(nat, "request") == before + 1


def test_udp_checksum_that_becomes_zero_is_sent_as_all_ones(nat):
    # Search a payload whose translated checksum computes to 0: RFC 768 sends it as 0xffff.
    sport = 40200
    address = nat.predict("nat-udp", CLIENT, sport, UDP_PORT, "udp")
    for n in range(70000):
        payload = n.to_bytes(4, "big")
        out = IP(bytes(IP(src=CLIENT, dst=address) / UDP(sport=sport, dport=UDP_BACKEND_PORT) / Raw(payload)))
        if out[UDP].chksum == 0xFFFF:   # scapy writes a computed 0 as 0xffff
            break
    else:
        pytest.fail("no payload found")
    verdict = nat.run(P.eth() / IP(src=CLIENT, dst=str(VIP)) / UDP(sport=sport, dport=UDP_PORT) / Raw(payload))
    assert verdict.action == TX
    assert Ether(verdict.data)[UDP].chksum == 0xFFFF


def test_established_nat_flow_keeps_its_backend_when_another_leaves_and_joins(nat):
    packet = P.ack(sport=40300)
    first = nat.run(P.syn(sport=40300))
    owner = Ether(first.data)[IP].dst
    others = [a for a in PACS if a != owner]
    nat.program(nat_services(backends=[owner, others[0]]))       # one leaves
    assert Ether(nat.run(packet).data)[IP].dst == owner
    nat.program(nat_services())                                   # and joins again
    verdict = nat.run(packet)
    assert Ether(verdict.data)[IP].dst == owner and Ether(verdict.data)[TCP].dport == PACS_PORT
    assert_checksums(verdict.data)


def test_dsr_service_beside_nat_is_untouched_beyond_the_macs(nat):
    from .conftest import backend, service

    nat.program(nat_services() + (service("dicom-dsr", 11112, backends=(backend(11),)),))
    packet = P.syn(dport=11112, sport=40400)
    verdict = nat.run(packet)
    assert verdict.action == TX
    assert verdict.data == P.rewritten(packet, mac_of(11))


# ---- replies: backend:4242 -> client becomes VIP:104 -> client ---------------

class NatNet:
    """The reply path's network: namespace `gw` holds the gateway's interfaces,
    `rtr` the router at 10.10.0.1 (gw0's veth peer), which answers ARP."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.gw = FibNet(f"xnatgw{tag}")
        self.rtr = FibNet(f"xnatrt{tag}")
        gw, rtr = self.gw.ip, self.rtr.ip
        gw("link", "add", "gw0", "address", P.GW, "type", "veth", "peer", "name", "rt0", "netns", self.rtr.name)
        gw("link", "add", "gw1", "type", "veth", "peer", "name", "gw1p")
        gw("addr", "add", f"{GW_ADDR}/24", "dev", "gw0")
        gw("addr", "add", "10.30.0.1/24", "dev", "gw0")
        gw("addr", "add", "172.16.0.1/24", "dev", "gw1")
        rtr("addr", "add", "10.10.0.1/24", "dev", "rt0")
        rtr("link", "set", "rt0", "address", ROUTER_MAC)
        rtr("link", "set", "rt0", "up")
        for link in ("gw0", "gw1", "gw1p"):
            gw("link", "set", link, "up")
        gw("route", "add", "192.168.50.0/24", "via", "10.10.0.1")
        gw("neigh", "replace", CLIENT, "lladdr", P.CLIENT_MAC, "dev", "gw0", "nud", "permanent")
        gw("neigh", "replace", OTHER_SIDE, "lladdr", OTHER_SIDE_MAC, "dev", "gw1", "nud", "permanent")
        self.gw.sysctl("net.ipv4.ip_forward=1")   # again: gw0 and gw1 came after it
        # The router's MAC, learnt by ARP as the controller's solicit would (see the no-neighbour test).
        subprocess.run(["ip", "netns", "exec", self.gw.name, "ping", "-c", "1", "-W", "2", "10.10.0.1"],
                       check=True, stdout=subprocess.DEVNULL)
        self.ifindex = {name: self.gw.ifindex(name) for name in ("gw0", "gw1")}
        self.inside = self.gw.inside
        self.ip = self.gw.ip

    def close(self) -> None:
        self.gw.close()
        self.rtr.close()


@pytest.fixture(scope="module")
def net():
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces")
    n = NatNet()
    yield n
    n.close()


def reply_run(h, net, packet, ifname="gw0"):
    with net.inside():
        result = bpfsys.prog_test_run(h.dp.prog_fd, bytes(packet), ingress_ifindex=net.ifindex[ifname])
    from .conftest import Verdict

    return Verdict(result.retval, result.data)


def from_pacs(l4, dst=CLIENT, src=PACS[0], tag=None, **ip):
    frame = Ether(src=_mac(mac_of(int(src.rsplit(".", 1)[1]))), dst=P.GW)
    if tag is not None:
        frame = frame / Dot1Q(vlan=tag)
    return frame / IP(src=src, dst=dst, **ip) / l4


def tcp_reply(dport=40000, sport=PACS_PORT):
    return TCP(sport=sport, dport=dport, flags="SA", seq=5000, ack=1001)


REPLIES = [
    ("TCP to an on-link client", from_pacs(tcp_reply()), P.CLIENT_MAC),
    ("TCP with data", from_pacs(TCP(sport=PACS_PORT, dport=40000, flags="PA") / Raw(b"P-DATA-TF" * 20)), P.CLIENT_MAC),
    ("TCP to a client behind a router", from_pacs(tcp_reply(), dst=REMOTE_CLIENT), ROUTER_MAC),
    ("IPv4 options (IHL 9)", from_pacs(tcp_reply(), options=b"\x07\x0f\x04" + b"\x00" * 13), P.CLIENT_MAC),
    ("802.1Q tag kept", from_pacs(tcp_reply(), tag=42), P.CLIENT_MAC),
    ("UDP", from_pacs(UDP(sport=UDP_BACKEND_PORT, dport=40000) / Raw(b"pong")), P.CLIENT_MAC),
    ("UDP with a zero checksum", from_pacs(UDP(sport=UDP_BACKEND_PORT, dport=40000, chksum=0) / Raw(b"pong")),
     P.CLIENT_MAC),
]


@pytest.mark.parametrize("what,packet,next_hop_mac", REPLIES, ids=[r[0] for r in REPLIES])
def test_reply_is_translated_back_to_the_vip_and_service_port(nat, net, what, packet, next_hop_mac):
    vport = UDP_PORT if UDP in packet else DICOM_PORT
    before = nat_count(nat, "reply_tx")
    verdict = reply_run(nat, net, packet)
    assert verdict.action == TX, verdict.action_name
    assert_checksums(verdict.data)
    assert verdict.data == translated(packet, src=str(VIP), sport=vport, dst_mac=next_hop_mac, src_mac=P.GW)
    if "zero checksum" in what:
        assert Ether(verdict.data)[UDP].chksum == 0
    assert nat_count(nat, "reply_tx") == before + 1


def test_reply_whose_next_hop_is_on_another_interface_is_redirected(nat, net):
    packet = from_pacs(tcp_reply(), dst=OTHER_SIDE)
    verdict = reply_run(nat, net, packet)
    assert verdict.action == REDIRECT, verdict.action_name
    gw1_mac = Ether(verdict.data).src
    assert verdict.data == translated(packet, src=str(VIP), sport=DICOM_PORT, dst_mac=OTHER_SIDE_MAC, src_mac=gw1_mac)
    assert gw1_mac != P.GW


def test_tagged_reply_whose_next_hop_is_on_another_interface_is_dropped(nat, net):
    before = nat_count(nat, "untranslatable")
    assert reply_run(nat, net, from_pacs(tcp_reply(), dst=OTHER_SIDE, tag=42)).action == DROP
    assert nat_count(nat, "untranslatable") == before + 1


@pytest.mark.parametrize("what,packet", [
    ("a port no NAT backend listens on", from_pacs(TCP(sport=22, dport=40000, flags="SA"))),
    ("a NAT port from another address", from_pacs(tcp_reply(), src="10.30.0.99")),
    ("a NAT port of another protocol", from_pacs(UDP(sport=PACS_PORT, dport=40000))),
])
def test_reply_without_state_passes_untouched(nat, net, what, packet):
    verdict = reply_run(nat, net, packet)
    assert verdict.action == PASS, verdict.action_name
    assert verdict.data == bytes(packet)


def test_backends_answer_to_the_gateway_itself_passes_untouched(nat, net):
    # A health check's SYN-ACK: from a NAT backend:port, to the gateway's own address.
    packet = from_pacs(tcp_reply(dport=50123), dst="10.30.0.1")
    before = nat_count(nat, "stack")
    verdict = reply_run(nat, net, packet)
    assert verdict.action == PASS, verdict.action_name
    assert verdict.data == bytes(packet)
    assert nat_count(nat, "stack") == before + 1


@pytest.mark.parametrize("kind", ["blackhole", "unreachable", "prohibit"])
def test_reply_whose_route_forbids_forwarding_is_dropped_never_passed(nat, net, kind):
    net.ip("route", "replace", kind, "203.0.113.0/24")
    try:
        before = nat_count(nat, "no_route")
        assert reply_run(nat, net, from_pacs(tcp_reply(), dst="203.0.113.9")).action == DROP
        assert nat_count(nat, "no_route") == before + 1
    finally:
        net.ip("route", "del", "203.0.113.0/24")


def test_reply_without_any_route_passes_to_the_stack_which_cannot_forward_it_either(nat, net):
    packet = from_pacs(tcp_reply(), dst="203.0.113.9")
    verdict = reply_run(nat, net, packet)
    assert verdict.action == PASS and verdict.data == bytes(packet)


# bpf_fib_lookup reads the forwarding of the interface it is given, the
# ingress (IN_DEV_FORWARD(in_dev), idev->cnf.forwarding), never the namespace's
# switch (net.ipv4.ip_forward, net.ipv6.conf.all.forwarding): writing the switch
# sets every interface's, then gw0's own is set apart from it.
SWITCH = {4: "net.ipv4.ip_forward", 6: "net.ipv6.conf.all.forwarding"}
FORWARDING_CASES = pytest.mark.parametrize("everywhere,own", [(True, False), (False, True)],
                                           ids=["switch on, gw0 off", "switch off, gw0 on"])


@contextlib.contextmanager
def forwarding(net, version: int, everywhere: bool, own: bool):
    """The namespace's switch for IP `version` set to `everywhere`, then gw0's own to
    `own`, for the block; both on again after it. Yields whether xdplb's reader
    (Netlink.ip_forwarding, what attach and reload check) finds gw0 forwarding."""
    net.gw.sysctl(f"{SWITCH[version]}={int(everywhere)}")
    net.gw.sysctl(f"net.ipv{version}.conf.gw0.forwarding={int(own)}")
    try:
        switch = subprocess.run(["ip", "netns", "exec", net.gw.name, "sysctl", "-n", SWITCH[version]], check=True,
                                capture_output=True, text=True).stdout.strip()
        assert switch == str(int(everywhere)), "gw0's own setting left the switch as it was"
        with net.inside():
            nl = Netlink()
            try:
                reads = nl.ip_forwarding(version, "gw0")
            finally:
                nl.close()
        yield reads
    finally:
        net.gw.sysctl(f"{SWITCH[version]}=1")   # every interface's, gw0's included


@FORWARDING_CASES
def test_reply_is_forwarded_by_the_ingress_interfaces_own_forwarding_not_the_switch(nat, net, everywhere, own):
    packet = from_pacs(tcp_reply())
    with forwarding(net, 4, everywhere, own) as xdplb_reads:
        before = nat_count(nat, "no_route")
        verdict = reply_run(nat, net, packet)
    if own:
        assert verdict.action == TX, verdict.action_name
        assert verdict.data == translated(packet, src=str(VIP), sport=DICOM_PORT, dst_mac=P.CLIENT_MAC, src_mac=P.GW)
    else:   # dropped, never passed untranslated
        assert verdict.action == DROP, verdict.action_name
        assert nat_count(nat, "no_route") == before + 1
    assert xdplb_reads is own, "attach and reload read the setting the kernel's lookup reads"


def test_next_hop_without_a_neighbour_drops_until_the_controller_resolves_it(nat, net):
    """The fixture for BPF_FIB_LKUP_RET_NO_NEIGH: a client behind a router
    whose neighbour entry is gone. The reply is dropped and counted (never
    passed untranslated); Netlink.solicit, which the daemon calls for every
    unresolved route gateway of a NAT pool, makes the kernel ARP for it; the
    router answers; the next reply goes out."""
    net.ip("neigh", "flush", "dev", "gw0", "to", "10.10.0.1")
    packet = from_pacs(tcp_reply(), dst=REMOTE_CLIENT)
    before = nat_count(nat, "no_neigh")
    assert reply_run(nat, net, packet).action == DROP
    assert nat_count(nat, "no_neigh") == before + 1
    with net.inside():
        gateways = Netlink().route_gateways(net.ifindex["gw0"])
        assert ipaddress.IPv4Address("10.10.0.1") in gateways
        for gateway in gateways:
            Netlink.solicit(gateway)
    deadline = time.monotonic() + 5
    while (verdict := reply_run(nat, net, packet)).action != TX and time.monotonic() < deadline:
        time.sleep(0.05)
    assert verdict.action == TX, verdict.action_name
    assert Ether(verdict.data).dst == ROUTER_MAC


def test_icmp_frag_needed_about_a_nat_flow_is_dropped_and_counted(nat):
    quoted = IP(src=str(VIP), dst=CLIENT) / TCP(sport=DICOM_PORT, dport=40000, flags="A")
    packet = P.eth() / IP(src="10.10.0.1", dst=str(VIP)) / ICMP(type=3, code=4, nexthopmtu=1400) / bytes(quoted)[:28]
    before = nat_count(nat, "icmp")
    assert nat.run(packet).action == DROP
    assert nat_count(nat, "icmp") == before + 1


def test_nat_flow_replies_survive_a_backend_leaving_and_joining(nat, net):
    owner = Ether(nat.run(P.syn(sport=40500)).data)[IP].dst
    others = [a for a in PACS if a != owner]
    packet = from_pacs(tcp_reply(dport=40500), src=owner)
    nat.program(nat_services(backends=[owner, others[0]]))
    assert reply_run(nat, net, packet).action == TX
    nat.program(nat_services())
    verdict = reply_run(nat, net, packet)
    assert verdict.action == TX
    assert Ether(verdict.data)[IP].src == str(VIP)


# ---- a hitless restart with adopted maps ----------------------------------------

from .test_pinning import bpffs, loaded  # noqa: E402,F401  (fixtures)


def test_nat_flows_survive_a_restart_that_adopts_the_pinned_maps(bpffs, loaded, net):
    """The first controller's program and maps, then a second controller that
    adopts the pins (as after kill -9): the adopted state plans no NAT write,
    and an established NAT flow's request and reply both still translate."""
    from xdplb.config import Settings

    from .conftest import Harness

    settings = Settings(hash_seed=0x5EED, maglev_size=251)
    first = Harness(loaded(settings, bpffs / "eth0"), settings)
    first.program(nat_services())
    owner = Ether(first.run(P.syn(sport=40600)).data)[IP].dst

    dp = loaded(settings, bpffs / "eth0")
    assert dp.adopted
    second = Harness(dp, settings)
    second.applied = plan.adopt(dp.read_state(), {s.key: s.name for s in nat_services()})
    result = second.program(nat_services())
    assert not [op for op in result.ops if isinstance(op, (plan.PutNatReverse, plan.DelNatReverse,
                                                            plan.PutBackend, plan.ClearBackend))]
    request = second.run(P.ack(sport=40600))
    assert request.action == TX and Ether(request.data)[IP].dst == owner
    assert Ether(request.data)[TCP].dport == PACS_PORT
    reply = reply_run(second, net, from_pacs(tcp_reply(dport=40600), src=owner))
    assert reply.action == TX and Ether(reply.data)[IP].src == str(VIP)
    assert_checksums(reply.data)


# ---- what cannot be translated from a NAT backend: dropped, never passed ------
#
# Decided by the source address (nat_addrs): a later fragment carries no ports.

def fragments(packet) -> list:
    """`packet` (from_pacs) cut into IPv4 fragments of 24 payload bytes."""
    from scapy.layers.inet import fragment

    eth = Ether(bytes(packet))
    return [Ether(src=eth.src, dst=eth.dst) / piece for piece in fragment(eth[IP], fragsize=24)]


BACKEND_FRAGMENTS = [
    ("first TCP fragment", 0, TCP(sport=PACS_PORT, dport=40000, flags="PA") / Raw(b"P" * 60)),
    ("later TCP fragment", -1, TCP(sport=PACS_PORT, dport=40000, flags="PA") / Raw(b"P" * 60)),
    ("later UDP fragment", -1, UDP(sport=UDP_BACKEND_PORT, dport=40000) / Raw(b"U" * 60)),
    ("TCP fragment from another port", -1, TCP(sport=22, dport=40000, flags="PA") / Raw(b"S" * 60)),
]


@pytest.mark.parametrize("what,index,l4", BACKEND_FRAGMENTS, ids=[f[0] for f in BACKEND_FRAGMENTS])
@pytest.mark.parametrize("dst", [CLIENT, REMOTE_CLIENT])
def test_fragment_from_a_nat_backend_to_a_client_is_dropped_and_counted(nat, net, what, index, l4, dst):
    packet = fragments(from_pacs(l4, dst=dst))[index]
    before = nat_count(nat, "fragment")
    verdict = reply_run(nat, net, packet)
    assert verdict.action == DROP, verdict.action_name
    assert nat_count(nat, "fragment") == before + 1


@pytest.mark.parametrize("what,packet", [
    ("to the gateway itself", fragments(from_pacs(tcp_reply() / Raw(b"H" * 60), dst="10.30.0.1"))[-1]),
    ("from an address that is no NAT backend",
     fragments(from_pacs(tcp_reply() / Raw(b"H" * 60), src="10.30.0.99"))[-1]),
    ("an ICMP fragment from a NAT backend", fragments(from_pacs(ICMP() / Raw(b"I" * 60)))[-1]),
])
def test_other_fragments_still_pass_to_the_stack(nat, net, what, packet):
    assert_passes_uncounted(nat, net, packet, "fragment")


def assert_passes_uncounted(h, net, packet, counter: str) -> None:
    """`packet` passes to the stack byte for byte, and nat_stats[counter] stays."""
    before = nat_count(h, counter)
    verdict = reply_run(h, net, packet)
    assert verdict.action == PASS, verdict.action_name
    assert verdict.data == bytes(packet)
    assert nat_count(h, counter) == before


def truncated(packet, keep: int) -> Ether:
    """`packet` cut `keep` bytes into its L4 header, tot_len and checksum
    made to match (a valid IPv4 header: only the L4 header is short)."""
    eth = Ether(bytes(packet))
    ip = eth[IP]
    raw = bytes(ip)[:ip.ihl * 4 + keep]
    ip = IP(raw[:ip.ihl * 4])
    ip.len = len(raw)
    del ip.chksum
    return Ether(src=eth.src, dst=eth.dst) / IP(bytes(ip)[:ip.ihl * 4] + raw[ip.ihl * 4:])


@pytest.mark.parametrize("l4", [tcp_reply(), UDP(sport=UDP_BACKEND_PORT, dport=40000)], ids=["TCP", "UDP"])
def test_nat_backend_reply_with_a_truncated_l4_header_is_dropped_and_counted(nat, net, l4):
    packet = truncated(from_pacs(l4), 6)
    assert Ether(bytes(packet))[IP].chksum == recomputed(bytes(packet))[IP].chksum
    before = nat_count(nat, "truncated")
    verdict = reply_run(nat, net, packet)
    assert verdict.action == DROP, verdict.action_name
    assert nat_count(nat, "truncated") == before + 1


def test_truncated_l4_header_to_the_gateway_itself_passes(nat, net):
    packet = truncated(from_pacs(tcp_reply(dport=50123), dst="10.30.0.1"), 6)
    verdict = reply_run(nat, net, packet)
    assert verdict.action == PASS and verdict.data == bytes(packet)


def test_nat_addrs_follow_the_nat_backends(nat, net):
    """nat_addrs holds exactly the NAT backends' addresses: a backend that
    leaves every NAT service leaves it, and its fragments pass again."""
    packet = fragments(from_pacs(tcp_reply() / Raw(b"H" * 60), src=PACS[2]))[-1]
    assert reply_run(nat, net, packet).action == DROP
    nat.program(nat_services(backends=PACS[:2]))
    addrs = {bytes(k) for k in nat.dp.map("nat_addrs").keys()}
    assert addrs == {ipaddress.IPv4Address(a).packed for a in PACS[:2]}
    assert reply_run(nat, net, packet).action == PASS


# ---- ICMP errors a NAT backend sends about a NAT flow: dropped and counted ----

def backend_icmp(quoted_l4, icmp=None, dst=CLIENT, backend=PACS[0]):
    """An ICMP error from `backend` to `dst` quoting what the backend got:
    dst -> backend:port (a translated request)."""
    quoted = IP(src=dst, dst=backend) / quoted_l4
    return from_pacs(icmp or ICMP(type=3, code=3), dst=dst, src=backend) / bytes(quoted)[:28]


BACKEND_ICMP = [
    ("UDP port unreachable", UDP(sport=40000, dport=UDP_BACKEND_PORT), None, CLIENT),
    ("TCP frag needed", TCP(sport=40000, dport=PACS_PORT), ICMP(type=3, code=4, nexthopmtu=1400), CLIENT),
    ("TCP parameter problem", TCP(sport=40000, dport=PACS_PORT), ICMP(type=12, code=0), REMOTE_CLIENT),
    ("TCP time exceeded", TCP(sport=40000, dport=PACS_PORT), ICMP(type=11, code=0), CLIENT),
]


@pytest.mark.parametrize("what,quoted,icmp,dst", BACKEND_ICMP, ids=[b[0] for b in BACKEND_ICMP])
def test_icmp_error_from_a_nat_backend_about_a_nat_flow_is_dropped_and_counted(nat, net, what, quoted, icmp, dst):
    before = nat_count(nat, "icmp")
    verdict = reply_run(nat, net, backend_icmp(quoted, icmp, dst))
    assert verdict.action == DROP, verdict.action_name
    assert nat_count(nat, "icmp") == before + 1


@pytest.mark.parametrize("what,packet", [
    ("about a port that is no NAT backend's", backend_icmp(TCP(sport=40000, dport=22))),
    ("to the gateway itself (a health check)", backend_icmp(TCP(sport=50123, dport=PACS_PORT), dst="10.30.0.1")),
    ("an echo reply", from_pacs(ICMP(type=0) / Raw(b"ping"))),
])
def test_other_icmp_from_a_nat_backend_passes(nat, net, what, packet):
    assert_passes_uncounted(nat, net, packet, "icmp")
