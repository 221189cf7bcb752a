"""Root tests of the namespace lab itself (tools/lab.py and friends).

They build real namespaces, veths and a bridge and carry real TCP/UDP, but
only between namespaces the tests created.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

import lab as labtool  # tools/ is put on sys.path by tests/lab/conftest.py

pytestmark = [pytest.mark.root, pytest.mark.lab]

LAB_PY = Path(labtool.__file__)
PY = "/usr/bin/python3"

# Small client programs run inside a namespace with /usr/bin/python3 -c.
HTTP_GET = """
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
    body = r.read()
    print(r.status, r.headers["X-Backend"], len(body), body[:40].decode().strip())
"""
SINK = """
import socket, sys
s = socket.create_connection((sys.argv[1], 9000), timeout=5)
s.sendall(b"z" * int(sys.argv[2])); s.shutdown(socket.SHUT_WR)
print(s.makefile().readline().strip())
"""
HELLO = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
print(s.makefile().readline().strip())
"""
UDP = """
import socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)
u.sendto(b"q" * int(sys.argv[2]), (sys.argv[1], 5000))
print(u.recvfrom(100)[0].decode().strip())
"""
CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    print("connected")
except ConnectionRefusedError:
    print("refused")
except (TimeoutError, OSError) as exc:
    print("timeout" if "timed out" in str(exc) else f"error {exc}")
"""


def py(lab, host, code, *args) -> str:
    """Run a Python snippet in ``host``'s namespace; return stripped stdout."""
    return lab.run(host, PY, "-c", code, *args).stdout.strip()


def cli(*args, check=True) -> subprocess.CompletedProcess:
    """Run tools/lab.py as a command."""
    proc = subprocess.run([PY, str(LAB_PY), *map(str, args)],
                          capture_output=True, text=True, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def wait_for(pred, timeout=5.0) -> bool:
    """Poll ``pred`` until true or timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


# ---- up builds everything -----------------------------------------------------

def test_up_creates_namespaces_addresses_and_servers(lab):
    st = lab.status()
    p = lab.prefix
    assert st["up"]
    assert st["namespaces"] == [f"{p}-sw", f"{p}-client", f"{p}-lb",
                                f"{p}-be1", f"{p}-be2", f"{p}-be3"]
    assert st["addresses"]["client"] == ["eth0 10.10.0.2/24"]
    assert st["addresses"]["lb"] == ["eth0 10.10.0.10/24"]
    for i, name in enumerate(lab.backend_names(), start=1):
        assert lab.backend_ip(i) == f"10.10.0.{10 + i}"
        assert sorted(st["addresses"][name]) == sorted(
            [f"eth0 10.10.0.{10 + i}/24", "lo 10.10.0.100/32"])
        assert st["servers"][name]["alive"], name
    assert st["addresses"]["sw"] == []


def test_hosts_have_fixed_mac_no_ipv6_and_tx_offload_off(lab):
    for host in lab.hosts():
        link = json.loads(lab.run(host, "ip", "-j", "link", "show", "eth0").stdout)[0]
        assert link["address"] == lab.mac(host)
        assert "UP" in link["flags"]
        v6 = lab.run(host, "sysctl", "-n", "net.ipv6.conf.eth0.disable_ipv6").stdout
        assert v6.strip() == "1", host
        offload = lab.run(host, "ethtool", "-k", "eth0").stdout
        tx = "off" if host != "lb" else "on"
        assert f"tx-checksumming: {tx}" in offload, host
    assert lab.mac("be2") == "02:00:0a:0a:00:0c"


def test_switch_is_a_plain_bridge_with_every_host_port(lab):
    br = json.loads(lab.run("sw", "ip", "-j", "-d", "link", "show", "br0").stdout)[0]
    info = br["linkinfo"]["info_data"]
    assert info["stp_state"] == 0 and info["forward_delay"] == 0
    assert "UP" in br["flags"]
    assert lab.run("sw", "ip", "-4", "-o", "addr", "show", "br0").stdout.strip() == ""
    ports = json.loads(lab.run("sw", "ip", "-j", "link", "show", "master", "br0").stdout)
    assert sorted(p["ifname"] for p in ports) == sorted(lab.port(h) for h in lab.hosts())
    assert all("UP" in p["flags"] for p in ports)


def test_backends_are_dsr_provisioned(lab):
    for name in lab.backend_names():
        for key, want in (("arp_ignore", "1"), ("arp_announce", "2")):
            for dev in ("all", "default"):
                got = lab.run(name, "sysctl", "-n", f"net.ipv4.conf.{dev}.{key}").stdout
                assert got.strip() == want, (name, dev, key)
    assert lab.run("client", "sysctl", "-n", "net.ipv4.conf.all.arp_ignore").stdout.strip() == "0"


# ---- traffic --------------------------------------------------------------------

def test_client_reaches_each_backend_over_http(lab):
    for name in lab.backend_names():
        ip = lab.backend_ip(name)
        assert py(lab, "client", HTTP_GET, f"http://{ip}/any/path") == f"200 {name} 4 {name}"
        assert py(lab, "client", HTTP_GET, f"http://{ip}:8080/") == f"200 {name} 4 {name}"
    big = py(lab, "client", HTTP_GET, f"http://{lab.backend_ip(2)}/bytes?n=300000")
    assert big.split()[:3] == ["200", "be2", "300000"]


def test_client_reaches_sink_hello_and_udp_echo(lab):
    for name in lab.backend_names():
        ip = lab.backend_ip(name)
        assert py(lab, "client", SINK, ip, 2_000_000) == f"{name} 2000000"
        assert py(lab, "client", HELLO, ip, 104) == name
        assert py(lab, "client", HELLO, ip, 11112) == name
        assert py(lab, "client", UDP, ip, 77) == f"{name} 77"


def test_backends_answer_for_the_vip_locally(lab):
    for name in lab.backend_names():
        assert py(lab, name, HTTP_GET, f"http://{lab.vip}/") == f"200 {name} 4 {name}"
        assert py(lab, name, HELLO, lab.vip, 104) == name


def neigh(lab, host, ip) -> list[dict]:
    return json.loads(lab.run(host, "ip", "-j", "neigh", "show", ip, "dev", "eth0").stdout or "[]")


def test_backends_do_not_answer_arp_for_the_vip(lab):
    # Control: the same probe against a backend's own address resolves.
    assert py(lab, "client", CONNECT, lab.backend_ip(1), 80, 2) == "connected"
    entry = neigh(lab, "client", lab.backend_ip(1))
    assert entry and entry[0].get("lladdr") == lab.mac("be1")
    # The VIP is held by no one but the backends' lo: ARP must stay unanswered.
    lab.run("client", "ip", "neigh", "flush", "to", lab.vip, check=False)
    assert py(lab, "client", CONNECT, lab.vip, 80, 1.5) == "timeout"
    for entry in neigh(lab, "client", lab.vip):
        assert "lladdr" not in entry, entry
        assert set(entry.get("state", [])) & {"INCOMPLETE", "FAILED"}, entry


# ---- exec -----------------------------------------------------------------------

def test_run_and_exec_use_the_namespace(lab):
    out = lab.run("lb", "ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout
    assert "10.10.0.10/24" in out
    with pytest.raises(subprocess.CalledProcessError):
        lab.run("client", "sh", "-c", "exit 3")
    assert lab.run("client", "sh", "-c", "exit 3", check=False).returncode == 3
    proc = cli("exec", "--prefix", lab.prefix, "be2", "--",
               "cat", "/proc/sys/net/ipv4/conf/all/arp_ignore")
    assert proc.stdout.strip() == "1"
    proc = cli("exec", "--prefix", lab.prefix, "client", "--", "ip", "-o", "-4", "addr", "show", "eth0")
    assert "10.10.0.2/24" in proc.stdout
    assert cli("exec", "--prefix", lab.prefix, "lb", "--", "sh", "-c", "exit 7", check=False).returncode == 7
    with pytest.raises(labtool.LabError):
        lab.ns("be9")


def test_cli_status_json_matches_api(lab):
    st = json.loads(cli("status", "--prefix", lab.prefix, "--json").stdout)
    assert st["namespaces"] == lab.status()["namespaces"]
    assert st["backends"] == 3 and st["vip"] == lab.vip
    assert "10.10.0.12/24" in cli("status", "--prefix", lab.prefix).stdout


# ---- failover helpers -----------------------------------------------------------

def test_kill_and_start_backend(lab):
    ip = lab.backend_ip("be2")
    lab.kill_backend("be2")
    try:
        assert not lab.status()["servers"]["be2"]["alive"]
        assert py(lab, "client", CONNECT, ip, 80, 2) == "refused"
        assert py(lab, "client", CONNECT, lab.backend_ip("be1"), 80, 2) == "connected"
    finally:
        lab.start_backend("be2")
    assert lab.status()["servers"]["be2"]["alive"]
    assert py(lab, "client", HELLO, ip, 11112) == "be2"


def test_backend_exits_promptly_on_sigterm(lab):
    pid = lab.backend_pid("be3")
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    try:
        assert wait_for(lambda: lab.backend_pid("be3") is None, timeout=2.0)
    finally:
        lab.start_backend("be3")
    assert py(lab, "client", HELLO, lab.backend_ip(3), 104) == "be3"


def test_link_down_silently_removes_a_host(lab):
    ip = lab.backend_ip("be3")
    lab.link("be3", False)
    try:
        assert py(lab, "client", CONNECT, ip, 80, 1.5) == "timeout"
    finally:
        lab.link("be3", True)
    assert wait_for(lambda: py(lab, "client", CONNECT, ip, 80, 1) == "connected")


# ---- lifecycle --------------------------------------------------------------------

def test_up_refuses_a_lab_that_is_already_up(lab):
    with pytest.raises(labtool.LabError, match="already up"):
        labtool.Lab(prefix=lab.prefix).up()
    assert len(lab.namespaces()) == 6  # the failed up must not tear it down
    assert lab.status()["servers"]["be1"]["alive"]


def test_failed_up_removes_the_partial_lab(spare_prefix, monkeypatch):
    real = labtool.Lab._make_host

    def broken(self, host):
        if host == "be2":
            raise RuntimeError("injected failure")
        real(self, host)

    monkeypatch.setattr(labtool.Lab, "_make_host", broken)
    with pytest.raises(labtool.LabError, match="injected failure"):
        labtool.Lab(prefix=spare_prefix).up()
    assert labtool.Lab(prefix=spare_prefix).namespaces() == []


def test_backend_crash_during_up_removes_the_lab(spare_prefix, monkeypatch):
    monkeypatch.setattr(labtool, "BACKEND_SCRIPT", Path("/nonexistent/lab_backend.py"))
    with pytest.raises(labtool.LabError, match="during startup"):
        labtool.Lab(prefix=spare_prefix, backends=1).up()
    assert labtool.Lab(prefix=spare_prefix).namespaces() == []


def test_down_cleans_up_after_a_crashed_run(spare_prefix):
    names = [f"{spare_prefix}-sw", f"{spare_prefix}-be7"]  # be7: beyond backends=3
    for ns in names:
        subprocess.run(["ip", "netns", "add", ns], check=True)
    sleeper = subprocess.Popen(["ip", "netns", "exec", names[1], "sleep", "300"])
    try:
        lab = labtool.Lab(prefix=spare_prefix)
        assert wait_for(lambda: str(sleeper.pid) in subprocess.run(
            ["ip", "netns", "pids", names[1]], capture_output=True, text=True).stdout)
        lab.down()
        assert lab.namespaces() == []
        assert sleeper.wait(timeout=5) == -signal.SIGKILL
        lab.down()  # idempotent
    finally:
        if sleeper.poll() is None:
            sleeper.kill()


def test_cli_up_status_down_round_trip(spare_prefix):
    up = cli("up", "--prefix", spare_prefix, "--backends", "1", "--vip", "10.10.0.200",
             "--native-peer")
    assert f"{spare_prefix}-be1" in up.stdout
    st = json.loads(cli("status", "--prefix", spare_prefix, "--json").stdout)
    assert st["up"] and st["native_peer"] and st["vip"] == "10.10.0.200"
    assert st["servers"]["be1"]["alive"]
    again = cli("up", "--prefix", spare_prefix, check=False)
    assert again.returncode == 1 and "already up" in again.stderr
    cli("down", "--prefix", spare_prefix)
    st = json.loads(cli("status", "--prefix", spare_prefix, "--json").stdout)
    assert not st["up"] and not st["servers"]["be1"]["alive"]


def test_dual_stack_lab_gives_every_host_ipv6_and_the_backends_both_vips(spare_prefix):
    """`up --vip6`: IPv6 on every host (its IPv4 octet as the last group),
    both VIPs on each backend's lo, the stand-in servers on both families,
    and a state file that brings the IPv6 VIP back."""
    cli("up", "--prefix", spare_prefix, "--backends", "2", "--vip6", "FD00:10:10:0::0100")
    lab = labtool.Lab.load(spare_prefix)
    assert lab.vip6 == "fd00:10:10::100" and lab.backend_ip6("be2") == "fd00:10:10::12"
    for host in lab.hosts():
        addrs = json.loads(lab.run(host, "ip", "-j", "-6", "addr", "show", "dev", "eth0").stdout)[0]["addr_info"]
        assert lab.host_ip6(host) in [a["local"] for a in addrs], (host, addrs)
    for name in lab.backend_names():
        lo = lab.run(name, "ip", "addr", "show", "dev", "lo").stdout
        assert f"inet {lab.vip}/32" in lo and f"inet6 {lab.vip6}/128" in lo, lo
        assert lab.run(name, "sysctl", "-n", "net.ipv6.conf.all.proxy_ndp").stdout.strip() == "0"
        six = lab.backend_ip6(name)
        assert py(lab, "client", HTTP_GET, f"http://[{six}]/") == f"200 {name} 4 {name}"
        assert py(lab, "client", HTTP_GET, f"http://{lab.backend_ip(name)}/") == f"200 {name} 4 {name}"
        assert py(lab, name, HTTP_GET, f"http://[{lab.vip6}]/") == f"200 {name} 4 {name}"


def test_cli_down_removes_the_orthanc_storage_of_a_crashed_nat_or_pacs_run(spare_prefix):
    """A NAT (or PACS) run that crashed before its own down() leaves its Orthanc
    running and its storage under the state dir; `lab.py down` (which has no
    --pacs) stops it and removes the storage. A real Orthanc, on be4 of a
    four-backend lab, cleaned by a `down` that knows the default three only."""
    import pacs_lab

    lab = labtool.Lab(prefix=spare_prefix, backends=4)
    lab.up()
    pacs_lab.start_orthanc(lab, "be4", dicom_port=4242)   # as the NAT lab; the plain lab serves 104
    pid = pacs_lab.orthanc_pid(lab, "be4")
    storage = pacs_lab.orthanc_dir(lab, "be4") / "storage"
    assert pid is not None and storage.is_dir()
    proc = pacs_lab._PROCS.pop((str(lab.state_dir), "be4"))   # as after a crash: only the pid file knows it
    try:
        cli("down", "--prefix", spare_prefix)
        assert not (Path(lab.state_dir) / "orthanc").exists()
        assert proc.wait(timeout=10) is not None
        assert lab.namespaces() == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
