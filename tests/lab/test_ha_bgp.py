"""Two xdplb nodes side by side behind a router, with real BGP (BIRD 2) and ECMP.

The lab (tools/ha_lab.py): the client behind a router namespace whose BIRD
takes one eBGP session (with BFD) from each node and installs the VIP as
one ECMP route with the L4 hash (``fib_multipath_hash_policy = 1``); two
nodes, each running the real ``xdplb attach`` in **generic XDP mode** on its
veth and BIRD, which announces what xdplb writes to its announce table;
three Orthanc PACS on the nodes' segment answering the client straight
through the router (DSR). dcmtk's storescu is the modality.

What each test shows is read from the router's kernel route, from each
node's xdplb counters, from the PACS's own sockets and REST API, and from
the client's TCP socket (bytes_acked sampled every 50 ms: the longest stall).
The measured numbers are printed (``pytest -s`` shows them).

Every test leaves both nodes running and announced (the ``whole`` fixture
brings back whatever a test took away).
"""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

import ha_lab
import pacs_lab
from lab_xdplb import XDPLB, backend_health, backend_in_table
from make_dicom import dataset_digest, make_instance, make_study

pytestmark = [pytest.mark.root, pytest.mark.lab]

SERVICE = "synapse-dicom"
INTERVAL, FALL, RISE = 1.0, 2, 2
BIG_BYTES = 200 * 1024 * 1024
PACE = "120mbit"                  # the client's link: 15 MB/s, so the big store lasts 14 s or more
SMALL = 16 * 1024
# The router notices a silent node through BFD (1 s) or, failing that, the
# BGP hold time (3 s); then BIRD replaces the route at once. Margin for 2 busy cores.
LOSS_CONVERGE_BOUND = ha_lab.HOLD_TIME + 5.0
# Withdrawal after every backend went down: the verdict (fall x interval,
# plus up to one interval until the first failing probe), then BIRD's kernel
# learning and one BGP update.
BGP_UPDATE_BOUND = 2.0
NO_BACKEND_BOUND = FALL * INTERVAL + INTERVAL + BGP_UPDATE_BOUND + 3.0
DRAIN_IDLE, DRAIN_TIMEOUT = 2.0, 60.0


@pytest.fixture(scope="module")
def ha():
    with ha_lab.temporary_ha_lab("xh", pace=PACE, pacs=True, routing="bgp") as the_lab:
        yield the_lab


@pytest.fixture(autouse=True)
def whole(ha):
    """After each test: every node running with its full pool and announced."""
    yield
    for node in ha.node_names():
        b = ha.balancer(node)
        if b.proc is None or b.proc.poll() is not None:
            ha.revive_node(node)
            continue
        if b.pool.read_text() != ha.pool_text(node):
            b.pool.write_text(ha.pool_text(node))
            b.signal(signal.SIGHUP)
        if ha.birdc(node, "show status", check=False).returncode != 0:
            ha.start_bird(node)
        if b.status().get("announce", {}).get("node_draining"):
            b.cli("undrain-node", "-i", "eth0")
    full = set(ha.backend_names())
    for node in ha.node_names():   # the restored pool applied and every backend up again
        ha.balancer(node).wait_for(lambda st: all({be["name"] for be in s["backends"]} == full and all(
            be["health"] == "up" for be in s["backends"]) for s in st["services"]), 30, f"{node} whole")
    ha.wait_nexthops(ha.node_names(), 30)


@pytest.fixture(scope="module")
def small_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicom")
    made = iter(range(1, 1000))

    def make(count: int) -> list[Path]:
        return [path for path, _uid in make_study(root / f"batch{next(made)}", count, SMALL)]
    return make


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """One 200 MB instance, its SOP Instance UID and data-set digest; every
    test that stores it deletes it from the PACS afterwards."""
    path = tmp_path_factory.mktemp("big") / "big.dcm"
    uid = make_instance(path, BIG_BYTES)
    yield path, uid, dataset_digest(path)
    path.unlink(missing_ok=True)


def node_stats(ha, node: str) -> dict:
    """The node's synapse-dicom counters and its flow-table misses."""
    st = ha.balancer(node).status()
    svc = next(s for s in st["services"] if s["name"] == SERVICE)
    return {"packets": svc["packets"], "bytes": svc["bytes"], "flows": svc["new_flows"],
            "misses": st["events"].get("flow_miss", 0)}


def carrier_node(ha) -> str:
    """The node forwarding the long store: the one whose byte counter runs."""
    first = {n: node_stats(ha, n)["bytes"] for n in ha.node_names()}
    time.sleep(0.5)
    grown = {n: node_stats(ha, n)["bytes"] - first[n] for n in ha.node_names()}
    busy = [n for n, d in grown.items() if d > 1_000_000]
    assert len(busy) == 1, f"bytes forwarded per node in 0.5 s: {grown}"
    return busy[0]


def check_stored(ha, big, holder_expected: str, tmp_path: Path) -> None:
    """The 200 MB instance is on the PACS that carried it, byte for byte; then delete it."""
    path, uid, (sent_size, sent_digest) = big
    found = pacs_lab.find_instance(ha, uid)
    assert found is not None, f"no PACS holds {uid}"
    holder, record = found
    try:
        assert holder == holder_expected
        stored = pacs_lab.download_instance(ha, holder, record["ID"], tmp_path / "stored.dcm")
        assert dataset_digest(stored) == (sent_size, sent_digest)
        stored.unlink()
    finally:
        pacs_lab.rest(ha, holder, f"/instances/{record['ID']}", method="DELETE", raw=True)


def forget(ha, big) -> None:
    """Delete the big instance wherever it landed (a broken store stores nothing, but be sure)."""
    found = pacs_lab.find_instance(ha, big[1])
    if found:
        pacs_lab.rest(ha, found[0], f"/instances/{found[1]['ID']}", method="DELETE", raw=True)


def watch_tries(out: str) -> list[tuple[float, str]]:
    return [(float(t), r) for t, r, _ in (line.split(maxsplit=2) for line in out.splitlines())]


def other(ha, node: str) -> str:
    return next(n for n in ha.node_names() if n != node)


def drain_node(ha, node: str) -> subprocess.CompletedProcess:
    """`xdplb drain-node` on the node, as an operator runs it."""
    argv = ["ip", "netns", "exec", ha.ns(node), XDPLB, "drain-node", "-i", "eth0",
            "--idle", str(DRAIN_IDLE), "--timeout", str(DRAIN_TIMEOUT)]
    return subprocess.run(argv, capture_output=True, text=True, env=ha.balancer(node).env(),
                          timeout=DRAIN_TIMEOUT + 30)


# ---- the tests ----------------------------------------------------------------

def test_router_holds_one_ecmp_route_over_both_nodes(ha):
    assert ha.router_nexthops() == sorted(ha.host_ip(n) for n in ha.node_names())
    assert ha.run("rt", "sysctl", "-n", "net.ipv4.fib_multipath_hash_policy").stdout.strip() == "1"
    for node in ha.node_names():
        assert ha.balancer(node).status()["mode"] == "generic"


def test_both_nodes_carry_new_associations(ha, small_files):
    files = small_files(200)
    before_nodes = {n: node_stats(ha, n) for n in ha.node_names()}
    before = pacs_lab.counts(ha)
    results = pacs_lab.store_each(ha, files)
    assert len(results) == 200 and all(rc == 0 for _, rc in results), [r for r in results if r[1]]
    after = pacs_lab.counts(ha)
    landed = {name: after[name] - before.get(name, 0) for name in after}
    flows = {n: node_stats(ha, n)["flows"] - before_nodes[n]["flows"] for n in ha.node_names()}
    print(f"200 associations: per node (new flows) {flows}, per PACS (instances) {landed}")
    assert sum(landed.values()) == 200 and all(landed[name] > 0 for name in ha.backend_names()), landed
    # A fair split of 200 flows over two nodes leaves fewer than 50 on one
    # with a probability below 1e-12; each association is at least one flow.
    assert all(count >= 50 for count in flows.values()) and sum(flows.values()) >= 200, flows


def _lose_carrier(ha, big, small_files, tmp_path, negative: bool) -> None:
    """A 200 MB store through the VIP; its node dies (link, BIRD, xdplb) mid-transfer.

    ``negative``: just before, the carried PACS leaves the survivor's pool.
    """
    long_store = ha_lab.LongStore(ha, big[0])
    try:
        pacs = long_store.carried_pacs()
        carrier = carrier_node(ha)
        survivor = other(ha, carrier)
        if negative:
            b = ha.balancer(survivor)
            b.pool.write_text(ha.pool_text(survivor, skip=(pacs,)))
            b.signal(signal.SIGHUP)
            b.wait_for(lambda st: pacs not in {be["name"] for s in st["services"] for be in s["backends"]},
                       15, f"{pacs} out of {survivor}'s pool")
        misses_before = node_stats(ha, survivor)["misses"]
        watcher = pacs_lab.watch_store(ha, 12.0, small_files(120))
        watch_started = time.monotonic()
        time.sleep(1.0)
        assert long_store.running(), "the store ended before the node was lost: make BIG_BYTES larger"
        killed = ha.kill_node(carrier)
        ha.wait_nexthops([survivor], LOSS_CONVERGE_BOUND)
        converged = time.monotonic() - killed
        killed_at = killed - long_store.started
        rc, out = long_store.finish(timeout=600)
        tries_out, _ = watcher.communicate(timeout=120)
        watch_start = watch_started
    finally:
        long_store.close()
    tries = watch_tries(tries_out)
    after_kill = [(t, r) for t, r in tries if t >= killed - watch_start]
    failed = [t for t, r in after_kill if r == "fail"]
    misses = node_stats(ha, survivor)["misses"] - misses_before
    print(f"{'negative control: ' if negative else ''}node {carrier} (carrying the store to {pacs}) lost "
          f"{killed_at:.1f}s into a {BIG_BYTES >> 20} MiB store; router's route led only to {survivor} {converged:.2f}s after the link went down; "
          f"store exit {rc} after {long_store.seconds:.1f}s, longest stall {long_store.longest_stall():.2f}s; "
          f"new associations after the loss: {len(failed)} of {len(after_kill)} failed "
          f"(at {', '.join(f'{t - (killed - watch_start):.1f}s' for t in failed) or '-'}); "
          f"misses on {survivor}: {misses} (generic XDP); {long_store.describe()}")
    if negative:
        forget(ha, big)
        assert rc != 0, f"the store survived without its PACS in the survivor's pool:\n{out}"
        return
    assert rc == 0, out
    check_stored(ha, big, pacs, tmp_path)
    assert misses > 0, "the survivor placed the moved flow without a flow-table miss?"
    last_fail = max(failed, default=0.0)
    assert any(r == "ok" for t, r in after_kill if t > last_fail), tries_out


def test_store_survives_the_loss_of_its_node(ha, big, small_files, tmp_path):
    _lose_carrier(ha, big, small_files, tmp_path, negative=False)


def test_negative_control_store_breaks_without_its_pacs_on_the_survivor(ha, big, small_files, tmp_path):
    _lose_carrier(ha, big, small_files, tmp_path, negative=True)


def test_graceful_drain_of_the_carrier_keeps_the_store(ha, big, tmp_path):
    long_store = ha_lab.LongStore(ha, big[0])
    try:
        pacs = long_store.carried_pacs()
        carrier = carrier_node(ha)
        drained = drain_node(ha, carrier)
        converged = ha.wait_nexthops([other(ha, carrier)], 10)
        assert long_store.running(), "the store ended before the drain had moved it: make BIG_BYTES larger"
        rc, out = long_store.finish(timeout=600)
    finally:
        long_store.close()
    print(f"drain-node on {carrier} during a {BIG_BYTES >> 20} MiB store to {pacs}: {drained.stdout.strip()} "
          f"(exit {drained.returncode}); store exit {rc} after {long_store.seconds:.1f}s, longest stall "
          f"{long_store.longest_stall():.2f}s (generic XDP)")
    assert drained.returncode == 0, drained.stdout + drained.stderr
    assert converged >= 0 and rc == 0, out
    check_stored(ha, big, pacs, tmp_path)


def test_a_node_returns_under_continuous_stores(ha, small_files):
    returning = ha.node_names()[1]
    ha.kill_node(returning)
    ha.wait_nexthops([other(ha, returning)], LOSS_CONVERGE_BOUND)
    ha.link(returning, True)
    ha.start_xdplb(returning)        # attached and every backend up; BIRD is still down
    before = node_stats(ha, returning)
    watcher = pacs_lab.watch_store(ha, 10.0, small_files(100))
    time.sleep(2.0)
    ha.start_bird(returning)
    returned = ha.wait_nexthops(ha.node_names(), 15)
    out, _ = watcher.communicate(timeout=120)
    tries = watch_tries(out)
    after = node_stats(ha, returning)
    print(f"{returning} back in the route {returned:.2f}s after BIRD started; {len(tries)} stores, "
          f"{sum(r == 'fail' for _, r in tries)} failed; {returning} took {after['flows'] - before['flows']} "
          f"new flows, {after['misses'] - before['misses']} misses (generic XDP)")
    assert tries and all(r == "ok" for _, r in tries), out
    assert after["flows"] > before["flows"], "the returned node took no flows"


def test_drain_node_under_continuous_stores(ha, small_files):
    node = ha.node_names()[0]
    watcher = pacs_lab.watch_store(ha, 12.0, small_files(120))
    time.sleep(2.0)
    drained = drain_node(ha, node)
    still_from = node_stats(ha, node)
    time.sleep(2.0)
    still_to = node_stats(ha, node)
    out, _ = watcher.communicate(timeout=120)
    tries = watch_tries(out)
    print(f"drain-node on {node}: {drained.stdout.strip()} (exit {drained.returncode}); {len(tries)} stores, "
          f"{sum(r == 'fail' for _, r in tries)} failed; route {ha.router_nexthops()} (generic XDP)")
    assert drained.returncode == 0, drained.stdout + drained.stderr
    assert ha.router_nexthops() == [ha.host_ip(other(ha, node))]
    assert still_to["packets"] == still_from["packets"], (still_from, still_to)
    assert tries and all(r == "ok" for _, r in tries), out
    undrained = ha.balancer(node).cli("undrain-node", "-i", "eth0", check=False)
    assert undrained.returncode == 0, undrained.stdout + undrained.stderr
    print(f"undrain-node: back in the route after {ha.wait_nexthops(ha.node_names(), 15):.2f}s")


def block_probes(ha, node: str, block: bool, pacs: str | None = None) -> None:
    """Make the node's own health probes to every PACS (or only to ``pacs``)
    fail (nftables rejects them with a TCP reset in its output hook), or undo
    it. Only the node's own stack is affected: the XDP program forwards the
    clients' packets before it."""
    if block:
        dst = ha.host_ip(pacs) if pacs else f"{ha.host_ip('be1').rsplit('.', 1)[0]}.0/24"
        ha.run(node, "nft", "-f", "-", input=(
            "table inet lab_block {\n  chain out {\n    type filter hook output priority 0;\n"
            f"    ip daddr {dst} tcp dport {{ 104, 8042 }} "
            "reject with tcp reset\n  }\n}\n"))
    else:
        ha.run(node, "nft", "delete", "table", "inet", "lab_block", check=False)


def test_a_node_without_healthy_backends_withdraws(ha):
    node = ha.node_names()[0]
    b = ha.balancer(node)
    try:
        block_probes(ha, node, True)
        withdrawn = ha.wait_nexthops([other(ha, node)], NO_BACKEND_BOUND)
        reason = b.status()["announce"]["vips"][ha.vip]
        health = {be["name"]: be["health"] for s in b.status()["services"] for be in s["backends"]}
        print(f"{node} saw no healthy backend: withdrawn from the router {withdrawn:.2f}s after its probes "
              f"began to fail (fall {FALL} x interval {INTERVAL}s; bound {NO_BACKEND_BOUND:.1f}s); "
              f"status {json.dumps(reason)}")
        assert reason["announced"] is False, reason
        assert set(health.values()) == {"down"}, health
    finally:
        block_probes(ha, node, False)
    back = ha.wait_nexthops(ha.node_names(), RISE * INTERVAL + INTERVAL + BGP_UPDATE_BOUND + 3.0)
    print(f"{node} announced again {back:.2f}s after its probes could pass again (rise {RISE} x interval {INTERVAL}s)")


# A health disagreement: one node sees one PACS down, the other still sees it
# up. Held this long while new associations arrive (the long store outlasts it).
DISAGREE_HOLD = 6.0
# Until the node with blocked probes has its verdict and the PACS out of its
# table: fall x interval, up to one interval to the first failing probe, margin.
VERDICT_BOUND = FALL * INTERVAL + INTERVAL + 3.0


def backend_flows(ha, node: str) -> dict[str, int]:
    """{backend: new flows the node placed on it} for synapse-dicom."""
    svc = next(s for s in ha.balancer(node).status()["services"] if s["name"] == SERVICE)
    return {be["name"]: be["new_flows"] for be in svc["backends"]}


def test_a_health_disagreement_between_nodes(ha, big, small_files, tmp_path):
    """The node carrying a long store to PACS P stops reaching P with its
    probes (nftables in that node only); the other node still sees P up. New
    associations arrive through the router (ECMP over both nodes) while they
    disagree; then the block ends. The README ("Several balancers") says what
    must hold: the established store stays (flow table, down grace), new flows
    on the disagreeing node avoid P, nothing fails."""
    long_store = ha_lab.LongStore(ha, big[0])
    try:
        pacs = long_store.carried_pacs()
        node = carrier_node(ha)
        peer = other(ha, node)
        blocked = time.monotonic()
        block_probes(ha, node, True, pacs)
        try:
            ha.balancer(node).wait_for(
                lambda st: backend_health(st, SERVICE)[pacs] == "down" and not backend_in_table(st, SERVICE, pacs),
                VERDICT_BOUND, f"{node} to see {pacs} down and take it out of its table")
            verdict = time.monotonic() - blocked
            assert backend_in_table(ha.balancer(peer).status(), SERVICE, pacs), f"{peer} does not see {pacs} up"
            before = {n: backend_flows(ha, n) for n in ha.node_names()}
            grace_before = ha.balancer(node).status()["events"].get("down_grace", 0)
            watcher = pacs_lab.watch_store(ha, DISAGREE_HOLD, small_files(int(DISAGREE_HOLD * 10)))
            tries_out, _ = watcher.communicate(timeout=120)
            after = {n: backend_flows(ha, n) for n in ha.node_names()}
            grace = ha.balancer(node).status()["events"].get("down_grace", 0) - grace_before
            # Still disagreeing at the end of the window: the peer never lost P.
            assert backend_health(ha.balancer(node).status(), SERVICE)[pacs] == "down"
            assert backend_in_table(ha.balancer(peer).status(), SERVICE, pacs), f"{peer} lost {pacs} during the window"
            still_running = long_store.running()
        finally:
            block_probes(ha, node, False)
        rc, out = long_store.finish(timeout=600)
    finally:
        long_store.close()
    tries = watch_tries(tries_out)
    failed = [t for t, r in tries if r == "fail"]
    placed = {n: {be: after[n][be] - before[n][be] for be in after[n]} for n in ha.node_names()}
    print(f"health disagreement: {node} (carrying the {BIG_BYTES >> 20} MiB store to {pacs}) saw {pacs} down "
          f"{verdict:.2f}s after its probes were blocked, {peer} still up; during {DISAGREE_HOLD:.0f}s: "
          f"{len(tries)} new associations, {len(failed)} failed; new flows per node per PACS {placed}; "
          f"down-grace packets on {node}: {grace}; store exit {rc} after {long_store.seconds:.1f}s, "
          f"longest stall {long_store.longest_stall():.2f}s (generic XDP); {long_store.describe()}")
    assert tries and not failed, tries_out
    assert placed[node][pacs] == 0, f"{node} placed new flows on {pacs}, which it saw down: {placed}"
    # Enough new flows on the disagreeing node that, had it agreed, some
    # would have landed on the PACS: each does with probability 1/3.
    assert sum(placed[node].values()) >= 10, placed
    assert rc == 0, f"the established store broke during the disagreement:\n{out}"
    assert still_running, "the store ended before the disagreement did: make BIG_BYTES larger"
    assert grace > 0, f"the store's packets on {node} were not held by the down grace"
    check_stored(ha, big, pacs, tmp_path)
