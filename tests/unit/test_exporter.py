"""The Prometheus collector and its HTTP server, with a fake map source: no root, no bcc.

The source is what the daemon offers the exporter (pool, applied ids, health,
telemetry, mode, data plane); its data plane is a fake whose counters the
test sets per map slot, so every exported number can be checked against the
slot it must come from. Assertions go through a private CollectorRegistry's
get_sample_value, and through real HTTP for the server.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from xdplb import __version__, plan
from xdplb.config import parse_pool
from xdplb.dataplane import Counters, Stats
from xdplb.desired import desired_state
from xdplb.config import parse_metrics_address as parse_address
from xdplb.exporter import Exporter, ExporterError, registry_for, serve
from xdplb.health_fsm import Health, State
from xdplb.structs import ACTIONS, EVENTS, REASONS
from xdplb.telemetry import Telemetry

POOL = """
[xdplb]
maglev_size = 251

[[service]]
name = "dicom"
vip = "10.10.0.100"
port = 104
  [[service.backend]]
  name = "pacs-a"
  address = "10.10.0.11"
  weight = 2
  [[service.backend]]
  name = "pacs-b"
  address = "10.10.0.12"
  weight = 0
  [[service.backend]]
  name = "pacs-c"
  address = "10.10.0.13"
  weight = 1

[[service]]
name = "web"
vip = "10.10.0.100"
port = 80
  [[service.backend]]
  name = "pacs-a"
  address = "10.10.0.11"
  weight = 1
  [[service.backend]]
  name = "pacs-c"
  address = "10.10.0.13"
  weight = 1
"""
A, B, C = (ipaddress.IPv4Address(f"10.10.0.{i}") for i in (11, 12, 13))


class FakeMaps:
    """read_stats from dicts the test sets: service id / backend id -> Counters."""

    def __init__(self):
        self.services: dict[int, Counters] = {}
        self.backends: dict[int, Counters] = {}
        self.actions = {a: 0 for a in ACTIONS}
        self.not_forwarded = {r: 0 for r in REASONS}
        self.events = {e: 0 for e in EVENTS}
        self.reads = 0
        self.fail: Exception | None = None

    def read_stats(self, service_ids, backend_ids) -> Stats:
        self.reads += 1
        if self.fail:
            raise self.fail
        return Stats({i: self.services.get(i, Counters()) for i in service_ids},
                     {i: self.backends.get(i, Counters()) for i in backend_ids},
                     dict(self.actions), dict(self.not_forwarded), dict(self.events))


def make_source(metrics: str = "127.0.0.1:9742"):
    pool = parse_pool(POOL.replace("maglev_size = 251", f'maglev_size = 251\nmetrics = "{metrics}"'), "/etc/xdplb/t.toml")
    health = {("dicom", A): Health(State.UP, since=1700000000.0), ("dicom", B): Health(State.DOWN, since=1700000100.0),
              ("dicom", C): Health(State.UP, since=1700000000.0), ("web", A): Health(State.UP, since=1700000000.0),
              ("web", C): Health()}  # web/pacs-c not probed yet: unknown
    macs = {a: bytes([2, 0, 10, 10, 0, a.packed[3]]) for a in (A, B, C)}
    applied = plan.plan(plan.Applied(), desired_state(pool, health, macs, b"\x02\0\0\0\0\1")).applied
    telemetry = Telemetry()
    # Telemetry is keyed by (service, backend address), as health is; metrics carry the name.
    telemetry.probe("dicom", str(A), "tcp", 0.002, True, "ok", "connect succeeded")
    telemetry.probe("dicom", str(A), "tcp", 0.030, True, "ok", "connect succeeded")
    telemetry.probe("dicom", str(B), "tcp", 0.5, False, "timeout", "connect timed out")
    telemetry.probe("dicom", str(B), "tcp", 0.001, False, "refused", "connect refused")
    telemetry.probe("dicom", str(B), "tcp", 0.001, False, "refused", "connect refused")
    telemetry.transition("dicom", str(B), "up", "down", "connect refused", 1700000100.0)
    telemetry.rebuilt(0.004)
    telemetry.reload("rejected")
    return SimpleNamespace(pool=pool, applied=applied, health=health, telemetry=telemetry, mode="generic",
                           ifname="eth7", dp=FakeMaps(), drained={("web", A)})


def backend_id(src, service: str, address) -> int:
    return src.applied.backends[(service, str(address))].id


def service_id(src, service: str) -> int:
    return src.applied.services[service].id


@pytest.fixture
def src():
    return make_source()


def value(registry, name: str, **labels):
    return registry.get_sample_value(name, labels)


def test_traffic_counters_come_from_each_backends_own_map_slot(src):
    for n, address in enumerate((A, B, C), start=1):
        src.dp.backends[backend_id(src, "dicom", address)] = Counters(100 * n, 1000 * n, 10 * n)
        if address != B:  # B is not in web
            src.dp.backends[backend_id(src, "web", address)] = Counters(7 * n, 70 * n, n)
    src.dp.services[service_id(src, "dicom")] = Counters(600, 6000, 60)
    src.dp.services[service_id(src, "web")] = Counters(28, 280, 4)
    reg = registry_for(src)

    assert value(reg, "xdplb_service_packets_total", service="dicom") == 600
    assert value(reg, "xdplb_service_bytes_total", service="dicom") == 6000
    assert value(reg, "xdplb_service_packets_total", service="web") == 28
    for n, name in enumerate(("pacs-a", "pacs-b", "pacs-c"), start=1):
        assert value(reg, "xdplb_backend_packets_total", service="dicom", backend=name) == 100 * n
        assert value(reg, "xdplb_backend_bytes_total", service="dicom", backend=name) == 1000 * n
        assert value(reg, "xdplb_backend_flows_total", service="dicom", backend=name) == 10 * n
    assert value(reg, "xdplb_backend_packets_total", service="web", backend="pacs-c") == 21
    assert value(reg, "xdplb_backend_bytes_total", service="web", backend="pacs-a") == 70
    assert value(reg, "xdplb_backend_packets_total", service="web", backend="pacs-b") is None  # not in web


def test_health_weight_and_drain_per_backend(src):
    reg = registry_for(src)
    up = {(s, b): value(reg, "xdplb_backend_up", service=s, backend=b)
          for s, b in [("dicom", "pacs-a"), ("dicom", "pacs-b"), ("dicom", "pacs-c"), ("web", "pacs-a"), ("web", "pacs-c")]}
    assert up == {("dicom", "pacs-a"): 1, ("dicom", "pacs-b"): 0, ("dicom", "pacs-c"): 1,
                  ("web", "pacs-a"): 1, ("web", "pacs-c"): 0}  # unknown is not up
    assert value(reg, "xdplb_backend_weight", service="dicom", backend="pacs-a") == 2
    assert value(reg, "xdplb_backend_weight", service="dicom", backend="pacs-b") == 0
    # Drained: weight 0 in the pool, or drained by command (the daemon's `drained` set).
    assert value(reg, "xdplb_backend_drained", service="dicom", backend="pacs-b") == 1
    assert value(reg, "xdplb_backend_drained", service="web", backend="pacs-a") == 1
    assert value(reg, "xdplb_backend_drained", service="dicom", backend="pacs-a") == 0
    assert value(reg, "xdplb_backend_drained", service="web", backend="pacs-c") == 0
    assert value(reg, "xdplb_backend_health_changed_timestamp_seconds", service="dicom", backend="pacs-b") == 1700000100.0
    src.drained = set()
    assert value(registry_for(src), "xdplb_backend_drained", service="web", backend="pacs-a") == 0


def test_probe_histogram_failures_and_transitions(src):
    reg = registry_for(src)
    labels = dict(service="dicom", backend="pacs-a", check="tcp")
    assert value(reg, "xdplb_health_probe_duration_seconds_count", **labels) == 2
    assert value(reg, "xdplb_health_probe_duration_seconds_sum", **labels) == pytest.approx(0.032)
    assert value(reg, "xdplb_health_probe_duration_seconds_bucket", le="0.0025", **labels) == 1
    assert value(reg, "xdplb_health_probe_duration_seconds_bucket", le="0.05", **labels) == 2
    assert value(reg, "xdplb_health_probe_duration_seconds_bucket", le="+Inf", **labels) == 2
    assert value(reg, "xdplb_health_probe_duration_seconds_count", service="dicom", backend="pacs-b", check="tcp") == 3
    assert value(reg, "xdplb_health_probe_failures_total", service="dicom", backend="pacs-b", reason="refused") == 2
    assert value(reg, "xdplb_health_probe_failures_total", service="dicom", backend="pacs-b", reason="timeout") == 1
    assert value(reg, "xdplb_health_transitions_total", service="dicom", backend="pacs-b", to="down") == 1
    # Transitions that have not happened yet are there as zeros, so the first shows as an increase.
    assert value(reg, "xdplb_health_transitions_total", service="dicom", backend="pacs-a", to="down") == 0
    assert value(reg, "xdplb_health_transitions_total", service="web", backend="pacs-c", to="up") == 0


def test_data_plane_counters_rebuilds_reloads_and_info(src):
    src.dp.actions.update(tx=900, **{"pass": 40}, drop=3)
    src.dp.not_forwarded.update(not_service=40, fragment=2, no_backend=1)
    src.dp.events.update(flow_new=60, flow_hit=840, flow_miss=7, flood_no_entry=5)
    reg = registry_for(src)
    assert value(reg, "xdplb_xdp_actions_total", action="tx") == 900
    assert value(reg, "xdplb_xdp_actions_total", action="pass") == 40
    assert value(reg, "xdplb_xdp_actions_total", action="aborted") == 0
    assert {a: value(reg, "xdplb_xdp_actions_total", action=a) for a in ACTIONS}.keys() == set(ACTIONS)
    assert value(reg, "xdplb_packets_not_forwarded_total", reason="fragment") == 2
    assert value(reg, "xdplb_packets_not_forwarded_total", reason="no_backend") == 1
    assert value(reg, "xdplb_packets_not_forwarded_total", reason="malformed") == 0
    assert value(reg, "xdplb_events_total", event="flow_hit") == 840
    assert value(reg, "xdplb_events_total", event="flood_no_entry") == 5
    assert value(reg, "xdplb_flow_misses_total") == 7
    assert value(reg, "xdplb_table_rebuild_seconds_count") == 1
    assert value(reg, "xdplb_table_rebuild_seconds_bucket", le="0.005") == 1
    assert value(reg, "xdplb_table_rebuild_seconds_bucket", le="0.0025") == 0
    assert value(reg, "xdplb_config_reloads_total", result="rejected") == 1
    assert value(reg, "xdplb_config_reloads_total", result="applied") == 0
    assert value(reg, "xdplb_info", version=__version__, interface="eth7", mode="generic") == 1


def test_every_scrape_reads_the_maps_afresh_and_keeps_nothing(src):
    reg = registry_for(src)
    bid = backend_id(src, "dicom", A)
    src.dp.backends[bid] = Counters(5, 500, 1)
    assert value(reg, "xdplb_backend_packets_total", service="dicom", backend="pacs-a") == 5
    reads = src.dp.reads
    src.dp.backends[bid] = Counters(9, 900, 2)
    assert value(reg, "xdplb_backend_packets_total", service="dicom", backend="pacs-a") == 9
    assert src.dp.reads == reads + 1
    # A slot zeroed for a re-used id shows zero: nothing is remembered or added up across scrapes.
    src.dp.backends[bid] = Counters()
    assert value(reg, "xdplb_backend_packets_total", service="dicom", backend="pacs-a") == 0
    # A reload that removes a backend removes its series at the next scrape.
    src.pool = parse_pool(POOL.replace('  [[service.backend]]\n  name = "pacs-c"\n  address = "10.10.0.13"\n  weight = 1\n\n[[service]]',
                                       "\n[[service]]"))
    assert value(reg, "xdplb_backend_up", service="dicom", backend="pacs-c") is None
    assert value(reg, "xdplb_backend_up", service="web", backend="pacs-c") == 0


# ---- HTTP ------------------------------------------------------------------------


def fetch(url: str, accept: str | None = None) -> tuple[int, str, str]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, reply.headers["Content-Type"], reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


async def get(url: str, accept: str | None = None):
    return await asyncio.to_thread(fetch, url, accept)


def test_http_serves_metrics_in_both_formats_and_404_elsewhere(src):
    src.dp.backends[backend_id(src, "web", C)] = Counters(3, 300, 1)

    async def scenario():
        exporter = await Exporter(src, "127.0.0.1:0").start()
        try:
            base = f"http://127.0.0.1:{exporter.port}"
            status, ctype, body = await get(base + "/metrics")
            om_status, om_type, om_body = await get(base + "/metrics", "application/openmetrics-text; version=1.0.0")
            missing = await get(base + "/nothing")
        finally:
            await exporter.stop()
        return status, ctype, body, om_status, om_type, om_body, missing, exporter.port

    status, ctype, body, om_status, om_type, om_body, missing, port = asyncio.run(scenario())
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(body) for s in fam.samples}
    assert samples[("xdplb_backend_packets_total", (("backend", "pacs-c"), ("service", "web")))] == 3
    assert om_status == 200 and om_type.startswith("application/openmetrics-text")
    assert om_body.rstrip().endswith("# EOF")
    assert missing[0] == 404
    with pytest.raises(OSError):  # stopped: nothing listens any more
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_ipv6_loopback_address():
    src = make_source()

    async def scenario():
        exporter = await Exporter(src, "[::1]:0").start()
        try:
            return await get(f"http://[::1]:{exporter.port}/metrics")
        finally:
            await exporter.stop()

    status, _ctype, body = asyncio.run(scenario())
    assert status == 200 and "xdplb_backend_up" in body


def test_a_failing_map_read_answers_500_and_the_server_keeps_serving(src, caplog):
    async def scenario():
        exporter = await Exporter(src, "127.0.0.1:0").start()
        try:
            src.dp.fail = OSError("bpf_map_lookup_elem failed")
            first = await get(f"http://127.0.0.1:{exporter.port}/metrics")
            src.dp.fail = None
            second = await get(f"http://127.0.0.1:{exporter.port}/metrics")
        finally:
            await exporter.stop()
        return first, second

    first, second = asyncio.run(scenario())
    assert first[0] == 500 and "bpf_map_lookup_elem failed" in first[2]
    assert second[0] == 200
    assert "metrics scrape failed: bpf_map_lookup_elem failed" in caplog.text


def test_a_busy_port_is_one_clear_error_and_serve_returns_none(caplog):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        src = make_source(f"127.0.0.1:{port}")

        async def scenario():
            with pytest.raises(ExporterError) as err:
                await Exporter(src, f"127.0.0.1:{port}").start()
            with caplog.at_level(logging.ERROR, logger="xdplb"):
                served = await serve(src, src.pool)
            return str(err.value), served

        message, served = asyncio.run(scenario())
    assert message == f"cannot serve metrics on 127.0.0.1:{port}: address already in use"
    assert served is None
    assert (f"cannot serve metrics on 127.0.0.1:{port}: address already in use ([xdplb] metrics in "
            f"/etc/xdplb/t.toml); balancing continues without the metrics exporter") in caplog.text


def test_empty_metrics_setting_serves_nothing():
    src = make_source("")
    assert asyncio.run(serve(src, src.pool)) is None


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:9742", ("127.0.0.1", 9742)),
    ("[::1]:9742", ("::1", 9742)),
    ("localhost:80", ("localhost", 80)),
    ("0.0.0.0:9742", ("0.0.0.0", 9742)),
])
def test_parse_address(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["9742", "[::1]9742", "host.example:9742", "127.0.0.1:", "127.0.0.1:99999"])
def test_parse_address_rejects(text):
    with pytest.raises(ValueError, match="metrics address"):
        parse_address(text)


def test_icmp_frag_needed_forwarding_is_exported(src):
    src.dp.events.update(icmp_too_big=7)
    assert value(registry_for(src), "xdplb_events_total", event="icmp_too_big") == 7


def test_a_scrape_reads_the_maps_off_the_event_loop(src):
    # Issue 11 point 2: per-CPU map reads cost a syscall per id; a scrape must
    # not hold the daemon's loop (and its probes) while they run.
    import threading

    readers = []
    real = src.dp.read_stats

    def read_stats(service_ids, backend_ids):
        readers.append(threading.current_thread() is threading.main_thread())
        return real(service_ids, backend_ids)

    src.dp.read_stats = read_stats

    async def scenario():
        exporter = await Exporter(src, "127.0.0.1:0").start()
        try:
            return await get(f"http://127.0.0.1:{exporter.port}/metrics")
        finally:
            await exporter.stop()

    code, _ctype, body = asyncio.run(scenario())
    assert code == 200 and 'xdplb_backend_up{backend="pacs-a",service="dicom"} 1.0' in body
    assert readers == [False]


# ---- several nodes: announcements, placement fingerprints, up backends -------------


def test_node_metrics_show_announcements_fingerprints_and_up_backends(src):
    from xdplb.announce import VipDecision, placement_fingerprint

    vip = str(src.pool.services[0].vip)
    reg = registry_for(src)
    assert value(reg, "xdplb_vip_announced", vip=vip) == 0   # no announcer: nothing announced
    assert value(reg, "xdplb_node_draining") == 0
    src.announcer = SimpleNamespace(decisions={src.pool.services[0].vip: VipDecision(True, "2 backend(s) up")})
    src.node_draining = True
    reg = registry_for(src)
    assert value(reg, "xdplb_vip_announced", vip=vip) == 1
    assert value(reg, "xdplb_node_draining") == 1
    for svc in src.pool.services:
        fp = placement_fingerprint(src.pool.settings, svc)
        assert value(reg, "xdplb_placement_info", service=svc.name, vip=str(svc.vip), fingerprint=fp) == 1
    # dicom: pacs-a and pacs-c up, pacs-b down; web: pacs-c not probed yet.
    assert value(reg, "xdplb_backends_up_info", service="dicom", vip=vip, up=f"{A},{C}") == 1
    assert value(reg, "xdplb_backends_up_info", service="web", vip=vip, up=str(A)) == 1


IPV6_POOL = """
[[service]]
name = "dicom6"
vip = "FD00:10:10:0:0::0100"
port = 104
  [[service.backend]]
  name = "pacs-a"
  address = "fd00:10:10::0011"
  [[service.backend]]
  name = "pacs-b"
  address = "FD00:10:10:0000:0000:0000:0000:0012"
"""


def _registry(pool_text: str, health: dict, macs: dict):
    pool = parse_pool(pool_text, "/etc/xdplb/t.toml")
    applied = plan.plan(plan.Applied(), desired_state(pool, health, macs, b"\x02\0\0\0\0\1")).applied
    return registry_for(SimpleNamespace(pool=pool, applied=applied, health=health, telemetry=Telemetry(),
                                        mode="generic", ifname="eth7", dp=FakeMaps(), drained=set()))


A6, B6 = ipaddress.IPv6Address("fd00:10:10::11"), ipaddress.IPv6Address("fd00:10:10::12")


def test_labels_carry_ipv6_addresses_as_rfc_5952_writes_them():
    """The pool spells the IPv6 addresses three ways; the labels as `ip` and
    every other node print them."""
    reg = _registry(IPV6_POOL, {("dicom6", A6): Health(State.UP, since=1.0),
                                ("dicom6", B6): Health(State.DOWN, since=2.0)},
                    {A6: b"\x02\0\0\0\0\x0b", B6: b"\x02\0\0\0\0\x0c"})
    assert value(reg, "xdplb_service_info", service="dicom6", vip="fd00:10:10::100", port="104",
                 protocol="tcp") == 1
    assert value(reg, "xdplb_backend_info", service="dicom6", backend="pacs-a", address="fd00:10:10::11") == 1
    assert value(reg, "xdplb_backend_info", service="dicom6", backend="pacs-b", address="fd00:10:10::12") == 1
    assert value(reg, "xdplb_backend_up", service="dicom6", backend="pacs-b") == 0


def test_ipv4_services_and_backends_carry_their_addresses_too(src):
    reg = registry_for(src)
    assert value(reg, "xdplb_service_info", service="dicom", vip="10.10.0.100", port="104", protocol="tcp") == 1
    assert value(reg, "xdplb_service_info", service="web", vip="10.10.0.100", port="80", protocol="tcp") == 1
    assert value(reg, "xdplb_backend_info", service="web", backend="pacs-c", address="10.10.0.13") == 1


DUAL_STACK = """
[[service]]
name = "dicom"
vip = "10.10.0.100"
port = 104
  [[service.backend]]
  name = "pacs-a"
  address = "10.10.0.11"
  [[service.backend]]
  name = "pacs-b"
  address = "10.10.0.12"
""" + IPV6_POOL


def test_labels_carry_addresses_as_rfc_5952_writes_them_for_a_dual_stack_pool():
    """The same PACS behind an IPv4 and an IPv6 VIP; the pool spells the IPv6
    addresses three ways, the labels as `ip` and every other node print them."""
    health = {("dicom", A): Health(State.UP, since=1.0), ("dicom", B): Health(State.UP, since=1.0),
              ("dicom6", A6): Health(State.UP, since=1.0), ("dicom6", B6): Health(State.DOWN, since=2.0)}
    macs = {A: b"\x02\0\0\0\0\x0b", B: b"\x02\0\0\0\0\x0c", A6: b"\x02\0\0\0\0\x0b", B6: b"\x02\0\0\0\0\x0c"}
    reg = _registry(DUAL_STACK, health, macs)
    assert value(reg, "xdplb_service_info", service="dicom6", vip="fd00:10:10::100", port="104",
                 protocol="tcp") == 1
    assert value(reg, "xdplb_service_info", service="dicom", vip="10.10.0.100", port="104", protocol="tcp") == 1
    assert value(reg, "xdplb_backend_info", service="dicom6", backend="pacs-a", address="fd00:10:10::11") == 1
    assert value(reg, "xdplb_backend_info", service="dicom6", backend="pacs-b", address="fd00:10:10::12") == 1
    assert value(reg, "xdplb_backend_info", service="dicom", backend="pacs-b", address="10.10.0.12") == 1
    # The two families' verdicts are their own: pacs-b is down on IPv6 only.
    assert value(reg, "xdplb_backend_up", service="dicom6", backend="pacs-b") == 0
    assert value(reg, "xdplb_backend_up", service="dicom", backend="pacs-b") == 1
