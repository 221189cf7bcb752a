"""Python twin of bpf/flow_hash.h: which Maglev slot a flow lands in (IPv4 and IPv6).

Lets tests and `xdplb simulate`-style tooling predict a flow's backend
without the kernel. The packet tests compare this prediction with what the
real program did, so the two implementations cannot drift silently.
"""
from __future__ import annotations

import ipaddress
import sys

_MASK = 0xFFFFFFFF


def _word(raw: bytes) -> int:
    """A __u32 load of network-order bytes, as the CPU sees it."""
    return int.from_bytes(raw, sys.byteorder)


def fmix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK
    h ^= h >> 16
    return h


def _hash_word(h: int, w: int) -> int:
    return (fmix32(h ^ w) + 0x9E3779B9) & _MASK


def flow_hash_v4(seed: int, saddr, daddr, sport: int, dport: int, proto: int) -> int:
    """persistence = flow."""
    src = _word(ipaddress.IPv4Address(saddr).packed)
    dst = _word(ipaddress.IPv4Address(daddr).packed)
    # Ports are __be16 loads widened to 32 bits: sport in the low half.
    ports = _word(sport.to_bytes(2, "big")) | (_word(dport.to_bytes(2, "big")) << 16)
    h = seed & _MASK
    for w in (src, dst, ports, proto):
        h = _hash_word(h, w)
    return fmix32(h)


def client_hash_v4(seed: int, saddr) -> int:
    """persistence = client."""
    return fmix32(_hash_word(seed & _MASK, _word(ipaddress.IPv4Address(saddr).packed)))


def _words6(address) -> list[int]:
    packed = ipaddress.IPv6Address(address).packed
    return [_word(packed[i:i + 4]) for i in range(0, 16, 4)]


def flow_hash_v6(seed: int, saddr, daddr, sport: int, dport: int, proto: int) -> int:
    """persistence = flow, IPv6: each address as four words."""
    ports = _word(sport.to_bytes(2, "big")) | (_word(dport.to_bytes(2, "big")) << 16)
    h = seed & _MASK
    for w in (*_words6(saddr), *_words6(daddr), ports, proto):
        h = _hash_word(h, w)
    return fmix32(h)


def client_hash_v6(seed: int, saddr, prefix: int = 128) -> int:
    """persistence = client, IPv6: the first `prefix` bits of the client address."""
    kept = int(ipaddress.IPv6Address(saddr)) >> (128 - prefix) << (128 - prefix)
    h = seed & _MASK
    for w in _words6(kept):
        h = _hash_word(h, w)
    return fmix32(h)


def slot_for(seed: int, size: int, persistence: str, saddr, daddr, sport: int, dport: int, proto: int,
             client_prefix: int = 128) -> int:
    """The Maglev slot of a flow of either family (client_prefix: IPv6 only)."""
    if ipaddress.ip_address(saddr).version == 6:
        if persistence == "client":
            return client_hash_v6(seed, saddr, client_prefix) % size
        return flow_hash_v6(seed, saddr, daddr, sport, dport, proto) % size
    if persistence == "client":
        return client_hash_v4(seed, saddr) % size
    return flow_hash_v4(seed, saddr, daddr, sport, dport, proto) % size
