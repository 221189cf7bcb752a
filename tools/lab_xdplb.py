"""Run the real `xdplb attach` in a lab's lb namespace (used by the tests and the demo).

The daemon is the installed console script, started exactly as an operator
would (`xdplb attach eth0 --pool FILE`), with its control socket in a
private run directory. Readiness is read from its control socket, never
guessed with a sleep.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

XDPLB = str(Path(sys.executable).with_name("xdplb"))

# The lab's services: (name, port, protocol, health port or None for the service port).
LAB_SERVICES = (
    ("hello", 104, "tcp", None),    # the stand-in for DICOM: says which backend answered
    ("web", 80, "tcp", None),
    ("sink", 9000, "tcp", None),    # counts an upload's bytes
    ("echo", 5000, "udp", 9000),    # UDP has no connect probe: check the sink's TCP port
)


def pool_text(lab, interval=1.0, timeout=0.5, rise=2, fall=2, weights=None, skip=()) -> str:
    """A pool for the lab: every LAB_SERVICES entry on the lab's VIP, over
    every backend not in `skip`; metrics off unless a test turns them on."""
    weights = weights or {}
    lines = ["[xdplb]", 'metrics = ""', ""]
    for name, port, protocol, health_port in LAB_SERVICES:
        lines += ["[[service]]", f'name = "{name}"', f'vip = "{lab.vip}"', f"port = {port}",
                  f'protocol = "{protocol}"', "  [service.health]"]
        if health_port:
            lines.append(f"  port = {health_port}")
        lines += [f"  interval = {interval}", f"  timeout = {timeout}", f"  rise = {rise}", f"  fall = {fall}"]
        for backend in lab.backend_names():
            if backend not in skip:
                lines += ["  [[service.backend]]", f'  name = "{backend}"',
                          f'  address = "{lab.backend_ip(backend)}"', f"  weight = {weights.get(backend, 1)}"]
        lines.append("")
    return "\n".join(lines)


def host_bpffs(path: Path) -> Path:
    """Mount a bpffs at `path` in this (the host's) mount namespace.

    `ip netns exec` gives every command a private mount namespace with a
    fresh /sys, so pins under /sys/fs/bpf would die with each daemon. A bpffs
    mounted here first is inherited by every later `ip netns exec`, so a
    restarted daemon finds the maps its predecessor pinned.
    """
    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mountpoint", "-q", str(path)]).returncode != 0:
        subprocess.run(["mount", "-t", "bpf", "bpf", str(path)], check=True)
    return path


def release_bpffs(path: Path) -> None:
    if subprocess.run(["mountpoint", "-q", str(path)]).returncode == 0:
        subprocess.run(["umount", "-l", str(path)], check=False)


class Balancer:
    """One `xdplb attach` in the lab's lb namespace.

    By default its pins go to a bpffs mounted in the host's mount namespace
    (`bpffs`); with host_bpffs=False it runs as the README's walkthrough
    does, without XDPLB_BPFFS, pinning in the bpffs it mounts in its own
    private mount namespace.
    """

    def __init__(self, lab, pool: Path, run_dir: Path, log: Path, mode: str = "auto", bpffs: Path | None = None,
                 host_bpffs: bool = True, host: str = "lb"):
        self.lab, self.pool, self.run_dir, self.log_path, self.mode = lab, pool, run_dir, log, mode
        self.host = host   # the lab host (namespace) it runs in: "lb", or "lb1"/"lb2" in the multi-node lab
        self.bpffs = bpffs or run_dir.parent / "bpffs"
        self.host_bpffs = host_bpffs
        self.proc: subprocess.Popen | None = None

    cli_path = XDPLB

    def env(self) -> dict:
        """The environment every xdplb command of this balancer runs with."""
        env = dict(os.environ, XDPLB_RUN_DIR=str(self.run_dir))
        env.pop("XDPLB_BPFFS", None)
        return dict(env, XDPLB_BPFFS=str(self.bpffs)) if self.host_bpffs else env

    _env = env

    def start(self, argv: list[str] | None = None) -> "Balancer":
        """Start `xdplb attach eth0 --pool POOL --mode MODE`, or `argv` as given
        (the systemd test passes the unit's own ExecStart line)."""
        if self.host_bpffs:
            host_bpffs(self.bpffs)
        self._log = open(self.log_path, "ab")
        argv = argv or [XDPLB, "attach", "eth0", "--pool", str(self.pool), "--mode", self.mode]
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.lab.ns(self.host), *argv],
            stdout=self._log, stderr=subprocess.STDOUT, env=self._env(),
        )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cli(self, *args, check=True) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.lab.ns(self.host), XDPLB, *args],
                              capture_output=True, text=True, env=self._env(), check=check, timeout=30)

    def status(self) -> dict:
        return json.loads(self.cli("status", "-i", "eth0", "--json").stdout)

    def wait_ready(self, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"xdplb exited with {self.proc.returncode} before ready:\n{self.log()}")
            result = self.cli("status", "-i", "eth0", "--json", check=False)
            if result.returncode == 0:
                st = json.loads(result.stdout)
                if st["ready"]:
                    return st
            time.sleep(0.2)
        raise AssertionError(f"xdplb not ready after {timeout}s:\n{self.log()}")

    def wait_for(self, predicate, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if predicate(st):
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; status: {json.dumps(st)[:2000]}")
            time.sleep(0.1)

    def signal(self, sig) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        finally:
            self._log.close()
        if code == 0:
            self.release()  # a clean stop unpinned everything: the bpffs mount can go too
        return code

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self._log.close()

    def release(self) -> None:
        """Unmount the bpffs (after the daemon stopped or was detached)."""
        release_bpffs(self.bpffs)


@contextlib.contextmanager
def running_balancer(lab, pool: Path, work: Path, **options):
    """A ready Balancer for the ``with`` block; stopped, its bpffs released
    and its log printed (pytest shows it on failure) afterwards."""
    b = Balancer(lab, pool, work / "run", work / "xdplb.log", **options).start()
    try:
        b.wait_ready()
        yield b
    finally:
        b.stop()
        b.release()
        print(b.log())


CLIENT_TOOL = str(Path(__file__).resolve().parent / "lab_client.py")


def client(lab, *args, timeout: float = 60) -> list[str]:
    """Run tools/lab_client.py in the client namespace; its output lines."""
    return lab.run("client", "/usr/bin/python3", CLIENT_TOOL, *map(str, args),
                   check=False, timeout=timeout).stdout.splitlines()


def client_popen(lab, *args) -> subprocess.Popen:
    """Start tools/lab_client.py in the client namespace, stdout piped as text."""
    return lab.popen("client", "/usr/bin/python3", CLIENT_TOOL, *map(str, args), stdout=subprocess.PIPE, text=True)


def backend_health(st: dict, service: str) -> dict:
    svc = next(s for s in st["services"] if s["name"] == service)
    return {b["name"]: b["health"] for b in svc["backends"]}


def backend_in_table(st: dict, service: str, backend: str) -> bool:
    """Whether the backend is up and its slots are in the live table: the
    reconciler's pass after an up verdict has been applied."""
    svc = next(s for s in st["services"] if s["name"] == service)
    b = next(b for b in svc["backends"] if b["name"] == backend)
    return b["health"] == "up" and b["forwarding"] and b["table_slots"] > 0


def xdp_attached(lab) -> bool:
    out = lab.run("lb", "ip", "-j", "link", "show", "eth0").stdout
    return "xdp" in json.loads(out)[0]


def lb_addresses(lab) -> list[str]:
    out = lab.run("lb", "ip", "-j", "-4", "addr", "show", "eth0").stdout
    return [a["local"] for a in json.loads(out)[0]["addr_info"]]
