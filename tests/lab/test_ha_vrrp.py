"""A VRRP pair: keepalived on two xdplb nodes, no router.

The lab (tools/ha_lab.py, ``routing="vrrp"``): the client on the nodes'
segment; each node runs the real ``xdplb attach`` in **generic XDP mode** on
its veth with ``manage_vips = false`` and a ``ready_file``, and keepalived
with the shipped recipe (examples/keepalived-pair.conf: ``track_file`` on
that ready file, lb1 preferred). The master owns the VIP on its eth0; the
standby is attached and hot, so when it takes over, the moved association
is placed by the same Maglev table (a flow-table miss) on the same PACS.
"""
from __future__ import annotations

import time

import pytest

import ha_lab
import pacs_lab
from make_dicom import dataset_digest, make_instance

pytestmark = [pytest.mark.root, pytest.mark.lab]

SERVICE = "synapse-dicom"
BIG_BYTES = 200 * 1024 * 1024
PACE = "160mbit"                 # the client's link: 20 MB/s, so the store lasts about 10 s
# keepalived's master-down interval is 3 adverts (1 s) plus skew; then
# gratuitous ARP moves the client. Margin for 2 busy cores.
TAKEOVER_BOUND = 10.0


@pytest.fixture(scope="module")
def pair():
    with ha_lab.temporary_ha_lab("xv", pace=PACE, pacs=True, routing="vrrp") as the_lab:
        yield the_lab


def wait_master(pair, node: str, timeout: float) -> float:
    """Wait until ``node`` holds the VIP (a killed master's namespace keeps the
    address on its eth0, but its link is down); seconds taken."""
    start = time.monotonic()
    while node not in (masters := pair.vrrp_master()):
        if time.monotonic() - start > timeout:
            raise AssertionError(f"VIP held by {masters}, wanted {node} within {timeout}s")
        time.sleep(0.05)
    return time.monotonic() - start


def misses(pair, node: str) -> int:
    return pair.balancer(node).status()["events"].get("flow_miss", 0)


def test_the_pair_elects_one_master_and_both_nodes_are_ready(pair):
    wait_master(pair, "lb1", 20)
    assert pair.vrrp_master() == ["lb1"]
    for node in pair.node_names():
        assert pair.balancer(node).status()["mode"] == "generic"
        assert pair.ready_file(node).read_text().strip() == "0", node
    assert pacs_lab.echoscu(pair).returncode == 0


def test_store_survives_the_loss_of_the_master(pair, tmp_path):
    master = "lb1"
    wait_master(pair, master, 20)
    standby = "lb2"
    path = tmp_path / "big.dcm"
    uid = make_instance(path, BIG_BYTES)
    sent = dataset_digest(path)
    misses_before = misses(pair, standby)
    long_store = ha_lab.LongStore(pair, path)
    try:
        pacs = long_store.carried_pacs()
        time.sleep(1.0)
        assert long_store.running(), "the store ended before the master was lost: make BIG_BYTES larger"
        killed = pair.kill_node(master)
        killed_at = killed - long_store.started
        wait_master(pair, standby, TAKEOVER_BOUND)
        took_over = time.monotonic() - killed
        rc, out = long_store.finish(timeout=600)
    finally:
        long_store.close()
    moved = misses(pair, standby) - misses_before
    print(f"VRRP: master {master} lost {killed_at:.1f}s into a {BIG_BYTES >> 20} MiB store to {pacs}; "
          f"{standby} held the VIP {took_over:.2f}s after the master's link went down; store exit {rc} after {long_store.seconds:.1f}s, "
          f"longest stall {long_store.longest_stall():.2f}s; misses on {standby}: {moved} (generic XDP); "
          f"{long_store.describe()}")
    assert rc == 0, out
    found = pacs_lab.find_instance(pair, uid)
    assert found is not None and found[0] == pacs, found
    stored = pacs_lab.download_instance(pair, pacs, found[1]["ID"], tmp_path / "stored.dcm")
    assert dataset_digest(stored) == sent
    assert moved > 0, "the standby placed the moved association without a flow-table miss?"
    path.unlink()
    stored.unlink()
