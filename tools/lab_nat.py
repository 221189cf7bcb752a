#!/usr/bin/python3
"""NAT lab: PACS that cannot be reconfigured, behind the gateway as their router.

Built on ``tools/lab.py``'s segment (prefix ``P``)::

    client   10.20.0.2 ─┐                       ┌─ P-lb  10.10.0.10  the gateway (xdplb, one arm: eth0)
    stranger 10.20.0.3 ─┤ P-nr (router)          │        VIP 10.10.0.100, ip_forward on, no redirects
                        └ br 10.20.0.1           ├─ P-be1..3 10.10.0.11+  Orthanc on 4242,
                          eth0 10.10.0.1 ─ P-sw ─┤          default route via the gateway
                                                 └─ (P-client 10.10.0.2: the base lab's, unused here)

The clients sit on another subnet than the PACS, behind a router namespace,
so a reply leaving the gateway must go to the router's MAC (the next hop
``bpf_fib_lookup`` returns), never to the client's. The gateway routes
10.20.0.0/24 via the router; the PACS route everything via the gateway (so
their replies cross it, as in LVS-NAT) and ignore redirects, and the gateway
sends none (one arm: it forwards out of the interface a packet came in on).

Every Orthanc listens on 4242 with DicomCheckModalityHost = true and
DicomAlwaysAllowStore = false, and knows two callers: MODALITY at the
client's address and XDPLB (the DICOM health check) at the gateway's. The
stranger uses the same AE title from an address Orthanc does not know: the
negative control. The backends carry no VIP (the base lab's DSR provisioning
is undone): a NAT backend is an appliance nobody configures.

Offloads, as NAT needs them (README "Offloads for NAT"): XDP cannot see
whether an skb's checksum is still partial, nor split a super-packet, so
every sender here (clients, router, PACS) has TX checksumming, TSO and GSO
off; the router has GRO off, so what it forwards is what it received.
The gateway has GRO off too: generic XDP runs after GRO, and a merged frame
would be translated and sent on whole. The lab runs xdplb in generic mode on
veth (what ``--mode auto`` picks there); native mode on veth needs the same
sender settings (the bench's native row adds the pass-through program on the
gateway's switch port, ``Lab(native_peer=True)``).

IPv6 (a dual-stack base lab, ``Lab(vip6=...)``: ``temporary_nat_lab(vip6=VIP6)``)
adds the same shape over IPv6, every address without DAD (and DAD off in
the new namespaces) so nothing waits::

    client   fd00:10:20::2 ─┐                            ┌─ P-lb  fd00:10:10::10, VIP fd00:10:10::100,
    stranger fd00:10:20::3 ─┤ P-nr (router)              │        net.ipv6.conf.all.forwarding = 1,
                            └ br fd00:10:20::1           │        fd00:10:20::/64 via fe80::1 dev eth0
                              eth0 fd00:10:10::1, fe80::1┤
                                                         └─ P-be1..3 fd00:10:10::11+, default via the gateway

The gateway's route to the clients names the router by its link-local
address, as IPv6 routes usually do, so the controller's next-hop
pre-resolution must solicit it on the attached link. The router holds a
permanent neighbour entry for the IPv6 VIP: it never solicits the gateway,
so the gateway never learns the router from the router's own Neighbour
Solicitations, and its entry for fe80::1 comes only from xdplb
(a stricter lab than a real router, on purpose: without pre-resolution every
IPv6 reply is dropped as no_neigh). The backends lose the base lab's IPv6
VIP on ``lo`` and ignore redirects. Their servers: tools/lab_backend.py on
``::`` (HTTP on 8080, the UDP mirror on 5001, ...), and, with
``start_scps()``, a pynetdicom storage SCP on IPv6 port 4242
(tools/pacs6_lab.py; Orthanc has no IPv6). ``NatLab(base, orthanc=False)``
skips the IPv4 Orthancs when only IPv6 is tested.

Python use (tests put ``tools/`` on ``sys.path``)::

    with lab_nat.temporary_nat_lab("xn") as nat:
        nat.run("client", "storescu", ...)

``NatLab`` answers the calls ``tools/pacs_lab.py``, ``tools/lab_xdplb.py``
and the bench make on a lab (run, popen, ns, host_ip, backend_names...), with
"client" meaning the routed client. ``capture`` records the frames a
namespace receives (run inside it: ``lab_nat.py capture IFACE FILE ...``),
because tcpdump is not installed; the tests read the file with scapy.
"""
from __future__ import annotations

import argparse
import contextlib
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

TOOLS_DIR = Path(__file__).resolve().parent
if str(TOOLS_DIR) not in sys.path:
    sys.path.insert(0, str(TOOLS_DIR))

import lab as labtool  # noqa: E402
import pacs6_lab  # noqa: E402
import pacs_lab  # noqa: E402

ROUTER_LAB_IP = "10.10.0.1"
CLIENT_NET = "10.20.0.0/24"
ROUTER_CLIENT_IP = "10.20.0.1"
CLIENT_HOSTS = {"client": "10.20.0.2", "stranger": "10.20.0.3"}
ROUTER_BRIDGE = "brc"
SERVICE_PORT = pacs_lab.DICOM_PORT   # what modalities are configured for: 104
ORTHANC_PORT = 4242                  # Orthanc's default, where the PACS listens
SERVICE = "pacs-nat"
PYTHON = "/usr/bin/python3"
THIS = str(Path(__file__).resolve())

# The IPv6 side (module docstring).
ROUTER_LAB_IP6 = "fd00:10:10::1"
ROUTER_LINK_LOCAL = "fe80::1"            # the gateway's next hop to the IPv6 clients
CLIENT_NET6 = "fd00:10:20::/64"
ROUTER_CLIENT_IP6 = "fd00:10:20::1"
CLIENT_HOSTS6 = {"client": "fd00:10:20::2", "stranger": "fd00:10:20::3"}
VIP6 = "fd00:10:10::100"
SCP_PORT = ORTHANC_PORT                  # the IPv6 PACS (pynetdicom) listen where Orthanc would


class NatLab:
    """The NAT topology above, around a base ``lab.Lab``; see the module docstring."""

    def __init__(self, base: "labtool.Lab", orthanc: bool = True):
        self.base = base
        self.orthanc = orthanc   # IPv4 Orthanc on 4242 in every backend
        self.names = {"router": f"{base.prefix}-nr", "client": f"{base.prefix}-nc1",
                      "stranger": f"{base.prefix}-nc2"}

    # ---- what pacs_lab, lab_xdplb and the bench ask of a lab ------------------

    prefix = property(lambda self: self.base.prefix)
    vip = property(lambda self: self.base.vip)
    state_dir = property(lambda self: self.base.state_dir)
    backends = property(lambda self: self.base.backends)

    def backend_names(self) -> list[str]:
        return self.base.backend_names()

    def backend_ip(self, i) -> str:
        return self.base.backend_ip(i)

    vip6 = property(lambda self: self.base.vip6)
    python6 = property(lambda self: self.base.python6)
    dual_stack = property(lambda self: self.base.dual_stack)

    def backend_ip6(self, i) -> str:
        return self.base.backend_ip6(i)

    def host_ip6(self, host: str) -> str:
        if host in CLIENT_HOSTS6:
            return CLIENT_HOSTS6[host]
        if host == "router":
            return ROUTER_LAB_IP6
        return self.base.host_ip6(host)

    def ns(self, host: str) -> str:
        return self.names[host] if host in self.names else self.base.ns(host)

    def host_ip(self, host: str) -> str:
        if host in CLIENT_HOSTS:
            return CLIENT_HOSTS[host]
        if host == "router":
            return ROUTER_LAB_IP
        return self.base.host_ip(host)

    def mac(self, host: str) -> str:
        """MAC of a host's eth0 (the router's lab-side one for "router")."""
        out = self.run(host, "cat", "/sys/class/net/eth0/address").stdout
        return out.strip()

    def run(self, host: str, *cmd, check: bool = True, timeout: float | None = 30,
            capture: bool = True, input: str | None = None) -> subprocess.CompletedProcess:  # noqa: A002
        argv = ["ip", "netns", "exec", self.ns(host), *map(str, cmd)]
        return labtool._execute(argv, check=check, timeout=timeout, capture=capture, input=input)

    def popen(self, host: str, *cmd, **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.ns(host), *map(str, cmd)], **kw)

    # ---- lifecycle ----------------------------------------------------------

    def up(self) -> "NatLab":
        self.base.up()
        try:
            self._remove_own()  # leftovers of a crashed run under this prefix
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _ip(self, host: str, *args) -> None:
        labtool._execute(["ip", "-n", self.ns(host), *map(str, args)])

    def _sysctl(self, host: str, **values) -> None:
        for key, value in values.items():
            self.run(host, "sysctl", "-q", "-w", f"{key.replace('__', '.')}={value}")

    def _senders_offloads_off(self, host: str, ifname: str = "eth0") -> None:
        """TX checksumming, TSO and GSO off (README "Offloads for NAT"): XDP
        cannot finish a partial checksum nor split a super-packet."""
        self.run(host, "ethtool", "-K", ifname, "tx", "off", "tso", "off", "gso", "off")

    def _build(self) -> None:
        for host, ns in self.names.items():
            labtool._execute(["ip", "netns", "add", ns])
            labtool._execute(["ip", "-n", ns, "link", "set", "lo", "up"])
            if self.dual_stack:   # before any link exists: their addresses skip DAD too
                self._sysctl(host, net__ipv6__conf__all__disable_ipv6=0, net__ipv6__conf__default__disable_ipv6=0,
                             net__ipv6__conf__all__accept_dad=0, net__ipv6__conf__default__accept_dad=0)
        sw_port = self.names["router"]
        # Router: eth0 on the lab's switch, a bridge for the two clients.
        self._ip("sw", "link", "add", sw_port, "type", "veth", "peer", "name", "eth0", "netns", self.ns("router"))
        self._ip("router", "addr", "add", f"{ROUTER_LAB_IP}/{labtool.NETMASK_BITS}", "dev", "eth0")
        self._ip("router", "link", "add", ROUTER_BRIDGE, "type", "bridge", "stp_state", 0, "forward_delay", 0,
                 *(("mcast_snooping", 0) if self.dual_stack else ()))
        self._ip("router", "addr", "add", f"{ROUTER_CLIENT_IP}/24", "dev", ROUTER_BRIDGE)
        self._ip("router", "link", "set", ROUTER_BRIDGE, "up")
        for host, address in CLIENT_HOSTS.items():
            port = f"to-{host}"
            self._ip("router", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", self.ns(host))
            self._ip("router", "link", "set", port, "master", ROUTER_BRIDGE)
            self._ip("router", "link", "set", port, "up")
            self._ip(host, "addr", "add", f"{address}/24", "dev", "eth0")
            self._senders_offloads_off(host)
            self._ip(host, "link", "set", "eth0", "up")
            self._ip(host, "route", "add", "default", "via", ROUTER_CLIENT_IP)
        self._senders_offloads_off("router")
        self.run("router", "ethtool", "-K", "eth0", "gro", "off")
        self._ip("router", "link", "set", "eth0", "up")
        self._ip("sw", "link", "set", sw_port, "master", labtool.BRIDGE)
        self._ip("sw", "link", "set", sw_port, "up")
        self._sysctl("router", net__ipv4__ip_forward=1)
        # The gateway: routes to the clients through the router, forwards, sends no redirects.
        self._sysctl("lb", net__ipv4__ip_forward=1, net__ipv4__conf__all__send_redirects=0,
                     net__ipv4__conf__eth0__send_redirects=0)
        self._ip("lb", "route", "add", CLIENT_NET, "via", ROUTER_LAB_IP)
        # Generic XDP runs after GRO: merged frames would reach it (and be sent on) whole.
        self.run("lb", "ethtool", "-K", "eth0", "gro", "off")
        # The PACS: no VIP, the gateway as their default route, redirects ignored.
        for name in self.backend_names():
            self._senders_offloads_off(name)
            self._ip(name, "addr", "del", f"{self.vip}/32", "dev", "lo")
            self._ip(name, "route", "add", "default", "via", self.base.host_ip("lb"))
            self._sysctl(name, net__ipv4__conf__all__accept_redirects=0,
                         net__ipv4__conf__eth0__accept_redirects=0)
        if self.dual_stack:
            self._build_ipv6()
        if self.orthanc:
            pacs_lab.check_packages()
            for name in self.backend_names():
                self.start_orthanc(name)

    def _build_ipv6(self) -> None:
        """The IPv6 side of the same topology (module docstring)."""
        self._ip("router", "addr", "add", f"{ROUTER_LAB_IP6}/64", "dev", "eth0", "nodad")
        self._ip("router", "addr", "add", f"{ROUTER_LINK_LOCAL}/64", "dev", "eth0", "nodad")
        self._ip("router", "addr", "add", f"{ROUTER_CLIENT_IP6}/64", "dev", ROUTER_BRIDGE, "nodad")
        self._sysctl("router", net__ipv6__conf__all__forwarding=1)
        # Never solicit the gateway (module docstring): it learns the router only from xdplb.
        self._ip("router", "neigh", "replace", self.vip6, "lladdr", self.base.mac("lb"), "dev", "eth0",
                 "nud", "permanent")
        for host, address in CLIENT_HOSTS6.items():
            self._ip(host, "addr", "add", f"{address}/64", "dev", "eth0", "nodad")
            self._ip(host, "-6", "route", "add", "default", "via", ROUTER_CLIENT_IP6)
        self._sysctl("lb", net__ipv6__conf__all__forwarding=1)
        self._ip("lb", "-6", "route", "add", CLIENT_NET6, "via", ROUTER_LINK_LOCAL, "dev", "eth0")
        for name in self.backend_names():
            self._ip(name, "addr", "del", f"{self.vip6}/128", "dev", "lo")
            self._ip(name, "-6", "route", "add", "default", "via", self.base.host_ip6("lb"))
            self._sysctl(name, net__ipv6__conf__all__accept_redirects=0, net__ipv6__conf__eth0__accept_redirects=0)

    def start_scps(self) -> None:
        """A pynetdicom storage SCP on IPv6 port 4242 in every backend (tools/pacs6_lab.py)."""
        pacs6_lab.start_all(self, SCP_PORT)

    def start_scp(self, name: str) -> None:
        pacs6_lab.start_scp(self, name, SCP_PORT)

    def modalities(self) -> dict[str, str]:
        """The callers every Orthanc knows: {AE title: address}."""
        return {pacs_lab.MODALITY_AET: CLIENT_HOSTS["client"], pacs_lab.PROBE_AET: self.base.host_ip("lb")}

    def start_orthanc(self, name: str) -> None:
        """(Re)start ``name``'s Orthanc on 4242, authorising callers by AE title and address."""
        pacs_lab.start_orthanc(self, name, dicom_port=ORTHANC_PORT, modalities=self.modalities())

    def _remove_own(self) -> None:
        present = labtool.list_namespaces()
        for ns in self.names.values():
            if ns in present:
                labtool._execute(["ip", "netns", "del", ns], check=False)
        labtool._execute(["ip", "-n", self.base.ns("sw"), "link", "del", self.names["router"]], check=False)

    def down(self) -> None:
        pacs_lab.stop_all(self)
        pacs6_lab.stop_all(self)
        self._remove_own()
        self.base.down()

    # ---- pacing the client (a long transfer that lasts what a test needs) --

    def pace(self, rate: str | None) -> None:
        """Limit the client's sending rate (tc tbf, e.g. "40mbit"), or lift the limit (None)."""
        if rate is None:
            self.run("client", "tc", "qdisc", "del", "dev", "eth0", "root", check=False)
            return
        self.run("client", "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate,
                 "burst", "64kb", "latency", "500ms")


@contextlib.contextmanager
def temporary_nat_lab(base: str = "xn", backends: int = 3, vip6: str | None = None, orthanc: bool = True):
    """A NAT lab under an unused prefix for the ``with`` block, then removed;
    ``vip6`` adds the IPv6 side (the SCPs and SCUs run on this python)."""
    the_lab = NatLab(labtool.Lab(prefix=labtool.unused_prefix(base), backends=backends, vip6=vip6,
                                 python6=sys.executable), orthanc=orthanc)
    the_lab.up()
    try:
        yield the_lab
    finally:
        the_lab.down()


# ---- the pool -----------------------------------------------------------------

def pool_text(nat: NatLab, check: str = "tcp", interval: float = 1.0, timeout: float = 0.5,
              rise: int = 2, fall: int = 2, metrics: str = "") -> str:
    """VIP:104 in NAT mode to every PACS's 4242; health checks go to 4242 too.

    ``check`` "dicom" probes with an association from XDPLB, which every
    Orthanc knows at the gateway's address; ``metrics`` is the exporter's
    address in the gateway's namespace ("" for none).
    """
    lines = ["[xdplb]", f'metrics = "{metrics}"', "",
             "[[service]]", f'name = "{SERVICE}"', f'vip = "{nat.vip}"', f"port = {SERVICE_PORT}",
             'protocol = "tcp"', 'forwarding = "nat"', "  [service.health]", f'  check = "{check}"', f'  called_ae = "{pacs_lab.AET}"',
             f"  interval = {interval}", f"  timeout = {timeout}", f"  rise = {rise}", f"  fall = {fall}"]
    for name in nat.backend_names():
        lines += ["  [[service.backend]]", f'  name = "{name}"', f'  address = "{nat.backend_ip(name)}"',
                  f"  port = {ORTHANC_PORT}"]
    return "\n".join(lines) + "\n"


# The IPv6 NAT services: (name, VIP port, protocol, backend port, health check, health port or
# None for each backend's own port). Every backend port differs from its VIP port.
NAT6_SERVICES = (
    ("web6", 80, "tcp", 8080, "http", None),          # tools/lab_backend.py's HTTP
    ("mirror6", 7, "udp", 5001, "http", 8080),        # its UDP mirror; UDP has no probe of its own
    ("dicom6", SERVICE_PORT, "tcp", SCP_PORT, "dicom", None),   # the pynetdicom SCPs
)


def pool6_text(nat: NatLab, interval: float = 1.0, timeout: float = 0.5, rise: int = 2, fall: int = 2,
               metrics: str = "") -> str:
    """NAT6_SERVICES on the IPv6 VIP over every backend's IPv6 address."""
    lines = ["[xdplb]", f'metrics = "{metrics}"', ""]
    for name, port, protocol, backend_port, check, health_port in NAT6_SERVICES:
        lines += ["[[service]]", f'name = "{name}"', f'vip = "{nat.vip6}"', f"port = {port}",
                  f'protocol = "{protocol}"', 'forwarding = "nat"', "  [service.health]", f'  check = "{check}"',
                  f"  interval = {interval}", f"  timeout = {timeout}", f"  rise = {rise}", f"  fall = {fall}"]
        if health_port:
            lines.append(f"  port = {health_port}")
        if check == "dicom":
            lines += [f'  calling_ae = "{pacs_lab.PROBE_AET}"', f'  called_ae = "{pacs_lab.AET}"']
        for backend in nat.backend_names():
            lines += ["  [[service.backend]]", f'  name = "{backend}"', f'  address = "{nat.backend_ip6(backend)}"',
                      f"  port = {backend_port}"]
        lines.append("")
    return "\n".join(lines)


def nat_outcomes(nat: NatLab, metrics: str) -> dict[str, float]:
    """xdplb_nat_packets_total by outcome, scraped from the exporter at
    ``metrics`` in the gateway's namespace."""
    from prometheus_client.parser import text_string_to_metric_families
    body = nat.run("lb", "curl", "-sS", "--max-time", "5", f"http://{metrics}/metrics").stdout
    return {s.labels["outcome"]: s.value for family in text_string_to_metric_families(body)
            for s in family.samples if s.name == "xdplb_nat_packets_total"}


# ---- nftables DNAT: the same job done by the kernel's NAT (the baseline) ---

NFT_TABLE = "xdplb_nat_baseline"


def _nft_family(vip: str) -> str:
    """nftables' family (and address keyword) for the VIP: "ip" or "ip6"."""
    return "ip6" if ":" in vip else "ip"


def nft_dnat_ruleset(vip: str, rules: list[tuple], masquerade: bool = False) -> str:
    """DNAT in prerouting, the client's address kept; conntrack undoes it on the replies.

    ``rules``: (service port, [(backend address, backend port)...], "jhash" or
    "numgen"[, "tcp" or "udp"]) - by client address, or round robin; TCP
    unless said. The VIP's family picks the table's (ip or ip6).
    ``masquerade`` adds full NAT (the source becomes the gateway's address),
    the answer the issue rules out: it hides the client from a PACS that
    checks addresses.
    """
    family = _nft_family(vip)
    lines = [f"table {family} {NFT_TABLE} {{", "  chain prerouting {",
             "    type nat hook prerouting priority dstnat; policy accept;"]
    for port, targets, how, *protocol in rules:
        pick = f"jhash {family} saddr" if how == "jhash" else "numgen inc"
        entries = ", ".join(f"{i} : {a} . {p}" for i, (a, p) in enumerate(targets))
        lines.append(f"    {family} daddr {vip} {protocol[0] if protocol else 'tcp'} dport {port} counter "
                     f"dnat {family} addr . port to {pick} mod {len(targets)} map {{ {entries} }}")
    lines.append("  }")
    if masquerade:
        lines += ["  chain postrouting {", "    type nat hook postrouting priority srcnat; policy accept;",
                  "    ct status dnat counter masquerade", "  }"]
    lines.append("}")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def nftables_dnat(nat: NatLab, rules: list[tuple], masquerade: bool = False, vip: str | None = None):
    """The gateway as an nftables DNAT router (xdplb not attached): the VIP
    (``vip``, default the lab's IPv4 one) on its eth0, the ruleset loaded;
    yields the rules' packet counters reader."""
    vip = vip or nat.vip
    family = _nft_family(vip)
    host = f"{vip}/128" if family == "ip6" else f"{vip}/32"
    nat.run("lb", "ip", "addr", "add", host, "dev", "eth0", *(("nodad",) if family == "ip6" else ()))
    try:
        nat.run("lb", "nft", "-f", "-", input=nft_dnat_ruleset(vip, rules, masquerade))
        yield lambda: nft_counters(nat, family)
    finally:
        nat.run("lb", "nft", "delete", "table", family, NFT_TABLE, check=False)
        nat.run("lb", "ip", "addr", "del", host, "dev", "eth0", check=False)


def nft_counters(nat: NatLab, family: str = "ip") -> list[int]:
    """Packets counted by each DNAT rule, in ruleset order."""
    from bench import parse
    return parse.nft_counter_packets(nat.run("lb", "nft", "-j", "list", "table", family, NFT_TABLE).stdout)


# ---- capture (tcpdump is not installed): a pcap of the frames a namespace receives --

PACKET_OUTGOING = 4


def capture(ifname: str, out: Path, seconds: float, max_frames: int, ready: Path | None = None) -> int:
    """Write every frame ``ifname`` receives (not the ones it sends) to a pcap.

    Ends after ``seconds`` or ``max_frames``; frames are kept whole (64 KiB
    snap length), so a partial checksum would show as it arrived.
    """
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))  # ETH_P_ALL
    sock.bind((ifname, 0))
    sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)   # SO_RCVBUFFORCE (root): a burst must not overflow it
    sock.settimeout(0.2)
    if ready is not None:
        ready.write_text("ready\n")
    count, end = 0, time.monotonic() + seconds
    with open(out, "wb") as fh:
        fh.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))  # LINKTYPE_ETHERNET
        while count < max_frames and time.monotonic() < end:
            try:
                frame, address = sock.recvfrom(65535)
            except socket.timeout:
                continue
            if address[2] == PACKET_OUTGOING:
                continue
            now = time.time()
            fh.write(struct.pack("<IIII", int(now), int(now % 1 * 1e6), len(frame), len(frame)) + frame)
            count += 1
    return count


@contextlib.contextmanager
def capturing(nat: NatLab, host: str, out: Path, seconds: float = 120, max_frames: int = 200_000,
              ifname: str = "eth0"):
    """Capture what ``host``'s ``ifname`` receives during the ``with`` block; the pcap is ``out``."""
    ready = out.with_suffix(".ready")
    ready.unlink(missing_ok=True)
    proc = nat.popen(host, PYTHON, THIS, "capture", ifname, out, seconds, max_frames, ready,
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 10
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise labtool.LabError(f"capture on {host} did not start: {proc.communicate()[0]}")
        time.sleep(0.02)
    try:
        yield out
    finally:
        time.sleep(0.3)   # the last frames of the block
        proc.terminate()  # SIGTERM ends the loop at once; the file holds whole records
        proc.wait(10)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lab_nat.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("capture", help="(run inside a namespace) pcap of the frames IFACE receives")
    c.add_argument("ifname")
    c.add_argument("out", type=Path)
    c.add_argument("seconds", type=float)
    c.add_argument("max_frames", type=int)
    c.add_argument("ready", type=Path, nargs="?")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    capture(args.ifname, args.out, args.seconds, args.max_frames, args.ready)
    return 0


if __name__ == "__main__":
    sys.exit(main())
