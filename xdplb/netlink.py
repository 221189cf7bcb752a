"""Netlink side effects, through pyroute2: links, VIP addresses, VIP routes, neighbours.

Part of the thin kernel layer. Nothing else in xdplb imports pyroute2.
VIP addresses xdplb adds carry IFA_PROTO = ADDR_PROTO, so `xdplb detach`
can find and remove exactly its own addresses even after a crash, and never
an address an operator configured by hand. The routes that announce a VIP
(xdplb/announce.py) carry the same number as their protocol (RTPROT 120):
BIRD 2 learns them (not its own 12, not the kernel's 2) and xdplb deletes
only routes with that tag.

Both families go through the same calls; the address says which. An IPv6
VIP is added as /128 with IFA_F_NODAD, so it answers Neighbour Discovery at
once instead of after a second of duplicate detection (the backends hold the
same address on `lo`, where no solicitation ever reaches it), and with a
preferred lifetime of 0 (deprecated), so the gateway never picks the VIP as
the source of its own traffic (RFC 6724 rule 3) while another address is on
the link: a Neighbour Solicitation from the VIP would be answered to the VIP,
which every backend holds locally, and the gateway would never learn their
MACs. Incoming traffic to a deprecated address is accepted as usual.
"""
from __future__ import annotations

import errno
import ipaddress
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink import NLM_F_REQUEST, genlmsg
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic import GenericNetlinkSocket
from pyroute2.netlink.generic.ethtool import ethtoolbitset, ethtoolheader

from .modes import forwarding_path

ADDR_PROTO = 0x78  # IFA_PROTO tag on VIP addresses added by xdplb ("x")
ROUTE_PROTO = 0x78  # rtm_protocol of the VIP routes xdplb announces (free in /etc/iproute2/rt_protos)

# IFLA_XDP_ATTACHED, as a number or as pyroute2's name for it.
XDP_ATTACHED = {0: None, 1: "native", 2: "generic", 3: "offload", 4: "multi",
                "none": None, "xdp": "native", "xdpdrv": "native", "xdpgeneric": "generic",
                "xdpoffload": "offload", "xdpmulti": "multi"}

IFA_F_NODAD = 0x02          # include/uapi/linux/if_addr.h
INFINITY_LIFE_TIME = 0xFFFFFFFF

# Neighbour states whose link-layer address can be used (include/uapi/linux/neighbour.h).
_NUD_USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80  # REACHABLE STALE DELAY PROBE NOARP PERMANENT


class NetlinkProblem(RuntimeError):
    pass


def _family(address) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


def _host_prefix(address) -> int:
    return ipaddress.ip_address(address).max_prefixlen


def _mac(lladdr: str) -> bytes:
    return bytes.fromhex(lladdr.replace(":", ""))


ETHTOOL_MSG_FEATURES_GET = 11  # include/uapi/linux/ethtool_netlink.h


class _ethtool_features_msg(genlmsg):
    """ETHTOOL_MSG_FEATURES_GET and its reply (pyroute2 0.9 has no features message)."""

    nla_map = (
        ("ETHTOOL_A_FEATURES_UNSPEC", "none"),
        ("ETHTOOL_A_FEATURES_HEADER", "ethtoolheader"),
        ("ETHTOOL_A_FEATURES_HW", "ethtoolbitset"),
        ("ETHTOOL_A_FEATURES_WANTED", "ethtoolbitset"),
        ("ETHTOOL_A_FEATURES_ACTIVE", "ethtoolbitset"),
        ("ETHTOOL_A_FEATURES_NOCHANGE", "ethtoolbitset"),
    )
    ethtoolheader = ethtoolheader
    ethtoolbitset = ethtoolbitset


def _set_bit_names(bitset) -> frozenset[str]:
    """Names of the set bits of a verbose ethtool bitset: a NOMASK bitset
    lists only set bits, otherwise each bit carries a VALUE flag."""
    if bitset is None:
        return frozenset()
    nomask = bool(bitset.get_attr("ETHTOOL_A_BITSET_NOMASK"))
    bits = bitset.get_attr("ETHTOOL_A_BITSET_BITS")
    listed = bits.get_attrs("ETHTOOL_A_BITSET_BITS_BIT") if bits is not None else []
    return frozenset(b.get_attr("ETHTOOL_A_BITSET_BIT_NAME") for b in listed
                     if nomask or b.get_attr("ETHTOOL_A_BITSET_BIT_VALUE"))


def _read_flag(path: str) -> bool:
    with open(path) as f:
        return f.read().strip() != "0"


def _active_features(ifname: str) -> frozenset[str]:
    sock = GenericNetlinkSocket()
    try:
        sock.bind("ethtool", _ethtool_features_msg)
        msg = _ethtool_features_msg()
        msg["cmd"] = ETHTOOL_MSG_FEATURES_GET
        msg["version"] = 1
        msg["attrs"].append(("ETHTOOL_A_FEATURES_HEADER", {"attrs": [["ETHTOOL_A_HEADER_DEV_NAME", ifname]]}))
        replies = list(sock.nlm_request(msg, msg_type=sock.prid, msg_flags=NLM_F_REQUEST))
    finally:
        sock.close()
    return _set_bit_names(replies[0].get_attr("ETHTOOL_A_FEATURES_ACTIVE")) if replies else frozenset()


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    mac: bytes
    kind: str | None            # "veth", "bridge", ... or None for a plain NIC
    xdp_mode: str | None        # what is attached now: native, generic, ... or None
    xdp_prog_id: int | None


class Netlink:
    """Synchronous netlink calls, all made from one private thread.

    They block their caller until the kernel answers: the daemon makes them
    from a worker thread (asyncio.to_thread), never on its event loop.

    pyroute2 0.9's IPRoute drives an asyncio loop of its own and refuses to
    run inside the daemon's loop, so every call is handed to a dedicated
    worker thread (which also keeps the socket to a single thread).
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netlink")
        self._ipr = self._pool.submit(IPRoute).result()

    def _call(self, fn, *args, **kwargs):
        return self._pool.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        self._call(self._ipr.close)
        self._pool.shutdown()

    def link(self, name: str) -> Link:
        found = self._call(self._ipr.link_lookup, ifname=name)
        if not found:
            raise NetlinkProblem(f"interface {name!r} does not exist in this network namespace")
        msg = self._call(self._ipr.get_links, found[0])[0]
        mac = _mac(msg.get_attr("IFLA_ADDRESS") or "00:00:00:00:00:00")
        info = msg.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        xdp = msg.get_attr("IFLA_XDP")
        mode = prog_id = None
        if xdp is not None:
            mode = XDP_ATTACHED.get(xdp.get_attr("IFLA_XDP_ATTACHED") or 0)
            prog_id = xdp.get_attr("IFLA_XDP_PROG_ID")
        return Link(found[0], name, mac, kind, mode, prog_id)

    def active_features(self, name: str) -> frozenset[str]:
        """Offload features active on the link (`ethtool -k`), by their kernel
        names (rx-vlan-hw-parse is ethtool's rx-vlan-offload), read through
        the ETHTOOL generic netlink family."""
        try:
            return self._call(_active_features, name)
        except NetlinkError as exc:
            raise NetlinkProblem(f"cannot read the offload features of {name} through ethtool netlink: "
                                 f"{exc}") from exc

    def ip_forwarding(self, version: int, name: str) -> bool:
        """Whether interface `name` forwards IP `version` (4 or 6): its own
        setting, the one bpf_fib_lookup reads (modes.forwarding_sysctl),
        read in the worker thread, the namespace of the netlink socket."""
        path = forwarding_path(version, name)
        try:
            return self._call(_read_flag, path)
        except OSError as exc:
            raise NetlinkProblem(f"cannot read {path}: {exc}") from exc

    # ---- VIP addresses ----------------------------------------------------

    def vips(self, index: int) -> set:
        """The host addresses on the link that xdplb added (tagged ADDR_PROTO),
        of both families."""
        out = set()
        for msg in self._call(self._ipr.get_addr, index=index):
            if msg.get_attr("IFA_PROTO") == ADDR_PROTO:
                out.add(ipaddress.ip_address(msg.get_attr("IFA_ADDRESS")))
        return out

    def has_address(self, index: int, address) -> bool:
        want = ipaddress.ip_address(address)
        return any(ipaddress.ip_address(m.get_attr("IFA_ADDRESS")) == want
                   for m in self._call(self._ipr.get_addr, family=_family(want), index=index))

    def add_vip(self, index: int, address) -> bool:
        """Add address/32 or address/128 tagged as ours. False if the address
        was already there. IPv6: no DAD, deprecated (see the module docstring)."""
        address = ipaddress.ip_address(address)
        if self.has_address(index, address):
            return False
        extra = {}
        if address.version == 6:
            extra = {"flags": IFA_F_NODAD, "preferred_lft": 0, "valid_lft": INFINITY_LIFE_TIME}
        try:
            self._call(self._ipr.addr, "add", index=index, address=str(address),
                       prefixlen=_host_prefix(address), IFA_PROTO=ADDR_PROTO, **extra)
        except NetlinkError as exc:
            if address.version == 6 and exc.code == errno.EACCES:
                raise NetlinkProblem(f"cannot add VIP {address}: IPv6 is disabled on the interface "
                                     f"(net.ipv6.conf.<interface>.disable_ipv6=1)") from exc
            raise
        return True

    def del_vip(self, index: int, address) -> None:
        try:
            self._call(self._ipr.addr, "del", index=index, address=str(address),
                       prefixlen=_host_prefix(address))
        except NetlinkError as exc:
            if exc.code != errno.EADDRNOTAVAIL:
                raise

    # ---- VIP routes (announcements) ------------------------------------------

    def announced(self, table: int) -> set[ipaddress.IPv4Address]:
        """The /32 routes in `table` that xdplb made (protocol ROUTE_PROTO)."""
        out = set()
        for msg in self._call(self._ipr.get_routes, family=socket.AF_INET, table=table):
            if msg["proto"] == ROUTE_PROTO and msg["dst_len"] == 32 and msg.get_attr("RTA_TABLE") == table:
                out.add(ipaddress.IPv4Address(msg.get_attr("RTA_DST")))
        return out

    def announce(self, table: int, address) -> None:
        """blackhole address/32 in `table`, protocol ROUTE_PROTO (idempotent)."""
        self._call(self._ipr.route, "replace", dst=f"{address}/32", table=table, proto=ROUTE_PROTO,
                   type="blackhole")

    def withdraw(self, table: int, address) -> None:
        """Remove our route for address/32 from `table`; one that is not there is not an error."""
        try:
            self._call(self._ipr.route, "del", dst=f"{address}/32", table=table, proto=ROUTE_PROTO,
                       type="blackhole")
        except NetlinkError as exc:
            if exc.code not in (errno.ESRCH, errno.ENOENT):
                raise

    # ---- neighbours -------------------------------------------------------

    def neighbour_macs(self, index: int) -> dict:
        """Every usable neighbour of the link, IPv4 and IPv6, address -> MAC,
        from one dump per family (one call serves all backends, however many
        there are)."""
        out = {}
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in self._call(self._ipr.get_neighbours, family=family, ifindex=index):
                lladdr, dst = msg.get_attr("NDA_LLADDR"), msg.get_attr("NDA_DST")
                if lladdr and dst and msg["state"] & _NUD_USABLE:
                    address = ipaddress.ip_address(dst)
                    if not address.is_multicast:  # IPv6 lists its multicast groups (NOARP)
                        out[address] = _mac(lladdr)
        return out

    def neighbour_mac(self, index: int, address) -> bytes | None:
        """The backend's MAC from the neighbour table, or None if unresolved."""
        address = ipaddress.ip_address(address)  # the kernel's spelling, to match its dump
        for msg in self._call(self._ipr.get_neighbours, family=_family(address), dst=str(address),
                              ifindex=index):
            lladdr = msg.get_attr("NDA_LLADDR")
            if lladdr and msg["state"] & _NUD_USABLE:
                return _mac(lladdr)
        return None

    def route_gateways(self, index: int, versions=(4,)) -> set:
        """The next hops (gateways) of the main table's routes out of the link,
        multipath ones included, for each IP version in `versions`: where NAT
        replies to clients behind a router go. An IPv6 gateway is often the
        router's link-local address (fe80::/10): it is returned as it is, to
        be solicited on this link."""
        out = set()
        for version in versions:
            family = socket.AF_INET6 if version == 6 else socket.AF_INET
            for msg in self._call(self._ipr.get_routes, family=family, table=254):
                hops = [msg] if msg.get_attr("RTA_OIF") == index else []
                hops += [hop for hop in msg.get_attr("RTA_MULTIPATH") or () if hop["oif"] == index]
                for hop in hops:
                    gateway = hop.get_attr("RTA_GATEWAY")
                    if gateway:
                        out.add(ipaddress.ip_address(gateway))
        return out

    @staticmethod
    def solicit(address, index: int = 0) -> None:
        """Make the kernel resolve `address`: one empty UDP datagram to the
        discard port (9). The kernel sends an ARP request or a Neighbour
        Solicitation for it; the datagram itself is dropped by the backend.
        A link-local IPv6 address needs the link it is on (`index`, its scope)."""
        address = ipaddress.ip_address(address)
        target = (str(address), 9)
        if address.version == 6:
            target = (str(address), 9, 0, index if address.is_link_local else 0)
        with socket.socket(_family(address), socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto(b"", target)
            except OSError:
                pass
