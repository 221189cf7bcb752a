"""xdplb's netlink layer over IPv6, in real network namespaces.

A gateway namespace and a backend namespace joined by a veth pair, IPv4 and
IPv6 on both. xdplb.netlink.Netlink runs inside the gateway namespace (one
`ip netns exec` per step, as the daemon would run there); addresses and
neighbours are read back with iproute2, never through the code under test.
No XDP program is attached and no TCP is carried.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.lab]

REPO = Path(__file__).resolve().parents[2]
PROVISION = REPO / "tools" / "provision" / "dsr-backend.sh"
XDPLB = str(Path(sys.executable).with_name("xdplb"))
NET6, NET4 = "fd00:77::", "10.77.0."
GW6, BE6 = f"{NET6}1", f"{NET6}8001"
GW4, BE4 = f"{NET4}1", f"{NET4}2"
VIP6, VIP4 = f"{NET6}100", f"{NET4}100"
BE_MAC = "02:00:00:77:00:02"
RESOLVE_BOUND = 3.0      # seconds for a neighbour to resolve on an idle veth (it takes milliseconds)

# Runs in the gateway namespace: one Netlink call, its result as JSON.
_CALL = """
import ipaddress, json, sys
from xdplb.netlink import Netlink, NetlinkProblem
nl = Netlink()
method, args = sys.argv[1], json.loads(sys.argv[2])
try:
    index = nl.link("eth0").index
    out = getattr(nl, method)(index, *args) if method != "solicit" else nl.solicit(*args, index)
    if isinstance(out, dict):
        out = {str(k): v.hex(":") for k, v in out.items()}
    elif isinstance(out, set):
        out = sorted(str(a) for a in out)
    elif isinstance(out, bytes):
        out = out.hex(":")
    print(json.dumps({"ok": out}))
except NetlinkProblem as exc:
    print(json.dumps({"problem": str(exc)}))
finally:
    nl.close()
"""


class Pair:
    """gw (eth0) <-> be (eth0), both families, no DAD on the hosts' own addresses."""

    def __init__(self, tag: str):
        self.gw, self.be = f"xn6g{tag}", f"xn6b{tag}"

    def ip(self, ns: str, *args, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "-n", ns, *map(str, args)], capture_output=True, text=True, check=check)

    def run(self, ns: str, *cmd, check: bool = True, env=None) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", ns, *map(str, cmd)], capture_output=True, text=True,
                              check=check, env=env)

    def up(self) -> "Pair":
        self.down()
        for ns in (self.gw, self.be):
            subprocess.run(["ip", "netns", "add", ns], check=True)
            self.ip(ns, "link", "set", "lo", "up")
            self.run(ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=0")
            self.run(ns, "sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=0")
        self.ip(self.gw, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", self.be)
        self.ip(self.be, "link", "set", "eth0", "address", BE_MAC)
        for ns, a6, a4 in ((self.gw, GW6, GW4), (self.be, BE6, BE4)):
            self.ip(ns, "addr", "add", f"{a6}/64", "dev", "eth0", "nodad")
            self.ip(ns, "addr", "add", f"{a4}/24", "dev", "eth0")
            self.ip(ns, "link", "set", "eth0", "up")
        return self

    def down(self) -> None:
        for ns in (self.gw, self.be):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def call(self, method: str, *args):
        out = self.run(self.gw, sys.executable, "-c", _CALL, method, json.dumps(list(args))).stdout
        return json.loads(out)

    def addresses(self, ns: str, ifname: str = "eth0") -> dict:
        """address -> iproute2's record of it."""
        link = json.loads(self.ip(ns, "-j", "addr", "show", "dev", ifname).stdout)[0]
        return {a["local"]: a for a in link.get("addr_info", [])}

    def neighbour(self, ns: str, address: str) -> dict | None:
        rows = json.loads(self.ip(ns, "-j", "neigh", "show", "to", address, "dev", "eth0").stdout or "[]")
        return rows[0] if rows else None


@pytest.fixture
def pair():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    p = Pair(str(os.getpid() % 100000)).up()
    try:
        yield p
    finally:
        p.down()


def test_an_ipv6_vip_is_a_tagged_128_without_dad_that_the_gateway_never_uses_as_a_source(pair):
    assert pair.call("add_vip", VIP6) == {"ok": True}
    record = pair.addresses(pair.gw)[VIP6]
    print(f"the VIP as iproute2 shows it: {record}")
    assert record["prefixlen"] == 128
    assert record.get("nodad") is True and "tentative" not in record   # usable at once
    assert record["preferred_life_time"] == 0 and record.get("deprecated") is True
    assert record["valid_life_time"] == 4294967295                      # forever
    assert pair.call("vips") == {"ok": [VIP6]}     # tagged as ours (iproute2 6.1 cannot show the tag)
    assert pair.call("has_address", VIP6) == {"ok": True}
    # Spelled another way, it is the same address: no second add.
    assert pair.call("add_vip", "FD00:77:0::0100") == {"ok": False}


def test_vips_lists_our_addresses_of_both_families_and_detach_removes_exactly_those(pair, tmp_path):
    hand6, hand4 = f"{NET6}200", f"{NET4}200"
    pair.ip(pair.gw, "addr", "add", f"{hand6}/128", "dev", "eth0", "nodad")
    pair.ip(pair.gw, "addr", "add", f"{hand4}/32", "dev", "eth0")
    assert pair.call("add_vip", hand6) == {"ok": False}      # an operator's address stays theirs
    assert pair.call("add_vip", VIP6) == {"ok": True}
    assert pair.call("add_vip", VIP4) == {"ok": True}
    assert pair.call("vips") == {"ok": sorted([VIP4, VIP6])}

    env = dict(os.environ, XDPLB_RUN_DIR=str(tmp_path / "run"))
    detach = pair.run(pair.gw, XDPLB, "detach", "eth0", check=False, env=env)
    print(detach.stdout + detach.stderr)
    assert detach.returncode == 0, detach.stderr
    assert f"VIP {VIP6}" in detach.stdout and f"VIP {VIP4}" in detach.stdout
    left = pair.addresses(pair.gw)
    assert VIP6 not in left and VIP4 not in left
    assert hand6 in left and hand4 in left and GW6 in left and GW4 in left
    assert pair.call("vips") == {"ok": []}


def _resolve(pair, address: str) -> tuple[dict, float]:
    """Solicit `address` from the gateway until one dump of its neighbours holds it."""
    started = time.monotonic()
    while True:
        found = pair.call("neighbour_macs")["ok"]
        if address in found or time.monotonic() - started > RESOLVE_BOUND:
            return found, time.monotonic() - started
        pair.call("solicit", address)
        time.sleep(0.1)


def test_backends_are_resolved_over_ipv6_and_ipv4_in_one_dump(pair):
    for address in (BE6, BE4):
        found, seconds = _resolve(pair, address)
        print(f"{address} resolved in {seconds:.2f}s: {found}")
        assert found.get(address) == BE_MAC
    found = pair.call("neighbour_macs")["ok"]
    assert found.keys() >= {BE6, BE4}
    assert not [a for a in found if a.startswith("ff")], found    # IPv6 multicast groups are no backends
    assert pair.call("neighbour_mac", BE6) == {"ok": BE_MAC}
    assert pair.call("neighbour_mac", "fd00:77::0:8001") == {"ok": BE_MAC}   # any spelling
    assert pair.call("neighbour_mac", f"{NET6}9999") == {"ok": None}
    # The kernel's own table agrees: reached by a Neighbour Solicitation.
    assert pair.neighbour(pair.gw, BE6)["lladdr"] == BE_MAC


def test_a_backend_holding_the_vip_on_lo_stays_reachable_when_the_vip_is_the_closer_source(pair):
    """The VIP (::8000) shares 127 bits with the backend (::8001), the
    gateway's own address (::1) only 112, so RFC 6724's longest-prefix rule
    would make the VIP the source of the gateway's own traffic to the
    backend: its health probes. The backend holds the VIP on lo and would
    answer them to itself. A deprecated VIP is never chosen as a source
    while another address is there."""
    vip = f"{NET6}8000"
    provision = pair.run(pair.be, "bash", PROVISION, vip, check=False)
    assert provision.returncode == 0, provision.stderr
    assert vip in pair.addresses(pair.be, "lo")
    assert pair.call("add_vip", vip) == {"ok": True}
    found, seconds = _resolve(pair, BE6)
    print(f"resolved in {seconds:.2f}s: {found}")
    assert found.get(BE6) == BE_MAC
    route = pair.ip(pair.gw, "-6", "route", "get", BE6).stdout
    print(f"gateway's route to the backend: {route.strip()}")
    server = subprocess.Popen(["ip", "netns", "exec", pair.be, sys.executable, "-m", "http.server",
                               "--bind", BE6, str(WEB_PORT)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        probe = _tcp_probe(pair, BE6, WEB_PORT, server)
    finally:
        server.terminate()
        server.wait(10)
    print(f"xdplb's tcp probe from the gateway: {probe}")
    assert probe["ok"], probe
    assert f"src {GW6}" in route


WEB_PORT = 8080
_PROBE = """
import asyncio, json, sys
from xdplb.probes import tcp_probe
r = asyncio.run(tcp_probe(sys.argv[1], int(sys.argv[2]), 2.0))
print(json.dumps({"ok": r.ok, "reason": r.reason}))
"""


def _tcp_probe(pair, address: str, port: int, server: subprocess.Popen) -> dict:
    """xdplb's own tcp check from the gateway, once the server listens."""
    deadline = time.monotonic() + 10
    while "LISTEN" not in pair.run(pair.be, "ss", "-Hltn", f"sport = :{port}").stdout:
        assert server.poll() is None and time.monotonic() < deadline, "the backend's server did not start"
        time.sleep(0.05)
    return json.loads(pair.run(pair.gw, sys.executable, "-c", _PROBE, address, port).stdout)


def test_an_ipv6_vip_on_an_interface_without_ipv6_is_one_sentence(pair):
    pair.run(pair.gw, "sysctl", "-q", "-w", "net.ipv6.conf.eth0.disable_ipv6=1")
    out = pair.call("add_vip", VIP6)
    assert out == {"problem": f"cannot add VIP {VIP6}: IPv6 is disabled on the interface "
                              f"(net.ipv6.conf.<interface>.disable_ipv6=1)"}
    assert VIP6 not in pair.addresses(pair.gw)


ROUTER_LL = "fe80::77"          # a router's link-local address, as IPv6 routes usually name their next hop
CLIENTS6, CLIENTS4 = "fd00:99::/64", "10.99.0.0/24"


def test_an_ipv6_router_on_a_link_local_address_is_listed_and_resolved_for_nat(pair):
    """IPv6 NAT replies to clients behind a router leave through bpf_fib_lookup,
    which needs the router's neighbour entry: route_gateways lists the
    IPv6 next hops out of the link (only for the versions asked), and
    solicit reaches a link-local one on that link (it needs the link's
    index as its scope)."""
    pair.ip(pair.be, "addr", "add", f"{ROUTER_LL}/64", "dev", "eth0", "nodad")
    # A second link whose fe80::/64 route is preferred (metric 1), so only the scope picks eth0.
    pair.ip(pair.gw, "link", "add", "other0", "type", "veth", "peer", "name", "other1")
    pair.ip(pair.gw, "addr", "add", "fe80::2/64", "dev", "other0", "nodad")
    pair.ip(pair.gw, "link", "set", "other1", "up")
    pair.ip(pair.gw, "link", "set", "other0", "up")
    pair.ip(pair.gw, "-6", "route", "add", "fe80::/64", "dev", "other0", "metric", 1)
    pair.ip(pair.gw, "-6", "route", "add", CLIENTS6, "via", ROUTER_LL, "dev", "eth0")
    pair.ip(pair.gw, "route", "add", CLIENTS4, "via", BE4, "dev", "eth0")
    assert pair.call("route_gateways", [6]) == {"ok": [ROUTER_LL]}
    assert pair.call("route_gateways", [4]) == {"ok": [BE4]}
    assert pair.call("route_gateways", [4, 6]) == {"ok": sorted([BE4, ROUTER_LL])}
    assert pair.neighbour(pair.gw, ROUTER_LL) is None
    found, seconds = _resolve(pair, ROUTER_LL)
    print(f"{ROUTER_LL} resolved in {seconds:.2f}s")
    assert found.get(ROUTER_LL) == BE_MAC
    assert pair.neighbour(pair.gw, ROUTER_LL)["lladdr"] == BE_MAC
