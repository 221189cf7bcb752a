"""The dual-stack PACS lab end to end: one PACS pool behind an IPv4 and an
IPv6 VIP (issue 15).

Every backend namespace runs Orthanc on IPv4 (DCMTK 3.6.7 listens on IPv4
only) and a pynetdicom storage SCP on IPv6 (tools/dicom_scp.py), both as AE
SYNAPSE on port 104, and holds both VIPs on lo. The real `xdplb attach`
runs on the lb namespace's veth in generic XDP mode (what `--mode auto`
picks on veth), probing both services with the DICOM check (C-ECHO), over
IPv6 for the IPv6 service. The modality is dcmtk's storescu through the
IPv4 VIP and pynetdicom's SCU (tools/dicom_scu.py) through the IPv6 VIP:
dcmtk 3.6.7 opens IPv4 sockets only. Where instances landed is read from
each Orthanc's REST API and each SCP's store directory, never from xdplb.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

import lab as labtool
import pacs6_lab
import pacs_lab
from lab_xdplb import Balancer, backend_health, xdp_attached
from make_dicom import dataset_digest, make_instance, make_study

pytestmark = [pytest.mark.root, pytest.mark.lab]

VIP6 = "fd00:10:10::100"
SERVICE4, SERVICE6 = "synapse-dicom", pacs6_lab.SERVICE6
INTERVAL, TIMEOUT, RISE, FALL = 1.0, 0.5, 2, 2
DETECT_BOUND = FALL * INTERVAL + 1.0      # the detection time the product promises
RETURN_BOUND = RISE * INTERVAL + 2.0
STARTUP_BOUND = 30.0                      # first probes of a new balancer (not a promise)
SMALL = 16 * 1024
# 200 MB (the figure); pynetdicom on both ends moves it at tens of
# MB/s here, long enough to span another host's loss being detected and
# applied (about fall x interval + a reconciler pass).
LONG_TRANSFER_BYTES = 200 * 1024 * 1024

# Run in the client namespace: one Neighbour Solicitation for argv[1] (from
# argv[2]) to its solicited-node group; prints "<MAC> <source>" of every
# Neighbour Advertisement for that target seen within a second and a half.
_SOLICIT = """
import socket, sys, time
from scapy.all import (AsyncSniffer, Ether, ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6NDOptSrcLLAddr, IPv6, conf,
                       get_if_hwaddr, in6_getnsma, in6_getnsmac, sendp)
conf.verb = 0
target, source = sys.argv[1], sys.argv[2]
mac = get_if_hwaddr("eth0")
group = in6_getnsma(socket.inet_pton(socket.AF_INET6, target))
ns = (Ether(src=mac, dst=in6_getnsmac(group)) / IPv6(src=source, dst=socket.inet_ntop(socket.AF_INET6, group), hlim=255)
      / ICMPv6ND_NS(tgt=target) / ICMPv6NDOptSrcLLAddr(lladdr=mac))
sniffer = AsyncSniffer(iface="eth0", lfilter=lambda p: ICMPv6ND_NA in p and p[ICMPv6ND_NA].tgt == target)
sniffer.start()
time.sleep(0.3)
sendp(ns, iface="eth0")
time.sleep(1.5)
for p in sniffer.stop():
    print(p[Ether].src, p[IPv6].src)
"""


@pytest.fixture(scope="module")
def dual():
    """Three backends, each with Orthanc (IPv4) and a pynetdicom SCP (IPv6)."""
    with labtool.temporary_lab("xd", pacs=True, vip6=VIP6, python6=sys.executable) as the_lab:
        yield the_lab


@pytest.fixture(scope="module")
def balancer(dual, tmp_path_factory):
    work = tmp_path_factory.mktemp("xdplb")
    pool = work / "pool.toml"
    pool.write_text(pacs6_lab.pool_text(dual, "dicom", INTERVAL, TIMEOUT, RISE, FALL))
    b = Balancer(dual, pool, work / "run", work / "xdplb.log").start()
    try:
        b.wait_ready(timeout=240)
        b.wait_for(lambda st: all(h == "up" for svc in (SERVICE4, SERVICE6)
                                  for h in backend_health(st, svc).values()), STARTUP_BOUND, "every PACS up")
        yield b
    finally:
        b.stop()
        b.release()
        print(b.log())


@pytest.fixture(scope="module")
def dicom_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicom")
    made = iter(range(1, 1000))

    def make(count: int) -> list[Path]:
        return [path for path, _uid in make_study(root / f"batch{next(made)}", count, SMALL)]
    return make


def record(st: dict, service: str, name: str) -> dict:
    svc = next(s for s in st["services"] if s["name"] == service)
    return next(b for b in svc["backends"] if b["name"] == name)


def new_flows(st: dict, service: str) -> dict:
    """{backend name: new flows, service name: new flows} from `xdplb status`."""
    svc = next(s for s in st["services"] if s["name"] == service)
    return {service: svc["new_flows"], **{b["name"]: b["new_flows"] for b in svc["backends"]}}


def delta(before: dict, after: dict) -> dict:
    return {name: after[name] - before.get(name, 0) for name in after}


def advertisers(dual, target: str) -> list[tuple[str, str]]:
    out = dual.run("client", sys.executable, "-c", _SOLICIT, target, dual.host_ip6("client"), timeout=60).stdout
    return [tuple(line.split()) for line in out.splitlines()]


def test_backends_stay_silent_to_a_neighbour_solicitation_for_the_vip_while_the_gateway_answers(dual, balancer):
    assert balancer.status()["mode"] == "generic"
    for name in dual.backend_names():
        assert VIP6 in dual.run(name, "ip", "-6", "addr", "show", "dev", "lo").stdout
        assert dual.run(name, "sysctl", "-n", "net.ipv6.conf.all.proxy_ndp").stdout.strip() == "0"
    heard = advertisers(dual, VIP6)
    print(f"Neighbour Advertisements for {VIP6}: {heard}")
    assert heard == [(dual.mac("lb"), VIP6)]

    # The check can hear a backend: one that holds the VIP on eth0 (a wrong
    # set-up) answers, and is heard.
    dual.run("be3", "ip", "addr", "add", f"{VIP6}/128", "dev", "eth0", "nodad")
    try:
        wrong = advertisers(dual, VIP6)
    finally:
        dual.run("be3", "ip", "addr", "del", f"{VIP6}/128", "dev", "eth0")
    print(f"with the VIP on be3's eth0: {wrong}")
    assert (dual.mac("be3"), VIP6) in wrong


def test_dicom_health_over_ipv6_and_ipv4_for_the_same_pacs(dual, balancer):
    st = balancer.status()
    for name in dual.backend_names():
        six = record(st, SERVICE6, name)
        assert six["health"] == "up" and six["address"] == dual.backend_ip6(name)
        assert six["reason"] == f"C-ECHO to SYNAPSE@[{dual.backend_ip6(name)}]:104 succeeded (status 0x0000)"
        assert record(st, SERVICE4, name)["reason"].endswith("succeeded (status 0x0000)")
    assert pacs6_lab.echo(dual).returncode == 0
    assert pacs_lab.echoscu(dual).returncode == 0


def test_c_stores_through_the_ipv6_vip_spread_over_three_pacs_and_ipv4_still_reaches_orthanc(
        dual, balancer, dicom_files):
    files = dicom_files(60)
    before = pacs6_lab.counts(dual)
    flows_before = new_flows(balancer.status(), SERVICE6)
    results = pacs6_lab.store_each(dual, files)
    landed = delta(before, pacs6_lab.counts(dual))
    flows = delta(flows_before, new_flows(balancer.status(), SERVICE6))
    print(f"60 C-STORE associations through [{VIP6}]:104 landed: {landed}; new flows in xdplb status: {flows}")
    assert len(results) == 60 and all(rc == 0 for _, rc in results), results
    assert sum(landed.values()) == 60 and all(n > 0 for n in landed.values()), landed
    # status (and so top and the exporter, which read it) counts the IPv6
    # service's flows as it counts IPv4 ones: one per association, on its PACS.
    assert flows == {**landed, SERVICE6: 60}, flows

    files4 = dicom_files(30)
    before4 = pacs_lab.counts(dual)
    results4 = pacs_lab.store_each(dual, files4)
    landed4 = delta(before4, pacs_lab.counts(dual))
    print(f"30 C-STORE associations through {dual.vip}:104 (dcmtk) landed in Orthanc: {landed4}")
    assert all(rc == 0 for _, rc in results4) and sum(landed4.values()) == 30, (results4, landed4)
    assert all(n > 0 for n in landed4.values()), landed4


def watch_tries(out: str) -> list[tuple[float, str]]:
    return [(float(t), result) for t, result, _file in (line.split(maxsplit=2) for line in out.splitlines())]


def test_failover_when_an_ipv6_pacs_dies(dual, balancer, dicom_files):
    files = dicom_files(150)
    watch = pacs6_lab.watch_store(dual, 8.0, files)
    # The watcher's clock starts when its python has imported pynetdicom,
    # not when it was spawned: take its first line's time as the reference.
    first = watch.stdout.readline()
    started = time.monotonic() - watch_tries(first)[0][0]
    time.sleep(1.0)
    killed_wall = time.time()
    killed_at = time.monotonic() - started     # SIGKILL goes out now
    pacs6_lab.kill_scp(dual, "be2")
    out, _ = watch.communicate(timeout=120)
    tries = watch_tries(first + out)
    after = [(t, r) for t, r in tries if t >= killed_at]
    failures = [t for t, r in after if r == "fail"]
    failover = (max(failures) - killed_at) if failures else 0.0
    be2 = record(balancer.status(), SERVICE6, "be2")
    print(f"tries around the kill ({killed_at:.2f}s): "
          + ", ".join(f"{t:.2f} {r}" for t, r in tries if killed_at - 1 <= t <= killed_at + DETECT_BOUND))
    print(f"IPv6 failover: last failed C-STORE {failover:.2f}s after the kill, be2 marked down "
          f"{be2['since'] - killed_wall:.2f}s after it (bound {DETECT_BOUND:.1f}s); "
          f"{len(failures)} failed of {len(after)} tries after the kill: {be2['reason']}")
    assert failover <= DETECT_BOUND
    late = [r for t, r in after if t > killed_at + DETECT_BOUND]
    assert len(late) >= 10 and all(r == "ok" for r in late), out
    assert be2["health"] == "down" and not be2["forwarding"]
    assert be2["since"] - killed_wall <= DETECT_BOUND
    # Its IPv4 side (Orthanc) is another service and stays up.
    assert record(balancer.status(), SERVICE4, "be2")["health"] == "up"

    pacs6_lab.start_scp(dual, "be2")
    balancer.wait_for(lambda st: backend_health(st, SERVICE6)["be2"] == "up", RETURN_BOUND, "be2 up again")
    before = pacs6_lab.counts(dual)
    results = pacs6_lab.store_each(dual, dicom_files(30))
    landed = delta(before, pacs6_lab.counts(dual))
    assert all(rc == 0 for _, rc in results) and landed["be2"] > 0 and sum(landed.values()) == 30, landed


def _carrier(dual) -> str:
    """The backend holding the client's (only) established IPv6 DICOM association."""
    match = f"( sport = :{pacs_lab.DICOM_PORT} and dst [{dual.host_ip6('client')}] )"
    holders = [name for name in dual.backend_names()
               if dual.run(name, "ss", "-Htn6", "state", "established", match).stdout.strip()]
    assert len(holders) == 1, holders
    return holders[0]


def test_a_200_mb_store_through_the_ipv6_vip_is_byte_exact_and_survives_another_pacs_leaving(
        dual, balancer, tmp_path):
    """The carrier is drained as well as the other PACS lost, so the table
    holds neither: the association reaches its PACS through its flows6 entry
    alone (Maglev alone would keep most flows where they were, and a broken
    IPv6 flow table could pass unseen)."""
    big = tmp_path / "long.dcm"
    try:
        _long_transfer(dual, balancer, big)
    finally:
        big.unlink(missing_ok=True)


def _long_transfer(dual, balancer, big: Path) -> None:
    uid = make_instance(big, LONG_TRANSFER_BYTES)
    sent_size, sent_digest = dataset_digest(big)
    started = time.monotonic()
    store = pacs6_lab.storescu(dual, big, popen=True)
    other = carrier = None
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                carrier = _carrier(dual)
                break
            except AssertionError:
                if time.monotonic() > deadline or store.poll() is not None:
                    raise
                time.sleep(0.05)
        other = next(name for name in dual.backend_names() if name != carrier)
        # The other PACS's host vanishes from the segment (no RST): marked
        # down and taken out of the table while the transfer runs. Meanwhile
        # the carrier is drained: no new flows, its Maglev slots go to the
        # third PACS.
        dual.link(other, False)
        balancer.cli("drain", SERVICE6, carrier, "-i", "eth0")
        balancer.wait_for(lambda st: record(st, SERVICE6, other)["health"] == "down"
                          and record(st, SERVICE6, other)["table_slots"] == 0
                          and record(st, SERVICE6, carrier)["table_slots"] == 0, DETECT_BOUND + 2,
                          f"{other} down and out of the table, {carrier} drained out of it")
        lost_at = time.monotonic() - started
        if store.poll() is not None:
            out, _ = store.communicate()
            assert store.returncode == 0, (f"the transfer failed {lost_at:.1f}s in, with {carrier} drained "
                                           f"and {other} out of the table: {out}")
            pytest.fail(f"the transfer ended {lost_at:.1f}s in, before {other}'s loss and {carrier}'s drain "
                        f"were applied; make LONG_TRANSFER_BYTES larger")
        out, _ = store.communicate(timeout=900)
    finally:
        if other is not None:
            dual.link(other, True)
        if carrier is not None:
            balancer.cli("undrain", SERVICE6, carrier, "-i", "eth0", check=False)
        if store.poll() is None:
            store.kill()
            store.wait()
    seconds = time.monotonic() - started
    assert store.returncode == 0, out
    found = pacs6_lab.find_instance(dual, uid)
    assert found is not None, f"no SCP holds {uid}"
    holder, stored = found
    got_size, got_digest = dataset_digest(stored)
    print(f"IPv6 long transfer: {big.stat().st_size} bytes to {carrier} in {seconds:.1f}s "
          f"({big.stat().st_size / seconds / 1e6:.1f} MB/s); {carrier} drained and {other} out of the table "
          f"{lost_at:.1f}s in; "
          f"stored data set {got_size} bytes (sent {sent_size})")
    assert holder == carrier
    assert (got_size, got_digest) == (sent_size, sent_digest)
    balancer.wait_for(lambda st: backend_health(st, SERVICE6)[other] == "up"
                      and record(st, SERVICE6, carrier)["table_slots"] > 0, RETURN_BOUND + 2,
                      f"{other} back and {carrier} undrained")


def test_ipv6_is_forwarded_while_no_controller_runs_and_a_restart_takes_over(dual, balancer, dicom_files, tmp_path):
    # Last in the module: it kills the module's balancer. IPv6 runs in a
    # program of its own behind a tail call (bpf/xdplb6.h); the kernel empties
    # the program array with its last pin or descriptor, so this shows the
    # pinned array keeping IPv6 on the wire through a kill -9 and a restart.
    balancer.kill()
    assert xdp_attached(dual)
    files = dicom_files(12)
    before = pacs6_lab.counts(dual)
    results = pacs6_lab.store_each(dual, files)
    landed = delta(before, pacs6_lab.counts(dual))
    print(f"12 C-STOREs through [{VIP6}]:104 with no controller running landed: {landed}")
    assert all(rc == 0 for _, rc in results) and sum(landed.values()) == 12, (results, landed)

    second = Balancer(dual, balancer.pool, balancer.run_dir, tmp_path / "second.log", bpffs=balancer.bpffs).start()
    try:
        st = second.wait_ready(timeout=240)
        assert "adopted pinned maps" in second.log() and "replaced the running xdplb program" in second.log()
        before = pacs6_lab.counts(dual)
        results = pacs6_lab.store_each(dual, dicom_files(12))
        assert all(rc == 0 for _, rc in results) and sum(delta(before, pacs6_lab.counts(dual)).values()) == 12
        assert second.status()["not_forwarded"]["no_ipv6_program"] == 0, st
    finally:
        assert second.stop() == 0
        print(second.log())
