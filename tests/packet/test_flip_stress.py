"""The table flip under concurrency (bpf/lb_maps.h), in BPF_PROG_TEST_RUN.

A child process pinned to one CPU runs packets of service A through the
program, one BPF_PROG_TEST_RUN each, and classifies every forwarded frame by
its MACs. Meanwhile this process, pinned to the other CPU, programs the
maps through the real planner and map writer: each round flips A's and B's
Maglev tables (weights change), moves a backend of each to its other MAC,
marks another up or down, and churns the flow table (deletes A's entries,
and writes entries for A's 5-tuples that name B's service and backend).
No frame of A may leave with a MAC of B's backends or with a MAC that was
never configured, nothing but the two MACs may change, and B's counters
(which only a packet of A sent to B could move) must stay still.

On two CPUs the race windows of the old scheme are tens of nanoseconds, so
the unfixed program rarely fails in a real build. The widened builds define
XDPLB_RACE_DELAY (bpf/race_window.h), which holds each packet for that many
clock reads (tens of microseconds) between a read and the reads that depend
on it. As the negative control, the program as it was before the safe flip
(PRE_FIX_COMMIT, with the same delays patched in at its reads) runs against
a writer without grace periods, as the old writer was: it sends A's packets
to B's backends and to half-written MACs. The current program with the same
delays and its grace periods does not. Counts are printed (pytest -s).
"""
from __future__ import annotations

import ipaddress
import multiprocessing
import os
import subprocess
import tarfile
import io
from collections import Counter
from pathlib import Path

import pytest

from xdplb import bpf_source, bpfsys, plan, structs
from xdplb.config import Settings

from . import packets as P
from .conftest import GW_MAC, VIP

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
PRE_FIX_COMMIT = "440b3ed0faad5b0c046449d615f79412b4d8810e"   # main before the safe flip
RACE_DELAY = 2000   # clock reads per window: about 50-100 µs
ROUNDS = 150            # with grace periods: about 10 s
PRE_FIX_ROUNDS = 2000   # without: a few milliseconds each
SETTINGS = Settings(hash_seed=0x5EED, maglev_size=251, flow_table_size=8192, max_services=8, max_backends=64)
SPORTS = range(30000, 30064)
# Runs of the program per BPF_PROG_TEST_RUN call: the kernel runs them back
# to back, so the reader spends its time in the program rather than in
# Python. Only the last run's frame comes back; every run is counted by the
# program itself in B's service and backend counters, which no packet of
# this test may ever reach.
REPEAT = 1


def _mac(service: int, backend: int, variant: int) -> bytes:
    """A backend's MAC; its two variants differ in bytes 1 and 5, so a copy
    torn anywhere in between is a MAC that was never configured."""
    return bytes([2, service + variant, 0, 0, backend, variant])


A_MACS = {_mac(0xA0, b, v) for b in (1, 2, 3) for v in (0, 1)}
B_MACS = {_mac(0xB0, b, v) for b in (1, 2, 3) for v in (0, 1)}


def _services(round_: int) -> tuple[plan.ServiceState, ...]:
    """Round `round_` of the churn: weights (so tables rebuild), a MAC, a health verdict."""
    out = []
    for name, octet, port, net in (("a", 0xA0, 104, 1), ("b", 0xB0, 105, 2)):
        backends = (
            plan.BackendState("1", ipaddress.IPv4Address(f"10.10.{net}.1"), 1 + round_ % 3, _mac(octet, 1, 0), True),
            plan.BackendState("2", ipaddress.IPv4Address(f"10.10.{net}.2"), 1, _mac(octet, 2, round_ % 2), True),
            plan.BackendState("3", ipaddress.IPv4Address(f"10.10.{net}.3"), 2, _mac(octet, 3, 0), round_ % 4 != 1),
        )
        out.append(plan.ServiceState(name, VIP, port, "tcp", "flow", backends))
    return tuple(out)


def _frames() -> list[bytes]:
    frames = []
    for sport in SPORTS:
        frames.append(bytes(P.syn(sport=sport)))
        frames.append(bytes(P.ack(sport=sport)))
    return frames


def _classify(sent: bytes, verdict) -> str:
    if verdict.retval != structs.XDP_TX:
        return structs.ACTIONS[verdict.retval]
    out = verdict.data
    if out[6:12] != GW_MAC or out[12:] != sent[12:]:
        return "tx_changed_more_than_macs"
    dst = out[0:6]
    if dst in A_MACS:
        return "tx_to_a"
    if dst in B_MACS:
        return "tx_to_b"
    return "tx_to_unconfigured_mac"


def _reader(prog_fd: int, cpu: int, stop, results) -> None:
    os.sched_setaffinity(0, {cpu})
    frames = _frames()
    counts: Counter = Counter()
    while not stop.is_set():
        for frame in frames:
            counts[_classify(frame, bpfsys.prog_test_run(prog_fd, frame, REPEAT))] += 1
    results.put(dict(counts))


def _flows_churn(dp, applied: plan.Applied) -> int:
    """Delete A's flow entries and write entries for A's 5-tuples that name
    B's service and backend (a recycled or stale entry); returns the writes."""
    flows = dp.map("flows")
    b_sid = applied.services["b"].id
    b_bid = next(be.id for (svc, _), be in applied.backends.items() if svc == "b")
    writes = 0
    for i, sport in enumerate(SPORTS):
        key = structs.FlowKey((ctypes_u8x4(P.CLIENT)), (ctypes_u8x4(str(VIP))), _be16(sport), _be16(104), 6)
        key = flows.Key.from_buffer_copy(bytes(key))
        if i % 2:
            try:
                del flows[key]
            except KeyError:
                pass
        else:
            flows[key] = flows.Leaf(b_bid, b_sid)
        writes += 1
    return writes


def ctypes_u8x4(address: str):
    import ctypes

    return (ctypes.c_uint8 * 4)(*ipaddress.IPv4Address(address).packed)


def _be16(port: int) -> int:
    import socket

    return socket.htons(port)


def stress(dp, rounds: int = ROUNDS) -> dict:
    """Run the churn for `rounds` rounds against packets of A on another CPU."""
    cpus = sorted(range(os.cpu_count() or 1))
    if len(cpus) < 2:
        pytest.fail("the stress test needs two CPUs: one for packets, one for the writer")
    before = os.sched_getaffinity(0)
    applied = plan.Applied()
    desired = lambda r: plan.Desired(_services(r), GW_MAC, SETTINGS.hash_seed, SETTINGS.maglev_size,  # noqa: E731
                                     SETTINGS.max_services, SETTINGS.max_backends)
    result = plan.plan(applied, desired(0))
    dp.apply(result.ops)
    applied = result.applied
    b_sid = applied.services["b"].id
    b_bids = [be.id for (svc, _), be in applied.backends.items() if svc == "b"]
    b_before = dp.read_stats([b_sid], b_bids)
    ctx = multiprocessing.get_context("fork")
    stop, results = ctx.Event(), ctx.Queue()
    child = ctx.Process(target=_reader, args=(dp.prog_fd, cpus[0], stop, results))
    writer = Counter()
    try:
        os.sched_setaffinity(0, {cpus[1]})
        child.start()
        for r in range(1, rounds + 1):
            result = plan.plan(applied, desired(r))
            dp.apply(result.ops)
            applied = result.applied
            writer["flips"] += sum(isinstance(op, plan.PutService) for op in result.ops)
            writer["backend_writes"] += sum(isinstance(op, plan.PutBackend) for op in result.ops)
            writer["flow_writes"] += _flows_churn(dp, applied)
        stop.set()
        counts = results.get(timeout=60)
        child.join(timeout=10)
    finally:
        stop.set()
        if child.is_alive():
            child.kill()
        os.sched_setaffinity(0, before)
    b_after = dp.read_stats([b_sid], b_bids)
    counts["runs_counted_on_b_service"] = b_after.services[b_sid].packets - b_before.services[b_sid].packets
    counts["runs_counted_on_b_backends"] = sum(b_after.backends[i].packets - b_before.backends[i].packets for i in b_bids)
    counts["runs"] = sum(v for k, v in counts.items() if not k.startswith("runs_")) * REPEAT
    counts.update({f"writer_{k}": v for k, v in writer.items()})
    counts["grace_periods"] = dp.grace_periods
    print(f"\nflip stress: {counts}")
    return counts


def _load(**kwargs):
    from xdplb.dataplane import BccDataplane

    return BccDataplane(SETTINGS, **kwargs)


def _assert_never_misdirected(counts: dict) -> None:
    assert counts.get("tx_to_a", 0) > 500, f"too few packets of A were forwarded to judge: {counts}"
    assert counts.get("tx_to_b", 0) == 0, counts
    assert counts["runs_counted_on_b_service"] == 0 and counts["runs_counted_on_b_backends"] == 0, counts
    assert counts.get("tx_to_unconfigured_mac", 0) == 0, counts
    assert counts.get("tx_changed_more_than_macs", 0) == 0, counts
    assert counts.get("aborted", 0) == 0, counts
    assert counts["writer_flips"] >= 2 * ROUNDS and counts["writer_backend_writes"] >= 2 * ROUNDS
    assert counts["grace_periods"] >= ROUNDS


def test_flip_under_concurrency_never_misdirects():
    _assert_never_misdirected(stress(_load()))


def test_flip_with_widened_race_windows_never_misdirects():
    _assert_never_misdirected(stress(_load(extra_defines={"XDPLB_RACE_DELAY": RACE_DELAY})))


def _patch(path: Path, edits: list[tuple[str, str]]) -> None:
    text = path.read_text()
    for old, new in edits:
        assert text.count(old) == 1, f"{path.name} of the pre-fix program no longer has {old!r} once"
        text = text.replace(old, new)
    path.write_text(text)


def _pre_fix_source(tmp: Path) -> Path:
    """bpf/ as of PRE_FIX_COMMIT, with race_window() (bpf/race_window.h)
    patched in where the old program's reads race: between the services
    lookup and the element's id, after the flow entry's service id, before
    the MAC copy and in its middle."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", PRE_FIX_COMMIT, "bpf"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tmp)
    bpf = tmp / "bpf"
    # Today's struct layouts: later changes grew the records (a backend's
    # down_since, a flow's atime, lb_config's flow settings), the controller
    # writes today's, and the old program reads the fields it knows at the
    # same offsets. The pre-fix scheme is in xdplb.c and lb_maps.h.
    for header in ("lb_structs.h", "lb_structs6.h", "lb_consts.h"):
        (bpf / header).write_text((bpf_source.BPF_DIR / header).read_text())
    (bpf / "race_window.h").write_text((bpf_source.BPF_DIR / "race_window.h").read_text())
    _patch(bpf / "forward.h", [
        ('#include "lb_structs.h"\n', '#include "lb_structs.h"\n#include "race_window.h"\n'),
        ("\tdst[2] = src[2];\n\tdst[3] = src[3];\n", "\tdst[2] = src[2];\n\trace_window();\n\tdst[3] = src[3];\n"),
    ])
    # Maps this controller expects that the old program did not declare
    # (the layout map, the flood guard's state): declared, never used by it.
    maps = (bpf / "lb_maps.h").read_text()
    added = [line for line in (bpf_source.BPF_DIR / "lb_maps.h").read_text().splitlines()
             if line.startswith("LB_MAP") and line.split(",")[-2].strip() not in maps]
    assert added, "the old lb_maps.h lacks no map: drop this step"
    (bpf / "lb_maps.h").write_text(maps.replace("#endif /* XDPLB_MAPS_H */",
                                                "\n".join(added) + "\n\n#endif /* XDPLB_MAPS_H */"))
    _patch(bpf / "xdplb.c", [
        ("\tsid = svc->id;\n", "\trace_window();\n\tsid = svc->id;\n"),
        ("\t\tsid = *(volatile __u32 *)&fv->service_id;\n",
         "\t\tsid = *(volatile __u32 *)&fv->service_id;\n\trace_window();\n"),
        ("\tdsr_rewrite(eth, be, cfg);\n", "\trace_window();\n\tdsr_rewrite(eth, be, cfg);\n"),
    ])
    return bpf


def test_negative_control_pre_fix_scheme_misdirects_with_widened_windows(tmp_path):
    dp = _load(bpf_dir=_pre_fix_source(tmp_path), extra_defines={"XDPLB_RACE_DELAY": RACE_DELAY})
    # The pre-fix writer waited for no grace period: it rewrote a backend in
    # place and wrote one service after the other. This writer's staged
    # writes without the waits are that (the old program ignores READY).
    dp.grace_period = lambda: None
    counts = stress(dp, rounds=PRE_FIX_ROUNDS)
    assert counts.get("tx_to_a", 0) > 500, counts
    # The old scheme reads a recycled services element (B's id and table)
    # and a MAC being rewritten.
    assert (counts["runs_counted_on_b_service"] + counts.get("tx_to_b", 0)
            + counts.get("tx_to_unconfigured_mac", 0)) > 0, counts
