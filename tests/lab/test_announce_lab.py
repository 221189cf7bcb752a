"""One real balancer node announcing its VIP (root, namespace lab, generic
XDP on veth, real TCP): the route in [xdplb] announce_table and the ready
file follow the backends' health, `xdplb drain-node` withdraws and keeps
forwarding a running upload until the counters are still, and SIGTERM with
stop_drain does the same before it detaches. The routers and the second
node are the multi-node lab's (issue 12); here the route table and the
ready file are read directly.
"""
from __future__ import annotations

import signal
import subprocess
import time

import pytest

from lab_xdplb import Balancer, XDPLB, backend_health, client_popen, pool_text, xdp_attached

pytestmark = [pytest.mark.root, pytest.mark.lab]

INTERVAL, TIMEOUT, RISE, FALL = 0.5, 0.3, 2, 2
TABLE = 100


def vip_routes(lab) -> list[str]:
    out = lab.run("lb", "ip", "-4", "route", "show", "table", str(TABLE)).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def wait_until(pred, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not pred():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - started


def upload_done(proc: subprocess.Popen, total: int) -> list[str]:
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert out.splitlines()[-1].split()[-1] == str(total), out
    return out.splitlines()


def test_the_route_and_ready_file_follow_health_drain_node_and_a_graceful_stop(lab, tmp_path):
    ready = tmp_path / "eth0.ready"
    pool = tmp_path / "pool.toml"
    pool.write_text(pool_text(lab, INTERVAL, TIMEOUT, RISE, FALL).replace(
        "[xdplb]\n", f'[xdplb]\nannounce_table = {TABLE}\nready_file = "{ready}"\nstop_drain = 20\n'
                     f"stop_drain_idle = 1.5\n", 1))
    announced = [f"blackhole {lab.vip} proto 120"]
    b = Balancer(lab, pool, tmp_path / "run", tmp_path / "xdplb.log").start()
    try:
        b.wait_ready()
        wait_until(lambda: vip_routes(lab) == announced, 5, "the VIP route")
        assert ready.read_text() == "0\n"

        # Every backend dies: the VIP is withdrawn within fall x interval (probes
        # run at half the interval while a verdict is in the balance) plus a pass.
        for name in lab.backend_names():
            lab.kill_backend(name)
        gone = wait_until(lambda: vip_routes(lab) == [], FALL * INTERVAL + 3, "the VIP withdrawn")
        assert ready.read_text() == "1\n"
        print(f"VIP withdrawn {gone:.2f}s after the backends died (fall {FALL} x interval {INTERVAL}s)")
        for name in lab.backend_names():
            lab.start_backend(name)
        back = wait_until(lambda: vip_routes(lab) == announced, RISE * INTERVAL + 5, "the VIP announced again")
        print(f"VIP announced again {back:.2f}s after the backends returned (rise {RISE})")
        assert all(h == "up" for h in backend_health(b.status(), "sink").values())

        # drain-node while an upload runs: withdrawn at once, forwarded to the end.
        total = 6 * 1024 * 1024
        upload = client_popen(lab, "upload", lab.vip, 9000, total, 4)
        assert upload.stdout.readline().startswith("connected")
        drain = subprocess.Popen(["ip", "netns", "exec", lab.ns("lb"), XDPLB, "drain-node", "-i", "eth0",
                                  "--idle", "1.5", "--timeout", "30"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=b.env())
        wait_until(lambda: vip_routes(lab) == [], 3, "the VIP withdrawn by drain-node")
        assert ready.read_text() == "1\n"
        assert upload.poll() is None, "the upload ended before the drain could be seen"
        upload_done(upload, total)
        out, _ = drain.communicate(timeout=40)
        assert drain.returncode == 0, out
        assert out.startswith(f"drained eth0: withdrew {lab.vip}; no packet forwarded for 1.5s"), out
        assert b.status()["announce"]["node_draining"] is True
        b.cli("undrain-node", "-i", "eth0")
        wait_until(lambda: vip_routes(lab) == announced, 3, "the VIP announced after undrain-node")

        # SIGTERM with stop_drain while an upload runs: withdraw, forward to the end, then detach.
        upload = client_popen(lab, "upload", lab.vip, 9000, total, 4)
        assert upload.stdout.readline().startswith("connected")
        b.signal(signal.SIGTERM)
        wait_until(lambda: vip_routes(lab) == [], 3, "the VIP withdrawn by SIGTERM")
        assert xdp_attached(lab), "detached before the drain"
        upload_done(upload, total)
        assert b.proc.wait(30) == 0, b.log()
        assert not xdp_attached(lab)
        assert ready.read_text() == "1\n"
        assert "stop drain: counters still" in b.log()
    finally:
        if b.proc.poll() is None:
            b.stop()
        b.release()
        print(b.log())
