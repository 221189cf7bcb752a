"""NAT over IPv6 end to end (issue 15 point 4): real TCP and UDP through
the gateway, the client's IPv6 address kept, replies translated back.

Topology and offloads: ``tools/lab_nat.py`` with its IPv6 side (clients on
fd00:10:20::/64 behind a router namespace; the PACS on fd00:10:10::/64 with
the gateway as their default route; the gateway's route to the clients via
the router's link-local fe80::1; net.ipv6.conf.all.forwarding = 1 on the
gateway; every address without DAD). xdplb runs with ``--mode auto``, which
picks generic XDP on veth: every test here ran in generic mode (asserted).

The backends are real servers listening on other ports than the VIP's:
tools/lab_backend.py's HTTP on 8080 behind VIP port 80, its UDP mirror on
5001 behind VIP port 7, and a pynetdicom storage SCP (tools/dicom_scp.py) on
4242 behind VIP port 104 (Orthanc has no IPv6). What each backend saw is
read from the backend (the HTTP server's view of its peer, the SCP's log,
the SCP's stored files, the UDP mirror's answer), never from xdplb. The
client's and the backends' kernels drop a segment or datagram with a wrong
checksum, so a byte-exact transfer proves the translated checksums (IPv6
has no header checksum; the TCP and UDP ones cover the addresses).
"""
from __future__ import annotations

import hashlib
import json
import socket
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.utils import PcapReader, checksum

import lab_backend
import lab_nat
import pacs6_lab
from lab_xdplb import Balancer, backend_health, xdp_attached
from make_dicom import dataset_digest, make_instance, make_study

pytestmark = [pytest.mark.root, pytest.mark.lab]

INTERVAL, TIMEOUT, RISE, FALL = 1.0, 0.5, 2, 2
DETECT_BOUND = FALL * INTERVAL + 2.0      # a killed SCP is marked down within this (s), 2 shared cores
RETURN_BOUND = RISE * INTERVAL + 5.0
METRICS = "127.0.0.1:9746"                 # the exporter, in the gateway's namespace
WEB, MIRROR, DICOM = (s[0] for s in lab_nat.NAT6_SERVICES)
WEB_PORT, MIRROR_PORT = 80, 7
DOWNLOAD = 64 * 1024 * 1024
UPLOAD = 32 * 1024 * 1024
SLOW = "40mbit"                            # the client's pace while the next hop is forgotten
CRAWL, FAST = "8mbit", "2gbit"             # while a restarted daemon compiles (1 MB/s), and after
RESTART_STORE = 128 * 1024 * 1024          # at 1 MB/s it outlasts the new daemon's compile
CLIENT6 = lab_nat.CLIENT_HOSTS6["client"]


@pytest.fixture(scope="module")
def nat6():
    with lab_nat.temporary_nat_lab("x6", vip6=lab_nat.VIP6, orthanc=False) as the_lab:
        the_lab.start_scps()
        yield the_lab


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("nat6")


class Holder:
    """The module's running balancer (the restart test replaces it) and its pool."""
    balancer: Balancer
    pool: Path


@pytest.fixture(scope="module")
def gateway(nat6, work):
    holder = Holder()
    holder.pool = work / "pool.toml"
    holder.pool.write_text(lab_nat.pool6_text(nat6, INTERVAL, TIMEOUT, RISE, FALL, metrics=METRICS))
    holder.balancer = Balancer(nat6, holder.pool, work / "run", work / "xdplb.log").start()
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
    return b.wait_for(lambda st: all(h == "up" for svc in (WEB, MIRROR, DICOM)
                                     for h in backend_health(st, svc).values()), timeout, "every backend up")


def nat_outcomes(nat6) -> dict[str, float]:
    return lab_nat.nat_outcomes(nat6, METRICS)


def url(path: str) -> str:
    return f"http://[{lab_nat.VIP6}]:{WEB_PORT}{path}"


def curl(nat6, *args, timeout: float = 20) -> str:
    done = nat6.run("client", "curl", "-sS", "-g", "--max-time", timeout, *args, check=False, timeout=timeout + 10)
    assert done.returncode == 0, done.stderr
    return done.stdout


# Runs in the client namespace: one UDP datagram per try, each from its own
# socket (so its own source port), with argv[3] bytes of a seeded payload;
# prints one JSON line per try: who answered, from where, and whether the
# mirrored payload came back byte for byte.
_UDP_TRIES = """
import json, random, socket, sys
vip, port, size, tries = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for i in range(tries):
    payload = random.Random(i).randbytes(size)
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.settimeout(2.0)
        s.sendto(payload, (vip, port))
        try:
            data, source = s.recvfrom(65535)
        except socket.timeout:
            print(json.dumps({"answered": False}), flush=True)
            continue
    head, _, body = data.partition(b"\\n")
    print(json.dumps({"answered": True, "from": source[0], "sport": source[1], "head": head.decode(),
                      "exact": body == payload, "length": len(body)}), flush=True)
"""


# ---- the topology, without xdplb ------------------------------------------------------

def test_the_ipv6_topology_routes_clients_through_the_router_and_backends_through_the_gateway(nat6):
    """No traffic crosses the gateway here: its only way to learn the router's
    link-local address must stay xdplb's pre-resolution (tools/lab_nat.py)."""
    assert f"via {lab_nat.ROUTER_CLIENT_IP6}" in nat6.run("client", "ip", "-6", "route", "get", lab_nat.VIP6).stdout
    for name in nat6.backend_names():
        route = nat6.run(name, "ip", "-6", "route", "get", CLIENT6).stdout
        assert f"via {nat6.host_ip6('lb')}" in route, route
        assert lab_nat.VIP6 not in nat6.run(name, "ip", "-6", "addr", "show", "dev", "lo").stdout
    assert f"via {lab_nat.ROUTER_LINK_LOCAL} dev eth0" in nat6.run("lb", "ip", "-6", "route", "get", CLIENT6).stdout
    assert nat6.run("lb", "sysctl", "-n", "net.ipv6.conf.all.forwarding").stdout.strip() == "1"
    assert nat6.run("lb", "ip", "neigh", "show", lab_nat.ROUTER_LINK_LOCAL, "dev", "eth0").stdout.strip() == ""


def peer_answers(nat6, count: int) -> list[list[str]]:
    """[backend name, the peer address it saw] for ``count`` HTTP requests to VIP:80."""
    return [curl(nat6, url("/peer")).split() for _ in range(count)]


def forget_the_router(nat6) -> None:
    """Flush the gateway's neighbour entry for the router, which the kernel's
    own forwarding in a baseline made: xdplb must find it on its own."""
    nat6.run("lb", "ip", "neigh", "flush", "to", lab_nat.ROUTER_LINK_LOCAL, "dev", "eth0", check=False)


def test_nftables_dnat6_baseline_keeps_the_clients_address(nat6):
    """The same job done by the kernel's DNAT (xdplb not attached): the
    checks below see what they should see through a known-good NAT."""
    web = [(nat6.backend_ip6(n), 8080) for n in nat6.backend_names()]
    try:
        with lab_nat.nftables_dnat(nat6, [(WEB_PORT, web, "numgen")], vip=lab_nat.VIP6) as counters:
            answers = peer_answers(nat6, 6)
            packets = counters()
    finally:
        forget_the_router(nat6)
    assert {peer for _, peer in answers} == {CLIENT6}
    assert {name for name, _ in answers} == set(nat6.backend_names())   # round robin
    assert packets[0] >= 6


def test_full_nat6_hides_the_client_so_the_address_check_can_fail(nat6):
    """Negative control for every "the backend saw the client" check here:
    with masquerade (the source becomes the gateway's), /peer says so."""
    web = [(nat6.backend_ip6(n), 8080) for n in nat6.backend_names()]
    try:
        with lab_nat.nftables_dnat(nat6, [(WEB_PORT, web, "numgen")], masquerade=True, vip=lab_nat.VIP6):
            answers = peer_answers(nat6, 3)
    finally:
        forget_the_router(nat6)
    # One of the gateway's own addresses (the kernel picks the VIP, the longer common prefix).
    assert {peer for _, peer in answers} <= {nat6.host_ip6("lb"), lab_nat.VIP6}, answers


# ---- through xdplb in NAT mode over IPv6 --------------------------------------------------

def test_http_requests_spread_over_the_backends_and_each_sees_the_clients_ipv6_address(nat6, gateway):
    before = nat_outcomes(nat6)
    answers = peer_answers(nat6, 24)
    after = nat_outcomes(nat6)
    names = {name for name, _ in answers}
    peers = {peer for _, peer in answers}
    print(f"24 HTTP requests to [{lab_nat.VIP6}]:80 answered by {sorted(names)}; peers seen: {sorted(peers)}")
    assert peers == {CLIENT6}, peers                  # the client's address, not the gateway's
    assert names == set(nat6.backend_names()), names  # 3 * (2/3)**24 ~ 2e-4 by chance
    gained = {k: after[k] - before.get(k, 0) for k in after}
    print(f"nat counters over those requests: {gained}")
    assert gained["request"] >= 24 * 3 and gained["reply_tx"] >= 24 * 3, gained   # SYN, request, ACKs / SYN-ACK, reply


def test_dicom_associations_spread_and_each_scp_logs_the_clients_ipv6_address(nat6, gateway, work):
    files = [p for p, _ in make_study(work / "spread", 18, 16 * 1024)]
    before = pacs6_lab.counts(nat6)
    results = pacs6_lab.store_each(nat6, files)
    after = pacs6_lab.counts(nat6)
    assert [rc for _, rc in results] == [0] * len(files), results
    gained = {n: after[n] - before[n] for n in after}
    print(f"18 C-STOREs to [{lab_nat.VIP6}]:104 landed {gained}")
    assert sum(gained.values()) == len(files)
    assert all(v >= 1 for v in gained.values()), gained   # 3 * (2/3)**18 ~ 2e-3 by chance
    seen = {name: set(pacs6_lab.peers(nat6, name).values()) for name in nat6.backend_names()}
    print(f"association peers each SCP logged: {seen}")
    assert all(addresses == {CLIENT6} for addresses in seen.values()), seen


def test_a_64_mb_download_and_a_32_mb_store_are_byte_exact(nat6, gateway, work):
    seed = 1504
    out = work / "download.bin"
    started = time.monotonic()
    curl(nat6, "-o", out, url(f"/random?n={DOWNLOAD}&seed={seed}"), timeout=300)
    down_s = time.monotonic() - started
    want = hashlib.sha256()
    for part in lab_backend.pattern(seed, DOWNLOAD):
        want.update(part)
    assert out.stat().st_size == DOWNLOAD
    assert hashlib.sha256(out.read_bytes()).hexdigest() == want.hexdigest(), "the download differs"
    out.unlink()

    path = work / "upload.dcm"
    uid = make_instance(path, UPLOAD)
    started = time.monotonic()
    done = pacs6_lab.storescu(nat6, path, timeout=300)
    up_s = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr
    found = pacs6_lab.find_instance(nat6, uid)
    assert found is not None, "no SCP holds the instance"
    holder, stored = found
    assert dataset_digest(stored) == dataset_digest(path), "the stored data set differs"
    assert pacs6_lab.peers(nat6, holder)[uid] == CLIENT6
    print(f"over IPv6 NAT (generic XDP): {DOWNLOAD >> 20} MB down in {down_s:.1f}s, {UPLOAD >> 20} MB stored on "
          f"{holder} in {up_s:.1f}s, both byte-exact")


def test_udp_over_ipv6_nat_request_and_reply_are_byte_exact(nat6, gateway):
    before = nat_outcomes(nat6)
    out = nat6.run("client", nat6.python6, "-c", _UDP_TRIES, lab_nat.VIP6, MIRROR_PORT, 1400, 24, timeout=120).stdout
    after = nat_outcomes(nat6)
    tries = [json.loads(line) for line in out.splitlines()]
    answered = [t for t in tries if t["answered"]]
    print(f"UDP: {len(answered)} of {len(tries)} datagrams answered, by "
          f"{sorted({t['head'].split()[0] for t in answered})}")
    assert len(tries) == 24 and len(answered) == 24, tries
    # The reply comes back from VIP:7 (translated), carrying the request byte for byte.
    assert {(t["from"], t["sport"]) for t in answered} == {(lab_nat.VIP6, MIRROR_PORT)}
    assert all(t["exact"] and t["length"] == 1400 for t in answered), tries
    assert {t["head"].split()[1] for t in answered} == {CLIENT6}    # the mirror saw the client
    assert {t["head"].split()[0] for t in answered} == set(nat6.backend_names())
    gained = {k: after[k] - before.get(k, 0) for k in after}
    assert gained["request"] >= 24 and gained["reply_tx"] >= 24, gained


def l4_checksum_ok6(ip6) -> bool:
    """The TCP or UDP checksum over the IPv6 pseudo-header (RFC 8200 8.1);
    a UDP checksum of 0 is wrong over IPv6."""
    segment = bytes(ip6.payload)[: ip6.plen]
    if ip6.nh == socket.IPPROTO_UDP and segment[6:8] == b"\0\0":
        return False
    pseudo = (socket.inet_pton(socket.AF_INET6, ip6.src) + socket.inet_pton(socket.AF_INET6, ip6.dst)
              + len(segment).to_bytes(4, "big") + bytes([0, 0, 0, ip6.nh]))
    return checksum(pseudo + segment) == 0


def judge6(pcap: Path, wanted) -> tuple[int, list[str], set]:
    """(frames ``wanted`` selects, descriptions of those with a bad checksum
    or super-packet size, their (source MAC, destination MAC) pairs)."""
    seen, bad, macs = 0, [], set()
    with PcapReader(str(pcap)) as frames:
        for frame in frames:
            if IPv6 not in frame or not (TCP in frame or UDP in frame) or not wanted(frame):
                continue
            seen += 1
            ip6 = frame[IPv6]
            macs.add((frame[Ether].src, frame[Ether].dst))
            if ip6.plen + 40 > 1500:
                bad.append(f"a {ip6.plen + 40}-byte IPv6 packet: a super-packet, not a wire frame")
            elif not l4_checksum_ok6(ip6):
                l4 = ip6[TCP] if TCP in frame else ip6[UDP]
                bad.append(f"[{ip6.src}]:{l4.sport} > [{ip6.dst}]:{l4.dport} {l4.name} plen {ip6.plen}")
    return seen, bad, macs


def test_every_translated_ipv6_frame_carries_correct_checksums(nat6, gateway, work):
    """Capture at the backends (requests, translated to :8080 and :5001) and
    at the router (replies, translated back to VIP:80 and VIP:7) during six
    1 MB downloads and twelve UDP datagrams; scapy recomputes every TCP and
    UDP checksum over the IPv6 pseudo-header."""
    pcaps = {host: work / f"capture6-{host}.pcap" for host in [*nat6.backend_names(), "router"]}
    backends6 = {nat6.backend_ip6(n) for n in nat6.backend_names()}
    with ExitStack() as stack:
        for host, pcap in pcaps.items():
            stack.enter_context(lab_nat.capturing(nat6, host, pcap))
        downloads = [nat6.run("client", "curl", "-sS", "-g", "--max-time", 10, "--limit-rate", "4M",   # 4 MB/s:
                              "-o", "/dev/null", url(f"/random?n={1 << 20}&seed={i}"),    # the capture keeps up
                              check=False, timeout=30).returncode for i in range(6)]
        udp = nat6.run("client", nat6.python6, "-c", _UDP_TRIES, lab_nat.VIP6, MIRROR_PORT, 1400, 12,
                       timeout=60).stdout

    def request(f, name):
        l4 = f[TCP] if TCP in f else f[UDP]
        return (f[IPv6].src == CLIENT6 and f[IPv6].dst == nat6.backend_ip6(name)
                and l4.dport in (8080, lab_nat.NAT6_SERVICES[1][3]))

    requests = 0   # checksums first: with a broken rewrite they say why the transfers failed
    for name in nat6.backend_names():
        seen, bad, _ = judge6(pcaps[name], lambda f, n=name: request(f, n))
        assert not bad, f"{name}: {len(bad)} of {seen} translated requests with a bad checksum: {bad[:5]}"
        requests += seen
    replies, bad, macs = judge6(pcaps["router"], lambda f: f[IPv6].src == lab_nat.VIP6 and f[IPv6].dst == CLIENT6
                                and (f[TCP] if TCP in f else f[UDP]).sport in (WEB_PORT, MIRROR_PORT))
    assert not bad, f"{len(bad)} of {replies} translated replies with a bad checksum: {bad[:5]}"
    untranslated, _, _ = judge6(pcaps["router"], lambda f: f[IPv6].src in backends6 and f[IPv6].dst == CLIENT6)
    print(json.dumps({"translated_ipv6_requests_checked": requests, "translated_ipv6_replies_checked": replies}))
    assert downloads == [0] * 6, downloads
    assert all(json.loads(line).get("exact") for line in udp.splitlines()), udp
    # 6 MB of replies is about 4,300 full-size frames; the requests are mostly ACKs.
    assert requests >= 300 and replies >= 4000, (requests, replies)
    assert untranslated == 0, "replies left the gateway untranslated"
    assert macs == {(nat6.mac("lb"), nat6.mac("router"))}, macs   # to the router: bpf_fib_lookup's next hop


def watch_tries(out: str) -> list[tuple[float, str]]:
    return [(float(line.split()[0]), line.split()[1]) for line in out.splitlines() if line.strip()]


def test_failover_when_an_ipv6_nat_backend_dies(nat6, gateway, work):
    files = [p for p, _ in make_study(work / "failover", 150, 16 * 1024)]
    watch = pacs6_lab.watch_store(nat6, 8.0, files)
    # The watcher's clock starts when its python has imported pynetdicom:
    # its first line's time is the reference.
    first = watch.stdout.readline()
    started = time.monotonic() - watch_tries(first)[0][0]
    time.sleep(1.0)
    killed_wall = time.time()
    killed_at = time.monotonic() - started
    pacs6_lab.kill_scp(nat6, "be2")
    out, _ = watch.communicate(timeout=120)
    tries = watch_tries(first + out)
    after = [(t, r) for t, r in tries if t >= killed_at]
    failures = [t for t, r in after if r == "fail"]
    failover = (max(failures) - killed_at) if failures else 0.0
    st = gateway.balancer.status()
    be2 = next(b for s in st["services"] if s["name"] == DICOM for b in s["backends"] if b["name"] == "be2")
    print(f"IPv6 NAT failover: last failed C-STORE {failover:.2f}s after the kill, be2 marked down "
          f"{be2['since'] - killed_wall:.2f}s after it (bound {DETECT_BOUND:.1f}s); "
          f"{len(failures)} failed of {len(after)} tries after the kill")
    before = [r for t, r in tries if t < killed_at - 0.2]
    assert len(before) >= 3 and set(before) == {"ok"}, tries
    assert failover <= DETECT_BOUND
    late = [r for t, r in after if t > killed_at + DETECT_BOUND]
    assert len(late) >= 10 and set(late) == {"ok"}, out
    assert be2["health"] == "down" and be2["since"] - killed_wall <= DETECT_BOUND
    nat6.start_scp("be2")
    gateway.balancer.wait_for(lambda s: backend_health(s, DICOM)["be2"] == "up", RETURN_BOUND, "be2 up again")


def router_neighbour(nat6) -> str:
    """The gateway's neighbour entry for the router's link-local address, or ""."""
    return nat6.run("lb", "ip", "neigh", "show", lab_nat.ROUTER_LINK_LOCAL, "dev", "eth0").stdout.strip()


def test_a_forgotten_ipv6_next_hop_is_solicited_again_and_the_store_survives(nat6, gateway, work):
    """bpf_fib_lookup answers NO_NEIGH once the gateway's entry for fe80::1 is
    gone: those replies are dropped (counted), TCP resends, and xdplb
    solicits the router on the attached link within its 1 s refresh. The lab's
    router never solicits the gateway, so only xdplb brings the entry back."""
    path = work / "neigh.dcm"
    uid = make_instance(path, 24 * 1024 * 1024)
    nat6.pace(SLOW)   # about 5 s
    try:
        store = pacs6_lab.storescu(nat6, path, popen=True)
        time.sleep(1.0)
        before = nat_outcomes(nat6)
        nat6.run("lb", "ip", "neigh", "del", lab_nat.ROUTER_LINK_LOCAL, "dev", "eth0")
        gone = time.monotonic()
        while "lladdr" not in router_neighbour(nat6):
            assert time.monotonic() - gone < 5.0, f"the router's entry stayed unresolved: {router_neighbour(nat6)!r}"
            time.sleep(0.05)
        back = time.monotonic() - gone
        assert store.poll() is None, "the store ended before the entry came back: make it larger"
        out, _ = store.communicate(timeout=300)
    finally:
        nat6.pace(None)
        if store.poll() is None:
            store.kill()
    after = nat_outcomes(nat6)
    print(f"fe80::1 back {back:.2f}s after it was deleted; replies dropped for want of it: "
          f"{after['no_neigh'] - before['no_neigh']:.0f}")
    assert store.returncode == 0, out
    holder, stored = pacs6_lab.find_instance(nat6, uid)
    assert dataset_digest(stored) == dataset_digest(path)
    assert after["no_neigh"] > before["no_neigh"]
    assert after["reply_tx"] > before["reply_tx"]



def test_hitless_restart_kill_9_then_attach_during_an_ipv6_nat_store(nat6, gateway, work):
    """kill -9 leaves the program attached and the maps (nat_backends6,
    nat_reverse6, nat_addrs6 with the rest) pinned; a new daemon adopts them
    and replaces the program while a 128 MB C-STORE runs over IPv6 NAT, held
    at 1 MB/s until the new daemon is ready. The stored data set is
    byte-exact and its SCP saw the client."""
    path = work / "restart.dcm"
    uid = make_instance(path, RESTART_STORE)
    nat6.pace(CRAWL)
    store = pacs6_lab.storescu(nat6, path, popen=True)
    try:
        time.sleep(1.0)
        gateway.balancer.kill()
        killed = time.monotonic()
        assert xdp_attached(nat6)
        second = Balancer(nat6, gateway.pool, work / "run", work / "xdplb-2.log")
        gateway.balancer = second.start()
        st = second.wait_ready(timeout=240)
        assert st["mode"] == "generic", st["mode"]
        assert "adopted pinned maps" in second.log()
        assert "replaced the running xdplb program" in second.log()
        wait_all_up(second)
        ready = time.monotonic() - killed
        assert store.poll() is None, "the store ended before the new daemon was ready: make it larger"
        nat6.pace(FAST)
        out, _ = store.communicate(timeout=300)
    finally:
        nat6.pace(None)
        if store.poll() is None:
            store.kill()
    print(f"restart: the new daemon was ready {ready:.1f}s after the kill -9, the IPv6 NAT store still running")
    assert store.returncode == 0, out
    holder, stored = pacs6_lab.find_instance(nat6, uid)
    assert dataset_digest(stored) == dataset_digest(path)
    assert pacs6_lab.peers(nat6, holder)[uid] == CLIENT6
    path.unlink()
    stored.unlink()
