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


# The sysctl that bpf_fib_lookup reads for each IP version: it answers
# BPF_FIB_LKUP_RET_FWD_DISABLED while it is 0. For IPv6 it is the "all"
# setting (net->ipv6.devconf_all), not the interface's own.
FORWARDING_SYSCTLS = {4: "net.ipv4.ip_forward", 6: "net.ipv6.conf.all.forwarding"}
_FORWARDING_CAVEATS = {
    4: "",
    # A router ignores Router Advertisements unless accept_ra = 2 on the interface.
    6: "; with it on, this host stops taking its own IPv6 routes from Router Advertisements unless the "
       "interface has accept_ra = 2",
}


def nat_forwarding_refusal(nat_services, forwarding: bool, version: int = 4) -> str | None:
    """Why a pool with these NAT services (names) of IP version `version`
    must not run here, or None.

    The NAT reply path routes with bpf_fib_lookup, which answers
    BPF_FIB_LKUP_RET_FWD_DISABLED while the family's forwarding is off
    (FORWARDING_SYSCTLS): every reply would be dropped (nat_stats no_route).
    xdplb does not turn it on itself: forwarding makes the host a router,
    which is the operator's decision.
    """
    if forwarding or not nat_services:
        return None
    sysctl = FORWARDING_SYSCTLS[version]
    return (f"NAT service(s) {', '.join(nat_services)} need IP forwarding, but {sysctl} is 0 in this "
            f"network namespace, so every reply would be dropped: turn it on with "
            f"`sysctl -w {sysctl}=1` (xdplb does not change it for you{_FORWARDING_CAVEATS[version]})")
