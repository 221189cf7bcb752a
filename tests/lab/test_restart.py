"""Hitless restart, drain, and failing fast (issue 3), on the real lab.

All in generic mode on veth (`--mode auto` picks it there). Each test starts
its own balancer; the lab's bpffs for pins is mounted in the host mount
namespace so a restarted daemon inside `ip netns exec` finds the maps.
"""
from __future__ import annotations

import functools
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from lab_xdplb import Balancer, backend_health, client_popen, lb_addresses, pool_text, xdp_attached

from xdplb import flowhash, maglev, pinning
from xdplb.config import Settings

pytestmark = [pytest.mark.root, pytest.mark.lab]

TOOL = str(Path(__file__).resolve().parents[2] / "tools" / "lab_client.py")


@pytest.fixture
def make_balancer(lab, tmp_path):
    made = []

    def make(pool: Path, name="xdplb", host_bpffs=True) -> Balancer:
        b = Balancer(lab, pool, tmp_path / "run", tmp_path / f"{name}.log", bpffs=tmp_path / "bpffs",
                     host_bpffs=host_bpffs)
        made.append(b)
        return b

    yield make
    for b in made:
        if b.proc is not None and b.proc.poll() is None:
            b.stop()
    if made:
        made[-1].cli("detach", "eth0", check=False)
        made[-1].release()


def _upload(lab, total, seconds, sport):
    return client_popen(lab, "upload", lab.vip, 9000, total, seconds, sport)


@functools.lru_cache(maxsize=None)
def _table(backends: tuple) -> list:
    return maglev.build_table([maglev.MaglevBackend(a, 1, i + 1) for i, a in enumerate(backends)], 65537)


def _owner(backends, sport):
    """Which backend address Maglev gives the sink flow from this client port."""
    ordered = tuple(sorted(backends))
    slot = flowhash.flow_hash_v4(0, "10.10.0.2", "10.10.0.100", sport, 9000, 6) % 65537
    return ordered[_table(ordered)[slot] - 1]


# How xdplb is started: pins on a bpffs in the host's mount namespace (the
# lab's default); as the README's PACS walkthrough runs it (`ip netns exec
# xl-lb xdplb attach eth0 ...`, no XDPLB_BPFFS), where the bpffs it mounts
# dies with it; and as in a container with host networking, stood in for by
# unshare: a mount and pid namespace of its own in the lb's network
# namespace, killed whole (--kill-child) by kill -9. In the last two no pin
# survives and the restart takes the maps from the attached program by id.
WAYS = {
    "pins-on-a-host-bpffs": (True, [], 42000),
    "as-the-readme-runs-it": (False, [], 52000),
    "in-a-container-with-host-networking": (False, ["unshare", "--mount", "--pid", "--fork", "--mount-proc",
                                                    "--kill-child"], 57000),
}


@pytest.mark.parametrize("way", list(WAYS))
def test_restart_after_kill_9_adopts_flows_even_when_the_table_changes(lab, tmp_path, make_balancer, way):
    host_bpffs, wrapper, base = WAYS[way]   # base: client ports of its own (another run's may be in TIME_WAIT)
    two = [lab.backend_ip(1), lab.backend_ip(2)]
    three = two + [lab.backend_ip(3)]
    # Client ports whose flow sits on be1/be2 now and whose slot belongs to be3
    # once be3 joins: only the adopted flow table can keep them in place.
    movers = [p for p in range(base, base + 5000) if _owner(three, p) == lab.backend_ip(3)][:5]
    sports, fresh_port = movers[:4], movers[4]
    expected = {p: _owner(two, p) for p in sports}
    pool = tmp_path / "pool.toml"
    pool.write_text(pool_text(lab, skip=("be3",)))
    argv = [*wrapper, Balancer.cli_path, "attach", "eth0", "--pool", str(pool), "--mode", "auto"]
    first = make_balancer(pool, "first", host_bpffs).start(argv)
    first.wait_ready()
    if not host_bpffs:
        assert "a restart takes the maps from the attached program" in first.log(), "said at the first start"

    total = 6 * 1024 * 1024
    uploads = {p: _upload(lab, total, 25, p) for p in sports}
    for proc in uploads.values():
        assert proc.stdout.readline().startswith("connected")
    time.sleep(1)
    first.kill()  # kill -9: no clean-up at all
    assert xdp_attached(lab) and lab.vip in lb_addresses(lab)

    pool.write_text(pool_text(lab))  # be3 joins while no controller runs
    second = make_balancer(pool, "second", host_bpffs).start(argv)
    st = second.wait_ready()
    assert "adopted pinned maps" in second.log()
    if not host_bpffs:
        every_map = len(pinning.map_specs(Settings()))
        assert f"took {every_map} from the attached program" in second.log()
    assert "replaced the running xdplb program" in second.log()
    assert backend_health(st, "sink")["be3"] == "up"

    names = {lab.backend_ip(i): f"be{i}" for i in (1, 2, 3)}
    for p, proc in uploads.items():
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, out
        assert out.splitlines()[-1].split() == ["reply", names[expected[p]], str(total)], (p, out)
    # A new flow from such a port goes to be3: the table really changed.
    fresh = lab.run("client", "/usr/bin/python3", TOOL, "upload", lab.vip, 9000, 1000, 0.1, fresh_port).stdout
    assert fresh.splitlines()[-1].split()[1] == "be3"
    if wrapper:
        # Stop the container as `docker stop` does: SIGTERM to its first
        # process (unshare itself ignores it and waits for that process).
        pid = second.proc.pid
        (child,) = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        os.kill(int(child), signal.SIGTERM)
        assert second.proc.wait(20) == 0
        assert not xdp_attached(lab), "a clean stop in the container detaches"


def test_sigusr1_leaves_everything_running_for_the_next_attach(lab, tmp_path, make_balancer):
    pool = tmp_path / "pool.toml"
    pool.write_text(pool_text(lab))
    first = make_balancer(pool, "first").start()
    first.wait_ready()
    first.cli("drain", "hello", "be1")
    first.signal(signal.SIGUSR1)
    assert first.proc.wait(20) == 75
    assert xdp_attached(lab) and lab.vip in lb_addresses(lab)
    served = {line for line in lab.run("client", "/usr/bin/python3", TOOL, "hello", lab.vip, 104, 30).stdout.split()}
    assert served == {"be2", "be3"}, "the program must keep forwarding, drain included"

    second = make_balancer(pool, "second").start()
    st = second.wait_ready()
    hello = next(s for s in st["services"] if s["name"] == "hello")
    assert next(b for b in hello["backends"] if b["name"] == "be1")["drained"] is True
    assert second.stop() == 0
    assert not xdp_attached(lab) and lab.vip not in lb_addresses(lab)
    assert not any((tmp_path / "bpffs").rglob("flows")), "a clean stop unpins the maps"


def test_drain_keeps_flows_and_wait_returns_once_idle(lab, tmp_path, make_balancer):
    pool = tmp_path / "pool.toml"
    pool.write_text(pool_text(lab))
    b = make_balancer(pool).start()
    b.wait_ready()
    upload = _upload(lab, 3 * 1024 * 1024, 6, 0)
    assert upload.stdout.readline().startswith("connected")
    time.sleep(0.5)
    carrier = next(n for n in lab.backend_names()
                   if lab.run(n, "ss", "-Htn", "state", "established", "( sport = :9000 )").stdout.strip())
    started = time.monotonic()
    waiter = subprocess.Popen(["ip", "netns", "exec", lab.ns("lb"), b.cli_path, "drain", "sink", carrier,
                               "--wait", "--idle", "2", "--timeout", "60"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=b.env())
    # New flows avoid the drained backend while its upload keeps going.
    time.sleep(1.0)
    for _ in range(20):
        new = lab.run("client", "/usr/bin/python3", TOOL, "upload", lab.vip, 9000, 100, 0.01).stdout
        assert new.splitlines()[-1].split()[1] != carrier
    out, _ = upload.communicate(timeout=60)
    upload_done = time.monotonic()
    assert out.splitlines()[-1].split() == ["reply", carrier, str(3 * 1024 * 1024)]
    wait_out, _ = waiter.communicate(timeout=60)
    returned = time.monotonic()
    assert waiter.returncode == 0, wait_out
    assert "safe to take down" in wait_out
    assert returned >= upload_done + 1.5, "drain --wait returned while the backend still carried traffic"
    assert returned - started < 30
    b.cli("undrain", "sink", carrier)
    seen = {lab.run("client", "/usr/bin/python3", TOOL, "upload", lab.vip, 9000, 100, 0.01).stdout.split()[-2]
            for _ in range(30)}
    assert carrier in seen


def test_no_healthy_backend_fails_fast_with_reset(lab, tmp_path, make_balancer):
    pool = tmp_path / "pool.toml"
    pool.write_text(pool_text(lab, interval=0.5, timeout=0.25))
    b = make_balancer(pool).start()
    b.wait_ready()
    try:
        for name in lab.backend_names():
            lab.kill_backend(name)
        b.wait_for(lambda st: set(backend_health(st, "hello").values()) == {"down"}, 5, "all backends down")
        code = ("import socket,time\n"
                "t=time.monotonic()\n"
                "try:\n socket.create_connection(('%s',104),timeout=5); print('connected')\n"
                "except ConnectionRefusedError: print('refused %%.3f' %% (time.monotonic()-t))\n"
                "except OSError as e: print('other', type(e).__name__)\n") % lab.vip
        out = lab.run("client", "/usr/bin/python3", "-c", code).stdout.split()
        assert out[0] == "refused", out
        assert float(out[1]) < 1.0
        assert b.status()["not_forwarded"]["no_backend"] >= 1
    finally:
        for name in lab.backend_names():
            lab.start_backend(name)
