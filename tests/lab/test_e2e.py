"""End to end: real TCP and UDP from the client namespace through the VIP,
the real XDP program on the lb namespace's veth (generic mode, which
`--mode auto` picks on veth), real backend servers.

One balancer serves the module; the tests run in file order and each leaves
the lab as it found it.
"""
from __future__ import annotations

import collections
import signal
import time

import pytest

from lab_xdplb import Balancer, backend_health, backend_in_table, client, client_popen, running_balancer, lb_addresses, pool_text, xdp_attached

pytestmark = [pytest.mark.root, pytest.mark.lab]

INTERVAL, TIMEOUT, RISE, FALL = 1.0, 0.5, 2, 2


@pytest.fixture(scope="module")
def pool_file(lab, tmp_path_factory):
    path = tmp_path_factory.mktemp("pool") / "pool.toml"
    path.write_text(pool_text(lab, INTERVAL, TIMEOUT, RISE, FALL))
    return path


@pytest.fixture(scope="module")
def balancer(lab, pool_file, tmp_path_factory):
    with running_balancer(lab, pool_file, tmp_path_factory.mktemp("xdplb")) as b:
        yield b


def test_attached_in_generic_mode_with_vip(lab, balancer):
    st = balancer.status()
    assert st["mode"] == "generic"
    assert xdp_attached(lab)
    assert lab.vip in lb_addresses(lab)
    assert all(h == "up" for h in backend_health(st, "hello").values())


def test_connections_spread_over_all_backends(lab, balancer):
    names = client(lab, "hello", lab.vip, 104, 60)
    counts = collections.Counter(names)
    assert set(counts) == set(lab.backend_names()), counts
    assert min(counts.values()) >= 8, counts
    # The data plane's own per-backend counters agree on who got new flows.
    st = balancer.status()
    flows = {b["name"]: b["new_flows"] for s in st["services"] if s["name"] == "hello" for b in s["backends"]}
    assert flows == dict(counts)


def test_udp_spreads_and_answers(lab, balancer):
    names = client(lab, "udp", lab.vip, 5000, 30, 100)
    backends = {line.split()[0] for line in names}
    assert backends == set(lab.backend_names()), names
    assert all(line.split()[1] == "100" for line in names)


def test_failover_after_backend_server_killed(lab, balancer):
    watch = client_popen(lab, "watch", lab.vip, 104, 7)
    started = time.monotonic()
    time.sleep(1.0)  # let the watcher see the healthy state first
    lab.kill_backend("be2")
    killed_at = time.monotonic() - started
    out, _ = watch.communicate(timeout=30)
    tries = [line.split(maxsplit=2) for line in out.splitlines()]
    after = [(float(t), r, rest) for t, r, rest in tries if float(t) >= killed_at]
    failures = [t for t, r, _ in after if r == "fail"]
    failover = (max(failures) - killed_at) if failures else 0.0
    bound = FALL * INTERVAL + 1.0
    print(f"failover: last failed connection {failover:.2f}s after the kill (bound {bound:.1f}s), "
          f"{len(failures)} failed of {len(after)} tries")
    assert failover <= bound
    late = [(t, r, rest) for t, r, rest in after if t > killed_at + bound]
    assert late and all(r == "ok" and rest != "be2" for _, r, rest in late)
    assert backend_health(balancer.status(), "hello")["be2"] == "down"
    assert "be2 (10.10.0.12) of hello: up -> down: connect to 10.10.0.12:104 refused" in balancer.log()

    lab.start_backend("be2")
    balancer.wait_for(lambda st: backend_in_table(st, "hello", "be2"), RISE * INTERVAL + 2, "be2 up and in the table")
    assert "be2" in client(lab, "hello", lab.vip, 104, 40)


def _carrier(lab, port=9000) -> str:
    """Which backend holds the client's established connection to the sink
    (not a health probe's from the lb, which the sink port also sees)."""
    for name in lab.backend_names():
        match = f"( sport = :{port} and dst {lab.host_ip('client')} )"
        out = lab.run(name, "ss", "-Htn", "state", "established", match).stdout
        if out.strip():
            return name
    raise AssertionError("no backend holds the upload")


def test_long_transfer_survives_another_backend_leaving_and_returning(lab, balancer, pool_file):
    total = 24 * 1024 * 1024
    upload = client_popen(lab, "upload", lab.vip, 9000, total, 12)
    assert upload.stdout.readline().startswith("connected")
    deadline = time.monotonic() + 5
    while True:
        try:
            carrier = _carrier(lab)
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    other = next(n for n in lab.backend_names() if n != carrier)

    # The other backend's host vanishes from the segment (no RST) and returns.
    lab.link(other, False)
    balancer.wait_for(lambda st: backend_health(st, "sink")[other] == "down", FALL * INTERVAL + 2, f"{other} down")
    lab.link(other, True)
    balancer.wait_for(lambda st: backend_health(st, "sink")[other] == "up", RISE * INTERVAL + 3, f"{other} up")
    # ...and is removed from the pool and put back, by reload.
    good = pool_file.read_text()
    pool_file.write_text(pool_text(lab, INTERVAL, TIMEOUT, RISE, FALL, skip=(other,)))
    balancer.signal(signal.SIGHUP)
    balancer.wait_for(lambda st: other not in backend_health(st, "sink"), 5, f"{other} removed")
    pool_file.write_text(good)
    balancer.signal(signal.SIGHUP)
    balancer.wait_for(lambda st: backend_health(st, "sink").get(other) == "up", 5, f"{other} back")

    out, _ = upload.communicate(timeout=60)
    assert upload.returncode == 0, out
    reply = out.splitlines()[-1].split()
    assert reply == ["reply", carrier, str(total)], out


def test_sighup_with_broken_pool_keeps_serving(lab, balancer, pool_file):
    good = pool_file.read_text()
    before = balancer.status()
    try:
        pool_file.write_text(good.replace('port = 104', 'port = 104000', 1))
        balancer.signal(signal.SIGHUP)
        balancer.wait_for(lambda st: st["last_reload"]["result"] == "rejected", 5, "the reload to be rejected")
        assert "port = 104000" in balancer.status()["last_reload"]["error"]
        assert "keeping the running configuration" in balancer.log()
        pool_file.write_text("[[service]\nname = ")
        balancer.signal(signal.SIGHUP)
        balancer.wait_for(lambda st: "TOML" in st["last_reload"].get("error", ""), 5, "the syntax error")
        names = client(lab, "hello", lab.vip, 104, 30)
        assert set(names) == set(lab.backend_names())
        after = balancer.status()
        assert [s["name"] for s in after["services"]] == [s["name"] for s in before["services"]]
    finally:
        pool_file.write_text(good)


def test_sigterm_leaves_no_program_and_no_vip(lab, balancer):
    assert xdp_attached(lab) and lab.vip in lb_addresses(lab)
    assert balancer.stop() == 0
    assert not xdp_attached(lab)
    assert lab.vip not in lb_addresses(lab)
    assert not list(balancer.run_dir.rglob("*.sock"))


def test_detach_cleans_up_after_kill_9(lab, pool_file, tmp_path):
    b = Balancer(lab, pool_file, tmp_path / "run", tmp_path / "xdplb.log").start()
    try:
        b.wait_ready()
        b.kill()
        # The program outlives its controller and keeps forwarding the last state.
        assert xdp_attached(lab) and lab.vip in lb_addresses(lab)
        assert set(client(lab, "hello", lab.vip, 104, 30)) == set(lab.backend_names())
        result = b.cli("detach", "eth0")
        assert "XDP program" in result.stdout and f"VIP {lab.vip}" in result.stdout
        assert "pinned maps" in result.stdout
        assert not xdp_attached(lab)
        assert lab.vip not in lb_addresses(lab)
        assert not any(b.bpffs.rglob("flows")), "detach unpins the maps"
        again = b.cli("detach", "eth0")
        assert "nothing of xdplb's was left" in again.stdout
    finally:
        b.release()
