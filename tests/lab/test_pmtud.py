"""Path-MTU discovery through the balancer, end to end (issue 10, point 4),
and large pings to the VIP (point 7).

The real `xdplb attach` runs on the lb namespace's veth in generic XDP mode
(what `--mode auto` picks on veth). A far client sits behind two routers:

    far 10.20.0.2 ─1500─ r1 ─1400─ r2 10.10.0.1 ─1500─ lab switch (lb, be1, be2, client)

The backends answer the far client directly (DSR), from the VIP, through r2
and r1. A download's full-size segments (DF set, as Linux TCP sends them)
do not fit the 1400-byte link, so r2 sends ICMP "fragmentation needed" to
their source: the VIP, which r2 finds at the lb. Only if the balancer sends
that message on to the backend does the backend lower its segment size;
otherwise it resends segments that never arrive and the download stalls.

The 1400-byte link is between the routers on purpose: next to the far client
it would only lower the client's MSS, and nothing would ever be too big.

The backends run with net.ipv4.tcp_mtu_probing=0 (the kernel's default):
with 1, TCP detects the black hole after a few retransmission timeouts and
shrinks its segments by itself (RFC 4821), so the download finishes late
even without the ICMP message (measured here: 8 MB in 6.7 s instead of
0.06 s, with no frag-needed forwarded), which would hide what this test is
about. Real backends cannot be assumed to run with probing on. The same test body runs against a build of this very
tree with the forwarding compiled out (XDPLB_PMTU_FORWARD 0 in
bpf/handle_icmp.h): the negative control, which must stall.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import lab as labtool
from lab_xdplb import pool_text, running_balancer

pytestmark = [pytest.mark.root, pytest.mark.lab]

REPO = Path(__file__).resolve().parents[2]
FAR = "10.20.0.2"
R1_FAR, R1_LINK, R2_LINK, R2_LAB = "10.20.0.1", "10.30.0.1", "10.30.0.2", "10.10.0.1"
FAR_NET, LINK_NET = "10.20.0.0/24", "10.30.0.0/24"
SMALL_MTU = 1400
DOWNLOAD = 8_000_000           # bytes: thousands of full-size segments
DOWNLOAD_DEADLINE = 20         # seconds curl may take; a working path needs well under 1
WEB_PORT = 80


class RoutedClient:
    """The far client and its two routers, added to a running lab; see the
    module docstring for the topology. Namespaces ``<prefix>-far``,
    ``<prefix>-r1``, ``<prefix>-r2``; ``remove()`` deletes them and the
    routes it added to the lab's hosts. The class attributes are the
    address plan (test_pmtud6.py's subclass has the IPv6 one)."""

    FAR, R1_FAR, R1_LINK, R2_LINK, R2_LAB = FAR, R1_FAR, R1_LINK, R2_LINK, R2_LAB
    FAR_NET, LAB_NET, PREFIX_BITS = FAR_NET, "10.10.0.0/24", 24
    FORWARDING = "net.ipv4.ip_forward=1"

    def vip(self) -> str:
        return self.lab.vip

    def _new_namespace(self, ns: str) -> None:
        subprocess.run(["ip", "netns", "add", ns], check=True)
        self._ip(ns, "link", "set", "lo", "up")

    def __init__(self, lab, link_mtu: int = SMALL_MTU):
        self.lab, self.link_mtu = lab, link_mtu
        self.names = {h: f"{lab.prefix}-{h}" for h in ("far", "r1", "r2")}
        self._routed_hosts: list[str] = []

    def ns(self, host: str) -> str:
        return self.names[host]

    def run(self, host: str, *cmd, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        proc = subprocess.run(["ip", "netns", "exec", self.ns(host), *map(str, cmd)],
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{host}: {' '.join(map(str, cmd))} failed: {proc.stderr.strip()}")
        return proc

    def _ip(self, ns: str, *args) -> None:
        subprocess.run(["ip", "-n", ns, *map(str, args)], check=True, capture_output=True, text=True)

    def _veth(self, ns_a: str, name_a: str, ns_b: str, name_b: str, mtu: int = 1500) -> None:
        self._ip(ns_a, "link", "add", name_a, "mtu", mtu, "type", "veth", "peer", "name", name_b,
                 "netns", ns_b, "mtu", mtu)

    def _up(self, ns: str, ifname: str, address: str | None) -> None:
        if address:
            self._ip(ns, "addr", "add", address, "dev", ifname)
        # Checksums in software, as on the lab's own hosts (generic XDP reflects the frames).
        subprocess.run(["ip", "netns", "exec", ns, "ethtool", "-K", ifname, "tx", "off"],
                       check=True, capture_output=True)
        self._ip(ns, "link", "set", ifname, "up")

    def build(self) -> "RoutedClient":
        self.remove()  # leftovers of a crashed run under the same prefix
        for ns in self.names.values():
            self._new_namespace(ns)
        far, r1, r2, sw = self.ns("far"), self.ns("r1"), self.ns("r2"), self.lab.ns("sw")
        self._veth(far, "eth0", r1, "eth0")
        self._veth(r1, "eth1", r2, "eth1", mtu=self.link_mtu)
        self._veth(sw, self.ns("r2"), r2, "eth0")
        bits = self.PREFIX_BITS
        self._up(far, "eth0", f"{self.FAR}/{bits}")
        self._up(r1, "eth0", f"{self.R1_FAR}/{bits}")
        self._up(r1, "eth1", f"{self.R1_LINK}/{bits}")
        self._up(r2, "eth1", f"{self.R2_LINK}/{bits}")
        self._up(r2, "eth0", f"{self.R2_LAB}/{bits}")
        self._ip(sw, "link", "set", self.ns("r2"), "master", "br0")
        self._ip(sw, "link", "set", self.ns("r2"), "up")
        for router in ("r1", "r2"):
            self.run(router, "sysctl", "-q", "-w", self.FORWARDING)
        self._ip(far, "route", "add", "default", "via", self.R1_FAR)
        self._ip(r1, "route", "add", self.LAB_NET, "via", self.R2_LINK)
        self._ip(r2, "route", "add", self.FAR_NET, "via", self.R1_LINK)
        # DSR replies from the backends, and the lb's own answers (pings),
        # go back to the far client through r2.
        for host in ["lb", *self.lab.backend_names()]:
            self.lab.run(host, "ip", "route", "add", self.FAR_NET, "via", self.R2_LAB)
            self._routed_hosts.append(host)
        for backend in self.lab.backend_names():
            # No RFC 4821 probing: it would hide the black hole (module docstring).
            self.lab.run(backend, "sysctl", "-q", "-w", "net.ipv4.tcp_mtu_probing=0")
            self.lab.run(backend, "sysctl", "-q", "-w", "net.ipv4.ip_no_pmtu_disc=0")
        return self

    def remove(self) -> None:
        for host in self._routed_hosts:
            self.lab.run(host, "ip", "route", "del", self.FAR_NET, check=False)
        self._routed_hosts.clear()
        present = labtool.list_namespaces()
        for ns in self.names.values():
            if ns in present:
                subprocess.run(["ip", "netns", "del", ns], check=False)
        subprocess.run(["ip", "-n", self.lab.ns("sw"), "link", "del", self.ns("r2")],
                       check=False, capture_output=True)

    def forget_path_mtus(self) -> None:
        """Drop what the backends learnt about the path, so each download starts from 1500."""
        for backend in self.lab.backend_names():
            self.lab.run(backend, "ip", "-4" if ":" not in self.FAR else "-6", "route", "flush", "cache")
            assert "mtu" not in self.path_to_far(backend), f"{backend} still holds a path MTU"

    def path_to_far(self, backend: str) -> str:
        """What the backend's routing says about replies from the VIP to the far client."""
        return self.lab.run(backend, "ip", "route", "get", self.FAR, "from", self.vip()).stdout


    def download(self, size: int, deadline: float) -> tuple[int, float, str]:
        """curl http://VIP/bytes?n=size from the far client: (bytes received, seconds, curl's exit)."""
        vip = self.vip()
        url = f"http://{f'[{vip}]' if ':' in vip else vip}:{WEB_PORT}/bytes?n={size}"
        started = time.monotonic()
        proc = self.run("far", "curl", "-g", "-s", "-o", "/dev/null", "--max-time", deadline,
                        "-w", "%{size_download}", url, check=False, timeout=deadline + 10)
        elapsed = time.monotonic() - started
        received = int(proc.stdout.strip() or 0)
        return received, elapsed, f"curl exit {proc.returncode}"


def nstat(ns: str) -> dict:
    """A namespace's absolute SNMP counters (nstat -asz: all, no history update, zeros too)."""
    out = subprocess.run(["ip", "netns", "exec", ns, "nstat", "-asz", "--json"],
                         check=True, capture_output=True, text=True).stdout
    return next(iter(json.loads(out).values()))


def _build_without_forwarding(work: Path) -> Path:
    """A copy of this tree's package and BPF sources whose program leaves
    frag-needed to the stack (today's main behaviour); returns its root,
    to put first on PYTHONPATH."""
    root = work / "no-pmtu-forward"
    shutil.copytree(REPO / "xdplb", root / "xdplb", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "bpf", root / "bpf")
    header = root / "bpf" / "handle_icmp.h"
    text = header.read_text()
    assert "#ifndef XDPLB_PMTU_FORWARD" in text, "handle_icmp.h lost its XDPLB_PMTU_FORWARD switch"
    header.write_text("#define XDPLB_PMTU_FORWARD 0\n" + text)
    return root


@pytest.fixture(scope="module")
def pmtud_lab():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    with labtool.temporary_lab("xp", backends=2) as the_lab:
        wan = RoutedClient(the_lab).build()
        try:
            yield the_lab, wan
        finally:
            wan.remove()


@pytest.fixture(scope="module")
def pool(pmtud_lab, tmp_path_factory):
    the_lab, _ = pmtud_lab
    path = tmp_path_factory.mktemp("pool") / "pool.toml"
    path.write_text(pool_text(the_lab, 1.0, 0.5, 2, 2))
    return path


def _download_through_vip(pmtud_lab, pool, work):
    """The test body: attach xdplb, download from the far client, return
    (bytes received, seconds, frag-needed messages the balancer forwarded)."""
    the_lab, wan = pmtud_lab
    wan.forget_path_mtus()
    with running_balancer(the_lab, pool, work) as b:
        assert b.status()["mode"] == "generic"
        before = {host: nstat(ns) for host, ns in (("r2", wan.ns("r2")), ("lb", the_lab.ns("lb")))}
        received, seconds, how = wan.download(DOWNLOAD, DOWNLOAD_DEADLINE)
        after = {host: nstat(ns) for host, ns in (("r2", wan.ns("r2")), ("lb", the_lab.ns("lb")))}
        events = b.status()["events"]

    def delta(host, counter):
        return after[host][counter] - before[host][counter]

    too_big_sent, fragmented = delta("r2", "IcmpOutDestUnreachs"), delta("r2", "IpFragCreates")
    print(f"download of {DOWNLOAD} bytes (generic XDP): received {received} in {seconds:.2f} s ({how}); "
          f"r2 sent {too_big_sent} ICMP unreachables, fragmented {fragmented}; "
          f"balancer forwarded {events['icmp_too_big']} frag-needed, "
          f"the gateway's own stack received {delta('lb', 'IcmpInDestUnreachs')}")
    # The routers never fragment: the backend's segments carry DF, so a
    # too-big segment is answered with frag-needed and dropped.
    assert fragmented == 0
    assert too_big_sent >= 1, "nothing was too big: the test would not exercise PMTUD"
    return received, seconds, events["icmp_too_big"]


def test_ping_and_large_ping_to_the_vip_reach_the_gateway(pmtud_lab, pool, tmp_path):
    """ICMP echo (also fragmented: 3000 bytes) to the VIP passes to the
    gateway's stack, from the segment and from behind the routers."""
    the_lab, wan = pmtud_lab
    with running_balancer(the_lab, pool, tmp_path) as b:
        the_lab.run("client", "ping", "-c", "2", "-W", "2", "-s", "3000", the_lab.vip)
        wan.run("far", "ping", "-c", "2", "-W", "2", the_lab.vip)
        # DF clear, so r1 may fragment again for the 1400-byte link.
        wan.run("far", "ping", "-c", "2", "-W", "2", "-M", "dont", "-s", "3000", the_lab.vip)
        st = b.status()
    assert st["not_forwarded"]["fragment"] == 0


def test_large_download_completes_through_a_smaller_link(pmtud_lab, pool, tmp_path):
    received, seconds, forwarded = _download_through_vip(pmtud_lab, pool, tmp_path)
    assert received == DOWNLOAD
    assert forwarded >= 1
    the_lab, wan = pmtud_lab
    routes = [wan.path_to_far(b) for b in the_lab.backend_names()]
    assert any(f"mtu {SMALL_MTU}" in route for route in routes), f"no backend learnt the path MTU: {routes}"


def test_without_forwarding_the_same_download_stalls(pmtud_lab, pool, tmp_path, monkeypatch):
    """Negative control: the same body against this tree built with
    XDPLB_PMTU_FORWARD 0, i.e. frag-needed goes to the gateway's stack.
    The daemon (started with os.environ) imports that copy first."""
    monkeypatch.setenv("PYTHONPATH", str(_build_without_forwarding(tmp_path)))
    received, seconds, forwarded = _download_through_vip(pmtud_lab, pool, tmp_path)
    assert forwarded == 0
    assert received < DOWNLOAD
    assert seconds >= DOWNLOAD_DEADLINE - 1, "curl gave up early: not a stall"
