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

xdplb's own hitless restart leaves HAProxy serving, as it leaves the XDP
program and its maps: after SIGUSR1 (leave_running) the master is not
stopped, and after a kill -9 nothing stops it. Its pid is kept in
<ifname>.haproxy.pid in the run directory; the next xdplb adopts a live
master running our configuration file (checked on /proc/<pid>/cmdline,
through a pidfd so a reused pid cannot be signalled), reloads it with the
configuration it has just written (hitless, as any reload) and supervises it
through the pidfd, since it is not our child. A clean stop (SIGTERM) and
`xdplb detach` stop it.

The process and the socket are behind this class; the decisions (which
states, which lines) are pure functions in xdplb/haproxy.py.
"""
from __future__ import annotations

import asyncio
import logging
import os
import select
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


class Master:
    """A running HAProxy master: the child this xdplb started (`proc`), or one an
    earlier xdplb left running and this one adopted (watched through a pidfd:
    it is not our child, so there is no exit status to collect)."""

    def __init__(self, pid: int, proc: asyncio.subprocess.Process | None = None, pidfd: int | None = None):
        self.pid, self.proc, self.pidfd = pid, proc, pidfd
        self._watch: asyncio.Task | None = None     # one pidfd reader, however many wait

    @property
    def adopted(self) -> bool:
        return self.proc is None

    @property
    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.returncode is None
        return self.pidfd is not None and not select.select([self.pidfd], [], [], 0)[0]

    def send_signal(self, sig: int) -> None:
        if self.proc is not None:
            if self.proc.returncode is None:
                self.proc.send_signal(sig)
        elif self.alive:
            signal.pidfd_send_signal(self.pidfd, sig)

    async def wait(self) -> int | None:
        """Until it exits; its status, or None for an adopted master."""
        if self.proc is not None:
            return await self.proc.wait()
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._until_exit())
        await asyncio.shield(self._watch)
        return None

    async def _until_exit(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self.alive:
                exited = loop.create_future()
                loop.add_reader(self.pidfd, lambda: exited.done() or exited.set_result(None))
                try:
                    await exited
                finally:
                    loop.remove_reader(self.pidfd)
        finally:
            self._close_pidfd()

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        self.send_signal(sig)
        await self.wait()

    def close(self) -> None:
        """Stop watching (the master runs on)."""
        if self._watch is not None and not self._watch.done():
            self._watch.cancel()      # its finally closes the pidfd
        else:
            self._close_pidfd()

    def _close_pidfd(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


def left_running(pid_path: Path, config_path: Path) -> Master | None:
    """The HAProxy master named by `pid_path` if it still runs our `config_path`, else None.
    The pidfd is opened before the command line is read, so a pid reused since cannot pass."""
    try:
        pid = int(pid_path.read_text().split()[0])
        pidfd = os.pidfd_open(pid)
    except (OSError, ValueError, IndexError):
        return None
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        os.close(pidfd)
        return None
    ours = (os.path.basename(argv[0]).startswith(b"haproxy") and state != "Z"
            and any(a == b"-f" and b == os.fsencode(config_path) for a, b in zip(argv, argv[1:])))
    if not ours:
        os.close(pidfd)
        return None
    return Master(pid, pidfd=pidfd)


def haproxy_paths(run_dir: Path, ifname: str) -> tuple[Path, Path, Path]:
    """HAProxy's configuration, runtime API socket and master pid file for xdplb on `ifname`."""
    return (run_dir / f"{ifname}.haproxy.cfg", run_dir / f"{ifname}.haproxy.sock",
            run_dir / f"{ifname}.haproxy.pid")


async def stop_left_running(run_dir: Path, ifname: str) -> int | None:
    """Stop the HAProxy an earlier xdplb on `ifname` left running (for `xdplb detach`); its pid, or None."""
    config, _socket, pid_file = haproxy_paths(run_dir, ifname)
    master = left_running(pid_file, config)
    if master is None:
        return None
    await master.stop()
    pid_file.unlink(missing_ok=True)
    return master.pid


class HaproxyTier:
    def __init__(self, run_dir: Path, ifname: str, supervisor, states: Callable[[object], Mapping],
                 binary: str = "haproxy") -> None:
        self.binary = binary
        self.supervisor = supervisor
        self.states = states                    # pool -> the ServerStates wanted now
        self.config_path, self.socket_path, self.pid_path = haproxy_paths(run_dir, ifname)
        self.master: Master | None = None
        self.leaving = False        # leave_running(): stopping xdplb leaves HAProxy serving
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
        (or adopt the one an earlier xdplb left running) if none runs, stop it when the pool
        has no TLS service left. Returns once a worker answers (on a start, at most
        READY_TIMEOUT: then the Supervisor keeps trying)."""
        self.pool = pool
        if text is None:
            await self.stop()
            return
        self._write(self.render(pool, self.states(pool)))
        if not self.running:
            self.supervisor.start("haproxy", self._run)
            self.supervisor.start("haproxy runtime", self._push_loop)
            # Started or adopted: xdplb is ready once a worker answers (or its supervisor retries).
            try:
                await asyncio.wait_for(self._serving.wait(), READY_TIMEOUT)
            except asyncio.TimeoutError:
                log.warning("haproxy: no worker answers on %s yet; its supervisor keeps trying", self.socket_path)
            return
        await self._reload(self.master)

    async def _reload(self, master: Master) -> None:
        """SIGUSR2: the master starts a worker on the written configuration (and certificates);
        the old worker finishes its connections."""
        before = await asyncio.to_thread(worker_pid, str(self.socket_path))
        self._serving.clear()
        master.send_signal(signal.SIGUSR2)
        log.info("haproxy: reloading with the new configuration (old worker %s finishes its connections)", before)
        await self._await_worker(before)

    def leave_running(self) -> None:
        """xdplb exits for a restart (SIGUSR1): HAProxy keeps serving, for the next xdplb to adopt."""
        self.leaving = True

    async def stop(self) -> None:
        """Stop HAProxy (ours, or one left running by an earlier xdplb)."""
        self.supervisor.stop("haproxy runtime")
        self.supervisor.stop("haproxy")
        master = self.master or left_running(self.pid_path, self.config_path)
        if master is not None:
            await master.stop()
            self.pid_path.unlink(missing_ok=True)
        self.master = None

    async def _await_worker(self, not_pid: int | None) -> None:
        """Wait until a worker other than `not_pid` answers on the socket, then push every state."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT
        while loop.time() < deadline:
            if not self.running:
                code = self.master.proc.returncode if self.master and self.master.proc else "?"
                raise TlsTierError(f"haproxy exited with status {code} while starting")
            pid = await asyncio.to_thread(worker_pid, str(self.socket_path))
            if pid is not None and pid != not_pid:
                self.pushed = {}     # a new worker holds only what its configuration says
                self._serving.set()
                self.trigger()
                return
            await asyncio.sleep(0.05)
        raise TlsTierError(f"haproxy's worker did not answer on {self.socket_path} within {READY_TIMEOUT:g}s")

    async def _start_master(self) -> Master:
        """Adopt the master an earlier xdplb left running and reload it with our configuration
        (the pool or a certificate may have changed meanwhile), or start a new one."""
        adopted = left_running(self.pid_path, self.config_path)
        if adopted is not None:
            self.master = adopted
            log.info("haproxy: adopted master pid %d left running by the previous xdplb; its connections stay",
                     adopted.pid)
            await self._reload(adopted)
            return adopted
        old = await asyncio.to_thread(worker_pid, str(self.socket_path))  # a leftover answering
        proc = await asyncio.create_subprocess_exec(
            self.binary, "-W", "-db", "-f", str(self.config_path), stdin=asyncio.subprocess.DEVNULL)
        self.master = Master(proc.pid, proc=proc)
        self.pid_path.write_text(f"{proc.pid}\n")
        self.starts += 1
        log.info("haproxy: started master pid %d with %s", proc.pid, self.config_path)
        await self._await_worker(old)
        return self.master

    async def _run(self) -> None:
        """Run HAProxy until it exits; an exit we did not ask for raises, and the Supervisor restarts it.
        Cancelled (xdplb stops): HAProxy is stopped, unless leave_running() asked to keep it."""
        master = None
        try:
            master = await self._start_master()
            code = await master.wait()
        except asyncio.CancelledError:
            master = master or self.master
            if master is not None and self.leaving:
                log.info("haproxy: master pid %d left running for the next xdplb", master.pid)
                master.close()
            elif master is not None:
                await master.stop()
                self.pid_path.unlink(missing_ok=True)
            raise
        except BaseException:
            master = master or self.master
            if master is not None:
                await master.stop(signal.SIGKILL)
            raise
        finally:
            self._serving.clear()
        raise TlsTierError(f"haproxy (master pid {master.pid}) exited"
                           + (f" with status {code}" if code is not None else ""))

    @property
    def running(self) -> bool:
        return self.master is not None and self.master.alive

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
