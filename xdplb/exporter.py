"""Prometheus exporter of `xdplb attach`, on the pool's `[xdplb] metrics` address.

`XdplbCollector` is a prometheus-client custom collector: every scrape reads
the data plane's per-CPU counters fresh (the kernel layer sums the CPUs)
and turns the controller's own telemetry into metric families. It keeps
nothing between scrapes, so a number it shows is always what the maps and
the daemon hold at that moment.

Its source is any object with the daemon's attributes (see xdplb/status.py,
whose rows it shares with `xdplb status` and `top`), plus `mode`, `ifname`
and, optionally, `map_write_errors`. Unit tests pass a fake one.

The HTTP side is a small asyncio server in the daemon's own loop rather
than prometheus-client's threaded one: a scrape reads the per-CPU counters
in a worker thread, then builds its families between two steps of the
loop, never while a probe result or a reload is half applied.
"""
from __future__ import annotations

import asyncio
import logging
import os

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from . import __version__
from .announce import placement_fingerprint
from .health_fsm import State
from .haproxy import verdict_key
from .status import read_stats, rows
from .config import parse_metrics_address
from .probes import FAILURE_KINDS
from .structs import NAT_STATS

log = logging.getLogger("xdplb")

MAX_CLIENTS = 16              # concurrent connections; one scraping Prometheus needs one
HEAD_TIMEOUT = 2.0            # seconds a client may take to send its request head
WRITE_TIMEOUT = 10.0          # seconds a client may take to read the response
MAX_HEAD = 8192               # bytes in a request head
TRANSITION_TARGETS = ("up", "down")
RELOAD_RESULTS = ("applied", "rejected", "failed")


class ExporterError(RuntimeError):
    """The exporter cannot serve; the message is one sentence."""


# ---- the collector ------------------------------------------------------------


def _tls_families(services: list[dict]):
    """The TLS tier: HAProxy's per-backend counters (they restart from 0 with each new
    HAProxy worker, after a reload or a restart) and each certificate's time left."""
    be = ["service", "backend"]
    expiry = GaugeMetricFamily("xdplb_tls_certificate_expiry_seconds",
                               "Seconds until the certificate HAProxy serves for the service expires "
                               "(negative once expired).", labels=["service", "certificate"])
    running = GaugeMetricFamily("xdplb_tls_haproxy_up", "1 when the service's HAProxy runs.", labels=["service"])
    current = GaugeMetricFamily("xdplb_tls_backend_current_connections", "Connections HAProxy holds to the backend.",
                                labels=be)
    conns = CounterMetricFamily("xdplb_tls_backend_connections", "Connections HAProxy made to the backend.", labels=be)
    octets = CounterMetricFamily("xdplb_tls_backend_bytes", "Cleartext bytes HAProxy moved to (in: from the client) "
                                 "and from (out) the backend.", labels=be + ["direction"])
    errors = CounterMetricFamily("xdplb_tls_backend_errors", "Failed connections and responses to the backend.",
                                 labels=be + ["kind"])
    for svc in services:
        tls = svc.get("tls")
        if tls is None:
            continue
        running.add_metric([svc["name"]], 1 if tls["haproxy"] else 0)
        for cert in tls["certificates"]:
            expiry.add_metric([svc["name"], cert["path"]], cert["expires_in"])
        for b in svc["backends"]:
            h = b.get("tls")
            if h is None:
                continue
            labels = [svc["name"], b["name"]]
            current.add_metric(labels, h["current"])
            conns.add_metric(labels, h["connections"])
            octets.add_metric(labels + ["in"], h["bytes_in"])
            octets.add_metric(labels + ["out"], h["bytes_out"])
            errors.add_metric(labels + ["connect"], h["connect_errors"])
            errors.add_metric(labels + ["response"], h["response_errors"])
    yield from (expiry, running, current, conns, octets, errors)


def _node_families(src):
    """What lets nodes behind one VIP be compared: whether this node announces
    each VIP, each service's placement fingerprint (from the configuration:
    nodes must agree) and its set of up backends (from health: nodes may
    disagree for a moment, which is not a configuration problem)."""
    pool = src.pool
    announcer = getattr(src, "announcer", None)
    decisions = announcer.decisions if announcer is not None else {}
    announced = GaugeMetricFamily("xdplb_vip_announced",
                                  "1 while this node announces the VIP (route in announce_table, ready file), else 0.",
                                  labels=["vip"])
    for vip in sorted({svc.vip for svc in pool.services}):
        decision = decisions.get(vip)
        announced.add_metric([str(vip)], 1 if decision is not None and decision.announce else 0)
    draining = GaugeMetricFamily("xdplb_node_draining", "1 while the node is drained (drain-node or stopping).")
    draining.add_metric([], 1 if getattr(src, "node_draining", False) else 0)
    placement = InfoMetricFamily("xdplb_placement", "Fingerprint of the service's placement inputs (backends, "
                                 "weights, persistence, hash_seed, maglev_size), as `xdplb check` prints it; "
                                 "every node of a VIP must show the same.", labels=["service", "vip"])
    up = InfoMetricFamily("xdplb_backends_up", "The backends this node sees up, comma-separated addresses.",
                          labels=["service", "vip"])
    for svc in pool.services:
        labels = [svc.name, str(svc.vip)]
        placement.add_metric(labels, {"fingerprint": placement_fingerprint(pool.settings, svc)})
        healthy = sorted((be.address for be in svc.backends
                          if src.health.get(verdict_key(svc, be.address)) is not None
                          and src.health[verdict_key(svc, be.address)].state is State.UP))
        up.add_metric(labels, {"up": ",".join(map(str, healthy))})
    yield from (announced, draining, placement, up)


def _histogram(family: HistogramMetricFamily, labels: list, hist) -> None:
    family.add_metric(labels, hist.cumulative(), hist.total)


class XdplbCollector:
    """Builds every xdplb metric family from `source` on each collect()."""

    def __init__(self, source):
        self.source = source
        self.stats = None     # counters read ahead (off the event loop) for the next collect()

    def describe(self):
        return []  # names are dynamic; an empty describe keeps register() from scraping

    def collect(self):
        src = self.source
        telemetry = src.telemetry
        stats, self.stats = self.stats or read_stats(src), None
        services = rows(src, stats)

        info = InfoMetricFamily("xdplb", "Build and attach information.",
                                labels=("version", "interface", "mode"))
        info.add_metric([], {"version": __version__, "interface": src.ifname, "mode": src.mode or "none"})
        yield info

        # Where each service and backend is: the address as RFC 5952 writes
        # it (fd00:10:10::11, as `ip` prints it), whatever spelling the pool used.
        svc_info = InfoMetricFamily("xdplb_service", "The VIP, port and protocol of each service.",
                                    labels=("service", "vip", "port", "protocol"))
        be_info = InfoMetricFamily("xdplb_backend", "The address of each backend.",
                                   labels=("service", "backend", "address"))
        svc_packets = CounterMetricFamily("xdplb_service_packets", "Packets forwarded per service.", labels=["service"])
        svc_bytes = CounterMetricFamily("xdplb_service_bytes", "Bytes (Ethernet frames as received) forwarded per service.",
                                        labels=["service"])
        be = ["service", "backend"]
        be_packets = CounterMetricFamily("xdplb_backend_packets", "Packets forwarded per backend.", labels=be)
        be_bytes = CounterMetricFamily("xdplb_backend_bytes", "Bytes (Ethernet frames as received) forwarded per backend.",
                                       labels=be)
        be_flows = CounterMetricFamily("xdplb_backend_flows", "New flows assigned to the backend.", labels=be)
        be_up = GaugeMetricFamily("xdplb_backend_up", "1 when the health verdict is up, else 0.", labels=be)
        be_weight = GaugeMetricFamily("xdplb_backend_weight", "Configured Maglev weight.", labels=be)
        be_drained = GaugeMetricFamily("xdplb_backend_drained", "1 when drained (weight 0 or drained by command).",
                                       labels=be)
        be_since = GaugeMetricFamily("xdplb_backend_health_changed_timestamp_seconds",
                                     "Unix time of the backend's last health change.", labels=be)
        transitions = CounterMetricFamily("xdplb_health_transitions", "Health verdict changes, by new state.",
                                          labels=be + ["to"])
        probe_seconds = HistogramMetricFamily("xdplb_health_probe_duration_seconds", "Health probe duration.",
                                              labels=["service", "backend", "check"])
        failures = CounterMetricFamily("xdplb_health_probe_failures", "Failed health probes by reason.",
                                       labels=["service", "backend", "reason"])
        # Telemetry is keyed by (service, address); only backends of the
        # running pool are exported, under their current names.
        failures_of: dict = {}
        for (service, ident, kind), n in telemetry.probe_failures.items():
            failures_of.setdefault((service, ident), []).append((kind, n))
        for svc in services:
            svc_info.add_metric([svc["name"], svc["vip"], str(svc["port"]), svc["protocol"]], {})
            if svc["id"] is not None:
                svc_packets.add_metric([svc["name"]], svc["packets"])
                svc_bytes.add_metric([svc["name"]], svc["bytes"])
            for b in svc["backends"]:
                labels = [svc["name"], b["name"]]
                ident = (svc["name"], b["address"])
                be_info.add_metric(labels + [b["address"]], {})
                if b["id"] is not None:
                    be_packets.add_metric(labels, b["packets"])
                    be_bytes.add_metric(labels, b["bytes"])
                    be_flows.add_metric(labels, b["new_flows"])
                be_up.add_metric(labels, 1 if b["health"] == "up" else 0)
                be_weight.add_metric(labels, b["weight"])
                be_drained.add_metric(labels, 1 if b["drained"] else 0)
                if b["since"]:
                    be_since.add_metric(labels, b["since"])
                # Zeros for transitions that have not happened yet, so that the
                # first one shows as an increase rather than as a new series.
                for to in TRANSITION_TARGETS:
                    transitions.add_metric(labels + [to], telemetry.transitions.get(ident + (to,), 0))
                hist = telemetry.probe_seconds.get(ident + (svc["check"],))
                if hist is not None:
                    _histogram(probe_seconds, labels + [svc["check"]], hist)
                # Every reason the backend's check can fail with is there from
                # the start, at 0 ("avoid missing metrics"): a panel or an
                # alert on the rate then has data before the first failure.
                seen = dict.fromkeys(FAILURE_KINDS[svc["check"]], 0)
                seen.update(failures_of.get(ident, ()))
                for kind, n in sorted(seen.items()):
                    failures.add_metric(labels + [kind], n)
        yield from (svc_info, be_info, svc_packets, svc_bytes, be_packets, be_bytes, be_flows, be_up, be_weight, be_drained,
                    be_since, transitions, probe_seconds, failures)
        yield from _tls_families(services)
        yield from _node_families(src)

        yield self._by_label("xdplb_xdp_actions", "Packets by XDP action the program returned.", "action",
                             stats.actions)
        yield self._by_label("xdplb_packets_not_forwarded",
                             "Packets not forwarded, by reason (not_service passes to the gateway itself).",
                             "reason", stats.not_forwarded)
        yield self._by_label("xdplb_events", "Data plane events that are not drops.", "event", stats.events)
        nat = dict.fromkeys(NAT_STATS, 0)
        nat.update(getattr(stats, "nat", {}))
        yield self._by_label("xdplb_nat_packets",
                             "NAT services' packets by outcome: request, reply_tx, reply_redirect sent; no_route, "
                             "no_neigh, icmp, untranslatable, no_target, fragment, truncated dropped; stack passed "
                             "(bpf/nat.h).",
                             "outcome", nat)
        misses = CounterMetricFamily(
            "xdplb_flow_misses",
            "TCP packets that were not a SYN and had no flow entry, placed by Maglev: what to watch after "
            "a restart or when traffic moves between balancer nodes.")
        misses.add_metric([], stats.events.get("flow_miss", 0))
        yield misses

        rebuild = HistogramMetricFamily("xdplb_table_rebuild_seconds", "Maglev table rebuild and flip time.")
        _histogram(rebuild, [], telemetry.rebuild_seconds)
        yield rebuild
        reloads = {result: 0 for result in RELOAD_RESULTS}
        reloads.update(telemetry.reloads)
        yield self._by_label("xdplb_config_reloads", "Pool reloads by result.", "result", reloads)
        errors = CounterMetricFamily("xdplb_map_write_errors", "Failed passes of writing the maps (each is retried).")
        errors.add_metric([], getattr(src, "map_write_errors", 0))
        yield errors

    @staticmethod
    def _by_label(name: str, doc: str, label: str, values: dict) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc, labels=[label])
        for key, n in values.items():
            family.add_metric([key], n)
        return family


def registry_for(source, collector: XdplbCollector | None = None) -> CollectorRegistry:
    """A private registry holding only xdplb's collector (no process metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector or XdplbCollector(source))
    return registry


# ---- the HTTP server ------------------------------------------------------------

_STATUS_TEXT = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                500: "Internal Server Error", 503: "Service Unavailable"}
_INDEX = b"xdplb exporter: metrics at /metrics\n"


class Exporter:
    """Serves /metrics for one source on one address, inside the running asyncio loop.

    Connections are bounded, so that idle or slow clients cannot use up the
    daemon's file descriptors (and with them every health probe): at most
    `max_clients` at once, each with HEAD_TIMEOUT to send its request and
    WRITE_TIMEOUT to take the answer. When a new client finds them all in
    use, the one that has waited longest without sending its request is
    dropped to make room; if every one is being answered, the new client
    gets 503 at once. (asyncio accepts up to the listen backlog before any
    handler runs, so for an instant up to twice `max_clients` are open.)
    """

    def __init__(self, source, address: str, max_clients: int | None = None):
        self.address = address
        try:
            # Port 0 (any free port) only for tests: a pool never passes config with it.
            self.host, self.port = parse_metrics_address(address, any_port=True)
        except ValueError as exc:
            raise ExporterError(str(exc)) from None
        self.source = source
        self.collector = XdplbCollector(source)
        self.registry = registry_for(source, self.collector)
        self.max_clients = MAX_CLIENTS if max_clients is None else max_clients
        self._server: asyncio.AbstractServer | None = None
        # Open connections, oldest first -> True while still waiting for the request head.
        self._clients: dict[asyncio.StreamWriter, bool] = {}

    async def start(self) -> "Exporter":
        try:
            # The backlog is also how many connections asyncio accepts in one
            # go, before any handler can drop one: keep it at the cap, so
            # descriptors peak at twice the cap for an instant.
            self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=MAX_HEAD,
                                                      backlog=self.max_clients)
        except OSError as exc:
            # asyncio wraps the bind error in a long text; the errno says it plainly.
            reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
            raise ExporterError(f"cannot serve metrics on {self.address}: {reason}") from None
        if self.port == 0:  # tests ask for any free port
            self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._clients):
                writer.transport.abort()
            await self._server.wait_closed()
            self._server = None

    @property
    def clients(self) -> int:
        """Connections open now."""
        return len(self._clients)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition for an Accept header: (body, content type)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    def _make_room(self) -> bool:
        """Drop the longest-waiting client that has sent no request yet; False if none has."""
        for writer, waiting in self._clients.items():
            if waiting:
                del self._clients[writer]
                writer.transport.abort()
                return True
        return False

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._clients) >= self.max_clients and not self._make_room():
            writer.write(_response(503, b"too many metrics clients; try again\n", "text/plain", head_only=False))
            writer.transport.close()  # sends what is buffered, then closes; no waiting on this client
            return
        self._clients[writer] = True
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            if writer not in self._clients:
                return  # dropped to make room just as its request came in
            self._clients[writer] = False
            if _wants_metrics(head):
                # The map reads happen in a thread; the join and the
                # rendering on the loop, between two of its steps.
                try:
                    self.collector.stats = await asyncio.to_thread(read_stats, self.source)
                except Exception as exc:  # a failed map read must not take the daemon down
                    log.error("metrics scrape failed: %s", exc)
            status, body, ctype, head_only = self._respond(head)
            writer.write(_response(status, body, ctype, head_only))
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
        except (ConnectionError, asyncio.TimeoutError):
            writer.transport.abort()
        finally:
            self._clients.pop(writer, None)
            writer.close()

    def _respond(self, head: bytes) -> tuple[int, bytes, str, bool]:
        """(status, body, content type, head only) for one request head."""
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if len(parts) != 3:
            return 400, b"bad request line\n", "text/plain", False
        head_only = parts[0] == "HEAD"
        if parts[0] not in ("GET", "HEAD"):
            return 405, b"only GET and HEAD\n", "text/plain", False
        if parts[1].split("?", 1)[0] == "/metrics":
            try:
                body, ctype = self.render(headers.get("accept", ""))
            except Exception as exc:  # a failed map read must not take the daemon down
                log.error("metrics scrape failed: %s", exc)
                return 500, f"scrape failed: {exc}\n".encode(), "text/plain", head_only
            return 200, body, ctype, head_only
        if parts[1] == "/":
            return 200, _INDEX, "text/plain", head_only
        return 404, b"not found: try /metrics\n", "text/plain", head_only


def _wants_metrics(head: bytes) -> bool:
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    return len(parts) == 3 and parts[0] in (b"GET", b"HEAD") and parts[1].split(b"?", 1)[0] == b"/metrics"


def _response(status: int, body: bytes, ctype: str, head_only: bool) -> bytes:
    head = (f"HTTP/1.1 {status} {_STATUS_TEXT[status]}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    return head if head_only else head + body


async def serve(source, pool) -> Exporter | None:
    """Start the exporter on pool.settings.metrics; None when disabled or it cannot listen.

    A busy port is logged as an error and balancing goes on without metrics:
    the data plane matters more than its numbers.
    """
    address = pool.settings.metrics
    if not address:
        return None
    try:
        exporter = await Exporter(source, address).start()
    except ExporterError as exc:
        log.error("%s ([xdplb] metrics in %s); balancing continues without the metrics exporter",
                  exc, pool.source)
        return None
    log.info("serving metrics on http://%s/metrics", address)
    return exporter
