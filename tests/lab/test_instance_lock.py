"""A stopped (SIGSTOP) daemon is busy, not dead: nothing takes over its interface.

The real daemon runs in the lab's lb namespace through `ip netns exec` (its
own mount namespace), generic mode on veth (`--mode auto` picks it there),
with real backends and real TCP through the VIP. SIGSTOP freezes it: it
answers nothing, as a daemon stuck in a long reload would not, yet it still
holds its instance lock. A second `xdplb attach`, `xdplb detach` and the
CLI's status must all see that and change nothing.
"""
from __future__ import annotations

import json
import signal
import time

import pytest

from lab_xdplb import backend_health, client, lb_addresses, pool_text, running_balancer, xdp_attached

pytestmark = [pytest.mark.root, pytest.mark.lab]


def prog_id(lab) -> int | None:
    """Id of the XDP program on the lb namespace's eth0 (None without one)."""
    link = json.loads(lab.run("lb", "ip", "-j", "link", "show", "eth0").stdout)[0]
    return link.get("xdp", {}).get("prog", {}).get("id")


def test_a_frozen_daemon_keeps_its_interface(lab, tmp_path):
    pool = tmp_path / "pool.toml"
    pool.write_text(pool_text(lab, 1.0, 0.5, 2, 2))
    with running_balancer(lab, pool, tmp_path / "xdplb") as b:
        st = b.status()
        sock = next(b.run_dir.rglob("eth0.sock"))
        locks = lambda: list(b.run_dir.rglob("eth0.lock"))  # noqa: E731
        prog = prog_id(lab)
        assert prog and xdp_attached(lab) and any(b.bpffs.rglob("flows"))
        b.signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            status = b.cli("status", "-i", "eth0", check=False)
            assert status.returncode == 1
            assert status.stderr == ("Error: the xdplb instance on eth0 did not answer within 5s: "
                                     "it is running but busy; try again\n")
            assert time.monotonic() - started < 10

            second = b.cli("attach", "eth0", "--pool", str(pool), check=False)
            assert second.returncode == 1, second.stdout + second.stderr
            assert "another xdplb instance is running on eth0" in second.stderr
            assert "Traceback" not in second.stderr

            detach = b.cli("detach", "eth0", check=False)
            assert detach.returncode == 1
            assert detach.stderr == ("Error: an xdplb instance is running on eth0: stop it with SIGTERM "
                                     "(systemctl stop xdplb@eth0) instead\n")

            # Nothing was taken: socket, lock, program, VIP and forwarding are all as they were.
            assert sock.exists() and len(locks()) == 1
            assert prog_id(lab) == prog and any(b.bpffs.rglob("flows"))
            assert lab.vip in lb_addresses(lab)
            assert set(client(lab, "hello", lab.vip, 104, 30)) == set(lab.backend_names())
        finally:
            b.signal(signal.SIGCONT)
        again = b.status()
        assert again["pid"] == st["pid"] and again["ready"]
        assert all(h == "up" for h in backend_health(again, "hello").values())
        assert b.stop() == 0
        assert not locks() and not sock.exists()
