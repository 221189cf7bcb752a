"""The TLS tier: a supervised HAProxy driven by xdplb's verdicts.

HAProxy runs as our child in master-worker mode (`haproxy -W -db`), under the
daemon's Supervisor: if it exits for any reason but our stop, the task
raises and the Supervisor starts it again after its doubling back-off. Its
configuration is xdplb/haproxy.py's rendering of the pool with the current
states; its runtime API (the stats socket, mode 0600 in xdplb's 0700 run
directory) takes every later change of verdict, weight or drain as
`set server <service>/<backend> state ready|drain|maint` and
`set weight <service>/<backend> <n>`.

A reload writes the new configuration (checked first with `haproxy -c`, so a
bad certificate changes nothing) and sends SIGUSR2 to the master: it starts a
new worker on the same listening sockets and the old one finishes its
connections (hitless). The new worker starts from the states written in the
configuration and is then sent the whole state again.

The process and the socket are behind this class; the decisions (which
states, which lines) are pure functions in xdplb/haproxy.py.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Callable, Mapping

from .haproxy import ServerState, render, tls_services

log = logging.getLogger("xdplb")

SOCKET_TIMEOUT = 2.0      # one runtime API command
READY_TIMEOUT = 10.0      # a (re)started worker answers on its socket within this


class TlsTierError(RuntimeError):
    """One sentence: why HAProxy could not take a configuration or a command."""


def runtime_commands(old: Mapping[tuple, ServerState], new: Mapping[tuple, ServerState]) -> list[str]:
    """The runtime API commands that turn HAProxy's `old` server states into `new`."""
    out = []
    for (service, backend), want in sorted(new.items()):
        have = old.get((service, backend))
        if have is None or have.weight != want.weight:
            out.append(f"set weight {service}/{backend} {want.weight}")
        if have is None or have.state != want.state:
            out.append(f"set server {service}/{backend} state {want.state}")
    return out


def ask(path: str, command: str, timeout: float = SOCKET_TIMEOUT) -> str:
    """One command on HAProxy's runtime API; its reply text."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(command.encode() + b"\n")
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


def worker_pid(path: str) -> int | None:
    """The pid of the worker answering on the socket, or None when none answers."""
    try:
        info = ask(path, "show info", timeout=0.5)
    except OSError:
        return None
    for line in info.splitlines():
        if line.startswith("Pid:"):
            return int(line.split(":", 1)[1])
    return None


def server_admin_states(path: str) -> dict[tuple[str, str], tuple[str, int]]:
    """(proxy, server) -> (HAProxy's admin state word, weight) as HAProxy holds them now,
    read from `show servers state`: "ready", "drain" or "maint" as set through the API
    or the configuration."""
    out = {}
    lines = ask(path, "show servers state").splitlines()
    # Format 1: be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight ...
    for line in lines[2:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        admin = int(fields[6])
        # HAProxy's SRV_ADMF_MAINT (0x23: forced, inherited, DNS-resolution maintenance) and
        # SRV_ADMF_DRAIN (0x18: forced, inherited drain). 0x04 only records "disabled" in the
        # configuration, and stays set after `state ready` takes the server out of maintenance.
        word = "maint" if admin & 0x23 else "drain" if admin & 0x18 else "ready"
        out[(fields[1], fields[3])] = (word, int(fields[7]))
    return out


# Columns of HAProxy's `show stat` CSV that the status rows and the exporter carry.
STAT_COLUMNS = {"scur": "current", "stot": "connections", "bin": "bytes_in", "bout": "bytes_out",
                "econ": "connect_errors", "eresp": "response_errors"}


def parse_show_stat(text: str) -> dict[tuple[str, str], dict]:
    """(proxy, server) -> {"status": HAProxy's status word, and STAT_COLUMNS as ints}, for
    servers only (not the FRONTEND/BACKEND summary rows)."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("# "):
        return {}
    header = lines[0][2:].split(",")
    out = {}
    for line in lines[1:]:
        row = dict(zip(header, line.split(",")))
        if not row.get("svname") or row["svname"] in ("FRONTEND", "BACKEND"):
            continue
        counters = {name: int(row.get(column) or 0) for column, name in STAT_COLUMNS.items()}
        out[(row["pxname"], row["svname"])] = {"status": row.get("status", ""), **counters}
    return out


class HaproxyTier:
    def __init__(self, run_dir: Path, ifname: str, supervisor, states: Callable[[object], Mapping],
                 binary: str = "haproxy") -> None:
        self.binary = binary
        self.supervisor = supervisor
        self.states = states                    # pool -> the ServerStates wanted now
        self.config_path = run_dir / f"{ifname}.haproxy.cfg"
        self.socket_path = run_dir / f"{ifname}.haproxy.sock"
        self.proc: asyncio.subprocess.Process | None = None
        self.pushed: dict[tuple, ServerState] = {}   # what the running worker holds
        self.push_errors = 0
        self.starts = 0
        self.counters: dict[tuple[str, str], dict] = {}   # the last `show stat`, see refresh_counters
        self.certificates: tuple = ()                      # (service, tls.Certificate) in use
        self._wake = asyncio.Event()
        self._serving = asyncio.Event()
        self.pool = None

    # ---- configuration ---------------------------------------------------------

    def wanted(self, pool) -> bool:
        return bool(tls_services(pool))

    def render(self, pool, states: Mapping) -> str:
        return render(pool, states, str(self.socket_path))

    def validate(self, text: str) -> None:
        """`haproxy -c` on `text` (in a thread): TlsTierError with HAProxy's first alert if it refuses."""
        candidate = self.config_path.with_suffix(".cfg.new")
        self.config_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        candidate.write_text(text)
        try:
            done = subprocess.run([self.binary, "-c", "-f", str(candidate)], capture_output=True, text=True,
                                  timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise TlsTierError(f"cannot run {self.binary} to check the TLS services' configuration: "
                               f"{getattr(exc, 'strerror', None) or exc}") from None
        finally:
            candidate.unlink(missing_ok=True)
        if done.returncode != 0:
            alerts = [line.split(" : ", 2)[-1].strip() for line in (done.stdout + done.stderr).splitlines()
                      if "ALERT" in line]
            raise TlsTierError(f"HAProxy refuses the generated configuration: {alerts[0] if alerts else done.stderr}")

    def _write(self, text: str) -> None:
        tmp = self.config_path.with_suffix(".cfg.tmp")
        tmp.write_text(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.config_path)

    # ---- start, reload, stop ------------------------------------------------------

    async def prepare(self, pool) -> str | None:
        """The configuration for `pool`, checked by `haproxy -c`; None when it has no TLS service.
        Raises TlsTierError, having changed nothing. (commit writes it with the states of
        that moment: states change only `disabled` and weights, which cannot make it invalid.)"""
        if not self.wanted(pool):
            return None
        text = self.render(pool, self.states(pool))
        await asyncio.to_thread(self.validate, text)
        return text

    async def commit(self, pool, text: str | None) -> None:
        """Switch to a prepared configuration: reload the running HAProxy hitlessly, start it
        if it was not running, stop it when the pool has no TLS service left."""
        self.pool = pool
        if text is None:
            await self.stop()
            return
        self._write(self.render(pool, self.states(pool)))
        if self.proc is None or self.proc.returncode is not None:
            self.supervisor.start("haproxy", self._run)
            self.supervisor.start("haproxy runtime", self._push_loop)
            return
        before = await asyncio.to_thread(worker_pid, str(self.socket_path))
        self._serving.clear()
        self.proc.send_signal(signal.SIGUSR2)
        log.info("haproxy: reloading with the new configuration (old worker %s finishes its connections)", before)
        await self._await_worker(before)

    async def stop(self) -> None:
        self.supervisor.stop("haproxy runtime")
        self.supervisor.stop("haproxy")
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.terminate()
            await proc.wait()
        self.proc = None

    async def _await_worker(self, not_pid: int | None) -> None:
        """Wait until a worker other than `not_pid` answers on the socket, then push every state."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT
        while loop.time() < deadline:
            if self.proc is None or self.proc.returncode is not None:
                raise TlsTierError(f"haproxy exited with status {self.proc.returncode if self.proc else '?'} "
                                   f"while starting")
            pid = await asyncio.to_thread(worker_pid, str(self.socket_path))
            if pid is not None and pid != not_pid:
                self.pushed = {}     # a new worker holds only what its configuration says
                self._serving.set()
                self.trigger()
                return
            await asyncio.sleep(0.05)
        raise TlsTierError(f"haproxy's worker did not answer on {self.socket_path} within {READY_TIMEOUT:g}s")

    async def _run(self) -> None:
        """Run HAProxy until it exits; an exit we did not ask for raises, and the Supervisor restarts it."""
        old = await asyncio.to_thread(worker_pid, str(self.socket_path))  # a leftover answering
        self.proc = await asyncio.create_subprocess_exec(
            self.binary, "-W", "-db", "-f", str(self.config_path), stdin=asyncio.subprocess.DEVNULL)
        self.starts += 1
        log.info("haproxy: started master pid %d with %s", self.proc.pid, self.config_path)
        try:
            await self._await_worker(old)
            code = await self.proc.wait()
        except asyncio.CancelledError:
            if self.proc.returncode is None:
                self.proc.terminate()
                await self.proc.wait()
            raise
        except BaseException:
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
            raise
        finally:
            self._serving.clear()
        raise TlsTierError(f"haproxy (master pid {self.proc.pid}) exited with status {code}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    # ---- runtime API -----------------------------------------------------------------

    def refresh_counters(self) -> dict:
        """Read HAProxy's per-server counters now (blocking: run it in a thread); {} when none answers.
        They restart from 0 with each new worker (a reload or a restart), as counters may."""
        try:
            self.counters = parse_show_stat(ask(str(self.socket_path), "show stat")) if self.running else {}
        except OSError:
            self.counters = {}
        return self.counters

    def trigger(self) -> None:
        """The desired states may have changed (a verdict, a drain, a reload)."""
        self._wake.set()

    async def _push_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._serving.wait()
            await self.push()

    async def push(self) -> None:
        """Send the running worker what differs from what it holds."""
        want = dict(self.states(self.pool))
        commands = runtime_commands(self.pushed, want)
        if not commands:
            return
        for command in commands:
            try:
                reply = (await asyncio.to_thread(ask, str(self.socket_path), command)).strip()
            except OSError as exc:
                reply = f"{exc.strerror or exc}"
            if reply:
                self.push_errors += 1
                log.error("haproxy runtime API: %r answered %r; retrying on the next change", command, reply)
                self.pushed = {}
                self._wake.set()
                await asyncio.sleep(1.0)
                return
        log.info("haproxy runtime API: %s", "; ".join(commands))
        self.pushed = want
