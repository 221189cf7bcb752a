"""Reading rx-vlan-offload through ethtool netlink, on a real veth.

No device here strips VLAN tags (veth and virtio-net do not), so the refusal
itself is unit-tested (tests/unit/test_desired_and_modes.py, test_daemon.py);
this checks that the feature bits the refusal reads are the kernel's, read
through the ETHTOOL generic netlink family, and follow `ethtool -K`. The
veth pair lives in a network namespace of its own and carries no traffic.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.root, pytest.mark.lab]

READ = ("import sys\nfrom xdplb.netlink import Netlink\n"
        "nl = Netlink()\nprint(' '.join(sorted(nl.active_features(sys.argv[1]))))\nnl.close()\n")


@pytest.fixture
def netns():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    name = f"xvl{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "vl0", "type", "veth", "peer", "name", "vl1"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def features(netns: str, ifname: str) -> set[str]:
    out = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", READ, ifname],
                         check=True, capture_output=True, text=True).stdout
    return set(out.split())


def test_vlan_stripping_is_read_through_ethtool_netlink_and_follows_ethtool_k(netns):
    before = features(netns, "vl0")
    assert {"rx-vlan-hw-parse", "rx-vlan-stag-hw-parse"} <= before   # veth advertises both
    assert "rx-vlan-filter" not in before                            # fixed off: listed only when on
    subprocess.run(["ip", "netns", "exec", netns, "ethtool", "-K", "vl0", "rxvlan", "off"], check=True)
    after = features(netns, "vl0")
    assert "rx-vlan-hw-parse" not in after and "rx-vlan-stag-hw-parse" in after
    assert before - after == {"rx-vlan-hw-parse"}


def test_an_unknown_interface_is_a_clear_error(netns):
    code = ("from xdplb.netlink import Netlink, NetlinkProblem\nnl = Netlink()\n"
            "try:\n nl.active_features('nope0')\nexcept NetlinkProblem as e:\n print('problem', e)\n")
    out = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", code],
                         check=True, capture_output=True, text=True).stdout
    assert out.startswith("problem cannot read the offload features of nope0")
