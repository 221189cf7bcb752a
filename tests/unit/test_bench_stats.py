"""The benchmark's own logic: statistics, parsers, frames, tables, configs, targets.

Pure: no root, no BPF, no namespaces. tools/bench/ is the `bench` package
(tools/ goes on sys.path, as tools/bench/run.py does for itself).
"""
from __future__ import annotations

import ctypes
import ipaddress
import json
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

from bench import frames, lab_baselines, parse, run, stats, suite_controller, suite_dataplane, suite_lab, tables  # noqa: E402

# ---- statistics -------------------------------------------------------------


def test_summary_is_median_with_lowest_and_highest():
    s = stats.summarize([40, 38, 90, 39, 41])
    assert (s.median, s.low, s.high, s.runs) == (40, 38, 90, 5)
    assert s.spread == pytest.approx(52 / 40)
    assert stats.summarize([1, 2, 3, 10]).median == 2.5


def test_summary_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="no samples"):
        stats.summarize([])


def test_ratio_and_per_gb_refuse_missing_or_zero_bases():
    assert stats.ratio(120, 40) == 3.0
    assert stats.ratio(None, 40) is None
    assert stats.ratio(120, 0) is None
    assert stats.per_gb(3.0, 2_000_000_000) == 1.5
    assert stats.per_gb(3.0, 0) is None


def test_interleave_measures_round_by_round():
    assert stats.interleave(["floor", "a", "b"], 2) == ["floor", "a", "b", "floor", "a", "b"]
    with pytest.raises(ValueError):
        stats.interleave(["a"], 0)


# ---- parsers ----------------------------------------------------------------

IPERF_JSON = json.dumps({"start": {}, "end": {
    "sum_sent": {"bytes": 1_300_000_000, "bits_per_second": 2.08e9, "retransmits": 7, "seconds": 5.0},
    "sum_received": {"bytes": 1_250_000_000, "bits_per_second": 2.0e9, "seconds": 5.0}}})

WRK_TEXT = """Running 5s test @ http://10.10.0.100:8081/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     6.12ms    2.01ms  30.12ms   80.00%
    Req/Sec     5.21k   300.00     5.90k    70.00%
  25976 requests in 5.00s, 2.43MB read
  Socket errors: connect 0, read 12, write 1, timeout 2
  Non-2xx or 3xx responses: 4
Requests/sec:   5195.20
Transfer/sec:    497.65KB
"""


def test_iperf3_receiver_summary():
    r = parse.iperf3(IPERF_JSON)
    assert (r.gbits, r.bytes, r.seconds, r.retransmits) == (2.0, 1_250_000_000, 5.0, 7)


@pytest.mark.parametrize("text, message", [
    ('{"error": "unable to connect to server: Connection refused"}', "iperf3 failed: unable to connect"),
    ("iperf3: error - the server is busy", "not JSON"),
    ('{"end": {}}', "no end.sum_received"),
])
def test_iperf3_failures_say_what_went_wrong(text, message):
    with pytest.raises(parse.ParseError, match=message):
        parse.iperf3(text)


def test_wrk_totals_and_errors():
    r = parse.wrk(WRK_TEXT)
    assert (r.requests_per_s, r.requests, r.seconds, r.socket_errors, r.non_2xx) == (5195.2, 25976, 5.0, 15, 4)
    clean = parse.wrk("  10 requests in 1.50m, 1KB read\nRequests/sec:      0.11\n")
    assert (clean.seconds, clean.socket_errors, clean.non_2xx) == (90.0, 0, 0)
    with pytest.raises(parse.ParseError, match="Requests/sec"):
        parse.wrk("unable to connect to 10.10.0.100:8081 Connection refused\n")


def test_proc_stat_busy_excludes_idle_and_iowait():
    text = "cpu  100 5 50 1000 20 3 7 2 9 0\ncpu0 50 2 25 500 10 1 3 1 4 0\nintr 1 2 3\n"
    ticks = parse.proc_stat(text)
    assert ticks.busy == 100 + 5 + 50 + 3 + 7 + 2     # guest (9) is already inside user
    assert ticks.total == ticks.busy + 1000 + 20
    with pytest.raises(parse.ParseError):
        parse.proc_stat("intr 1 2 3\n")


def test_fdinfo_and_memlock():
    text = "pos:\t0\nflags:\t02000002\nmap_type:\t9\nkey_size:\t40\nvalue_size:\t8\nmax_entries:\t262144\n" \
           "memlock:\t29361024\nmap_id:\t17\n"
    assert parse.fdinfo(text)["max_entries"] == "262144"
    assert parse.memlock(text) == 29361024
    with pytest.raises(parse.ParseError, match="memlock"):
        parse.memlock("pos:\t0\n")


def test_cpu_model_x86_and_arm():
    assert parse.cpu_model("processor\t: 0\nmodel name\t: AMD EPYC 7B13\n") == "AMD EPYC 7B13"
    assert parse.cpu_model("processor\t: 0\nCPU part\t: 0xd0c\n") == "0xd0c"
    assert parse.cpu_model("") == "unknown"


def test_compile_seconds_from_the_daemon_log():
    log = "xdplb[eth0]: compiling the XDP program (maglev_size 65537)\nxdplb[eth0]: compiled and loaded in 7.9s\n"
    assert parse.compile_seconds(log) == 7.9
    with pytest.raises(parse.ParseError):
        parse.compile_seconds("xdplb[eth0]: ready\n")


def test_nft_counters_in_rule_order():
    dump = json.dumps({"nftables": [
        {"metainfo": {"version": "1.0.6"}},
        {"table": {"family": "ip", "name": "t"}},
        {"rule": {"expr": [{"match": {}}, {"counter": {"packets": 12, "bytes": 900}}, {"dnat": {}}]}},
        {"rule": {"expr": [{"counter": {"packets": 0, "bytes": 0}}]}},
    ]})
    assert parse.nft_counter_packets(dump) == [12, 0]


# ---- frames and flow keys -----------------------------------------------------


def test_tcp_frame_matches_scapy_with_valid_checksums():
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    raw = frames.tcp_frame(b"\x02\x00\x0a\x0a\x00\x02", b"\x02\x00\x0a\x0a\x00\x0a", "10.10.0.2", "10.10.0.100",
                           40000, 104, frames.TCP_ACK, b"DICOM", 1001, 1)
    pkt = Ether(raw)
    assert (pkt[Ether].src, pkt[Ether].dst) == ("02:00:0a:0a:00:02", "02:00:0a:0a:00:0a")
    assert (pkt[IP].src, pkt[IP].dst, pkt[TCP].sport, pkt[TCP].dport) == ("10.10.0.2", "10.10.0.100", 40000, 104)
    assert pkt[TCP].flags == "A" and bytes(pkt[TCP].payload) == b"DICOM"
    rebuilt = Ether(raw)
    del rebuilt[IP].chksum, rebuilt[TCP].chksum  # scapy recomputes them
    assert bytes(rebuilt) == raw


def test_flow_keys_have_the_kernels_layout():
    from xdplb import structs

    assert ctypes.sizeof(structs.FlowKey) == frames.FLOW_KEY_SIZE
    key = structs.FlowKey.from_buffer_copy(frames.flow_key("11.0.0.7", "10.10.0.100", 40000, 104))
    assert str(ipaddress.IPv4Address(bytes(key.src))) == "11.0.0.7"
    assert str(ipaddress.IPv4Address(bytes(key.dst))) == "10.10.0.100"
    assert (socket.ntohs(key.sport), socket.ntohs(key.dport), key.proto) == (40000, 104, 6)
    packed = frames.flow_keys(300, "11.0.0.250", "10.10.0.100", 40000, 104)
    size = frames.FLOW_KEY_SIZE
    keys = [packed[i:i + size] for i in range(0, len(packed), size)]
    assert len(set(keys)) == 300 and keys[0] == frames.flow_key("11.0.0.250", "10.10.0.100", 40000, 104)
    assert keys[-1] == frames.flow_key("11.0.2.37", "10.10.0.100", 40000, 104)    # .250 + 299
    packed = frames.flow_values(2, 5, 3)
    assert len(packed) == 2 * ctypes.sizeof(structs.FlowValue)
    value = structs.FlowValue.from_buffer_copy(packed[:ctypes.sizeof(structs.FlowValue)])
    assert (value.backend_id, value.service_id) == (5, 3)
    with pytest.raises(ValueError, match="255.255.255.255"):
        frames.flow_keys(2, "255.255.255.255", "10.10.0.100", 1, 2)


# ---- tables -------------------------------------------------------------------


def test_markdown_table_pads_and_aligns():
    text = tables.markdown(["case", "ns"], [["floor", "40"], ["established", "1,174"]])
    assert text.splitlines() == [
        "| case        |    ns |",
        "|-------------|------:|",
        "| floor       |    40 |",
        "| established | 1,174 |",
    ]
    with pytest.raises(ValueError, match="2 columns"):
        tables.markdown(["a", "b"], [["only one"]])


def test_formatting_of_missing_values():
    assert tables.fmt(None) == "-" and tables.fmt(1234.5, 0) == "1,234" and tables.fmt_ratio(2.5) == "2.50×"
    assert tables.fmt_ratio(None) == "-"
    line = tables.context_line({"kernel": "6.1", "cpu_model": "EPYC", "cpus": 2, "repeat": 1000000, "runs": 5})
    assert line == "kernel 6.1; CPU EPYC × 2; repeat 1,000,000; runs 5"


# ---- data-plane suite helpers ---------------------------------------------------


def test_new_flow_builds_change_exactly_the_insert():
    from xdplb import bpf_source

    text = bpf_source.assemble()
    upper = suite_dataplane.variant_source(text, "insert_delete")
    lower = suite_dataplane.variant_source(text, "no_insert")
    assert upper.count("flows.delete(&pkt->flow);") == 1 and "flows.update(&pkt->flow, &fval);" in upper
    assert suite_dataplane.INSERT_LINE not in lower
    assert suite_dataplane.INSERT_LINE6 not in lower and suite_dataplane.INSERT_LINE6 not in upper
    assert (upper.replace(suite_dataplane.VARIANTS["insert_delete"], suite_dataplane.INSERT_LINE)
            .replace(suite_dataplane.VARIANTS6["insert_delete"], suite_dataplane.INSERT_LINE6)) == text
    with pytest.raises(suite_dataplane.BenchError, match="0 copies"):
        suite_dataplane.variant_source("int x;", "no_insert")
    with pytest.raises(suite_dataplane.BenchError, match="2 copies"):
        suite_dataplane.variant_source(text + suite_dataplane.INSERT_LINE, "no_insert")
    with pytest.raises(ValueError, match="unknown new-flow variant"):
        suite_dataplane.variant_source(text, "fast")


def test_flow_table_sizing_leaves_every_cpu_room():
    assert suite_dataplane.cpu_count_in("0-1\n") == 2
    assert suite_dataplane.cpu_count_in("0-3,8,10-11") == 7
    size = suite_dataplane.flow_table_size(1_000_000, possible_cpus=2, fill_cpus=2)
    assert size == (500_000 + 4096) * 2
    # Two possible CPUs, one usable: the one CPU's share must hold the whole fill.
    assert suite_dataplane.flow_table_size(1000, possible_cpus=2, fill_cpus=1, headroom=0) // 2 == 1000
    with pytest.raises(ValueError):
        suite_dataplane.flow_table_size(10, possible_cpus=1, fill_cpus=2)
    assert suite_dataplane.split_evenly(7, 3) == [3, 2, 2] and sum(suite_dataplane.split_evenly(10**6, 2)) == 10**6


def test_scale_groups_share_compiles():
    assert suite_dataplane.scale_groups((1, 64, 512), (10, 100)) == {64: [1, 64], 512: [512]}


def _group(title, rows, **meta):
    return {"group": title, "rows": [{"case": c, "ns": {"median": ns}, "ratio_to_floor": r} for c, ns, r in rows], **meta}


def test_dataplane_targets_report_measured_ratios():
    groups = [
        _group("paths (default sizes)", [("floor", 40, 1.0), ("new flow (insert + delete: upper bound)", 160, 4.0),
                                         ("new flow (no insert: lower bound)", 120, 3.0),
                                         ("established (flow-table hit)", 90, 2.25)]),
        _group("flow table with 1,000 entries", [("floor", 40, 1.0), ("established, 1,000 flows", 90, 2.25)], flows=1000),
        _group("flow table with 1,000,000 entries", [("floor", 40, 1.0), ("established", 200, 5.0)], flows=10**6),
    ]
    got = {t["target"]: (round(t["measured"], 3), t["met"]) for t in suite_dataplane.targets(groups, [])}
    assert got["established ≤ 2.5× floor (same packet)"] == (2.25, True)
    assert got["new flow ≤ 3.5× floor (same packet, insert + delete)"] == (4.0, False)
    assert got["new flow ≤ 3.5× floor (same packet, no insert)"] == (3.0, True)
    assert got["1,000,000 flows ≤ 2× 1,000 flows (same packet)"] == (round(200 / 90, 3), False)


def test_dataplane_target_against_a_baseline_revision():
    groups = [_group("paths (default sizes)", [("floor", 40, 1.0), ("established (flow-table hit)", 99, 2.475),
                                               ("established (flow-table hit), baseline main", 90, 2.25)])]
    got = {t["target"]: (round(t["measured"], 3), t["met"]) for t in suite_dataplane.targets(groups, [])}
    assert got["established ≤ 1.10× baseline main (same packet, same runs)"] == (1.1, True)
    groups[0]["rows"][1]["ns"]["median"] = 100
    got = {t["target"]: t["met"] for t in suite_dataplane.targets(groups, [])}
    assert got["established ≤ 1.10× baseline main (same packet, same runs)"] is False


def test_baseline_sources_come_from_git(tmp_path):
    base = suite_dataplane.baseline_sources("HEAD", tmp_path)
    assert "int xdplb_ingress(struct xdp_md *ctx)" in (base.bpf_dir / "xdplb.c").read_text()
    with pytest.raises(suite_dataplane.BenchError, match="--baseline no-such-rev: git cannot read bpf/"):
        suite_dataplane.baseline_sources("no-such-rev", tmp_path / "x")


# ---- lab suite helpers -----------------------------------------------------------


BACKENDS = {"be1": "10.10.0.11", "be2": "10.10.0.12", "be3": "10.10.0.13"}


def test_bench_pool_is_a_valid_xdplb_pool():
    from xdplb.config import parse_pool

    pool = parse_pool(lab_baselines.xdplb_pool("10.10.0.100", BACKENDS))
    by_name = {s.name: s for s in pool.services}
    assert by_name["iperf"].persistence == "client"        # iperf3's two connections must meet one server
    assert by_name["http"].port == lab_baselines.HTTP_PORT
    assert [str(b.address) for b in by_name["http"].backends] == list(BACKENDS.values())
    assert all(s.health.port == lab_baselines.HEALTH_PORT for s in pool.services)


def test_nft_and_haproxy_configs_name_every_backend():
    rules = lab_baselines.nft_ruleset("t", "10.10.0.100", list(BACKENDS.values()))
    assert "jhash ip saddr mod 3 map { 0 : 10.10.0.11, 1 : 10.10.0.12, 2 : 10.10.0.13 }" in rules
    assert "numgen inc mod 3" in rules and rules.count("counter") == 2
    cfg = lab_baselines.haproxy_lb_cfg("10.10.0.100", BACKENDS)
    assert "bind 10.10.0.100:5201" in cfg and "balance source" in cfg and "server be3 10.10.0.13:8081" in cfg
    assert 'string "be2"' in lab_baselines.responder_cfg("be2")
    with pytest.raises(ValueError, match="backend name"):
        lab_baselines.responder_cfg('be1" \n frontend x')


def _lab_row(mode, gbits, conn, cpu, tso=None):
    def s(v):
        return None if v is None else {"median": v, "low": v, "high": v, "runs": 1}
    return {"mode": mode, "error": None, "stream_gbits": s(gbits), "conn_per_s": s(conn), "cpu_s_per_gb": s(cpu),
            "stream_tso_gbits": s(tso), "wrk_runs": [], "cpu_runs": []}


def test_lab_comparisons_and_targets():
    rows = [_lab_row("direct", 10.0, 10000, 2.0, 40.0), _lab_row("xdplb generic", 9.6, 9000, 2.4, 36.0),
            _lab_row("xdplb native", 9.0, 9500, 2.2), _lab_row("nftables DNAT", 8.0, 8000, 3.0, 30.0),
            _lab_row("HAProxy TCP", 4.0, 9200, 6.0, 20.0)]
    comp = suite_lab.comparisons(rows)
    assert comp["xdplb generic"]["stream_vs_direct"] == pytest.approx(0.96)
    assert comp["xdplb generic"]["stream_tso_vs_direct"] == pytest.approx(0.9)
    assert comp["xdplb native"]["stream_tso_vs_direct"] is None   # native runs without TSO
    assert comp["xdplb generic"]["cpu_extra_over_direct"] == pytest.approx(0.4)
    assert comp["xdplb native vs HAProxy TCP"]["conn"] == pytest.approx(9500 / 9200)
    met = {t["target"]: t["met"] for t in suite_lab.targets(rows)}
    assert met["xdplb generic stream ≥ 95% of direct"] and not met["xdplb native stream ≥ 95% of direct"]
    assert not met["xdplb generic stream ≥ 95% of direct, TSO on"]
    assert "xdplb native stream ≥ 95% of direct, TSO on" not in met
    assert not met["xdplb generic conn/s above HAProxy TCP"] and met["xdplb native conn/s above HAProxy TCP"]
    assert met["xdplb generic CPU/GB below nftables DNAT"]


def test_a_failed_path_has_no_ratios_and_misses_its_targets():
    rows = [_lab_row("direct", 10.0, 10000, 2.0), {"mode": "xdplb native", "error": "RuntimeError: refused"}]
    assert suite_lab.comparisons(rows)["xdplb native"]["stream_vs_direct"] is None
    assert not any(t["met"] for t in suite_lab.targets(rows))
    assert "failed: RuntimeError: refused" in suite_lab.render(
        {"rows": rows, "comparisons": suite_lab.comparisons(rows), "targets": [], "cpu_rate_gbits": None})


def test_lab_row_notes_flag_noise_and_errors():
    row = _lab_row("xdplb generic", 1, 1, 1)
    row["wrk_runs"] = [{"socket_errors": 3}]
    row["cpu_runs"] = [{"noisy": True, "rate_reached": True}, {"noisy": False, "rate_reached": False}]
    row["xdp_mode"] = "generic"
    assert suite_lab.row_notes(row) == ["wrk socket errors 3", "CPU noisy in 1/2 runs",
                                        "fixed rate not reached in 1/2 runs", "XDP generic"]


def test_lab_path_must_have_gone_through_the_balancer():
    suite_lab.check_path_used("xdplb generic", {"forwarded": {"iperf": {"packets": 5}, "http": {"packets": 9}}})
    with pytest.raises(suite_lab.BenchError, match="no forwarded packets"):
        suite_lab.check_path_used("xdplb native", {"forwarded": {"iperf": {"packets": 0}, "http": {"packets": 9}}})
    with pytest.raises(suite_lab.BenchError, match="stayed at zero"):
        suite_lab.check_path_used("nftables DNAT", {"dnat_rule_packets": {"stream": 0, "http": 0}})


# ---- controller suite helpers ----------------------------------------------------


def test_reload_pools_are_valid_and_differ_in_weights():
    from xdplb.config import parse_pool

    lab = SimpleNamespace(vip="10.10.0.100", backends=3, backend_names=lambda: list(BACKENDS),
                          backend_ip=lambda name: BACKENDS[name])
    one, two = (parse_pool(suite_controller.reload_pool(lab, w)) for w in (1, 2))
    assert len(one.services) == suite_controller.RELOAD_SERVICES == 64
    assert {s.port for s in one.services} == set(range(20000, 20064))
    assert one.services[5].backends[0].weight == 1 and two.services[5].backends[0].weight == 2
    assert two.services[5].backends[1].weight == 1


def test_maglev_bench_backends_are_distinct_and_weighted():
    bs = suite_controller.maglev_backends(1000)
    assert len({b.key for b in bs}) == 1000 and {b.weight for b in bs} == {1, 2, 3}
    assert [b.id for b in bs] == list(range(1, 1001))


# ---- command line --------------------------------------------------------------------


def _args(*argv):
    return run._parser().parse_args(list(argv))


def test_defaults_and_quick_counts():
    full = run.settings_from(_args())
    assert (full["repeat"], full["runs"], full["seconds"], full["suites"]) == (1_000_000, 5, 5.0, run.SUITES)
    quick = run.settings_from(_args("--quick", "--suite", "lab", "--runs", "1"))
    assert (quick["repeat"], quick["runs"], quick["seconds"], quick["suites"]) == (100_000, 1, 2.0, ("lab",))


@pytest.mark.parametrize("argv, message", [
    (["--repeat", "0"], "--repeat 0: must be at least 1"),
    (["--runs", "-2"], "--runs -2: must be at least 1"),
    (["--seconds", "0.5"], "--seconds 0.5: must be between 1 and 600"),
])
def test_bad_numbers_are_one_clear_sentence(argv, message):
    with pytest.raises(run.UsageError, match=message):
        run.settings_from(_args(*argv))


def test_out_must_be_a_directory(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert run.main(["--out", str(target)]) == 2
    assert capsys.readouterr().err.strip() == f"bench: --out {target}: exists and is not a directory"
    assert target.read_text() == "x"


def _ns(v):
    return {"median": v, "low": v - 1, "high": v + 1, "runs": 5, "spread": 0.05}


def test_dataplane_report_and_charts_with_a_point_that_does_not_fit(tmp_path):
    def group(title, cases, **meta):
        return {"group": title, "rows": [{"case": c, "ns": _ns(v), "ratio_to_floor": v / 40} for c, v in cases], **meta}

    groups = [group("paths (default sizes)", [("floor", 40), ("established (flow-table hit)", 100)]),
              group("flow table with 1,000 entries", [("floor", 40), ("established, 1,000 flows", 100)], flows=1000),
              group("flow table with 100,000 entries", [("floor", 40), ("established, 100,000 flows", 110)], flows=10**5)]
    single = [{"case": "established, random one of 1,000 flows", "calls": 9, "ns": _ns(500), "floor_ns": _ns(150),
               "ratio_to_floor": 3.3, "flows": 1000},
              {"case": "established, random one of 100,000 flows", "calls": 9, "ns": _ns(700), "floor_ns": _ns(150),
               "ratio_to_floor": 4.7, "flows": 10**5}]
    scale = [{"services": 1, "backends_per_service": 10, "floor_ns": 40, "established_ns": 100, "new_flow_ns": 400},
             {"services": 512, "backends_per_service": 1000, "skipped": "needs 512,000 backend ids; ..."}]
    result = {"groups": groups, "single_shot": single, "scale": scale,
              "targets": suite_dataplane.targets(groups, single)}
    text = suite_dataplane.render(result)
    assert "512 service(s) × 1000 backends: not measured, needs 512,000 backend ids" in text
    assert "100,000 flows ≤ 2× 1,000 flows (random flow, 1 run per call)" in text
    charts = suite_dataplane.draw(result, "kernel x", tmp_path)
    assert [c.name for c in charts] == ["dataplane_paths.png", "dataplane_scale.png", "dataplane_flow_table.png"]
    assert all(c.read_bytes()[:4] == b"\x89PNG" for c in charts)


# ---- which backends answer ----------------------------------------------------

class _AnsweringLab:
    """Stands in for the lab's `run`: each curl gets the next scripted responder."""

    def __init__(self, answers):
        self.answers, self.calls = list(answers), 0

    def backend_names(self):
        return ["be1", "be2", "be3"]

    def backend_ip(self, name):
        return f"10.10.0.1{name[-1]}"

    def run(self, host, *argv, check=True):
        assert host == "client" and argv[0] == "curl"
        self.calls += 1
        return SimpleNamespace(returncode=0, stdout=self.answers.pop(0) + "\n")


def _lab_bench(answers):
    lab = _AnsweringLab(answers)
    return lab, suite_lab.LabBench(lab, Path("/nonexistent"), suite_lab.Options(1, 1.0, True, Path("/nonexistent")))


def test_responders_go_on_past_nine_until_a_second_backend_answers():
    lab, bench = _lab_bench(["be2"] * 12 + ["be1"] + ["be3"] * 40)
    assert bench.responders_seen("10.10.0.100", backends_wanted=2) == {"be2": 12, "be1": 1}
    assert lab.calls == 13


def test_responders_stop_after_nine_when_enough_answered_and_at_the_cap_otherwise():
    lab, bench = _lab_bench(["be1", "be2", "be3"] * 20)
    assert sum(bench.responders_seen("10.10.0.100", backends_wanted=2).values()) == 9
    lab, bench = _lab_bench(["be2"] * 60)
    assert bench.responders_seen("10.10.0.100", backends_wanted=2) == {"be2": 30}
    lab, bench = _lab_bench(["be1"] * 60)
    assert bench.responders_seen("10.10.0.11", backends_wanted=1) == {"be1": 9}
