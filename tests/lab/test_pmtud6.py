"""Path-MTU discovery over IPv6 through the balancer, end to end (issue 15).

The IPv6 twin of test_pmtud.py. The real `xdplb attach` runs on the lb
namespace's veth in generic XDP mode (what `--mode auto` picks on veth),
in the dual-stack lab. A far client sits behind two routers:

    far fd00:20::2 ─1500─ r1 ─1280─ r2 fd00:10:10::1 ─1500─ lab switch (lb, be1, be2, client)

The backends answer the far client directly (DSR), from the IPv6 VIP,
through r2 and r1. IPv6 routers never fragment: a download's full-size
segments do not fit the 1280-byte link (the IPv6 minimum), so r2 sends
ICMPv6 Packet Too Big to their source, the VIP, which r2 finds at the lb
by Neighbour Discovery. Only if the balancer sends that message on to the
backend that owns the quoted flow does the backend lower its segment size;
otherwise it resends segments that never arrive and the download stalls.

The small link is between the routers: next to the far client it would
only lower the client's MSS. The backends run with tcp_mtu_probing=0 (the
kernel default; with 1 TCP finds the black hole by itself and hides what
this tests). The same test body runs against this tree built with the
forwarding compiled out (XDPLB_PMTU_FORWARD 0 in bpf/handle_icmp.h, shared by
both families): the negative control, which must stall.
"""
from __future__ import annotations

import os
import subprocess
import time

import pytest

import lab as labtool
from lab_xdplb import running_balancer
from test_pmtud import RoutedClient, _build_without_forwarding, nstat

pytestmark = [pytest.mark.root, pytest.mark.lab]

VIP6 = "fd00:10:10::100"
FAR = "fd00:20::2"
R1_FAR, R1_LINK, R2_LINK, R2_LAB = "fd00:20::1", "fd00:30::1", "fd00:30::2", "fd00:10:10::1"
FAR_NET, LAB_NET = "fd00:20::/64", "fd00:10:10::/64"
SMALL_MTU = 1280
DOWNLOAD = 8_000_000           # bytes: thousands of full-size segments
DOWNLOAD_DEADLINE = 20         # seconds curl may take; a working path needs well under 1
WEB_PORT = 80


class RoutedClient6(RoutedClient):
    """The far client and its two routers, added to a running dual-stack lab
    (test_pmtud.RoutedClient's namespaces and helpers, IPv6 addresses and
    routes). ``remove()`` deletes them and the routes it added to the lab's hosts."""

    def _sysctl(self, ns: str, setting: str) -> None:
        subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", setting], check=True, capture_output=True)

    def _up(self, ns: str, ifname: str, address: str) -> None:
        self._ip(ns, "addr", "add", address, "dev", ifname, "nodad")   # usable at once
        super()._up(ns, ifname, None)

    def build(self) -> "RoutedClient6":
        self.remove()
        for ns in self.names.values():
            subprocess.run(["ip", "netns", "add", ns], check=True)
            self._ip(ns, "link", "set", "lo", "up")
            self._sysctl(ns, "net.ipv6.conf.all.disable_ipv6=0")
            self._sysctl(ns, "net.ipv6.conf.default.disable_ipv6=0")
        far, r1, r2, sw = self.ns("far"), self.ns("r1"), self.ns("r2"), self.lab.ns("sw")
        self._veth(far, "eth0", r1, "eth0")
        self._veth(r1, "eth1", r2, "eth1", mtu=self.link_mtu)
        self._veth(sw, self.ns("r2"), r2, "eth0")
        self._up(far, "eth0", f"{FAR}/64")
        self._up(r1, "eth0", f"{R1_FAR}/64")
        self._up(r1, "eth1", f"{R1_LINK}/64")
        self._up(r2, "eth1", f"{R2_LINK}/64")
        self._up(r2, "eth0", f"{R2_LAB}/64")
        self._ip(sw, "link", "set", self.ns("r2"), "master", "br0")
        self._ip(sw, "link", "set", self.ns("r2"), "up")
        for router in ("r1", "r2"):
            self._sysctl(self.ns(router), "net.ipv6.conf.all.forwarding=1")
        self._ip(far, "-6", "route", "add", "default", "via", R1_FAR)
        self._ip(r1, "-6", "route", "add", LAB_NET, "via", R2_LINK)
        self._ip(r2, "-6", "route", "add", FAR_NET, "via", R1_LINK)
        for host in ["lb", *self.lab.backend_names()]:
            self.lab.run(host, "ip", "-6", "route", "add", FAR_NET, "via", R2_LAB)
            self._routed_hosts.append(host)
        for backend in self.lab.backend_names():
            self.lab.run(backend, "sysctl", "-q", "-w", "net.ipv4.tcp_mtu_probing=0")  # IPv6 TCP reads it too
        return self

    def remove(self) -> None:
        for host in self._routed_hosts:
            self.lab.run(host, "ip", "-6", "route", "del", FAR_NET, check=False)
        self._routed_hosts.clear()
        present = labtool.list_namespaces()
        for ns in self.names.values():
            if ns in present:
                subprocess.run(["ip", "netns", "del", ns], check=False)
        subprocess.run(["ip", "-n", self.lab.ns("sw"), "link", "del", self.ns("r2")],
                       check=False, capture_output=True)

    def forget_path_mtus(self) -> None:
        for backend in self.lab.backend_names():
            self.lab.run(backend, "ip", "-6", "route", "flush", "cache")
            assert "mtu" not in self.path_to_far(backend), f"{backend} still holds a path MTU"

    def path_to_far(self, backend: str) -> str:
        return self.lab.run(backend, "ip", "-6", "route", "get", FAR, "from", VIP6).stdout

    def download(self, size: int, deadline: float) -> tuple[int, float, str]:
        url = f"http://[{VIP6}]:{WEB_PORT}/bytes?n={size}"
        started = time.monotonic()
        proc = self.run("far", "curl", "-g", "-s", "-o", "/dev/null", "--max-time", deadline,
                        "-w", "%{size_download}", url, check=False, timeout=deadline + 10)
        elapsed = time.monotonic() - started
        return int(proc.stdout.strip() or 0), elapsed, f"curl exit {proc.returncode}"


def pool_text(lab) -> str:
    lines = ["[xdplb]", 'metrics = ""', "", "[[service]]", 'name = "web6"', f'vip = "{VIP6}"',
             f"port = {WEB_PORT}", "  [service.health]", "  interval = 1.0", "  timeout = 0.5"]
    for name in lab.backend_names():
        lines += ["  [[service.backend]]", f'  name = "{name}"', f'  address = "{lab.backend_ip6(name)}"']
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def pmtud6_lab():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    with labtool.temporary_lab("xq", backends=2, vip6=VIP6) as the_lab:
        wan = RoutedClient6(the_lab, link_mtu=SMALL_MTU).build()
        try:
            yield the_lab, wan
        finally:
            wan.remove()


@pytest.fixture(scope="module")
def pool(pmtud6_lab, tmp_path_factory):
    the_lab, _ = pmtud6_lab
    path = tmp_path_factory.mktemp("pool") / "pool.toml"
    path.write_text(pool_text(the_lab))
    return path


def _download_through_vip(pmtud6_lab, pool, work):
    """Attach xdplb, download from the far client; (bytes, seconds, PTBs forwarded)."""
    the_lab, wan = pmtud6_lab
    wan.forget_path_mtus()
    with running_balancer(the_lab, pool, work) as b:
        assert b.status()["mode"] == "generic"
        b.wait_for(lambda st: all(be["health"] == "up" for s in st["services"] for be in s["backends"]),
                   30, "both backends up")
        hosts = (("r2", wan.ns("r2")), ("lb", the_lab.ns("lb")))
        before = {host: nstat(ns) for host, ns in hosts}
        received, seconds, how = wan.download(DOWNLOAD, DOWNLOAD_DEADLINE)
        after = {host: nstat(ns) for host, ns in hosts}
        events = b.status()["events"]

    def delta(host, counter):
        return after[host].get(counter, 0) - before[host].get(counter, 0)

    too_big_sent = delta("r2", "Icmp6OutPktTooBigs")
    forwarded = events["icmp_too_big"]   # one counter for "fragmentation needed" and Packet Too Big
    print(f"IPv6 download of {DOWNLOAD} bytes (generic XDP): received {received} in {seconds:.2f} s ({how}); "
          f"r2 sent {too_big_sent} Packet Too Big; balancer forwarded {forwarded}; "
          f"the gateway's own stack received {delta('lb', 'Icmp6InPktTooBigs')}; events {events}")
    assert too_big_sent >= 1, "nothing was too big: the test would not exercise PMTUD"
    return received, seconds, forwarded


def test_ping_to_the_ipv6_vip_reaches_the_gateway_from_behind_the_routers(pmtud6_lab, pool, tmp_path):
    the_lab, wan = pmtud6_lab
    with running_balancer(the_lab, pool, tmp_path):
        wan.run("far", "ping", "-6", "-c", "2", "-W", "2", VIP6)
        the_lab.run("client", "ping", "-6", "-c", "2", "-W", "2", "-s", "3000", VIP6)


def test_a_large_download_completes_through_a_1280_byte_link(pmtud6_lab, pool, tmp_path):
    received, seconds, forwarded = _download_through_vip(pmtud6_lab, pool, tmp_path)
    assert received == DOWNLOAD
    assert forwarded >= 1
    the_lab, wan = pmtud6_lab
    routes = [wan.path_to_far(b) for b in the_lab.backend_names()]
    assert any(f"mtu {SMALL_MTU}" in route for route in routes), f"no backend learnt the path MTU: {routes}"


def test_without_forwarding_the_same_ipv6_download_stalls(pmtud6_lab, pool, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(_build_without_forwarding(tmp_path)))
    received, seconds, forwarded = _download_through_vip(pmtud6_lab, pool, tmp_path)
    assert forwarded == 0
    assert received < DOWNLOAD
    assert seconds >= DOWNLOAD_DEADLINE - 1, "curl gave up early: not a stall"
