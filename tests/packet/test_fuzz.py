"""Fuzz: 100,000 mutated frames through the real program, judged by an oracle
written from issue 10's specification (tests/packet/fuzz_oracle.py).

The XDP program runs under BPF_PROG_TEST_RUN (no XDP mode applies), with its
maps written through the real planner and map writer. The configured state
has five services on two VIPs: TCP with flow and with client persistence, UDP,
a service whose backends are all down, a drained backend, backends that went
down or were removed while holding flows (grace, point 6), and a backend
whose MAC is unresolved. Flows are first established on every backend, then
the state changes, so the flows that must stay on a drained or down backend
are exactly the ones this test saw placed there. Half-way through the run a
down backend comes back and another goes down, taking with it (loosely: the
flood guard may have placed them without an entry) the flows seen sent to it.

IPv6 (issue 15) runs beside it: three services on an IPv6 VIP (flow and
client persistence, UDP), one backend going down with flows on it; seeds
with extension-header chains of every kind (within and over the limit,
routing with segments left), fragments, Packet Too Big quoting flows, echo
and Neighbour Solicitation; mutations of the Next Header, the chain's bytes
and the IPv6 source and destination. Two IPv6 NAT services (TCP, UDP) with
their requests (chains, a tag, a UDP checksum of 0), their backends' replies
and what those send that cannot be translated (fragments, cut-short
headers, ICMPv6 errors, chains over the limit or with segments left).

Frames start from valid seeds (TCP/UDP to VIPs and other addresses, VLAN
tags, IPv4 options, fragments, ICMP "fragmentation needed" quoting flows,
pings, ARP, IPv6, broadcast, multicast and foreign destination MACs) and are
mutated: bytes set and bits flipped, header fields (IHL, tot_len, fragment
bits, protocol, addresses, ports, TCP flags and offset, UDP length, ICMP
type, the quoted header) rewritten, VLAN tags added or removed, frames cut
short or extended. The RNG seed is printed; XDPLB_FUZZ_SEED replays a run and
XDPLB_FUZZ_FRAMES changes the count. A failure lists every broken rule with
its first frames, each shrunk to a minimal reproducer.
"""
from __future__ import annotations

import ipaddress
import os
import random
import time
from collections import Counter
from dataclasses import dataclass

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (ICMPv6DestUnreach, ICMPv6EchoRequest, ICMPv6ND_NS, ICMPv6PacketTooBig, IPv6,
                                IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting)
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.packet import Raw

from xdplb import bpfsys, plan
from xdplb.config import Settings

from . import fuzz_oracle as O
from .conftest import GW_MAC, mac_of

FRAMES = int(os.environ.get("XDPLB_FUZZ_FRAMES", "100000"))
GRACE_S = 5.0             # the pool's down_grace: it ends in the middle of the run (which waits for it)
UDP_IDLE_S = 3600         # far longer than the run: no UDP flow expires during it

VIP1, VIP2 = "10.10.0.100", "10.10.0.101"
GATEWAY_IP = "10.10.0.10"
CLIENTS = ("10.10.0.2", "198.51.100.7")
CLIENT_MAC = "02:00:0a:0a:00:02"
ROUTER = "192.0.2.1"       # sends "fragmentation needed" towards a VIP
VIP6 = "2001:db8::100"
GATEWAY6 = "2001:db8::10"
CLIENTS6 = ("2001:db8:c::2", "2001:db8:d::7")
ROUTER6 = "2001:db8:ff::1"


def _mac(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


GW = _mac(GW_MAC)
POOL_MAC = bytes.fromhex("00005e000133")   # a VRRP virtual MAC the pool names ([xdplb] extra_macs)
GATEWAY_MACS = (GW_MAC, POOL_MAC)          # frames to these are balanced (point 5)
FOREIGN_MACS = (
    bytes.fromhex("ffffffffffff"),   # broadcast
    bytes.fromhex("01005e000001"),   # IPv4 multicast
    bytes.fromhex("333300000001"),   # IPv6 multicast
    bytes.fromhex("0180c2000000"),   # STP
    bytes.fromhex("02000a0a0063"),   # another host on the segment (flooded)
    bytes.fromhex("03000a0a000a"),   # the gateway's MAC with the group bit set
    mac_of(11),                      # a backend's MAC
)


# ---- the configured state ---------------------------------------------------

def _be(octet, weight=1, healthy=True, mac=True, port=0):
    return plan.BackendState(f"be{octet}", ipaddress.IPv4Address(f"10.10.0.{octet}"), weight,
                             mac_of(octet) if mac else None, healthy, port)


def _svc(name, vip, port, protocol, persistence, backends, forwarding="dsr", client_prefix=128):
    return plan.ServiceState(name, ipaddress.ip_address(vip), port, protocol, persistence, tuple(backends),
                             forwarding, client_prefix)


# NAT services (issue 13): PACS on 4242 behind VIP1:106, a UDP one on 6001 behind VIP1:5001.
NAT_TCP_PORT, NAT_UDP_PORT, PACS_PORT, PACS_UDP_PORT = 106, 5001, 4242, 6001


def nat_services(down=()):
    return (
        _svc("nat-dicom", VIP1, NAT_TCP_PORT, "tcp", "flow",
             [_be(o, port=PACS_PORT, healthy=o not in down) for o in (61, 62)], "nat"),
        _svc("nat-udp", VIP1, NAT_UDP_PORT, "udp", "flow", [_be(71, port=PACS_UDP_PORT)], "nat"),
    )


def _be6(n, weight=1, healthy=True):
    return plan.BackendState(f"be6-{n}", ipaddress.IPv6Address(f"2001:db8::{n}"), weight, mac_of(n), healthy)


def services6(down: bool):
    """The IPv6 services: 63 goes down with the IPv4 change."""
    return (
        _svc("dicom6", VIP6, 104, "tcp", "flow", [_be6(61), _be6(62), _be6(63, healthy=not down)]),
        _svc("web6", VIP6, 80, "tcp", "client", [_be6(71), _be6(72)], client_prefix=64),
        _svc("udp6", VIP6, 5000, "udp", "flow", [_be6(81), _be6(82)]),
    )


def _be6nat(n, port=PACS_PORT):
    return plan.BackendState(f"nat6-{n}", ipaddress.IPv6Address(f"2001:db8::{n}"), 1, mac_of(n), True, port)


def nat6_services():
    """NAT over IPv6 (issue 15, point 4): [VIP6]:106 to 2001:db8::91/92 on 4242 (the IPv4 NAT
    backends' port: nat_ports is shared), [VIP6]:5001 to 2001:db8::93 on 6001."""
    return (
        _svc("nat6-dicom", VIP6, NAT_TCP_PORT, "tcp", "flow", [_be6nat(91), _be6nat(92)], "nat"),
        _svc("nat6-udp", VIP6, NAT_UDP_PORT, "udp", "flow", [_be6nat(93, PACS_UDP_PORT)], "nat"),
    )


def before_services():
    """Every backend that will later be drained, down or removed is up here."""
    return (
        _svc("dicom", VIP1, 104, "tcp", "flow", [_be(11), _be(12), _be(13), _be(14), _be(15), _be(16)]),
        _svc("web", VIP1, 80, "tcp", "client", [_be(21), _be(22), _be(23, mac=False)]),
        _svc("udp-echo", VIP1, 5000, "udp", "flow", [_be(31), _be(32), _be(33)]),
        _svc("dicom-tls", VIP2, 11112, "tcp", "flow", [_be(41), _be(42, healthy=False)]),
        _svc("syslog", VIP2, 104, "udp", "flow", [_be(51)]),
    ) + nat_services() + services6(down=False) + nat6_services()


def after_services():
    """12 drained; 13, 33 and 41 down; 15 removed: dicom-tls has no live backend."""
    return (
        _svc("dicom", VIP1, 104, "tcp", "flow",
             [_be(11), _be(12, weight=0), _be(13, healthy=False), _be(14), _be(16)]),
        _svc("web", VIP1, 80, "tcp", "client", [_be(21), _be(22), _be(23, mac=False)]),
        _svc("udp-echo", VIP1, 5000, "udp", "flow", [_be(31), _be(32), _be(33, healthy=False)]),
        _svc("dicom-tls", VIP2, 11112, "tcp", "flow", [_be(41, healthy=False), _be(42, healthy=False)]),
        _svc("syslog", VIP2, 104, "udp", "flow", [_be(51)]),
    ) + nat_services(down=(62,)) + services6(down=True) + nat6_services()


def midway_services():
    """Half-way through the run, once the first grace is over: 14 goes down too."""
    first, *rest = after_services()
    dicom = plan.ServiceState(first.name, first.vip, first.port, first.protocol, first.persistence,
                              (_be(11), _be(12, weight=0), _be(13, healthy=False), _be(14, healthy=False), _be(16)))
    return (dicom, *rest)


PROTO = {"tcp": O.TCP, "udp": O.UDP}


def model_of(services, gateway_macs) -> O.Model:
    """The oracle's view, from the declarations alone: live = up, resolved, weight > 0."""
    return O.Model(
        gateway_macs=frozenset(gateway_macs),
        services={
            (s.vip.packed, s.port, PROTO[s.protocol]): frozenset(
                b.mac for b in s.backends if b.healthy and b.mac is not None and b.weight > 0)
            for s in services
        },
        nat={
            (s.vip.packed, s.port, PROTO[s.protocol]): {b.mac: (b.address.packed, b.port) for b in s.backends}
            for s in services if s.forwarding == "nat"
        },
        reverse={
            (b.address.packed, b.port, PROTO[s.protocol]): (s.vip.packed, s.port)
            for s in services if s.forwarding == "nat" for b in s.backends
        },
    )


# ---- seeds --------------------------------------------------------------------

@dataclass
class Seed:
    name: str
    raw: bytes
    l3: int             # offsets the field mutations aim at (IPv4 header, L4 header, quoted header)
    l4: int
    inner: int


def seed(name, frame) -> Seed:
    raw = bytes(frame)
    ip = O.any_ip(raw)
    l3, l4 = (ip.l3, ip.l4) if ip else (14, 34)
    return Seed(name, raw, l3, l4, l4 + 8)


def eth(dst=GW, tag=None):
    l2 = Ether(src=CLIENT_MAC, dst=dst)
    return l2 / tag if tag is not None else l2


def ip_to(dst, src=CLIENTS[0], **ip):
    return eth() / IP(src=src, dst=dst, **ip)


def tcp_to(dst, dport, sport=40000, flags="S", src=CLIENTS[0], payload=b"", mac=GW, tag=None, **ip):
    return (eth(mac, tag) / IP(src=src, dst=dst, **ip)
            / TCP(sport=sport, dport=dport, flags=flags, seq=7, ack=1 if "A" in flags else 0) / Raw(payload))


def udp_to(dst, dport, sport=40000, src=CLIENTS[0], payload=b"ping", mac=GW, tag=None, **ip):
    return eth(mac, tag) / IP(src=src, dst=dst, **ip) / UDP(sport=sport, dport=dport) / Raw(payload)


def to6(dst, dport, kind, sport=40000, flags="S", src=CLIENTS6[0], payload=b"", mac=GW, tag=None, chain=()):
    """to() for IPv6, with extension headers `chain` before the upper layer."""
    pkt = eth(mac, tag) / IPv6(src=src, dst=dst)
    for ext in chain:
        pkt = pkt / ext
    if kind == "tcp":
        return pkt / TCP(sport=sport, dport=dport, flags=flags, seq=7, ack=1 if "A" in flags else 0) / Raw(payload)
    return pkt / UDP(sport=sport, dport=dport) / Raw(payload or b"ping")


def to(dst, dport, kind, **kw):
    """A first packet (TCP SYN unless flags say otherwise, or UDP) to dst:dport."""
    if ipaddress.ip_address(dst).version == 6:
        return to6(dst, dport, kind, **kw)
    if kind == "tcp":
        return tcp_to(dst, dport, **kw)
    kw.pop("flags", None)
    return udp_to(dst, dport, **kw)


def too_big(client, vip, cport, vport, proto, code=4, inner_options=b""):
    """ICMP type 3 from a router, quoting the backend's reply (VIP -> client)."""
    l4 = TCP(sport=vport, dport=cport, flags="PA", seq=99) if proto == O.TCP else UDP(sport=vport, dport=cport)
    quoted = bytes(IP(src=vip, dst=client, flags="DF", options=inner_options) / l4 / Raw(b"z" * 1400))
    quoted = quoted[: (quoted[0] & 0x0F) * 4 + 8]
    return eth() / IP(src=ROUTER, dst=vip) / ICMP(type=3, code=code, nexthopmtu=1400) / Raw(quoted)


def nat_reply(octet, sport, kind, client, cport, tag=None, chksum=None, chain=(), **ip):
    """A NAT backend (10.10.0.<octet>, or 2001:db8::<octet> for an IPv6 client, then with the
    extension headers `chain`) answering from `sport` to client:cport, through the gateway."""
    if kind == "tcp":
        l4 = TCP(sport=sport, dport=cport, flags="PA", seq=9, ack=8) / Raw(b"C-STORE-RSP")
    else:
        l4 = UDP(sport=sport, dport=cport, **({} if chksum is None else {"chksum": chksum})) / Raw(b"pong")
    pkt = Ether(src=_mac(mac_of(octet)), dst=GW)
    if tag is not None:
        pkt = pkt / tag
    if ipaddress.ip_address(client).version == 4:
        return pkt / IP(src=f"10.10.0.{octet}", dst=client, **ip) / l4
    pkt = pkt / IPv6(src=f"2001:db8::{octet}", dst=client, **ip)
    for ext in chain:
        pkt = pkt / ext
    return pkt / l4


def too_big6(client, vip, cport, vport, proto, chain=()):
    """ICMPv6 Packet Too Big from a router, quoting the backend's reply (VIP -> client)."""
    l4 = TCP(sport=vport, dport=cport, flags="PA", seq=99) if proto == O.TCP else UDP(sport=vport, dport=cport)
    quoted = IPv6(src=vip, dst=client)
    for ext in chain:
        quoted = quoted / ext
    quoted = bytes(quoted / l4 / Raw(b"z" * 1400))[:1232]
    return eth() / IPv6(src=ROUTER6, dst=vip) / ICMPv6PacketTooBig(mtu=1280) / Raw(quoted)


def too_big_any(client, vip, cport, vport, proto):
    if ipaddress.ip_address(vip).version == 6:
        return too_big6(client, vip, cport, vport, proto)
    return too_big(client, vip, cport, vport, proto)


def unkey(key: bytes):
    """(client, vip, cport, vport, proto) of an oracle flow key (IPv4 or IPv6)."""
    n = (len(key) - 5) // 2
    return (str(ipaddress.ip_address(key[0:n])), str(ipaddress.ip_address(key[n:2 * n])),
            int.from_bytes(key[2 * n:2 * n + 2], "big"), int.from_bytes(key[2 * n + 2:2 * n + 4], "big"), key[-1])


def held_frame(key: bytes, flags="PA"):
    client, vip, cport, vport, proto = unkey(key)
    kind = "tcp" if proto == O.TCP else "udp"
    return to(vip, vport, kind, sport=cport, src=client, flags=flags, payload=b"C-STORE" * 4)


SERVICES = [(VIP1, 104, "tcp"), (VIP1, 80, "tcp"), (VIP1, 5000, "udp"), (VIP2, 11112, "tcp"), (VIP2, 104, "udp"),
            (VIP1, NAT_TCP_PORT, "tcp"), (VIP1, NAT_UDP_PORT, "udp")]
NOT_SERVICES = [(VIP1, 22, "tcp"), (VIP1, 104, "udp"), (VIP2, 104, "tcp"), (VIP2, 5000, "udp"),
                (GATEWAY_IP, 104, "tcp"), (GATEWAY_IP, 5000, "udp"), ("203.0.113.9", 80, "tcp")]
RECORD_ROUTE = b"\x07\x0b\x04" + b"\x00" * 8 + b"\x01"      # record route + NOP: IHL 8
SERVICES6 = [(VIP6, 104, "tcp"), (VIP6, 80, "tcp"), (VIP6, 5000, "udp")]
NOT_SERVICES6 = [(VIP6, 22, "tcp"), (VIP6, 104, "udp"), (GATEWAY6, 104, "tcp"), ("2001:db8:99::9", 80, "tcp")]


def chains6():
    """Extension-header chains of every kind walked, the longest, one over the
    limit, routing with segments left, hop-by-hop out of place."""
    hbh, dst = IPv6ExtHdrHopByHop, IPv6ExtHdrDestOpt
    return {
        "hop-by-hop": (hbh(),), "dest opts": (dst(),), "routing 0": (IPv6ExtHdrRouting(segleft=0),),
        "longest": (hbh(), dst(), IPv6ExtHdrRouting(segleft=0), dst()),
        "over the limit": (hbh(), dst(), IPv6ExtHdrRouting(segleft=0), dst(), dst()),
        "routing 1": (IPv6ExtHdrRouting(segleft=1, addresses=["2001:db8::99"]),),
        "hop-by-hop second": (dst(), hbh()),
    }


def seeds6(held: dict) -> list:
    """(weight, seeds) of IPv6 frames."""
    S, C = SERVICES6, CLIENTS6
    return [
        (6, [seed(f"first packet [{d}]:{p}/{k}", to6(d, p, k, sport=51000 + i, src=C[i % 2]))
             for i, (d, p, k) in enumerate(S)]),
        (3, [seed(f"data [{d}]:{p}/{k}", to6(d, p, k, sport=52000 + i, flags="PA", payload=b"P-DATA" * 8))
             for i, (d, p, k) in enumerate(S)]),
        (3, [seed(f"not a service [{d}]:{p}/{k}", to6(d, p, k, sport=53000 + i))
             for i, (d, p, k) in enumerate(NOT_SERVICES6)]),
        (5, [seed(f"chain {name} to [{d}]:{p}", to6(d, p, k, sport=54000 + i, chain=chain))
             for name, chain in chains6().items() for i, (d, p, k) in enumerate(S[:1] + S[2:])]),
        (3, [seed("ipv6 tcp first fragment", eth() / IPv6(src=C[0], dst=VIP6) / IPv6ExtHdrFragment(m=1, id=1)
                  / TCP(sport=55000, dport=104) / Raw(b"x" * 32)),
             seed("ipv6 tcp later fragment", eth() / IPv6(src=C[0], dst=VIP6) / IPv6ExtHdrFragment(offset=4, nh=6)
                  / Raw(b"y" * 32)),
             seed("ipv6 icmp first fragment", eth() / IPv6(src=C[0], dst=VIP6) / IPv6ExtHdrFragment(m=1, id=2)
                  / ICMPv6EchoRequest(data=b"p" * 64)),
             seed("ipv6 icmp later fragment", eth() / IPv6(src=C[0], dst=VIP6) / IPv6ExtHdrFragment(offset=9, nh=58)
                  / Raw(b"p" * 64))]),
        (3, [seed("ipv6 echo", eth() / IPv6(src=C[0], dst=VIP6) / ICMPv6EchoRequest(data=b"ping")),
             seed("ipv6 neighbour solicitation", eth() / IPv6(src=C[0], dst=VIP6, hlim=255) / ICMPv6ND_NS(tgt=VIP6)),
             seed("ipv6 solicitation multicast", eth("33:33:ff:00:01:00") / IPv6(src=C[0], dst="ff02::1:ff00:100")
                  / ICMPv6ND_NS(tgt=VIP6))]),
        (4, [seed(f"too big for [{d}]:{p}/{k}", too_big6(C[0], d, 56000 + i, p, PROTO[k]))
             for i, (d, p, k) in enumerate(S)]
         + [seed(f"too big for [{d}]:{p}/{k}", too_big6(C[1], d, 56100 + i, p, PROTO[k]))
            for i, (d, p, k) in enumerate(NOT_SERVICES6[:2])]
         + [seed("too big, a chain in the quote", too_big6(C[0], VIP6, 56200, 104, O.TCP,
                                                            chain=(IPv6ExtHdrDestOpt(),)))]),
        (2, [seed(f"ipv6 to {_mac(m)}", to6(VIP6, 104, "tcp", sport=57000, mac=_mac(m))) for m in FOREIGN_MACS]),
    ] + nat6_seeds()


NAT6 = [(VIP6, NAT_TCP_PORT, "tcp"), (VIP6, NAT_UDP_PORT, "udp")]


def nat6_seeds() -> list:
    """(weight, seeds) of NAT over IPv6: requests (with chains, a tag, a UDP checksum of 0), the
    backends' replies, and what they send that cannot be translated (fragments, cut-short
    headers, ICMPv6 errors about a NAT flow, chains over the limit or with segments left)."""
    C, hbh, dst = CLIENTS6, IPv6ExtHdrHopByHop, IPv6ExtHdrDestOpt
    backend_frag = IPv6(src="2001:db8::91", dst=C[0]) / IPv6ExtHdrFragment(m=1, id=3)
    quoted = bytes(IPv6(src=C[0], dst="2001:db8::93") / UDP(sport=58300, dport=PACS_UDP_PORT) / Raw(b"q" * 8))
    return [
        (5, [seed(f"nat6 first packet [{d}]:{p}/{k}", to6(d, p, k, sport=58000 + i, src=C[i % 2]))
             for i, (d, p, k) in enumerate(NAT6)]
         + [seed(f"nat6 data [{d}]:{p}/{k}", to6(d, p, k, sport=58010 + i, flags="PA", payload=b"P-DATA" * 8))
            for i, (d, p, k) in enumerate(NAT6)]
         + [seed(f"nat6 {k} with a chain", to6(d, p, k, sport=58020 + i, chain=(hbh(), dst())))
            for i, (d, p, k) in enumerate(NAT6)]
         + [seed("nat6 tagged", to6(VIP6, NAT_TCP_PORT, "tcp", sport=58030, tag=Dot1Q(vlan=42))),
            seed("nat6 udp checksum 0", eth() / IPv6(src=C[0], dst=VIP6)
                 / UDP(sport=58031, dport=NAT_UDP_PORT, chksum=0) / Raw(b"none"))]),
        (5, [seed(f"nat6 reply {k} to {c}", nat_reply(n, p, k, c, 58100 + i))
             for i, (n, p, k) in enumerate([(91, PACS_PORT, "tcp"), (92, PACS_PORT, "tcp"), (93, PACS_UDP_PORT, "udp")])
             for c in (C[0], C[1], GATEWAY6)]
         + [seed("nat6 backend, other port", nat_reply(91, 22, "tcp", C[0], 58110)),
            seed("nat6 backend, other protocol", nat_reply(91, PACS_PORT, "udp", C[0], 58111)),
            seed("nat6 reply, tagged", nat_reply(92, PACS_PORT, "tcp", C[0], 58112, tag=Dot1Q(vlan=42))),
            seed("nat6 reply, a chain", nat_reply(91, PACS_PORT, "tcp", C[1], 58113, chain=(dst(),))),
            seed("nat6 reply, udp checksum 0", nat_reply(93, PACS_UDP_PORT, "udp", C[0], 58114, chksum=0))]),
        (2, [seed("nat6 backend tcp first fragment", eth() / backend_frag / TCP(sport=PACS_PORT, dport=58200)
                  / Raw(b"x" * 32)),
             seed("nat6 backend tcp later fragment", eth() / IPv6(src="2001:db8::91", dst=C[0])
                  / IPv6ExtHdrFragment(offset=4, nh=6) / Raw(b"y" * 32)),
             seed("nat6 backend cut short", bytes(nat_reply(91, PACS_PORT, "tcp", C[0], 58201))[:14 + 40 + 6]),
             seed("nat6 backend chain over the limit", nat_reply(91, PACS_PORT, "tcp", C[0], 58202,
                                                                chain=chains6()["over the limit"])),
             seed("nat6 backend routing with segments left", nat_reply(93, PACS_UDP_PORT, "udp", C[1], 58203,
                                                                       chain=chains6()["routing 1"])),
             seed("nat6 backend port unreachable", Ether(src=_mac(mac_of(93)), dst=GW)
                  / IPv6(src="2001:db8::93", dst=C[0]) / ICMPv6DestUnreach(code=4) / Raw(quoted))]),
    ]


def build_seeds(held: dict) -> list[tuple[float, list[Seed]]]:
    """(weight, seeds) per kind of frame; `held` maps flows on drained or down backends to O.Held."""
    S, C = SERVICES, CLIENTS
    kinds = [
        (10, [seed(f"first packet {d}:{p}/{k}", to(d, p, k, sport=41000 + i)) for i, (d, p, k) in enumerate(S)]),
        (6, [seed(f"data {d}:{p}/{k}", to(d, p, k, sport=42000 + i, flags="PA", payload=b"P-DATA" * 8))
             for i, (d, p, k) in enumerate(S)]),
        (3, [seed(f"tcp {f} {d}:{p}", tcp_to(d, p, sport=43000 + i, flags=f))
             for i, (d, p, k) in enumerate(S) if k == "tcp" for f in ("R", "RA", "FA", "SA", "SR")]),
        (5, [seed(f"not a service {d}:{p}/{k}", to(d, p, k, sport=44000 + i))
             for i, (d, p, k) in enumerate(NOT_SERVICES)]),
        (5, [seed(f"{t.__name__} {d}:{p}/{k}", to(d, p, k, sport=45000 + i, tag=t(vlan=42)))
             for i, (d, p, k) in enumerate(S) for t in (Dot1Q, Dot1AD)]
         + [seed("qinq", tcp_to(VIP1, 104, sport=45100, tag=Dot1AD(vlan=7) / Dot1Q(vlan=42)))]),
        (4, [seed(f"ip options {d}:{p}/{k}", to(d, p, k, sport=46000 + i, options=RECORD_ROUTE))
             for i, (d, p, k) in enumerate(S)]),
        (5, [
            seed("tcp first fragment", ip_to(VIP1, flags="MF") / TCP(sport=47000, dport=104) / Raw(b"x" * 64)),
            seed("tcp later fragment", ip_to(VIP1, frag=12, proto=6) / Raw(b"y" * 64)),
            seed("udp first fragment", ip_to(VIP1, flags="MF") / UDP(sport=47001, dport=5000) / Raw(b"x" * 64)),
            seed("icmp first fragment", ip_to(VIP1, flags="MF") / ICMP() / Raw(b"p" * 64)),
            seed("icmp later fragment", ip_to(VIP2, frag=185, proto=1) / Raw(b"p" * 64)),
            seed("fragment to the gateway", ip_to(GATEWAY_IP, flags="MF") / TCP(dport=22) / Raw(b"x" * 32)),
        ]),
        (4, [seed("ping vip", ip_to(VIP1) / ICMP() / Raw(b"ping" * 8)),
             seed("ping vip2", ip_to(VIP2, src=C[1]) / ICMP(id=7) / Raw(b"ping")),
             seed("gre to vip", ip_to(VIP1, proto=47) / Raw(b"\x00" * 24))]),
        # ICMP "fragmentation needed" quoting flows of every service (in the flow table or not) and of none.
        (6, [seed(f"too big for {d}:{p}/{k}", too_big(C[0], d, 48000 + i, p, PROTO[k]))
             for i, (d, p, k) in enumerate(S)]
         + [seed(f"too big for {d}:{p}/{k}", too_big(C[1], d, 48100 + i, p, PROTO[k]))
            for i, (d, p, k) in enumerate(NOT_SERVICES)]
         + [seed("too big, options in the quote", too_big(C[0], VIP1, 48200, 104, O.TCP, inner_options=RECORD_ROUTE)),
            seed("port unreachable", too_big(C[0], VIP1, 48201, 104, O.TCP, code=3))]),
        (5, [seed("arp request", Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc=C[0], pdst=VIP1)),
             seed("arp reply", eth() / ARP(op=2, psrc=C[0], pdst=GATEWAY_IP)),
             seed("ipv6 tcp", eth() / IPv6(src="fd00::2", dst="fd00::100") / TCP(sport=49000, dport=104, flags="S")),
             seed("ipv6 too big", eth() / IPv6(src="fd00::1", dst="fd00::100") / ICMPv6PacketTooBig(mtu=1280)
                  / Raw(b"q" * 48))]),
        # NAT backends' replies to clients (on-link, remote, the gateway itself), and packets from a
        # backend on a port or protocol no NAT service uses.
        (6, [seed(f"nat reply {k} to {c}", nat_reply(o, p, k, c, 50000 + i))
             for i, (o, p, k) in enumerate([(61, PACS_PORT, "tcp"), (62, PACS_PORT, "tcp"), (71, PACS_UDP_PORT, "udp")])
             for c in C + (GATEWAY_IP,)]
         + [seed("backend, other port", nat_reply(61, 22, "tcp", C[0], 50100)),
            seed("backend, other protocol", nat_reply(61, PACS_PORT, "udp", C[0], 50101)),
            seed("nat reply, tagged", nat_reply(61, PACS_PORT, "tcp", C[0], 50102, tag=Dot1Q(vlan=42))),
            seed("nat reply, ip options", nat_reply(62, PACS_PORT, "tcp", C[1], 50103, options=RECORD_ROUTE)),
            seed("nat reply, udp without checksum", nat_reply(71, PACS_UDP_PORT, "udp", C[0], 50104, chksum=0))]),
        # Frames for others on the segment pass untouched; those to the pool's MAC are balanced (point 5).
        (8, [seed(f"to {_mac(m)}, {d}:{p}/{k}", to(d, p, k, sport=49100 + i, mac=_mac(m)))
             for m in FOREIGN_MACS + (POOL_MAC,) for i, (d, p, k) in enumerate(S)]
         + [seed(f"to {_mac(m)}, too big", m + bytes(too_big(C[0], VIP1, 48000, 104, O.TCP))[6:])
            for m in FOREIGN_MACS]),
    ]
    kinds += seeds6(held)
    # Flows held by a drained or down backend (they must stay there), and their ICMP.
    keys = sorted(held)
    kinds += [
        (8, [seed(f"held flow ({held[k].why})", held_frame(k)) for k in keys]),
        (3, [seed(f"too big for a held flow ({held[k].why})", too_big_any(*unkey(k))) for k in keys]),
        (0.1, [seed("new connection on a held tuple", held_frame(k, flags="S")) for k in keys]),
    ]
    return kinds


# ---- mutations ----------------------------------------------------------------

def _put16(buf, off, value):
    if 0 <= off and off + 2 <= len(buf):
        buf[off:off + 2] = (value & 0xFFFF).to_bytes(2, "big")


def _put(buf, off, data):
    if 0 <= off and off + len(data) <= len(buf):
        buf[off:off + len(data)] = data


def _addr(rng):
    return rng.choice((VIP1, VIP2, GATEWAY_IP, CLIENTS[0], CLIENTS[1], "10.10.0.255", "224.0.0.1", None))


def m_byte(rng, buf, s):
    off = rng.randrange(len(buf))
    buf[off] = rng.randrange(256)
    return f"byte {off}"


def m_bit(rng, buf, s):
    off = rng.randrange(len(buf))
    buf[off] ^= 1 << rng.randrange(8)
    return f"bit {off}"


def m_dst_mac(rng, buf, s):
    buf[0:6] = rng.choice(FOREIGN_MACS + GATEWAY_MACS)
    return "dst mac"


def m_ethertype(rng, buf, s):
    _put16(buf, s.l3 - 2, rng.choice((0x0800, 0x86DD, 0x0806, 0x8100, 0x88A8, 0x9100, 0x0000, rng.randrange(65536))))
    return "ethertype"


def m_version_ihl(rng, buf, s):
    _put(buf, s.l3, bytes([rng.choice((0x45, 0x46, 0x48, 0x4F, 0x44, 0x40, 0x65, 0x55, rng.randrange(256)))]))
    return "version/ihl"


def m_tot_len(rng, buf, s):
    present = len(buf) - s.l3
    ihl = (buf[s.l3] & 0x0F) * 4 if s.l3 < len(buf) else 20
    _put16(buf, s.l3 + 2, rng.choice((0, ihl - 1, ihl, ihl + 8, present, present + rng.randrange(1, 200),
                                      65535, rng.randrange(65536))))
    return "tot_len"


def m_frag(rng, buf, s):
    _put16(buf, s.l3 + 6, rng.choice((0, 0x4000, 0x2000, 0x0001, rng.randrange(1, 0x2000),
                                      0x2000 | rng.randrange(0x2000), 0x8000, rng.randrange(65536))))
    return "frag_off"


def m_proto(rng, buf, s):
    _put(buf, s.l3 + 9, bytes([rng.choice((6, 17, 1, 47, 58, 0, rng.randrange(256)))]))
    return "protocol"


def m_saddr(rng, buf, s):
    a = _addr(rng)
    _put(buf, s.l3 + 12, ipaddress.IPv4Address(a).packed if a else rng.randbytes(4))
    return "saddr"


def m_daddr(rng, buf, s):
    a = _addr(rng)
    _put(buf, s.l3 + 16, ipaddress.IPv4Address(a).packed if a else rng.randbytes(4))
    return "daddr"


def m_sport(rng, buf, s):
    _put16(buf, s.l4, rng.randrange(65536))
    return "sport"


def m_dport(rng, buf, s):
    _put16(buf, s.l4 + 2, rng.choice((104, 80, 5000, 11112, 22, 0, rng.randrange(65536))))
    return "dport"


def m_tcp_flags(rng, buf, s):
    flags = (0x02, 0x10, 0x12, 0x04, 0x14, 0x11, 0x06, 0x18, 0x03, 0x00, rng.randrange(256))   # S A SA R RA FA SR PA SF
    _put(buf, s.l4 + 13, bytes([rng.choice(flags)]))
    return "tcp flags"


def m_doff(rng, buf, s):
    if s.l4 + 12 < len(buf):
        buf[s.l4 + 12] = rng.randrange(16) << 4 | buf[s.l4 + 12] & 0x0F
    return "tcp doff"


def m_udp_len(rng, buf, s):
    _put16(buf, s.l4 + 4, rng.choice((0, 7, 8, len(buf) - s.l4, rng.randrange(65536))))
    return "udp len"


def m_icmp_type(rng, buf, s):
    _put(buf, s.l4, bytes(rng.choice(((3, 4), (3, 3), (8, 0), (0, 0), (11, 0), (3, rng.randrange(256)),
                                      (rng.randrange(256), rng.randrange(256))))))
    return "icmp type/code"


def m_quoted(rng, buf, s):
    """A field of the header quoted by an ICMP error."""
    i = s.inner
    field = rng.randrange(6)
    if field == 0:
        _put(buf, i, bytes([rng.choice((0x45, 0x46, 0x44, 0x4F, 0x65, rng.randrange(256)))]))
    elif field == 1:
        _put(buf, i + 9, bytes([rng.choice((6, 17, 1, rng.randrange(256)))]))
    elif field in (2, 3):
        a = _addr(rng)
        _put(buf, i + 12 + 4 * (field - 2), ipaddress.IPv4Address(a).packed if a else rng.randbytes(4))
    else:
        ihl = (buf[i] & 0x0F) * 4 if i < len(buf) else 20
        _put16(buf, i + ihl + 2 * (field - 4), rng.choice((104, 80, 5000, 11112, rng.randrange(65536))))
    return "quoted header"


def m_next_header(rng, buf, s):
    """IPv6 Next Header, or a byte of its extension-header chain."""
    if s.l4 > s.l3 + 40 and rng.random() < 0.6:
        off = rng.randrange(s.l3 + 40, s.l4)
        _put(buf, off, bytes([rng.choice((0, 1, 2, 3, 4, 6, 17, 43, 44, 58, 59, 60, rng.randrange(256)))]))
        return f"chain byte {off}"
    _put(buf, s.l3 + 6, bytes([rng.choice((6, 17, 58, 0, 43, 44, 60, 59, 51, rng.randrange(256)))]))
    return "next header"


def m_daddr6(rng, buf, s):
    a = rng.choice((VIP6, GATEWAY6, CLIENTS6[0], None))
    _put(buf, s.l3 + 24, ipaddress.IPv6Address(a).packed if a else rng.randbytes(16))
    return "ipv6 daddr"


def m_saddr6(rng, buf, s):
    """An IPv6 source: a NAT backend's (its replies), a client's, or any."""
    a = rng.choice(("2001:db8::91", "2001:db8::93", CLIENTS6[0], VIP6, None))
    _put(buf, s.l3 + 8, ipaddress.IPv6Address(a).packed if a else rng.randbytes(16))
    return "ipv6 saddr"


FIELD_MUTATIONS = (
    (m_next_header, 2), (m_daddr6, 1), (m_saddr6, 1),
    (m_byte, 4), (m_bit, 3), (m_dst_mac, 1), (m_ethertype, 1), (m_version_ihl, 2), (m_tot_len, 2), (m_frag, 2),
    (m_proto, 2), (m_saddr, 1), (m_daddr, 2), (m_sport, 3), (m_dport, 2), (m_tcp_flags, 3), (m_doff, 1),
    (m_udp_len, 1), (m_icmp_type, 1), (m_quoted, 2),
)


def m_truncate(rng, buf, s):
    del buf[rng.randint(14, len(buf)):]
    return "truncated"


def m_extend(rng, buf, s):
    buf += rng.randbytes(rng.randint(1, 64))
    return "extended"


def m_tag(rng, buf, s):
    buf[12:12] = rng.choice((b"\x81\x00", b"\x88\xa8")) + rng.randbytes(2)
    return "tag added"


def m_untag(rng, buf, s):
    if len(buf) >= 18:
        del buf[12:16]
    return "4 bytes at 12 removed"


def m_cut(rng, buf, s):
    if len(buf) > 15:
        at = rng.randrange(14, len(buf) - 1)
        del buf[at:at + rng.randint(1, 8)]
    return "bytes cut out"


STRUCTURAL_MUTATIONS = ((m_truncate, 3), (m_extend, 2), (m_tag, 1), (m_untag, 1), (m_cut, 1))


class Mutator:
    """Unchanged seeds 15 % of the time, else 1-4 field mutations, and a structural one 30 % of the time
    (after the fields, so the fields' offsets still hold)."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.fields = [f for f, _ in FIELD_MUTATIONS]
        self.field_weights = [w for _, w in FIELD_MUTATIONS]
        self.structural = [f for f, _ in STRUCTURAL_MUTATIONS]
        self.structural_weights = [w for _, w in STRUCTURAL_MUTATIONS]

    def __call__(self, s: Seed) -> tuple[bytes, list[str]]:
        rng = self.rng
        if rng.random() < 0.15:
            return s.raw, []
        buf = bytearray(s.raw)
        count = rng.choice((1, 1, 1, 2, 2, 3, 4))
        ops = rng.choices(self.fields, self.field_weights, k=count)
        if rng.random() < 0.3:
            ops += rng.choices(self.structural, self.structural_weights)
        notes = [op(rng, buf, s) for op in ops]
        if len(buf) < 14:                  # the kernel refuses test runs shorter than Ethernet
            buf += bytes(14 - len(buf))
        return bytes(buf), notes


# ---- the run ------------------------------------------------------------------

def program(harness, services, flood_guard: bool) -> tuple[float, float]:
    """Write `services` through the real planner and map writer, with the pool
    settings of points 5 and 6 (the pool's flood guard where asked). Returns the
    CLOCK_MONOTONIC seconds between which the grace of a backend that went
    down in this write ends."""
    before = time.monotonic()
    harness.program(services, extra_macs=(POOL_MAC,), udp_idle_ns=UDP_IDLE_S * 10**9,
                    down_grace_ns=int(GRACE_S * 1e9), flood_rate=Settings().flood_guard_rate if flood_guard else 0)
    return before + GRACE_S, time.monotonic() + GRACE_S


DRAINED = {mac_of(12)}
DOWN_OR_REMOVED = {mac_of(13), mac_of(15), mac_of(33), mac_of(41), mac_of(63)}
MIDWAY_DOWN = frozenset({mac_of(14)})


def establish(harness) -> O.Model:
    """Place flows on every backend, then drain, fail and remove some of them.

    Returns the oracle's model of the state after the change, holding exactly
    the flows seen placed on the backends that now take no new flows."""
    harness.dp.map("flows").clear()
    harness.dp.map("flows6").clear()
    program(harness, before_services(), flood_guard=False)   # every flow placed here gets its entry
    before = O.Oracle(model_of(before_services(), GATEWAY_MACS))
    placed = {}
    firsts = [(c, VIP1, 20000 + i, 104, "tcp") for c in CLIENTS for i in range(150)]
    firsts += [(c, VIP1, 21000 + i, 5000, "udp") for c in CLIENTS for i in range(75)]
    firsts += [(c, VIP2, 22000 + i, 11112, "tcp") for c in CLIENTS for i in range(20)]
    firsts += [(c, VIP6, 23000 + i, 104, "tcp") for c in CLIENTS6 for i in range(60)]
    for client, vip, cport, vport, kind in firsts:
        raw = bytes(to(vip, vport, kind, sport=cport, src=client))
        verdict = harness.run(raw)
        problem = before.judge(raw, verdict.action, verdict.data)
        assert problem is None and verdict.action == O.TX, (
            f"placing {client}:{cport} -> {vip}:{vport}: {O.ACTION_NAMES.get(verdict.action)}, {problem}")
        placed[O.flow_key(ipaddress.ip_address(client).packed, ipaddress.ip_address(vip).packed,
                          cport, vport, PROTO[kind])] = verdict.data[0:6]

    grace_ends = program(harness, after_services(), flood_guard=True)
    model = model_of(after_services(), GATEWAY_MACS)
    model.placed.update(placed)
    for key, mac in placed.items():
        if mac in DRAINED:
            model.held[key] = O.Held(mac, "drained", None)
        elif mac in DOWN_OR_REMOVED:
            model.held[key] = O.Held(mac, "grace", grace_ends)
    on = Counter(h.mac for h in model.held.values())
    assert all(on[m] > 0 for m in DRAINED | DOWN_OR_REMOVED), f"no flow landed on some backend: {on}"
    return model


@dataclass
class Case:
    index: int
    seed: Seed
    notes: list
    raw: bytes
    action: int
    out: bytes


def describe(case: Case, minimal: bytes) -> str:
    changed = [i for i in range(min(len(minimal), len(case.seed.raw))) if minimal[i] != case.seed.raw[i]]
    return (f"  frame #{case.index} from seed '{case.seed.name}' after {case.notes or 'no mutation'}: "
            f"{O.ACTION_NAMES.get(case.action, case.action)}\n"
            f"    in : {case.raw.hex()}\n"
            f"    out: {case.out.hex()}\n"
            f"    minimal reproducer ({len(minimal)} bytes; differs from the seed at {changed}, "
            f"seed length {len(case.seed.raw)}): {minimal.hex()}")


def shrink(run, judge, case: Case, rule: str) -> bytes:
    """Smallest frame found that still breaks `rule`: cut the tail, then put seed bytes back."""
    def breaks(raw):
        verdict = run(raw)
        return judge(raw, verdict.retval, verdict.data) == rule

    raw = case.raw
    for length in range(14, len(raw)):
        if breaks(raw[:length]):
            raw = raw[:length]
            break
    buf = bytearray(raw)
    for i in range(min(len(buf), len(case.seed.raw))):
        if buf[i] != case.seed.raw[i]:
            trial = bytes(buf[:i]) + case.seed.raw[i:i + 1] + bytes(buf[i + 1:])
            if breaks(trial):
                buf[i] = case.seed.raw[i]
    return bytes(buf)


@pytest.mark.root
def test_mutated_frames_keep_to_the_specification(harness):
    """Issue 10's oracle over FRAMES mutated frames (BPF_PROG_TEST_RUN)."""
    rng_seed = int(os.environ.get("XDPLB_FUZZ_SEED") or random.SystemRandom().randrange(2 ** 32))
    print(f"fuzz: XDPLB_FUZZ_SEED={rng_seed} XDPLB_FUZZ_FRAMES={FRAMES}")
    rng = random.Random(rng_seed)
    model = establish(harness)
    first_grace_ends = max(h.until[1] for h in model.held.values() if h.until)
    oracle = O.Oracle(model)
    kinds = build_seeds(model.held)
    mutate = Mutator(rng)
    prog_fd = harness.dp.prog_fd

    def run(raw):
        return bpfsys.prog_test_run(prog_fd, raw)

    broken: dict[str, list[Case]] = {}
    actions: Counter = Counter()
    breaks: Counter = Counter()
    started = time.monotonic()
    for index, (_, seeds) in enumerate(rng.choices(kinds, [w for w, _ in kinds], k=FRAMES)):
        if index == FRAMES // 2:
            # The first grace is over, whatever the machine's speed: from here on
            # the flows it held must have left their down or removed backends.
            time.sleep(max(0.0, first_grace_ends - time.monotonic()))
            grace_ends = program(harness, midway_services(), flood_guard=True)
            model.reconfigure(model_of(midway_services(), GATEWAY_MACS).services, MIDWAY_DOWN, grace_ends)
        s = rng.choice(seeds)
        raw, notes = mutate(s)
        ran = time.monotonic()
        verdict = run(raw)
        actions[O.ACTION_NAMES.get(verdict.retval, verdict.retval)] += 1
        rule = oracle.judge(raw, verdict.retval, verdict.data, (ran, time.monotonic()))
        if rule is not None:
            breaks[rule] += 1
            cases = broken.setdefault(rule, [])
            if len(cases) < 3:
                cases.append(Case(index, s, notes, raw, verdict.retval, verdict.data))
    elapsed = time.monotonic() - started
    summary = (f"fuzz seed {rng_seed}: {FRAMES} frames in {elapsed:.1f} s; actions {dict(actions)}; "
               f"oracle cases {dict(oracle.seen)}")
    print(summary)

    if broken:
        report = [summary, f"{len(broken)} rule(s) broken:"]
        for rule, cases in broken.items():
            report.append(f"- {rule}: {breaks[rule]} frame(s)")
            for case in cases:
                report.append(describe(case, shrink(run, oracle.judge, case, rule)))
        pytest.fail("\n".join(report), pytrace=False)

    # Not vacuous: every kind of verdict and both exceptions were exercised.
    for case, least in (("pass", 10000), ("drop", 200), ("drop fragment", 200), ("tx", 5000),
                        ("tx new connection", 2000), ("tx of ICMP", 500), ("tx held (drained)", 200),
                        ("tx held (grace)", 100), ("tx re-chosen after the grace", 20),
                        ("tx of ICMP held (grace)", 20), ("tx of ICMP held (drained)", 20),
                        ("tx ipv6", 1000), ("tx of ICMPv6", 100), ("drop fragment6", 50), ("pass ipv6", 1000),
                        ("pass ipv6 limit", 20), ("pass ipv6 routing", 20), ("tx nat6 request", 500)):
        assert oracle.seen[case] >= least, f"only {oracle.seen[case]} frames were '{case}' ({summary})"


# ---- the oracle can fail (pure: no root, no program) ------------------------------

class _At(O.Oracle):
    """The oracle with the program run at a time the test sets (`now`)."""
    now = 10.0

    def judge(self, raw, action, out, ran=None):
        return super().judge(raw, action, out, ran or (self.now, self.now))


def _oracle():
    return _At(model_of(after_services(), GATEWAY_MACS))


def _tx(raw: bytes, backend_octet: int, src=GW_MAC) -> bytes:
    return mac_of(backend_octet) + src + raw[12:]


def test_oracle_parser_agrees_with_scapy_on_every_seed():
    key = O.flow_key(bytes([10, 10, 0, 2]), bytes([10, 10, 0, 100]), 20001, 104, O.TCP)
    held = {key: O.Held(mac_of(12), "drained", None)}
    checked = 0
    for _, seeds in build_seeds(held):
        for s in seeds:
            frame = Ether(s.raw)
            ip = O.ipv4(s.raw)
            if IP in frame:
                layer = frame[IP]
                assert ip is not None, s.name
                want = (ipaddress.IPv4Address(layer.src).packed, ipaddress.IPv4Address(layer.dst).packed, layer.proto)
                assert (ip.saddr, ip.daddr, ip.proto) == want, s.name
                assert ip.fragment == bool(layer.flags.MF or layer.frag), s.name
                assert ip.l4 - ip.l3 == layer.ihl * 4, s.name
                checked += 1
            else:
                assert ip is None, s.name
    assert checked > 50


def test_oracle_rejects_what_the_specification_forbids():
    ack = bytes(tcp_to(VIP1, 104, sport=20001, flags="PA", payload=b"data"))
    syn = bytes(tcp_to(VIP1, 104, sport=20001, flags="S"))
    key = O.flow_key(bytes([10, 10, 0, 2]), bytes([10, 10, 0, 100]), 20001, 104, O.TCP)
    oracle = _oracle()
    assert oracle.judge(ack, O.TX, _tx(ack, 11)) is None
    assert "ABORTED" in oracle.judge(ack, O.ABORTED, ack)
    assert "changed the frame" in oracle.judge(ack, O.PASS, ack[:-1] + b"!")
    assert "more than the MAC" in oracle.judge(ack, O.TX, _tx(ack, 11)[:-1] + b"!")
    assert "source MAC" in oracle.judge(ack, O.TX, _tx(ack, 11, src=mac_of(99)))
    assert "not a live backend" in oracle.judge(ack, O.TX, _tx(ack, 21))       # another service's backend
    assert "not a live backend" in oracle.judge(ack, O.TX, _tx(ack, 13))       # down, and this flow was not on it
    assert "not a live backend" in oracle.judge(ack, O.TX, _tx(ack, 12))       # drained, and this flow was not on it

    # Held flows: they stay on their backend, never a new connection, and a grace ends.
    oracle.model.held[key] = O.Held(mac_of(12), "drained", None)
    assert oracle.judge(ack, O.TX, _tx(ack, 12)) is None
    assert "keep their established flows" in oracle.judge(ack, O.TX, _tx(ack, 14))
    assert "new TCP connection" in oracle.judge(syn, O.TX, _tx(syn, 12))
    oracle.model.held[key] = O.Held(mac_of(13), "grace", (11.0, 11.2))
    assert oracle.judge(ack, O.TX, _tx(ack, 13)) is None
    assert "keep their established flows" in oracle.judge(ack, O.TX, _tx(ack, 14))
    oracle.now = 11.1                   # the grace may or may not be over
    assert oracle.judge(ack, O.TX, _tx(ack, 13)) is None
    oracle.now = 11.2                   # it is over
    assert "after its grace" in oracle.judge(ack, O.TX, _tx(ack, 13))
    oracle.now = 11.1
    assert oracle.judge(ack, O.TX, _tx(ack, 14)) is None and key not in oracle.model.held   # re-chosen
    oracle.model.held[key] = O.Held(mac_of(13), "grace", (11.0, 11.2))
    assert oracle.judge(syn, O.TX, _tx(syn, 14)) is None and key not in oracle.model.held
    # A RST leaves open whether the flow stays.
    oracle.now = 10.0
    oracle.model.held[key] = O.Held(mac_of(13), "grace", (11.0, 11.2))
    rst = bytes(tcp_to(VIP1, 104, sport=20001, flags="R"))
    assert oracle.judge(rst, O.TX, _tx(rst, 13)) is None
    assert oracle.judge(ack, O.TX, _tx(ack, 14)) is None

    # A backend going down holds, loosely, the flows seen sent to it; no other flow may reach it.
    other = bytes(tcp_to(VIP1, 104, sport=20002, flags="PA"))
    fresh = _oracle()
    assert fresh.judge(ack, O.TX, _tx(ack, 14)) is None
    fresh.model.reconfigure(model_of(midway_services(), GATEWAY_MACS).services, MIDWAY_DOWN, (11.0, 11.2))
    assert fresh.judge(ack, O.TX, _tx(ack, 14)) is None and fresh.judge(ack, O.TX, _tx(ack, 16)) is None
    assert "not a live backend" in fresh.judge(other, O.TX, _tx(other, 14))

    # Point 5: frames for others pass untouched, even to a service.
    for mac in FOREIGN_MACS:
        foreign = mac + ack[6:]
        assert "point 5" in oracle.judge(foreign, O.TX, _tx(foreign, 11))
        assert "point 5" in oracle.judge(foreign, O.DROP, foreign)
        assert oracle.judge(foreign, O.PASS, foreign) is None

    not_vip = bytes(tcp_to(GATEWAY_IP, 104))
    assert "not well-formed IPv4 or IPv6 to a VIP" in oracle.judge(not_vip, O.DROP, not_vip)
    unconfigured = bytes(tcp_to(VIP2, 104))
    assert "not configured" in oracle.judge(unconfigured, O.TX, _tx(unconfigured, 51))
    bad_ihl = bytearray(ack)
    bad_ihl[14] = 0x44
    assert "not well-formed" in oracle.judge(bytes(bad_ihl), O.DROP, bytes(bad_ihl))
    short = ack[:14 + 20 + 10]
    assert "cut short" in oracle.judge(short, O.TX, _tx(short, 11))

    # Point 7: fragments.
    frag = bytes(eth() / IP(src=CLIENTS[0], dst=VIP1, flags="MF") / TCP(dport=104) / Raw(b"x" * 8))
    assert "fragment" in oracle.judge(frag, O.TX, _tx(frag, 11))
    assert "stay dropped" in oracle.judge(frag, O.PASS, frag)
    assert oracle.judge(frag, O.DROP, frag) is None
    ping_frag = bytes(eth() / IP(src=CLIENTS[0], dst=VIP1, flags="MF") / ICMP() / Raw(b"x" * 8))
    assert "non-TCP/UDP fragment" in oracle.judge(ping_frag, O.DROP, ping_frag)

    # NAT: what a NAT backend's address sends that cannot be translated may be dropped; from others not.
    backend_frag = bytes(nat_reply(61, PACS_PORT, "tcp", CLIENTS[0], 50200, flags="MF"))
    stranger_frag = bytes(nat_reply(63, PACS_PORT, "tcp", CLIENTS[0], 50200, flags="MF"))
    cut = bytes(nat_reply(61, PACS_PORT, "tcp", CLIENTS[0], 50201))[:14 + 20 + 6]
    error = bytes(Ether(src=_mac(mac_of(61)), dst=GW) / IP(src="10.10.0.61", dst=CLIENTS[0]) / ICMP(type=3, code=3)
                  / bytes(IP(src=CLIENTS[0], dst="10.10.0.61") / TCP(sport=50202, dport=PACS_PORT))[:28])
    for frame in (backend_frag, cut, error):
        assert oracle.judge(frame, O.DROP, frame) is None
    assert "not well-formed IPv4 or IPv6 to a VIP" in oracle.judge(stranger_frag, O.DROP, stranger_frag)

    # Point 4: "fragmentation needed" goes to the quoted flow's service; other ICMP to the stack.
    icmp = bytes(too_big(CLIENTS[0], VIP1, 20001, 104, O.TCP))
    assert oracle.judge(icmp, O.TX, _tx(icmp, 14)) is None
    assert "not a live backend" in oracle.judge(icmp, O.TX, _tx(icmp, 31))
    oracle.model.held[key] = O.Held(mac_of(12), "drained", None)
    assert oracle.judge(icmp, O.TX, _tx(icmp, 12)) is None
    assert "keep their established flows" in oracle.judge(icmp, O.TX, _tx(icmp, 14))
    ssh = bytes(too_big(CLIENTS[0], VIP1, 20001, 22, O.TCP))
    assert "quoting no configured service" in oracle.judge(ssh, O.TX, _tx(ssh, 11))
    unreachable = bytes(too_big(CLIENTS[0], VIP1, 20001, 104, O.TCP, code=3))
    assert "other than" in oracle.judge(unreachable, O.TX, _tx(unreachable, 11))
    ping = bytes(eth() / IP(src=CLIENTS[0], dst=VIP1) / ICMP())
    assert "not 'fragmentation needed'" in oracle.judge(ping, O.DROP, ping)


def test_oracle_rejects_what_issue_15_forbids_for_ipv6():
    oracle = _oracle()
    syn6 = bytes(to6(VIP6, 104, "tcp", sport=23001))
    assert oracle.judge(syn6, O.TX, _tx(syn6, 61)) is None
    assert "backend that is not live" in oracle.judge(syn6, O.TX, _tx(syn6, 71))      # web6's backend
    for name in ("over the limit", "routing 1", "hop-by-hop second"):
        raw = bytes(to6(VIP6, 104, "tcp", chain=chains6()[name]))
        assert "whose chain is" in oracle.judge(raw, O.TX, _tx(raw, 61)), name
        assert "whose chain is" in oracle.judge(raw, O.DROP, raw), name
        assert oracle.judge(raw, O.PASS, raw) is None
    longest = bytes(to6(VIP6, 104, "tcp", chain=chains6()["longest"]))
    assert oracle.judge(longest, O.TX, _tx(longest, 62)) is None
    frag = bytes(eth() / IPv6(src=CLIENTS6[0], dst=VIP6) / IPv6ExtHdrFragment(m=1) / TCP(dport=104))
    assert "IPv6 fragment to a VIP that is not ICMPv6" in oracle.judge(frag, O.PASS, frag)
    assert "XDP_TX of an IPv6 fragment" in oracle.judge(frag, O.TX, _tx(frag, 61))
    ping_frag = bytes(eth() / IPv6(src=CLIENTS6[0], dst=VIP6) / IPv6ExtHdrFragment(m=1) / ICMPv6EchoRequest())
    assert "ICMPv6 fragment" in oracle.judge(ping_frag, O.DROP, ping_frag)
    ns = bytes(eth() / IPv6(src=CLIENTS6[0], dst=VIP6) / ICMPv6ND_NS(tgt=VIP6))
    assert "not Packet Too Big" in oracle.judge(ns, O.DROP, ns)
    assert "other than Packet Too Big" in oracle.judge(ns, O.TX, _tx(ns, 61))
    ptb = bytes(too_big6(CLIENTS6[0], VIP6, 23001, 104, O.TCP))
    assert oracle.judge(ptb, O.TX, _tx(ptb, 62)) is None
    assert "not a live backend" in oracle.judge(ptb, O.TX, _tx(ptb, 81))
    ssh = bytes(too_big6(CLIENTS6[0], VIP6, 23001, 22, O.TCP))
    assert "quoting no configured service" in oracle.judge(ssh, O.TX, _tx(ssh, 61))


def _translated6(raw: bytes, mac: bytes, **fields) -> bytes:
    """`raw` as a correct NAT over IPv6 leaves it: MACs, then `fields` of the
    IPv6 and TCP/UDP headers (dst/src, dport/sport), the checksum from scratch."""
    frame = Ether(raw)
    frame.dst, frame.src = _mac(mac), GW
    l4 = frame[TCP] if TCP in frame else frame[UDP]
    for name in ("dst", "src"):
        if name in fields:
            setattr(frame[IPv6], name, fields[name])
    for name in ("dport", "sport"):
        if name in fields:
            setattr(l4, name, fields[name])
    del l4.chksum
    return bytes(frame)


def test_oracle_rejects_what_nat_over_ipv6_forbids():
    oracle = _oracle()
    request = bytes(to6(VIP6, NAT_TCP_PORT, "tcp", sport=23100, payload=b"A-ASSOCIATE"))
    good = _translated6(request, mac_of(91), dst="2001:db8::91", dport=PACS_PORT)
    assert oracle.judge(request, O.TX, good) is None
    wrong_sum = bytearray(good)
    wrong_sum[14 + 40 + 16] ^= 1
    assert "checksum wrong" in oracle.judge(request, O.TX, bytes(wrong_sum))
    assert "another address or port" in oracle.judge(
        request, O.TX, _translated6(request, mac_of(91), dst="2001:db8::92", dport=PACS_PORT))
    assert "must not" in oracle.judge(request, O.TX, good[:14 + 7] + b"\x01" + good[14 + 8:])   # the hop limit

    none = bytes(eth() / IPv6(src=CLIENTS6[0], dst=VIP6) / UDP(sport=23101, dport=NAT_UDP_PORT, chksum=0) / Raw(b"x"))
    kept = bytearray(_translated6(none, mac_of(93), dst="2001:db8::93", dport=PACS_UDP_PORT))
    kept[14 + 40 + 6:14 + 40 + 8] = b"\0\0"
    assert "RFC 8200" in oracle.judge(none, O.TX, bytes(kept))
    assert oracle.judge(none, O.DROP, none) is None

    # A payload whose translated checksum computes to 0, which goes as 0xffff, never as 0.
    probe = Ether(_translated6(bytes(to6(VIP6, NAT_UDP_PORT, "udp", sport=23102, payload=b"\0\0pong")), mac_of(93),
                               dst="2001:db8::93", dport=PACS_UDP_PORT))
    payload = probe[UDP].chksum.to_bytes(2, "big") + b"pong"
    datagram = bytes(to6(VIP6, NAT_UDP_PORT, "udp", sport=23102, payload=payload))
    ones = _translated6(datagram, mac_of(93), dst="2001:db8::93", dport=PACS_UDP_PORT)
    assert Ether(ones)[UDP].chksum == 0xFFFF
    assert oracle.judge(datagram, O.TX, ones) is None
    zero = bytearray(ones)
    zero[14 + 40 + 6:14 + 40 + 8] = b"\0\0"
    assert "checksum of 0" in oracle.judge(datagram, O.TX, bytes(zero))

    reply = bytes(nat_reply(91, PACS_PORT, "tcp", CLIENTS6[0], 23200, chain=(IPv6ExtHdrDestOpt(),)))
    assert oracle.judge(reply, O.TX, _translated6(reply, bytes(6), src=VIP6, sport=NAT_TCP_PORT)) is None
    assert oracle.judge(reply, O.REDIRECT, _translated6(reply, bytes(6), src=VIP6, sport=NAT_TCP_PORT)) is None
    assert "another address or port" in oracle.judge(
        reply, O.TX, _translated6(reply, bytes(6), src=VIP6, sport=NAT_TCP_PORT + 1))
    assert oracle.judge(reply, O.DROP, reply) is None

    # What an IPv6 NAT backend's address sends that cannot be translated may be dropped; from others not.
    frag = bytes(eth() / IPv6(src="2001:db8::91", dst=CLIENTS6[0]) / IPv6ExtHdrFragment(offset=4, nh=6) / Raw(b"y" * 8))
    cut = bytes(nat_reply(91, PACS_PORT, "tcp", CLIENTS6[0], 23201))[:14 + 40 + 6]
    error = bytes(Ether(src=_mac(mac_of(93)), dst=GW) / IPv6(src="2001:db8::93", dst=CLIENTS6[0])
                  / ICMPv6DestUnreach(code=4) / Raw(bytes(IPv6(src=CLIENTS6[0], dst="2001:db8::93") / UDP())))
    for frame in (frag, cut, error):
        assert oracle.judge(frame, O.DROP, frame) is None
    stranger = frag[:14 + 8] + ipaddress.IPv6Address("2001:db8::99").packed + frag[14 + 24:]
    assert "not well-formed IPv4 or IPv6 to a VIP" in oracle.judge(stranger, O.DROP, stranger)
    echo = bytes(Ether(src=_mac(mac_of(93)), dst=GW) / IPv6(src="2001:db8::93", dst=CLIENTS6[0]) / ICMPv6EchoRequest())
    assert "not well-formed IPv4 or IPv6 to a VIP" in oracle.judge(echo, O.DROP, echo)

    # A chain not walked to its end (over the limit, Segments Left > 0) from a NAT backend's address:
    # it may be dropped, whatever follows; from another address, or to a VIP, it must pass.
    for name in ("over the limit", "routing 1"):
        unwalked = bytes(nat_reply(91, PACS_PORT, "tcp", CLIENTS6[0], 23202, chain=chains6()[name]))
        assert oracle.judge(unwalked, O.DROP, unwalked) is None, name
        assert oracle.judge(unwalked, O.PASS, unwalked) is None, name
        assert "not a NAT reply" in oracle.judge(unwalked, O.REDIRECT, unwalked), name
        assert "not well-formed IPv4 or IPv6 to a VIP" in oracle.judge(unwalked, O.TX, _tx(unwalked, 91)), name
        stranger = unwalked[:14 + 8] + ipaddress.IPv6Address("2001:db8::99").packed + unwalked[14 + 24:]
        assert "not well-formed IPv4 or IPv6 to a VIP" in oracle.judge(stranger, O.DROP, stranger), name
        to_vip = unwalked[:14 + 24] + ipaddress.IPv6Address(VIP6).packed + unwalked[14 + 40:]
        assert "whose chain is" in oracle.judge(to_vip, O.DROP, to_vip), name
    hbh_second = bytes(nat_reply(91, PACS_PORT, "tcp", CLIENTS6[0], 23203, chain=chains6()["hop-by-hop second"]))
    assert "not well-formed IPv4 or IPv6 to a VIP" in oracle.judge(hbh_second, O.DROP, hbh_second)


def test_oracle_ipv6_parser_agrees_with_scapy_on_every_ipv6_seed():
    checked = 0
    for _, seeds in seeds6({}):
        for s in seeds:
            frame = Ether(s.raw)
            ip = O.ipv6(s.raw)
            assert ip is not None, s.name
            layer = frame[IPv6]
            assert (ip.saddr, ip.daddr) == (ipaddress.IPv6Address(layer.src).packed,
                                            ipaddress.IPv6Address(layer.dst).packed), s.name
            assert ip.fragment == (IPv6ExtHdrFragment in frame and not ip.chain), s.name
            if TCP in frame and not ip.chain and not ip.fragment and ICMPv6PacketTooBig not in frame:
                assert ip.proto == O.TCP and s.raw[ip.l4:ip.l4 + 2] == frame[TCP].sport.to_bytes(2, "big"), s.name
            checked += 1
    assert checked > 30
