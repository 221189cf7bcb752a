"""xdplb's hitless restart leaves HAProxy running and the next xdplb adopts it: which
process counts as ours (left_running), and a real HAProxy (Debian's, on 127.0.0.1, no
root) left running by one HaproxyTier, adopted by the next, and stopped by a clean stop."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import time
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from xdplb.config import parse_pool
from xdplb.haproxy import server_states
from xdplb.supervisor import Supervisor
from xdplb.tlstier import HaproxyTier, left_running, worker_pid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for certs.py

from certs import make_cert  # noqa: E402


def fake_master(*argv: str) -> subprocess.Popen:
    """A process whose command line reads `argv` (argv[0] as given), sleeping."""
    proc = subprocess.Popen([argv[0], "-c", "import time; time.sleep(60)", *argv[1:]], executable=sys.executable)
    for _ in range(500):       # until it has exec'd: before, /proc shows our own command line
        if Path(f"/proc/{proc.pid}/cmdline").read_bytes().startswith(argv[0].encode() + b"\0-c"):
            return proc
        time.sleep(0.01)
    raise AssertionError(f"{argv} did not start")


@pytest.fixture
def procs():
    made = []
    yield made
    for p in made:
        p.kill()
        p.wait()


def test_left_running_is_a_live_haproxy_on_our_configuration_only(tmp_path, procs):
    config, pid_file = tmp_path / "eth0.haproxy.cfg", tmp_path / "eth0.haproxy.pid"
    assert left_running(pid_file, config) is None                 # no pid file
    ours = fake_master("/usr/sbin/haproxy", "-W", "-db", "-f", str(config))
    procs.append(ours)
    pid_file.write_text(f"{ours.pid}\n")
    master = left_running(pid_file, config)
    assert master is not None and master.pid == ours.pid and master.adopted and master.alive
    master.close()
    other = fake_master("/usr/sbin/haproxy", "-W", "-db", "-f", str(tmp_path / "eth1.haproxy.cfg"))
    stranger = fake_master("/usr/bin/sleepy", "-f", str(config))
    procs += [other, stranger]
    for proc in (other, stranger):
        pid_file.write_text(f"{proc.pid}\n")
        assert left_running(pid_file, config) is None
    pid_file.write_text("not a pid\n")
    assert left_running(pid_file, config) is None
    ended = fake_master("/usr/sbin/haproxy", "-f", str(config))
    ended.kill()
    ended.wait()
    pid_file.write_text(f"{ended.pid}\n")
    assert left_running(pid_file, config) is None


def test_an_adopted_master_is_waited_for_and_signalled_through_its_pidfd(tmp_path, procs):
    config, pid_file = tmp_path / "eth0.haproxy.cfg", tmp_path / "eth0.haproxy.pid"
    proc = fake_master("haproxy", "-f", str(config))
    procs.append(proc)
    pid_file.write_text(f"{proc.pid}\n")

    async def main():
        master = left_running(pid_file, config)
        waiters = [asyncio.ensure_future(master.wait()) for _ in range(2)]   # two waiters, one pidfd
        await asyncio.sleep(0.1)
        assert not any(w.done() for w in waiters)
        await master.stop()
        assert await asyncio.gather(*waiters) == [None, None]
        assert not master.alive and master.pidfd is None

    asyncio.run(main())
    assert proc.wait(5) == -15        # SIGTERM reached it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


POOL = """\
[[service]]
name = "web-tls"
vip = "10.10.0.100"
port = {port}
  [service.tls]
  certificate = "{cert}"
  backend_protocol = "http"
  backend_port = 8042
  [service.health]
  check = "tcp"
  [[service.backend]]
  name = "pacs-a"
  address = "10.10.0.11"
"""


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="Debian's haproxy is not installed")
def test_a_haproxy_left_running_is_adopted_and_a_clean_stop_stops_it(tmp_path):
    cert = make_cert(tmp_path, "pacs")
    pool = parse_pool(POOL.format(port=free_port(), cert=cert), str(tmp_path / "pool.toml"))
    # A VIP this unprivileged test can bind: the pool refuses loopback VIPs, HAProxy does not.
    pool = dataclasses.replace(pool, services=tuple(dataclasses.replace(s, vip=IPv4Address("127.0.0.1"))
                                                    for s in pool.services))
    run = tmp_path / "run"

    def tier():
        return HaproxyTier(run, "eth0", Supervisor(), lambda p: server_states(p, {}))

    async def started(t: HaproxyTier):
        await t.commit(pool, await t.prepare(pool))
        for _ in range(200):
            if t.running and t._serving.is_set():
                return t
            await asyncio.sleep(0.05)
        raise AssertionError("haproxy did not start")

    async def main():
        first = await started(tier())
        pid = first.master.pid
        assert not first.master.adopted and (run / "eth0.haproxy.pid").read_text() == f"{pid}\n"
        worker = worker_pid(str(first.socket_path))
        first.leave_running()                      # SIGUSR1
        await first.supervisor.stop_all()
        assert worker_pid(str(first.socket_path)) == worker, "HAProxy must keep serving"

        second = await started(tier())
        assert second.master.pid == pid and second.master.adopted
        assert worker_pid(str(second.socket_path)) not in (None, worker), "adopting reloads it"
        await second.supervisor.stop_all()         # a clean stop (SIGTERM to xdplb)
        assert not second.running
        assert worker_pid(str(second.socket_path)) is None
        assert not (run / "eth0.haproxy.pid").exists()
        return pid

    pid = asyncio.run(main())
    with pytest.raises(ProcessLookupError):       # gone (reaped by the first tier's child watcher)
        os.kill(pid, 0)
