"""NAT mode end to end (issue 13): real Orthanc that authorise callers by AE
title and address, behind the gateway as their router; dcmtk in a client
behind a router namespace.

Topology and offloads: ``tools/lab_nat.py``. xdplb runs with ``--mode auto``,
which picks generic XDP on veth; every test here ran in generic mode.
The PACS listen on 4242 and the modality calls VIP:104, so every store that
works had its destination port translated; Orthanc checks the caller's
address (DicomCheckModalityHost), so every store that works kept the
client's address. The same AE title from an address Orthanc does not know is
rejected: the negative control, through xdplb and through the nftables DNAT
baseline (the same job done by the kernel's NAT, xdplb not attached).

Counts and placements come from Orthanc's REST API and from the PACS' own
sockets (ss), never from xdplb; checksums from frames captured at the
receivers (the PACS and the router) and checked with scapy.
"""
from __future__ import annotations

import json
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.utils import PcapReader, checksum

import lab_nat
import pacs_lab
from lab_xdplb import Balancer, backend_health, backend_in_table, xdp_attached
from make_dicom import dataset_digest, make_instance, make_study

pytestmark = [pytest.mark.root, pytest.mark.lab]

INTERVAL, TIMEOUT, RISE, FALL = 1.0, 0.5, 2, 2
DETECT_BOUND = FALL * INTERVAL + 2.0      # a killed Orthanc is marked down within this (s), 2 shared cores
BIG = 200 * 1024 * 1024
SLOW, FAST = "40mbit", "2gbit"             # the client's pace while a test acts, and after
CRAWL = "8mbit"                            # while a restarted daemon compiles (1 MB/s)
METRICS = "127.0.0.1:9743"                 # the exporter, in the gateway's namespace


@pytest.fixture(scope="module")
def nat():
    with lab_nat.temporary_nat_lab("xn") as the_lab:
        yield the_lab


class Holder:
    """The module's running balancer (the restart test replaces it) and its pool."""
    balancer: Balancer | None = None
    pool: Path | None = None


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("nat")


@pytest.fixture(scope="module")
def gateway(nat, work):
    pool = work / "pool.toml"
    pool.write_text(lab_nat.pool_text(nat, "dicom", INTERVAL, TIMEOUT, RISE, FALL, metrics=METRICS))
    holder = Holder()
    holder.pool = pool
    holder.balancer = Balancer(nat, pool, work / "run", work / "xdplb.log").start()
    try:
        st = holder.balancer.wait_ready(timeout=240)   # bcc compiles at attach
        assert st["mode"] == "generic", st["mode"]
        wait_all_up(holder.balancer)
        yield holder
    finally:
        holder.balancer.stop()
        holder.balancer.release()
        print(holder.balancer.log())


def wait_all_up(b: Balancer, timeout: float = 30.0) -> dict:
    return b.wait_for(lambda st: all(backend_in_table(st, lab_nat.SERVICE, n)
                                     for n in backend_health(st, lab_nat.SERVICE)), timeout, "every PACS up")


@pytest.fixture(scope="module")
def big(work):
    """(path, SOP Instance UID) of one 200 MB instance."""
    path = work / "big.dcm"
    uid = make_instance(path, BIG)
    yield path, uid
    path.unlink(missing_ok=True)


def stored_digest(nat, uid: str, work: Path) -> tuple[str, tuple[int, str]]:
    """(backend, data-set digest) of the instance as the PACS stored it."""
    found = pacs_lab.find_instance(nat, uid)
    assert found is not None, f"no PACS holds {uid}"
    name, record = found
    copy = pacs_lab.download_instance(nat, name, record["ID"], work / f"stored-{name}.dcm")
    try:
        return name, dataset_digest(copy)
    finally:
        copy.unlink(missing_ok=True)


def carrier(nat, deadline: float = 15.0) -> str:
    """The PACS holding the client's association, from the PACS' own sockets."""
    client = lab_nat.CLIENT_HOSTS["client"]
    end = time.monotonic() + deadline
    while True:
        holders = [name for name in nat.backend_names()
                   if nat.run(name, "ss", "-Htn", "state", "established",
                              f"( sport = :{lab_nat.ORTHANC_PORT} and dst {client} )").stdout.strip()]
        if len(holders) == 1:
            return holders[0]
        assert time.monotonic() < end, f"no single PACS holds the client's association: {holders}"
        time.sleep(0.05)


# ---- the topology and the baseline, without xdplb ----------------------------------

def test_the_pacs_authorise_by_address_and_the_client_is_routed(nat, work):
    """Straight to a PACS's own address and port (no balancer on the way in):
    MODALITY from the client is accepted, from the stranger rejected; the
    client's traffic crosses the router."""
    path = work / "direct.dcm"
    make_instance(path, 64 * 1024)
    ok = pacs_lab.storescu(nat, path, host=nat.backend_ip(1), port=lab_nat.ORTHANC_PORT)
    assert ok.returncode == 0, ok.stderr
    refused = pacs_lab.storescu(nat, path, host=nat.backend_ip(1), port=lab_nat.ORTHANC_PORT, source="stranger")
    assert refused.returncode != 0 and "Association Rejected" in refused.stderr, refused.stderr
    hops = nat.run("client", "ip", "route", "get", nat.vip).stdout
    assert f"via {lab_nat.ROUTER_CLIENT_IP}" in hops


def test_nftables_dnat_baseline_keeps_the_client_address(nat, work):
    """The baseline the bench compares with: the kernel's DNAT, xdplb not attached."""
    targets = [(nat.backend_ip(n), lab_nat.ORTHANC_PORT) for n in nat.backend_names()]
    files = [p for p, _ in make_study(work / "nft", 6, 16 * 1024)]
    with lab_nat.nftables_dnat(nat, [(lab_nat.SERVICE_PORT, targets, "numgen")]) as counters:
        before = pacs_lab.counts(nat)
        results = pacs_lab.store_each(nat, files)
        refused = pacs_lab.storescu(nat, files[0], source="stranger")
        after = pacs_lab.counts(nat)
        dnat_packets = counters()
    assert [rc for _, rc in results] == [0] * len(files)
    assert sum(after.values()) - sum(before.values()) == len(files)
    assert refused.returncode != 0 and "Association Rejected" in refused.stderr, refused.stderr
    assert dnat_packets[0] >= len(files) + 1


def test_full_nat_hides_the_client_and_the_pacs_refuses_it(nat, work):
    """Why the client's address must be kept: the same DNAT plus masquerade
    (the source becomes the gateway's) and MODALITY is refused."""
    targets = [(nat.backend_ip(n), lab_nat.ORTHANC_PORT) for n in nat.backend_names()]
    path = work / "masq.dcm"
    make_instance(path, 16 * 1024)
    with lab_nat.nftables_dnat(nat, [(lab_nat.SERVICE_PORT, targets, "numgen")], masquerade=True) as counters:
        refused = pacs_lab.storescu(nat, path)
        assert counters()[-1] >= 1   # the masquerade rule saw the association
    assert refused.returncode != 0 and "Association Rejected" in refused.stderr, refused.stderr


# ---- the checksum checker (scapy), and a proof that it can fail -------------------

def tcp_checksum_ok(ip) -> bool:
    segment = bytes(ip[TCP])[: ip.len - ip.ihl * 4]
    pseudo = (bytes(map(int, ip.src.split("."))) + bytes(map(int, ip.dst.split(".")))
              + bytes([0, 6]) + len(segment).to_bytes(2, "big"))
    return checksum(pseudo + segment) == 0


def ip_checksum_ok(ip) -> bool:
    return checksum(bytes(ip)[: ip.ihl * 4]) == 0


def judge(pcap: Path, wanted) -> tuple[int, list[str]]:
    """(frames ``wanted`` selects, descriptions of those with a bad checksum)."""
    seen, bad = 0, []
    with PcapReader(str(pcap)) as frames:
        for frame in frames:
            if IP not in frame or TCP not in frame or not wanted(frame):
                continue
            seen += 1
            ip = frame[IP]
            if ip.len > 1500:
                bad.append(f"a {ip.len}-byte IP packet: a super-packet, not a wire frame")
            elif not (ip_checksum_ok(ip) and tcp_checksum_ok(ip)):
                bad.append(f"{ip.src}:{ip[TCP].sport} > {ip.dst}:{ip[TCP].dport} flags {ip[TCP].flags} "
                           f"len {ip.len} ip {ip_checksum_ok(ip)} tcp {tcp_checksum_ok(ip)}")
    return seen, bad


def test_the_capture_sees_a_checksum_left_to_offload(nat, work):
    """Before xdplb attaches (its stateless reply translation would rewrite a
    PACS's direct answers too). The checker can fail: with the client's TX checksum offload on, its
    frames reach the router's port still partial, and the judge says so."""
    path = work / "offload.dcm"
    make_instance(path, 256 * 1024)
    pcap = work / "capture-offload.pcap"
    client = lab_nat.CLIENT_HOSTS["client"]
    nat.run("client", "ethtool", "-K", "eth0", "tx", "on")
    try:
        with lab_nat.capturing(nat, "router", pcap, ifname="to-client"):
            done = pacs_lab.storescu(nat, path, host=nat.backend_ip(1), port=lab_nat.ORTHANC_PORT)
    finally:
        nat.run("client", "ethtool", "-K", "eth0", "tx", "off")
    assert done.returncode == 0, done.stderr
    seen, bad = judge(pcap, lambda f: f[IP].src == client and f[TCP].dport == lab_nat.ORTHANC_PORT)
    assert seen >= 4 and len(bad) >= seen // 2, (seen, len(bad))   # 49 of 49 when measured (TSO: 64 KB frames)


# ---- through xdplb in NAT mode -------------------------------------------------------

def test_store_to_vip_104_reaches_orthanc_on_4242_from_the_clients_address(nat, gateway, work):
    path = work / "one.dcm"
    uid = make_instance(path, 256 * 1024)
    done = pacs_lab.storescu(nat, path)
    assert done.returncode == 0, done.stderr
    name, record = pacs_lab.find_instance(nat, uid)
    meta = pacs_lab.rest(nat, name, f"/instances/{record['ID']}/metadata?expand")
    assert meta.get("RemoteAET") == pacs_lab.MODALITY_AET
    assert meta.get("RemoteIP") == lab_nat.CLIENT_HOSTS["client"], meta


def test_the_stranger_with_the_same_ae_title_is_rejected(nat, gateway, work):
    path = work / "stranger.dcm"
    make_instance(path, 16 * 1024)
    before = pacs_lab.counts(nat)
    refused = pacs_lab.storescu(nat, path, source="stranger")
    # Rejected by the PACS (the association reached it), not lost on the way.
    assert refused.returncode != 0 and "Association Rejected" in refused.stderr, refused.stderr
    assert pacs_lab.counts(nat) == before


def test_new_associations_spread_over_the_three(nat, gateway, work):
    files = [p for p, _ in make_study(work / "spread", 24, 16 * 1024)]
    before = pacs_lab.counts(nat)
    results = pacs_lab.store_each(nat, files)
    after = pacs_lab.counts(nat)
    assert [rc for _, rc in results] == [0] * len(files)
    gained = {n: after[n] - before[n] for n in after}
    assert sum(gained.values()) == len(files)
    assert all(v >= 1 for v in gained.values()), gained   # 3 * (2/3)**24 ~ 2e-4 by chance


def test_failover_when_an_orthanc_is_killed(nat, gateway, work):
    b = gateway.balancer
    spares = [p for p, _ in make_study(work / "failover", 80, 16 * 1024)]
    watcher = pacs_lab.watch_store(nat, 9.0, spares)
    started = time.monotonic()
    try:
        time.sleep(1.5)   # the healthy state first
        killed_wall = time.time()
        pacs_lab.kill_orthanc(nat, "be2")
        killed = time.monotonic() - started
        st = b.wait_for(lambda s: backend_health(s, lab_nat.SERVICE)["be2"] == "down", DETECT_BOUND + 5, "be2 down")
        out, _ = watcher.communicate(timeout=90)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    tries = [(float(t), r) for t, r, _ in (line.split(maxsplit=2) for line in out.splitlines())]
    failed = [t for t, r in tries if r == "fail"]
    # The watcher's clock starts when its python does, up to a few tenths of a
    # second after ours: only tries well before the kill are known to precede it.
    before = [r for t, r in tries if t < killed - 0.6]
    assert len(before) >= 3 and set(before) == {"ok"}, tries
    last = max(failed, default=killed)
    assert last - killed <= DETECT_BOUND, f"last failure {last - killed:.2f}s after the kill"
    later = [r for t, r in tries if t > last]
    record = next(x for s in st["services"] if s["name"] == lab_nat.SERVICE for x in s["backends"] if x["name"] == "be2")
    print(f"failover: {len(failed)} failed C-STOREs, the last {last - killed:.2f}s after the kill; be2 marked down "
          f"{record['since'] - killed_wall:.2f}s after it (bound {DETECT_BOUND:.1f}s); {len(later)} ok after")
    assert record["since"] - killed_wall <= DETECT_BOUND
    assert len(later) >= 10 and set(later) == {"ok"}, tries
    nat.start_orthanc("be2")
    wait_all_up(b)


@contextmanager
def paced_store(nat, path: Path, rate: str):
    """storescu of ``path`` from the client, its link paced at ``rate``; the
    pace is lifted and a store still running killed afterwards."""
    nat.pace(rate)
    store = pacs_lab.storescu(nat, path, popen=True)
    try:
        yield store
    finally:
        nat.pace(None)
        if store.poll() is None:
            store.kill()


def finish_byte_exact(nat, store, path: Path, uid: str, holder: str, work: Path, too_short: str) -> None:
    """Let the still running store go at full pace; it must succeed, the data
    set stored by ``holder`` identical to the one sent."""
    assert store.poll() is None, too_short
    nat.pace(FAST)
    out, _ = store.communicate(timeout=300)
    assert store.returncode == 0, out
    name, digest = stored_digest(nat, uid, work)
    assert name == holder
    assert digest == dataset_digest(path)


def test_200mb_store_is_byte_exact_across_another_pacs_loss_and_return(nat, gateway, big, work):
    b = gateway.balancer
    path, uid = big
    with paced_store(nat, path, SLOW) as store:
        holder = carrier(nat)
        other = next(n for n in nat.backend_names() if n != holder)
        pacs_lab.kill_orthanc(nat, other)
        b.wait_for(lambda s: backend_health(s, lab_nat.SERVICE)[other] == "down", DETECT_BOUND + 5, f"{other} down")
        nat.start_orthanc(other)
        wait_all_up(b)
        finish_byte_exact(nat, store, path, uid, holder, work,
                          "the store ended before the other PACS came back: pace it slower")


def test_hitless_restart_kill_9_then_attach_during_a_nat_transfer(nat, gateway, big, work):
    """kill -9 leaves the program attached and the maps pinned; a new daemon
    adopts them while a 200 MB store runs (held at 1 MB/s until the new
    daemon is ready, so the transfer spans the whole restart)."""
    path, uid = big
    found = pacs_lab.find_instance(nat, uid)   # an earlier test may have stored it: start clean
    if found:
        pacs_lab.rest(nat, found[0], f"/instances/{found[1]['ID']}", method="DELETE", raw=True)
    with paced_store(nat, path, CRAWL) as store:
        holder = carrier(nat)
        gateway.balancer.kill()
        killed = time.monotonic()
        assert xdp_attached(nat)
        second = Balancer(nat, gateway.pool, work / "run", work / "xdplb-2.log")
        gateway.balancer = second.start()
        second.wait_ready(timeout=240)
        assert "adopted pinned maps" in second.log()
        assert "replaced the running xdplb program" in second.log()
        wait_all_up(second)
        print(f"restart: the new daemon was ready {time.monotonic() - killed:.1f}s after the kill -9, "
              "the store still running")
        finish_byte_exact(nat, store, path, uid, holder, work,
                          "the store ended before the new daemon was ready: make it larger")


def nat_outcomes(nat) -> dict[str, float]:
    return lab_nat.nat_outcomes(nat, METRICS)


def router_neighbour(nat) -> str:
    """The gateway's neighbour entry for the router (the replies' next hop), or ""."""
    return nat.run("lb", "ip", "neigh", "show", lab_nat.ROUTER_LAB_IP, "dev", "eth0").stdout.strip()


def test_a_forgotten_next_hop_is_resolved_again_and_the_store_survives(nat, gateway, work):
    """bpf_fib_lookup answers NO_NEIGH when the router's neighbour entry is
    gone: those replies are dropped (counted), TCP resends, and xdplb
    solicits the router again within its 1 s neighbour refresh; nothing else
    on the gateway talks to the router, so the entry comes back only through it."""
    path = work / "neigh.dcm"
    uid = make_instance(path, 24 * 1024 * 1024)
    with paced_store(nat, path, SLOW) as store:   # about 5 s
        holder = carrier(nat)
        before = nat_outcomes(nat)
        nat.run("lb", "ip", "neigh", "del", lab_nat.ROUTER_LAB_IP, "dev", "eth0")
        gone = time.monotonic()
        while "lladdr" not in router_neighbour(nat):
            assert time.monotonic() - gone < 5.0, f"the router's entry stayed unresolved: {router_neighbour(nat)!r}"
            time.sleep(0.05)
        back = time.monotonic() - gone
        print(f"router's neighbour entry back {back:.2f}s after it was deleted")
        finish_byte_exact(nat, store, path, uid, holder, work, "the store ended before the entry came back")
    after = nat_outcomes(nat)
    print(f"replies dropped for want of a neighbour: {after['no_neigh'] - before['no_neigh']:.0f}")
    assert after["no_neigh"] > before["no_neigh"]   # the replies sent while it was missing
    assert after["reply_tx"] > before["reply_tx"]


# ---- checksums of every translated frame, at the receivers ------------------------

def test_every_translated_frame_carries_correct_checksums(nat, gateway, work):
    """Capture at the PACS (requests, translated to :4242) and at the router
    (replies, translated back to VIP:104) during six 1 MB stores."""
    files = [p for p, _ in make_study(work / "sums", 6, 1024 * 1024)]
    client = lab_nat.CLIENT_HOSTS["client"]
    lb_mac, router_mac = nat.mac("lb"), nat.mac("router")
    pcaps = {host: work / f"capture-{host}.pcap" for host in [*nat.backend_names(), "router"]}
    counted = nat_outcomes(nat)
    nat.pace(SLOW)   # 5 MB/s: the capturing python keeps up
    try:
        with ExitStack() as stack:
            for host, pcap in pcaps.items():
                stack.enter_context(lab_nat.capturing(nat, host, pcap))
            results = pacs_lab.store_each(nat, files)
    finally:
        nat.pace(None)

    requests = 0   # checksums first: with a broken rewrite they say why the stores failed
    for name in nat.backend_names():
        seen, bad = judge(pcaps[name], lambda f, n=name: f[IP].src == client and f[IP].dst == nat.backend_ip(n)
                          and f[TCP].dport == lab_nat.ORTHANC_PORT)
        assert not bad, f"{name}: {len(bad)} of {seen} translated requests with a bad checksum: {bad[:5]}"
        requests += seen
    replies, bad = judge(pcaps["router"], lambda f: f[IP].src == nat.vip and f[IP].dst == client
                         and f[TCP].sport == lab_nat.SERVICE_PORT)
    assert not bad, f"{len(bad)} of {replies} translated replies with a bad checksum: {bad[:5]}"
    # 6 MB of requests is about 4,300 full-size frames; the replies are ACKs and DIMSE responses.
    assert [rc for _, rc in results] == [0] * len(files)
    assert requests >= 3500 and replies >= 100, (requests, replies)
    counted = {k: v - counted[k] for k, v in nat_outcomes(nat).items()}
    # xdplb's own counters saw at least what the receivers did.
    assert counted["request"] >= requests and counted["reply_tx"] >= replies, counted
    with PcapReader(str(pcaps["router"])) as frames:
        reply_macs = {(f[Ether].src, f[Ether].dst) for f in frames
                      if IP in f and f[IP].src == nat.vip and f[IP].dst == client}
        # The next hop bpf_fib_lookup found is the router, not the client.
    assert reply_macs == {(lb_mac, router_mac)}, reply_macs
    with PcapReader(str(pcaps["router"])) as frames:
        untranslated = [f.summary() for f in frames if IP in f and TCP in f
                        and f[TCP].sport == lab_nat.ORTHANC_PORT and f[IP].dst == client]
    assert not untranslated, f"replies left the gateway untranslated: {untranslated[:5]}"
    print(json.dumps({"translated_requests_checked": requests, "translated_replies_checked": replies}))
