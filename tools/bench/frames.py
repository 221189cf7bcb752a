"""Raw frames and flow-table keys for the data-plane bench. Pure.

Built with struct rather than scapy because the bench makes up to a million
flow keys and tens of thousands of frames; the unit tests check both
against scapy and xdplb/structs.py.
"""
from __future__ import annotations

import ipaddress
import socket
import struct

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
TCP_SYN, TCP_ACK = 0x02, 0x10
FLOW_KEY_SIZE = 16      # struct flow_key in bpf/lb_structs.h


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_frame(src_mac: bytes, dst_mac: bytes, src_ip: str, dst_ip: str, sport: int, dport: int,
              flags: int, payload: bytes = b"", seq: int = 1000, ack: int = 0) -> bytes:
    """Ethernet / IPv4 (no options) / TCP (no options) with valid checksums."""
    src, dst = socket.inet_aton(src_ip), socket.inet_aton(dst_ip)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0) + payload
    pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, socket.IPPROTO_TCP, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return dst_mac + src_mac + struct.pack("!H", ETH_P_IP) + ip + tcp


def tcp_frame6(src_mac: bytes, dst_mac: bytes, src_ip: str, dst_ip: str, sport: int, dport: int,
               flags: int, payload: bytes = b"", seq: int = 1000, ack: int = 0) -> bytes:
    """Ethernet / IPv6 (no extension header) / TCP (no options) with a valid checksum."""
    src, dst = ipaddress.IPv6Address(src_ip).packed, ipaddress.IPv6Address(dst_ip).packed
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0) + payload
    pseudo = src + dst + struct.pack("!I3xB", len(tcp), socket.IPPROTO_TCP)
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!IHBB16s16s", 6 << 28, len(tcp), socket.IPPROTO_TCP, 64, src, dst)
    return dst_mac + src_mac + struct.pack("!H", ETH_P_IPV6) + ip + tcp


def flow_key(src_ip: int | str, dst_ip: str, sport: int, dport: int, proto: int = socket.IPPROTO_TCP) -> bytes:
    """struct flow_key as the kernel stores it: addresses and ports in network order."""
    src = int(ipaddress.IPv4Address(src_ip)).to_bytes(4, "big") if isinstance(src_ip, str) else src_ip.to_bytes(4, "big")
    return src + socket.inet_aton(dst_ip) + struct.pack("!HHB", sport, dport, proto) + bytes(3)


def flow_keys(count: int, first_src: str, dst_ip: str, sport: int, dport: int) -> bytes:
    """`count` distinct keys, packed back to back: source addresses first_src, first_src+1, ..."""
    start = int(ipaddress.IPv4Address(first_src))
    if start + count - 1 > 0xFFFFFFFF:
        raise ValueError(f"{count} source addresses from {first_src} run past 255.255.255.255")
    tail = flow_key(0, dst_ip, sport, dport)[4:]   # everything after the source address
    return b"".join((start + i).to_bytes(4, "big") + tail for i in range(count))


def flow_values(count: int, backend_id: int, service_id: int) -> bytes:
    """struct flow_value × count (host order; atime 0, as for TCP)."""
    return struct.pack("=IIQ", backend_id, service_id, 0) * count
