"""IPv6 frames for the packet tests, built with scapy (see packets.py)."""
from __future__ import annotations

import ipaddress

from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (ICMPv6EchoRequest, ICMPv6ND_NS, ICMPv6PacketTooBig, IPv6, IPv6ExtHdrDestOpt,
                                IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting, PadN)
from scapy.packet import Raw

from . import packets as P
from .conftest import backend, mac_of
from xdplb import plan

VIP6 = ipaddress.IPv6Address("2001:db8::100")
CLIENT6 = "2001:db8:c::2"
ROUTER6 = "2001:db8:ff::1"
GATEWAY6 = "2001:db8::10"
BACKEND6 = {f"2001:db8::{i}": mac_of(i) for i in (11, 12, 13, 14)}


def backend6(i: int, weight: int = 1, healthy: bool = True) -> plan.BackendState:
    return plan.BackendState(f"be6-{i}", ipaddress.IPv6Address(f"2001:db8::{i}"), weight, mac_of(i), healthy)


def service6(name, port, protocol="tcp", persistence="flow", client_prefix=128, backends=None) -> plan.ServiceState:
    backends = backends if backends is not None else tuple(backend6(i) for i in (11, 12, 13))
    return plan.ServiceState(name, VIP6, port, protocol, persistence, tuple(backends), client_prefix=client_prefix)


def dual_stack_services() -> tuple[plan.ServiceState, ...]:
    """The IPv4 defaults beside IPv6 services on the same ports."""
    from .conftest import default_services

    return default_services() + (
        service6("dicom6", 104),
        service6("web6", 80, persistence="client", client_prefix=64),
        service6("udp6", 5000, protocol="udp"),
    )


def ip6(src=CLIENT6, dst=str(VIP6), **kw):
    return P.eth() / IPv6(src=src, dst=dst, **kw)


def syn6(dport=104, sport=40000, src=CLIENT6, dst=str(VIP6), chain=()):
    pkt = ip6(src, dst)
    for ext in chain:
        pkt = pkt / ext
    return pkt / TCP(sport=sport, dport=dport, flags="S", seq=1000)


def ack6(dport=104, sport=40000, src=CLIENT6, payload=b"DICOM P-DATA"):
    return ip6(src) / TCP(sport=sport, dport=dport, flags="A", seq=1001, ack=1) / Raw(payload)


def udp6(dport=5000, sport=40000, src=CLIENT6):
    return ip6(src) / UDP(sport=sport, dport=dport) / Raw(b"ping")


# Extension headers of every kind walked, each 8 bytes unless padded longer.
def hbh(pad=0):
    return IPv6ExtHdrHopByHop(options=[PadN(optdata=b"\0" * pad)] if pad else [])


def dst_opts(pad=0):
    return IPv6ExtHdrDestOpt(options=[PadN(optdata=b"\0" * pad)] if pad else [])


def routing(segments_left=0, type_=0):
    return IPv6ExtHdrRouting(type=type_, segleft=segments_left, addresses=["2001:db8::99"])


def fragment6(offset=0, more=True, nh=None):
    return IPv6ExtHdrFragment(offset=offset, m=1 if more else 0, id=7, **({"nh": nh} if nh is not None else {}))


def frag_tcp6(first=True, dst=str(VIP6)):
    if first:
        return ip6(dst=dst) / fragment6(0) / TCP(sport=40004, dport=104) / Raw(b"x" * 32)
    return ip6(dst=dst) / fragment6(4, more=False, nh=6) / Raw(b"y" * 32)


def frag_icmp6(first=True):
    if first:
        return ip6() / fragment6(0) / ICMPv6EchoRequest(data=b"p" * 64)
    return ip6() / fragment6(9, more=False, nh=58) / Raw(b"p" * 64)


def echo6():
    return ip6() / ICMPv6EchoRequest()


def neighbour_solicitation_unicast():
    return ip6(dst=str(VIP6), hlim=255) / ICMPv6ND_NS(tgt=str(VIP6))


def reply6(sport=104, dport=40000, proto="tcp", src=str(VIP6), dst=CLIENT6, payload=b"x" * 120, chain=()):
    """A backend's DSR reply that was too big, as a router quotes it."""
    l4 = TCP(sport=sport, dport=dport, flags="A", seq=5000, ack=1001) if proto == "tcp" else UDP(sport=sport, dport=dport)
    pkt = IPv6(src=src, dst=dst)
    for ext in chain:
        pkt = pkt / ext
    return pkt / l4 / Raw(payload)


def too_big6(quoted=None, dst=str(VIP6), mtu=1280) -> bytes:
    quoted = reply6() if quoted is None else quoted
    return bytes(P.eth() / IPv6(src=ROUTER6, dst=dst) / ICMPv6PacketTooBig(mtu=mtu) / bytes(quoted))


def mac_of_address(address: str) -> bytes:
    return BACKEND6[str(ipaddress.ip_address(address))]


__all__ = ["backend", "dual_stack_services"]
