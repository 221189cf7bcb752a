"""DICOM probe threads: capped and started with jitter; failure kinds known in advance.

The cap test probes a real pynetdicom SCP on 127.0.0.1 (test_probes.py's
scp_factory). The scheduling tests replace only the blocking exchange
(probes._dicom_echo) with one that records when its thread started, so
they measure the scheduling and nothing else.
"""
from __future__ import annotations

import ast
import asyncio
import dataclasses
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_probes import LOCAL, check, scp_factory  # noqa: E402,F401  (fixture)

from xdplb import probes  # noqa: E402
from xdplb.config import HealthCheck  # noqa: E402
from xdplb.exporter import registry_for  # noqa: E402
from xdplb.probes import run_probe  # noqa: E402


class ThreadPeak:
    """Samples how many DICOM probe threads are alive, every millisecond."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            alive = sum(t.name == "xdplb-dicom-probe" for t in threading.enumerate())
            self.peak = max(self.peak, alive)
            time.sleep(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def test_500_dicom_probes_at_once_never_run_more_than_the_cap_in_threads(scp_factory, monkeypatch):
    monkeypatch.setattr(probes, "DICOM_MAX_THREADS", 8, raising=False)
    port = scp_factory()  # pynetdicom accepts 10 associations at once by default

    async def many():
        return await asyncio.gather(*(run_probe(check("dicom", port, timeout=5.0), LOCAL) for _ in range(500)))

    # Exchanges in flight, counted around the real one; a thread that has
    # just given back its slot may still be alive for a moment, so the
    # number of live threads is bounded more loosely.
    real = probes._dicom_echo
    lock = threading.Lock()
    flight = {"now": 0, "peak": 0}

    def counted(*args):
        with lock:
            flight["now"] += 1
            flight["peak"] = max(flight["peak"], flight["now"])
        try:
            return real(*args)
        finally:
            with lock:
                flight["now"] -= 1

    monkeypatch.setattr(probes, "_dicom_echo", counted)
    with ThreadPeak() as threads:
        results = asyncio.run(many())
    bad = [r.reason for r in results if not r.ok]
    assert not bad, (len(bad), bad[:3])
    assert 1 <= flight["peak"] <= 8, flight["peak"]
    assert threads.peak <= 16, threads.peak


class FakeEcho:
    """Stands in for probes._dicom_echo: records its thread's start time and
    how many run at once, sleeps `seconds`, and succeeds."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.starts: list[float] = []
        self.running = 0
        self.peak = 0
        self._lock = threading.Lock()

    def __call__(self, h, address, clock, progress):
        with self._lock:
            self.starts.append(time.monotonic())
            self.running += 1
            self.peak = max(self.peak, self.running)
        time.sleep(self.seconds)
        with self._lock:
            self.running -= 1
        return clock.result(True, "fake C-ECHO succeeded")


def dicom(timeout: float, interval: float = 10.0) -> HealthCheck:
    return HealthCheck("dicom", 104, interval, timeout, 2, 2)


def test_dicom_probes_started_together_are_spread_by_jitter(monkeypatch):
    echo = FakeEcho(0.01)
    monkeypatch.setattr(probes, "_dicom_echo", echo)
    monkeypatch.setattr(probes, "DICOM_START_JITTER", 0.5, raising=False)

    async def many():
        return await asyncio.gather(*(run_probe(dicom(2.0), "10.0.0.1") for _ in range(100)))

    results = asyncio.run(many())
    assert all(r.ok for r in results)
    spread = max(echo.starts) - min(echo.starts)
    # 100 uniform draws over 0.5 s: the spread falls below 0.25 s with odds of about 1 in 10^28.
    assert spread >= 0.25, f"100 probes started within {spread * 1000:.0f} ms"


def test_jitter_is_at_most_a_tenth_of_the_interval(monkeypatch):
    echo = FakeEcho(0.0)
    monkeypatch.setattr(probes, "_dicom_echo", echo)
    monkeypatch.setattr(probes, "DICOM_START_JITTER", 5.0)

    async def many():
        started = time.monotonic()
        await asyncio.gather(*(run_probe(dicom(0.1, interval=0.2), "10.0.0.1") for _ in range(50)))
        return time.monotonic() - started

    assert asyncio.run(many()) < 0.02 + 0.5  # at most 20 ms of jitter, and time to run them


def test_waiting_for_a_thread_does_not_count_against_the_timeout(monkeypatch):
    # Two threads for ten probes of 0.2 s: the last waits about 0.8 s for a
    # thread, longer than its 0.3 s timeout, yet none of them times out.
    echo = FakeEcho(0.2)
    monkeypatch.setattr(probes, "_dicom_echo", echo)
    monkeypatch.setattr(probes, "DICOM_MAX_THREADS", 2)

    async def many():
        return await asyncio.gather(*(run_probe(dicom(0.3), "10.0.0.1") for _ in range(10)))

    results = asyncio.run(many())
    assert [r.ok for r in results] == [True] * 10, [r.reason for r in results]
    assert echo.peak == 2
    assert all(r.seconds < 0.3 for r in results)


def test_a_thread_slot_comes_back_after_a_timeout_and_after_a_cancel(monkeypatch):
    echo = FakeEcho(0.3)
    monkeypatch.setattr(probes, "_dicom_echo", echo)
    monkeypatch.setattr(probes, "DICOM_MAX_THREADS", 2)

    async def scenario():
        timed_out = await run_probe(dicom(0.05), "10.0.0.1")  # gives up; its thread runs on
        assert (timed_out.ok, timed_out.kind) == (False, "timeout")
        slots = probes._dicom_slots()
        assert slots._value == 1  # held by the thread, not by the gone probe
        tasks = [asyncio.create_task(run_probe(dicom(2.0), "10.0.0.1")) for _ in range(4)]
        await asyncio.sleep(0.06)  # past the jitter: some wait for a slot, one runs
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        deadline = time.monotonic() + 2
        while echo.running and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert slots._value == 2, "a thread slot leaked"
        both = await asyncio.gather(*(run_probe(dicom(1.0), "10.0.0.1") for _ in range(2)))
        assert all(r.ok for r in both)

    asyncio.run(scenario())


# ---- failure kinds, for the exporter's zeros ---------------------------------------------

# Which check each probe function reports for.
_CHECKS_OF = {"tcp_probe": ("tcp",), "http_probe": ("https",), "dicom_probe": ("dicom",),
              "_dicom_echo": ("dicom",), "_connect_failure": ("dicom",)}


def test_every_failure_kind_a_probe_can_report_is_listed():
    """Read probes.py: every clock.result(False, ..., "<kind>") in a probe
    function must be in FAILURE_KINDS for that function's checks."""
    tree = ast.parse(Path(probes.__file__).read_text())
    found: dict[str, set] = {}
    for fn in tree.body:
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "result"
                    and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value is False):
                assert len(node.args) == 3, f"{fn.name}: a failure without a kind at line {node.lineno}"
                found.setdefault(fn.name, set()).add(node.args[2].value)
    assert set(found) == set(_CHECKS_OF), set(found) ^ set(_CHECKS_OF)
    for name, kinds in found.items():
        for check_name in _CHECKS_OF[name]:
            assert kinds <= set(probes.FAILURE_KINDS[check_name]), (name, check_name, kinds - set(probes.FAILURE_KINDS[check_name]))
    # http is https without TLS.
    assert set(probes.FAILURE_KINDS["http"]) == set(probes.FAILURE_KINDS["https"]) - {"tls"}
    # The daemon counts a crashed probe as "error": every check lists it.
    assert all("error" in kinds for kinds in probes.FAILURE_KINDS.values())
    assert set(probes.FAILURE_KINDS) == set(probes.PROBES)


def test_probe_failure_counters_are_exported_at_zero_before_any_failure():
    from test_exporter import make_source

    src = make_source()
    src.telemetry.probe_failures.clear()  # no probe has failed yet
    # web is probed by C-ECHO here, dicom by tcp: each backend gets its own check's kinds.
    web = next(s for s in src.pool.services if s.name == "web")
    by_echo = dataclasses.replace(web, health=dataclasses.replace(web.health, check="dicom"))
    src.pool = dataclasses.replace(src.pool, services=type(src.pool.services)(
        by_echo if s is web else s for s in src.pool.services))
    kinds = {"tcp": ("refused", "timeout", "error"),
             "dicom": ("refused", "timeout", "rejected", "aborted", "echo_status", "error")}
    reg = registry_for(src)
    for svc in src.pool.services:
        for be in svc.backends:
            for kind in kinds[svc.health.check]:
                value = reg.get_sample_value("xdplb_health_probe_failures_total",
                                             {"service": svc.name, "backend": be.name, "reason": kind})
                assert value == 0, (svc.name, be.name, kind, value)
    # Only the kinds of the backend's own check.
    assert reg.get_sample_value("xdplb_health_probe_failures_total",
                                {"service": "dicom", "backend": "pacs-a", "reason": "echo_status"}) is None
    assert reg.get_sample_value("xdplb_health_probe_failures_total",
                                {"service": "web", "backend": "pacs-a", "reason": "echo_status"}) == 0
    # And a real failure counts up from there.
    # Telemetry knows a backend by its address; the exporter labels it by name.
    pacs_a = next(be for be in web.backends if be.name == "pacs-a")
    src.telemetry.probe("dicom", str(pacs_a.address), "tcp", 0.1, False, "refused", "connect refused")
    assert registry_for(src).get_sample_value(
        "xdplb_health_probe_failures_total", {"service": "dicom", "backend": "pacs-a", "reason": "refused"}) == 1
