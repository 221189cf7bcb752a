"""Smoke test of the benchmarks: every suite runs with tiny counts, as the README's command.

Speed is never checked (the machine is shared); what is checked is that each
suite runs end to end on the real program, the real lab and the real
balancers, and writes a table, JSON with the figures and their context, and
PNG charts that open.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.suite_lab import MODES  # tools/ is on sys.path (tests/lab/conftest.py)

pytestmark = [pytest.mark.root, pytest.mark.lab]

RUN = Path(__file__).resolve().parents[2] / "tools" / "bench" / "run.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CONTEXT_KEYS = {"kernel", "cpu_model", "cpus", "xdp_mode", "runs", "statistic", "date", "xdplb_commit"}


def run_suite(name: str, out: Path) -> tuple[str, dict]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    done = subprocess.run([sys.executable, str(RUN), "--suite", name, "--quick", "--runs", "1", "--repeat", "2000",
                           "--seconds", "1", "--out", str(out)], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, f"bench {name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    doc = json.loads((out / f"{name}.json").read_text())
    assert doc["suite"] == name and CONTEXT_KEYS <= set(doc["context"]), doc["context"]
    assert doc["context"]["quick"] is True
    printed = (out / f"{name}.md").read_text()
    assert printed in done.stdout and f"### {name}" in printed
    assert "kernel " + doc["context"]["kernel"] in printed
    return done.stdout, doc


def assert_charts(out: Path, prefix: str, count: int) -> None:
    import matplotlib.image

    charts = sorted(out.glob(f"{prefix}_*.png"))
    assert len(charts) == count, charts
    for chart in charts:
        assert chart.read_bytes()[:8] == PNG_MAGIC, chart
        height, width = matplotlib.image.imread(chart).shape[:2]
        assert height > 100 and width > 100, (chart, height, width)


def test_dataplane_suite(tmp_path):
    stdout, doc = run_suite("dataplane", tmp_path)
    result = doc["result"]
    paths = next(g for g in result["groups"] if g["group"].startswith("paths"))
    cases = {r["case"]: r for r in paths["rows"]}
    ipv4 = {"pass (not for a VIP)", "new flow (insert + delete: upper bound)", "new flow (no insert: lower bound)",
            "established (flow-table hit)"}
    nat = {"NAT request, established (flow hit + translation)",
           "NAT reply (reverse lookup + fib lookup + translation)"}
    assert set(cases) == ({"floor", "IPv6 floor (the floor on an IPv6 frame)"} | ipv4 | {f"IPv6 {c}" for c in ipv4}
                          | {f"{c}, IPv6 compiled out" for c in ipv4} | nat)
    assert cases["floor"]["ratio_to_floor"] == 1.0
    for row in cases.values():
        assert row["ns"]["median"] > 0 and row["ns"]["runs"] == 1
    assert [g["flows"] for g in result["groups"] if "flows" in g] == [1_000, 10_000]
    assert {(r["services"], r["backends_per_service"]) for r in result["scale"]} == {(1, 10), (1, 40), (64, 10), (64, 40)}
    singles = {r["case"] for r in result["single_shot"]}
    assert "new flow, unmodified program (distinct SYNs)" in singles and len(singles) == 4
    assert all(r["calls"] == 2000 and r["ns"]["median"] > 0 for r in result["single_shot"])
    assert {t["target"] for t in result["targets"]} >= {
        "established ≤ 2.5× floor (same packet)",
        "IPv4 established ≤ 1.03× its cost with IPv6 compiled out (same packet, same runs)"}
    assert doc["context"]["repeat"] == 2000
    assert "| established (flow-table hit)" in stdout
    assert_charts(tmp_path, "dataplane", 3)


def test_lab_suite(tmp_path):
    stdout, doc = run_suite("lab", tmp_path)
    rows = {r["mode"]: r for r in doc["result"]["rows"]}
    assert list(rows) == list(MODES)
    for mode, row in rows.items():
        assert row["error"] is None, f"{mode}: {row['error']}"
        assert row["stream_gbits"]["median"] > 0 and row["conn_per_s"]["median"] > 0, mode
        # TSO on for every row but native (whose frames would leave with unfinished checksums).
        assert (row["stream_tso_gbits"] is None) == (mode == "xdplb native"), mode
        if mode != "xdplb native":
            assert row["stream_tso_gbits"]["median"] > 0, mode
        assert row["cpu_runs"] and row["cpu_runs"][0]["bytes"] > 0, mode
        assert any(name.startswith("be") for name in row["responders_seen"]), (mode, row["responders_seen"])
    # The two xdplb rows ran in the mode they name, and their own counters saw the traffic.
    assert rows["xdplb generic"]["xdp_mode"] == "generic" and rows["xdplb native"]["xdp_mode"] == "native"
    assert [m for m, r in rows.items() if r["native_peer"]] == ["xdplb native"]   # the peer program only there
    assert rows["xdplb native"]["facts"]["forwarded"]["iperf"]["packets"] > 0
    assert min(rows["nftables DNAT"]["facts"]["dnat_rule_packets"].values()) > 0
    # Balanced HTTP reached more than one backend through every balancer.
    for mode in MODES[1:]:
        assert len([n for n in rows[mode]["responders_seen"] if n.startswith("be")]) >= 2, rows[mode]
    assert doc["result"]["cpu_rate_gbits"] > 0
    assert "| HAProxy TCP" in stdout and "issue target" in stdout
    assert_charts(tmp_path, "lab", 3)


def test_controller_suite(tmp_path):
    stdout, doc = run_suite("controller", tmp_path)
    result = doc["result"]
    assert {(r["size"], r["backends"]) for r in result["maglev"]} == {(65537, 10), (65537, 100), (65537, 1000)}
    assert all(r["ms"]["median"] > 0 and r["warm_ms"]["median"] > 0 for r in result["maglev"])
    assert [(r["backends"], r["change"]) for r in result["verdict_to_live"]] == [
        (10, "one backend down"), (10, "one backend up"), (1000, "one backend down"), (1000, "one backend up")]
    assert all(r["writes"] >= 3 and r["ms"]["median"] >= r["apply_ms"] for r in result["verdict_to_live"])
    (attach,) = result["attach"]
    assert 0 < attach["compile_load_s"] < attach["start_to_ready_s"] + 1
    assert attach["start_to_first_forward_s"] > attach["compile_load_s"]
    assert result["reload"]["changed_ms"]["median"] > 0 and result["reload"]["services"] == 64
    memory = {r["map"]: r["memlock_bytes"] for r in result["map_memory"]}
    assert memory["flows"] > 262144 * 48 and memory["maglev_tables"] >= 128 * 65537 * 4
    assert result["map_memory_total_bytes"] == sum(memory.values())
    assert "issue target: ≤ 20 ms" in stdout
    assert_charts(tmp_path, "controller", 3)


def test_nat_suite(tmp_path):
    from bench.suite_nat import MODES as NAT_MODES

    stdout, doc = run_suite("nat", tmp_path)
    rows = {r["mode"]: r for r in doc["result"]["rows"]}
    assert list(rows) == list(NAT_MODES)
    for mode, row in rows.items():
        assert row["error"] is None, f"{mode}: {row['error']}"
        assert row["stream_gbits"]["median"] > 0 and row["conn_per_s"]["median"] > 0, mode
        assert row["store_mb_per_s"]["median"] > 0, mode
        assert any(name.startswith("be") for name in row["responders_seen"]), (mode, row["responders_seen"])
    assert rows["xdplb NAT generic"]["xdp_mode"] == "generic" and rows["xdplb NAT native"]["xdp_mode"] == "native"
    assert rows["xdplb NAT6 generic"]["xdp_mode"] == "generic"
    assert [m for m, r in rows.items() if r["native_peer"]] == ["xdplb NAT native"]
    for mode in ("xdplb NAT generic", "xdplb NAT native", "xdplb NAT6 generic"):
        assert min(svc["packets"] for svc in rows[mode]["facts"]["forwarded"].values()) > 0, mode
    for mode in ("nftables DNAT", "nftables DNAT6"):
        assert min(rows[mode]["facts"]["dnat_rule_packets"].values()) > 0, mode
    assert all(":" in rows[m]["target"] for m in ("routed6 (no balancer)", "xdplb NAT6 generic", "nftables DNAT6"))
    assert "| nftables DNAT" in stdout and "xdplb NAT generic vs nftables DNAT" in stdout
    assert "xdplb NAT6 generic vs nftables DNAT6" in stdout and "xdplb NAT6 generic vs xdplb NAT generic" in stdout
    assert_charts(tmp_path, "nat", 3)
