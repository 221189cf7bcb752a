#!/usr/bin/python3
"""Network-namespace lab for xdplb: one L2 segment, a client, an LB, backends.

Topology (prefix ``P``, default ``xl``; subnet 10.10.0.0/24)::

    P-client 10.10.0.2 ─┐
    P-lb     10.10.0.10 ├─ P-sw: bridge br0 (no IP, STP off, forward_delay 0)
    P-be1..N 10.10.0.11+┘

Every host is its own namespace with one veth ``eth0`` (MAC
02:00:0a:0a:00:<last octet in hex>, IPv6 off); the switch end is called
``P-<host>`` and lives, enslaved to br0, in ``P-sw``.  Backends get the VIP
(default 10.10.0.100) on ``lo`` through ``tools/provision/dsr-backend.sh``
(so they accept DSR traffic but never answer ARP for it), TX checksum
offload off on eth0 (as does the client), and run ``tools/lab_backend.py``.
The LB namespace gets nothing more; xdplb attaches to its eth0 later.
Pid files, ready files, ``state.json`` and one log per backend live in the
state dir, default ``/tmp/xdplb-lab-P/``.

Python use (stdlib only; tests put ``tools/`` on ``sys.path``)::

    sys.path.insert(0, "<repo>/tools")
    import lab
    with lab.Lab(prefix="xt1") as lb_lab:      # up() ... down() always
        lb_lab.run("client", "curl", "-s", lb_lab.backend_ip(1))

``Lab.load(prefix)`` rebuilds a ``Lab`` for a lab that ``tools/lab.py up``
started (it reads ``state.json``).

PACS profile: ``Lab(pacs=True)`` / ``tools/lab.py up --pacs`` leaves ports
104 and 11112 of the backends to a real Orthanc each (``tools/pacs_lab.py``
starts them after the stand-ins, which keep their other ports, and stops
them and deletes their storage in ``down()``).

Dual-stack profile: ``Lab(vip6="fd00:10:10::100")`` / ``--vip6 ADDR`` turns
IPv6 on: every host's eth0 also gets ``fd00:10:10::<octet>/64`` (the IPv4
host octet written as the last group: be1 is 10.10.0.11 and
fd00:10:10::11), without DAD; the backends hold both VIPs on ``lo`` (the
same provisioning script) and their stand-in servers listen on ``::`` for
both families. With ``pacs=True`` each backend also runs a pynetdicom
storage SCP on IPv6 port 104 beside its IPv4 Orthanc (``tools/pacs6_lab.py``;
it needs the venv python given as ``python6``). The bridge's multicast
snooping is off, so Neighbour Solicitations reach every port.

CLI (as root)::

    tools/lab.py up [--backends N] [--prefix P] [--vip IP] [--vip6 IP6] [--pacs] [--native-peer]
    tools/lab.py up --nodes N --bgp|--vrrp [--pacs]
                                            several balancer nodes (tools/ha_lab.py)
    tools/lab.py down [--prefix P]
    tools/lab.py status [--prefix P] [--json]
    tools/lab.py exec HOST [--prefix P] -- CMD...
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

TOOLS_DIR = Path(__file__).resolve().parent
BACKEND_SCRIPT = TOOLS_DIR / "lab_backend.py"
PROVISION_SCRIPT = TOOLS_DIR / "provision" / "dsr-backend.sh"
PYTHON = "/usr/bin/python3"

SUBNET = "10.10.0"              # first three octets of the lab /24
NETMASK_BITS = 24
SUBNET6 = "fd00:10:10::"        # the dual-stack lab's /64; a host's last group is its IPv4 octet
PREFIX6_BITS = 64
FIXED_OCTETS = {"client": 2, "lb": 10}
FIRST_BACKEND_OCTET = 11        # be1 -> .11, be2 -> .12, ...
BRIDGE = "br0"
IFNAME = "eth0"
MAX_IFNAME = 15                 # IFNAMSIZ - 1
BACKEND_TCP_PORTS = (80, 8080, 9000, 104, 11112)
DICOM_STAND_IN_PORTS = (104, 11112)   # Orthanc's, not the stand-in's, in the PACS lab
READY_DEADLINE = 10.0           # seconds for a backend to accept connections
STOP_GRACE = 3.0                # seconds between SIGTERM and SIGKILL
POLL = 0.05
DEFAULT_PREFIX = "xl"
PREFIX_RE = re.compile(r"[a-z][a-z0-9]{0,7}")

# Run inside a backend namespace: wait until every TCP port accepts.
_PROBE = """
import socket, sys, time
host, budget, ports = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
deadline = time.monotonic() + budget
for port in map(int, ports):
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            break
        except OSError as exc:
            if time.monotonic() > deadline:
                sys.exit(f"port {port} on {host} not accepting: {exc}")
            time.sleep(0.05)
"""

# Run inside the switch namespace (native_peer): attach an XDP program that
# passes every frame to the lb's switch-side veth, in driver mode. A veth
# drops the frames its peer sends with native XDP_TX unless this side runs
# XDP too (that is what turns on its NAPI receive path). bcc comes from
# Debian's python3-bpfcc, which the system python sees. A netlink XDP
# attachment holds its own reference to the program, so it stays attached
# after this loader exits; nothing is pinned, and deleting the namespace
# removes it with the veth.
_NATIVE_PEER_LOADER = """
import sys
from bcc import BPF
bpf = BPF(text=b"int lab_xdp_pass(struct xdp_md *ctx) { return XDP_PASS; }")
BPF.attach_xdp(sys.argv[1].encode(), bpf.load_func(b"lab_xdp_pass", BPF.XDP), 1 << 2)  # XDP_FLAGS_DRV_MODE
"""


class LabError(RuntimeError):
    """A lab operation failed; the message says what and what to do."""


class LabCommandError(subprocess.CalledProcessError):
    """CalledProcessError whose message includes the command's stderr."""

    def __str__(self) -> str:
        text = super().__str__()
        err = (self.stderr or "").strip() if isinstance(self.stderr, str) else ""
        return f"{text}: {err}" if err else text


def _execute(argv: list[str], check: bool = True, timeout: float | None = 30,
             capture: bool = True, input: str | None = None  # noqa: A002
             ) -> subprocess.CompletedProcess:
    """Run ``argv``; on failure with ``check`` raise LabCommandError."""
    proc = subprocess.run(argv, capture_output=capture, text=True,
                          timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise LabCommandError(proc.returncode, argv, proc.stdout, proc.stderr)
    return proc


def list_namespaces() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    out = _execute(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def unused_prefix(base: str = "xt") -> str:
    """First ``<base><n>`` (n = 1, 2, ...) with no namespaces present."""
    present = list_namespaces()
    n = 1
    while True:
        prefix = f"{base}{n}"
        if not _matching(prefix, present):
            return prefix
        n += 1


@contextlib.contextmanager
def temporary_lab(base: str = "xt", **options):
    """A lab under the first unused prefix ``<base><n>``, up for the ``with``
    block and torn down after it, however the block ends (for tests)."""
    for _attempt in range(5):  # another run may take the same prefix first
        the_lab = Lab(prefix=unused_prefix(base), **options)
        try:
            the_lab.up()
            break
        except LabError as exc:
            if "already up" not in str(exc):
                raise
    else:
        raise LabError(f"could not find a free lab prefix starting with {base!r}")
    try:
        yield the_lab
    finally:
        the_lab.down()


def _matching(prefix: str, names: list[str]) -> list[str]:
    """The lab namespaces of ``prefix`` among ``names``."""
    # rt, lbN: the multi-node lab (tools/ha_lab.py); nr, nc1, nc2: the NAT
    # lab's router and clients (tools/lab_nat.py), so a crashed run of either
    # is cleaned by `down` too.
    pattern = re.compile(re.escape(prefix) + r"-(sw|client|rt|lb[0-9]*|be[0-9]+|nr|nc[0-9]+)")
    return [n for n in names if pattern.fullmatch(n)]


def _require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("not root: the namespace lab needs root (try sudo)")


def _require_tools() -> None:
    for tool, pkg in (("ip", "iproute2"), ("ethtool", "ethtool"),
                      ("sysctl", "procps"), ("bash", "bash")):
        if shutil.which(tool) is None:
            raise LabError(f"{tool} not found: install {pkg}")
    if not Path(PYTHON).exists():
        raise LabError(f"{PYTHON} not found: install python3")


def _proc_alive(pid: int, marker: str | None = None) -> bool:
    """True if ``pid`` runs (not a zombie) and its cmdline contains marker."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    return marker is None or marker.encode() in cmdline


def _pacs_lab():
    """tools/pacs_lab.py, imported only when a PACS lab needs it (it imports us)."""
    # Run as a script this module is __main__; let pacs_lab's `import lab`
    # find it, so both share one LabError.
    sys.modules.setdefault("lab", sys.modules[__name__])
    import pacs_lab
    return pacs_lab


def _ha_lab():
    """tools/ha_lab.py (the multi-node lab), imported only when used (it imports us)."""
    sys.modules.setdefault("lab", sys.modules[__name__])
    import ha_lab
    return ha_lab


def _pacs6_lab():
    """tools/pacs6_lab.py, the IPv6 SCPs of a dual-stack PACS lab (imported as needed)."""
    sys.modules.setdefault("lab", sys.modules[__name__])
    import pacs6_lab
    return pacs6_lab


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class Lab:
    """One namespace lab; see the module docstring for the topology."""

    prefix: str = DEFAULT_PREFIX
    backends: int = 3
    vip: str = "10.10.0.100"
    state_dir: Path | None = None
    native_peer: bool = False   # pass-through XDP on the lb switch port, for native mode on veth
    pacs: bool = False          # Orthanc on 104 in every backend (tools/pacs_lab.py)
    vip6: str | None = None     # dual-stack: IPv6 on every host, this VIP too (module docstring)
    python6: str = sys.executable   # runs the IPv6 SCPs and SCUs (needs pynetdicom)
    _procs: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not PREFIX_RE.fullmatch(self.prefix):
            raise LabError(f"bad prefix {self.prefix!r}: use 1-8 of [a-z0-9], "
                           "starting with a letter")
        last = FIRST_BACKEND_OCTET + self.backends - 1
        if not 1 <= self.backends or last > 254:
            raise LabError(f"bad backend count {self.backends}: 1..{255 - FIRST_BACKEND_OCTET}")
        for host in ["client", *self.backend_names()]:
            if len(self.ns(host)) > MAX_IFNAME:
                raise LabError(f"prefix {self.prefix!r} too long: "
                               f"{self.ns(host)!r} exceeds {MAX_IFNAME} chars")
        try:
            ipaddress.IPv4Address(self.vip)
        except ValueError:
            raise LabError(f"bad VIP {self.vip!r}: not an IPv4 address") from None
        if self.vip in [self.host_ip(h) for h in self.hosts()]:
            raise LabError(f"VIP {self.vip} clashes with a lab host address")
        if self.vip6 is not None:
            try:
                self.vip6 = str(ipaddress.IPv6Address(self.vip6))
            except ValueError:
                raise LabError(f"bad IPv6 VIP {self.vip6!r}: not an IPv6 address") from None
            if self.vip6 in [self.host_ip6(h) for h in self.hosts()]:
                raise LabError(f"VIP {self.vip6} clashes with a lab host address")
        self.state_dir = Path(self.state_dir or f"/tmp/xdplb-lab-{self.prefix}")

    # ---- naming -----------------------------------------------------------

    def hosts(self) -> list[str]:
        """All hosts with an eth0: client, lb, be1..beN (not the switch)."""
        return ["client", "lb", *self.backend_names()]

    def backend_names(self) -> list[str]:
        """``["be1", ..., "beN"]``."""
        return [f"be{i}" for i in range(1, self.backends + 1)]

    def ns(self, host: str) -> str:
        """Namespace of a host: ``"client"`` -> ``"xl-client"``; also ``"sw"``."""
        if host != "sw" and host not in self.hosts():
            raise LabError(f"unknown host {host!r}: use sw, {', '.join(self.hosts())}")
        return f"{self.prefix}-{host}"

    def port(self, host: str) -> str:
        """Switch-side veth name of a host (lives in the ``sw`` namespace)."""
        return self.ns(host)

    def host_ip(self, host: str) -> str:
        """IPv4 address of a host's eth0."""
        return f"{SUBNET}.{self._octet(host)}"

    def host_ip6(self, host: str) -> str:
        """IPv6 address of a host's eth0 in the dual-stack lab (``fd00:10:10::11`` for be1)."""
        return str(ipaddress.IPv6Address(f"{SUBNET6}{self._octet(host)}"))

    def backend_ip6(self, i: int | str) -> str:
        """IPv6 address of backend ``i`` (dual-stack lab)."""
        name = i if isinstance(i, str) else f"be{i}"
        if name not in self.backend_names():
            raise LabError(f"no backend {i!r}: lab has {self.backends}")
        return self.host_ip6(name)

    @property
    def dual_stack(self) -> bool:
        return self.vip6 is not None

    def backend_ip(self, i: int | str) -> str:
        """Address of backend ``i`` (1-based int, or a name like ``"be2"``)."""
        name = i if isinstance(i, str) else f"be{i}"
        if name not in self.backend_names():
            raise LabError(f"no backend {i!r}: lab has {self.backends}")
        return self.host_ip(name)

    def mac(self, host: str) -> str:
        """Fixed MAC of a host's eth0: ``02:00:0a:0a:00:<octet hex>``."""
        return f"02:00:0a:0a:00:{self._octet(host):02x}"

    def port_mac(self, host: str) -> str:
        """Fixed MAC of a host's switch-side veth: ``02:00:0a:0a:01:<octet>``."""
        return f"02:00:0a:0a:01:{self._octet(host):02x}"

    def _octet(self, host: str) -> int:
        if host in FIXED_OCTETS:
            return FIXED_OCTETS[host]
        if host in self.backend_names():
            return FIRST_BACKEND_OCTET + int(host[2:]) - 1
        raise LabError(f"unknown host {host!r}: use {', '.join(self.hosts())}")

    def _file(self, name: str, kind: str) -> Path:
        return Path(self.state_dir) / f"{name}.{kind}"

    # ---- running commands -------------------------------------------------

    def run(self, host: str, *cmd: object, check: bool = True,
            timeout: float | None = 30, capture: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess:  # noqa: A002
        """Run ``cmd`` in a host's namespace (``ip netns exec``); text output."""
        argv = ["ip", "netns", "exec", self.ns(host), *map(str, cmd)]
        return _execute(argv, check=check, timeout=timeout, capture=capture, input=input)

    def popen(self, host: str, *cmd: object, **kw) -> subprocess.Popen:
        """Start ``cmd`` in a host's namespace; ``kw`` go to subprocess.Popen."""
        return subprocess.Popen(["ip", "netns", "exec", self.ns(host), *map(str, cmd)], **kw)

    def _ip(self, host: str, *args: object) -> None:
        _execute(["ip", "-n", self.ns(host), *map(str, args)])

    def _sysctl(self, host: str, key: str, value: object) -> None:
        if key.startswith("net.ipv6.") and not Path("/proc/sys/net/ipv6").exists():
            return  # kernel without IPv6: nothing to disable
        self.run(host, "sysctl", "-q", "-w", f"{key}={value}")

    # ---- lifecycle --------------------------------------------------------

    @classmethod
    def load(cls, prefix: str = DEFAULT_PREFIX, state_dir: Path | None = None) -> "Lab":
        """A Lab matching a running lab's ``state.json`` (defaults if absent)."""
        lab = cls(prefix=prefix, state_dir=state_dir)
        try:
            saved = json.loads((Path(lab.state_dir) / "state.json").read_text())
        except (OSError, ValueError):
            found = [n for n in _matching(prefix, list_namespaces()) if "-be" in n]
            count = max((int(n.rsplit("-be", 1)[1]) for n in found), default=3)
            return cls(prefix=prefix, backends=count, state_dir=lab.state_dir)
        if saved.get("nodes"):  # the multi-node lab (tools/ha_lab.py)
            return _ha_lab().HaLab.from_state(saved, Path(lab.state_dir))
        return cls(prefix=prefix, backends=saved["backends"], vip=saved["vip"],
                   native_peer=saved.get("native_peer", False), pacs=saved.get("pacs", False),
                   vip6=saved.get("vip6"), python6=saved.get("python6", sys.executable),
                   state_dir=lab.state_dir)

    def namespaces(self) -> list[str]:
        """This lab's namespaces that exist now (any backend count), sorted."""
        order = {"sw": 0, "client": 1, "rt": 2, "lb": 3, "be": 4, "nr": 5, "nc": 6}

        def key(ns: str) -> tuple[int, int]:
            host = ns[len(self.prefix) + 1:]
            kind = host.rstrip("0123456789")
            return (order[kind], int(host[len(kind):] or 0))
        return sorted(_matching(self.prefix, list_namespaces()), key=key)

    def is_up(self) -> bool:
        """True if any namespace of this prefix exists."""
        return bool(self.namespaces())

    def up(self) -> "Lab":
        """Build the whole lab; on failure tear it down and raise LabError."""
        _require_root()
        _require_tools()
        if self.is_up():
            hint = "" if self.prefix == DEFAULT_PREFIX else f" --prefix {self.prefix}"
            raise LabError(f"lab {self.prefix} already up: run tools/lab.py down{hint} first")
        try:
            self._build()
        except BaseException as exc:
            try:
                self.down()
            except Exception as cleanup:  # keep the original error in front
                exc.add_note(f"teardown after the failure also failed: {cleanup}")
            if not isinstance(exc, Exception):
                raise  # KeyboardInterrupt etc.: propagate unchanged
            raise LabError(f"lab {self.prefix} up failed, partial lab removed: {exc}") from exc
        return self

    def _build(self) -> None:
        Path(self.state_dir).mkdir(parents=True, exist_ok=True)
        self._save_state()
        self._make_switch()
        for host in self.hosts():
            self._make_host(host)
        if self.native_peer:
            self._attach_native_peer()
        vips = [self.vip, self.vip6] if self.dual_stack else [self.vip]
        for name in self.backend_names():
            self.run(name, "bash", PROVISION_SCRIPT, *vips)
        for name in self.backend_names():
            self._spawn_backend(name)
        deadline = time.monotonic() + READY_DEADLINE
        for name in self.backend_names():
            self._wait_ready(name, deadline)
        if self.pacs:
            _pacs_lab().start_all(self)
            if self.dual_stack:
                _pacs6_lab().start_all(self)

    def _save_state(self) -> None:
        state = {"prefix": self.prefix, "backends": self.backends, "vip": self.vip,
                 "native_peer": self.native_peer, "pacs": self.pacs, "vip6": self.vip6,
                 "python6": self.python6}
        (Path(self.state_dir) / "state.json").write_text(json.dumps(state, indent=1) + "\n")

    def _new_namespace(self, host: str) -> None:
        _execute(["ip", "netns", "add", self.ns(host)])
        self._ip(host, "link", "set", "lo", "up")
        ipv6_off = 0 if self.dual_stack else 1
        self._sysctl(host, "net.ipv6.conf.all.disable_ipv6", ipv6_off)
        self._sysctl(host, "net.ipv6.conf.default.disable_ipv6", ipv6_off)

    def _make_switch(self) -> None:
        self._new_namespace("sw")
        self._ip("sw", "link", "add", BRIDGE, "type", "bridge",
                 "stp_state", 0, "forward_delay", 0,
                 *(("mcast_snooping", 0) if self.dual_stack else ()))
        self._ip("sw", "link", "set", BRIDGE, "up")

    def _make_host(self, host: str) -> None:
        self._new_namespace(host)
        port = self.port(host)
        self._ip("sw", "link", "add", port, "type", "veth",
                 "peer", "name", IFNAME, "netns", self.ns(host))
        self._ip(host, "link", "set", IFNAME, "address", self.mac(host))
        self._sysctl(host, f"net.ipv6.conf.{IFNAME}.disable_ipv6", 0 if self.dual_stack else 1)
        self._ip(host, "addr", "add", f"{self.host_ip(host)}/{NETMASK_BITS}", "dev", IFNAME)
        if self.dual_stack:
            self._ip(host, "addr", "add", f"{self.host_ip6(host)}/{PREFIX6_BITS}", "dev", IFNAME, "nodad")
        if host != "lb":
            self.run(host, "ethtool", "-K", IFNAME, "tx", "off")
        self._ip(host, "link", "set", IFNAME, "up")
        self._ip("sw", "link", "set", port, "address", self.port_mac(host))
        self._ip("sw", "link", "set", port, "master", BRIDGE)
        self._ip("sw", "link", "set", port, "up")

    def _attach_native_peer(self) -> None:
        """Pass-through XDP (driver mode) on the lb's switch port; see _NATIVE_PEER_LOADER."""
        port = self.port("lb")
        loaded = self.run("sw", PYTHON, "-c", _NATIVE_PEER_LOADER, port, check=False, timeout=120)
        if loaded.returncode != 0:
            raise LabError(f"native peer: loading the pass-through XDP program on {port} failed "
                           f"(needs python3-bpfcc): {loaded.stderr.strip()[-500:]}")
        link = json.loads(_execute(["ip", "-n", self.ns("sw"), "-j", "link", "show", port]).stdout)
        if link[0].get("xdp", {}).get("mode") != 1:  # XDP_ATTACHED_DRV
            raise LabError(f"native peer: {port} shows no driver-mode XDP program after loading")

    def down(self) -> None:
        """Stop backend servers and delete every namespace of this prefix.

        Idempotent; also cleans up after a crashed run or a partial ``up``
        (it works from pid files and the namespace list, not from memory).
        """
        _require_root()
        errors: list[str] = []
        state = Path(self.state_dir)
        # Orthanc storage is left by any PACS or NAT run that did not reach its
        # own down(), whatever this Lab was built with (`lab.py down` has no --pacs).
        if self.pacs or (state / "orthanc").exists():
            _pacs_lab().stop_all(self)
        if self.pacs and self.dual_stack:
            _pacs6_lab().stop_all(self)
        for pidfile in sorted(state.glob("*.pid")) if state.is_dir() else []:
            self._stop_backend(pidfile.stem, graceful=True)
        for ns in self.namespaces():
            pids = _execute(["ip", "netns", "pids", ns], check=False).stdout.split()
            for pid in pids:  # leftovers started inside our own namespace
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
            proc = _execute(["ip", "netns", "del", ns], check=False)
            if proc.returncode != 0:
                errors.append(f"{ns}: {proc.stderr.strip()}")
        for proc in self._procs.values():
            try:
                proc.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                errors.append(f"pid {proc.pid} did not exit")
        self._procs.clear()
        if state.is_dir():
            for path in [*state.glob("*.pid"), *state.glob("*.ready"), state / "state.json"]:
                path.unlink(missing_ok=True)
        if errors:
            raise LabError(f"lab {self.prefix} down incomplete: {'; '.join(errors)}")

    def __enter__(self) -> "Lab":
        return self.up()

    def __exit__(self, *exc_info: object) -> None:
        self.down()

    # ---- backend servers --------------------------------------------------

    def _check_backend(self, name: str) -> None:
        if name not in self.backend_names():
            raise LabError(f"no backend {name!r}: use {', '.join(self.backend_names())}")

    def backend_pid(self, name: str) -> int | None:
        """Pid of a backend's server if it is running, else None."""
        try:
            pid = int(self._file(name, "pid").read_text())
        except (OSError, ValueError):
            return None
        return pid if _proc_alive(pid, f"--name {name} ") else None

    def _spawn_backend(self, name: str) -> None:
        ready = self._file(name, "ready")
        ready.unlink(missing_ok=True)
        with open(self._file(name, "log"), "ab") as log:
            proc = self.popen(name, PYTHON, "-u", BACKEND_SCRIPT, "--name", name,
                              "--bind", "::" if self.dual_stack else "0.0.0.0", "--ready-file", ready,
                              *(("--hello-ports", "") if self.pacs else ()),
                              stdin=subprocess.DEVNULL, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
        self._procs[name] = proc  # ip netns exec execs, so proc.pid is python's
        self._file(name, "pid").write_text(f"{proc.pid}\n")

    def _wait_ready(self, name: str, deadline: float) -> None:
        """Poll until the ready file exists and every TCP port accepts."""
        ready, log = self._file(name, "ready"), self._file(name, "log")
        proc = self._procs.get(name)
        while not ready.exists():
            if proc is not None and proc.poll() is not None:
                raise LabError(f"backend {name} exited with {proc.returncode} "
                               f"during startup; {log}:\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise LabError(f"backend {name} not ready after {READY_DEADLINE:.0f} s; "
                               f"{log}:\n{_tail(log)}")
            time.sleep(POLL)
        budget = max(deadline - time.monotonic(), 0.5)
        probe = self.run(name, PYTHON, "-c", _PROBE, self.host_ip(name), f"{budget:.2f}",
                         *self._stand_in_ports(), check=False, timeout=budget + 5)
        if probe.returncode != 0:
            raise LabError(f"backend {name}: {probe.stderr.strip()}; {log}:\n{_tail(log)}")

    def _stand_in_ports(self) -> list[int]:
        """TCP ports the stand-in server listens on (not 104/11112 in the PACS lab)."""
        return [p for p in BACKEND_TCP_PORTS if not (self.pacs and p in DICOM_STAND_IN_PORTS)]

    def _stop_backend(self, name: str, graceful: bool) -> None:
        pid = self.backend_pid(name)
        if pid is not None:
            os.kill(pid, signal.SIGTERM if graceful else signal.SIGKILL)
            deadline = time.monotonic() + STOP_GRACE
            proc = self._procs.get(name)
            while _proc_alive(pid):
                if proc is not None and proc.poll() is not None:
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    deadline += STOP_GRACE
                time.sleep(POLL)
        proc = self._procs.pop(name, None)
        if proc is not None:
            proc.poll()  # reap
        self._file(name, "pid").unlink(missing_ok=True)
        self._file(name, "ready").unlink(missing_ok=True)

    def kill_backend(self, name: str) -> None:
        """SIGKILL a backend's server (its host stays on the segment)."""
        self._check_backend(name)
        self._stop_backend(name, graceful=False)

    def start_backend(self, name: str) -> None:
        """(Re)start a backend's server and wait until it accepts connections."""
        self._check_backend(name)
        self._stop_backend(name, graceful=True)
        self._spawn_backend(name)
        self._wait_ready(name, time.monotonic() + READY_DEADLINE)

    def link(self, host: str, up: bool) -> None:
        """Set a host's switch-side veth up/down (it vanishes without RST)."""
        self._ip("sw", "link", "set", self.port(host), "up" if up else "down")

    # ---- status -----------------------------------------------------------

    def status(self) -> dict:
        """Namespaces present, IPv4 addresses per host, backend servers."""
        present = self.namespaces()
        addresses: dict[str, list[str]] = {}
        for ns in present:
            host = ns[len(self.prefix) + 1:]
            out = _execute(["ip", "-n", ns, "-j", "-4", "addr", "show"], check=False).stdout
            addrs = []
            for link in json.loads(out or "[]"):
                for info in link.get("addr_info", []):
                    if not info["local"].startswith("127."):
                        addrs.append(f"{link['ifname']} {info['local']}/{info['prefixlen']}")
            addresses[host] = addrs
        servers = {}
        for name in self.backend_names():
            pid = self.backend_pid(name)
            servers[name] = {"pid": pid, "alive": pid is not None}
        return {"prefix": self.prefix, "up": bool(present), "vip": self.vip, "vip6": self.vip6,
                "backends": self.backends, "native_peer": self.native_peer, "pacs": self.pacs,
                "state_dir": str(self.state_dir), "namespaces": present,
                "addresses": addresses, "servers": servers}


# ---- command line ------------------------------------------------------------

def _format_status(st: dict) -> str:
    if not st["up"]:
        return f"lab {st['prefix']}: down"
    lines = [f"lab {st['prefix']}: up  vip {st['vip']}  backends {st['backends']}"
             f"  native-peer {'on' if st['native_peer'] else 'off'}  state {st['state_dir']}"]
    for host, addrs in st["addresses"].items():
        server = st["servers"].get(host)
        extra = ""
        if server is not None:
            extra = f"  server pid {server['pid']}" if server["alive"] else "  server DOWN"
        lines.append(f"  {st['prefix']}-{host:<8} {', '.join(addrs) or '-'}{extra}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--prefix", default=DEFAULT_PREFIX, help="lab name prefix (default xl)")
    common.add_argument("--state-dir", type=Path, help="default /tmp/xdplb-lab-PREFIX")
    p = argparse.ArgumentParser(prog="lab.py", description="xdplb namespace lab")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", parents=[common], help="build the lab")
    up.add_argument("--backends", type=int, default=3)
    up.add_argument("--vip", default="10.10.0.100")
    up.add_argument("--vip6", help="dual stack: IPv6 on every host and this IPv6 VIP "
                                   "(e.g. fd00:10:10::100); with --pacs, IPv6 pynetdicom SCPs too")
    up.add_argument("--pacs", action="store_true",
                    help="real Orthanc (DICOM 104, HTTP 8042) in every backend")
    up.add_argument("--native-peer", action="store_true",
                    help="pass-through XDP on the lb switch port (for xdplb --mode native)")
    up.add_argument("--nodes", type=int, default=0,
                    help="N balancer nodes lb1..lbN instead of one lb, each running xdplb (generic XDP) "
                         "and a routing daemon (tools/ha_lab.py); needs --bgp or --vrrp")
    routing = up.add_mutually_exclusive_group()
    routing.add_argument("--bgp", dest="routing", action="store_const", const="bgp",
                         help="with --nodes: a router namespace (BIRD, BGP multipath, ECMP) before the nodes")
    routing.add_argument("--vrrp", dest="routing", action="store_const", const="vrrp",
                         help="with --nodes: keepalived on the nodes owns the VIP; no router")
    sub.add_parser("down", parents=[common], help="remove the lab")
    status = sub.add_parser("status", parents=[common], help="show the lab")
    status.add_argument("--json", action="store_true")
    ex = sub.add_parser("exec", parents=[common], help="run CMD in HOST's namespace")
    ex.add_argument("host")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD...")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "up" and (args.nodes or args.routing):
            if not args.nodes or not args.routing:
                raise LabError("--nodes N needs --bgp or --vrrp, and --bgp/--vrrp need --nodes N")
            lab = _ha_lab().HaLab(prefix=args.prefix, backends=args.backends, vip=args.vip,
                                  state_dir=args.state_dir, pacs=args.pacs, nodes=args.nodes,
                                  routing=args.routing).up()
            try:
                lab.start_all_nodes()
            except BaseException:
                lab.down()
                raise
            print(_format_status(lab.status()))
            return 0
        if args.command == "up":
            lab = Lab(prefix=args.prefix, backends=args.backends, vip=args.vip, vip6=args.vip6,
                      state_dir=args.state_dir, native_peer=args.native_peer, pacs=args.pacs).up()
            print(_format_status(lab.status()))
            return 0
        _require_root()
        lab = Lab.load(args.prefix, args.state_dir)
        if args.command == "down":
            lab.down()
            print(f"lab {lab.prefix}: down")
        elif args.command == "status":
            st = lab.status()
            print(json.dumps(st, indent=1) if args.json else _format_status(st))
        else:
            cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            if not cmd:
                raise LabError("exec needs a command: tools/lab.py exec HOST -- CMD...")
            if not lab.is_up():
                raise LabError(f"lab {lab.prefix} is not up: run tools/lab.py up first")
            return lab.run(args.host, *cmd, check=False, timeout=None, capture=False).returncode
    except LabError as exc:
        print(f"lab.py: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
