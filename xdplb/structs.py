"""ctypes mirrors of bpf/lb_structs.h and the constants of bpf/lb_consts.h.

Keep in sync with the C header: tests/unit/test_struct_layout.py compiles the
header with gcc and compares every offset and size with these classes, and
the kernel layer checks each class against bcc's own view of the map types
at load time. Each field notes its byte order, as in the header. Padding is
explicit and always zero.
"""
from __future__ import annotations

import ctypes
import hashlib
import ipaddress
import socket

# struct service_info.flags and struct service_ref.state (bits 0-6)
F_SVC_CLIENT_PERSIST = 1 << 0
F_SVC_NAT = 1 << 1          # forwarding "nat" (bpf/nat.h)
# struct service_ref.state, bit 2: an IPv6 service (bpf/lb_structs6.h)
F_SVC_IPV6 = 1 << 2
# struct service_ref.state, bit 7: the live Maglev half
SVC_STATE_HALF = 1 << 7
# struct lb_config.flags
F_CFG_NO_BACKEND_DROP = 1 << 0
# struct backend_info.flags
F_BACKEND_UP = 1 << 0
F_BACKEND_READY = 1 << 1   # publishes the entry's other fields (bpf/lb_maps.h)

TABLES_PER_SERVICE = 2
# Unicast MACs besides the interface's whose frames are balanced (lb_config.extra_macs).
EXTRA_MACS = 4
# Words of the service_ports bitmap (PORT_WORDS): one bit per destination port.
PORT_WORDS = 65536 // 32
# Entries of the layout map (LAYOUT_ENTRIES): one per map it describes.
LAYOUT_ENTRIES = 64

# Indices of the not_forwarded counters (REASON_* in lb_consts.h).
REASONS = ("not_service", "malformed", "fragment", "no_backend", "backend_gone", "no_config", "other_mac")
# Indices of the events counters (EVENT_*).
EVENTS = ("ip_options", "vlan", "flow_hit", "flow_new", "flow_reselect", "icmp_too_big", "flow_miss",
          "flood_no_entry", "down_grace", "udp_expired")
# Indices of the nat_stats counters (NAT_STAT_*).
NAT_STATS = ("request", "reply_tx", "reply_redirect", "no_route", "no_neigh", "icmp", "untranslatable",
             "no_target", "stack", "fragment", "truncated")
# Indices of the events6 counters (EVENT6_* in lb_structs6.h); exported with the events.
EVENTS6 = ("ipv6_ext_headers", "ipv6_ext_limit", "ipv6_routing")
# Indices of the tail_misses counters: the slots of the tail_calls program array (PROG_* in
# lb_consts.h), each named by the reason its failed tail calls are exported as, with the
# not_forwarded reasons (the frame passed to the stack).
TAIL_MISSES = ("no_ipv6_program",)
PROG_IPV6 = 0
# XDP actions, by value.
ACTIONS = ("aborted", "drop", "pass", "tx", "redirect")
XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)

IPPROTO = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}


class LbAddr(ctypes.Structure):
    """struct lb_addr: 16 bytes, network order; IPv4 in bytes 0-3, the rest zero, or IPv6.
    Which of the two is known from the map (vips or vips6) or the service's family."""

    _fields_ = [("raw", ctypes.c_uint8 * 16)]  # C: union { __be32 v4; __be32 v6[4]; }
    C_NAMES = {"raw": "v6"}

    @classmethod
    def of(cls, address) -> "LbAddr":
        packed = ipaddress.ip_address(address).packed
        return cls((ctypes.c_uint8 * 16)(*packed.ljust(16, b"\0")))

    def ip(self, version: int = 4) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        if version == 6:
            return ipaddress.IPv6Address(bytes(self.raw))
        return ipaddress.IPv4Address(bytes(self.raw[:4]))


class ServiceKey(ctypes.Structure):
    """struct service_key: the services map key."""

    _fields_ = [
        ("vip", ctypes.c_uint8 * 4),  # network order (C: __be32)
        ("port", ctypes.c_uint16),   # network order (store with socket.htons)
        ("proto", ctypes.c_uint8),   # IPPROTO_TCP / IPPROTO_UDP
        ("pad", ctypes.c_uint8),     # zero
    ]

    @classmethod
    def of(cls, vip, port: int, protocol: str) -> "ServiceKey":
        return cls((ctypes.c_uint8 * 4)(*ipaddress.IPv4Address(vip).packed), socket.htons(port), IPPROTO[protocol], 0)

    def ip(self) -> ipaddress.IPv4Address:
        return ipaddress.IPv4Address(bytes(self.vip))


class ServiceRef(ctypes.Structure):
    """struct service_ref: the service_ids map value (proto 0: the id is free or being bound)."""

    _fields_ = [
        ("vip", ctypes.c_uint8 * 4),  # network order (C: __be32)
        ("port", ctypes.c_uint16),   # network order (store with socket.htons)
        ("proto", ctypes.c_uint8),   # IPPROTO_TCP / IPPROTO_UDP; 0 while unbound
        ("state", ctypes.c_uint8),   # F_SVC_* | SVC_STATE_HALF if half 1 is live
    ]

    @classmethod
    def of(cls, key: ServiceKey, flags: int, half: int) -> "ServiceRef":
        return cls(key.vip, key.port, key.proto, flags | (SVC_STATE_HALF if half else 0))

    def key(self) -> ServiceKey:
        return ServiceKey(self.vip, self.port, self.proto, 0)


class ServiceInfo(ctypes.Structure):
    _fields_ = [
        ("id", ctypes.c_uint32),     # host order
        ("flags", ctypes.c_uint32),  # host order, F_SVC_*
        ("table", ctypes.c_uint32),  # host order, live half: 0 or 1
        ("pad", ctypes.c_uint32),    # zero
    ]


class BackendInfo(ctypes.Structure):
    _fields_ = [
        ("addr", LbAddr),                 # network order
        ("mac", ctypes.c_uint8 * 6),      # wire order
        ("flags", ctypes.c_uint8),        # F_BACKEND_*
        ("pad", ctypes.c_uint8),          # zero
        ("service_id", ctypes.c_uint32),  # host order
        ("pad2", ctypes.c_uint32),        # zero
        ("down_since", ctypes.c_uint64),  # host order: CLOCK_MONOTONIC ns it went down; 0 while up
    ]


class FlowKey(ctypes.Structure):
    _fields_ = [
        ("src", ctypes.c_uint8 * 4),   # network order (C: __be32)
        ("dst", ctypes.c_uint8 * 4),   # network order (C: __be32)
        ("sport", ctypes.c_uint16),    # network order
        ("dport", ctypes.c_uint16),    # network order
        ("proto", ctypes.c_uint8),     # IPPROTO_*
        ("pad", ctypes.c_uint8 * 3),   # zero
    ]


class FlowValue(ctypes.Structure):
    _fields_ = [
        ("backend_id", ctypes.c_uint32),  # host order
        ("service_id", ctypes.c_uint32),  # host order
        ("atime", ctypes.c_uint64),       # host order: CLOCK_MONOTONIC ns of the last packet (UDP only)
    ]


class LbCounters(ctypes.Structure):
    _fields_ = [
        ("packets", ctypes.c_uint64),    # host order
        ("bytes", ctypes.c_uint64),      # host order, Ethernet frame length
        ("new_flows", ctypes.c_uint64),  # host order
    ]


class LbConfig(ctypes.Structure):
    _fields_ = [
        ("mac", ctypes.c_uint8 * 6),      # wire order
        ("ready", ctypes.c_uint8),        # 1 once written
        ("flags", ctypes.c_uint8),        # F_CFG_*
        ("hash_seed", ctypes.c_uint32),   # host order
        ("flood_rate", ctypes.c_uint32),  # host order: new flow entries per second per CPU; 0 = no guard
        ("udp_idle_ns", ctypes.c_uint64),    # host order; 0 = UDP entries never expire
        ("down_grace_ns", ctypes.c_uint64),  # host order; 0 = flows on a down backend are re-chosen at once
        ("extra_macs", ctypes.c_uint8 * (6 * EXTRA_MACS)),  # wire order, 6 bytes each; extra_mac_count used
        ("extra_mac_count", ctypes.c_uint8),
        ("pad2", ctypes.c_uint8 * 7),     # zero
    ]


def maglev_table_type(size: int) -> type[ctypes.Structure]:
    """struct maglev_table for a given MAGLEV_SIZE (a compile-time size in C)."""
    return type(f"MaglevTable{size}", (ctypes.Structure,), {"_fields_": [("slots", ctypes.c_uint32 * size)]})


def mac_bytes(mac: str) -> bytes:
    """'02:00:0a:0a:00:0b' -> 6 bytes; ValueError on anything else."""
    parts = mac.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"not a MAC address: {mac!r}")
    return bytes(int(p, 16) for p in parts)


def mac_str(raw) -> str:
    return ":".join(f"{b:02x}" for b in bytes(raw))


class LayoutKey(ctypes.Structure):
    """struct layout_key: the layout map's key, a map's name."""

    _fields_ = [("name", ctypes.c_char * 16)]  # NUL-padded, as the kernel's map names (BPF_OBJ_NAME_LEN)

    @classmethod
    def of(cls, name: str) -> "LayoutKey":
        raw = name.encode()
        if len(raw) > 15:
            raise ValueError(f"map name {name!r} is longer than 15 bytes")
        return cls(raw)


def layout_text(ctype) -> str:
    """The memory layout of a ctypes type as text: every field's name,
    offset and size, nested structs and arrays spelled out, scalars by their
    ctypes code and size. Equal text, equal layout."""
    if isinstance(ctype, type) and issubclass(ctype, (ctypes.Structure, ctypes.Union)):
        kind = "union" if issubclass(ctype, ctypes.Union) else "struct"
        fields = ",".join(f"{name}@{getattr(ctype, name).offset}:{layout_text(ftype)}"
                          for name, ftype, *_ in ctype._fields_)
        return f"{kind}{ctypes.sizeof(ctype)}{{{fields}}}"
    if isinstance(ctype, type) and issubclass(ctype, ctypes.Array):
        return f"{layout_text(ctype._type_)}[{ctype._length_}]"
    # ctypes' own codes differ by platform for one C type (c_uint64 is 'L' or 'Q'): spell kind and bits.
    code = ctype._type_
    kind = "u" if code in "BHILQ" else "s" if code in "bhilq" else code
    return f"{kind}{8 * ctypes.sizeof(ctype)}"


def layout_digest(key, value) -> int:
    """64-bit digest of a map's key and value layout (the layout map's value)."""
    text = f"key={layout_text(key)};value={layout_text(value)}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


class FloodState(ctypes.Structure):
    """flood_state value (per CPU, key 0): the flood guard's rate window. Only
    the program writes it; the controller names it for the pinned-map checks."""

    _fields_ = [
        ("window_start", ctypes.c_uint64),  # host order: bpf_ktime_get_ns when the current second began
        ("new_flows", ctypes.c_uint64),     # host order: new flow entries this CPU asked for in that second
    ]


class NatBackend(ctypes.Structure):
    """struct nat_backend: nat_backends value, where a NAT service's backend listens."""

    _fields_ = [
        ("addr", ctypes.c_uint8 * 4),  # network order (C: __be32)
        ("port", ctypes.c_uint16),    # network order (store with socket.htons)
        ("ready", ctypes.c_uint8),    # 1 publishes addr and port (bpf/lb_maps.h rule 1)
        ("pad", ctypes.c_uint8),      # zero
    ]

    @classmethod
    def of(cls, address, port: int) -> "NatBackend":
        return cls((ctypes.c_uint8 * 4)(*ipaddress.IPv4Address(address).packed), socket.htons(port), 1, 0)


class NatRevKey(ctypes.Structure):
    """struct nat_rev_key: nat_reverse key, the source of a NAT backend's replies."""

    _fields_ = [
        ("addr", ctypes.c_uint8 * 4),  # network order (C: __be32)
        ("port", ctypes.c_uint16),    # network order
        ("proto", ctypes.c_uint8),    # IPPROTO_TCP / IPPROTO_UDP
        ("pad", ctypes.c_uint8),      # zero
    ]

    @classmethod
    def of(cls, address, port: int, protocol: str) -> "NatRevKey":
        return cls((ctypes.c_uint8 * 4)(*ipaddress.IPv4Address(address).packed), socket.htons(port),
                   IPPROTO[protocol], 0)


class NatRevValue(ctypes.Structure):
    """struct nat_rev_value: what a NAT reply's source becomes."""

    _fields_ = [
        ("vip", ctypes.c_uint8 * 4),  # network order (C: __be32)
        ("vport", ctypes.c_uint16),  # network order
        ("bport", ctypes.c_uint16),  # network order: the key's port again, checked by the program
    ]

    @classmethod
    def of(cls, vip, vport: int, bport: int) -> "NatRevValue":
        return cls((ctypes.c_uint8 * 4)(*ipaddress.IPv4Address(vip).packed), socket.htons(vport),
                   socket.htons(bport))


# ---- IPv6 (bpf/lb_structs6.h): their own maps, so the IPv4 keys keep their sizes ----


class ServiceKey6(ctypes.Structure):
    """struct service_key6: the services6 map key."""

    _fields_ = [
        ("vip", ctypes.c_uint8 * 16),  # network order (C: __be32[4])
        ("port", ctypes.c_uint16),     # network order (store with socket.htons)
        ("proto", ctypes.c_uint8),     # IPPROTO_TCP / IPPROTO_UDP
        ("pad", ctypes.c_uint8),       # zero
    ]

    @classmethod
    def of(cls, vip, port: int, protocol: str) -> "ServiceKey6":
        return cls((ctypes.c_uint8 * 16)(*ipaddress.IPv6Address(vip).packed), socket.htons(port),
                   IPPROTO[protocol], 0)

    def ip(self) -> ipaddress.IPv6Address:
        return ipaddress.IPv6Address(bytes(self.vip))


class ServiceRef6(ctypes.Structure):
    """struct service_ref6: service_ids6[id * 2 + half], written with that half's Maglev table."""

    _fields_ = [
        ("vip", ctypes.c_uint8 * 16),     # network order (C: __be32[4])
        ("client_prefix", ctypes.c_uint8),  # 1..128: client address bits hashed under client persistence
        ("pad", ctypes.c_uint8 * 3),      # zero
    ]

    @classmethod
    def of(cls, vip, client_prefix: int) -> "ServiceRef6":
        return cls((ctypes.c_uint8 * 16)(*ipaddress.IPv6Address(vip).packed), client_prefix)


class FlowKey6(ctypes.Structure):
    _fields_ = [
        ("src", ctypes.c_uint8 * 16),  # network order (C: __be32[4])
        ("dst", ctypes.c_uint8 * 16),  # network order (C: __be32[4])
        ("sport", ctypes.c_uint16),    # network order
        ("dport", ctypes.c_uint16),    # network order
        ("proto", ctypes.c_uint8),     # IPPROTO_*
        ("pad", ctypes.c_uint8 * 3),   # zero
    ]


class NatBackend6(ctypes.Structure):
    """struct nat_backend6: nat_backends6 value, where an IPv6 NAT service's backend listens."""

    _fields_ = [
        ("addr", ctypes.c_uint8 * 16),  # network order (C: __be32[4])
        ("port", ctypes.c_uint16),      # network order (store with socket.htons)
        ("ready", ctypes.c_uint8),      # 1 publishes addr and port (bpf/lb_maps.h rule 1)
        ("pad", ctypes.c_uint8),        # zero
    ]

    @classmethod
    def of(cls, address, port: int) -> "NatBackend6":
        return cls((ctypes.c_uint8 * 16)(*ipaddress.IPv6Address(address).packed), socket.htons(port), 1, 0)


class NatRevKey6(ctypes.Structure):
    """struct nat_rev_key6: nat_reverse6 key, the source of an IPv6 NAT backend's replies."""

    _fields_ = [
        ("addr", ctypes.c_uint8 * 16),  # network order (C: __be32[4])
        ("port", ctypes.c_uint16),      # network order
        ("proto", ctypes.c_uint8),      # IPPROTO_TCP / IPPROTO_UDP
        ("pad", ctypes.c_uint8),        # zero
    ]

    @classmethod
    def of(cls, address, port: int, protocol: str) -> "NatRevKey6":
        return cls((ctypes.c_uint8 * 16)(*ipaddress.IPv6Address(address).packed), socket.htons(port),
                   IPPROTO[protocol], 0)


class NatRevValue6(ctypes.Structure):
    """struct nat_rev_value6: what an IPv6 NAT reply's source becomes."""

    _fields_ = [
        ("vip", ctypes.c_uint8 * 16),  # network order (C: __be32[4])
        ("vport", ctypes.c_uint16),    # network order
        ("bport", ctypes.c_uint16),    # network order: the key's port again, checked by the program
    ]

    @classmethod
    def of(cls, vip, vport: int, bport: int) -> "NatRevValue6":
        return cls((ctypes.c_uint8 * 16)(*ipaddress.IPv6Address(vip).packed), socket.htons(vport),
                   socket.htons(bport))


# The NAT structs of each address family (IP version -> (nat_backend, nat_rev_key, nat_rev_value)).
NAT_STRUCTS = {4: (NatBackend, NatRevKey, NatRevValue), 6: (NatBackend6, NatRevKey6, NatRevValue6)}


def service_ref(vip, port: int, protocol: str, flags: int, half: int) -> "ServiceRef":
    """The service_ids entry of a service of either family (an IPv6 one has
    vip 0 and F_SVC_IPV6; its address is in service_ids6)."""
    if ipaddress.ip_address(vip).version == 6:
        return ServiceRef((ctypes.c_uint8 * 4)(), socket.htons(port), IPPROTO[protocol],
                          flags | F_SVC_IPV6 | (SVC_STATE_HALF if half else 0))
    return ServiceRef.of(ServiceKey.of(vip, port, protocol), flags, half)


# Every shared struct, by its C name: the layout test walks this.
SHARED_STRUCTS = {
    "lb_addr": LbAddr,
    "service_key": ServiceKey,
    "service_ref": ServiceRef,
    "service_info": ServiceInfo,
    "backend_info": BackendInfo,
    "flow_key": FlowKey,
    "flow_value": FlowValue,
    "lb_counters": LbCounters,
    "lb_config": LbConfig,
    "layout_key": LayoutKey,
    "flood_state": FloodState,
    "nat_backend": NatBackend,
    "nat_rev_key": NatRevKey,
    "nat_rev_value": NatRevValue,
    "service_key6": ServiceKey6,
    "service_ref6": ServiceRef6,
    "flow_key6": FlowKey6,
    "nat_backend6": NatBackend6,
    "nat_rev_key6": NatRevKey6,
    "nat_rev_value6": NatRevValue6,
}
