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
from .status import read_stats, rows
from .config import parse_metrics_address

log = logging.getLogger("xdplb")

REQUEST_TIMEOUT = 10.0        # seconds a client may take to send its request head
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
            if svc["id"] is not None:
                svc_packets.add_metric([svc["name"]], svc["packets"])
                svc_bytes.add_metric([svc["name"]], svc["bytes"])
            for b in svc["backends"]:
                labels = [svc["name"], b["name"]]
                ident = (svc["name"], b["address"])
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
                for kind, n in sorted(failures_of.get(ident, ())):
                    failures.add_metric(labels + [kind], n)
        yield from (svc_packets, svc_bytes, be_packets, be_bytes, be_flows, be_up, be_weight, be_drained,
                    be_since, transitions, probe_seconds, failures)
        yield from _tls_families(services)

        yield self._by_label("xdplb_xdp_actions", "Packets by XDP action the program returned.", "action",
                             stats.actions)
        yield self._by_label("xdplb_packets_not_forwarded",
                             "Packets not forwarded, by reason (not_service passes to the gateway itself).",
                             "reason", stats.not_forwarded)
        yield self._by_label("xdplb_events", "Data plane events that are not drops.", "event", stats.events)

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
                500: "Internal Server Error"}
_INDEX = b"xdplb exporter: metrics at /metrics\n"


class Exporter:
    """Serves /metrics for one source on one address, inside the running asyncio loop."""

    def __init__(self, source, address: str):
        self.address = address
        try:
            # Port 0 (any free port) only for tests: a pool never passes config with it.
            self.host, self.port = parse_metrics_address(address, any_port=True)
        except ValueError as exc:
            raise ExporterError(str(exc)) from None
        self.source = source
        self.collector = XdplbCollector(source)
        self.registry = registry_for(source, self.collector)
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> "Exporter":
        try:
            self._server = await asyncio.start_server(self._handle, self.host, self.port)
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
            await self._server.wait_closed()
            self._server = None

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition for an Accept header: (body, content type)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            headers = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            if len(parts) != 3:
                status, body, ctype = 400, b"bad request line\n", "text/plain"
            elif parts[0] not in ("GET", "HEAD"):
                status, body, ctype = 405, b"only GET and HEAD\n", "text/plain"
            elif parts[1].split("?", 1)[0] == "/metrics":
                try:
                    # The map reads happen in a thread; the join and the
                    # rendering on the loop, between two of its steps.
                    self.collector.stats = await asyncio.to_thread(read_stats, self.source)
                    body, ctype = self.render(headers.get("accept", ""))
                    status = 200
                except Exception as exc:  # a failed map read must not take the daemon down
                    log.error("metrics scrape failed: %s", exc)
                    status, body, ctype = 500, f"scrape failed: {exc}\n".encode(), "text/plain"
            elif parts[1] == "/":
                status, body, ctype = 200, _INDEX, "text/plain"
            else:
                status, body, ctype = 404, b"not found: try /metrics\n", "text/plain"
            writer.write(f"HTTP/1.1 {status} {_STATUS_TEXT[status]}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
            if len(parts) == 3 and parts[0] != "HEAD":
                writer.write(body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


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
