"""The several-balancers recipes, with the real daemons.

- The shipped BIRD and keepalived configurations pass their own config
  checks (`bird -p -c`, `keepalived -t -f`; no root).
- VIP announcement routes (root): xdplb's netlink layer (pyroute2) writes
  them into a kernel table inside a private network namespace, and a real
  BIRD 2 running examples/bird-balancer.conf there learns them, as its BGP
  session would announce them.
- The ready file (root): a real keepalived running
  examples/keepalived-pair.conf in a namespace takes the VIP only while the
  file xdplb writes says ready.
No XDP program is involved (the lab tests of issue 12 run the whole nodes).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "bird-balancer.conf"
ROUTER = ROOT / "examples" / "bird-router.conf"
KEEPALIVED = ROOT / "examples" / "keepalived-pair.conf"
TABLE = 100
VIP1, VIP2 = "10.10.0.100", "10.10.0.101"

root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def sh(*args, check=True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True, **kwargs)


def test_the_bird_recipe_passes_birds_config_check():
    result = subprocess.run(["bird", "-p", "-c", str(EXAMPLE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_router_recipe_passes_birds_config_check(tmp_path):
    result = subprocess.run(["bird", "-p", "-c", str(ROUTER)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = ROUTER.read_text()
    assert "\terror wait time 1, 5;" in text and "\tgraceful restart off;" in text
    bad = tmp_path / "bad.conf"
    bad.write_text(text.replace("merge paths yes", "merge path yes"))
    assert subprocess.run(["bird", "-p", "-c", str(bad)], capture_output=True).returncode != 0


def test_the_ha_lab_renders_both_recipes_into_configs_bird_accepts(tmp_path):
    """The namespace lab's router and node configs are the shipped recipes with its addresses."""
    sys.path.insert(0, str(ROOT / "tools"))
    import ha_lab

    lab = ha_lab.HaLab(prefix="hr", backends=3, vip=VIP1, nodes=3, routing="bgp", state_dir=str(tmp_path))
    for host in ("rt", "lb1", "lb3"):
        conf = tmp_path / f"{host}.conf"
        conf.write_text(lab.bird_config(host))
        result = subprocess.run(["bird", "-p", "-c", str(conf)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
    router = (tmp_path / "rt.conf").read_text()
    assert "error wait time 1, 5;" in router and "merge paths yes" in router
    for node in ("lb1", "lb2", "lb3"):
        assert f"protocol bgp {node} from balancers {{\n\tneighbor {lab.host_ip(node)} as {lab.node_as(node)};" \
            in router
    assert f"local {lab.router_ip()} as {ha_lab.ROUTER_AS};" in router
    assert f"neighbor {lab.router_ip()} as {ha_lab.ROUTER_AS};" in (tmp_path / "lb3.conf").read_text()


def test_the_keepalived_recipe_passes_keepaliveds_config_check(tmp_path):
    result = subprocess.run(["keepalived", "-t", "-f", str(KEEPALIVED)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # The check is a real one: a misspelt keyword fails it.
    bad = tmp_path / "bad.conf"
    bad.write_text(KEEPALIVED.read_text().replace("weight 0", "wieght 0"))
    assert subprocess.run(["keepalived", "-t", "-f", str(bad)], capture_output=True).returncode != 0


@pytest.fixture
def netns():
    name = f"xan{os.getpid()}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
        # An eth0 for BFD and the BGP neighbour of the example (nobody answers on it).
        sh("ip", "netns", "exec", name, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
        sh("ip", "netns", "exec", name, "ip", "address", "add", "10.20.0.11/24", "dev", "eth0")
        for dev in ("eth0", "eth0p"):
            sh("ip", "netns", "exec", name, "ip", "link", "set", dev, "up")
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)


def nl(ns: str, *calls) -> object:
    """Run xdplb.netlink.Netlink calls inside the namespace: [(method, args...)] -> last result."""
    code = (
        "import json, sys\n"
        "from xdplb.netlink import Netlink\n"
        "n = Netlink()\n"
        "out = None\n"
        "for method, *args in json.loads(sys.argv[1]):\n"
        "    out = getattr(n, method)(*args)\n"
        "print(json.dumps(sorted(map(str, out)) if isinstance(out, set) else out))\n"
    )
    r = sh("ip", "netns", "exec", ns, sys.executable, "-c", code, json.dumps(calls), cwd=ROOT)
    return json.loads(r.stdout)


def kernel_routes(ns: str) -> list[str]:
    r = sh("ip", "netns", "exec", ns, "ip", "-4", "route", "show", "table", str(TABLE))
    return [line.strip() for line in r.stdout.splitlines() if line.strip()]


@root
def test_announce_and_withdraw_touch_only_xdplbs_routes(netns):
    sh("ip", "netns", "exec", netns, "ip", "route", "add", "blackhole", f"{VIP2}/32", "table", str(TABLE),
       "proto", "static")                      # an operator's route in the same table
    assert nl(netns, ["announce", TABLE, VIP1], ["announce", TABLE, VIP1], ["announced", TABLE]) == [VIP1]
    routes = kernel_routes(netns)
    assert f"blackhole {VIP1} proto 120" in routes
    # Withdrawing the operator's address removes nothing of theirs; withdrawing twice is no error.
    assert nl(netns, ["withdraw", TABLE, VIP2], ["withdraw", TABLE, VIP1], ["withdraw", TABLE, VIP1],
              ["announced", TABLE]) == []
    assert kernel_routes(netns) == [f"blackhole {VIP2} proto static"]


def birdc(sock: Path, *command: str) -> str:
    return sh("birdc", "-s", str(sock), *command).stdout


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


@root
def test_bird_learns_the_vip_routes_from_the_example_config(netns, tmp_path):
    sock, pid = tmp_path / "bird.ctl", tmp_path / "bird.pid"
    sh("ip", "netns", "exec", netns, "bird", "-c", str(EXAMPLE), "-s", str(sock), "-P", str(pid))
    try:
        wait_for(lambda: sock.exists(), 5, "BIRD's control socket")
        table = ("show", "route", "table", "xdplb_vips", "all")
        wait_for(lambda: "xdplb_routes" in birdc(sock, "show", "protocols"), 5, "the kernel protocol")
        # An operator's route in the table (proto static) is learned too, but the
        # example's export filter passes only xdplb's (krt_source 120).
        sh("ip", "netns", "exec", netns, "ip", "route", "add", "blackhole", "10.10.0.199/32", "table",
           str(TABLE), "proto", "static")
        started = time.monotonic()
        nl(netns, ["announce", TABLE, VIP1], ["announce", TABLE, VIP2])
        shown = wait_for(lambda: (lambda out: out if VIP1 in out and VIP2 in out else None)(birdc(sock, *table)),
                         10, "BIRD to learn both VIPs")
        learned = time.monotonic() - started
        assert "Kernel.source: 120" in shown or "krt_source: 120" in shown, shown
        assert "10.10.0.199" in shown
        exported = birdc(sock, "show", "route", "table", "xdplb_vips", "filter", "xdplb_vips_only")
        assert VIP1 in exported and VIP2 in exported and "10.10.0.199" not in exported
        started = time.monotonic()
        nl(netns, ["withdraw", TABLE, VIP1])
        wait_for(lambda: VIP1 not in birdc(sock, *table), 10, "BIRD to drop the withdrawn VIP")
        dropped = time.monotonic() - started
        assert VIP2 in birdc(sock, *table)
        print(f"BIRD learned the routes in {learned:.2f}s and dropped the withdrawn one in {dropped:.2f}s")
        # Under the scan time (5 s) of the example: BIRD hears netlink notifications at once.
        assert learned < 4.5 and dropped < 4.5
    finally:
        if pid.exists():
            subprocess.run(["kill", pid.read_text().strip()], check=False)


def has_vip(ns: str) -> bool:
    out = sh("ip", "netns", "exec", ns, "ip", "-4", "-o", "address", "show", "dev", "eth0").stdout
    return f" {VIP1}/32 " in out


@root
def test_keepalived_holds_the_vip_only_while_the_ready_file_says_ready(netns, tmp_path):
    from xdplb.announce import write_ready_file

    ready = tmp_path / "eth0.ready"
    write_ready_file(str(ready), 1)             # xdplb starting: not ready
    conf = tmp_path / "keepalived.conf"
    conf.write_text(KEEPALIVED.read_text().replace("/run/xdplb/eth0.ready", str(ready)))
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, "keepalived", "-n", "-l", "-P", "-f", str(conf),
         "-p", str(tmp_path / "k.pid"), "-r", str(tmp_path / "v.pid")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(5)                           # more than 3 adverts: a ready node would be master by now
        assert not has_vip(netns), "keepalived took the VIP while xdplb was not ready"
        write_ready_file(str(ready), 0)         # xdplb ready: every VIP would be announced
        started = time.monotonic()
        wait_for(lambda: has_vip(netns), 10, "keepalived to take the VIP")
        took = time.monotonic() - started
        write_ready_file(str(ready), 1)         # drain-node, a stop, or no healthy backend
        started = time.monotonic()
        wait_for(lambda: not has_vip(netns), 10, "keepalived to give the VIP up")
        gave = time.monotonic() - started
        print(f"keepalived took the VIP {took:.1f}s after ready and gave it up {gave:.1f}s after not ready")
    finally:
        proc.terminate()
        try:
            output = proc.communicate(timeout=10)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            output = proc.communicate()[0]
    assert "FAULT" in output, output
