"""The TLS tier in `xdplb status` and the exporter: HAProxy's per-backend counters, the
followed verdicts and each certificate's time left."""
from __future__ import annotations

import ipaddress
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from xdplb import plan, status
from xdplb.cli import _render_status
from xdplb.config import parse_pool
from xdplb.dataplane import Stats
from xdplb.desired import desired_state
from xdplb.exporter import registry_for
from xdplb.health_fsm import Health, State
from xdplb.telemetry import Telemetry
from xdplb.tls import inspect
from xdplb.tlstier import parse_show_stat

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for certs.py

from certs import make_cert  # noqa: E402

A, B = ipaddress.IPv4Address("10.10.0.11"), ipaddress.IPv4Address("10.10.0.12")

# The first columns of Debian's HAProxy 2.6 `show stat`, as it printed them for two
# servers without checks (one in maintenance), with made-up counters.
SHOW_STAT = """\
# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,weight
synapse-https,FRONTEND,,,2,5,9986,40,5000,900000,0,0,0,,,,,OPEN,
synapse-https,pacs-a,0,0,2,3,,31,4200,800000,,0,,1,2,0,0,no check,3
synapse-https,pacs-b,0,0,0,1,,9,800,100000,,0,,0,0,0,0,MAINT,1
synapse-https,BACKEND,0,0,2,5,999,40,5000,900000,0,0,,1,2,0,0,UP,3
"""

POOL = """\
[[service]]
name = "synapse-dicom"
vip = "10.10.0.100"
port = 104
  [[service.backend]]
  name = "pacs-a"
  address = "10.10.0.11"
  [[service.backend]]
  name = "pacs-b"
  address = "10.10.0.12"

[[service]]
name = "synapse-https"
vip = "10.10.0.100"
port = 443
  [service.tls]
  certificate = "{cert}"
  backend_protocol = "http"
  backend_port = 8042
  health_from = "synapse-dicom"
  [[service.backend]]
  name = "pacs-a"
  address = "10.10.0.11"
  weight = 3
  [[service.backend]]
  name = "pacs-b"
  address = "10.10.0.12"
"""


def test_parse_show_stat_keeps_servers_only():
    assert parse_show_stat(SHOW_STAT) == {
        ("synapse-https", "pacs-a"): {"status": "no check", "current": 2, "connections": 31, "bytes_in": 4200,
                                      "bytes_out": 800000, "connect_errors": 1, "response_errors": 2},
        ("synapse-https", "pacs-b"): {"status": "MAINT", "current": 0, "connections": 9, "bytes_in": 800,
                                      "bytes_out": 100000, "connect_errors": 0, "response_errors": 0},
    }
    assert parse_show_stat("") == {} and parse_show_stat("Unknown command\n") == {}


class FakeMaps:
    def read_stats(self, service_ids, backend_ids) -> Stats:
        return Stats({}, {}, {}, {}, {})


@pytest.fixture
def source(tmp_path):
    pem = make_cert(tmp_path, "pacs", days=20)
    pool = parse_pool(POOL.format(cert=pem), "/etc/xdplb/pacs.toml")
    health = {("synapse-dicom", A): Health(State.UP, since=1700000000.0),
              ("synapse-dicom", B): Health(State.DOWN, since=1700000100.0, reason="C-ECHO rejected")}
    applied = plan.plan(plan.Applied(), desired_state(pool, health, {A: b"\2" * 6, B: b"\2" * 6}, b"\0" * 6)).applied
    reads = []
    telemetry = Telemetry()
    telemetry.probe("synapse-dicom", str(B), "dicom", 0.004, False, "rejected", "C-ECHO rejected")
    tier = SimpleNamespace(running=True, counters={}, certificates=(("synapse-https", inspect(pem, time.time())),))
    tier.refresh_counters = lambda: (reads.append(1), setattr(tier, "counters", parse_show_stat(SHOW_STAT)))
    return SimpleNamespace(pool=pool, applied=applied, health=health, telemetry=telemetry, mode="generic",
                           ifname="eth7", dp=FakeMaps(), drained=set(), tls=tier, reads=reads, pem=pem)


def test_rows_carry_the_followed_verdicts_and_haproxys_counters(source):
    stats = status.read_stats(source)
    assert source.reads == [1]       # HAProxy's counters are read with the maps', not kept from before
    dicom, https = status.rows(source, stats)
    assert "tls" not in dicom and dicom["id"] is not None
    assert https["id"] is None       # not in the XDP tables
    assert [(b["name"], b["health"], b["tls"]["status"], b["tls"]["connections"]) for b in https["backends"]] == \
        [("pacs-a", "up", "no check", 31), ("pacs-b", "down", "MAINT", 9)]
    assert https["backends"][1]["reason"] == "C-ECHO rejected"
    assert (https["backends"][1]["probe_ok"], https["backends"][1]["probe_seconds"]) == (False, 0.004)
    tls = https["tls"]
    assert (tls["backend_protocol"], tls["backend_port"], tls["health_from"], tls["haproxy"]) == \
        ("http", 8042, "synapse-dicom", True)
    (cert,) = tls["certificates"]
    assert cert["path"] == source.pem and cert["subject"] == "CN=pacs"
    assert 19 * 86400 < cert["expires_in"] <= 20 * 86400


def test_status_text_shows_the_tls_tier(source):
    st = {"version": "x", "interface": "eth7", "mode": "generic", "pid": 1, "pool": "/etc/xdplb/pacs.toml",
          "services": status.rows(source, status.read_stats(source)), "actions": {}, "not_forwarded": {}}
    text = _render_status(st)
    assert "  tls: HAProxy running, cleartext http to port 8042, verdicts of synapse-dicom" in text
    assert f"  certificate {source.pem} serial " in text and "expires in 20 days" in text
    lines = text.splitlines()
    row = next(line for line in lines if line.startswith("  pacs-b ") and "MAINT" in line)
    assert row.split()[-6:] == ["MAINT", "0", "9", "800", "100000", "0"]


def test_exporter_tls_families(source):
    registry = registry_for(source)
    get = registry.get_sample_value
    expiry = get("xdplb_tls_certificate_expiry_seconds", {"service": "synapse-https", "certificate": source.pem})
    assert 19 * 86400 < expiry <= 20 * 86400
    a = {"service": "synapse-https", "backend": "pacs-a"}
    assert get("xdplb_tls_backend_connections_total", a) == 31
    assert get("xdplb_tls_backend_current_connections", a) == 2
    assert get("xdplb_tls_backend_bytes_total", {**a, "direction": "out"}) == 800000
    assert get("xdplb_tls_backend_errors_total", {**a, "kind": "response"}) == 2
    assert get("xdplb_tls_haproxy_up", {"service": "synapse-https"}) == 1
    assert get("xdplb_backend_up", a) == 1       # the followed verdict
    assert get("xdplb_backend_up", {"service": "synapse-https", "backend": "pacs-b"}) == 0
