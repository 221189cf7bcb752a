"""Data-plane cost per packet: the real XDP program under BPF_PROG_TEST_RUN.

The kernel runs a loaded program `repeat` times on one test packet and
reports the mean time per run (xdplb/bpfsys.py's prog_test_run). Every case
is run `runs` times, round by round next to the floor program
(bpf/bench_floor.c: parse Ethernet/IPv4, swap MACs, XDP_TX), on one pinned
CPU; the table gives the median and each case's ratio to the floor measured
in the same group. The xdplb program is the one `xdplb attach` loads
(xdplb.dataplane.BccDataplane), its maps programmed by the real planner
(xdplb.plan). After every run the program's own counters must show that
every repetition took the path the case names (flow hit, new flow, pass);
otherwise the bench stops.

New flows. With repeat > 1 the same SYN hits the flow entry its first run
inserted, so the unmodified program cannot be timed on a miss that way. Two
builds of the same source bracket the cost instead: "insert + delete"
inserts the entry and deletes it again (an upper bound: it adds a delete),
"no insert" skips the insert (a lower bound). Only these rows use a changed
program; the change is made to the assembled text here, bpf/ is untouched.
IPv6 runs in the same paths group: a service on an IPv6 VIP beside the IPv4
one, its pass, new-flow (both builds bracket the IPv6 insert too) and
established cases, and the floor on an IPv6 frame (bench_floor.c swaps the
MACs of a valid IPv6 header as it does for IPv4). IPv6 frames are run
through the IPv4 program, which hands them to the IPv6 program by a tail
call, as on the wire. Whether IPv6 costs IPv4 anything: the same three
IPv4 builds (unmodified, insert + delete, no insert) are also compiled with
the IPv6 program left out (XDPLB_IPV6_PATH=0, bpf/xdplb.c), and their IPv4
pass, established and new-flow cases run in the same interleaved rounds.
The unmodified program is also timed one run per call (repeat 1) on
thousands of distinct SYNs, then on their ACKs: real misses, real inserts,
real hits. Those figures include cache misses and the kernel timer's
overhead of a single run, so they are compared with the floor run the same
way on the same packets, never with the repeated figures.

NAT. The paths group also times a NAT service ("nat", port 106) in both
directions, next to DSR and the floor in the same interleaved runs: the
established request (flow hit, then destination address and port rewritten
and both checksums updated) and the reply (the nat_ports gate, one
nat_reverse lookup, bpf_fib_lookup, source rewritten, checksums, MACs from
the lookup). The repetitions run on the frame the previous one rewrote, so
the NAT backend is the VIP itself on the service port (an identity
translation: the same instructions as any other, the checksum arithmetic
does not depend on the values), and the client's neighbour entry holds the
gateway's MAC, so every rewritten frame is for the gateway again. Replies
run in a network namespace of their own (fibnet.FibNet) whose interface
has the gateway's MAC, with the calling thread inside it for the group.

Baseline. With a baseline revision (run.py --baseline main), that
revision's bpf/ sources are compiled too and its pass and established
cases join the paths group, interleaved run by run with this build's, so
both are measured under the same conditions; the targets then give the
established ratio of this build to the baseline.

Loaded flow tables. One program with a flow table sized for the largest
fill is filled step by step (1k, 100k, 1M entries) with
BPF_MAP_UPDATE_BATCH; the table is per-CPU LRU, so each CPU fills its own
share and no entry is evicted (200 random entries are looked up after each
step to prove it). A repeated packet keeps its hash bucket in the CPU cache
whatever the table holds, so each level is also timed one run per call
over randomly chosen filled flows.
"""
from __future__ import annotations

import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

from xdplb.pinning import cpu_list_count as cpu_count_in  # noqa: F401 (tests call it here)
from xdplb.pinning import possible_cpus

from . import fibnet, frames, stats
from .tables import fmt, fmt_ratio, markdown, targets_table

SEED = 0x5EED
GW_MAC = bytes.fromhex("02000a0a000a")
CLIENT_MAC = bytes.fromhex("02000a0a0002")
VIP = "10.10.0.100"
CLIENT = "10.10.0.2"
GATEWAY_IP = "10.10.0.10"
NAT_PORT = 106                       # the NAT service of the paths group (see the module docstring)
FILL_FIRST_SRC = "11.0.0.0"          # filled flows come from 11.0.0.0, 11.0.0.1, ...
FLOOR_SOURCE = Path(__file__).resolve().parents[2] / "bpf" / "bench_floor.c"

# The one line of bpf/xdplb.c that inserts a new flow, and what each
# new-flow build puts in its place (see the module docstring).
# The insert and its failure branch (the statement after it deletes a stale
# entry when the insert fails): each variant keeps the branch well formed.
INSERT_LINE = "if (flows.update((struct flow_key *)&pkt->flow, &fval) != 0)"
VARIANTS = {
    "insert_delete": "flows.update(&pkt->flow, &fval); flows.delete(&pkt->flow); if (0) /* bench: upper bound */",
    "no_insert": "if (0) /* bench: no insert, lower bound */",
}
# The same for the IPv6 flow table (bpf/xdplb.c, remember_flow).
INSERT_LINE6 = "if (flows6.update((struct flow_key6 *)k6, &fval) != 0)"
VARIANTS6 = {
    "insert_delete": "flows6.update((struct flow_key6 *)k6, &fval); flows6.delete((struct flow_key6 *)k6); if (0)",
    "no_insert": "if (0)",
}
VIP6 = "2001:db8::100"
NO_IPV6 = "IPv6 compiled out"        # the paths group's IPv4 cases of the build without the IPv6 program
CLIENT6 = "2001:db8:c::2"


class BenchError(RuntimeError):
    pass


@dataclass(frozen=True)
class Scale:
    """How much the suite does; `full` and `quick` below."""
    fills: tuple[int, ...]
    services: tuple[int, ...]
    backends: tuple[int, ...]
    single_shot_calls: int


FULL = Scale(fills=(1_000, 100_000, 1_000_000), services=(1, 64, 512), backends=(10, 100, 1000),
             single_shot_calls=20_000)
QUICK = Scale(fills=(1_000, 10_000), services=(1, 64), backends=(10, 40), single_shot_calls=2_000)


# ---- pure helpers (unit-tested) ---------------------------------------------

def variant_source(text: str, variant: str) -> str:
    """The program text with its flow insert replaced for a new-flow build."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown new-flow variant {variant!r}; use one of {', '.join(VARIANTS)}")
    for line, name in ((INSERT_LINE, "INSERT_LINE"), (INSERT_LINE6, "INSERT_LINE6")):
        found = text.count(line)
        if found != 1:
            raise BenchError(f"bpf/xdplb.c has {found} copies of `{line}` where the bench expects 1; "
                             f"update {name} in tools/bench/suite_dataplane.py")
    return text.replace(INSERT_LINE, VARIANTS[variant]).replace(INSERT_LINE6, VARIANTS6[variant])


def flow_table_size(max_fill: int, possible_cpus: int, fill_cpus: int, headroom: int = 4096) -> int:
    """Entries for a flow table that holds `max_fill` flows without evicting.

    Sized for the stricter LRU kind, per-CPU lists (BPF_F_NO_COMMON_LRU, as
    maps pinned by earlier builds still have): the kernel splits the entries
    evenly over every possible CPU and an insert takes a free entry from the
    inserting CPU's share, so the fill is spread over `fill_cpus` CPUs and
    each share gets `headroom` spare entries (for the flows the measured
    packets insert). The shared LRU bpf/lb_maps.h declares now needs less:
    `max_fill` plus 128 cached entries per CPU (xdplb.pinning.flow_capacity).
    """
    if fill_cpus < 1 or possible_cpus < fill_cpus:
        raise ValueError(f"cannot fill from {fill_cpus} of {possible_cpus} CPUs")
    return (-(-max_fill // fill_cpus) + headroom) * possible_cpus


def split_evenly(count: int, parts: int) -> list[int]:
    """`count` split into `parts` sizes differing by at most one."""
    return [count // parts + (1 if i < count % parts else 0) for i in range(parts)]


def scale_groups(services: tuple[int, ...], backends: tuple[int, ...]) -> dict[int, list[int]]:
    """Service counts grouped by the MAX_SERVICES they compile with (at least the default 64)."""
    groups: dict[int, list[int]] = {}
    for count in services:
        groups.setdefault(max(64, count), []).append(count)
    return groups


# ---- loading ----------------------------------------------------------------

class _Dataplane:
    """xdplb.dataplane.BccDataplane with its bcc Table objects cached.

    bcc rebuilds a Table (parsing its type description) on every get_table
    call; the suite writes up to a million map entries while setting up, so
    it keeps one per map. Only set-up goes faster: the program and the
    writes are the controller's own.
    """

    @staticmethod
    def load(settings, variant: str | None = None, bpf_dir: Path | None = None, defines: dict | None = None):
        from xdplb import bpf_source
        from xdplb.dataplane import BccDataplane

        class Cached(BccDataplane):
            def map(self, name):
                cache = self.__dict__.setdefault("_bench_tables", {})
                if name not in cache:
                    cache[name] = BccDataplane.map(self, name)
                return cache[name]

        with _source_variant(bpf_source, variant):
            return Cached(settings, bpf_dir=bpf_dir, extra_defines=defines)


@contextmanager
def _source_variant(bpf_source, variant: str | None):
    # BccDataplane compiles whatever xdplb.bpf_source.assemble() returns;
    # wrapping it for the duration of one load is the only way to compile a
    # variant without copying BccDataplane or touching bpf/.
    if variant is None:
        yield
        return
    original = bpf_source.assemble
    bpf_source.assemble = lambda *a, **k: variant_source(original(*a, **k), variant)
    try:
        yield
    finally:
        bpf_source.assemble = original


def load_floor():
    from bcc import BPF

    bpf = BPF(src_file=str(FLOOR_SOURCE).encode())
    return bpf, bpf.load_func(b"bench_floor", BPF.XDP).fd


class Programs:
    """Loaded programs, each compiled once per (sizes, variant), and what their maps hold.

    Programs with the same sizes serve several groups; programming goes
    through xdplb.plan from the state the maps hold now, and the same writes
    go to every program of a group (they must hold the same state).
    """

    def __init__(self, say):
        from xdplb import plan

        self.plan = plan
        self.say = say
        self.loaded: dict[tuple, object] = {}
        self.holds: dict[int, object] = {}      # id(dataplane) -> plan.Applied
        self.compile_seconds: dict[str, float] = {}

    def get(self, settings, variant: str | None = None, baseline: "Baseline | None" = None, ipv6: bool = True):
        """ipv6=False: the build without the IPv6 program (XDPLB_IPV6_PATH=0)."""
        key = (settings, variant, baseline.rev if baseline else None, ipv6)
        if key not in self.loaded:
            label = (f"xdplb{'' if variant is None else ', new-flow build ' + variant}"
                     f"{'' if ipv6 else ', IPv6 compiled out'}"
                     f"{'' if baseline is None else ', baseline ' + baseline.rev} (flow table "
                     f"{settings.flow_table_size:,}, max_services {settings.max_services}, "
                     f"max_backends {settings.max_backends})")
            self.say(f"dataplane: compiling {label}")
            started = time.monotonic()
            dp = _Dataplane.load(settings, variant, baseline.bpf_dir if baseline else None,
                                 None if ipv6 else {"XDPLB_IPV6_PATH": 0})
            self.compile_seconds[label] = round(time.monotonic() - started, 2)
            self.loaded[key] = dp
            self.holds[id(dp)] = self.plan.Applied()
        return self.loaded[key]

    def program(self, dps: list, services) -> object:
        """Write `services` into every dataplane of `dps`; return the plan's applied state."""
        held = self.holds[id(dps[0])]
        if any(self.holds[id(dp)] != held for dp in dps[1:]):
            raise BenchError("programs holding different map contents cannot be programmed together")
        st = dps[0].settings
        desired = self.plan.Desired(tuple(services), GW_MAC, SEED, st.maglev_size, st.max_services, st.max_backends)
        result = self.plan.plan(held, desired)
        if not result.ops:
            return held
        for dp in dps:
            dp.apply(result.ops)
            self.holds[id(dp)] = result.applied
        return result.applied

    def drop_others(self, keep: list) -> None:
        """Unload every program not in `keep` (the big ones hold hundreds of MB)."""
        for key, dp in list(self.loaded.items()):
            if all(dp is not k for k in keep):
                del self.loaded[key]
                del self.holds[id(dp)]


def live_backend_id(applied, service: str) -> int:
    return next(b.id for (name, _), b in applied.backends.items() if name == service and b.up)


def backends(count: int):
    from xdplb.plan import BackendState

    # Every backend has the gateway's MAC: BPF_PROG_TEST_RUN with a repeat
    # count runs the program again on the frame it rewrote, and the program
    # balances only frames sent to the gateway's MAC, so a backend MAC of
    # its own would make every repetition after the first a pass.
    return tuple(
        BackendState(f"be{i}", IPv4Address(f"10.20.{i // 250}.{i % 250 + 1}"), 1 + i % 3, GW_MAC, True)
        for i in range(count)
    )


def service(name: str, port: int, count: int):
    from xdplb.plan import ServiceState

    return ServiceState(name, IPv4Address(VIP), port, "tcp", "flow", backends(count))


def nat_service(name: str, port: int):
    """A NAT service whose one backend is the VIP itself on the service port (see the module docstring)."""
    from xdplb.plan import BackendState, ServiceState

    backend = BackendState("nat-identity", IPv4Address(VIP), 1, GW_MAC, True, port)
    return ServiceState(name, IPv4Address(VIP), port, "tcp", "flow", (backend,), "nat")


def nat_reply(port: int, src_mac: bytes = CLIENT_MAC) -> bytes:
    """A NAT backend's reply (VIP:port is the identity backend) to the client, sent to the gateway."""
    return frames.tcp_frame(src_mac, GW_MAC, VIP, CLIENT, port, 40000, frames.TCP_ACK, b"DICOM P-DATA", 1, 1001)


@contextmanager
def reply_network(say):
    """FibNet for NAT replies: interface b0 with the gateway's MAC and address,
    the client's neighbour entry holding the gateway's MAC. Yields b0's ifindex."""
    net = fibnet.FibNet(f"xdplbbench{os.getpid() % 100000}")
    try:
        mac = ":".join(f"{b:02x}" for b in GW_MAC)
        net.ip("link", "add", "b0", "address", mac, "type", "veth", "peer", "name", "b0p")
        net.ip("addr", "add", f"{GATEWAY_IP}/24", "dev", "b0")
        net.ip("link", "set", "b0", "up")
        net.ip("link", "set", "b0p", "up")
        net.sysctl("net.ipv4.ip_forward=1")
        net.ip("neigh", "replace", CLIENT, "lladdr", mac, "dev", "b0", "nud", "permanent")
        say(f"dataplane: NAT replies run in network namespace {net.name}")
        with net.inside():
            yield net.ifindex("b0")
    finally:
        net.close()


def service6(name: str, port: int, count: int):
    """An IPv6 service with `count` backends (the gateway's MAC, as backends() says why)."""
    from xdplb.plan import BackendState, ServiceState

    return ServiceState(name, IPv6Address(VIP6), port, "tcp", "flow", tuple(
        BackendState(f"be6-{i}", IPv6Address(f"2001:db8:20::{i + 1:x}"), 1 + i % 3, GW_MAC, True)
        for i in range(count)))


def syn6(port: int, src: str = CLIENT6, sport: int = 40000) -> bytes:
    return frames.tcp_frame6(CLIENT_MAC, GW_MAC, src, VIP6, sport, port, frames.TCP_SYN)


def ack6(port: int, src: str = CLIENT6, sport: int = 40000) -> bytes:
    return frames.tcp_frame6(CLIENT_MAC, GW_MAC, src, VIP6, sport, port, frames.TCP_ACK, b"DICOM P-DATA", 1001, 1)


def syn(port: int, src: str = CLIENT, sport: int = 40000) -> bytes:
    return frames.tcp_frame(CLIENT_MAC, GW_MAC, src, VIP, sport, port, frames.TCP_SYN)


def ack(port: int, src: str = CLIENT, sport: int = 40000) -> bytes:
    return frames.tcp_frame(CLIENT_MAC, GW_MAC, src, VIP, sport, port, frames.TCP_ACK, b"DICOM P-DATA", 1001, 1)


@dataclass(frozen=True)
class Baseline:
    """Another revision's bpf/ sources, compiled next to this one for comparison."""
    rev: str
    bpf_dir: Path


def baseline_sources(rev: str, into: Path) -> Baseline:
    """bpf/ as of git revision `rev` (for example main), unpacked under `into`.

    The older program runs on maps written by this controller: map layouts
    must not have changed between the two (the same holds for a hitless
    restart onto this build).
    """
    import io
    import subprocess
    import tarfile

    repo = FLOOR_SOURCE.parents[1]
    done = subprocess.run(["git", "-C", str(repo), "archive", rev, "bpf"], capture_output=True)
    if done.returncode != 0:
        raise BenchError(f"--baseline {rev}: git cannot read bpf/ at that revision "
                         f"({done.stderr.decode(errors='replace').strip()})")
    with tarfile.open(fileobj=io.BytesIO(done.stdout)) as tar:
        tar.extractall(into)
    return Baseline(rev, into / "bpf")


# ---- measuring ----------------------------------------------------------------

@dataclass
class Case:
    group: str
    name: str
    fd: int
    frame: bytes
    action: int                       # XDP action every run must return
    dp: object = None                 # xdplb dataplane whose counters prove the path
    counter: tuple | None = None      # ("events", "flow_hit") or ("not_forwarded", "not_service")
    floor: bool = False
    ifindex: int = 0                  # ingress interface for bpf_fib_lookup (NAT replies); 0: loopback
    samples: list = field(default_factory=list)


def _counter(case: Case) -> int:
    st = case.dp.read_stats([], [])
    return getattr(st, case.counter[0])[case.counter[1]]


def run_case(case: Case, repeat: int) -> None:
    from xdplb import bpfsys, structs

    before = _counter(case) if case.counter else 0
    result = bpfsys.prog_test_run(case.fd, case.frame, repeat, ingress_ifindex=case.ifindex)
    if result.retval != case.action:
        raise BenchError(f"{case.group} / {case.name}: the program returned {structs.ACTIONS[result.retval]}, "
                         f"expected {structs.ACTIONS[case.action]}")
    if case.counter:
        grew = _counter(case) - before
        if grew != repeat:
            raise BenchError(f"{case.group} / {case.name}: counter {case.counter[1]} grew by {grew} in "
                             f"{repeat} runs: the packet did not take the path this case measures")
    case.samples.append(result.duration_ns)


def measure_group(cases: list[Case], repeat: int, runs: int) -> None:
    for case in stats.interleave(cases, runs):
        run_case(case, repeat)


def single_shot(case: Case, packets: list[bytes]) -> stats.Summary:
    """One BPF_PROG_TEST_RUN per packet (repeat 1); the median of the kernel-measured times.

    The case's counter must grow by one per packet, as in run_case.
    """
    from xdplb import bpfsys

    before = _counter(case) if case.counter else 0
    out = []
    for packet in packets:
        result = bpfsys.prog_test_run(case.fd, packet, 1)
        if result.retval != case.action:
            raise BenchError(f"{case.name}, one run per call: action {result.retval}, expected {case.action}")
        out.append(result.duration_ns)
    if case.counter and _counter(case) - before != len(packets):
        raise BenchError(f"{case.name}, one run per call: counter {case.counter[1]} grew by "
                         f"{_counter(case) - before} for {len(packets)} packets")
    return stats.summarize(out)


# ---- the suite ------------------------------------------------------------------

@dataclass
class Options:
    repeat: int
    runs: int
    scale: Scale
    progress: object = print
    baseline: Baseline | None = None   # another revision's program, timed in the paths group


def _settings(**overrides):
    from xdplb.config import Settings

    return Settings(hash_seed=SEED, metrics="", **overrides)


def _fill_flows(dp, keys_so_far: int, upto: int, fill_cpus: list[int], pinned: int, backend_id: int,
                service_id: int, port: int) -> None:
    """Insert flows number keys_so_far .. upto-1, each CPU its share, then re-pin."""
    table = dp.map("flows")
    start = keys_so_far
    for cpu, count in zip(fill_cpus, split_evenly(upto - keys_so_far, len(fill_cpus))):
        if count == 0:
            continue
        os.sched_setaffinity(0, {cpu})
        first = str(IPv4Address(FILL_FIRST_SRC) + start)
        for offset in range(0, count, 200_000):
            n = min(200_000, count - offset)
            keys = (table.Key * n).from_buffer(bytearray(frames.flow_keys(n, str(IPv4Address(first) + offset),
                                                                           VIP, 40000, port)))
            values = (table.Leaf * n).from_buffer(bytearray(frames.flow_values(n, backend_id, service_id)))
            table.items_update_batch(keys, values)
        start += count
    os.sched_setaffinity(0, {pinned})


def empty_flows(dp) -> None:
    """Delete every flow entry.

    bcc's Table.clear() deletes while walking with get_next_key, which starts
    again from the first bucket after each delete: quadratic, hours for a
    million entries. The kernel's batch lookup-and-delete walks the buckets once.
    """
    for _ in dp.map("flows").items_lookup_and_delete_batch():
        pass


def _check_filled(dp, filled: int, port: int, rng: random.Random) -> None:
    table = dp.map("flows")
    for i in rng.sample(range(filled), min(200, filled)):
        key = table.Key.from_buffer_copy(frames.flow_key(str(IPv4Address(FILL_FIRST_SRC) + i), VIP, 40000, port))
        try:
            table[key]
        except KeyError:
            raise BenchError(f"filled flow {i} of {filled} is missing from the flow table: entries were evicted") from None


def run(opts: Options) -> dict:
    from xdplb import structs

    say = opts.progress
    allowed = sorted(os.sched_getaffinity(0))
    pinned = allowed[-1]
    os.sched_setaffinity(0, {pinned})
    rng = random.Random(SEED)
    groups: list[dict] = []
    single_rows: list[dict] = []
    programs = Programs(say)
    tx, passed = structs.XDP_TX, structs.XDP_PASS

    def add_group(title: str, cases: list[Case], note: str = "", **meta) -> None:
        say(f"dataplane: measuring {title} ({len(cases)} cases × {opts.runs} runs × {opts.repeat:,})")
        measure_group(cases, opts.repeat, opts.runs)
        floor = stats.summarize(next(c for c in cases if c.floor).samples)
        rows = []
        for c in cases:
            s = stats.summarize(c.samples)
            rows.append({"case": c.name, "ns": s.as_dict(), "ratio_to_floor": stats.ratio(s.median, floor.median)})
        groups.append({"group": title, "method": f"repeat {opts.repeat:,}, median of {opts.runs}", "note": note,
                       "rows": rows, **meta})

    def add_single(case: Case, packets: list[bytes], floor_packets: list[bytes], **meta) -> None:
        say(f"dataplane: {case.name}: {len(packets):,} single runs")
        ns = single_shot(case, packets)
        floor = single_shot(Case("", "floor", floor_fd, b"", tx), floor_packets)
        single_rows.append({"case": case.name, "calls": len(packets), "ns": ns.as_dict(), "floor_ns": floor.as_dict(),
                            "ratio_to_floor": stats.ratio(ns.median, floor.median), **meta})

    say("dataplane: compiling the floor (bpf/bench_floor.c)")
    floor_bpf, floor_fd = load_floor()

    def floor_case(group, frame):
        return Case(group, "floor", floor_fd, frame, tx, floor=True)

    def first_syn(dp, port):  # inserts the flow the established cases hit
        run_case(Case("setup", "first SYN", dp.prog_fd, syn(port), tx), 1)

    # 1. The paths, default sizes: one service, three backends.
    default = _settings()
    main, upper, lower = programs.get(default), programs.get(default, "insert_delete"), programs.get(default, "no_insert")
    # The same three builds without the IPv6 program: what IPv4 costs without IPv6.
    main4, upper4, lower4 = (programs.get(default, variant, ipv6=False) for variant in (None, "insert_delete",
                                                                                      "no_insert"))
    base = programs.get(default, baseline=opts.baseline) if opts.baseline else None
    # IPv4, NAT and IPv6 (a dual-stack pool); the baseline may predate NAT and IPv6, so it holds the
    # IPv4 service only (its program has no NAT or IPv6 maps).
    paths = [main, upper, lower, main4, upper4, lower4]
    programs.program(paths, [service("dicom", 104, 3), nat_service("nat", NAT_PORT), service6("dicom6", 104, 3)])
    if base:
        programs.program([base], [service("dicom", 104, 3)])
    first_syn(main, 104)
    first_syn(main4, 104)
    first_syn(main, NAT_PORT)
    run_case(Case("setup", "first IPv6 SYN", main.prog_fd, syn6(104), tx), 1)
    g = "paths (default sizes, 1 service per family and a NAT service, 3 backends)"
    not_vip = frames.tcp_frame(CLIENT_MAC, GW_MAC, CLIENT, GATEWAY_IP, 50000, 22, frames.TCP_ACK)
    not_vip6 = frames.tcp_frame6(CLIENT_MAC, GW_MAC, CLIENT6, "2001:db8::10", 50000, 22, frames.TCP_ACK)
    cases = [
        floor_case(g, ack(104)),
        Case(g, "pass (not for a VIP)", main.prog_fd, not_vip, passed, main, ("not_forwarded", "not_service")),
        Case(g, "new flow (insert + delete: upper bound)", upper.prog_fd, syn(104), tx, upper, ("events", "flow_new")),
        Case(g, "new flow (no insert: lower bound)", lower.prog_fd, syn(104), tx, lower, ("events", "flow_new")),
        Case(g, "established (flow-table hit)", main.prog_fd, ack(104), tx, main, ("events", "flow_hit")),
        Case(g, "IPv6 floor (the floor on an IPv6 frame)", floor_fd, ack6(104), tx),
        Case(g, "IPv6 pass (not for a VIP)", main.prog_fd, not_vip6, passed, main, ("not_forwarded", "not_service")),
        Case(g, "IPv6 new flow (insert + delete: upper bound)", upper.prog_fd, syn6(104), tx, upper,
             ("events", "flow_new")),
        Case(g, "IPv6 new flow (no insert: lower bound)", lower.prog_fd, syn6(104), tx, lower, ("events", "flow_new")),
        Case(g, "IPv6 established (flow-table hit)", main.prog_fd, ack6(104), tx, main, ("events", "flow_hit")),
        Case(g, f"pass (not for a VIP), {NO_IPV6}", main4.prog_fd, not_vip, passed, main4,
             ("not_forwarded", "not_service")),
        Case(g, f"new flow (insert + delete: upper bound), {NO_IPV6}", upper4.prog_fd, syn(104), tx, upper4,
             ("events", "flow_new")),
        Case(g, f"new flow (no insert: lower bound), {NO_IPV6}", lower4.prog_fd, syn(104), tx, lower4,
             ("events", "flow_new")),
        Case(g, f"established (flow-table hit), {NO_IPV6}", main4.prog_fd, ack(104), tx, main4,
             ("events", "flow_hit")),
    ]
    if base:
        first_syn(base, 104)
        rev = opts.baseline.rev
        cases += [
            Case(g, f"pass (not for a VIP), baseline {rev}", base.prog_fd, not_vip, passed, base,
                 ("not_forwarded", "not_service")),
            Case(g, f"established (flow-table hit), baseline {rev}", base.prog_fd, ack(104), tx, base,
                 ("events", "flow_hit")),
        ]
    with reply_network(say) as ifindex:
        cases += [
            Case(g, "NAT request, established (flow hit + translation)", main.prog_fd, ack(NAT_PORT), tx, main,
                 ("nat", "request")),
            Case(g, "NAT reply (reverse lookup + fib lookup + translation)", main.prog_fd, nat_reply(NAT_PORT), tx,
                 main, ("nat", "reply_tx"), ifindex=ifindex),
        ]
        add_group(g, cases, "new flow: the unmodified program cannot miss twice on one packet; see the suite's "
                            "method. NAT: an identity translation, see the suite's method")
    # Back to the DSR services alone (both families, without NAT): later groups may reuse these
    # programs and program them together with the same services.
    programs.program(paths, [service("dicom", 104, 3), service6("dicom6", 104, 3)])
    # The unmodified program, one distinct flow per call: real misses and inserts.
    sources = [str(IPv4Address("12.0.0.0") + i) for i in range(opts.scale.single_shot_calls)]
    acks = [ack(104, src) for src in sources]
    add_single(Case(g, "new flow, unmodified program (distinct SYNs)", main.prog_fd, b"", tx, main,
                    ("events", "flow_new")), [syn(104, src) for src in sources], acks)
    add_single(Case(g, "established, unmodified program (those flows' ACKs)", main.prog_fd, b"", tx, main,
                    ("events", "flow_hit")), acks, acks)

    # 2. Loaded flow tables: one program, filled step by step.
    possible = possible_cpus()
    size = max(default.flow_table_size, flow_table_size(max(opts.scale.fills), possible, len(allowed)))
    loaded = programs.get(_settings(flow_table_size=size))
    programs.drop_others([main, upper, loaded])   # the baseline's program goes here too
    # The paths' services: `loaded` is the paths' program when the sizes agree (--quick).
    applied = programs.program([loaded], [service("dicom", 104, 3), service6("dicom6", 104, 3)])
    empty_flows(loaded)  # it may be the paths' program, which holds their flows
    bid, sid = live_backend_id(applied, "dicom"), applied.services["dicom"].id
    first_syn(loaded, 104)
    filled = 0
    for level in opts.scale.fills:
        say(f"dataplane: filling the flow table to {level:,} entries")
        _fill_flows(loaded, filled, level, allowed, pinned, bid, sid, 104)
        filled = level
        _check_filled(loaded, filled, 104, rng)
        g = f"flow table with {level:,} entries (table size {size:,})"
        add_group(g, [floor_case(g, ack(104)),
                      Case(g, f"established, {level:,} flows", loaded.prog_fd, ack(104), tx, loaded,
                           ("events", "flow_hit"))], flows=level)
        picks = [str(IPv4Address(FILL_FIRST_SRC) + i) for i in rng.choices(range(filled), k=opts.scale.single_shot_calls)]
        packets = [ack(104, src) for src in picks]
        add_single(Case(g, f"established, random one of {level:,} flows", loaded.prog_fd, b"", tx, loaded,
                        ("events", "flow_hit")), packets, packets, flows=level)

    # 3. Many backends × services: each compile size once, reprogrammed per point.
    from xdplb.config import MAX_BACKENDS_RANGE

    limit = MAX_BACKENDS_RANGE[1]          # the most backend ids a pool may ask for
    scale_rows = []
    for max_services, counts in scale_groups(opts.scale.services, opts.scale.backends).items():
        points = [(s, b) for s in counts for b in opts.scale.backends]
        fitting = [(s, b) for s, b in points if s * b < limit]
        for s, b in points:
            if (s, b) not in fitting:
                scale_rows.append({"services": s, "backends_per_service": b,
                                   "skipped": f"needs {s * b:,} backend ids; a pool's max_backends is at most {limit:,}"})
        if not fitting:
            continue
        max_backends = min(limit, max(default.max_backends, max(s * b for s, b in fitting) + 2))
        settings = _settings(max_services=max_services, max_backends=max_backends)
        real, newflow = programs.get(settings), programs.get(settings, "insert_delete")
        programs.drop_others([real, newflow])
        for n_services, n_backends in fitting:
            say(f"dataplane: programming {n_services} service(s) × {n_backends} backends")
            programs.program([real, newflow], [service(f"s{i}", 20000 + i, n_backends) for i in range(n_services)])
            port = 20000 + n_services // 2
            empty_flows(real)
            first_syn(real, port)
            g = f"{n_services} service(s) × {n_backends} backends"
            cases = [floor_case(g, ack(port)),
                     Case(g, "established", real.prog_fd, ack(port), tx, real, ("events", "flow_hit")),
                     Case(g, "new flow (insert + delete)", newflow.prog_fd, syn(port), tx, newflow,
                          ("events", "flow_new"))]
            add_group(g, cases, services=n_services, backends=n_backends)
            scale_rows.append({
                "services": n_services, "backends_per_service": n_backends,
                "floor_ns": stats.summarize(cases[0].samples).median,
                "established_ns": stats.summarize(cases[1].samples).median,
                "new_flow_ns": stats.summarize(cases[2].samples).median,
            })
    programs.drop_others([])
    del floor_bpf
    os.sched_setaffinity(0, set(allowed))
    return {"groups": groups, "single_shot": single_rows, "scale": scale_rows, "pinned_cpu": pinned,
            "compile_seconds": programs.compile_seconds, "targets": targets(groups, single_rows),
            "method": __doc__.strip()}


# ---- reporting --------------------------------------------------------------------

def _row(groups: list[dict], group_prefix: str, case_prefix: str) -> dict | None:
    for g in groups:
        if g["group"].startswith(group_prefix):
            for r in g["rows"]:
                if r["case"].startswith(case_prefix):
                    return r
    return None


def targets(groups: list[dict], single_rows: list[dict]) -> list[dict]:
    """The issue's targets for this machine, with the measured value (informational, never a failure)."""
    out = []
    est = _row(groups, "paths", "established")
    new_high = _row(groups, "paths", "new flow (insert")
    new_low = _row(groups, "paths", "new flow (no insert")
    if est:
        out.append({"target": "established ≤ 2.5× floor (same packet)", "measured": est["ratio_to_floor"], "limit": 2.5})
    base = _row(groups, "paths", "established (flow-table hit), baseline ")
    if est and base:
        rev = base["case"].rsplit(" ", 1)[1]
        out.append({"target": f"established ≤ 1.10× baseline {rev} (same packet, same runs)",
                    "measured": stats.ratio(est["ns"]["median"], base["ns"]["median"]), "limit": 1.10})
    alone = _row(groups, "paths", f"established (flow-table hit), {NO_IPV6}")
    if est and alone:
        out.append({"target": f"IPv4 established ≤ 1.03× its cost with {NO_IPV6} (same packet, same runs)",
                    "measured": stats.ratio(est["ns"]["median"], alone["ns"]["median"]), "limit": 1.03})
    if new_high:
        out.append({"target": "new flow ≤ 3.5× floor (same packet, insert + delete)",
                    "measured": new_high["ratio_to_floor"], "limit": 3.5})
    if new_low:
        out.append({"target": "new flow ≤ 3.5× floor (same packet, no insert)",
                    "measured": new_low["ratio_to_floor"], "limit": 3.5})
    for r in single_rows:
        if r["case"].startswith("established, unmodified"):
            out.append({"target": "established ≤ 2.5× floor (1 run per call)", "measured": r["ratio_to_floor"], "limit": 2.5})
        if r["case"].startswith("new flow, unmodified"):
            out.append({"target": "new flow ≤ 3.5× floor (1 run per call)", "measured": r["ratio_to_floor"], "limit": 3.5})
    loaded = [g for g in groups if "flows" in g]
    if len(loaded) >= 2:
        first, last = loaded[0]["rows"][1]["ns"]["median"], loaded[-1]["rows"][1]["ns"]["median"]
        out.append({"target": f"{loaded[-1]['flows']:,} flows ≤ 2× {loaded[0]['flows']:,} flows (same packet)",
                    "measured": stats.ratio(last, first), "limit": 2.0})
    random_rows = [r for r in single_rows if "flows" in r]
    if len(random_rows) >= 2:
        r = stats.ratio(random_rows[-1]["ns"]["median"], random_rows[0]["ns"]["median"])
        out.append({"target": f"{random_rows[-1]['flows']:,} flows ≤ 2× {random_rows[0]['flows']:,} flows "
                              "(random flow, 1 run per call)", "measured": r, "limit": 2.0})
    for t in out:
        t["met"] = t["measured"] is not None and t["measured"] <= t["limit"]
    return out


def render(result: dict) -> str:
    rows = []
    for g in result["groups"]:
        for r in g["rows"]:
            ns = r["ns"]
            rows.append([g["group"], r["case"], fmt(ns["median"], 0), f"{ns['low']:.0f}–{ns['high']:.0f}",
                         fmt_ratio(r["ratio_to_floor"])])
    text = [markdown(["group", "case", "ns/packet", "runs low–high", "× floor"], rows, "llrrr")]
    for r in result["scale"]:
        if "skipped" in r:
            text.append(f"\n{r['services']} service(s) × {r['backends_per_service']} backends: not measured, {r['skipped']}")
    if result["single_shot"]:
        text.append("")
        text.append("One run per call (repeat 1), a different flow each call: real misses and inserts, cache misses,")
        text.append("and the kernel timer's overhead in every figure; the floor is run the same way on the same packets.")
        text.append("")
        text.append(markdown(
            ["case (1 run per call)", "calls", "ns/packet", "floor ns/packet", "× floor"],
            [[r["case"], fmt(r["calls"], 0), fmt(r["ns"]["median"], 0),
              fmt(r["floor_ns"]["median"], 0), fmt_ratio(r["ratio_to_floor"])] for r in result["single_shot"]],
            "lrrrr"))
    if result["targets"]:
        text.append("")
        text.append(targets_table(result["targets"]))
    return "\n".join(text)


def draw(result: dict, context: str, out: Path) -> list[Path]:
    from . import charts

    paths = []
    labels, values, spans, notes, floors = [], [], [], [], []
    for g in result["groups"]:
        if not (g["group"].startswith("paths") or "flows" in g):
            continue
        for r in g["rows"]:
            if r["case"] == "floor" and labels and "flows" in g:
                continue  # one floor bar is enough; each group's own floor sets its ratio
            labels.append(r["case"])
            values.append(r["ns"]["median"])
            spans.append((r["ns"]["low"], r["ns"]["high"]))
            notes.append("" if r["case"] == "floor" else fmt_ratio(r["ratio_to_floor"]) + " floor")
            floors.append(r["case"] == "floor")
    if labels:
        paths.append(charts.hbars(out / "dataplane_paths.png", "xdplb per-packet cost (BPF_PROG_TEST_RUN)", context,
                                  labels, values, "ns/packet", spans, notes, floors))
    if any("floor_ns" in r for r in result["scale"]):
        backends = sorted({r["backends_per_service"] for r in result["scale"]})
        services = sorted({r["services"] for r in result["scale"]})
        series = {}
        for n_services in services:
            for key, label in (("established_ns", "established"), ("new_flow_ns", "new flow")):
                series[f"{n_services} svc, {label}"] = [
                    next((r.get(key) for r in result["scale"] if r["services"] == n_services
                          and r["backends_per_service"] == b), None) for b in backends]
        floor = stats.summarize([r["floor_ns"] for r in result["scale"] if "floor_ns" in r]).median
        paths.append(charts.grouped_bars(out / "dataplane_scale.png", "Per-packet cost vs backends and services",
                                         context, [str(b) for b in backends], series, "ns/packet",
                                         "backends per service", ("floor", floor)))
    random_rows = [r for r in result["single_shot"] if "flows" in r]
    if random_rows:
        xs = [r["flows"] for r in random_rows]
        loaded = {g["flows"]: g for g in result["groups"] if "flows" in g}
        paths.append(charts.lines(out / "dataplane_flow_table.png", "Established-flow cost vs flow-table entries",
                                  context, xs, {
                                      "same packet repeated": [loaded[x]["rows"][1]["ns"]["median"] for x in xs],
                                      "random flow, 1 run per call": [r["ns"]["median"] for r in random_rows],
                                      "floor, 1 run per call": [r["floor_ns"]["median"] for r in random_rows],
                                  }, "ns/packet", "flows in the table", logx=True))
    return paths
