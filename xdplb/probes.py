"""Health probes: one async check of one backend, bounded by its timeout.

``run_probe(health, address)`` runs the check that ``health.check`` names
and returns a ProbeResult: ok, one sentence for the log, the seconds it
took and, for a failure, a short ``kind`` for metrics.

  tcp    connect and close                    refused timeout error
  http   GET path, status must be expect      refused timeout http_status error
  https  the same over TLS                    ... and tls
  dicom  A-ASSOCIATE, C-ECHO, A-RELEASE       refused timeout rejected aborted echo_status error

Every check works over IPv4 and IPv6 alike (DICOM through pynetdicom 3,
the first with IPv6 associations); messages, URLs and Host headers write an
IPv6 address in brackets.

FAILURE_KINDS lists every kind each check can report; the exporter
exports each at 0 before the first failure.

A probe never takes longer than its timeout, even against a server that
accepts the connection and then never answers, so one hung backend never
delays another's probes (each backend has its own task in the daemon).

Timeouts are asyncio.timeout(), never asyncio.wait_for(): on Python 3.11
wait_for returns the result, and drops the cancellation, when the task is
cancelled in the loop turn in which the awaited operation completed
(CPython gh-86296, fixed in 3.12). A stop that cancels a probe just as its
connect succeeds then left that probe looping forever, and the daemon's
stop waiting for it.

DICOM probes run in threads (pynetdicom blocks). At most DICOM_MAX_THREADS
run at once and each starts after a small random delay, so a pool of 500
DICOM backends does not start 500 threads in the same instant at start-up
or after a reload. A probe's timeout runs from the moment it has a thread:
waiting for one is the controller's delay, not the backend's.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import re
import socket
import ssl
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable

from pynetdicom import AE, evt
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT
from pynetdicom.sop_class import Verification

from .addrtext import host_port
from .config import HealthCheck

# pynetdicom logs every association step at INFO and every failure at ERROR;
# a probe reports its own one-sentence reason, so that chatter would repeat
# each failing backend's story every interval.
logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)


FAILURE_KINDS = {
    "tcp": ("refused", "timeout", "error"),
    "http": ("refused", "timeout", "http_status", "error"),
    "https": ("refused", "timeout", "tls", "http_status", "error"),
    "dicom": ("refused", "timeout", "rejected", "aborted", "echo_status", "error"),
}

DICOM_MAX_THREADS = 64      # DICOM probe threads at once; the next probe waits for one to end
DICOM_START_JITTER = 0.05   # seconds: the most a DICOM probe waits, at random, before it starts


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    reason: str          # one sentence for the log
    seconds: float
    kind: str = "ok"     # short failure class for metrics: refused, timeout, error, ...


class _Clock:
    """A probe's start and deadline, and results stamped with the time taken."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.started = time.monotonic()
        self.deadline = self.started + timeout

    def left(self) -> float:
        return max(self.deadline - time.monotonic(), 0.0)

    def result(self, ok: bool, reason: str, kind: str = "ok") -> ProbeResult:
        return ProbeResult(ok, reason, time.monotonic() - self.started, kind)


# ---- tcp ---------------------------------------------------------------------

async def tcp_probe(address: str, port: int, timeout: float) -> ProbeResult:
    """Healthy when a TCP connection to address:port completes in time."""
    clock = _Clock(timeout)
    target = host_port(address, port)
    try:
        async with asyncio.timeout(timeout):
            _reader, writer = await asyncio.open_connection(address, port)
    except TimeoutError:
        return clock.result(False, f"connect to {target} timed out after {timeout:g}s", "timeout")
    except ConnectionRefusedError:
        return clock.result(False, f"connect to {target} refused", "refused")
    except OSError as exc:
        return clock.result(False, f"connect to {target} failed: {exc.strerror or exc}", "error")
    writer.close()
    try:
        async with asyncio.timeout(timeout):
            await writer.wait_closed()
    except (TimeoutError, OSError):
        pass
    return clock.result(True, f"connect to {target} succeeded")


# ---- http and https ----------------------------------------------------------

_STATUS_LINE = re.compile(rb"HTTP/\d(?:\.\d)? (\d{3})(?: |\r?\n)")


@functools.lru_cache(maxsize=16)
def _tls_context(ca_file: str, verify: bool, _ca_file_stamp: int) -> ssl.SSLContext:
    """One context per CA file version (the stamp is its mtime): loading the
    system store for every probe would cost milliseconds of CPU each time."""
    if not verify:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    return ssl.create_default_context(cafile=ca_file or None)


def _host_header(h: HealthCheck, address: str) -> str:
    if h.host:
        return h.host
    default_port = 443 if h.check == "https" else 80
    host = host_port(address)
    return host if h.port == default_port else host_port(address, h.port)


async def http_probe(h: HealthCheck, address: str) -> ProbeResult:
    """GET h.path over HTTP or HTTPS (h.check); healthy when the status is h.expect."""
    clock = _Clock(h.timeout)
    url = f"{h.check}://{host_port(address, h.port)}{h.path}"
    stage = "connection"
    writer = None
    try:
        async with asyncio.timeout(h.timeout):
            reader, writer = await asyncio.open_connection(address, h.port)
            if h.check == "https":
                stage = "TLS handshake"
                stamp = os.stat(h.ca_file).st_mtime_ns if h.ca_file else 0
                ctx = _tls_context(h.ca_file, h.tls_verify, stamp)
                # Without server_name the certificate must name the backend's
                # IP address (Python matches IP SANs and sends no SNI for IPs).
                name = h.server_name or (address if h.tls_verify else None)
                await writer.start_tls(ctx, server_hostname=name)
            stage = "response"
            writer.write(
                f"GET {h.path} HTTP/1.1\r\nHost: {_host_header(h, address)}\r\n"
                f"User-Agent: xdplb-health\r\nAccept: */*\r\nConnection: close\r\n\r\n".encode("ascii")
            )
            line = await reader.readline()
    except TimeoutError:
        return clock.result(False, f"GET {url}: no {stage} within {h.timeout:g}s", "timeout")
    except ConnectionRefusedError:
        return clock.result(False, f"GET {url}: connection refused", "refused")
    except ssl.SSLCertVerificationError as exc:
        return clock.result(False, f"GET {url}: TLS certificate rejected: {exc.verify_message}", "tls")
    except (ssl.SSLError, OSError) as exc:
        text = getattr(exc, "reason", None) or exc.strerror or str(exc) or type(exc).__name__
        if stage == "TLS handshake":
            return clock.result(False, f"GET {url}: TLS handshake failed: {text}", "tls")
        return clock.result(False, f"GET {url}: {stage} failed: {text}", "error")
    except ValueError:  # a status line longer than the stream's 64 KiB limit
        return clock.result(False, f"GET {url}: the answer is not HTTP", "error")
    finally:
        if writer is not None:
            await _close(writer, clock)
    m = _STATUS_LINE.match(line)
    if not line:
        return clock.result(False, f"GET {url}: the server closed the connection without answering", "error")
    if not m:
        return clock.result(False, f"GET {url}: the answer is not HTTP: {line[:40]!r}", "error")
    status = int(m.group(1))
    if status != h.expect:
        return clock.result(False, f"GET {url} returned {status}, expected {h.expect}", "http_status")
    return clock.result(True, f"GET {url} returned {status}")


async def _close(writer: asyncio.StreamWriter, clock: _Clock) -> None:
    """Close politely within what is left of the timeout, else drop the socket.
    (A TLS close waits for the peer's close_notify, up to 30 s by default.)"""
    writer.close()
    try:
        async with asyncio.timeout(clock.left()):
            await writer.wait_closed()
    except (TimeoutError, ssl.SSLError, OSError):
        writer.transport.abort()


# ---- dicom -------------------------------------------------------------------

async def dicom_probe(h: HealthCheck, address: str) -> ProbeResult:
    """A-ASSOCIATE (Verification), C-ECHO, A-RELEASE with pynetdicom.

    pynetdicom blocks, so the exchange runs in a thread of its own; its own
    timeouts come from the probe's deadline, so a thread the asyncio side
    has given up on aborts its association and ends about then too."""
    await asyncio.sleep(random.uniform(0.0, min(DICOM_START_JITTER, h.interval / 10)))
    slots = _dicom_slots()
    await slots.acquire()  # given back when the thread ends, which may be after a timeout here
    clock = _Clock(h.timeout)
    progress = {"stage": "connection"}
    try:
        async with asyncio.timeout(h.timeout):
            return await _in_own_thread(_dicom_echo, h, address, clock, progress, finally_=slots.release)
    except TimeoutError:
        return clock.result(
            False, f"C-ECHO to {h.called_ae}@{host_port(address, h.port)}: no {progress['stage']} "
                   f"within {h.timeout:g}s", "timeout")
    except Exception as exc:  # pynetdicom raises plain exceptions for its own troubles
        return clock.result(False, f"C-ECHO to {h.called_ae}@{host_port(address, h.port)} failed: {exc}",
                            "error")


_ABORT_SOURCES = {0: "the peer application", 1: "reserved", 2: "the peer's DICOM service provider"}


def _dicom_echo(h: HealthCheck, address: str, clock: _Clock, progress: dict) -> ProbeResult:
    target = f"C-ECHO to {h.called_ae}@{host_port(address, h.port)}"
    seen: dict = {"opened": False, "abort": None, "reject": None}

    def opened(event) -> None:
        seen["opened"] = True
        progress["stage"] = "A-ASSOCIATE response"
        event.assoc.acse_timeout = max(clock.left(), 0.001)  # connecting used part of the budget

    def acse_received(event) -> None:
        if isinstance(event.primitive, A_ABORT):
            source = event.primitive.abort_source
            seen["abort"] = f"A-ABORT, source {source} ({_ABORT_SOURCES.get(source, 'unknown')})"
        elif isinstance(event.primitive, A_P_ABORT):
            seen["abort"] = f"A-P-ABORT, provider reason 0x{event.primitive.provider_reason:02X}"

    def pdu_received(event) -> None:
        # pynetdicom 3.0 can see the peer's close before it reads the
        # A-ASSOCIATE-RJ or A-ABORT it already received, and then reports a
        # bare abort with no primitive; a PACS that rejects and closes at
        # once (as Orthanc does) hits that about 1 time in 20.  The PDU as
        # received is the truth; acse_received, when it runs, says it the
        # usual way.
        if isinstance(event.pdu, A_ASSOCIATE_RJ):
            seen["reject"] = event.pdu.to_primitive()
        elif isinstance(event.pdu, A_ABORT_RQ) and seen["abort"] is None:
            source = event.pdu.source
            seen["abort"] = (f"A-ABORT, source {source} ({_ABORT_SOURCES.get(source, 'unknown')}), "
                             f"reason 0x{event.pdu.reason_diagnostic:02X}")

    ae = AE(ae_title=h.calling_ae)
    ae.add_requested_context(Verification)
    budget = max(clock.left(), 0.001)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = budget
    assoc = ae.associate(address, h.port, ae_title=h.called_ae, evt_handlers=[
        (evt.EVT_CONN_OPEN, opened), (evt.EVT_ACSE_RECV, acse_received),
        (evt.EVT_PDU_RECV, pdu_received)])

    if assoc.is_established:
        try:
            progress["stage"] = "C-ECHO response"
            assoc.dimse_timeout = max(clock.left(), 0.001)
            status = assoc.send_c_echo()
            code = status.get("Status") if status else None
            if code is not None and assoc.is_established:
                progress["stage"] = "A-RELEASE response"
                assoc.acse_timeout = max(clock.left(), 0.001)
                assoc.release()
        finally:
            if assoc.is_established:
                assoc.abort()
        if code is None:
            if seen["abort"]:
                return clock.result(False, f"{target}: association aborted before the C-ECHO "
                                           f"response ({seen['abort']})", "aborted")
            return clock.result(False, f"{target}: no C-ECHO response within {h.timeout:g}s", "timeout")
        if code != 0x0000:
            return clock.result(False, f"{target} returned status 0x{code:04X}, expected 0x0000",
                                "echo_status")
        return clock.result(True, f"{target} succeeded (status 0x0000)")

    if assoc.is_rejected or seen["reject"] is not None:
        rsp = assoc.acceptor.primitive if assoc.is_rejected else seen["reject"]
        return clock.result(
            False, f"{target}: association rejected, result 0x{rsp.result:02X} ({rsp.result_str}), "
                   f"source 0x{rsp.result_source:02X} ({rsp.source_str}), "
                   f"reason 0x{rsp.diagnostic:02X} ({rsp.reason_str})", "rejected")
    if not seen["opened"]:
        return _connect_failure(target, address, h.port, clock)
    if seen["abort"]:
        return clock.result(False, f"{target}: association aborted ({seen['abort']})", "aborted")
    if assoc.acceptor.primitive is not None and assoc.acceptor.primitive.result == 0x00:
        return clock.result(False, f"{target}: association accepted without the Verification "
                                   f"SOP Class (1.2.840.10008.1.1)", "rejected")
    if clock.left() > 0.001:
        # Over before the deadline with nothing said: the peer closed (or
        # reset) the connection without answering, which is no timeout.
        return clock.result(False, f"{target}: connection closed without an A-ASSOCIATE response",
                            "aborted")
    return clock.result(False, f"{target}: no A-ASSOCIATE response within {h.timeout:g}s", "timeout")


def _connect_failure(target: str, address: str, port: int, clock: _Clock) -> ProbeResult:
    """pynetdicom only logs why its connect failed, so try once more to learn
    it: refused (nothing listening), timed out, or another network error."""
    if clock.left() <= 0.001:
        return clock.result(False, f"{target}: connect timed out after {clock.timeout:g}s", "timeout")
    try:
        socket.create_connection((address, port), timeout=clock.left()).close()
    except ConnectionRefusedError:
        return clock.result(False, f"{target}: connection refused", "refused")
    except TimeoutError:
        return clock.result(False, f"{target}: connect timed out after {clock.timeout:g}s", "timeout")
    except OSError as exc:
        return clock.result(False, f"{target}: connect failed: {exc.strerror or exc}", "error")
    return clock.result(False, f"{target}: connect failed, then a second attempt succeeded", "error")


_SLOTS: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore]" = weakref.WeakKeyDictionary()


def _dicom_slots() -> asyncio.Semaphore:
    """The running loop's DICOM thread slots (an asyncio semaphore belongs to one loop)."""
    loop = asyncio.get_running_loop()
    slots = _SLOTS.get(loop)
    if slots is None:
        slots = _SLOTS[loop] = asyncio.Semaphore(DICOM_MAX_THREADS)
    return slots


def _in_own_thread(fn: Callable, *args, finally_: Callable[[], None] | None = None) -> asyncio.Future:
    """Start blocking fn in a new daemon thread now; return a future of its
    result. `finally_` runs in the loop once the thread has ended (started
    here, not in a coroutine, so a cancelled caller cannot skip it).

    Not asyncio.to_thread: the default executor has min(32, cpus + 4)
    workers, so a few hung DICOM peers would queue every other backend's
    probe behind them."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def settle(value, error) -> None:
        if done.done():  # the probe gave up (timeout) before the thread ended
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(value)

    def work() -> None:
        try:
            value, error = fn(*args), None
        except BaseException as exc:  # handed to the awaiting task
            value, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, value, error)
            if finally_ is not None:
                loop.call_soon_threadsafe(finally_)
        except RuntimeError:
            pass  # the event loop has closed meanwhile; nobody is waiting

    try:
        threading.Thread(target=work, name="xdplb-dicom-probe", daemon=True).start()
    except BaseException:
        if finally_ is not None:
            finally_()
        raise
    return done


# ---- entry points ------------------------------------------------------------

async def _tcp(h: HealthCheck, address: str) -> ProbeResult:
    return await tcp_probe(address, h.port, h.timeout)


PROBES = {"tcp": _tcp, "http": http_probe, "https": http_probe, "dicom": dicom_probe}


async def run_probe(health: HealthCheck, address: str) -> ProbeResult:
    """Probe one backend as its service's [service.health] table says."""
    return await PROBES[health.check](health, address)


async def probe(check: str, address: str, port: int, timeout: float) -> ProbeResult:
    """The older entry point, for checks that need nothing but a port (tcp)."""
    if check != "tcp":
        raise ValueError(f"probe() only runs tcp checks; use run_probe() for {check!r}")
    return await tcp_probe(address, port, timeout)
