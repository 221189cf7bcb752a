#!/usr/bin/python3
"""Multi-node lab: two xdplb nodes side by side, behind a BGP/ECMP router or as a VRRP pair.

Builds on ``tools/lab.py`` (namespaces, the switch, the backends and their
stand-in servers) and ``tools/pacs_lab.py`` (Orthanc in every backend).

BGP profile (``tools/lab.py up --nodes 2 --bgp``, subnets 10.20.0.0/24 and
10.10.0.0/24)::

    P-client 10.20.0.2 ── eth1 10.20.0.1  P-rt  10.10.0.1 eth0 ─┐
                                          P-lb1 10.10.0.21     ├─ P-sw: bridge br0
                                          P-lb2 10.10.0.22     │
                                          P-be1..3 10.10.0.11+ ┘

- The router runs BIRD 2: one eBGP session (AS 65000) to each node (AS
  65001) with BFD, and its kernel protocol installs the VIP's routes with
  ``merge paths``, so the router's kernel holds one ECMP route with a
  nexthop per announcing node; ``fib_multipath_hash_policy = 1`` hashes
  the 5-tuple (L4), so every TCP connection stays on one node.
- Each node runs ``xdplb attach eth0`` (generic XDP: veth drops native
  XDP_TX frames unless its peer runs XDP too) with ``manage_vips = false``
  (the VIP is on each node's ``lo``, which answers no ARP for it, as on the
  DSR backends)
  and BIRD 2 running the shipped recipe (examples/bird-balancer.conf, with
  the node's own address and AS): its kernel protocol learns the VIP
  routes xdplb keeps in table ``ANNOUNCE_TABLE`` (``[xdplb]
  announce_table``) while the node can serve the VIP, and its bgp
  protocol announces them.
- The backends (DSR: VIP on ``lo``) route to the client through the
  router, so replies bypass the nodes.

VRRP profile (``tools/lab.py up --nodes 2 --vrrp``): no router, the client
(10.10.0.2) on the shared segment; keepalived on each node owns the VIP
on the master's eth0 (the shipped recipe, examples/keepalived-pair.conf:
lb1 has the higher priority, ``nopreempt``, and ``track_file`` on xdplb's
``ready_file``), xdplb runs with ``manage_vips = false`` on both and the
standby is attached and hot.

Every node daemon's config, pid file and log live under
``<state dir>/nodes/<node>/``; ``down()`` stops them (xdplb with SIGTERM,
so it unpins) before the namespaces go.

CLI (as root): see ``tools/lab.py up --nodes 2 --bgp|--vrrp``; and, run by
the tests inside the client namespace::

    tools/ha_lab.py acked DST PORT     bytes_acked of the established TCP connection to DST:PORT,
                                       one "<t> <bytes>" line per 50 ms sample until killed
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

TOOLS_DIR = Path(__file__).resolve().parent
if str(TOOLS_DIR) not in sys.path:
    sys.path.insert(0, str(TOOLS_DIR))

import lab as labtool  # noqa: E402  (tools/ on sys.path above)

BIRD = "/usr/sbin/bird"
BIRDC = "/usr/sbin/birdc"
KEEPALIVED = "/usr/sbin/keepalived"
ROUTINGS = ("bgp", "vrrp")
REPO = TOOLS_DIR.parent
BIRD_EXAMPLE = REPO / "examples" / "bird-balancer.conf"        # the node recipe the README ships
ROUTER_EXAMPLE = REPO / "examples" / "bird-router.conf"         # and the router's
KEEPALIVED_EXAMPLE = REPO / "examples" / "keepalived-pair.conf"
ROUTER_AS = 65000
FIRST_NODE_AS = 65011           # lb1 -> 65011, lb2 -> 65012 (each node its own AS, as the recipe says)
ANNOUNCE_TABLE = 100            # [xdplb] announce_table; the recipe's `kernel table 100`
ROUTER_OCTET = 1
FIRST_NODE_OCTET = 21           # lb1 -> .21, lb2 -> .22
CLIENT_SUBNET = "10.20.0"       # BGP profile: the client's side of the router
ROUTER_CLIENT_IF = "eth1"
# BFD: a silent node is down after MULTIPLIER missed intervals (1 s); BGP
# hold time 3 s is the fallback. Wide enough not to flap on 2 busy cores.
BFD_INTERVAL_MS = 200
BFD_MULTIPLIER = 5
HOLD_TIME = 3
DAEMON_START = 20.0             # seconds for BIRD / keepalived to answer
XDPLB_START = 240.0             # bcc compiles at attach: ~10 s idle, a minute on a busy 2-core host
XDPLB_STOP = 60.0
POLL = 0.1


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _stop_pid(pid: int | None, sig: int, grace: float) -> None:
    """Send ``sig``; SIGKILL after ``grace`` seconds; wait until it is gone."""
    if not _alive(pid):
        return
    _signal(pid, sig)
    deadline = time.monotonic() + grace
    while _alive(pid):
        if time.monotonic() > deadline:
            _signal(pid, signal.SIGKILL)
            deadline += 5
        time.sleep(0.05)


def _pacs_lab():
    import pacs_lab
    return pacs_lab


def _lab_xdplb():
    import lab_xdplb
    return lab_xdplb


@dataclass
class HaLab(labtool.Lab):
    """Several balancer nodes; see the module docstring for both profiles."""

    nodes: int = 2
    routing: str = "bgp"            # "bgp": router + ECMP; "vrrp": keepalived pair, no router
    pool_settings: dict = field(default_factory=dict)   # extra [xdplb] keys for every node's pool
    _balancers: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _daemons: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.routing not in ROUTINGS:
            raise labtool.LabError(f"bad routing {self.routing!r}: use {' or '.join(ROUTINGS)}")
        if not 2 <= self.nodes <= 9:
            raise labtool.LabError(f"bad node count {self.nodes}: 2..9")
        super().__post_init__()

    # ---- naming -----------------------------------------------------------

    def node_names(self) -> list[str]:
        """``["lb1", "lb2", ...]``."""
        return [f"lb{i}" for i in range(1, self.nodes + 1)]

    def hosts(self) -> list[str]:
        router = ["rt"] if self.routing == "bgp" else []
        return ["client", *router, *self.node_names(), *self.backend_names()]

    def segment_hosts(self) -> list[str]:
        """Hosts with a port on the shared segment's switch."""
        return [h for h in self.hosts() if not (h == "client" and self.routing == "bgp")]

    def _octet(self, host: str) -> int:
        if host == "rt":
            return ROUTER_OCTET
        if host in self.node_names():
            return FIRST_NODE_OCTET + int(host[2:]) - 1
        return super()._octet(host)

    def host_ip(self, host: str) -> str:
        if host == "client" and self.routing == "bgp":
            return f"{CLIENT_SUBNET}.2"
        return super().host_ip(host)

    def router_ip(self) -> str:
        return self.host_ip("rt")

    def node_dir(self, node: str) -> Path:
        self._check_node(node)
        return Path(self.state_dir) / "nodes" / node

    def _check_node(self, node: str) -> None:
        if node not in self.node_names():
            raise labtool.LabError(f"no node {node!r}: use {', '.join(self.node_names())}")

    # ---- lifecycle --------------------------------------------------------

    @classmethod
    def from_state(cls, saved: dict, state_dir: Path) -> "HaLab":
        return cls(prefix=saved["prefix"], backends=saved["backends"], vip=saved["vip"],
                   pacs=saved.get("pacs", False), nodes=saved["nodes"], routing=saved["routing"],
                   pool_settings=saved.get("pool_settings", {}),
                   state_dir=state_dir)

    def _save_state(self) -> None:
        state = {"prefix": self.prefix, "backends": self.backends, "vip": self.vip, "pacs": self.pacs,
                 "nodes": self.nodes, "routing": self.routing,
                 "pool_settings": self.pool_settings}
        (Path(self.state_dir) / "state.json").write_text(json.dumps(state, indent=1) + "\n")

    def _build(self) -> None:
        for tool in (BIRD, BIRDC) if self.routing == "bgp" else (KEEPALIVED,):
            if not Path(tool).exists():
                raise labtool.LabError(f"{tool} not found: install {'bird2' if 'bird' in tool else 'keepalived'} "
                                       "(tools/setup.sh)")
        Path(self.state_dir).mkdir(parents=True, exist_ok=True)
        self._save_state()
        self._make_switch()
        for host in self.segment_hosts():
            self._make_host(host)
        if self.routing == "bgp":
            self._make_router()
        # BGP nodes hold the VIP on lo, never answering ARP for it (the same
        # provisioning as a DSR backend), so their own stack resets a flow
        # that xdplb hands it when no backend is up; VRRP nodes leave it to keepalived.
        for name in [*self.backend_names(), *(self.node_names() if self.routing == "bgp" else [])]:
            self.run(name, "bash", labtool.PROVISION_SCRIPT, self.vip)
        for name in self.backend_names():
            if self.routing == "bgp":  # DSR: replies go straight to the router, not through a node
                self._ip(name, "route", "add", "default", "via", self.router_ip())
        for name in self.backend_names():
            self._spawn_backend(name)
        deadline = time.monotonic() + labtool.READY_DEADLINE
        for name in self.backend_names():
            self._wait_ready(name, deadline)
        if self.pacs:
            _pacs_lab().start_all(self)
        if self.routing == "bgp":
            self.start_bird("rt")

    def _make_router(self) -> None:
        """The client's link to the router, forwarding, the L4 multipath hash."""
        self._new_namespace("client")
        self._ip("rt", "link", "add", ROUTER_CLIENT_IF, "type", "veth", "peer", "name", labtool.IFNAME,
                 "netns", self.ns("client"))
        self._ip("rt", "addr", "add", f"{CLIENT_SUBNET}.1/24", "dev", ROUTER_CLIENT_IF)
        self._ip("rt", "link", "set", ROUTER_CLIENT_IF, "up")
        self._ip("client", "link", "set", labtool.IFNAME, "address", self.mac("client"))
        self._ip("client", "addr", "add", f"{self.host_ip('client')}/24", "dev", labtool.IFNAME)
        self.run("client", "ethtool", "-K", labtool.IFNAME, "tx", "off")
        self._ip("client", "link", "set", labtool.IFNAME, "up")
        self._ip("client", "route", "add", "default", "via", f"{CLIENT_SUBNET}.1")
        for key, value in (("net.ipv4.ip_forward", 1), ("net.ipv4.fib_multipath_hash_policy", 1),
                           ("net.ipv4.conf.all.rp_filter", 0), ("net.ipv4.conf.default.rp_filter", 0)):
            self._sysctl("rt", key, value)

    def pace_client(self, rate: str) -> None:
        """Pace what the client sends with a token bucket (tc tbf) on its eth0,
        so a long store lasts long enough to lose a node in the middle of it
        whatever the machine's speed."""
        self.run("client", "tc", "qdisc", "replace", "dev", labtool.IFNAME, "root", "tbf", "rate", rate,
                 "burst", "64kb", "latency", "500ms")

    def down(self) -> None:
        """Stop every node daemon (xdplb first, so it unpins), then the lab."""
        labtool._require_root()
        for node in self.node_names():
            self.stop_node(node)
        if (Path(self.state_dir) / "nodes").is_dir() or self.is_up():
            self.stop_bird("rt")
        super().down()

    # ---- daemons: BIRD ----------------------------------------------------

    def _daemon_dir(self, host: str) -> Path:
        path = Path(self.state_dir) / "nodes" / host
        path.mkdir(parents=True, exist_ok=True)
        return path

    def node_as(self, node: str) -> int:
        return FIRST_NODE_AS + int(node[2:]) - 1

    def bird_config(self, host: str) -> str:
        """BIRD 2 configuration of the router (``"rt"``, the lab's own) or of a
        node (the shipped recipe, examples/bird-balancer.conf, with this
        node's address, AS, the router and a log file put in)."""
        log = self._daemon_dir(host) / "bird.log"
        if host != "rt":
            return _render(BIRD_EXAMPLE, {
                r"^log syslog all;": f'log "{log}" all;',
                r"^router id [0-9.]+;": f"router id {self.host_ip(host)};",
                r"^(\s*)local [0-9.]+ as \d+;": rf"\g<1>local {self.host_ip(host)} as {self.node_as(host)};",
                r"^(\s*)neighbor [0-9.]+ as \d+;": rf"\g<1>neighbor {self.router_ip()} as {ROUTER_AS};",
                r"^(\s*)kernel table \d+;": rf"\g<1>kernel table {ANNOUNCE_TABLE};",
            })
        # The router recipe with the lab's addresses and one peer per node.
        peers = "".join(
            f"protocol bgp {node} from balancers {{\n\tneighbor {self.host_ip(node)} as {self.node_as(node)};\n}}\n"
            for node in self.node_names())
        return _render(ROUTER_EXAMPLE, {
            r"^log syslog all;": f'log "{log}" all;',
            r"^router id [0-9.]+;": f"router id {self.router_ip()};",
            r'^(\s*)interface "\w+" \{': rf'\g<1>interface "{labtool.IFNAME}" {{',
            r"^(\s*)local [0-9.]+ as \d+;": rf"\g<1>local {self.router_ip()} as {ROUTER_AS};",
            r"^(\s*)hold time \d+;": rf"\g<1>hold time {HOLD_TIME};",
            r"^(?:protocol bgp \w+ from balancers \{\n[^}]*\}\n)+": peers.replace("\\", r"\\"),
        })

    def bird_socket(self, host: str) -> Path:
        return self._daemon_dir(host) / "bird.ctl"

    def start_bird(self, host: str) -> None:
        """(Re)start BIRD in ``host`` ("rt" or a node); wait until it answers birdc."""
        self.stop_bird(host)
        base = self._daemon_dir(host)
        (base / "bird.conf").write_text(self.bird_config(host))
        with open(base / "bird.out", "ab") as out:
            proc = self.popen(host, BIRD, "-f", "-c", base / "bird.conf", "-s", self.bird_socket(host),
                              "-P", base / "bird.pid", stdin=subprocess.DEVNULL, stdout=out,
                              stderr=subprocess.STDOUT, start_new_session=True)
        self._daemons[(host, "bird")] = proc
        deadline = time.monotonic() + DAEMON_START
        while self.birdc(host, "show status", check=False).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise labtool.LabError(f"BIRD in {host} did not start:\n{labtool._tail(base / 'bird.out')}\n"
                                       f"{labtool._tail(base / 'bird.log')}")
            time.sleep(POLL)

    def birdc(self, host: str, command: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(host, BIRDC, "-s", self.bird_socket(host), *command.split(), check=check)

    def stop_bird(self, host: str, kill: bool = False) -> None:
        """Stop BIRD in ``host``: SIGTERM (it withdraws), or SIGKILL (it just vanishes)."""
        base = Path(self.state_dir) / "nodes" / host
        _stop_pid(_read_pid(base / "bird.pid"), signal.SIGKILL if kill else signal.SIGTERM, 5)
        proc = self._daemons.pop((host, "bird"), None)
        if proc is not None:
            proc.wait(10)
        (base / "bird.pid").unlink(missing_ok=True)

    # ---- daemons: keepalived ------------------------------------------------

    def ready_file(self, node: str) -> Path:
        """The node's xdplb ready file ([xdplb] ready_file), keepalived's track_file."""
        return self._daemon_dir(node) / "ready"

    def keepalived_config(self, node: str) -> str:
        """The shipped pair recipe (examples/keepalived-pair.conf) with this
        node's router_id, priority (lb1 highest) and ready file put in."""
        n = int(node[2:])
        return _render(KEEPALIVED_EXAMPLE, {
            r"^(\s*)router_id \S+": rf"\g<1>router_id xdplb-node{n}",
            r'^(\s*)file "[^"]+"': rf'\g<1>file "{self.ready_file(node)}"',
            r"^(\s*)priority \d+": rf"\g<1>priority {150 - 50 * (n - 1)}",
            r"^(\s*)virtual_ipaddress \{\n\s*[0-9.]+/32 dev \w+":
                rf"\g<1>virtual_ipaddress {{\n\g<1>\t{self.vip}/32 dev {labtool.IFNAME}",
        })

    def start_keepalived(self, node: str) -> None:
        self.stop_keepalived(node)
        base = self._daemon_dir(node)
        (base / "keepalived.conf").write_text(self.keepalived_config(node))
        with open(base / "keepalived.log", "ab") as out:
            proc = self.popen(node, KEEPALIVED, "--vrrp", "--dont-fork", "--log-console", "--log-detail",
                              "--use-file", base / "keepalived.conf", "--pid", base / "keepalived.pid",
                              "--vrrp_pid", base / "keepalived-vrrp.pid", stdin=subprocess.DEVNULL,
                              stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self._daemons[(node, "keepalived")] = proc
        (base / "keepalived.main").write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + DAEMON_START
        while not _alive(_read_pid(base / "keepalived-vrrp.pid")):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise labtool.LabError(f"keepalived in {node} did not start:\n"
                                       f"{labtool._tail(base / 'keepalived.log')}")
            time.sleep(POLL)

    def stop_keepalived(self, node: str, kill: bool = False) -> None:
        base = Path(self.state_dir) / "nodes" / node
        for name in ("keepalived-vrrp.pid", "keepalived.pid", "keepalived.main"):
            _stop_pid(_read_pid(base / name), signal.SIGKILL if kill else signal.SIGTERM, 5)
            (base / name).unlink(missing_ok=True)
        proc = self._daemons.pop((node, "keepalived"), None)
        if proc is not None:
            proc.wait(10)

    def vrrp_master(self) -> list[str]:
        """The nodes holding the VIP on eth0 now."""
        return [node for node in self.node_names()
                if self.vip in self.run(node, "ip", "-4", "-o", "addr", "show", labtool.IFNAME).stdout]

    # ---- nodes: xdplb + routing daemon ---------------------------------------

    def pool_text(self, node: str, skip: tuple[str, ...] = (), health_port: int | None = None,
                  interval: float = 1.0, timeout: float = 0.5, rise: int = 2, fall: int = 2,
                  **settings) -> str:
        """A node's pool: the PACS pool (tools/provision/xdplb-pool.sh) over every
        backend not in ``skip``, with ``manage_vips = false``, the announce
        table (BGP) or the ready file (VRRP) and ``settings`` in ``[xdplb]``; ``health_port`` probes every
        backend on that port instead (a node that sees every backend down)."""
        if self.pacs:
            text = _pacs_lab().pool_text(self, "tcp", interval, timeout, rise, fall)
        else:
            text = _lab_xdplb().pool_text(self, interval, timeout, rise, fall)
        if skip:
            text = _drop_backends(text, skip)
        if health_port is not None:
            text = re.sub(r"^(\s*)\[service\.health\]\n(\s*port = \d+\n)?",
                          lambda m: f"{m.group(1)}[service.health]\n{m.group(1)}port = {health_port}\n",
                          text, flags=re.M)
        keys = {"manage_vips": False, **self.pool_settings, **settings}
        if self.routing == "bgp":
            keys.setdefault("announce_table", ANNOUNCE_TABLE)
        else:
            keys.setdefault("ready_file", str(self.ready_file(node)))
        lines = "".join(f"{k} = {_toml(v)}\n" for k, v in keys.items())
        if "[xdplb]\n" not in text:
            raise labtool.LabError("pool text has no [xdplb] section")
        return text.replace("[xdplb]\n", "[xdplb]\n" + lines, 1)

    def balancer(self, node: str):
        """The node's lab_xdplb.Balancer (made on first use; not started)."""
        self._check_node(node)
        if node not in self._balancers:
            base = self._daemon_dir(node)
            self._balancers[node] = _lab_xdplb().Balancer(
                self, base / "pool.toml", base / "run", base / "xdplb.log", mode="generic", host=node)
        return self._balancers[node]

    def start_xdplb(self, node: str, pool: str | None = None, wait_up: bool = True) -> None:
        """Write the node's pool (``pool`` or the default), start ``xdplb attach``
        (generic XDP) and wait until it is ready and, with ``wait_up``, every
        backend has its first verdict and is up."""
        b = self.balancer(node)
        b.pool.write_text(pool if pool is not None else self.pool_text(node))
        b.start()
        (self._daemon_dir(node) / "xdplb.pid").write_text(f"{b.proc.pid}\n")
        b.wait_ready(timeout=XDPLB_START)
        if wait_up:
            b.wait_for(lambda st: all(be["health"] == "up" for s in st["services"] for be in s["backends"]),
                       30, f"every backend up on {node}")

    def start_routing(self, node: str) -> None:
        """Start the node's routing daemon: BIRD or keepalived."""
        if self.routing == "vrrp":
            self.start_keepalived(node)
        else:
            self.start_bird(node)

    def start_node(self, node: str, pool: str | None = None) -> None:
        """xdplb, then (once it is ready and every backend is up) BIRD or keepalived."""
        self.start_xdplb(node, pool)
        self.start_routing(node)

    def kill_node(self, node: str) -> float:
        """The node dies: its link goes down, its routing daemon and xdplb are SIGKILLed.
        (The XDP program stays attached and its maps pinned, as after a crash.)
        Returns the time.monotonic() of the link going down."""
        self.link(node, False)
        lost = time.monotonic()
        if self.routing == "bgp":
            self.stop_bird(node, kill=True)
        else:
            self.stop_keepalived(node, kill=True)
        b = self._balancers.get(node)
        if b is not None and b.proc is not None and b.proc.poll() is None:
            b.kill()
        (self._daemon_dir(node) / "xdplb.pid").unlink(missing_ok=True)
        return lost

    def revive_node(self, node: str, pool: str | None = None) -> None:
        """A killed node returns: link up, xdplb (adopting its pins), then routing."""
        self.link(node, True)
        self.start_node(node, pool)

    def stop_node(self, node: str) -> None:
        """Stop the routing daemon, then xdplb with SIGTERM (it detaches and unpins)."""
        base = Path(self.state_dir) / "nodes" / node
        if self.routing == "bgp":
            self.stop_bird(node)
        else:
            self.stop_keepalived(node)
        b = self._balancers.pop(node, None)
        if b is not None and b.proc is not None:
            if b.proc.poll() is None:
                b.stop(timeout=XDPLB_STOP)
        else:
            _stop_pid(_read_pid(base / "xdplb.pid"), signal.SIGTERM, XDPLB_STOP)
        (base / "xdplb.pid").unlink(missing_ok=True)
        _lab_xdplb().release_bpffs(base / "bpffs")

    # ---- what the router sees ----------------------------------------------

    def router_nexthops(self) -> list[str]:
        """The gateways of the router's kernel route to the VIP (empty: none)."""
        out = self.run("rt", "ip", "-j", "-4", "route", "show", f"{self.vip}/32").stdout
        gateways: list[str] = []
        for route in json.loads(out or "[]"):
            if "gateway" in route:
                gateways.append(route["gateway"])
            gateways += [hop["gateway"] for hop in route.get("nexthops", []) if "gateway" in hop]
        return sorted(gateways)

    def wait_nexthops(self, nodes: list[str], timeout: float) -> float:
        """Wait until the router's VIP route leads to exactly ``nodes``; seconds taken."""
        want = sorted(self.host_ip(n) for n in nodes)
        start = time.monotonic()
        while (got := self.router_nexthops()) != want:
            if time.monotonic() - start > timeout:
                raise AssertionError(f"router's route to {self.vip}: nexthops {got}, wanted {want} "
                                     f"({', '.join(nodes) or 'none'}) within {timeout}s")
            time.sleep(0.05)
        return time.monotonic() - start

    def start_all_nodes(self) -> None:
        for node in self.node_names():
            self.start_node(node)
        if self.routing == "bgp":
            self.wait_nexthops(self.node_names(), 30)


@contextlib.contextmanager
def temporary_ha_lab(base: str, pace: str | None = None, **options):
    """A HaLab under the first unused prefix ``<base><n>``, with its client
    paced (``pace``, a tc rate) and every node running and announced, for
    the ``with`` block; torn down after it however the block ends."""
    the_lab = HaLab(prefix=labtool.unused_prefix(base), **options)
    the_lab.up()
    try:
        if pace:
            the_lab.pace_client(pace)
        the_lab.start_all_nodes()
        yield the_lab
    finally:
        the_lab.down()


def _render(example: Path, changes: dict[str, str]) -> str:
    """The example file with each pattern (a multi-line regex that must match
    exactly once, so a changed recipe fails loudly here) replaced."""
    text = example.read_text()
    for pattern, replacement in changes.items():
        text, count = re.subn(pattern, replacement, text, flags=re.M)
        if count != 1:
            raise labtool.LabError(f"{example.name}: expected one match of {pattern!r}, found {count}; "
                                   "update tools/ha_lab.py to the recipe")
    return text


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


def _drop_backends(text: str, skip: tuple[str, ...]) -> str:
    """The pool text without the [[service.backend]] tables named in ``skip``."""
    out, lines, i = [], text.splitlines(keepends=True), 0
    while i < len(lines):
        if lines[i].strip() == "[[service.backend]]":
            block = [lines[i]]
            i += 1
            while i < len(lines) and lines[i].strip() and not lines[i].strip().startswith("["):
                block.append(lines[i])
                i += 1
            name = next((ln.split("=", 1)[1].strip().strip('"') for ln in block if ln.strip().startswith("name")), "")
            if name not in skip:
                out += block
            continue
        out.append(lines[i])
        i += 1
    return "".join(out)


# ---- the stall sampler (run in the client namespace) ---------------------------

_ACKED = re.compile(r"bytes_acked:(\d+)")


def acked(dst: str, port: int, period: float = 0.05) -> int:
    """Print ``<t> <local port> <bytes_acked>`` of each established connection
    to dst:port every period."""
    start = time.monotonic()
    while True:
        out = subprocess.run(["ss", "-Htin", "state", "established", "dst", dst, "dport", "=", f":{port}"],
                             capture_output=True, text=True).stdout
        t = time.monotonic() - start
        local = None
        for line in out.splitlines():
            if line and not line[0].isspace():     # the socket's line; its details follow indented
                local = line.split()[-2].rsplit(":", 1)[1]
            elif local and (m := _ACKED.search(line)):
                print(f"{t:.3f} {local} {m.group(1)}", flush=True)
        time.sleep(period)


def longest_stall(samples: list[tuple[float, int]]) -> float:
    """Longest time between two consecutive increases of bytes_acked."""
    last_t, last_b, worst = None, None, 0.0
    for t, b in samples:
        if last_b is None or b > last_b:
            if last_t is not None:
                worst = max(worst, t - last_t)
            last_t, last_b = t, b
    return worst


def parse_samples(out: str, port: int | None) -> list[tuple[float, int]]:
    """The (t, bytes_acked) samples of the connection from local ``port``
    (None: of the connection that got furthest)."""
    rows = [(float(t), int(p), int(b)) for t, p, b in (line.split() for line in out.splitlines() if line.strip())]
    if port is None and rows:
        port = max(rows, key=lambda r: r[2])[1]
    return [(t, b) for t, p, b in rows if p == port]


class LongStore:
    """One storescu association carrying ``path`` through the VIP, its
    bytes_acked sampled in the client namespace every 50 ms (``acked``)."""

    def __init__(self, lab: HaLab, path: Path):
        pacs = _pacs_lab()
        self.lab = lab
        self.started = time.monotonic()
        self.store = pacs.storescu(lab, path, popen=True)
        self.sampler = lab.popen("client", labtool.PYTHON, Path(__file__), "acked", lab.vip, pacs.DICOM_PORT,
                                 stdout=subprocess.PIPE, text=True)
        self.seconds = 0.0
        self.samples: list[tuple[float, int]] = []
        self.port: int | None = None

    def client_port(self, timeout: float = 10) -> int:
        """The local port of storescu's association (found by its pid)."""
        deadline = time.monotonic() + timeout
        while self.port is None:
            out = self.lab.run("client", "ss", "-Htnp", "state", "established", "dst", self.lab.vip).stdout
            for line in out.splitlines():
                if f"pid={self.store.pid}," in line:
                    self.port = int(line.split()[-3].rsplit(":", 1)[1])
            if self.port is None:
                if time.monotonic() > deadline or not self.running():
                    raise AssertionError(f"storescu (pid {self.store.pid}) has no association to {self.lab.vip}")
                time.sleep(0.05)
        return self.port

    def running(self) -> bool:
        return self.store.poll() is None

    def carried_pacs(self, timeout: float = 10) -> str:
        """The backend holding the association, from the backends' own sockets."""
        match = (f"( sport = :{_pacs_lab().DICOM_PORT} and dst {self.lab.host_ip('client')} "
                 f"and dport = :{self.client_port(timeout)} )")
        deadline = time.monotonic() + timeout
        while True:
            holders = [name for name in self.lab.backend_names()
                       if self.lab.run(name, "ss", "-Htn", "state", "established", match).stdout.strip()]
            if len(holders) == 1:
                return holders[0]
            if time.monotonic() > deadline or not self.running():
                raise AssertionError(f"no single PACS holds the long store's association: {holders}")
            time.sleep(0.05)

    def finish(self, timeout: float = 600) -> tuple[int, str]:
        """Wait for storescu; (exit status, its output). Stops the sampler."""
        try:
            out, _ = self.store.communicate(timeout=timeout)
        finally:
            self.seconds = time.monotonic() - self.started
            self.close()
        return self.store.returncode, out

    def close(self) -> None:
        """Stop storescu (if still running) and the sampler; keep the samples."""
        if self.store.poll() is None:
            self.store.kill()
        self.store.wait(30)
        if self.sampler.returncode is None:
            self.sampler.terminate()
            out, _ = self.sampler.communicate(timeout=30)
            self.samples = parse_samples(out or "", self.port)

    def longest_stall(self) -> float:
        return longest_stall(self.samples)

    def describe(self) -> str:
        """Samples taken and their span, to judge the stall figure by."""
        if not self.samples:
            return "no bytes_acked samples"
        return (f"{len(self.samples)} bytes_acked samples from {self.samples[0][0]:.1f}s to "
                f"{self.samples[-1][0]:.1f}s, last {self.samples[-1][1]} bytes")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ha_lab.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("acked", help="(internal) sample bytes_acked, run in the client namespace")
    a.add_argument("dst")
    a.add_argument("port", type=int)
    args = p.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        return acked(args.dst, args.port)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sys.exit(main())
