"""Katran-style fixture table: description, input, expected action, output.

Expected output is one of:
  FORWARD   - the input with dst MAC = the predicted backend's MAC and
              src MAC = the gateway's; nothing else changed;
  UNCHANGED - the input, byte for byte;
  None      - a drop: the output is not looked at.
Each case also names the counter it must move (not_forwarded reason or event).
"""
from __future__ import annotations

import struct

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Dot1AD, Dot1Q, Ether

from xdplb import structs

from . import packets as P
from .conftest import mac_of

FORWARD, UNCHANGED, DROPPED = "forward", "unchanged", None
TX, PASS, DROP = structs.XDP_TX, structs.XDP_PASS, structs.XDP_DROP


def _raw_ip(ihl=5, tot_len=None, body=b""):
    """An IPv4 header with chosen IHL/tot_len, to VIP, TCP, then body."""
    header_len = max(ihl, 5) * 4
    tot = tot_len if tot_len is not None else header_len + len(body)
    hdr = struct.pack("!BBHHHBBH4s4s", (4 << 4) | ihl, 0, tot, 1, 0, 64, 6, 0,
                      bytes([10, 10, 0, 2]), bytes([10, 10, 0, 100]))
    return bytes(Ether(src=P.CLIENT_MAC, dst=P.GW, type=0x0800)) + hdr + b"\x00" * (header_len - 20) + body


def _tcp_doff(doff):
    tcp = bytearray(bytes(TCP(sport=40010, dport=104, flags="S")))
    tcp[12] = doff << 4
    return bytes(P.eth() / IP(src="10.10.0.2", dst="10.10.0.100", proto=6)) [:34] + bytes(tcp)


# (description, input bytes-or-packet, (service, sport, dport, proto) or None, action, output, counter)
CASES = [
    ("TCP SYN to VIP:104 goes to the Maglev-chosen backend", P.syn(), ("dicom", 40000, 104, "tcp"), TX, FORWARD, "event:flow_new"),
    ("TCP ACK with payload to VIP:104 without an entry is a miss", P.ack(sport=40100), ("dicom", 40100, 104, "tcp"), TX, FORWARD, "event:flow_miss"),
    ("UDP datagram to VIP:5000", P.udp(), ("udp-echo", 40000, 5000, "udp"), TX, FORWARD, "event:flow_new"),
    ("802.1Q-tagged SYN keeps its tag", P.vlan_syn(Dot1Q), ("dicom", 40001, 104, "tcp"), TX, FORWARD, "event:vlan"),
    ("802.1ad-tagged SYN keeps its tag", P.vlan_syn(Dot1AD), ("dicom", 40001, 104, "tcp"), TX, FORWARD, "event:vlan"),
    ("IPv4 with options (IHL 9) is forwarded", P.with_options(), ("dicom", 40003, 104, "tcp"), TX, FORWARD, "event:ip_options"),
    ("client persistence on the web service", P.syn(dport=80, sport=41000), ("web", 41000, 80, "tcp"), TX, FORWARD, "event:flow_new"),
    ("ARP for the VIP (broadcast) passes to the gateway", P.arp_request(), None, PASS, UNCHANGED, "reason:other_mac"),
    ("SSH to the gateway's own address passes", P.ssh_to_gateway(), None, PASS, UNCHANGED, "reason:not_service"),
    ("TCP to VIP on an unconfigured port passes", P.syn(dport=8443), None, PASS, UNCHANGED, "reason:not_service"),
    ("UDP to VIP:104 (service is TCP) passes", P.udp(dport=104), None, PASS, UNCHANGED, "reason:not_service"),
    ("ICMP echo to the VIP passes", P.icmp_to_vip(), None, PASS, UNCHANGED, "reason:not_service"),
    ("IPv6 passes", P.ipv6_packet(), None, PASS, UNCHANGED, "reason:not_service"),
    ("first fragment to VIP is dropped", P.fragment(True), None, DROP, DROPPED, "reason:fragment"),
    ("later fragment to VIP is dropped", P.fragment(False), None, DROP, DROPPED, "reason:fragment"),
    ("fragment to another host passes", P.fragment(True, dst="10.10.0.10"), None, PASS, UNCHANGED, "reason:not_service"),
    ("IPv4 header cut short passes to the stack", bytes(P.syn())[:14 + 12], None, PASS, UNCHANGED, "reason:malformed"),
    ("IHL 4 passes to the stack", _raw_ip(ihl=4, body=b"\x00" * 20), None, PASS, UNCHANGED, "reason:malformed"),
    ("IHL 15 beyond the packet end passes", _raw_ip(ihl=15)[:14 + 40], None, PASS, UNCHANGED, "reason:malformed"),
    ("tot_len shorter than the header passes", _raw_ip(tot_len=10, body=b"\x00" * 20), None, PASS, UNCHANGED, "reason:malformed"),
    ("VLAN tag cut short passes", bytes(P.vlan_syn())[:16], None, PASS, UNCHANGED, "reason:malformed"),
    ("TCP header cut short to VIP is dropped", bytes(P.syn())[:14 + 20 + 10], None, DROP, DROPPED, "reason:malformed"),
    ("TCP data offset 2 to VIP is dropped", _tcp_doff(2), None, DROP, DROPPED, "reason:malformed"),
    ("UDP length 4 to VIP is dropped", bytes(P.eth() / IP(src="10.10.0.2", dst="10.10.0.100") / UDP(sport=1, dport=5000, len=4)), None, DROP, DROPPED, "reason:malformed"),
]


def _counter(harness, counter):
    kind, name = counter.split(":")
    stats = harness.stats()
    return (stats.events if kind == "event" else stats.not_forwarded)[name]


@pytest.mark.root
@pytest.mark.parametrize("description,packet,flow,action,output,counter", CASES, ids=[c[0] for c in CASES])
def test_fixture(harness, description, packet, flow, action, output, counter):
    raw = bytes(packet)
    before = _counter(harness, counter)
    verdict = harness.run(raw)
    assert verdict.action_name == structs.ACTIONS[action], description
    if output == UNCHANGED:
        assert verdict.data == raw
    elif output == FORWARD:
        service, sport, dport, proto = flow
        address = harness.predict(service, "10.10.0.2", sport, dport, proto)
        expected = P.rewritten(raw, mac_of(int(address.rsplit(".", 1)[1])))
        assert verdict.data == expected
    assert _counter(harness, counter) == before + 1, f"{counter} did not count {description!r}"
