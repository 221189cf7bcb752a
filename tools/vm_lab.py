#!/usr/bin/python3
"""The lb machine of the Vagrant lab, booted for real and bridged to a namespace lab.

Topology (namespace lab prefix ``P``, tools/lab.py; subnet 10.10.0.0/24)::

    P-client, P-be1..3 ─ P-sw: br0 ─ veth P-vdn|P-vup ─ host bridge P-vbr ─ tap ─ lb guest eth1
                                                                              (virtio-net, 10.10.0.10)

The guest is ``vagrant up lb`` of vagrant/Vagrantfile with the local box
(tools/vmbox.sh) and ``XDPLB_VM_NET=10.10.0``, ``XDPLB_VM_BRIDGE=P-vbr``:
its provisioning (vagrant/lb.sh) is the one a user runs, so the pool it
writes names the lab's backends (pacs1..3 = be1..3 at .11-.13) and the VIP
10.10.0.100.  The namespace lab's own lb veth is set down: the guest takes
its address.  Commands reach the guest over ssh with ``vagrant ssh-config``
and one shared connection.

Python use (as root)::

    with lab.temporary_lab("xv", pacs=True) as the_lab, VmLab(the_lab) as vm:
        vm.ssh("ip -br link")

CLI: ``tools/vm_lab.py leftovers PREFIX`` lists what a destroyed lb left.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

TOOLS_DIR = Path(__file__).resolve().parent
ROOT = TOOLS_DIR.parent
VAGRANT_DIR = ROOT / "vagrant"
VMBOX = TOOLS_DIR / "vmbox.sh"
POOL = "default"
GUEST_IFACE = "eth1"
GUEST_XDPLB = "/vagrant/.venv/bin/xdplb"
GUEST_POOL = "/etc/xdplb/vmlab.toml"
GUEST_PIDFILE = "/run/xdplb-vmlab.pid"


class VmError(RuntimeError):
    pass


def _run(argv, *, env=None, timeout=600, check=True, input=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in argv], env=env, capture_output=True, text=True,
                          timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise VmError(f"{' '.join(map(str, argv))} exited {proc.returncode}:\n"
                      f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def domain_name(prefix: str) -> str:
    return f"xdplb-{prefix}-lb"


def leftovers(prefix: str, taps: list[str] = ()) -> list[str]:
    """What a destroyed lb machine of ``prefix`` left: domain, volume, taps, bridge."""
    found = []
    dom = domain_name(prefix)
    if dom in _run(["virsh", "list", "--all", "--name"], check=False).stdout.split():
        found.append(f"domain {dom}")
    vols = _run(["virsh", "vol-list", POOL], check=False).stdout
    found += [f"volume {v}" for v in re.findall(r"^\s*(\S+)", vols, re.M) if v.startswith(dom)]
    links = _run(["ip", "-o", "link", "show"], check=False).stdout
    for tap in taps:
        if re.search(rf"^\d+: {re.escape(tap)}[:@]", links, re.M):
            found.append(f"tap {tap}")
    for name in (f"{prefix}-vbr", f"{prefix}-vup"):
        if re.search(rf"^\d+: {re.escape(name)}[:@]", links, re.M):
            found.append(f"link {name}")
    return found


class VmLab:
    """The lb guest bridged to ``lab``; ``up()`` boots it, ``destroy()`` removes it."""

    def __init__(self, lab, cpus: int | None = None):
        self.lab = lab
        self.prefix = lab.prefix
        self.bridge = f"{self.prefix}-vbr"
        self.veth_host, self.veth_sw = f"{self.prefix}-vup", f"{self.prefix}-vdn"
        self.work = Path(lab.state_dir) / "vm"
        self.ssh_config = self.work / "ssh-config"
        self.taps: list[str] = []
        self.timings: dict[str, float] = {}
        self.env = dict(os.environ, VAGRANT_CWD=str(VAGRANT_DIR),
                        VAGRANT_DOTFILE_PATH=str(self.work / "dot-vagrant"),
                        XDPLB_VM_NET=lab.host_ip("lb").rsplit(".", 1)[0],
                        XDPLB_VM_BRIDGE=self.bridge, XDPLB_VM_PREFIX=f"xdplb-{self.prefix}-")
        if cpus:
            self.env["XDPLB_VM_CPUS"] = str(cpus)
        self.env.pop("VAGRANT_DEFAULT_PROVIDER", None)
        self.up_output = ""

    # ---- host side ---------------------------------------------------------

    def _timed(self, what: str, fn):
        start = time.monotonic()
        try:
            return fn()
        finally:
            self.timings[what] = time.monotonic() - start
            print(f"vm_lab: {what}: {self.timings[what]:.1f} s", flush=True)

    def connect(self) -> None:
        """Host bridge + veth into the lab's switch; the lab's own lb veth down."""
        sw = self.lab.ns("sw")
        _run(["ip", "link", "add", self.bridge, "type", "bridge", "stp_state", "0", "forward_delay", "0"])
        _run(["ip", "link", "add", self.veth_host, "type", "veth", "peer", "name", self.veth_sw,
              "netns", sw])
        _run(["ip", "link", "set", self.veth_host, "master", self.bridge])
        for link in (self.veth_host, self.bridge):
            _run(["ip", "link", "set", link, "up"])
        _run(["ip", "-n", sw, "link", "set", self.veth_sw, "master", "br0"])
        _run(["ip", "-n", sw, "link", "set", self.veth_sw, "up"])
        self.lab.link("lb", False)

    def disconnect(self) -> None:
        for link in (self.veth_host, self.bridge):
            _run(["ip", "link", "del", link], check=False)

    def vagrant(self, *args, timeout=1800, check=True) -> subprocess.CompletedProcess:
        return _run(["vagrant", *args], env=self.env, timeout=timeout, check=check)

    def build_box(self) -> str:
        return self._timed("box (tools/vmbox.sh)", lambda: _run([VMBOX], timeout=1800).stdout)

    def up(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.connect()
        proc = self._timed("vagrant up lb", lambda: self.vagrant("up", "lb", "--provider", "libvirt"))
        self.up_output = proc.stdout + proc.stderr
        self.ssh_config.write_text(self.vagrant("ssh-config", "lb").stdout)
        self.start_ssh_master()
        iflist = _run(["virsh", "domiflist", domain_name(self.prefix)]).stdout
        self.taps = re.findall(r"^\s*(vnet\d+)\s", iflist, re.M)

    def destroy(self) -> list[str]:
        """``vagrant destroy``, then what it left behind (empty when clean)."""
        self.stop_ssh_master()
        self._timed("vagrant destroy lb", lambda: self.vagrant("destroy", "-f", "lb", check=False))
        left = leftovers(self.prefix, self.taps)
        self.disconnect()
        return [item for item in left if not item.startswith("link ")]

    def __enter__(self) -> "VmLab":
        try:
            self.up()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    # ---- guest side --------------------------------------------------------

    def _ssh_base(self) -> list[str]:
        return ["ssh", "-F", str(self.ssh_config), "-o", "ConnectTimeout=20",
                "-o", f"ControlPath={self.work / 'ssh-control'}"]

    def start_ssh_master(self) -> None:
        """One background connection that every later ssh reuses (a TCG guest is slow at key exchange).

        Started on its own, with no pipes of ours: a master forked from a
        client would hold that client's pipes open after it exits.
        """
        subprocess.run([*self._ssh_base(), "-o", "ControlMaster=yes", "-o", "ControlPersist=yes",
                        "-f", "-N", "lb"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=120, check=True)

    def stop_ssh_master(self) -> None:
        if self.ssh_config.exists():
            subprocess.run([*self._ssh_base(), "-O", "exit", "lb"], stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=30)

    def ssh_argv(self, command: str) -> list[str]:
        return [*self._ssh_base(), "-o", "ControlMaster=no", "lb", command]

    def ssh(self, command: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        return _run(self.ssh_argv(command), timeout=timeout, check=check)

    def popen(self, command: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.ssh_argv(command), stdin=subprocess.DEVNULL, **kw)

    def sudo(self, *argv: object, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        return self.ssh("sudo " + shlex.join(map(str, argv)), timeout=timeout, check=check)


class GuestBalancer:
    """The real ``xdplb attach eth1`` in the guest, read through its own CLI."""

    def __init__(self, vm: VmLab, log: Path):
        self.vm, self.log_path = vm, log
        self.proc: subprocess.Popen | None = None

    def write_pool(self, pool_text: str) -> None:
        subprocess.run(self.vm.ssh_argv(f"sudo tee {GUEST_POOL} >/dev/null"), input=pool_text, text=True,
                       check=True, timeout=300)

    def signal(self, name: str) -> None:
        """Send SIGname (HUP: reload the pool; STOP/CONT: pause the controller) to xdplb in the guest."""
        self.vm.ssh(f"sudo sh -c 'kill -{name} $(cat {GUEST_PIDFILE})'", timeout=300)

    def reload(self, pool_text: str, timeout: float = 300) -> dict:
        """Write a new pool and SIGHUP: the maps change, the program is not compiled again."""
        before = self.status()["last_reload"].get("at", 0)
        self.write_pool(pool_text)
        self.signal("HUP")
        st = self.wait_for(lambda st: st["last_reload"].get("at", 0) > before, timeout, "the reload")
        if st["last_reload"]["result"] != "applied":
            raise AssertionError(f"reload: {st['last_reload']}")
        return st

    def start(self, pool_text: str, mode: str = "auto") -> "GuestBalancer":
        self.write_pool(pool_text)
        with open(self.log_path, "ab") as log:
            self.proc = self.vm.popen(
                f"sudo sh -c 'echo $$ >{GUEST_PIDFILE}; exec {GUEST_XDPLB} attach {GUEST_IFACE} "
                f"--pool {GUEST_POOL} --mode {mode}'", stdout=log, stderr=subprocess.STDOUT)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self) -> dict:
        out = self.vm.sudo(GUEST_XDPLB, "status", "-i", GUEST_IFACE, "--json", timeout=120)
        return json.loads(out.stdout)

    def wait_for(self, predicate, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        st: dict = {}
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"xdplb in the guest exited while waiting for {what}:\n{self.log()}")
            try:
                st = self.status()
                if predicate(st):
                    return st
            except (VmError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; status: "
                                     f"{json.dumps(st)[:2000]}\n{self.log()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            self.vm.ssh(f"sudo sh -c 'kill $(cat {GUEST_PIDFILE})'", check=False, timeout=300)
        except subprocess.TimeoutExpired:
            print("vm_lab: the guest did not answer the stop within 300 s", flush=True)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "leftovers":
        found = leftovers(argv[1])
        print("\n".join(found) or "nothing left")
        return 1 if found else 0
    print("usage: vm_lab.py leftovers PREFIX", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
