"""NAT needs IPv4 forwarding: `xdplb attach` refuses a NAT pool while
net.ipv4.ip_forward is 0 in its network namespace, and never turns it on.

The real `xdplb attach` in a network namespace of its own (forwarding set
off there: a new namespace may inherit the host's setting), on a veth; the refusal comes before the program
is compiled, so no XDP mode is involved. The reading itself goes through
xdplb.netlink.Netlink, the kernel layer the unit tests fake.
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
READ = "from xdplb.netlink import Netlink\nnl = Netlink()\nprint(nl.ipv4_forwarding())\nnl.close()\n"


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
        subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv4.ip_forward=0"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def in_ns(netns: str, *argv, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, env=env,
                          timeout=timeout)


def ip_forward(netns: str) -> str:
    return in_ns(netns, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip()


def test_attach_with_a_nat_pool_is_refused_while_forwarding_is_off(netns, tmp_path):
    assert ip_forward(netns) == "0"
    assert in_ns(netns, sys.executable, "-c", READ).stdout.strip() == "False"
    pool = tmp_path / "pool.toml"
    pool.write_text(POOL)
    env = dict(os.environ, XDPLB_RUN_DIR=str(tmp_path / "run"))
    done = in_ns(netns, XDPLB, "attach", "nf0", "--pool", str(pool), env=env)
    assert done.returncode != 0, done.stderr
    assert "NAT service(s) pacs-dicom need IP forwarding, but net.ipv4.ip_forward is 0" in done.stderr
    assert "`sysctl -w net.ipv4.ip_forward=1`" in done.stderr
    assert "compiling" not in done.stderr, "refused before anything changed"
    assert "xdp" not in in_ns(netns, "ip", "link", "show", "nf0").stdout
    assert ip_forward(netns) == "0", "xdplb never turns forwarding on"

    # Turned on by the operator, the same read says so.
    in_ns(netns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    assert in_ns(netns, sys.executable, "-c", READ).stdout.strip() == "True"
