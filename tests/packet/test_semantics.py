"""Which frames are balanced, and the flow-table semantics an operator relies on.

The real program under BPF_PROG_TEST_RUN (no XDP mode: the kernel runs it on
the test's buffer). Frames are to the gateway's MAC unless a case says
otherwise; backends are 10.10.0.11-13 with MAC 02:00:0a:0a:00:<octet>.
"""
from __future__ import annotations

import socket
import time

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from xdplb import structs

from . import packets as P
from .conftest import CLIENT, GW_MAC, VIP, backend, default_services, mac_of, service

pytestmark = pytest.mark.root

VMAC = bytes.fromhex("00005e000133")          # keepalived's use_vmac address for VRID 51
TX, PASS, DROP = structs.XDP_TX, structs.XDP_PASS, structs.XDP_DROP
FORWARD, UNCHANGED, DROPPED = "forward", "unchanged", None
MS = 1_000_000


def _mac(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def _to(dst_mac: str, **tcp):
    return Ether(src=P.CLIENT_MAC, dst=dst_mac) / IP(src=CLIENT, dst=str(VIP)) / TCP(dport=104, **tcp)


def _backend_of(verdict) -> int:
    assert verdict.action == structs.XDP_TX, verdict.action_name
    return verdict.data[5]


def _counter(h, counter: str) -> int:
    kind, name = counter.split(":")
    stats = h.stats()
    return (stats.events if kind == "event" else stats.not_forwarded)[name]


def entry(h, sport: int, dport: int = 104, proto: str = "tcp"):
    """The flow table's (backend octet, atime) for CLIENT:sport -> VIP:dport, or None."""
    key = structs.FlowKey()
    key.src[:] = socket.inet_aton(CLIENT)
    key.dst[:] = VIP.packed
    key.sport, key.dport, key.proto = socket.htons(sport), socket.htons(dport), structs.IPPROTO[proto]
    flows = h.dp.map("flows")
    value = flows.get(flows.Key.from_buffer_copy(bytes(key)))
    if value is None:
        return None
    octet = next(int(str(be.address).rsplit(".", 1)[1]) for be in h.applied.backends.values()
                 if be.id == value.backend_id)
    return octet, value.atime


def sport_on(h, octet: int, start: int, service_name="dicom", dport=104, proto="tcp") -> int:
    """A source port whose flow the live table gives to backend 10.10.0.<octet>."""
    return next(p for p in range(start, start + 2000)
                if h.predict(service_name, CLIENT, p, dport, proto) == f"10.10.0.{octet}")


def with_dicom(*backends):
    return (service("dicom", 104, backends=backends),) + default_services()[1:]


# ---- point 5: only frames for the gateway are balanced ----------------------

GW = _mac(GW_MAC)
MAC_CASES = [
    # (description, destination MAC, action, output, counter)
    ("unicast to the interface's MAC is balanced", GW, TX, FORWARD, "event:flow_new"),
    ("unicast to the pool's extra MAC (VRRP vmac) is balanced", _mac(VMAC), TX, FORWARD, "event:flow_new"),
    ("broadcast passes untouched", "ff:ff:ff:ff:ff:ff", PASS, UNCHANGED, "reason:other_mac"),
    ("IPv4 multicast MAC passes untouched", "01:00:5e:00:00:12", PASS, UNCHANGED, "reason:other_mac"),
    ("a frame flooded to us for another host passes untouched", "02:00:0a:0a:00:63", PASS, UNCHANGED,
     "reason:other_mac"),
    ("a frame for a backend's own MAC passes untouched", _mac(mac_of(12)), PASS, UNCHANGED, "reason:other_mac"),
    ("another VRRP vmac the pool does not name passes", "00:00:5e:00:01:34", PASS, UNCHANGED, "reason:other_mac"),
]


@pytest.mark.parametrize("description,dst_mac,action,output,counter", MAC_CASES, ids=[c[0] for c in MAC_CASES])
def test_destination_mac(harness, description, dst_mac, action, output, counter):
    harness.program(default_services(), extra_macs=(VMAC,))
    raw = bytes(_to(dst_mac, sport=40500, flags="S"))
    before = _counter(harness, counter)
    verdict = harness.run(raw)
    assert verdict.action == action, description
    if output == UNCHANGED:
        assert verdict.data == raw
    else:
        octet = int(harness.predict("dicom", CLIENT, 40500, 104).rsplit(".", 1)[1])
        assert verdict.data == P.rewritten(raw, mac_of(octet)), "only the MACs change, source = interface's MAC"
    assert _counter(harness, counter) == before + 1, f"{counter} did not count {description!r}"


def test_a_new_interface_mac_takes_over(harness):
    from dataclasses import replace

    from xdplb import plan

    new_mac = bytes.fromhex("02000a0a00fe")
    desired = replace(harness.desired, mac=new_mac)
    result = plan.plan(harness.applied, desired, time.monotonic_ns())
    assert [type(op).__name__ for op in result.ops] == ["SetConfig"]
    harness.dp.apply(result.ops)
    harness.applied, harness.desired = result.applied, desired
    assert harness.run(_to(GW, sport=40501, flags="S")).action == PASS
    verdict = harness.run(_to(_mac(new_mac), sport=40501, flags="S"))
    assert verdict.action == TX and verdict.data[6:12] == new_mac


# ---- point 6: SYN, RST, misses -----------------------------------------------

def test_syn_reusing_a_port_is_placed_by_maglev_not_by_the_stale_entry(harness):
    """A modality that reuses its source port must not land on a drained backend."""
    sport = sport_on(harness, 12, 30000)
    assert _backend_of(harness.run(P.syn(sport=sport))) == 12
    harness.program(with_dicom(backend(11), backend(12, weight=0), backend(13)))
    assert _backend_of(harness.run(P.ack(sport=sport))) == 12, "an established flow stays on a drained backend"
    again = _backend_of(harness.run(P.syn(sport=sport)))
    assert again != 12
    assert again == int(harness.predict("dicom", CLIENT, sport, 104).rsplit(".", 1)[1])
    assert entry(harness, sport)[0] == again, "the SYN's entry replaced the stale one"
    assert _backend_of(harness.run(P.ack(sport=sport))) == again


def test_syn_under_the_flood_guard_deletes_the_stale_entry(harness):
    sport = sport_on(harness, 12, 30500)
    assert _backend_of(harness.run(P.syn(sport=sport))) == 12
    harness.program(with_dicom(backend(11), backend(12, weight=0), backend(13)), flood_rate=1)
    # Use up this second's one new entry, then the port is reused.
    harness.run(P.syn(sport=50001))
    before = _counter(harness, "event:flood_no_entry")
    again = _backend_of(harness.run(P.syn(sport=sport)))
    assert again != 12 and again == int(harness.predict("dicom", CLIENT, sport, 104).rsplit(".", 1)[1])
    assert _counter(harness, "event:flood_no_entry") == before + 1
    assert entry(harness, sport) is None, "the stale entry must go when no new one can be written"


def test_syn_ack_is_not_a_new_connection(harness):
    sport = sport_on(harness, 13, 31000)
    assert _backend_of(harness.run(P.syn(sport=sport))) == 13
    harness.program(with_dicom(backend(11), backend(12), backend(13, weight=0)))
    synack = P.eth() / IP(src=CLIENT, dst=str(VIP)) / TCP(sport=sport, dport=104, flags="SA")
    assert _backend_of(harness.run(synack)) == 13


@pytest.mark.parametrize("flags", ["R", "RA"])
def test_rst_never_creates_an_entry(harness, flags):
    sport = 31500 + len(flags)
    rst = P.eth() / IP(src=CLIENT, dst=str(VIP)) / TCP(sport=sport, dport=104, flags=flags)
    before = _counter(harness, "event:flow_miss")
    verdict = harness.run(rst)
    octet = int(harness.predict("dicom", CLIENT, sport, 104).rsplit(".", 1)[1])
    assert verdict.action == TX and verdict.data == P.rewritten(bytes(rst), mac_of(octet))
    assert entry(harness, sport) is None
    assert _counter(harness, "event:flow_miss") == before + 1


def test_rst_follows_an_existing_entry(harness):
    sport = sport_on(harness, 11, 31600)
    harness.run(P.syn(sport=sport))
    harness.program(with_dicom(backend(11, weight=0), backend(12), backend(13)))
    rst = P.eth() / IP(src=CLIENT, dst=str(VIP)) / TCP(sport=sport, dport=104, flags="RA")
    assert _backend_of(harness.run(rst)) == 11


def test_miss_is_placed_by_maglev_counted_and_remembered(harness):
    before = _counter(harness, "event:flow_miss")
    new_before = _counter(harness, "event:flow_new")
    octet = _backend_of(harness.run(P.ack(sport=32000)))
    assert octet == int(harness.predict("dicom", CLIENT, 32000, 104).rsplit(".", 1)[1])
    assert _counter(harness, "event:flow_miss") == before + 1
    assert _counter(harness, "event:flow_new") == new_before
    assert entry(harness, 32000)[0] == octet
    hits = _counter(harness, "event:flow_hit")
    harness.run(P.ack(sport=32000))
    assert _counter(harness, "event:flow_hit") == hits + 1


# ---- point 6: UDP idle timeout ------------------------------------------------

def test_udp_entry_expires_after_the_idle_timeout(harness):
    idle = 2000 * MS     # well above a plan's map writes (grace periods) on a loaded machine
    harness.program(default_services(), udp_idle_ns=idle)
    sport = sport_on(harness, 12, 33000, "udp-echo", 5000, "udp")
    assert _backend_of(harness.run(P.udp(sport=sport))) == 12
    first_atime = entry(harness, sport, 5000, "udp")[1]
    assert first_atime > 0
    # Draining 12: the live flow stays while packets keep coming...
    harness.program((default_services()[0], default_services()[1],
                     service("udp-echo", 5000, "udp", backends=(backend(11), backend(12, weight=0), backend(13)))),
                    udp_idle_ns=idle)
    for _ in range(4):
        time.sleep(idle / 3e9)
        assert _backend_of(harness.run(P.udp(sport=sport))) == 12, "an active UDP flow must not expire"
    assert entry(harness, sport, 5000, "udp")[1] > first_atime
    # ...and once it has been idle for the timeout, it is placed afresh: the drain finishes.
    before = _counter(harness, "event:udp_expired")
    time.sleep(idle * 1.2 / 1e9)
    moved = _backend_of(harness.run(P.udp(sport=sport)))
    assert moved != 12
    assert moved == int(harness.predict("udp-echo", CLIENT, sport, 5000, "udp").rsplit(".", 1)[1])
    assert _counter(harness, "event:udp_expired") == before + 1
    assert entry(harness, sport, 5000, "udp")[0] == moved


def test_tcp_entries_do_not_expire_by_idleness(harness):
    harness.program(default_services(), udp_idle_ns=100 * MS)
    sport = sport_on(harness, 12, 33500)
    harness.run(P.syn(sport=sport))
    harness.program(with_dicom(backend(11), backend(12, weight=0), backend(13)), udp_idle_ns=100 * MS)
    time.sleep(0.2)
    assert _backend_of(harness.run(P.ack(sport=sport))) == 12
    assert entry(harness, sport)[1] == 0


# ---- point 6: flood guard ------------------------------------------------------

def test_flood_guard_stops_inserting_above_the_rate(harness):
    harness.program(default_services(), flood_rate=40)
    time.sleep(1.05)   # a fresh one-second window
    before = _counter(harness, "event:flood_no_entry")
    sports = range(34000, 34100)
    started = time.monotonic()
    placed = {p: _backend_of(harness.run(P.syn(sport=p))) for p in sports}
    assert time.monotonic() - started < 0.9, "the 100 SYNs must fall in one window for this test to mean anything"
    for p, octet in placed.items():
        assert octet == int(harness.predict("dicom", CLIENT, p, 104).rsplit(".", 1)[1]), "placed by Maglev"
    remembered = [p for p in sports if entry(harness, p) is not None]
    assert remembered == list(sports)[:40]
    assert _counter(harness, "event:flood_no_entry") == before + 60


def _syn_frame(src: int, sport: int) -> bytearray:
    return bytearray(bytes(P.eth() / IP(src=socket.inet_ntoa(src.to_bytes(4, "big")), dst=str(VIP))
                           / TCP(sport=sport, dport=104, flags="S")))


FLOOD_RATE = 20_000       # SYNs per second from random sources
FLOOD_SECONDS = 30
GUARD_RATE = 1_000        # new entries per second per CPU
ESTABLISHED = 10_000


def test_established_entries_survive_a_30_second_syn_flood(harness):
    """Under 20,000 SYN/s from distinct sources for 30 s (600,000 SYNs, one
    CPU), with the guard at 1,000 new entries per second per CPU, at least
    99 % of 10,000 established flows keep their entries. Without the guard
    the flood's entries evict them (the per-CPU LRU holds flow_table_size /
    possible CPUs entries)."""
    from xdplb import bpfsys

    fd = harness.dp.prog_fd
    established = []
    base = int.from_bytes(socket.inet_aton("10.20.0.0"), "big")
    for i in range(ESTABLISHED):
        frame = bytes(_syn_frame(base + i // 50000, 10000 + i % 50000))
        assert bpfsys.prog_test_run(fd, frame).retval == TX
        established.append(frame)
    harness.program(default_services(), flood_rate=GUARD_RATE)
    flows = harness.dp.map("flows")
    assert len(flows) >= ESTABLISHED

    template = _syn_frame(0, 0)
    src_at, sport_at = 26, 34     # IPv4 source address, TCP source port
    flood_src = int.from_bytes(socket.inet_aton("172.16.0.0"), "big")
    sent, started = 0, time.monotonic()
    while (elapsed := time.monotonic() - started) < FLOOD_SECONDS:
        due = int(elapsed * FLOOD_RATE)
        while sent < due:
            template[src_at:src_at + 4] = (flood_src + sent // 60000).to_bytes(4, "big")
            template[sport_at:sport_at + 2] = (1024 + sent % 60000).to_bytes(2, "big")
            bpfsys.prog_test_run(fd, bytes(template))
            sent += 1
        time.sleep(0.002)
    assert sent >= FLOOD_RATE * FLOOD_SECONDS * 0.99

    key_of = structs.FlowKey
    kept = 0
    for frame in established:
        key = key_of()
        key.src[:] = frame[26:30]
        key.dst[:] = frame[30:34]
        key.sport = int.from_bytes(frame[34:36], "little")   # network order kept as bytes
        key.dport = int.from_bytes(frame[36:38], "little")
        key.proto = socket.IPPROTO_TCP
        if flows.get(flows.Key.from_buffer_copy(bytes(key))) is not None:
            kept += 1
    print(f"flood: {sent} SYNs in {FLOOD_SECONDS} s, guard {GUARD_RATE}/s per CPU: "
          f"{kept} of {ESTABLISHED} established entries kept")
    assert kept >= 0.99 * ESTABLISHED, f"only {kept} of {ESTABLISHED} established entries survived the flood"
    assert harness.stats().events["flood_no_entry"] >= sent - GUARD_RATE * (FLOOD_SECONDS + 1)


# ---- point 6: down grace and down/removed backends ---------------------------

GRACE = 400 * MS


def test_established_flow_stays_on_a_down_backend_for_the_grace(harness):
    harness.program(default_services(), down_grace_ns=GRACE)
    sport = sport_on(harness, 13, 35000)
    assert _backend_of(harness.run(P.syn(sport=sport))) == 13
    harness.program(with_dicom(backend(11), backend(12), backend(13, healthy=False)), down_grace_ns=GRACE)
    before = _counter(harness, "event:down_grace")
    assert _backend_of(harness.run(P.ack(sport=sport))) == 13, "inside the grace the flow stays"
    assert _counter(harness, "event:down_grace") == before + 1
    # New flows never go to the down backend, not even a SYN of the same 5-tuple.
    assert 13 not in {_backend_of(harness.run(P.syn(sport=p))) for p in range(35100, 35300)}
    time.sleep(GRACE * 1.2 / 1e9)
    reselect = _counter(harness, "event:flow_reselect")
    moved = _backend_of(harness.run(P.ack(sport=sport)))
    assert moved in (11, 12)
    assert _counter(harness, "event:flow_reselect") == reselect + 1


def test_backend_back_within_the_grace_keeps_its_flows(harness):
    harness.program(default_services(), down_grace_ns=GRACE)
    sport = sport_on(harness, 12, 35500)
    harness.run(P.syn(sport=sport))
    harness.program(with_dicom(backend(11), backend(12, healthy=False), backend(13)), down_grace_ns=GRACE)
    assert _backend_of(harness.run(P.ack(sport=sport))) == 12
    harness.program(default_services(), down_grace_ns=GRACE)
    time.sleep(GRACE * 1.2 / 1e9)
    assert _backend_of(harness.run(P.ack(sport=sport))) == 12


def test_grace_zero_rechooses_at_once(harness):
    sport = sport_on(harness, 13, 36000)
    harness.run(P.syn(sport=sport))
    harness.program(with_dicom(backend(11), backend(12), backend(13, healthy=False)), down_grace_ns=0)
    assert _backend_of(harness.run(P.ack(sport=sport))) in (11, 12)


def test_removed_backend_follows_the_same_grace(harness):
    harness.program(default_services(), down_grace_ns=GRACE)
    sport = sport_on(harness, 11, 36500)
    harness.run(P.syn(sport=sport))
    bid = harness.backend_id("dicom", "10.10.0.11")
    harness.program(with_dicom(backend(12), backend(13)), down_grace_ns=GRACE)
    assert _backend_of(harness.run(P.ack(sport=sport))) == 11, "a removed backend keeps its flows for the grace"
    assert bid not in {be.id for be in harness.applied.backends.values()}
    assert any(be.id == bid for be, _until in harness.applied.retired.values()), "its id stays reserved"
    time.sleep(GRACE * 1.2 / 1e9)
    assert _backend_of(harness.run(P.ack(sport=sport))) in (12, 13)
    # The next plan after the grace clears the id.
    harness.program(with_dicom(backend(12), backend(13)), down_grace_ns=GRACE)
    assert not harness.applied.retired
    assert bytes(harness.dp.map("backends")[bid].mac) == bytes(6)


def test_new_flow_never_goes_to_a_down_backend_the_table_still_names(harness):
    """Between a health verdict and the table flip, a slot can still name the
    backend: the program checks it is up."""
    from xdplb import plan

    harness.program(default_services(), down_grace_ns=GRACE)
    be13 = harness.applied.backends[("dicom", "10.10.0.13")]
    harness.dp.apply([plan.PutBackend(be13.id, be13.service_id, be13.address, be13.mac, False,
                                      time.monotonic_ns())])
    sport = sport_on(harness, 13, 37000)
    before = _counter(harness, "reason:backend_gone")
    assert harness.run(P.syn(sport=sport)).action == DROP
    assert _counter(harness, "reason:backend_gone") == before + 1
    assert entry(harness, sport) is None


# ---- point 7: fragments ------------------------------------------------------

FRAGMENTS = [
    ("first TCP fragment", IP(src=CLIENT, dst=str(VIP), flags="MF", frag=0) / TCP(sport=40004, dport=104)
     / Raw(b"x" * 32)),
    ("later TCP fragment", IP(src=CLIENT, dst=str(VIP), frag=4, proto=6) / Raw(b"y" * 32)),
    ("first UDP fragment", IP(src=CLIENT, dst=str(VIP), flags="MF", frag=0) / UDP(sport=40004, dport=5000)
     / Raw(b"x" * 32)),
    ("later UDP fragment", IP(src=CLIENT, dst=str(VIP), frag=4, proto=17) / Raw(b"y" * 32)),
    ("UDP fragment to a port no service uses", IP(src=CLIENT, dst=str(VIP), flags="MF", frag=0)
     / UDP(sport=1, dport=7777) / Raw(b"x" * 32)),
]


@pytest.mark.parametrize("description,ip", FRAGMENTS, ids=[c[0] for c in FRAGMENTS])
def test_tcp_and_udp_fragments_to_a_vip_are_dropped_and_counted(harness, description, ip):
    before = _counter(harness, "reason:fragment")
    assert harness.run(P.eth() / ip).action == DROP, description
    assert _counter(harness, "reason:fragment") == before + 1



# ---- lb_config unpublished while the controller rewrites it ------------------

def test_while_the_config_is_rewritten_vip_traffic_is_dropped_not_reset(harness):
    """The gateway's stack holds the VIP: a packet of an established flow
    passed to it would be answered with a RST. While lb_config is
    unpublished (ready = 0), such packets are dropped for TCP to retransmit;
    the gateway's own traffic still passes."""
    table = harness.dp.map("lb_config")
    cfg = structs.LbConfig.from_buffer_copy(bytes(table[0]))
    cfg.ready = 0
    table[0] = cfg
    before = _counter(harness, "reason:no_config")
    assert harness.run(P.ack(sport=38000)).action == DROP
    assert harness.run(P.udp(sport=38000)).action == DROP
    ssh = bytes(P.ssh_to_gateway())
    verdict = harness.run(ssh)
    assert verdict.action == PASS and verdict.data == ssh
    assert _counter(harness, "reason:no_config") == before + 2
    cfg.ready = 1
    table[0] = cfg
    assert harness.run(P.ack(sport=38000)).action == TX


class _Recorder:
    """The backends map, recording every write (key, flags, down_since)."""

    def __init__(self, table):
        self.table, self.writes = table, []

    def __getitem__(self, key):
        return self.table[key]

    def __setitem__(self, key, value):
        self.writes.append((key, value.flags, value.down_since))
        self.table[key] = value

    def __getattr__(self, name):
        return getattr(self.table, name)


def test_a_backend_going_down_and_up_stays_published(harness):
    """Unpublishing a backend (F_BACKEND_READY off) would make its
    established flows re-chosen for the grace periods a rewrite takes: going
    down writes down_since first (still up), then clears UP (one byte);
    coming back sets UP first, then clears down_since."""
    harness.program(default_services(), down_grace_ns=GRACE)
    bid = harness.backend_id("dicom", "10.10.0.13")
    recorder = _Recorder(harness.dp.map("backends"))
    harness.dp._maps["backends"] = recorder
    try:
        harness.program(with_dicom(backend(11), backend(12), backend(13, healthy=False)), down_grace_ns=GRACE)
        down = [w for w in recorder.writes if w[0] == bid]
        recorder.writes.clear()
        harness.program(default_services(), down_grace_ns=GRACE)
        up = [w for w in recorder.writes if w[0] == bid]
    finally:
        harness.dp._maps["backends"] = recorder.table
    ready, is_up = structs.F_BACKEND_READY, structs.F_BACKEND_UP
    assert all(flags & ready for _, flags, _ in down + up), "a backend going down or up was unpublished"
    assert [(bool(f & is_up), since > 0) for _, f, since in down] == [(True, True), (False, True)]
    assert [(bool(f & is_up), since > 0) for _, f, since in up] == [(True, True), (True, False)]
