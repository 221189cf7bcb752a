"""Observability end to end: the exporter's counters against traffic that really
passed, a real Prometheus evaluating the shipped dashboard and alert rules,
and the rules' own checks.

The lab tests run the real `xdplb attach` on the lb namespace's veth, where
`--mode auto` picks generic XDP, with real backends and real clients. The
exporter listens on 127.0.0.1:9742 inside the lb namespace; Prometheus
(Debian's binary) runs in that namespace too and scrapes it every second.
The lab has its own prefix (xm1, xm2, ...), so it never meets another module's.
"""
from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import lab as labtool
from lab_xdplb import Balancer, backend_health, pool_text, running_balancer
from prometheus_lab import Prometheus, render_panels

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for certs.py

from certs import make_cert  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "tools" / "dashboards" / "xdplb.json"
ALERTS = REPO / "tools" / "dashboards" / "alerts.yml"
CLIENT_TOOL = REPO / "tools" / "lab_client.py"
PYTHON = "/usr/bin/python3"

INTERVAL, TIMEOUT, RISE, FALL = 1.0, 0.5, 2, 2
METRICS = "127.0.0.1:9742"
ETHERNET, IPV4, UDP = 14, 20, 8

# A UDP service whose only backend never passes its health check (nothing
# listens on port 9999): a service with no healthy backend, whose packets
# are dropped as no_backend. The alert rules need one to have data.
DARK_SERVICE = """
[[service]]
name = "dark"
vip = "{vip}"
port = 6000
protocol = "udp"
  [service.health]
  port = 9999
  interval = 1.0
  timeout = 0.5
  [[service.backend]]
  name = "be1"
  address = "{address}"
  weight = 1
"""

# The web service again, as HTTPS on VIP:8443 through the TLS tier (HAProxy), following
# web's verdicts. Its certificate expires in 10 days: the expiry alert has data.
TLS_SERVICE = """
[[service]]
name = "web-tls"
vip = "{vip}"
port = 8443
  [service.tls]
  certificate = "{cert}"
  backend_protocol = "http"
  backend_port = 80
  health_from = "web"
{backends}"""
CERT_DAYS = 10

# Sends COUNT datagrams of SIZE bytes to VIP:PORT, the i-th from source port
# FIRST+i (so each is a new flow), and prints the backend named in each echo.
SENDER = r"""
import socket, sys
vip, port, count, size, first = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
for i in range(count):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", first + i))
        s.settimeout(2.0)
        s.sendto(b"m" * size, (vip, port))
        try:
            print(s.recv(256).decode().split()[0], flush=True)
        except OSError as exc:
            print("fail", exc, flush=True)
"""

# Fire and forget: COUNT datagrams from one socket (for the dark service).
BLAST = r"""
import socket, sys
vip, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    for _ in range(count):
        s.sendto(b"d" * 64, (vip, port))
"""

# Holds a TCP port in the namespace it runs in until killed.
HOLDER = r"""
import socket, sys, time
s = socket.socket()
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen()
print("holding", flush=True)
time.sleep(300)
"""


@pytest.fixture(scope="module")
def lab():
    """This module's own lab (3 backends), torn down after the module."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    with labtool.temporary_lab("xm") as the_lab:
        yield the_lab


def metrics_pool(lab, cert_dir: Path, metrics: str = METRICS) -> str:
    text = pool_text(lab, INTERVAL, TIMEOUT, RISE, FALL)
    assert 'metrics = ""' in text, "lab_xdplb's pool template changed: set [xdplb] metrics some other way"
    backends = "".join(f'  [[service.backend]]\n  name = "{n}"\n  address = "{lab.backend_ip(n)}"\n'
                       for n in lab.backend_names())
    return (text.replace('metrics = ""', f'metrics = "{metrics}"', 1)
            + DARK_SERVICE.format(vip=lab.vip, address=lab.backend_ip("be1"))
            + TLS_SERVICE.format(vip=lab.vip, cert=make_cert(cert_dir, "web", days=CERT_DAYS), backends=backends))


@pytest.fixture(scope="module")
def pool_file(lab, tmp_path_factory):
    path = tmp_path_factory.mktemp("pool") / "pool.toml"
    path.write_text(metrics_pool(lab, path.parent))
    return path


@pytest.fixture(scope="module")
def balancer(lab, pool_file, tmp_path_factory):
    with running_balancer(lab, pool_file, tmp_path_factory.mktemp("xdplb")) as b:
        yield b


def scrape(lab, address: str = METRICS) -> dict:
    """{(metric sample name, ((label, value), ...)): value} from the exporter, read in the lb namespace."""
    body = lab.run("lb", "curl", "-sS", "--max-time", "5", f"http://{address}/metrics").stdout
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def sample(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def run_client(lab, script: str, *args, timeout: float = 120) -> list[str]:
    out = lab.run("client", PYTHON, "-c", script, *map(str, args), timeout=timeout)
    return out.stdout.splitlines()


def lab_client(lab, *args, timeout: float = 120) -> list[str]:
    return lab.run("client", PYTHON, CLIENT_TOOL, *map(str, args), check=False, timeout=timeout).stdout.splitlines()


# ---- a busy metrics port -------------------------------------------------------------


@pytest.mark.root
@pytest.mark.lab
def test_busy_metrics_port_is_one_clear_error_and_balancing_goes_on(lab, tmp_path):
    """Generic mode on veth. Another process holds the metrics port: xdplb says
    so in one sentence at start, and still balances."""
    holder = lab.popen("lb", PYTHON, "-c", HOLDER, 9743, stdout=subprocess.PIPE, text=True)
    b = None
    try:
        assert holder.stdout.readline().strip() == "holding"
        pool = tmp_path / "pool.toml"
        pool.write_text(metrics_pool(lab, tmp_path, "127.0.0.1:9743"))
        b = Balancer(lab, pool, tmp_path / "run", tmp_path / "xdplb.log").start()
        st = b.wait_ready()
        assert st["mode"] == "generic"
        assert (f"cannot serve metrics on 127.0.0.1:9743: address already in use ([xdplb] metrics in {pool}); "
                f"balancing continues without the metrics exporter") in b.log()
        replies = lab_client(lab, "udp", lab.vip, 5000, 20, 50)
        assert len(replies) == 20 and all(line.split()[0] in lab.backend_names() for line in replies), replies
        assert b.proc.poll() is None
    finally:
        if b is not None:
            assert b.stop() == 0
        holder.kill()
        holder.wait(10)


# ---- exact counters -------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.lab
def test_exporter_counts_exactly_the_datagrams_that_passed(lab, balancer):
    """Generic mode on veth. N datagrams of a known size through the VIP, each
    from its own source port: the exporter's backend counters add up to exactly
    N packets and N frames' bytes, and split as the echoes say they were served."""
    count, payload = 300, 100
    frame = ETHERNET + IPV4 + UDP + payload  # the Ethernet frame as the lb's NIC receives it
    before = scrape(lab)
    replies = run_client(lab, SENDER, lab.vip, 5000, count, payload, 20000)
    after = scrape(lab)

    assert len(replies) == count and not [r for r in replies if r.startswith("fail")], replies
    served = collections.Counter(replies)
    assert set(served) <= set(lab.backend_names())
    assert len(served) == 3, served  # 300 flows reach every backend

    def delta(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    names = lab.backend_names()
    packets = {n: delta("xdplb_backend_packets_total", service="echo", backend=n) for n in names}
    octets = {n: delta("xdplb_backend_bytes_total", service="echo", backend=n) for n in names}
    flows = {n: delta("xdplb_backend_flows_total", service="echo", backend=n) for n in names}
    print(f"sent {count} x {frame} B frames; exporter per backend: packets {packets}, bytes {octets}; echoes {dict(served)}")
    assert sum(packets.values()) == count
    assert sum(octets.values()) == count * frame
    assert packets == {n: served[n] for n in names}
    assert octets == {n: served[n] * frame for n in names}
    assert flows == {n: served[n] for n in names}
    assert delta("xdplb_service_packets_total", service="echo") == count
    assert delta("xdplb_service_bytes_total", service="echo") == count * frame
    # Nothing else was counted as forwarded for another service meanwhile.
    assert delta("xdplb_service_packets_total", service="hello") == 0
    assert delta("xdplb_xdp_actions_total", action="tx") == count


# ---- xdplb top ---------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.lab
def test_top_once_json_shows_live_rates_and_probe_latency(lab, balancer):
    """Generic mode on veth. While one upload streams into the sink service,
    `xdplb top --once --json` shows its bits/s on exactly the backend that holds
    it, and every backend's health and latest probe time."""
    upload = lab.popen("client", PYTHON, CLIENT_TOOL, "upload", lab.vip, 9000, 6 * 1024 * 1024, 5,
                       stdout=subprocess.PIPE, text=True)
    try:
        assert upload.stdout.readline().startswith("connected")
        time.sleep(0.5)  # let the stream settle into its pace before measuring
        top = json.loads(balancer.cli("top", "-i", "eth0", "--once", "--json", "--interval", "1").stdout)
    finally:
        out, _ = upload.communicate(timeout=60)
    assert upload.returncode == 0, out
    carrier = out.splitlines()[-1].split()[1]
    services = {s["name"]: s for s in top["services"]}
    sink = {b["name"]: b for b in services["sink"]["backends"]}
    print(f"top: sink bps {({n: b['bps'] for n, b in sink.items()})}, carrier {carrier}")
    assert sink[carrier]["bps"] > 1_000_000          # about 10 Mb/s is streaming
    assert all(b["bps"] == 0 for n, b in sink.items() if n != carrier)
    assert services["sink"]["bps"] == sink[carrier]["bps"]
    assert top["interval"] == pytest.approx(1.0, abs=0.5)
    for svc in top["services"]:
        for b in svc["backends"]:
            assert b["probe_seconds"] is not None and 0 < b["probe_seconds"] < TIMEOUT + 0.1, (svc["name"], b)
            expected = "down" if svc["name"] == "dark" else "up"
            assert (b["health"], b["probe_ok"]) == (expected, expected == "up"), (svc["name"], b)


# ---- a real Prometheus --------------------------------------------------------------


def dashboard_expressions(dashboard: dict) -> list[tuple[str, str]]:
    """(where, expr) of every PromQL expression: panel targets and annotations."""
    found = []

    def walk(node, where):
        if isinstance(node, dict):
            here = node.get("title") or node.get("name") or where
            if isinstance(node.get("expr"), str):
                found.append((f"{here} [{node.get('refId', 'annotation')}]", node["expr"]))
            for value in node.values():
                walk(value, here)
        elif isinstance(node, list):
            for value in node:
                walk(value, where)

    walk(dashboard.get("panels", []), "panel")
    walk(dashboard.get("annotations", {}), "annotation")
    return found


def rule_expressions(text: str) -> list[tuple[str, str]]:
    """(alert name, expr) from the rules file: one-line `expr:` entries only, which promtool then checks."""
    return [(m.group(1), m.group(2).strip()) for m in re.finditer(r"- alert: (\S+)\n\s+expr: (.+)", text)]


GRAFANA_VARIABLES = {
    "$__rate_interval": "10s",   # what Grafana picks for a 1 s scrape interval, rounded up
    "$__interval": "5s",
    "$service": ".*",            # the "All" value of the service variable
}


def grafana_substitute(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unknown Grafana variable left in {expr!r}"
    return expr


# Rules about several balancer nodes have no data with the one node of this
# lab; their expression without the threshold must (1 fingerprint per service).
SINGLE_NODE = {
    "XdplbPlacementDisagrees": "count by (service, vip) (count by (service, vip, fingerprint) (xdplb_placement_info)) == 1",
}


def has_data(result: list) -> bool:
    return any(v[1] not in ("NaN", "+Inf", "-Inf") for series in result for v in series["values"])


@pytest.mark.root
@pytest.mark.lab
def test_real_prometheus_evaluates_every_dashboard_and_alert_expression(lab, balancer, pool_file, tmp_path):
    """Generic mode on veth. Prometheus scrapes the daemon every second while
    traffic, a reload and a backend kill happen; then every expression of the
    dashboard and of the alert rules returns data through the HTTP API, and the
    backend-down alert fires."""
    rules = ALERTS.read_text()
    assert rules.count("for: 1m") == 1
    fast_rules = tmp_path / "alerts-fast.yml"  # the shipped rules with every `for:` cut to 1 s
    fast_rules.write_text(re.sub(r"for: \S+", "for: 1s", rules))
    (tmp_path / "prom").mkdir()
    prom = Prometheus(lab, "lb", tmp_path / "prom", targets=[METRICS], rules=[fast_rules]).start()
    try:
        prom.wait_ready()
        start = time.time()
        deadline = time.monotonic() + 30
        while not prom.query('up{job="xdplb"} == 1'):
            assert time.monotonic() < deadline, f"Prometheus never scraped xdplb:\n{prom.log()}"
            time.sleep(0.5)

        # Traffic over every kind of service, and drops for the dark one.
        assert len(lab_client(lab, "hello", lab.vip, 104, 40)) == 40
        assert len(lab_client(lab, "udp", lab.vip, 5000, 60, 200)) == 60
        run_client(lab, BLAST, lab.vip, 6000, 3000)
        for _ in range(5):  # HTTPS through the TLS tier
            lab.run("client", "curl", "-sS", "--fail", "-k", "-m", "10", "-o", "/dev/null", f"https://{lab.vip}:8443/")
        # A reload (the annotation), then a backend's server dies (transition, rebuild, alert).
        balancer.signal(signal.SIGHUP)
        balancer.wait_for(lambda st: st["last_reload"]["result"] == "applied", 10, "the reload")
        lab.kill_backend("be3")
        balancer.wait_for(lambda st: backend_health(st, "hello")["be3"] == "down", FALL * INTERVAL + 3, "be3 down")
        assert len(lab_client(lab, "hello", lab.vip, 104, 40)) == 40

        deadline = time.monotonic() + 30
        firing = []
        while not firing:
            alerts = prom.alerts()
            firing = [a for a in alerts if a["labels"].get("alertname") == "XdplbBackendDown"
                      and a["labels"].get("backend") == "be3" and a["labels"].get("service") == "hello"
                      and a["state"] == "firing"]
            assert firing or time.monotonic() < deadline, f"XdplbBackendDown for be3 never fired: {json.dumps(alerts)[:3000]}"
            time.sleep(0.5)
        names = {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}
        assert "XdplbServiceNoHealthyBackend" in names, names  # the dark service
        healthy = {a["labels"]["backend"] for a in alerts if a["labels"]["alertname"] == "XdplbBackendDown"
                   and a["labels"]["service"] == "hello"}
        assert healthy == {"be3"}, "only the killed backend of hello may be reported down"

        # Wait until Prometheus holds the last counters the daemon reports.
        hello_packets = next(s["packets"] for s in balancer.status()["services"] if s["name"] == "hello")
        deadline = time.monotonic() + 15
        while True:
            got = prom.query('xdplb_service_packets_total{service="hello"}')
            if got and float(got[0]["value"][1]) == hello_packets:
                break
            assert time.monotonic() < deadline, f"Prometheus has {got}, the daemon {hello_packets}"
            time.sleep(0.5)
        end = time.time()

        dashboard = json.loads(DASHBOARD.read_text())
        expressions = [(f"dashboard: {w}", grafana_substitute(e)) for w, e in dashboard_expressions(dashboard)]
        expressions += [(f"alert rule {name}", SINGLE_NODE.get(name, expr)) for name, expr in rule_expressions(rules)]
        for name, expr in rule_expressions(rules):  # the stand-in is the shipped rule with `== 1` for `> 1`
            assert name not in SINGLE_NODE or SINGLE_NODE[name].replace(" == 1", " > 1") == expr, name
        assert len(expressions) >= 16, expressions
        empty = []
        for where, expr in expressions:
            result = prom.query_range(expr, start, end, 1)
            if not has_data(result):
                empty.append(f"{where}: {expr}")
        assert not empty, "expressions without data:\n" + "\n".join(empty)

        # The service variable's query (Grafana's label_values) lists every service.
        variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "service")
        metric, label = re.fullmatch(r"label_values\((\w+), *(\w+)\)", variable["query"]["query"]).groups()
        assert set(prom.label_values(label, metric)) == {"hello", "web", "sink", "echo", "dark", "web-tls"}

        # The numbers behind the panels say what happened.
        assert prom.query('xdplb_backend_up{service="hello", backend="be3"}')[0]["value"][1] == "0"
        reloads = prom.query_range("sum by (result) (increase(xdplb_config_reloads_total[1m])) > 0", start, end, 1)
        assert [s["metric"]["result"] for s in reloads] == ["applied"]
        dropped = prom.query('xdplb_packets_not_forwarded_total{reason="no_backend"}')
        assert float(dropped[0]["value"][1]) >= 3000

        picture = os.environ.get("XDPLB_DASHBOARD_PICTURE")
        if picture:
            render_panels(dashboard, lambda e: prom.query_range(grafana_substitute(e), start, end, 1), Path(picture),
                          start, "xdplb dashboard panels, drawn from a real Prometheus in the lab")
    finally:
        prom.stop()
        lab.start_backend("be3")


# ---- the rules and the dashboard themselves (no root) ------------------------------


def test_shipped_alert_rules_pass_promtool():
    result = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout


PROMTOOL_TESTS = """
rule_files: [{rules}]
evaluation_interval: 15s
tests:
  - interval: 15s
    input_series:
      - series: 'xdplb_backend_up{{job="x", instance="gw", service="dicom", backend="a"}}'
        values: '1 1 0 0 0 0 0 0 0 0'
      - series: 'xdplb_backend_drained{{job="x", instance="gw", service="dicom", backend="a"}}'
        values: '0x10'
      - series: 'xdplb_backend_up{{job="x", instance="gw", service="dicom", backend="b"}}'
        values: '0 0 0 0 0 0 0 0 0 0'
      - series: 'xdplb_backend_drained{{job="x", instance="gw", service="dicom", backend="b"}}'
        values: '1x10'
      - series: 'xdplb_backend_up{{job="x", instance="gw", service="web", backend="c"}}'
        values: '1x10'
      - series: 'xdplb_backend_drained{{job="x", instance="gw", service="web", backend="c"}}'
        values: '0x10'
      - series: 'xdplb_packets_not_forwarded_total{{job="x", instance="gw", reason="fragment"}}'
        values: '0+600x40'
      - series: 'xdplb_packets_not_forwarded_total{{job="x", instance="gw", reason="not_service"}}'
        values: '0+6000x40'
      - series: 'xdplb_packets_not_forwarded_total{{job="x", instance="gw", reason="malformed"}}'
        values: '0+1x40'
      - series: 'xdplb_tls_certificate_expiry_seconds{{job="x", instance="gw", service="web-tls", certificate="/etc/a.pem"}}'
        values: '2592060-15x400'
      - series: 'xdplb_tls_certificate_expiry_seconds{{job="x", instance="gw", service="viewer", certificate="/etc/b.pem"}}'
        values: '31536000-15x400'
      # Two balancer nodes: dicom alike on both; web differs on node2 from 30 s on.
      - series: 'xdplb_placement_info{{job="x", instance="node1", service="dicom", vip="10.0.0.1", fingerprint="aaaa"}}'
        values: '1x20'
      - series: 'xdplb_placement_info{{job="x", instance="node2", service="dicom", vip="10.0.0.1", fingerprint="aaaa"}}'
        values: '1x20'
      - series: 'xdplb_placement_info{{job="x", instance="node1", service="web", vip="10.0.0.1", fingerprint="bbbb"}}'
        values: '1x20'
      - series: 'xdplb_placement_info{{job="x", instance="node2", service="web", vip="10.0.0.1", fingerprint="bbbb"}}'
        values: '1 1 _x18'
      - series: 'xdplb_placement_info{{job="x", instance="node2", service="web", vip="10.0.0.1", fingerprint="cccc"}}'
        values: '_ _ 1x18'
    alert_rule_test:
      # web's fingerprints differ from 30 s on: pending for 2 minutes, then firing; dicom never.
      - eval_time: 2m
        alertname: XdplbPlacementDisagrees
        exp_alerts: []
      - eval_time: 3m
        alertname: XdplbPlacementDisagrees
        exp_alerts:
          - exp_labels: {{severity: critical, service: web, vip: 10.0.0.1}}
            exp_annotations:
              summary: "Balancer nodes disagree on the placement of web (10.0.0.1)"
              description: "2 different placement fingerprints are exported for service web on VIP 10.0.0.1: its nodes do not run the same pool. A flow that moves between them breaks. Compare `xdplb check` on every node (services, backends, weights, hash_seed, maglev_size) and make the pools identical."
      # a went down at 30 s: pending until it has been down for a minute.
      - eval_time: 1m
        alertname: XdplbBackendDown
        exp_alerts: []
      # b is down too, but drained: no page for it.
      - eval_time: 2m
        alertname: XdplbBackendDown
        exp_alerts:
          - exp_labels: {{severity: warning, job: x, instance: gw, service: dicom, backend: a}}
            exp_annotations:
              summary: "PACS backend a of dicom is down"
              description: "xdplb on gw has seen backend a of service dicom fail its health checks for over a minute. New associations go to the other backends. Check the server, or drain it (xdplb drain) while it is worked on."
      # dicom: a down and b drained leaves nothing; web is fine.
      - eval_time: 2m
        alertname: XdplbServiceNoHealthyBackend
        exp_alerts:
          - exp_labels: {{severity: critical, job: x, instance: gw, service: dicom}}
            exp_annotations:
              summary: "Service dicom has no healthy backend"
              description: "xdplb on gw has no healthy, undrained backend for service dicom: new connections to it are dropped (counted as no_backend)."
      # 40 fragments/s for over 5 minutes; not_service is the gateway's own traffic and
      # 1 malformed packet per 15 s is below the threshold.
      - eval_time: 10m
        alertname: XdplbNotForwardedRising
        exp_alerts:
          - exp_labels: {{severity: warning, job: x, instance: gw, reason: fragment}}
            exp_annotations:
              summary: "xdplb is not forwarding fragment packets (40/s)"
              description: "xdplb on gw has not forwarded packets for reason fragment at 40 per second over the last 5 minutes. fragment: a client sends IPv4 fragments to a VIP (check its MTU); no_backend: a service has no healthy backend (the gateway refuses them); malformed: truncated TCP/UDP headers to a VIP."
      # a.pem has 30 days and 60 s left at 0, so under 30 days from 1m15s on: pending for
      # an hour, firing after; b.pem has a year left.
      - eval_time: 1h
        alertname: XdplbTlsCertificateExpiring
        exp_alerts: []
      - eval_time: 1h30m
        alertname: XdplbTlsCertificateExpiring
        exp_alerts:
          - exp_labels: {{severity: warning, job: x, instance: gw, service: web-tls, certificate: /etc/a.pem}}
            exp_annotations:
              summary: "TLS certificate of web-tls expires in 29d 22h 31m 0s"
              description: "The certificate /etc/a.pem that xdplb on gw has HAProxy serve for service web-tls expires in 29d 22h 31m 0s. Renew the file and reload xdplb (systemctl reload, or xdplb reload); xdplb check validates it first."
"""


def test_alert_rules_fire_when_they_should_and_not_otherwise(tmp_path):
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(PROMTOOL_TESTS.format(rules=json.dumps(str(ALERTS))))
    result = subprocess.run(["promtool", "test", "rules", str(tests)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


REQUIRED_IN_PANELS = [
    "xdplb_backend_packets_total", "xdplb_backend_bytes_total", "xdplb_backend_flows_total", "xdplb_backend_up",
    "xdplb_health_probe_duration_seconds_bucket", "xdplb_xdp_actions_total", "xdplb_packets_not_forwarded_total",
]


def test_dashboard_has_its_variables_panels_and_annotations():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["service"]["type"] == "query" and variables["service"]["multi"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
    exprs = " ".join(e for _, e in dashboard_expressions(dashboard))
    for metric in REQUIRED_IN_PANELS:
        assert metric in exprs, metric
    by_title = {p["title"]: p for p in panels}
    for title in ("Packets/s: $service", "Bits/s: $service"):
        assert by_title[title]["repeat"] == "service"
        assert by_title[title]["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
        assert "sum by (backend)" in by_title[title]["targets"][0]["expr"]
    assert by_title["Backend health"]["type"] == "state-timeline"
    latency = [t["expr"] for t in by_title["Health probe latency p50 / p99"]["targets"]]
    assert latency[0].startswith("histogram_quantile(0.5,") and latency[1].startswith("histogram_quantile(0.99,")
    annotations = {a["name"]: a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a}
    assert "xdplb_config_reloads_total" in annotations["Config reloads"]
    assert "xdplb_health_transitions_total" in annotations["Health transitions"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
