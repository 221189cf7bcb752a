"""Choosing the XDP attach mode. Pure.

native:  the driver runs the program before allocating an skb (fastest).
generic: the kernel runs it on the skb (works on every interface).

`--mode auto` must never pick a mode that silently drops traffic. On veth,
native XDP_TX frames are dropped unless the peer veth carries an XDP program
of its own, and a sender's CHECKSUM_PARTIAL packets leave with an unfinished
TCP checksum; neither can be checked from this side, so auto uses generic
on veth. On other drivers auto tries native and falls back to generic when
the driver refuses it.
"""
from __future__ import annotations

MODES = ("auto", "native", "generic")

# Receive VLAN offloads by their kernel feature names (what ETHTOOL_MSG_FEATURES_GET
# reports), each with the `ethtool -K` words that turn it off.
VLAN_STRIP_FEATURES = {
    "rx-vlan-hw-parse": "rxvlan off",                        # 802.1Q; ethtool shows rx-vlan-offload
    "rx-vlan-stag-hw-parse": "rx-vlan-stag-hw-parse off",    # 802.1ad
}


def attempts(requested: str, link_kind: str | None) -> list[tuple[str, str]]:
    """Modes to try in order, each with the reason it is tried."""
    if requested == "native":
        return [("native", "requested")]
    if requested == "generic":
        return [("generic", "requested")]
    if requested != "auto":
        raise ValueError(f"unknown mode {requested!r}; use one of {', '.join(MODES)}")
    if link_kind == "veth":
        return [("generic", "auto: veth drops native XDP_TX frames unless its peer runs XDP, so generic")]
    return [
        ("native", "auto: driver mode first"),
        ("generic", "auto: the driver refused native XDP, falling back to generic"),
    ]


def vlan_strip_refusal(ifname: str, link_kind: str | None, active_features) -> str | None:
    """Why native XDP must not run on this link, or None.

    With rx-vlan-offload the NIC strips the VLAN tag into the packet's
    metadata before a native XDP program sees the frame, so XDP_TX sends the
    balanced frame untagged, onto the native VLAN or nowhere. xdplb does not
    turn the offload off itself: on a real NIC that can reset the link,
    which would break the hitless restart it is part of. veth is left out:
    it has no hardware that strips, and auto never runs native on it.
    """
    if link_kind == "veth":
        return None
    on = [name for name in VLAN_STRIP_FEATURES if name in active_features]
    if not on:
        return None
    fix = " ".join(VLAN_STRIP_FEATURES[name] for name in on)
    return (f"{ifname} strips VLAN tags before native XDP sees a frame ({', '.join(on)} is on), so balanced "
            f"frames would leave untagged: turn it off with `ethtool -K {ifname} {fix}` before attaching "
            f"(it can reset the link, so xdplb does not do it for you)")


# bpf_fib_lookup answers BPF_FIB_LKUP_RET_FWD_DISABLED while forwarding is
# off on the interface it is given (nat.h, nat6.h: the attached one, the
# ingress): IN_DEV_FORWARD(in_dev) for IPv4, idev->cnf.forwarding for IPv6.
# It reads that interface's own setting, never net.ipv4.ip_forward or
# net.ipv6.conf.all.forwarding (writing those sets every interface's, but an
# interface's own can differ from them afterwards).
def forwarding_sysctl(version: int, ifname: str) -> str:
    """The sysctl bpf_fib_lookup reads for IP `version` on `ifname`, as
    sysctl(8) names it (a dot in the interface's name, eth0.100, is written
    as a slash there)."""
    return f"net.ipv{version}.conf.{ifname.replace('.', '/')}.forwarding"


def forwarding_path(version: int, ifname: str) -> str:
    """The file behind forwarding_sysctl (in the reader's network namespace)."""
    return f"/proc/sys/net/ipv{version}/conf/{ifname}/forwarding"


_FORWARDING_CAVEATS = {
    4: "",
    # An interface that forwards ignores Router Advertisements unless its accept_ra = 2.
    6: "; with it on, this host stops taking its own IPv6 routes from Router Advertisements on that "
       "interface unless its accept_ra = 2",
}


def nat_forwarding_refusal(nat_services, forwarding: bool, version: int, ifname: str) -> str | None:
    """Why a pool with these NAT services (names) of IP version `version`
    must not run on `ifname`, or None.

    The NAT reply path routes with bpf_fib_lookup, which answers
    BPF_FIB_LKUP_RET_FWD_DISABLED while forwarding is off on the attached
    interface (forwarding_sysctl): every reply would be dropped (nat_stats
    no_route). xdplb does not turn it on itself: forwarding makes the host
    a router, which is the operator's decision.
    """
    if forwarding or not nat_services:
        return None
    sysctl = forwarding_sysctl(version, ifname)
    return (f"NAT service(s) {', '.join(nat_services)} need IP forwarding on {ifname}, but {sysctl} is 0, "
            f"so every reply would be dropped: turn it on with "
            f"`sysctl -w {sysctl}=1` (xdplb does not change it for you{_FORWARDING_CAVEATS[version]})")
