"""File descriptors: idle metrics clients must not starve the health probes.

The metrics server is real (xdplb/exporter.py on 127.0.0.1) and so are the
clients and their sockets. The daemon test runs Daemon with the fakes of
tests/fakes.py in a child process with a low RLIMIT_NOFILE; its probes are
real TCP connects (xdplb.probes.tcp_probe) to a listener in that process,
because a probe that needs no descriptor could not show the starvation.
"""
from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # test_daemon's pool helper

from test_daemon import IF, run_dir  # noqa: E402,F401  (fixture)
from test_exporter import make_source  # noqa: E402

from xdplb import control, exporter  # noqa: E402
from xdplb.config import MAX_BACKENDS_RANGE, Settings  # noqa: E402
from xdplb.exporter import Exporter  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "tools" / "systemd" / "xdplb@.service"


def server_side_sockets(port: int) -> int:
    """Accepted TCP sockets of local port `port` that still hold a descriptor
    (the kernel shows inode 0 for one whose descriptor is closed)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if int(local.rsplit(":", 1)[1], 16) == port and state != "0A" and inode != "0":  # 0A: LISTEN
                    count += 1
    return count


def open_idle(port: int, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        try:
            out.append(socket.create_connection(("127.0.0.1", port), timeout=2))
        except OSError:
            pass  # the listen backlog was full for a moment
    return out


def scrape(port: int) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.status, r.read().decode()


def test_idle_metrics_clients_are_capped_and_dropped_and_a_scrape_still_works(monkeypatch):
    monkeypatch.setattr(exporter, "MAX_CLIENTS", 8, raising=False)
    monkeypatch.setattr(exporter, "HEAD_TIMEOUT", 0.5, raising=False)
    monkeypatch.setattr(exporter, "REQUEST_TIMEOUT", 0.5, raising=False)  # the old name, for the revert check

    async def scenario():
        exp = await Exporter(make_source(), "127.0.0.1:0").start()
        try:
            idle = await asyncio.to_thread(open_idle, exp.port, 100)
            assert len(idle) >= 90
            await asyncio.sleep(0.1)
            held = server_side_sockets(exp.port)
            status, body = await asyncio.to_thread(scrape, exp.port)  # while they all stay connected
            assert status == 200 and "xdplb_backend_up" in body
            await asyncio.sleep(0.8)  # past the head timeout: every idle one has been dropped
            after = server_side_sockets(exp.port)
            closed = 0
            for s in idle:
                s.settimeout(2)
                try:
                    closed += s.recv(100) == b""
                except ConnectionResetError:
                    closed += 1
                s.close()
            return held, after, closed, len(idle)
        finally:
            await exp.stop()

    held, after, closed, opened = asyncio.run(scenario())
    assert held <= 8, f"{held} server-side sockets held for {opened} idle clients"
    assert after == 0
    assert closed == opened


def test_a_full_house_of_busy_clients_gets_503_not_a_hang(monkeypatch):
    # Every slot is taken by a client being answered (it asked, but does not
    # read a large answer): there is no idle one to drop, so a newcomer is
    # told 503 at once instead of waiting or taking a descriptor for long.
    monkeypatch.setattr(exporter, "MAX_CLIENTS", 2, raising=False)
    big = b"# " + b"x" * (32 << 20) + b"\n"

    def ask_and_stall(port: int) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        return s

    def newcomer(port: int) -> int:
        try:
            return scrape(port)[0]
        except urllib.error.HTTPError as exc:
            return exc.code

    async def scenario():
        exp = await Exporter(make_source(), "127.0.0.1:0").start()
        exp.render = lambda accept="": (big, "text/plain")
        stalled = []
        try:
            stalled = [await asyncio.to_thread(ask_and_stall, exp.port) for _ in range(2)]
            await asyncio.sleep(0.3)
            started = time.monotonic()
            code = await asyncio.to_thread(newcomer, exp.port)
            return code, time.monotonic() - started, getattr(exp, "clients", None)
        finally:
            for s in stalled:
                s.close()
            await exp.stop()

    code, waited, clients = asyncio.run(scenario())
    assert code == 503 and waited < 2.0
    assert clients == 2


# ---- the daemon: probes keep working while idle metrics clients pile up ------------

CHILD = r"""
import asyncio, logging, resource, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from fakes import FakeDataplane, FakeNetlink
from test_daemon import IF, MACS, link
from xdplb import probes
from xdplb.daemon import Daemon

async def main():
    async def accept(reader, writer):
        writer.close()

    backend = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = backend.sockets[0].getsockname()[1]

    async def probe(health, address):
        # A real connect, so each probe needs a descriptor: the local listener
        # stands in for every backend address.
        return await probes.tcp_probe("127.0.0.1", port, health.timeout)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[4]), hard))
    daemon = Daemon(IF, sys.argv[3], "auto", dataplane_factory=FakeDataplane,
                    netlink=FakeNetlink([link()], neighbours=dict(MACS)), probe=probe,
                    prog_name_lookup=lambda prog_id: "other")
    await daemon.run()

asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_idle_metrics_clients_cannot_starve_the_probes_of_descriptors(tmp_path, run_dir):
    from test_daemon import pool_toml

    port = free_port()
    pool = tmp_path / "pool.toml"
    pool.write_text(pool_toml(fall=2).replace('metrics = ""', f'metrics = "127.0.0.1:{port}"')
                    .replace("interval = 0.05", "interval = 0.2").replace("timeout = 0.02", "timeout = 0.2"))
    log = tmp_path / "daemon.log"
    limit = 128
    with open(log, "w") as err:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(ROOT / "tests"), str(ROOT / "tests" / "unit"),
                                  str(pool), str(limit)], stderr=err, cwd=ROOT, env=dict(os.environ))
    idle: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if control.request(IF, {"cmd": "status"}, timeout=2)["ready"]:
                    break
            except control.NotRunning:
                pass
            assert child.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        before = len(os.listdir(f"/proc/{child.pid}/fd"))
        # Twice the descriptor limit in idle connections, then keep adding while we look.
        idle += open_idle(port, 2 * limit)
        peak = 0
        scrapes = []
        for _ in range(8):
            idle += open_idle(port, 20)
            peak = max(peak, len(os.listdir(f"/proc/{child.pid}/fd")))
            try:
                scrapes.append(scrape(port)[0])
            except OSError as exc:
                scrapes.append(str(exc))
            time.sleep(0.25)
        st = control.request(IF, {"cmd": "status"}, timeout=5)
    finally:
        for s in idle:
            s.close()
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    text = log.read_text()
    if os.environ.get("XDPLB_SHOW_DAEMON_LOG"):
        print(text[-3000:])
    print(f"daemon fds: {before} before, peak {peak} with {len(idle)} idle metrics clients (limit {limit})")
    assert len(idle) > limit
    assert "Too many open files" not in text, text[-2000:]
    assert "-> down" not in text, text[-2000:]
    assert scrapes == [200] * 8
    assert {b["health"] for s in st["services"] for b in s["backends"]} == {"up"}
    assert all(b["probe_ok"] for s in st["services"] for b in s["backends"])
    # The cap, plus at most one accept batch (the backlog, which is the cap)
    # before handlers drop any, plus a socket for each of the 7 probes in flight.
    assert peak <= before + 2 * exporter.MAX_CLIENTS + 7 + 2
    assert child.returncode == 0, text[-2000:]


# ---- the unit's descriptor limit ------------------------------------------------------


def test_the_unit_sets_a_descriptor_limit_that_fits_the_largest_default_pool():
    limits = re.findall(r"^LimitNOFILE=(\d+)$", UNIT.read_text(), re.M)
    assert len(limits) == 1, "the unit must set LimitNOFILE once (systemd's default soft limit is 1024)"
    # One descriptor per probe in flight (each backend has one) at the default
    # max_backends, plus the capped metrics and control clients, plus the
    # program's maps and the interpreter's own.
    need = (Settings().max_backends - 1) + exporter.MAX_CLIENTS + 16 + 256
    assert int(limits[0]) >= need
    assert int(limits[0]) <= MAX_BACKENDS_RANGE[1] * 2
