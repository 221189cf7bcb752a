"""NAT suite: the NAT lab (tools/lab_nat.py) through three paths, in one run.

A client behind a router namespace, three backends (iperf3, an HTTP responder
and a real Orthanc on 4242 each) whose default route is the gateway; only
what the gateway does changes between rows:

  routed (no balancer)  client -> backend 1's own address; the reply is routed back by the
                        gateway's kernel (no translation anywhere: the floor of this topology).
                        One backend, where the balanced rows spread the HTTP connections over
                        three single-threaded responders: its conn/s is not a ceiling
  xdplb NAT generic     client -> VIP -> `xdplb attach --mode generic`, services in
                        forwarding = "nat": destination translated in XDP, the reply
                        translated back in XDP and sent to the router (bpf_fib_lookup)
  xdplb NAT native      the same with --mode native, in a second lab built the same way plus
                        the pass-through XDP program on the gateway's switch port that native
                        XDP on veth needs (which also gives that port NAPI)
  nftables DNAT         client -> VIP -> DNAT in the gateway's prerouting hook (xdplb not
                        attached), conntrack undoing it on the replies: the same job, the client's
                        address kept, done by the kernel
  routed6, xdplb NAT6 generic, nftables DNAT6
                        the same three over IPv6, in the first lab built dual-stack (the NAT lab's
                        IPv6 side: the gateway's next hop to the clients is the router's fe80::1);
                        the C-STORE goes from pynetdicom's SCU to a pynetdicom SCP on 4242 (Orthanc
                        has no IPv6), so it compares with the IPv6 rows only, not with Orthanc's

Figures, each the median of `runs` runs:
  stream Gbit/s   one TCP stream, iperf3, VIP:5201 to the backends' 5201 (receiver's goodput);
                  TX checksum offload (and so TSO) off on every sender, as NAT needs
  conn/s          completed HTTP requests per second, each on a new TCP connection (wrk, 1 thread,
                  32 connections, `Connection: close`) against HAProxy answering by itself on
                  every backend's 8081
  C-STORE MB/s    one storescu association carrying one instance (100 MiB; 16 MiB with --quick)
                  from the client to VIP:104, translated to Orthanc's 4242: payload bytes over
                  storescu's wall time, Orthanc's own storage included
Every process shares the machine's CPUs (2 on the reference machine).
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import lab_baselines as cfg
from . import stats
from .suite_lab import BenchError, LabBench, _median, _summary, check_path_used, draw_medians, traffic_figures
from .tables import fmt, fmt_ratio, markdown

MODES = ("routed (no balancer)", "xdplb NAT generic", "xdplb NAT native", "nftables DNAT",
         "routed6 (no balancer)", "xdplb NAT6 generic", "nftables DNAT6")
IPV6_MODES = MODES[4:]
STORE_BYTES, QUICK_STORE_BYTES = 100 * 1024 * 1024, 16 * 1024 * 1024


@dataclass
class Options:
    runs: int
    seconds: float
    quick: bool
    out: Path
    progress: object = print


class NatBench(LabBench):
    """LabBench's servers and clients on the NAT lab, plus timed C-STOREs."""

    def __init__(self, nat, work: Path, opts: Options, instance: Path):
        super().__init__(nat, work, opts)
        self.instance = instance

    def store(self, target: str, port: int) -> float:
        """MB/s of one C-STORE of the instance to target:port (dcmtk's storescu,
        or pynetdicom's SCU to an IPv6 target)."""
        import pacs6_lab
        import pacs_lab

        tool = pacs6_lab if ":" in target else pacs_lab
        started = time.monotonic()
        done = tool.storescu(self.lab, self.instance, host=target, port=port, timeout=600)
        elapsed = time.monotonic() - started
        if done.returncode != 0:
            raise BenchError(f"storescu to {target}:{port} failed: {(done.stderr or done.stdout).strip()[-300:]}")
        return self.instance.stat().st_size / elapsed / 1e6

    @contextlib.contextmanager
    def nat_path(self, mode: str):
        """Set up one path; yield (target, DICOM port, facts); undo it afterwards."""
        import lab_nat

        ipv6 = mode in IPV6_MODES
        vip = self.lab.vip6 if ipv6 else self.lab.vip
        if mode.startswith("routed"):
            yield (self.lab.backend_ip6(1) if ipv6 else self.lab.backend_ip(1)), lab_nat.ORTHANC_PORT, {}
        elif mode.startswith("xdplb"):
            with self._xdplb_nat(mode.split()[-1], ipv6) as facts:
                yield vip, lab_nat.SERVICE_PORT, facts
        elif mode.startswith("nftables"):
            addresses = list(self.backends6().values() if ipv6 else self.backends.values())
            rules = [(cfg.IPERF_PORT, [(a, cfg.IPERF_PORT) for a in addresses], "jhash"),
                     (cfg.HTTP_PORT, [(a, cfg.HTTP_PORT) for a in addresses], "numgen"),
                     (lab_nat.SERVICE_PORT, [(a, lab_nat.ORTHANC_PORT) for a in addresses], "numgen")]
            facts: dict = {}
            with lab_nat.nftables_dnat(self.lab, rules, vip=vip) as counters:
                yield vip, lab_nat.SERVICE_PORT, facts
                facts["dnat_rule_packets"] = dict(zip(("stream", "http", "dicom"), counters()))
        else:
            raise ValueError(f"unknown path {mode!r}")

    def backends6(self) -> dict[str, str]:
        return {name: self.lab.backend_ip6(name) for name in self.backends}

    @contextlib.contextmanager
    def _xdplb_nat(self, xdp_mode: str, ipv6: bool = False):
        import lab_nat
        from lab_xdplb import Balancer

        pool = self.work / "xdplb-nat-pool.toml"
        vip, backends = (self.lab.vip6, self.backends6()) if ipv6 else (self.lab.vip, self.backends)
        pool.write_text(cfg.xdplb_nat_pool(vip, backends, lab_nat.SERVICE_PORT, lab_nat.ORTHANC_PORT))
        log = self.work / f"xdplb-nat-{xdp_mode}.log"
        log.unlink(missing_ok=True)
        balancer = Balancer(self.lab, pool, self.work / f"run-nat-{xdp_mode}", log, mode=xdp_mode).start()
        facts: dict = {}
        try:
            st = balancer.wait_ready(timeout=240)
            balancer.wait_for(lambda s: all(b["health"] == "up" for svc in s["services"] for b in svc["backends"]),
                              30, "every backend up")
            facts["xdp_mode"] = st["mode"]
            yield facts
            st = balancer.status()
            facts["forwarded"] = {svc["name"]: {"packets": svc["packets"]} for svc in st["services"]}
            facts["actions"] = st["actions"]
        finally:
            balancer.stop()
            balancer.release()
            facts["log_tail"] = balancer.log().splitlines()[-5:]


def measure_path(bench: NatBench, mode: str) -> dict:
    say, runs = bench.say, bench.opts.runs
    row: dict = {"mode": mode, "error": None}
    try:
        with bench.nat_path(mode) as (target, dicom_port, facts):
            row["target"] = target
            row["responders_seen"] = bench.responders_seen(target, 1 if mode.startswith("routed") else 2)
            if not any(name in bench.backends for name in row["responders_seen"]):
                raise BenchError(f"{mode}: no backend answered through {target}: {row['responders_seen']}")
            streams, wrks, stores = [], [], []
            for i in range(runs):
                say(f"nat: {mode}: run {i + 1}/{runs}: iperf3, wrk, C-STORE")
                streams.append(bench.iperf(target))
                wrks.append(bench.wrk(target))
                stores.append(bench.store(target, dicom_port))
            row["facts"] = facts
        check_path_used(mode, row["facts"])
    except Exception as exc:  # one path failing (say, native XDP refused) must not hide the others
        row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        say(f"nat: {mode}: FAILED: {row['error'][:300]}")
        return row
    row.update(traffic_figures(streams, wrks))
    row["store_mb_per_s"] = _summary(stores)
    row["store_runs"] = [round(s, 2) for s in stores]
    row["xdp_mode"] = row.get("facts", {}).get("xdp_mode")
    return row


def run(opts: Options) -> dict:
    import lab as labtool
    import lab_nat
    from make_dicom import make_instance

    say = opts.progress
    work = opts.out / "nat-work"
    work.mkdir(parents=True, exist_ok=True)
    instance = work / "store.dcm"
    make_instance(instance, QUICK_STORE_BYTES if opts.quick else STORE_BYTES)
    rows: dict[str, dict] = {}
    try:
        for native_peer, modes in ((False, [m for m in MODES if m != "xdplb NAT native"]),
                                   (True, ["xdplb NAT native"])):
            # The first lab is dual-stack for the IPv6 rows (SCPs on IPv6 4242 beside Orthanc on IPv4).
            nat = lab_nat.NatLab(labtool.Lab(prefix=labtool.unused_prefix("xnb"), backends=3, native_peer=native_peer,
                                             vip6=None if native_peer else lab_nat.VIP6, python6=sys.executable))
            say(f"nat: building NAT lab {nat.prefix}{' with the pass-through XDP on the gateway port' if native_peer else ''}")
            nat.up()
            bench = NatBench(nat, work, opts, instance)
            try:
                bench.start_servers()
                if nat.dual_stack:
                    nat.start_scps()
                for mode in modes:
                    say(f"nat: {mode}")
                    row = measure_path(bench, mode)
                    row["native_peer"] = native_peer
                    rows[mode] = row
            finally:
                bench.stop_all()
                nat.down()
    finally:
        instance.unlink(missing_ok=True)
    ordered = [rows[m] for m in MODES if m in rows]
    return {"rows": ordered, "comparisons": comparisons(ordered),
            "store_bytes": QUICK_STORE_BYTES if opts.quick else STORE_BYTES, "method": __doc__.strip()}


KEYS = (("stream_gbits", "stream"), ("conn_per_s", "conn"), ("store_mb_per_s", "store"))


def comparisons(rows: list[dict]) -> dict:
    by = {r["mode"]: r for r in rows}
    out = {}
    pairs = [(x, other) for x in ("xdplb NAT generic", "xdplb NAT native")
             for other in ("nftables DNAT", "routed (no balancer)")]
    pairs += [("xdplb NAT6 generic", "nftables DNAT6"), ("xdplb NAT6 generic", "routed6 (no balancer)"),
              ("xdplb NAT6 generic", "xdplb NAT generic")]   # the last: IPv6's cost next to IPv4's
    for x, other in pairs:
        out[f"{x} vs {other}"] = {name: stats.ratio(_median(by.get(x), key), _median(by.get(other), key))
                                  for key, name in KEYS}
        if x.startswith("xdplb NAT6") and other == "xdplb NAT generic":
            out[f"{x} vs {other}"]["store"] = None   # pynetdicom to an SCP against storescu to Orthanc
    return out


def render(result: dict) -> str:
    rows = []
    for r in result["rows"]:
        if r.get("error"):
            rows.append([r["mode"], "-", "-", "-", "failed: " + " ".join(r["error"].split())[:100]])
            continue
        errors = sum(w["socket_errors"] for w in r.get("wrk_runs", []))
        notes = [f"XDP {r['xdp_mode']}"] if r.get("xdp_mode") else []
        if errors:
            notes.append(f"wrk socket errors {errors}")
        rows.append([r["mode"], fmt(_median(r, "stream_gbits"), 2), fmt(_median(r, "conn_per_s"), 0),
                     fmt(_median(r, "store_mb_per_s"), 1), "; ".join(notes)])
    text = [markdown(["path", "stream Gbit/s", "conn/s", "C-STORE MB/s", "notes"], rows, "lrrrl"),
            f"\nC-STORE: one instance of {result['store_bytes'] / 2**20:.0f} MiB per run, VIP:104 to Orthanc's 4242 "
            "(IPv6 rows: pynetdicom's SCU to a pynetdicom SCP on 4242; Orthanc has no IPv6)."]
    pairs = [[k, fmt_ratio(v["stream"]), fmt_ratio(v["conn"]), fmt_ratio(v["store"])]
             for k, v in result["comparisons"].items()]
    text.append("")
    text.append(markdown(["ratio", "stream", "conn/s", "C-STORE"], pairs, "lrrr"))
    return "\n".join(text)


def draw(result: dict, context: str, out: Path) -> list[Path]:
    return draw_medians(result["rows"], (
        ("stream_gbits", "Gbit/s", "nat_stream.png", "NAT lab: one TCP stream (iperf3)"),
        ("conn_per_s", "connections/s", "nat_connections.png", "NAT lab: new connections per second (wrk)"),
        ("store_mb_per_s", "MB/s", "nat_store.png", "NAT lab: one large C-STORE to VIP:104"),
    ), context, out, MODES[0])
