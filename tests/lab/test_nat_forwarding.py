"""NAT needs IP forwarding on the attached interface: `xdplb attach`
refuses a NAT pool while that interface's own net.ipv4.conf.<if>.forwarding
(IPv4 NAT services) or net.ipv6.conf.<if>.forwarding (IPv6 NAT services)
is 0, the setting bpf_fib_lookup reads for the ingress interface, even with
the namespace's switch (net.ipv4.ip_forward, net.ipv6.conf.all.forwarding)
on; and it never turns it on.

The real `xdplb attach` in a network namespace of its own (the switches set
on there, then the interface's own setting off), on a veth; the refusal
comes before the program is compiled, so no XDP mode is involved. The
reading itself goes through xdplb.netlink.Netlink, the kernel layer the unit
tests fake.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.root, pytest.mark.lab]

XDPLB = os.path.join(os.path.dirname(sys.executable), "xdplb")
# One NAT service, one backend on another port (the refusal comes before any probe).
POOL = ('[[service]]\nname = "pacs-dicom"\nvip = "10.20.0.100"\nport = 104\nforwarding = "nat"\n'
        '[[service.backend]]\nname = "orthanc1"\naddress = "10.30.0.11"\nport = 4242\n')
POOL6 = ('[[service]]\nname = "pacs-dicom6"\nvip = "fd00:20::100"\nport = 104\nforwarding = "nat"\n'
         '[[service.backend]]\nname = "scp1"\naddress = "fd00:30::11"\nport = 4242\n')
READ = "from xdplb.netlink import Netlink\nnl = Netlink()\nprint(nl.ip_forwarding({version}, 'nf0'))\nnl.close()\n"
SWITCH = {4: "net.ipv4.ip_forward", 6: "net.ipv6.conf.all.forwarding"}   # each sets every interface's


@pytest.fixture
def netns():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    name = f"xnf{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "nf0", "type", "veth", "peer", "name", "nf1"], check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "nf0", "up"], check=True)
        subprocess.run(["ip", "-n", name, "addr", "add", "10.30.0.1/24", "dev", "nf0"], check=True)
        subprocess.run(["ip", "-n", name, "addr", "add", "fd00:30::1/64", "dev", "nf0", "nodad"], check=True)
        for sysctl in SWITCH.values():   # on, nf0's own included (a new namespace may inherit the host's)
            subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw", f"{sysctl}=1"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def in_ns(netns: str, *argv, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, env=env,
                          timeout=timeout)


def sysctl_value(netns: str, sysctl: str) -> str:
    return in_ns(netns, "sysctl", "-n", sysctl).stdout.strip()


@pytest.mark.parametrize("version, service, text", [(4, "pacs-dicom", POOL), (6, "pacs-dicom6", POOL6)])
def test_attach_with_a_nat_pool_is_refused_while_the_interfaces_forwarding_is_off(netns, tmp_path, version, service,
                                                                                  text):
    sysctl = f"net.ipv{version}.conf.nf0.forwarding"
    in_ns(netns, "sysctl", "-qw", f"{sysctl}=0")   # nf0's own only: the switch stays on
    assert sysctl_value(netns, sysctl) == "0"
    assert sysctl_value(netns, SWITCH[version]) == "1" and sysctl_value(netns, SWITCH[10 - version]) == "1"
    read = READ.format(version=version)
    assert in_ns(netns, sys.executable, "-c", read).stdout.strip() == "False"
    pool = tmp_path / "pool.toml"
    pool.write_text(text)
    env = dict(os.environ, XDPLB_RUN_DIR=str(tmp_path / "run"))
    done = in_ns(netns, XDPLB, "attach", "nf0", "--pool", str(pool), env=env)
    print(done.stderr)
    assert done.returncode != 0, done.stderr
    assert f"NAT service(s) {service} need IP forwarding on nf0, but {sysctl} is 0" in done.stderr
    assert f"`sysctl -w {sysctl}=1`" in done.stderr
    assert "compiling" not in done.stderr, "refused before anything changed"
    assert "xdp" not in in_ns(netns, "ip", "link", "show", "nf0").stdout
    assert sysctl_value(netns, sysctl) == "0", "xdplb never turns forwarding on"

    # The switch off, nf0's own turned on by the operator (an uplink keeping its RAs): the same read says on.
    in_ns(netns, "sysctl", "-qw", f"{SWITCH[version]}=0")
    in_ns(netns, "sysctl", "-qw", f"{sysctl}=1")
    assert sysctl_value(netns, SWITCH[version]) == "0"
    assert in_ns(netns, sys.executable, "-c", read).stdout.strip() == "True"
