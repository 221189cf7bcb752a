"""Lab suite: the same client and backends through five paths, side by side.

The namespace lab (tools/lab.py: a client, the lb and 3 backends on one
bridge, every link a veth); only the balancer changes between rows. Native
XDP on veth needs a pass-through XDP program on the lb's switch port
(native_peer), which also turns on NAPI and GRO there, so the native row runs
in a second lab built the same way plus that program, and no other row gets it:

  direct          client -> backend 1's own address (no balancer: the ceiling; one backend, where
                  the balanced rows spread the HTTP connections over three)
  xdplb generic   client -> VIP -> `xdplb attach --mode generic` on the lb -> backend, which answers directly (DSR)
  xdplb native    the same with --mode native (veth's driver-mode XDP)
  nftables DNAT   client -> VIP -> DNAT in the lb's prerouting hook -> backend -> back through the lb
  HAProxy TCP     client -> VIP -> HAProxy (TCP mode) on the lb -> backend -> HAProxy -> client

Figures, each the median of `runs` runs:
  stream Gbit/s   one TCP stream, iperf3 (receiver's goodput, first second omitted when runs are ≥ 3 s),
                  with TX offload off on the client and backends as the lab sets it: every frame is
                  wire-sized (1500 bytes), as a real NIC would hand them to XDP
  stream TSO      the same with TX offload (and so TSO) back on, veth's default: the client's
                  64 KB TCP segments cross the bridge and the balancer whole, so each hop, XDP
                  included, runs once per 64 KB. Not for the native row: native XDP on veth leaves
                  such a frame's TCP checksum unfinished (the reason the lab turns TX offload off)
  conn/s          completed HTTP requests per second, each on a new TCP connection: wrk, 1 thread,
                  32 connections, `Connection: close`, against a small HTTP responder (HAProxy
                  answering by itself) on every backend
  CPU s/GB        machine-wide busy CPU time (all CPUs, /proc/stat: user, system, irq, softirq,
                  steal) while one iperf3 stream runs at a fixed rate, less the machine's
                  background (the mean of idle windows as long as the transfer, just before and
                  just after it), per 10**9 bytes delivered. The rate is the same for every row
                  (30 % of the direct stream's throughput, at most 2 Gbit/s) and is set with
                  --fq-rate, so the kernel paces the socket (iperf3's own -b pacing spins a CPU
                  and swamps the figure). veth and XDP work runs in whichever task or softirq
                  sends the packet, so nothing can be charged to the lb namespace alone: the
                  figure covers client, lb and backends together, and "extra" subtracts the
                  direct path's. A row that cannot sustain the rate is marked, and so is one
                  whose two idle windows differ by more than half its figure (other load).
Every process shares the machine's CPUs (2 on the reference machine): a faster balancer
leaves more CPU to the client and backends, which is part of what these figures show.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from xdplb.addrtext import host_port

from . import lab_baselines as cfg
from . import parse, stats
from .tables import fmt, fmt_ratio, markdown, targets_table

MODES = ("direct", "xdplb generic", "xdplb native", "nftables DNAT", "HAProxy TCP")
NFT_TABLE = "xdplb_bench"
WRK_CONNECTIONS = 32
CPU_RATE_SHARE = 0.30
CPU_RATE_CAP = 2e9
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    pass


@dataclass
class Options:
    runs: int
    seconds: float
    quick: bool
    out: Path
    progress: object = print


def _proc_stat() -> parse.CpuTicks:
    return parse.proc_stat(Path("/proc/stat").read_text())


class LabBench:
    """Servers, clients and the five paths in one lab."""

    def __init__(self, lab, work: Path, opts: Options):
        self.lab, self.work, self.opts, self.say = lab, work, opts, opts.progress
        self.procs: list[subprocess.Popen] = []
        self.backends = {name: lab.backend_ip(name) for name in lab.backend_names()}

    # ---- servers ---------------------------------------------------------

    def _spawn(self, host: str, *cmd, log: str) -> subprocess.Popen:
        out = open(self.work / log, "ab")
        proc = self.lab.popen(host, *cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        out.close()
        self.procs.append(proc)
        return proc

    def start_servers(self) -> None:
        ipv6 = getattr(self.lab, "dual_stack", False)   # iperf3 without -4 listens on both families
        for name in self.backends:
            self._spawn(name, "iperf3", "-s", *(() if ipv6 else ("-4",)), "-p", cfg.IPERF_PORT,
                        log=f"iperf3-{name}.log")
            conf = self.work / f"responder-{name}.cfg"
            conf.write_text(cfg.responder_cfg(name, ipv6))
            self._spawn(name, "haproxy", "-db", "-f", conf, log=f"responder-{name}.log")
        for address in self.backends.values():
            for port in (cfg.IPERF_PORT, cfg.HTTP_PORT):
                self.wait_port(address, port)
        for host in ("client", "lb"):
            self.lab.run(host, "sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=1024 65535")
            self.lab.run(host, "sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1")

    def wait_port(self, address: str, port: int, timeout: float = 15.0) -> None:
        probe = ("import socket,sys,time\nend=time.monotonic()+float(sys.argv[3])\n"
                 "while True:\n  try:\n    socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=1).close(); break\n"
                 "  except OSError as e:\n    if time.monotonic()>end: sys.exit(f'{sys.argv[1]}:{sys.argv[2]} not accepting: {e}')\n"
                 "    time.sleep(0.05)\n")
        done = self.lab.run("client", "/usr/bin/python3", "-c", probe, address, port, timeout, check=False,
                            timeout=timeout + 10)
        if done.returncode != 0:
            raise BenchError(done.stderr.strip())

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)
        self.procs.clear()

    # ---- clients -----------------------------------------------------------

    def iperf(self, target: str, rate: float | None = None) -> parse.IperfResult:
        seconds = self.opts.seconds
        cmd = ["iperf3", "-c", target, "-p", cfg.IPERF_PORT, "-t", f"{seconds:g}", "-J"]
        if seconds >= 3:
            cmd += ["-O", "1"]
        if rate:
            cmd += ["--fq-rate", f"{int(rate)}"]
        done = self.lab.run("client", *cmd, check=False, timeout=seconds + 40)
        return parse.iperf3(done.stdout or done.stderr)

    @contextlib.contextmanager
    def tx_offload(self):
        """TX offload (checksum, TSO) on for the client and backends, off again afterwards."""
        senders = ["client", *self.backends]
        try:
            for host in senders:
                self.lab.run(host, "ethtool", "-K", "eth0", "tx", "on")
            yield
        finally:
            for host in senders:
                self.lab.run(host, "ethtool", "-K", "eth0", "tx", "off", check=False)

    def wrk(self, target: str) -> parse.WrkResult:
        seconds = max(1, round(self.opts.seconds))
        done = self.lab.run("client", "wrk", "-t1", f"-c{WRK_CONNECTIONS}", f"-d{seconds}s", "--timeout", "2s",
                            "-H", "Connection: close", f"http://{host_port(target, cfg.HTTP_PORT)}/", check=False,
                            timeout=seconds + 40)
        if done.returncode != 0:
            raise BenchError(f"wrk against {target} failed: {(done.stderr or done.stdout).strip()[-300:]}")
        return parse.wrk(done.stdout)

    def _busy_window(self, seconds: float) -> float:
        """Busy CPUs (0 .. number of CPUs) of the whole machine over an idle window."""
        start, t0 = _proc_stat(), time.monotonic()
        time.sleep(seconds)
        end, t1 = _proc_stat(), time.monotonic()
        return (end.busy - start.busy) / CLK_TCK / (t1 - t0)

    def cpu_per_gb(self, target: str, rate: float) -> dict:
        """Busy CPU seconds per GB at a fixed rate, background-subtracted (see the module docstring).

        The background is the mean of an idle window before and one after the
        transfer; their difference, over the transfer's length, is the figure's
        noise estimate. A row is marked noisy when that exceeds half of it.
        """
        before = self._busy_window(self.opts.seconds)
        run_start, t0 = _proc_stat(), time.monotonic()
        result = self.iperf(target, rate)
        run_end, t1 = _proc_stat(), time.monotonic()
        after = self._busy_window(self.opts.seconds)
        wall = t1 - t0
        busy = (run_end.busy - run_start.busy) / CLK_TCK
        net = busy - (before + after) / 2 * wall
        noise = abs(before - after) / 2 * wall
        return {"cpu_s_per_gb": stats.per_gb(net, result.bytes), "net_cpu_s": round(net, 3),
                "noise_cpu_s": round(noise, 3), "noisy": noise > abs(net) / 2,
                "busy_cpu_s": round(busy, 3), "background_cpus": [round(before, 3), round(after, 3)],
                "wall_s": round(wall, 3), "bytes": result.bytes, "gbits": round(result.gbits, 3),
                "rate_reached": result.gbits * 1e9 >= 0.95 * rate}

    def responders_seen(self, target: str, backends_wanted: int, tries: int = 9,
                        max_tries: int = 30) -> dict[str, int]:
        """{responder: count} over ``tries`` new HTTP connections, going on
        (up to ``max_tries``) until ``backends_wanted`` backends answered.
        Nine flows all land on one of three backends 3 times in 3**9 by the
        hash alone; CI met that once, so a balancer gets more chances before
        a test may call it unbalanced."""
        seen: dict[str, int] = {}
        for attempt in range(max_tries):
            if attempt >= tries and len([n for n in seen if n in self.backends]) >= backends_wanted:
                break
            done = self.lab.run("client", "curl", "-s", "-g", "-m", "3", f"http://{host_port(target, cfg.HTTP_PORT)}/",
                                check=False)
            name = done.stdout.strip() if done.returncode == 0 else f"error {done.returncode}"
            seen[name] = seen.get(name, 0) + 1
        return seen

    # ---- the five paths ---------------------------------------------------------

    @contextlib.contextmanager
    def path(self, mode: str):
        """Set up one path; yield (target address, facts); undo it afterwards."""
        if mode == "direct":
            yield self.lab.backend_ip(1), {}
        elif mode.startswith("xdplb"):
            with self._xdplb(mode.split()[1]) as facts:
                yield self.lab.vip, facts
        elif mode.startswith("nftables"):
            with self._nftables() as facts:
                yield self.lab.vip, facts
        elif mode.startswith("HAProxy"):
            with self._haproxy() as facts:
                yield self.lab.vip, facts
        else:
            raise ValueError(f"unknown path {mode!r}")

    @contextlib.contextmanager
    def _xdplb(self, xdp_mode: str):
        from lab_xdplb import Balancer

        pool = self.work / "xdplb-pool.toml"
        pool.write_text(cfg.xdplb_pool(self.lab.vip, self.backends))
        log = self.work / f"xdplb-{xdp_mode}.log"
        log.unlink(missing_ok=True)  # Balancer appends
        balancer = Balancer(self.lab, pool, self.work / f"run-{xdp_mode}", log, mode=xdp_mode).start()
        facts: dict = {}
        try:
            st = balancer.wait_ready(timeout=180)
            balancer.wait_for(lambda s: all(b["health"] == "up" for svc in s["services"] for b in svc["backends"]),
                              30, "every backend up")
            facts["xdp_mode"] = st["mode"]
            yield facts
            st = balancer.status()
            facts["forwarded"] = {svc["name"]: {"packets": svc["packets"],
                                                "new_flows_per_backend": {b["name"]: b["new_flows"] for b in svc["backends"]}}
                                  for svc in st["services"]}
            facts["actions"] = st["actions"]
        finally:
            balancer.stop()
            balancer.release()  # unmounts the bpffs Balancer mounted for its pins
            facts["log_tail"] = balancer.log().splitlines()[-5:]

    @contextlib.contextmanager
    def _vip_on_lb(self):
        self.lab.run("lb", "ip", "addr", "add", f"{self.lab.vip}/32", "dev", "eth0")
        try:
            yield
        finally:
            self.lab.run("lb", "ip", "addr", "del", f"{self.lab.vip}/32", "dev", "eth0", check=False)

    @contextlib.contextmanager
    def _nftables(self):
        client, lb = self.lab.host_ip("client"), self.lab.host_ip("lb")
        sysctls = {"net.ipv4.ip_forward": 1, "net.ipv4.conf.all.send_redirects": 0,
                   "net.ipv4.conf.eth0.send_redirects": 0}
        with self._vip_on_lb():
            for key, value in sysctls.items():
                self.lab.run("lb", "sysctl", "-q", "-w", f"{key}={value}")
            self.lab.run("lb", "nft", "-f", "-", input=cfg.nft_ruleset(NFT_TABLE, self.lab.vip, list(self.backends.values())))
            for name in self.backends:  # replies must pass the lb so conntrack can undo the DNAT
                self.lab.run(name, "ip", "route", "replace", f"{client}/32", "via", lb, "dev", "eth0")
            facts: dict = {}
            try:
                yield facts
                dump = self.lab.run("lb", "nft", "-j", "list", "table", "ip", NFT_TABLE).stdout
                facts["dnat_rule_packets"] = dict(zip(("stream", "http"), parse.nft_counter_packets(dump)))
            finally:
                for name in self.backends:
                    self.lab.run(name, "ip", "route", "del", f"{client}/32", check=False)
                self.lab.run("lb", "nft", "delete", "table", "ip", NFT_TABLE, check=False)
                self.lab.run("lb", "sysctl", "-q", "-w", "net.ipv4.ip_forward=0", check=False)

    @contextlib.contextmanager
    def _haproxy(self):
        conf = self.work / "haproxy-lb.cfg"
        conf.write_text(cfg.haproxy_lb_cfg(self.lab.vip, self.backends))
        with self._vip_on_lb():
            proc = self._spawn("lb", "haproxy", "-db", "-f", conf, log="haproxy-lb.log")
            try:
                for port in (cfg.IPERF_PORT, cfg.HTTP_PORT):
                    self.wait_port(self.lab.vip, port)
                yield {"threads": "HAProxy default (one per CPU)"}
            finally:
                self.stop(proc)
                self.procs.remove(proc)


def _summary(values: list) -> dict | None:
    values = [v for v in values if v is not None]
    return stats.summarize(values).as_dict() if values else None


def _stream_runs(streams: list) -> list[dict]:
    """The JSON record of each iperf3 run."""
    return [{"gbits": round(s.gbits, 3), "bytes": s.bytes, "retransmits": s.retransmits} for s in streams]


def check_path_used(mode: str, facts: dict) -> None:
    """The balancer's own counters must show the traffic went through it."""
    if mode.startswith("xdplb"):
        counts = {name: svc["packets"] for name, svc in facts.get("forwarded", {}).items()}
        if not counts or min(counts.values()) == 0:
            raise BenchError(f"{mode}: xdplb's counters show no forwarded packets for some service: {counts}")
    elif mode.startswith("nftables"):
        counts = facts.get("dnat_rule_packets", {})
        if not counts or min(counts.values()) == 0:
            raise BenchError(f"{mode}: the DNAT rules' counters stayed at zero: {counts}")


def traffic_figures(streams: list, wrks: list) -> dict:
    """A row's stream and connection-rate figures (medians) with every run."""
    return {"stream_gbits": _summary([s.gbits for s in streams]), "stream_runs": _stream_runs(streams),
            "conn_per_s": _summary([w.requests_per_s for w in wrks]),
            "wrk_runs": [{"requests_per_s": w.requests_per_s, "requests": w.requests,
                          "socket_errors": w.socket_errors, "non_2xx": w.non_2xx} for w in wrks]}


def measure_path(bench: LabBench, mode: str, rate: float | None) -> dict:
    say, runs = bench.say, bench.opts.runs
    row: dict = {"mode": mode, "error": None}
    try:
        with bench.path(mode) as (target, facts):
            row["target"] = target
            row["responders_seen"] = bench.responders_seen(target, 1 if mode == "direct" else 2)
            if not any(name in bench.backends for name in row["responders_seen"]):
                raise BenchError(f"{mode}: no backend answered through {target}: {row['responders_seen']}")
            streams, tso_streams, wrks, cpus = [], [], [], []
            tso = mode != "xdplb native"
            for i in range(runs):
                say(f"lab: {mode}: run {i + 1}/{runs}: iperf3" + (", iperf3 with TSO" if tso else "") + ", wrk"
                    + (", CPU at a fixed rate" if rate else ""))
                streams.append(bench.iperf(target))
                if tso:
                    with bench.tx_offload():
                        tso_streams.append(bench.iperf(target))
                wrks.append(bench.wrk(target))
                if rate:
                    cpus.append(bench.cpu_per_gb(target, rate))
            row["facts"] = facts
        check_path_used(mode, row["facts"])
    except Exception as exc:  # one path failing (say, native XDP refused) must not hide the others
        row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        say(f"lab: {mode}: FAILED: {row['error'][:300]}")
        return row
    row.update(traffic_figures(streams, wrks))
    row["stream_tso_gbits"] = _summary([s.gbits for s in tso_streams])
    row["stream_tso_runs"] = _stream_runs(tso_streams)
    row["cpu_s_per_gb"] = _summary([c["cpu_s_per_gb"] for c in cpus])
    row["cpu_runs"] = cpus
    row["xdp_mode"] = row.get("facts", {}).get("xdp_mode")
    return row


def run(opts: Options) -> dict:
    import lab as labtool

    say = opts.progress
    work = opts.out / "lab-work"
    work.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    rate = None
    # Native XDP on veth needs the pass-through program on the lb's switch
    # port, which also gives that port NAPI and GRO; only the native row gets
    # it, in a second lab built the same way, so no other row gains from it.
    for native_peer, modes in ((False, [m for m in MODES if m != "xdplb native"]), (True, ["xdplb native"])):
        lab = labtool.Lab(prefix=labtool.unused_prefix("xb"), backends=3, native_peer=native_peer)
        say(f"lab: building lab {lab.prefix} (3 backends{', pass-through XDP on the lb port' if native_peer else ''})")
        lab.up()
        bench = LabBench(lab, work, opts)
        try:
            bench.start_servers()
            for mode in modes:
                say(f"lab: {mode}")
                row = measure_path(bench, mode, rate)
                row["native_peer"] = native_peer
                rows[mode] = row
                if mode == "direct":
                    if row["error"]:
                        raise BenchError(f"the direct path does not work, nothing to compare with: {row['error']}")
                    rate = min(CPU_RATE_CAP, CPU_RATE_SHARE * row["stream_gbits"]["median"] * 1e9)
                    say(f"lab: fixed rate for the CPU figure: {rate / 1e9:.2f} Gbit/s")
                    rows[mode] = measure_cpu_only(bench, row, rate)
        finally:
            bench.stop_all()
            lab.down()
    ordered = [rows[m] for m in MODES if m in rows]
    return {"rows": ordered, "cpu_rate_gbits": round(rate / 1e9, 3) if rate else None,
            "comparisons": comparisons(ordered), "targets": targets(ordered), "method": __doc__.strip()}


def measure_cpu_only(bench: LabBench, row: dict, rate: float) -> dict:
    """The direct path's CPU figure, once its throughput has set the fixed rate."""
    cpus = []
    with bench.path("direct") as (target, _):
        for i in range(bench.opts.runs):
            bench.say(f"lab: direct: CPU at a fixed rate, run {i + 1}/{bench.opts.runs}")
            cpus.append(bench.cpu_per_gb(target, rate))
    row["cpu_s_per_gb"] = _summary([c["cpu_s_per_gb"] for c in cpus])
    row["cpu_runs"] = cpus
    return row


# ---- comparisons and report ------------------------------------------------------

def _median(row: dict | None, key: str) -> float | None:
    return row[key]["median"] if row and not row.get("error") and row.get(key) else None


def comparisons(rows: list[dict]) -> dict:
    by = {r["mode"]: r for r in rows}
    direct = by.get("direct")
    out = {}
    for r in rows:
        out[r["mode"]] = {
            "stream_vs_direct": stats.ratio(_median(r, "stream_gbits"), _median(direct, "stream_gbits")),
            "stream_tso_vs_direct": stats.ratio(_median(r, "stream_tso_gbits"), _median(direct, "stream_tso_gbits")),
            "conn_vs_direct": stats.ratio(_median(r, "conn_per_s"), _median(direct, "conn_per_s")),
            "cpu_extra_over_direct": (None if _median(r, "cpu_s_per_gb") is None or _median(direct, "cpu_s_per_gb") is None
                                      else _median(r, "cpu_s_per_gb") - _median(direct, "cpu_s_per_gb")),
        }
    for x in ("xdplb generic", "xdplb native"):
        for other in ("nftables DNAT", "HAProxy TCP"):
            out[f"{x} vs {other}"] = {
                "stream": stats.ratio(_median(by.get(x), "stream_gbits"), _median(by.get(other), "stream_gbits")),
                "conn": stats.ratio(_median(by.get(x), "conn_per_s"), _median(by.get(other), "conn_per_s")),
                "cpu_per_gb": stats.ratio(_median(by.get(x), "cpu_s_per_gb"), _median(by.get(other), "cpu_s_per_gb")),
            }
    return out


def targets(rows: list[dict]) -> list[dict]:
    """The issue's lab targets with what was measured (informational, never a failure)."""
    by = {r["mode"]: r for r in rows}
    comp = comparisons(rows)
    out = []
    for x in ("xdplb generic", "xdplb native"):
        if x not in by:
            continue
        ratio = comp[x]["stream_vs_direct"]
        out.append({"target": f"{x} stream ≥ 95% of direct", "measured": ratio,
                    "met": ratio is not None and ratio >= 0.95})
        tso_ratio = comp[x]["stream_tso_vs_direct"]
        if tso_ratio is not None:
            out.append({"target": f"{x} stream ≥ 95% of direct, TSO on", "measured": tso_ratio,
                        "met": tso_ratio >= 0.95})
        for other in ("nftables DNAT", "HAProxy TCP"):
            c = comp[f"{x} vs {other}"]
            out.append({"target": f"{x} conn/s above {other}", "measured": c["conn"],
                        "met": c["conn"] is not None and c["conn"] > 1.0})
            out.append({"target": f"{x} CPU/GB below {other}", "measured": c["cpu_per_gb"],
                        "met": c["cpu_per_gb"] is not None and c["cpu_per_gb"] < 1.0})
    return out


def row_notes(row: dict) -> list[str]:
    notes = []
    errors = sum(w["socket_errors"] for w in row.get("wrk_runs", []))
    if errors:
        notes.append(f"wrk socket errors {errors}")
    cpus = row.get("cpu_runs", [])
    noisy = sum(1 for c in cpus if c["noisy"])
    if noisy:
        notes.append(f"CPU noisy in {noisy}/{len(cpus)} runs")
    short = sum(1 for c in cpus if not c["rate_reached"])
    if short:
        notes.append(f"fixed rate not reached in {short}/{len(cpus)} runs")
    if row.get("xdp_mode"):
        notes.append(f"XDP {row['xdp_mode']}")
    return notes


def render(result: dict) -> str:
    comp = result["comparisons"]
    rows = []
    for r in result["rows"]:
        if r.get("error"):
            rows.append([r["mode"], "-", "-", "-", "-", "-", "-", "-", "-", "failed: " + r["error"][:80]])
            continue
        c = comp[r["mode"]]
        extra = c["cpu_extra_over_direct"]
        rows.append([r["mode"], fmt(_median(r, "stream_gbits"), 2), fmt_ratio(c["stream_vs_direct"]),
                     fmt(_median(r, "stream_tso_gbits"), 2), fmt_ratio(c["stream_tso_vs_direct"]),
                     fmt(_median(r, "conn_per_s"), 0), fmt_ratio(c["conn_vs_direct"]),
                     fmt(_median(r, "cpu_s_per_gb"), 2), "-" if extra is None else f"{extra:+.2f}",
                     "; ".join(row_notes(r))])
    text = [markdown(["path", "stream Gbit/s", "× direct", "stream TSO", "× direct", "conn/s", "× direct",
                      "CPU s/GB", "extra vs direct", "notes"], rows, "lrrrrrrrrl")]
    if result.get("cpu_rate_gbits"):
        text.append(f"\nCPU s/GB: machine-wide busy CPU per GB at a fixed {result['cpu_rate_gbits']:.2f} Gbit/s, "
                    "background-subtracted (see the method in the JSON).")
    pairs = [[k, fmt_ratio(v["conn"]), fmt_ratio(v["cpu_per_gb"]), fmt_ratio(v["stream"])]
             for k, v in comp.items() if " vs " in k]
    if pairs:
        text.append("")
        text.append(markdown(["balancer vs balancer", "conn/s ratio", "CPU/GB ratio (lower is better)",
                              "stream ratio"], pairs, "lrrr"))
    if result["targets"]:
        text.append("")
        text.append(targets_table(result["targets"]))
    return "\n".join(text)


def draw(result: dict, context: str, out: Path) -> list[Path]:
    return draw_medians(result["rows"], (
        ("stream_gbits", "Gbit/s", "lab_stream.png", "One TCP stream (iperf3)"),
        ("conn_per_s", "connections/s", "lab_connections.png", "New connections per second (wrk, Connection: close)"),
        ("cpu_s_per_gb", "CPU s/GB", "lab_cpu_per_gb.png",
         f"Machine CPU seconds per GB at {result.get('cpu_rate_gbits') or 0:.2f} Gbit/s (lower is better)"),
    ), context, out, "direct")


def draw_medians(rows: list[dict], charts_wanted, context: str, out: Path, reference: str) -> list[Path]:
    """One bar chart of the rows' medians per (key, unit, file name, title); the
    ``reference`` row is marked, failed rows are labelled."""
    from . import charts

    labels = [r["mode"] for r in rows]
    paths = []
    for key, unit, name, title in charts_wanted:
        values = [_median(r, key) for r in rows]
        spans = [(r[key]["low"], r[key]["high"]) if not r.get("error") and r.get(key) else None for r in rows]
        notes = ["failed" if r.get("error") else "" for r in rows]
        paths.append(charts.hbars(out / name, title, context, labels, values, unit, spans, notes,
                                  [r["mode"] == reference for r in rows]))
    return paths
