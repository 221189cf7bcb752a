"""Packets for the fixtures, built with scapy.

Frames arrive at the gateway from CLIENT_MAC addressed to GW_MAC; a
forwarded frame leaves from GW_MAC to the backend's MAC, otherwise unchanged.
"""
from __future__ import annotations

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.packet import Raw

from .conftest import CLIENT, GW_MAC, VIP

CLIENT_MAC = "02:00:0a:0a:00:02"
GW = ":".join(f"{b:02x}" for b in GW_MAC)


def eth():
    return Ether(src=CLIENT_MAC, dst=GW)


def syn(dport=104, sport=40000, src=CLIENT, dst=str(VIP), **ip):
    return eth() / IP(src=src, dst=dst, **ip) / TCP(sport=sport, dport=dport, flags="S", seq=1000)


def ack(dport=104, sport=40000, src=CLIENT, payload=b"DICOM P-DATA"):
    return eth() / IP(src=src, dst=str(VIP)) / TCP(sport=sport, dport=dport, flags="A", seq=1001, ack=1) / Raw(payload)


def udp(dport=5000, sport=40000, payload=b"ping"):
    return eth() / IP(src=CLIENT, dst=str(VIP)) / UDP(sport=sport, dport=dport) / Raw(payload)


def vlan_syn(kind=Dot1Q, vlan=42):
    return eth() / kind(vlan=vlan) / IP(src=CLIENT, dst=str(VIP)) / TCP(sport=40001, dport=104, flags="S")


def qinq_outer_only():
    return eth() / Dot1AD(vlan=7) / IP(src=CLIENT, dst=str(VIP)) / TCP(sport=40002, dport=104, flags="S")


def arp_request():
    return Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc=CLIENT, pdst=str(VIP))


def ssh_to_gateway():
    return eth() / IP(src=CLIENT, dst="10.10.0.10") / TCP(sport=50000, dport=22, flags="S")


def icmp_to_vip():
    return eth() / IP(src=CLIENT, dst=str(VIP)) / ICMP()


def ipv6_packet():
    return eth() / IPv6(src="fd00::2", dst="fd00::100") / TCP(sport=40000, dport=104, flags="S")


def with_options():
    # Record-route option: IHL 9 (36-byte header).
    return eth() / IP(src=CLIENT, dst=str(VIP), options=b"\x07\x0f\x04" + b"\x00" * 13) / TCP(sport=40003, dport=104, flags="S")


def fragment(first=True, dst=str(VIP)):
    if first:
        return eth() / IP(src=CLIENT, dst=dst, flags="MF", frag=0) / TCP(sport=40004, dport=104) / Raw(b"x" * 32)
    return eth() / IP(src=CLIENT, dst=dst, frag=4, proto=6) / Raw(b"y" * 32)


def rewritten(packet, backend_mac: bytes) -> bytes:
    """What a forwarded frame must look like: only the two MACs change."""
    raw = bytearray(bytes(packet))
    raw[0:6] = backend_mac
    raw[6:12] = GW_MAC
    return bytes(raw)
