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
    """test_pmtud.RoutedClient with the IPv6 address plan, in a dual-stack lab."""

    FAR, R1_FAR, R1_LINK, R2_LINK, R2_LAB = FAR, R1_FAR, R1_LINK, R2_LINK, R2_LAB
    FAR_NET, LAB_NET, PREFIX_BITS = FAR_NET, LAB_NET, 64
    FORWARDING = "net.ipv6.conf.all.forwarding=1"

    def vip(self) -> str:
        return self.lab.vip6

    def _new_namespace(self, ns: str) -> None:
        super()._new_namespace(ns)
        for key in ("all", "default"):
            self.run_ns(ns, "sysctl", "-q", "-w", f"net.ipv6.conf.{key}.disable_ipv6=0")

    def run_ns(self, ns: str, *cmd) -> None:
        subprocess.run(["ip", "netns", "exec", ns, *map(str, cmd)], check=True, capture_output=True)

    def _up(self, ns: str, ifname: str, address: str) -> None:
        self._ip(ns, "addr", "add", address, "dev", ifname, "nodad")   # usable at once
        super()._up(ns, ifname, None)


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
