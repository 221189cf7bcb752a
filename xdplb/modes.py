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
