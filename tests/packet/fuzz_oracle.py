"""The fuzz test's oracle: what issue 10 allows the XDP program to do with a frame.

Written from the specification, not from bpf/: it parses frames itself (its
own few lines of header parsing, no scapy in the per-frame path, nothing of
xdplb) and judges the program's verdict against the configured state the test
declared. It never predicts which backend Maglev or the flow hash picks; it
only checks that the backend is one the rules allow.

The rules (issue 10, "Tests that must exist", and the points they refer to):
  - never XDP_ABORTED (nor any action but PASS, DROP, TX);
  - XDP_PASS leaves the frame byte for byte;
  - point 5: a frame not addressed to the gateway's MAC (or a MAC the pool
    names) passes untouched, whatever it carries;
  - XDP_DROP only for a well-formed IPv4 header addressed to a VIP;
  - XDP_TX only for TCP/UDP to a configured (VIP, port, protocol), with only
    the MACs changed (source: the gateway's) and the destination MAC a live
    backend of that service (up, resolved, weight > 0). Two exceptions, each
    on its own terms:
      * point 4: ICMP "fragmentation needed" to a VIP goes to a backend of the
        service named by the quoted packet's source (VIP, port, protocol);
      * point 6: a flow established on a backend that since went down (or was
        removed) stays there within the grace period, and one established on
        a since-drained backend stays there (it must: flows stay put); never
        a new connection (a TCP SYN without ACK), which is placed by Maglev
        and replaces the entry. After a RST of such a flow either is allowed;
        its "fragmentation needed" messages go where the flow goes;
  - point 7: a TCP/UDP fragment to a VIP is dropped, any other fragment to a
    VIP passes (both only for frames addressed to the gateway, as point 5
    says); never is a fragment forwarded;
  - point 4: ICMP to a VIP other than "fragmentation needed" passes (ping).

NAT (issue 13): a service may translate (Model.nat). Its XDP_TX may change,
besides the MACs, exactly the destination address and port, to the target
of the backend whose MAC it carries, and the IPv4 and TCP/UDP checksums by
what the change requires (~C less the changed words is kept, so a checksum
right before is right after and a wrong one stays wrong by as much; a UDP
checksum of 0 stays 0). A frame from a NAT backend's (address, port, protocol) (Model.reverse) is a reply: besides
passing untouched, it may be dropped (no route, no neighbour: the test's
namespace decides, the oracle cannot), or sent (XDP_TX or XDP_REDIRECT)
with exactly its source address and port changed to the service's VIP and
port and the checksums kept by the same invariant; the MACs are the route's.
What a NAT backend's ADDRESS sends that cannot be translated (a TCP/UDP
fragment or cut-short header, an ICMP error; over IPv6 also anything behind
a chain over the limit or a routing header with Segments Left > 0), not to a
VIP, may be dropped (nat.h, nat6.h: unless it is to the gateway itself,
which the namespace decides).
NAT over IPv6 (issue 15, point 4) by the same rules, with a 16-byte address,
no IP header checksum, the TCP/UDP header after a walked chain, ICMPv6 errors
(types 1-4) for ICMP's, and two of its own: an IPv6 UDP datagram with
checksum 0 is never translated (RFC 8200: it is invalid), and no translated
UDP datagram of either family leaves with checksum 0 unless it came with 0
(IPv4's "none").

IPv6 (issue 15), judged by the same rules where they apply, and these:
  - a chain of more than IPV6_EXT_MAX (4) hop-by-hop, destination options
    and routing headers, a routing header with Segments Left > 0, and a
    hop-by-hop header anywhere but first pass to the stack: never DROP or TX
    (the first two may be dropped from a NAT backend's address, not to a
    VIP, as NAT above says);
  - a fragment (a fragment header) to a VIP is dropped unless the fragment
    header says ICMPv6 follows: that one passes (never DROP or TX);
  - ICMPv6 to a VIP passes, except a Packet Too Big (type 2) quoting a
    TCP/UDP packet from a configured (VIP, port, protocol), which may go to
    a backend of that service by the rules of point 4.

"Well-formed IPv4" means the header itself: version 4, IHL >= 5, the whole
IHL present in the frame and tot_len >= IHL * 4, after at most two 802.1Q or
802.1ad tags. Checksums are not part of it (the specification never asks the
balancer to verify them, and DSR leaves them to the backend). The README
promises one tag: what the program must do (the point 7 and ICMP rules) is
asked only of frames with at most one; what it may do is allowed under two.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

# Kernel UAPI values of enum xdp_action.
ABORTED, DROP, PASS, TX, REDIRECT = range(5)
ACTION_NAMES = {ABORTED: "XDP_ABORTED", DROP: "XDP_DROP", PASS: "XDP_PASS", TX: "XDP_TX", REDIRECT: "XDP_REDIRECT"}

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ICMPV6 = 58
IPV6_EXT = (0, 43, 60)  # hop-by-hop, routing, destination options (walked); 44 fragment ends the walk
IPV6_EXT_MAX = 4        # the documented limit (bpf/parse_ipv6.h)
VLAN_TYPES = (0x8100, 0x88A8)
MAX_TAGS = 2            # may be balanced under up to two tags; must be (point 7, ICMP) under at most one,
                        # as the README documents
TCP, UDP, ICMP = 6, 17, 1
SYN, RST, ACK = 0x02, 0x04, 0x10


@dataclass
class Ip:
    """Offsets and fields of a frame's well-formed IPv4 header (None if it has none)."""
    tags: int           # VLAN tags before it
    l3: int
    l4: int             # first byte after the IPv4 header (options included)
    proto: int
    saddr: bytes
    daddr: bytes
    fragment: bool
    family: int = 4
    chain: str = ""     # IPv6: "" (walked), "limit", "routing" or "malformed": only XDP_PASS is allowed


def _l3(raw: bytes) -> tuple[int, int, int] | None:
    """(tags, ethertype, offset of the L3 header) after at most MAX_TAGS tags."""
    n = len(raw)
    off = 12
    for tags in range(MAX_TAGS + 1):
        if off + 2 > n:
            return None
        ethertype = (raw[off] << 8) | raw[off + 1]
        if ethertype in VLAN_TYPES:
            off += 4
            continue
        return tags, ethertype, off + 2
    return None


def ipv4(raw: bytes) -> Ip | None:
    """The frame's IPv4 header if it is well-formed (see the module doc)."""
    n = len(raw)
    found = _l3(raw)
    if found is None or found[1] != ETH_P_IP:
        return None
    tags, _, l3 = found
    if l3 + 20 > n:
        return None
    vihl = raw[l3]
    ihl = (vihl & 0x0F) * 4
    if vihl >> 4 != 4 or ihl < 20 or l3 + ihl > n:
        return None
    if ((raw[l3 + 2] << 8) | raw[l3 + 3]) < ihl:
        return None
    frag = ((raw[l3 + 6] << 8) | raw[l3 + 7]) & 0x3FFF      # MF and the offset
    return Ip(tags, l3, l3 + ihl, raw[l3 + 9], raw[l3 + 12:l3 + 16], raw[l3 + 16:l3 + 20], frag != 0)


@dataclass
class Held:
    """A flow the test established on a backend that now takes no new flows."""
    mac: bytes
    why: str            # "drained" or "grace"
    # Grace: the CLOCK_MONOTONIC seconds between which it ends (the backend went
    # down during a controller write that took some time); None for a drained
    # backend, which holds its flows for as long as they live.
    until: tuple[float, float] | None
    loose: bool = False  # the flow may also have been placed afresh (after a RST, or without an entry)


@dataclass
class Model:
    """The configured state, as the test declared it (never read from the maps)."""
    gateway_macs: frozenset          # the interface's MAC and any MAC the pool names
    services: dict                   # (vip 4 bytes, port, proto) -> frozenset of live backend MACs
    held: dict = field(default_factory=dict)   # flow key (13 bytes) -> Held
    nat: dict = field(default_factory=dict)     # NAT services: (vip, port, proto) -> {backend MAC: (addr 4 bytes, port)}
    reverse: dict = field(default_factory=dict)  # (backend addr 4 bytes, port, proto) -> (vip 4 bytes, port)
    placed: dict = field(default_factory=dict)  # flow key -> MAC of the backend it was last forwarded to

    def __post_init__(self):
        self.vips = frozenset(vip for vip, _, _ in self.services)

    def reconfigure(self, services: dict, down: frozenset, until: tuple[float, float]) -> None:
        """The controller changed the state, and the backends `down` went down
        with their grace ending within `until`. They hold the flows seen sent to
        them, but loosely: the flood guard may have placed one without an entry."""
        self.services = services
        self.vips = frozenset(vip for vip, _, _ in services)
        for key, mac in self.placed.items():
            if mac in down and key not in self.held:
                self.held[key] = Held(mac, "grace", until, loose=True)


def ipv6_chain(raw: bytes, off: int, nexthdr: int) -> tuple[str, int, int, bool]:
    """Walk an IPv6 extension-header chain from `off`: (verdict, upper-layer
    protocol, its offset, fragment) with verdict "", "limit", "routing" or
    "malformed"; after a fragment header the walk stops."""
    n = len(raw)
    for count in range(IPV6_EXT_MAX + 1):
        if nexthdr not in IPV6_EXT + (44,):
            return "", nexthdr, off, False
        if count == IPV6_EXT_MAX:
            return "limit", nexthdr, off, False
        if nexthdr == 44:
            if off + 8 > n:
                return "malformed", nexthdr, off, False
            return "", raw[off], off + 8, True
        if off + 4 > n or (nexthdr == 0 and count > 0):
            return "malformed", nexthdr, off, False
        if nexthdr == 43 and raw[off + 3]:
            return "routing", nexthdr, off, False
        length = (raw[off + 1] + 1) * 8
        if off + length > n:
            return "malformed", nexthdr, off, False
        nexthdr, off = raw[off], off + length
    raise AssertionError("unreachable")


def ipv6(raw: bytes) -> Ip | None:
    """The frame's IPv6 header if its fixed 40 bytes are valid, with its chain judged."""
    found = _l3(raw)
    if found is None or found[1] != ETH_P_IPV6:
        return None
    tags, _, l3 = found
    if l3 + 40 > len(raw) or raw[l3] >> 4 != 6:
        return None
    chain, proto, l4, fragment = ipv6_chain(raw, l3 + 40, raw[l3 + 6])
    return Ip(tags, l3, l4, proto, raw[l3 + 8:l3 + 24], raw[l3 + 24:l3 + 40], fragment, 6, chain)


def any_ip(raw: bytes) -> Ip | None:
    return ipv4(raw) or ipv6(raw)


def flow_key(client: bytes, vip: bytes, cport: int, vport: int, proto: int) -> bytes:
    """Client-to-VIP 5-tuple as one hashable value."""
    return client + vip + cport.to_bytes(2, "big") + vport.to_bytes(2, "big") + bytes([proto])


def _word(raw: bytes, off: int) -> int:
    return (raw[off] << 8) | raw[off + 1]


def csum_kept(raw: bytes, out: bytes, csum: int, words: tuple) -> bool:
    """Whether the checksum at `csum` changed by exactly what the 16-bit words
    at `words` changed: ~C is the sum of every word it covers, so ~C less
    those words (the sum of the others) is the same, modulo 0xffff."""
    def invariant(buf):
        return (0xFFFF - _word(buf, csum) - sum(_word(buf, w) for w in words)) % 0xFFFF
    return invariant(raw) == invariant(out)


def translation_problem(raw: bytes, out: bytes, ip: Ip, addr_off: int, port_off: int, want: tuple) -> str | None:
    """NAT rules for an XDP_TX'd frame whose address at addr_off (IP header)
    and port at port_off (L4 header) must now be `want` (addr bytes, port)."""
    proto, alen = ip.proto, 4 if ip.family == 4 else 16
    l4_csum = ip.l4 + (16 if proto == TCP else 6)
    if len(out) != len(raw) or l4_csum + 2 > len(raw):
        return "NAT changed the frame's length or translated a cut-short header"
    header_csum = {ip.l3 + 10, ip.l3 + 11} if ip.family == 4 else set()   # IPv6 has none
    changed = {i for i in range(12, len(raw)) if raw[i] != out[i]}
    allowed = set(range(addr_off, addr_off + alen)) | {port_off, port_off + 1} | header_csum | {l4_csum, l4_csum + 1}
    if changed - allowed:
        return f"NAT changed bytes it must not (offsets {sorted(changed - allowed)[:6]})"
    if (out[addr_off:addr_off + alen], _word(out, port_off)) != want:
        return "NAT wrote another address or port than the backend's (or the service's)"
    addr_words = tuple(range(addr_off, addr_off + alen, 2))
    if ip.family == 4 and not csum_kept(raw, out, ip.l3 + 10, addr_words):
        return "NAT left the IPv4 header checksum wrong by a different amount than before"
    if proto == UDP and _word(raw, l4_csum) == 0:
        if ip.family == 6:
            return "NAT translated an IPv6 UDP datagram with checksum 0 (RFC 8200: invalid, a receiver discards it)"
        return None if _word(out, l4_csum) == 0 else "NAT wrote a checksum into a UDP datagram that had none"
    if not csum_kept(raw, out, l4_csum, addr_words + (port_off,)):
        return f"NAT left the {'TCP' if proto == TCP else 'UDP'} checksum wrong by a different amount than before"
    if proto == UDP and _word(out, l4_csum) == 0:
        return "NAT sent a computed UDP checksum of 0 (it goes as 0xffff)"
    return None


def addr_offsets(ip: Ip) -> tuple[int, int]:
    """(source, destination) address offsets of the frame's IP header."""
    return (ip.l3 + 12, ip.l3 + 16) if ip.family == 4 else (ip.l3 + 8, ip.l3 + 24)


ICMP_ERRORS = (3, 4, 11, 12)   # destination unreachable, source quench, time exceeded, parameter problem
ICMPV6_ERRORS = (1, 2, 3, 4)   # destination unreachable, packet too big, time exceeded, parameter problem


def l4_whole(raw: bytes, ip: Ip) -> bool:
    """Whether the TCP/UDP header is whole, as the program's parser takes it
    (fixed part present, TCP data offset >= 5, UDP length >= 8)."""
    if ip.l4 + (20 if ip.proto == TCP else 8) > len(raw):
        return False
    if ip.proto == TCP:
        return raw[ip.l4 + 12] >> 4 >= 5
    return _word(raw, ip.l4 + 4) >= 8


class Oracle:
    """Judges one (frame, verdict) at a time; keeps counts of what it saw."""

    def __init__(self, model: Model):
        self.model = model
        self.seen = Counter()

    def judge(self, raw: bytes, action: int, out: bytes, ran: tuple[float, float] | None = None) -> str | None:
        """The rule the verdict breaks, or None. Counts the case in self.seen.
        `ran`: CLOCK_MONOTONIC seconds before and after the program ran (now, if not given)."""
        m = self.model
        self._ran = ran or (time.monotonic(),) * 2
        if action not in (PASS, DROP, TX, REDIRECT):
            return f"action {ACTION_NAMES.get(action, action)}"
        if action == PASS:
            if out != raw:
                return "XDP_PASS changed the frame"
            if raw[0:6] in m.gateway_macs:
                ip = any_ip(raw)
                if (ip is not None and ip.family == 4 and ip.tags <= 1 and ip.fragment and ip.proto in (TCP, UDP)
                        and ip.daddr in m.vips):
                    return "XDP_PASS of a TCP/UDP fragment to a VIP (point 7: they stay dropped)"
                if (ip is not None and ip.family == 6 and ip.tags <= 1 and ip.fragment and not ip.chain
                        and ip.proto != ICMPV6 and ip.daddr in m.vips):
                    return "XDP_PASS of an IPv6 fragment to a VIP that is not ICMPv6 (issue 15: dropped)"
            self.seen["pass"] += 1
            ip = ipv6(raw)
            if ip is not None and raw[0:6] in m.gateway_macs and ip.daddr in m.vips:
                self.seen[f"pass ipv6 {ip.chain}" if ip.chain else "pass ipv6"] += 1
            return None

        if raw[0:6] not in m.gateway_macs:
            return f"{ACTION_NAMES[action]} of a frame not addressed to the gateway (point 5: it must pass untouched)"
        ip = any_ip(raw)
        target = self._nat_reply_target(raw, ip)
        if target is not None:
            return self._nat_reply(raw, out, ip, action, target)
        if action == REDIRECT:
            return "XDP_REDIRECT of a frame that is not a NAT reply"
        if action == DROP and self._nat_untranslatable(raw, ip) and ip.daddr not in m.vips:
            self.seen["drop unwalked chain6 from a nat backend" if ip.chain else
                      "drop untranslatable from a nat backend"] += 1
            return None
        if ip is None or ip.daddr not in m.vips:
            return f"{ACTION_NAMES[action]} of a frame that is not well-formed IPv4 or IPv6 to a VIP"
        if ip.family == 6:
            problem = self._ipv6_not_tx(ip, action, raw)
            if problem is not None or action == DROP:
                return problem
        elif ip.fragment:
            if action == TX:
                return "XDP_TX of an IPv4 fragment"
            if ip.proto not in (TCP, UDP) and ip.tags <= 1:
                return "XDP_DROP of a non-TCP/UDP fragment to a VIP (point 7: it goes to the gateway's stack)"
            self.seen["drop fragment"] += 1
            return None
        if action == DROP:
            if ip.proto == ICMP and ip.tags <= 1 and not self._too_big(raw, ip):
                return "XDP_DROP of ICMP to a VIP that is not 'fragmentation needed' (point 4: it goes to the stack)"
            self.seen["drop"] += 1
            return None

        # XDP_TX from here on.
        if out[6:12] not in m.gateway_macs:
            return "XDP_TX with a source MAC that is not the gateway's"
        dst = out[0:6]
        nat = self._nat_service(raw, ip)
        if nat is not None:
            if dst not in nat:
                return "XDP_TX of a NAT service's packet to a MAC that is no backend of it"
            problem = translation_problem(raw, out, ip, addr_offsets(ip)[1], ip.l4 + 2, nat[dst])
            if problem:
                return problem
            self.seen["tx nat request" if ip.family == 4 else "tx nat6 request"] += 1
            return self._tx_l4(raw, ip, dst)
        if len(out) != len(raw) or out[12:] != raw[12:]:
            return "XDP_TX changed more than the MAC addresses"
        if ip.proto in (TCP, UDP):
            problem = self._tx_l4(raw, ip, dst)
            if problem is None and ip.family == 6:
                self.seen["tx ipv6"] += 1
            return problem
        if ip.proto == ICMP and ip.family == 4:
            return self._tx_icmp(raw, ip, dst)
        if ip.proto == ICMPV6 and ip.family == 6:
            return self._tx_icmp6(raw, ip, dst)
        return f"XDP_TX of IP protocol {ip.proto}"

    def _ipv6_not_tx(self, ip: Ip, action: int, raw: bytes) -> str | None:
        """The IPv6 rules for a DROP or TX to a VIP, short of where a TX goes."""
        if ip.chain:
            return f"{ACTION_NAMES[action]} of IPv6 whose chain is {ip.chain} (it goes to the stack)"
        if ip.fragment:
            if action == TX:
                return "XDP_TX of an IPv6 fragment"
            if ip.proto == ICMPV6 and ip.tags <= 1:
                return "XDP_DROP of an ICMPv6 fragment to a VIP (issue 15: it goes to the stack)"
            self.seen["drop fragment6"] += 1
            return None
        if action == DROP:
            if ip.proto == ICMPV6 and ip.tags <= 1 and not self._too_big6(raw, ip):
                return "XDP_DROP of ICMPv6 to a VIP that is not Packet Too Big (it goes to the stack)"
            self.seen["drop6"] += 1
        return None

    def _too_big6(self, raw: bytes, ip: Ip) -> bool:
        return ip.l4 + 1 <= len(raw) and raw[ip.l4] == 2

    def _tx_icmp6(self, raw: bytes, ip: Ip, dst: bytes) -> str | None:
        """ICMPv6 Packet Too Big: the quoted packet went from a VIP's service to a client."""
        if not self._too_big6(raw, ip):
            return "XDP_TX of ICMPv6 other than Packet Too Big"
        inner = ip.l4 + 8
        if inner + 40 > len(raw) or raw[inner] >> 4 != 6:
            return "XDP_TX of a Packet Too Big quoting no whole IPv6 header"
        chain, proto, l4, fragment = ipv6_chain(raw, inner + 40, raw[inner + 6])
        if chain or proto not in (TCP, UDP) or l4 + 4 > len(raw):
            return "XDP_TX of a Packet Too Big quoting no TCP/UDP ports after a chain the path takes"
        vip, client = raw[inner + 8:inner + 24], raw[inner + 24:inner + 40]
        vport = (raw[l4] << 8) | raw[l4 + 1]
        cport = (raw[l4 + 2] << 8) | raw[l4 + 3]
        live = self.model.services.get((vip, vport, proto))
        if live is None:
            return "XDP_TX of a Packet Too Big quoting no configured service"
        return self._follow(self.model.held.get(flow_key(client, vip, cport, vport, proto)), live, dst, " of ICMPv6")

    def _tx_l4(self, raw: bytes, ip: Ip, dst: bytes) -> str | None:
        m = self.model
        fixed = 20 if ip.proto == TCP else 8
        if ip.l4 + fixed > len(raw):
            return "XDP_TX of a TCP/UDP packet whose header is cut short"
        sport = (raw[ip.l4] << 8) | raw[ip.l4 + 1]
        dport = (raw[ip.l4 + 2] << 8) | raw[ip.l4 + 3]
        live = m.services.get((ip.daddr, dport, ip.proto))
        if live is None:
            return "XDP_TX for a (VIP, port, protocol) that is not configured"
        key = flow_key(ip.saddr, ip.daddr, sport, dport, ip.proto)
        flags = raw[ip.l4 + 13] if ip.proto == TCP else 0
        held = m.held.get(key)
        if flags & (SYN | ACK) == SYN:
            # Point 6: a new connection is placed by Maglev and replaces the
            # tuple's entry, so the flow is no longer held (a RST writes no
            # entry: then the old one may stay). A SYN sent anywhere else is
            # reported, and the flow kept, so one fault is reported once.
            if dst in live:
                if not flags & RST:
                    m.held.pop(key, None)
                    m.placed[key] = dst
                self.seen["tx new connection"] += 1
                return None
            if flags & RST and held is not None and dst == held.mac:
                self.seen["tx held (RST)"] += 1
                return None
            return "XDP_TX of a new TCP connection (SYN without ACK) to a backend that is not live"
        if flags & RST and held is not None:
            held.loose = True      # the specification leaves open whether a RST ends the entry
        problem = self._follow(held, live, dst, "")
        if problem is None and not flags & RST:
            m.placed[key] = dst
            if held is not None and dst != held.mac:
                del m.held[key]    # placed afresh (its grace over, or it had no entry): an ordinary flow now
        return problem

    def _nat_service(self, raw: bytes, ip: Ip) -> dict | None:
        """{backend MAC: target} of the NAT service the TCP/UDP packet is for, or None."""
        if ip.proto not in (TCP, UDP) or ip.fragment or ip.l4 + 4 > len(raw):
            return None
        return self.model.nat.get((ip.daddr, _word(raw, ip.l4 + 2), ip.proto))

    def _nat_reply_target(self, raw: bytes, ip: Ip | None) -> tuple | None:
        """(VIP, port) a NAT backend's reply is translated to, or None when the
        frame is not one (at most one tag, whole TCP/UDP header, no fragment)."""
        if ip is None or ip.tags > 1 or ip.fragment or ip.chain or ip.proto not in (TCP, UDP):
            return None
        if not l4_whole(raw, ip):
            return None
        return self.model.reverse.get((ip.saddr, _word(raw, ip.l4), ip.proto))

    def _nat_untranslatable(self, raw: bytes, ip: Ip | None) -> bool:
        """Whether the frame comes from a NAT backend's address and cannot be
        translated: a TCP/UDP fragment or cut-short header, an ICMP error, or
        (IPv6) of any protocol behind a chain not walked to its end, over the
        limit or a routing header with Segments Left > 0 (its dropping is
        allowed; to the gateway itself the namespace decides)."""
        if ip is None or ip.tags > 1 or ip.saddr not in {key[0] for key in self.model.reverse}:
            return False
        if ip.chain:
            return ip.chain in ("limit", "routing")
        if ip.proto in (TCP, UDP):
            return ip.fragment or not l4_whole(raw, ip)
        icmp, errors = (ICMP, ICMP_ERRORS) if ip.family == 4 else (ICMPV6, ICMPV6_ERRORS)
        return ip.proto == icmp and not ip.fragment and ip.l4 < len(raw) and raw[ip.l4] in errors

    def _nat_reply(self, raw: bytes, out: bytes, ip: Ip, action: int, target: tuple) -> str | None:
        if action == DROP:
            self.seen["drop nat reply"] += 1
            return None
        problem = translation_problem(raw, out, ip, addr_offsets(ip)[0], ip.l4, target)
        if problem:
            return problem.replace("NAT", "NAT reply")
        self.seen["nat reply sent" if ip.family == 4 else "nat6 reply sent"] += 1
        return None

    def _follow(self, held: Held | None, live: frozenset, dst: bytes, what: str) -> str | None:
        """An established flow's packet: to the backend holding it, else to a
        live one. Near the end of a grace, where the program may have read the
        clock on either side of it, both are allowed."""
        within = expired = False
        if held is not None:
            within = held.until is None or self._ran[1] < held.until[0]
            expired = held.until is not None and self._ran[0] >= held.until[1]
        if held is not None and dst == held.mac:
            if expired:
                return f"XDP_TX{what} to a down backend after its grace period"
            self.seen[f"tx{what} held ({held.why})"] += 1
            return None
        if dst in live:
            if held is None or held.loose or not within:
                self.seen[f"tx{what} re-chosen after the grace" if expired else f"tx{what}"] += 1
                return None
            return (f"XDP_TX{what} of a flow held by a {held.why} backend to another backend "
                    f"(point 6: drained and down backends keep their established flows)")
        return f"XDP_TX{what} to a MAC that is not a live backend of the service, nor one holding this flow"

    def _too_big(self, raw: bytes, ip: Ip) -> bool:
        return ip.l4 + 2 <= len(raw) and raw[ip.l4] == 3 and raw[ip.l4 + 1] == 4

    def _tx_icmp(self, raw: bytes, ip: Ip, dst: bytes) -> str | None:
        """Point 4: the quoted packet went from a VIP's service to a client."""
        if not self._too_big(raw, ip):
            return "XDP_TX of ICMP other than 'fragmentation needed'"
        inner = ip.l4 + 8
        if inner + 20 > len(raw):
            return "XDP_TX of ICMP 'fragmentation needed' quoting no whole IPv4 header"
        ihl = (raw[inner] & 0x0F) * 4
        if raw[inner] >> 4 != 4 or ihl < 20 or inner + ihl + 4 > len(raw):
            return "XDP_TX of ICMP 'fragmentation needed' quoting no IPv4 header and ports"
        proto = raw[inner + 9]
        vip, client = raw[inner + 12:inner + 16], raw[inner + 16:inner + 20]
        vport = (raw[inner + ihl] << 8) | raw[inner + ihl + 1]
        cport = (raw[inner + ihl + 2] << 8) | raw[inner + ihl + 3]
        live = self.model.services.get((vip, vport, proto))
        if live is None:
            return "XDP_TX of ICMP 'fragmentation needed' quoting no configured service"
        return self._follow(self.model.held.get(flow_key(client, vip, cport, vport, proto)), live, dst, " of ICMP")
