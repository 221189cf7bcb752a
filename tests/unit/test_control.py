"""The control socket and instance liveness, against a real daemon socket.

The daemon is Daemon with the fakes of tests/fakes.py (test_daemon.py's
Harness); the socket, the lock file, the CLI and the clients are real. A
"busy" daemon is one whose event loop is blocked (a probe that sleeps on
the loop thread, as a long reload does): it holds its lock but cannot
answer. The test's own steps then run in a worker thread.
"""
from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import random
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))  # test_daemon's harness

from test_daemon import IF, INDEX, Harness, h, run_dir, running  # noqa: E402,F401  (fixtures)

import xdplb.netlink  # noqa: E402
from xdplb import control  # noqa: E402
from xdplb.cli import cli  # noqa: E402
from xdplb.daemon import Daemon  # noqa: E402

NOBODY = 65534


def ask(raw: bytes, *, shut: bool = True, timeout: float = 5.0) -> bytes:
    """Send raw bytes to the daemon's socket and read until it closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(control.socket_path(IF)))
        try:
            s.sendall(raw)
            if shut:
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed on us mid-send (a huge line): what it said is still readable
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    return data


def one_reply(data: bytes) -> dict:
    assert data.endswith(b"\n") and data.count(b"\n") == 1, data[:200]
    reply = json.loads(data)
    assert isinstance(reply, dict)
    return reply


def no_tracebacks(caplog) -> None:
    bad = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()
           or "exception" in r.getMessage().lower()]
    assert not bad, [(r.name, r.getMessage()) for r in bad]


class Busy:
    """A prober that, once armed, blocks the daemon's event loop for `seconds`."""

    def __init__(self, real, seconds: float):
        self.real, self.seconds = real, seconds
        self.armed = threading.Event()
        self.blocking = threading.Event()

    async def __call__(self, health, address):
        if self.armed.is_set():
            self.armed.clear()
            self.blocking.set()
            time.sleep(self.seconds)  # on the loop thread: nothing else runs meanwhile
        return await self.real(health, address)

    def block(self) -> None:
        self.armed.set()
        assert self.blocking.wait(5), "the loop never got blocked"


def busy_daemon(h: Harness, seconds: float) -> tuple[Daemon, Busy]:
    busy = Busy(h.prober, seconds)
    daemon = Daemon(IF, str(h.pool), "auto", dataplane_factory=h.factory, netlink=h.nl, probe=busy,
                    prog_name_lookup=lambda prog_id: h.prog_name)
    return daemon, busy


# ---- 3. a busy daemon is not a dead one ---------------------------------------


def test_a_second_attach_refuses_a_busy_daemon_and_leaves_its_socket(h):
    daemon, busy = busy_daemon(h, seconds=3.0)
    loaded = []

    def factory(settings, **kwargs):
        loaded.append(settings)
        raise AssertionError("the second instance got as far as loading a program")

    second = Daemon(IF, str(h.pool), "auto", dataplane_factory=factory, netlink=h.nl, probe=h.prober,
                    prog_name_lookup=lambda prog_id: h.prog_name)

    def while_busy():
        busy.block()
        with pytest.raises(control.NoAnswer):  # a ping times out: the old test of liveness
            control.request(IF, {"cmd": "ping"}, timeout=0.3)
        with pytest.raises(control.AlreadyRunning, match=f"another xdplb instance is running on {IF}"):
            asyncio.run(second.run())
        assert control.socket_path(IF).exists(), "the busy daemon's socket was deleted"
        assert loaded == []

    async def scenario():
        async with running(daemon):
            await asyncio.to_thread(while_busy)
            st = await asyncio.to_thread(control.request, IF, {"cmd": "status"})
            assert st["ready"] and st["pid"] == os.getpid()

    asyncio.run(scenario())
    assert not control.lock_path(IF).exists(), "the lock file outlived the daemon"


def test_detach_refuses_a_busy_daemon_and_takes_nothing(h, monkeypatch):
    daemon, busy = busy_daemon(h, seconds=3.0)
    monkeypatch.setattr(xdplb.netlink, "Netlink", lambda: h.nl)  # detach's netlink is the daemon's fake

    def while_busy():
        busy.block()
        result = CliRunner().invoke(cli, ["detach", IF])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        assert result.output == (f"Error: an xdplb instance is running on {IF}: stop it with SIGTERM "
                                 f"(systemctl stop xdplb@{IF}) instead\n")
        assert control.socket_path(IF).exists()

    async def scenario():
        async with running(daemon):
            vips = set(h.nl.ours[INDEX])
            assert vips
            await asyncio.to_thread(while_busy)
            assert h.nl.ours[INDEX] == vips and h.dp.attached, "detach took the VIPs or the program"
            assert (await asyncio.to_thread(control.request, IF, {"cmd": "ping"})) == {"ok": True}

    asyncio.run(scenario())


@pytest.mark.parametrize("argv", [["status", "-i", IF], ["status"], ["drain", "dicom", "pacs-a", "-i", IF],
                                  ["reload", "-i", IF], ["top", "--once", "-i", IF]])
def test_cli_says_one_sentence_when_the_daemon_is_slow(h, monkeypatch, argv):
    monkeypatch.setattr(control, "REQUEST_TIMEOUT", 0.3, raising=False)
    monkeypatch.setattr(control, "RELOAD_TIMEOUT", 0.3, raising=False)
    daemon, busy = busy_daemon(h, seconds=2.0)

    def while_busy():
        busy.block()
        return CliRunner().invoke(cli, argv)

    async def scenario():
        async with running(daemon):
            return await asyncio.to_thread(while_busy)

    result = asyncio.run(scenario())
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert result.output == (f"Error: the xdplb instance on {IF} did not answer within 0.3s: "
                             f"it is running but busy; try again\n")


def test_status_while_the_daemon_starts_says_so(run_dir):
    lock = control.InstanceLock.acquire(IF)  # a daemon still compiling: lock held, no socket yet
    try:
        result = CliRunner().invoke(cli, ["status", "-i", IF])
    finally:
        lock.release()
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "is still starting" in result.output and result.output.count("\n") == 1
    result = CliRunner().invoke(cli, ["status", "-i", IF])
    assert f"no xdplb instance is running on {IF}" in result.output


def test_a_dead_instances_lock_file_does_not_block_the_next_one(run_dir):
    # kill -9 leaves the lock file behind; the kernel has dropped the lock itself.
    control.lock_path(IF).parent.mkdir(parents=True, exist_ok=True)
    control.lock_path(IF).write_text("")
    assert not control.is_running(IF)
    lock = control.InstanceLock.acquire(IF, wait=0)
    assert control.is_running(IF)
    with pytest.raises(control.AlreadyRunning):
        control.InstanceLock.acquire(IF, wait=0.1)
    lock.release()
    assert not control.is_running(IF) and not control.lock_path(IF).exists()


# ---- 4. the control socket is an interface, not a trust boundary ------------------


@pytest.mark.parametrize("raw, says", [
    (b"[1, 2]\n", "must be a JSON object"),
    (b'"status"\n', "must be a JSON object"),
    (b"42\n", "must be a JSON object"),
    (b'{"cmd": 5}\n', 'no "cmd" string'),
    (b"{" + b" " * 100_000 + b"}\n", "longer than"),
    (b'{"cmd": "\xff\xfe"}\n', "not UTF-8"),
    (b"\n", "is empty"),
    (b"  \r\n", "is empty"),
    (b"{cmd: status}\n", "not valid JSON"),
    (b"[" * 5000 + b"]" * 5000 + b"\n", "nested too deeply"),  # deeper than the parser's recursion
    (b"[" * 10000 + b"\n", "nested too deeply"),
])
def test_each_malformed_request_gets_a_one_sentence_error(h, caplog, raw, says):
    caplog.set_level(logging.DEBUG)
    daemon = h.daemon()

    async def scenario():
        async with running(daemon):
            reply = one_reply(await asyncio.to_thread(ask, raw))
            assert says in reply["error"] and set(reply) == {"error"}, reply
            assert "\n" not in reply["error"] and len(reply["error"]) < 200
            assert (await asyncio.to_thread(control.request, IF, {"cmd": "ping"})) == {"ok": True}

    asyncio.run(scenario())
    no_tracebacks(caplog)


def test_an_idle_client_is_dropped(h, monkeypatch):
    monkeypatch.setattr(control, "IDLE_TIMEOUT", 0.3, raising=False)
    daemon = h.daemon()

    def idle():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(control.socket_path(IF)))
            started = time.monotonic()
            s.sendall(b'{"cmd": "sta')  # and then nothing
            data = b""
            while chunk := s.recv(1000):
                data += chunk
            return data, time.monotonic() - started

    async def scenario():
        async with running(daemon):
            (data, seconds), ping = await asyncio.gather(
                asyncio.to_thread(idle), asyncio.to_thread(control.request, IF, {"cmd": "ping"}))
            assert ping == {"ok": True}  # others are served meanwhile
            assert "no request within 0.3s" in one_reply(data)["error"]
            assert seconds < 2.0

    asyncio.run(scenario())


def test_a_client_that_is_not_root_is_refused(h):
    daemon = h.daemon()

    def as_nobody(message: dict) -> dict:
        # A client process running as nobody, so SO_PEERCRED shows a real non-root peer.
        script = ("import json, socket, sys\n"
                  "s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(sys.argv[1])\n"
                  "try: s.sendall(sys.argv[2].encode() + b'\\n')\n"
                  "except BrokenPipeError: pass\n"
                  "data = b''\n"
                  "while chunk := s.recv(1000): data += chunk\n"
                  "print(data.decode(), end='')\n")
        proc = subprocess.run(["/usr/bin/python3", "-I", "-c", script, str(control.socket_path(IF)),
                               json.dumps(message)], user=NOBODY, group=NOBODY, cwd="/",
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    async def scenario():
        async with running(daemon):
            # Loosened by mistake: the directory and the socket open to all.
            path = control.socket_path(IF)
            path.parent.chmod(0o755)
            path.chmod(0o666)
            reply = await asyncio.to_thread(as_nobody, {"cmd": "ping"})
            assert reply == {"error": "the xdplb control socket is for root only"}
            assert (await asyncio.to_thread(control.request, IF, {"cmd": "ping"})) == {"ok": True}

    asyncio.run(scenario())


def test_the_socket_is_created_with_its_final_mode(h, monkeypatch):
    # The mode the socket has at listen(), before anyone could chmod it.
    at_listen = {}
    listen = socket.socket.listen

    def spy(self, *args):
        if self.family == socket.AF_UNIX:
            at_listen[self.getsockname()] = stat.S_IMODE(os.stat(self.getsockname()).st_mode)
        return listen(self, *args)

    monkeypatch.setattr(socket.socket, "listen", spy)
    old = os.umask(0o022)
    try:
        daemon = h.daemon()

        async def scenario():
            async with running(daemon):
                path = str(control.socket_path(IF))
                assert at_listen == {path: 0o600}
                assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

        asyncio.run(scenario())
        assert os.umask(0o022) == 0o022, "the process umask was left changed"
    finally:
        os.umask(old)


@pytest.mark.parametrize("spoil", ["owner", "group-writable", "symlink"])
def test_a_run_directory_owned_by_someone_else_is_refused(h, run_dir, spoil):
    if spoil == "owner":
        os.chown(run_dir, NOBODY, NOBODY)
        says = f"is owned by uid {NOBODY}"
    elif spoil == "group-writable":
        run_dir.chmod(0o770)
        says = "is writable by other users"
    else:
        real = run_dir.with_name(run_dir.name + "-real")
        real.mkdir(mode=0o700)
        run_dir.rmdir()
        run_dir.symlink_to(real)
        says = "is not a directory"
    daemon = h.daemon()
    try:
        with pytest.raises(control.UnsafeRunDir, match=says):
            asyncio.run(asyncio.wait_for(daemon.run(), 5))
        assert h.made == [], "the daemon went on to load a program"
        assert not control.socket_path(IF).exists()
    finally:
        if run_dir.is_symlink():
            run_dir.unlink()
            real.rmdir()


# ---- the fuzz test ----------------------------------------------------------------

SEED = int(os.environ.get("XDPLB_FUZZ_SEED", "20261129"))


def fuzz_inputs(rng: random.Random) -> list[tuple[bytes, bool]]:
    """(raw bytes, shut down the write side after sending) pairs."""
    wrong_types = [
        b"null", b"true", b"3.5", b'"ping"', b"[]", b'[{"cmd": "ping"}]', b"{}", b'{"cmd": null}',
        b'{"cmd": 7}', b'{"cmd": ["status"]}', b'{"cmd": {"cmd": "ping"}}', b'{"cmd": true}',
        b'{"cmd": "drain"}', b'{"cmd": "drain", "service": [1], "backend": {"a": null}}',
        b'{"cmd": "undrain", "service": 1e400, "backend": -0}', b'{"cmd": "drain", "service": "\\ud800"}',
        b'{"cmd": "status", "cmd": "ping"}', b'{"cmd": "\\u0000"}', b'{"cmd": "' + b"x" * 5000 + b'"}',
        b'{"cmd": NaN}', b'{"cmd": "ping", "x": ' + b"9" * 5000 + b"}", b"{" * 3000, b"[" * 9000 + b"]" * 9000,
    ]
    cases = [(t + b"\n", False) for t in wrong_types] + [(t, True) for t in wrong_types]
    cases += [(b"x" * (1 << 20), False), (b"{" + b"a" * (control.MAX_REQUEST * 4) + b"}\n", False),
              (b"\n" * 1000, False), (b"\r\n", False), (b"", True), (b"\xff" * 100 + b"\n", False),
              (b"\xc0\x80\n", False), (b"\x00" * 64 + b"\n", False)]
    for _ in range(120):
        size = rng.choice([1, 7, 100, 1000, 20000, 100000])
        blob = rng.randbytes(size)
        cases.append((blob, rng.random() < 0.5))
    for _ in range(60):
        # Valid JSON shapes with random values in the fields.
        value = rng.choice([None, True, rng.random(), rng.randint(-2 ** 70, 2 ** 70), "",
                            rng.randbytes(8).hex(), [], {}, ["status"]])
        field = rng.choice(["cmd", "service", "backend", "x"])
        doc = {"cmd": rng.choice(["ping", "drain", "undrain", "bogus", "status"]), field: value}
        cases.append((json.dumps(doc).encode() + b"\n", rng.random() < 0.5))
    rng.shuffle(cases)
    return cases


def test_fuzzed_control_socket_answers_or_closes_never_logs_a_traceback(h, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(control, "IDLE_TIMEOUT", 0.5, raising=False)
    rng = random.Random(SEED)
    cases = fuzz_inputs(rng)
    daemon = h.daemon()
    outcomes: list = []

    def one(raw: bytes, shut: bool) -> None:
        try:
            data = ask(raw, shut=shut, timeout=5.0)
        except (socket.timeout, TimeoutError):
            outcomes.append(("hung", raw[:60]))
            return
        if not data:
            outcomes.append(("closed", raw[:60]))
            return
        reply = one_reply(data)
        outcomes.append(("answered", raw[:60], reply))

    def fuzz():
        threads = []
        for i, (raw, shut) in enumerate(cases):
            t = threading.Thread(target=one, args=(raw, shut))
            t.start()
            threads.append(t)
            if i % 16 == 15:
                for t in threads:
                    t.join()
                threads = []
        for t in threads:
            t.join()

    async def scenario():
        async with running(daemon):
            await asyncio.to_thread(fuzz)
            # Still responsive, still the same daemon, still balancing.
            assert (await asyncio.to_thread(control.request, IF, {"cmd": "ping"})) == {"ok": True}
            st = await asyncio.to_thread(control.request, IF, {"cmd": "status"})
            assert st["ready"] and {b["health"] for s in st["services"] for b in s["backends"]} == {"up"}

    asyncio.run(scenario())
    assert len(outcomes) == len(cases)
    hung = [o for o in outcomes if o[0] == "hung"]
    assert not hung, f"seed {SEED}: {hung[:5]}"
    # Only a client that sent nothing at all is closed without a word.
    closed = [o for o in outcomes if o[0] == "closed"]
    assert all(o[1] == b"" for o in closed), f"seed {SEED}: {closed[:5]}"
    answered = [o[2] for o in outcomes if o[0] == "answered"]
    assert all("error" in r or r == {"ok": True} or "services" in r or "changed" in r for r in answered)
    assert sum("error" in r for r in answered) > len(cases) * 0.7
    no_tracebacks(caplog)
    # Nothing drained by accident: the random fields named no real backend.
    assert daemon.drained == set()


def test_request_path_reports_a_trickling_daemon_as_a_timeout(tmp_path):
    # A peer that sends a byte every 0.1 s must not keep the client past its timeout.
    path = tmp_path / "s.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()
    stop = threading.Event()

    def trickle():
        conn, _ = server.accept()
        with conn:
            for _ in range(50):  # 5 s at most, then it closes
                if stop.is_set():
                    return
                try:
                    conn.sendall(b" ")
                except OSError as exc:
                    assert exc.errno in (errno.EPIPE, errno.ECONNRESET)
                    return
                time.sleep(0.1)

    t = threading.Thread(target=trickle)
    t.start()
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            control.request_path(path, {"cmd": "ping"}, timeout=0.5)
    finally:
        stop.set()
        t.join()
        server.close()
    assert time.monotonic() - started < 2.0
