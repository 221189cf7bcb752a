"""Health probes against real peers on 127.0.0.1: an HTTP server, a TLS
server with a CA and certificates made by the openssl CLI, pynetdicom SCPs
that accept, reject, abort or answer C-ECHO with an error, a refused port
and a listener that never answers. The IPv6 section runs every check kind
against peers on ::1."""
from __future__ import annotations

import asyncio
import http.server
import socket
import ssl
import subprocess
import threading
import time

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from xdplb import probes
from xdplb.config import HealthCheck
from xdplb.probes import probe, run_probe

LOCAL = "127.0.0.1"
LOCAL6 = "::1"


def check(kind: str, port: int, timeout: float = 2.0, **extra) -> HealthCheck:
    return HealthCheck(kind, port, max(timeout, 1.0), timeout, 2, 2, **extra)


def probe_now(health: HealthCheck, address: str = LOCAL):
    return asyncio.run(run_probe(health, address))


# ---- peers -------------------------------------------------------------------

@pytest.fixture
def hung_port():
    """A listener that never accepts: the kernel completes the TCP handshake
    from its backlog, then nothing is ever said."""
    s = socket.socket()
    s.bind((LOCAL, 0))
    s.listen(64)
    yield s.getsockname()[1]
    s.close()


@pytest.fixture
def refused_port():
    s = socket.socket()
    s.bind((LOCAL, 0))
    port = s.getsockname()[1]
    s.close()  # bound, never listened: nothing answers there
    return port


class _Handler(http.server.BaseHTTPRequestHandler):
    """/ok -> 200, /down -> 503, /host-is/<name> -> 200 only if Host is <name>."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.server.hosts.append(self.headers.get("Host"))
        if self.path == "/ok":
            status = 200
        elif self.path.startswith("/host-is/"):
            status = 200 if self.headers.get("Host") == self.path[len("/host-is/"):] else 400
        else:
            status = 503
        body = b"x" * 1000
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _HTTPServer6(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


def _serve(tls: ssl.SSLContext | None = None, host: str = LOCAL):
    server = (_HTTPServer6 if ":" in host else http.server.ThreadingHTTPServer)((host, 0), _Handler)
    server.hosts = []
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server


@pytest.fixture
def http_server():
    server = _serve()
    yield server
    server.shutdown()
    server.server_close()


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA and two server certificates it signed: one naming
    pacs.example.test, 127.0.0.1 and ::1, one naming only pacs.example.test."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "2", "-subj", "/CN=xdplb test CA", cwd=d)
    for name, san in [("with-ip", "DNS:pacs.example.test,IP:127.0.0.1,IP:::1"), ("dns-only", "DNS:pacs.example.test")]:
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", "/CN=pacs.example.test", cwd=d)
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    return d


def _tls_server(pki, name, host: str = LOCAL):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / f"{name}.pem", pki / f"{name}.key")
    return _serve(ctx, host)


@pytest.fixture
def https_server(pki):
    server = _tls_server(pki, "with-ip")
    yield server
    server.shutdown()
    server.server_close()


def _scp(handlers=(), require_called_aet=False, host: str = LOCAL):
    ae = AE(ae_title="PACS-A")
    ae.add_supported_context(Verification)
    ae.require_called_aet = require_called_aet
    return ae.start_server((host, 0), block=False, evt_handlers=list(handlers))


@pytest.fixture
def scp_factory():
    servers = []

    def make(handlers=(), require_called_aet=False, host: str = LOCAL):
        server = _scp(handlers, require_called_aet, host)
        servers.append(server)
        return server.server_address[1]

    yield make
    for server in servers:
        server.shutdown()


# ---- a stop that cancels a probe as its step completes -------------------------
# The daemon's stop cancels every probe task and waits for them. On Python
# 3.11, asyncio.wait_for drops a cancellation that lands in the loop turn in
# which the operation it waits for completed (CPython gh-86296): the probe
# went on looping and `xdplb attach` never stopped (SIGTERM in the HA lab,
# daemon.stop() in test_daemon). These cancel the probe in exactly that turn.

def assert_cancelled_as_it_completes(health: HealthCheck, arm) -> None:
    """Run the probe as a task; arm(cancel) makes the probed step call cancel() as it
    completes. The task must end cancelled, not return a result."""
    async def scenario() -> asyncio.Task:
        holder = {}
        arm(lambda: holder["task"].cancel())
        holder["task"] = task = asyncio.get_running_loop().create_task(run_probe(health, LOCAL))
        await asyncio.wait({task}, timeout=10)
        return task

    task = asyncio.run(scenario())
    assert task.done(), "the probe neither returned nor ended within 10 s"
    assert task.cancelled(), f"the cancellation was lost: the probe returned {task.result()!r}"


def test_a_tcp_probe_cancelled_as_its_connect_completes_ends_cancelled(http_server, monkeypatch):
    port = http_server.server_address[1]
    real_open = asyncio.open_connection

    def arm(cancel):
        async def open_then_cancel(*args, **kwargs):
            connection = await real_open(*args, **kwargs)   # a real connection to a real listener
            cancel()                                         # the stop, in the turn the connect completes
            return connection
        monkeypatch.setattr(asyncio, "open_connection", open_then_cancel)

    assert_cancelled_as_it_completes(check("tcp", port), arm)


def test_a_dicom_probe_cancelled_as_its_thread_answers_ends_cancelled(scp_factory, monkeypatch):
    port = scp_factory()
    real_in_own_thread = probes._in_own_thread

    def arm(cancel):
        def in_own_thread_then_cancel(*args, **kwargs):
            done = real_in_own_thread(*args, **kwargs)
            done.add_done_callback(lambda _f: cancel())     # runs before the probe task resumes
            return done
        monkeypatch.setattr(probes, "_in_own_thread", in_own_thread_then_cancel)

    assert_cancelled_as_it_completes(check("dicom", port), arm)


# ---- tcp ---------------------------------------------------------------------

def test_tcp_through_run_probe_and_the_old_entry_point(http_server, refused_port):
    port = http_server.server_address[1]
    assert probe_now(check("tcp", port)).ok
    old = asyncio.run(probe("tcp", LOCAL, port, 1.0))
    assert old.ok and old.kind == "ok"
    assert probe_now(check("tcp", refused_port)).kind == "refused"


# ---- http --------------------------------------------------------------------

def test_http_200_is_healthy_and_host_defaults_to_the_backend_address(http_server):
    port = http_server.server_address[1]
    result = probe_now(check("http", port, path="/ok"))
    assert result.ok, result.reason
    assert result.reason == f"GET http://{LOCAL}:{port}/ok returned 200"
    assert http_server.hosts == [f"{LOCAL}:{port}"]


def test_http_503_is_unhealthy_with_status_in_the_reason(http_server):
    port = http_server.server_address[1]
    result = probe_now(check("http", port, path="/down"))
    assert (result.ok, result.kind) == (False, "http_status")
    assert result.reason == f"GET http://{LOCAL}:{port}/down returned 503, expected 200"


def test_http_expect_matches_another_status(http_server):
    port = http_server.server_address[1]
    assert probe_now(check("http", port, path="/down", expect=503)).ok
    assert probe_now(check("http", port, path="/ok", expect=204)).kind == "http_status"


def test_http_sends_the_configured_host_header(http_server):
    port = http_server.server_address[1]
    assert probe_now(check("http", port, path="/host-is/pacs-a.example", host="pacs-a.example")).ok
    assert probe_now(check("http", port, path="/host-is/pacs-a.example")).kind == "http_status"
    assert http_server.hosts == ["pacs-a.example", f"{LOCAL}:{port}"]


def test_http_refused_and_hung(refused_port, hung_port):
    refused = probe_now(check("http", refused_port))
    assert (refused.kind, refused.ok) == ("refused", False)
    started = time.monotonic()
    hung = probe_now(check("http", hung_port, timeout=0.5))
    assert time.monotonic() - started < 0.5 + 0.3
    assert hung.kind == "timeout"
    assert "no response within 0.5s" in hung.reason


def _serve_each(handle, backlog: int = 8):
    """A listener on LOCAL that runs ``handle(conn)`` for each connection, in
    turn, then closes it.  Returns (port, stop)."""
    s = socket.socket()
    s.bind((LOCAL, 0))
    s.listen(backlog)

    def serve():
        while True:
            try:
                conn, _ = s.accept()
            except OSError:
                return
            with conn:
                handle(conn)

    threading.Thread(target=serve, daemon=True).start()
    return s.getsockname()[1], s.close


@pytest.fixture
def one_line_server():
    """Accepts each connection, says `greeting` (may be b""), and closes it."""
    said = {"greeting": b""}
    port, stop = _serve_each(lambda conn: conn.sendall(said["greeting"]))
    yield port, said
    stop()


def test_http_to_a_server_that_is_not_http_is_an_error(one_line_server):
    port, said = one_line_server
    said["greeting"] = b"SSH-2.0-OpenSSH_9.2\r\n"
    result = probe_now(check("http", port))
    assert (result.ok, result.kind) == (False, "error")
    assert "the answer is not HTTP: b'SSH-2.0" in result.reason
    said["greeting"] = b""
    closed = probe_now(check("http", port))
    assert (closed.ok, closed.kind) == (False, "error")
    assert "closed the connection without answering" in closed.reason


# ---- https -------------------------------------------------------------------

def test_https_verified_with_ca_file_and_server_name(https_server, pki):
    port = https_server.server_address[1]
    result = probe_now(check("https", port, path="/ok", ca_file=str(pki / "ca.pem"),
                             server_name="pacs.example.test"))
    assert result.ok, result.reason
    assert result.reason == f"GET https://{LOCAL}:{port}/ok returned 200"


def test_https_without_server_name_verifies_the_backend_ip(https_server, pki):
    port = https_server.server_address[1]
    result = probe_now(check("https", port, path="/ok", ca_file=str(pki / "ca.pem")))
    assert result.ok, result.reason


def test_https_certificate_not_naming_the_ip_fails_without_server_name(pki):
    server = _tls_server(pki, "dns-only")
    try:
        port = server.server_address[1]
        result = probe_now(check("https", port, path="/ok", ca_file=str(pki / "ca.pem")))
        assert (result.ok, result.kind) == (False, "tls")
        assert "IP address mismatch" in result.reason
        named = probe_now(check("https", port, path="/ok", ca_file=str(pki / "ca.pem"),
                                server_name="pacs.example.test"))
        assert named.ok, named.reason
    finally:
        server.shutdown()
        server.server_close()


def test_https_wrong_server_name_fails_with_kind_tls(https_server, pki):
    port = https_server.server_address[1]
    result = probe_now(check("https", port, path="/ok", ca_file=str(pki / "ca.pem"),
                             server_name="other.example.test"))
    assert (result.ok, result.kind) == (False, "tls")
    assert "Hostname mismatch" in result.reason


def test_https_without_the_ca_fails_against_the_system_store(https_server):
    port = https_server.server_address[1]
    result = probe_now(check("https", port, path="/ok", server_name="pacs.example.test"))
    assert (result.ok, result.kind) == (False, "tls")
    assert "unable to get local issuer certificate" in result.reason


def test_https_tls_verify_false_skips_verification(https_server):
    port = https_server.server_address[1]
    result = probe_now(check("https", port, path="/ok", tls_verify=False))
    assert result.ok, result.reason
    assert probe_now(check("https", port, path="/down", tls_verify=False)).kind == "http_status"


def test_https_hung_handshake_times_out(hung_port):
    result = probe_now(check("https", hung_port, timeout=0.5, tls_verify=False))
    assert result.kind == "timeout"
    assert "no TLS handshake within 0.5s" in result.reason


def test_https_to_a_plain_http_server_is_a_tls_failure(http_server):
    result = probe_now(check("https", http_server.server_address[1], tls_verify=False))
    assert (result.ok, result.kind) == (False, "tls")


# ---- dicom -------------------------------------------------------------------

def test_dicom_echo_accepted_and_successful(scp_factory):
    port = scp_factory()
    result = probe_now(check("dicom", port))
    assert result.ok, result.reason
    assert result.reason == f"C-ECHO to ANY-SCP@{LOCAL}:{port} succeeded (status 0x0000)"


def test_dicom_uses_the_configured_ae_titles(scp_factory):
    calling = []
    port = scp_factory([(evt.EVT_C_ECHO, lambda e: calling.append(e.assoc.requestor.ae_title) or 0)],
                       require_called_aet=True)
    result = probe_now(check("dicom", port, calling_ae="XDPLB-GW1", called_ae="PACS-A"))
    assert result.ok, result.reason
    assert calling == ["XDPLB-GW1"]


def test_dicom_rejected_association_reports_the_codes(scp_factory):
    port = scp_factory(require_called_aet=True)  # only accepts called AE "PACS-A"
    result = probe_now(check("dicom", port, called_ae="WRONG-AE"))
    assert (result.ok, result.kind) == (False, "rejected")
    assert "result 0x01" in result.reason and "source 0x01" in result.reason
    assert "reason 0x07 (Called AE title not recognised)" in result.reason


def test_dicom_non_zero_echo_status(scp_factory):
    port = scp_factory([(evt.EVT_C_ECHO, lambda e: 0x0122)])
    result = probe_now(check("dicom", port))
    assert (result.ok, result.kind) == (False, "echo_status")
    assert "returned status 0x0122, expected 0x0000" in result.reason


def test_dicom_aborted_by_the_peer(scp_factory):
    def abort(event):
        event.assoc.abort()
        return 0x0000

    port = scp_factory([(evt.EVT_C_ECHO, abort)])
    result = probe_now(check("dicom", port))
    assert (result.ok, result.kind) == (False, "aborted")
    assert "A-ABORT" in result.reason


def _read_pdu(conn: socket.socket) -> bytes:
    """One whole PDU: type, reserved, 4-byte big-endian length, then the body."""
    data = b""
    while len(data) < 6 or len(data) < 6 + int.from_bytes(data[2:6], "big"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


@pytest.fixture
def answer_and_close_server():
    """Answers each connection with ``said["answer"]`` (raw PDU bytes, may be
    b""), reads its A-ASSOCIATE-RQ and closes at once - as Orthanc does when
    it rejects a calling AE title, only sooner."""
    said = {"answer": b""}

    def answer(conn: socket.socket) -> None:
        # Answering before reading makes the close come as early as it can;
        # the request is still read, so the close is a FIN (closing with
        # unread data would send a reset).
        conn.sendall(said["answer"])
        _read_pdu(conn)

    port, stop = _serve_each(answer, backlog=64)
    yield port, said
    stop()


# A-ASSOCIATE-RJ (PS3.8 9.3.4): type 0x03, reserved, length 4, reserved,
# result 0x01 (permanent), source 0x01 (service user), reason 0x03 (calling AE).
CALLING_AE_REJECT = bytes([0x03, 0x00, 0, 0, 0, 4, 0x00, 0x01, 0x01, 0x03])


def test_dicom_reject_then_close_is_always_a_rejection(answer_and_close_server):
    """pynetdicom (3.0) sometimes sees the peer's close before it looks at the
    A-ASSOCIATE-RJ it already received, and reports the association aborted
    (1 in 20 against Orthanc, 1 in 5 against this quicker peer).  The probe must still say rejected:
    a real PACS does exactly this, and CI once logged it as a timeout."""
    port, said = answer_and_close_server
    said["answer"] = CALLING_AE_REJECT

    async def many():
        return [await run_probe(check("dicom", port), LOCAL) for _ in range(100)]

    results = asyncio.run(many())
    wrong = [r.reason for r in results if r.kind != "rejected"]
    assert not wrong, f"{len(wrong)} of 100 not reported as rejected, e.g. {wrong[0]!r}"
    assert "reason 0x03 (Calling AE title not recognised)" in results[0].reason


def test_dicom_abort_then_close_is_always_an_abort(answer_and_close_server):
    """The same race with an A-ABORT: it was logged as a timeout."""
    port, said = answer_and_close_server
    # A-ABORT (PS3.8 9.3.8): type 0x07, length 4, source 2 (provider), reason 1.
    said["answer"] = bytes([0x07, 0x00, 0, 0, 0, 4, 0x00, 0x00, 0x02, 0x01])

    async def many():
        return [await run_probe(check("dicom", port, timeout=5.0), LOCAL) for _ in range(100)]

    results = asyncio.run(many())
    wrong = [r.reason for r in results if r.kind != "aborted" or "ABORT" not in r.reason]
    assert not wrong, f"{len(wrong)} of 100 not reported as aborted, e.g. {wrong[0]!r}"
    assert max(r.seconds for r in results) < 2.0


def test_dicom_closed_without_an_answer_is_not_called_a_timeout(answer_and_close_server):
    port, said = answer_and_close_server
    said["answer"] = b""

    async def many():
        return [await run_probe(check("dicom", port, timeout=5.0), LOCAL) for _ in range(50)]

    results = asyncio.run(many())
    wrong = [r.reason for r in results if r.kind != "aborted" or "within" in r.reason]
    assert not wrong, f"{len(wrong)} of 50 not reported as closed by the peer, e.g. {wrong[0]!r}"
    assert max(r.seconds for r in results) < 2.0


def test_dicom_refused(refused_port):
    result = probe_now(check("dicom", refused_port))
    assert (result.ok, result.kind) == (False, "refused")
    assert result.reason == f"C-ECHO to ANY-SCP@{LOCAL}:{refused_port}: connection refused"


def _probe_threads() -> list[str]:
    """Threads the DICOM probe started (and pynetdicom's, which they own)."""
    return [t.name for t in threading.enumerate() if t is not threading.main_thread()
            and not t.name.endswith("(serve)") and not t.name.startswith("ThreadPoolExecutor")]


def test_dicom_hung_listener_times_out_and_leaves_no_threads(hung_port):
    before = len(_probe_threads())

    async def many():
        return await asyncio.gather(*(run_probe(check("dicom", hung_port, timeout=0.4), LOCAL)
                                      for _ in range(8)))

    started = time.monotonic()
    results = asyncio.run(many())
    assert time.monotonic() - started < 0.4 + 0.3
    assert {r.kind for r in results} == {"timeout"}
    assert "no A-ASSOCIATE response within 0.4s" in results[0].reason
    deadline = time.monotonic() + 2.0
    while len(_probe_threads()) > before and time.monotonic() < deadline:
        time.sleep(0.05)
    # Other tests' servers may come and go meanwhile; only the probe's own
    # threads (and the pynetdicom ones they start) must all be gone.
    assert len(_probe_threads()) <= before, _probe_threads()


# ---- concurrency -------------------------------------------------------------

def test_hung_backends_never_delay_healthy_ones(hung_port, http_server, https_server, scp_factory):
    """Eight hung DICOM peers, a hung HTTP and a hung HTTPS peer, probed at
    the same time as healthy ones: the healthy probes finish long before the
    hung ones time out, and the hung ones end within their timeout."""
    dicom_port = scp_factory()
    hung = [check("dicom", hung_port, timeout=0.5) for _ in range(8)]
    hung += [check("http", hung_port, timeout=0.5), check("https", hung_port, timeout=0.5, tls_verify=False)]
    healthy = [
        check("tcp", http_server.server_address[1], timeout=5.0),
        check("http", http_server.server_address[1], timeout=5.0, path="/ok"),
        check("https", https_server.server_address[1], timeout=5.0, path="/ok", tls_verify=False),
        check("dicom", dicom_port, timeout=5.0),
        check("dicom", dicom_port, timeout=5.0),
    ]

    async def timed(h):
        result = await run_probe(h, LOCAL)
        return result, time.monotonic() - started

    async def everything():
        return await asyncio.gather(*(timed(h) for h in hung + healthy))

    started = time.monotonic()
    outcomes = asyncio.run(everything())
    hung_out, healthy_out = outcomes[:len(hung)], outcomes[len(hung):]
    for result, finished in healthy_out:
        assert result.ok, result.reason
        assert finished < 0.5, (result.reason, finished)
    for result, finished in hung_out:
        assert result.kind == "timeout", result.reason
        assert finished < 0.5 + 0.3, (result.reason, finished)


# ---- every check over IPv6 (peers on ::1) ------------------------------------

@pytest.fixture
def http_server6():
    server = _serve(host=LOCAL6)
    yield server
    server.shutdown()
    server.server_close()


def _refused_port6() -> int:
    s = socket.socket(socket.AF_INET6)
    s.bind((LOCAL6, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_tcp_over_ipv6(http_server6):
    port = http_server6.server_address[1]
    result = probe_now(check("tcp", port), LOCAL6)
    assert result.ok and result.reason == f"connect to [::1]:{port} succeeded"
    refused = probe_now(check("tcp", _refused_port6()), LOCAL6)
    assert refused.kind == "refused" and "[::1]:" in refused.reason


def test_http_over_ipv6_sends_a_bracketed_host_header(http_server6):
    port = http_server6.server_address[1]
    result = probe_now(check("http", port, path=f"/host-is/[::1]:{port}"), LOCAL6)
    assert result.ok, result.reason
    assert result.reason == f"GET http://[::1]:{port}/host-is/[::1]:{port} returned 200"
    assert http_server6.hosts == [f"[::1]:{port}"]
    down = probe_now(check("http", port, path="/down"), LOCAL6)
    assert (down.ok, down.kind) == (False, "http_status")


def test_http_host_header_over_ipv6_leaves_out_the_default_port():
    from xdplb.probes import _host_header
    assert _host_header(check("http", 80), "fd00::11") == "[fd00::11]"
    assert _host_header(check("https", 443), "fd00::11") == "[fd00::11]"
    assert _host_header(check("http", 8042), "fd00::11") == "[fd00::11]:8042"
    assert _host_header(check("http", 8042), "10.0.0.1") == "10.0.0.1:8042"


def test_https_over_ipv6_verifies_the_backend_ipv6_address(pki):
    server = _tls_server(pki, "with-ip", LOCAL6)
    try:
        port = server.server_address[1]
        result = probe_now(check("https", port, path="/ok", ca_file=str(pki / "ca.pem")), LOCAL6)
        assert result.ok, result.reason
        assert result.reason == f"GET https://[::1]:{port}/ok returned 200"
    finally:
        server.shutdown()
        server.server_close()
    server = _tls_server(pki, "dns-only", LOCAL6)
    try:
        result = probe_now(check("https", server.server_address[1], path="/ok", ca_file=str(pki / "ca.pem")),
                           LOCAL6)
        assert (result.ok, result.kind) == (False, "tls")
        assert "IP address mismatch" in result.reason
    finally:
        server.shutdown()
        server.server_close()


def test_dicom_echo_over_ipv6(scp_factory):
    calling = []
    port = scp_factory([(evt.EVT_C_ECHO, lambda e: calling.append(e.assoc.requestor.address) or 0)],
                       require_called_aet=True, host=LOCAL6)
    result = probe_now(check("dicom", port, called_ae="PACS-A"), LOCAL6)
    assert result.ok, result.reason
    assert result.reason == f"C-ECHO to PACS-A@[::1]:{port} succeeded (status 0x0000)"
    assert calling == [LOCAL6]
    rejected = probe_now(check("dicom", port, called_ae="WRONG-AE"), LOCAL6)
    assert (rejected.ok, rejected.kind) == (False, "rejected")
    closed = _refused_port6()
    refused = probe_now(check("dicom", closed), LOCAL6)
    assert (refused.ok, refused.kind) == (False, "refused")
    assert refused.reason == f"C-ECHO to ANY-SCP@[::1]:{closed}: connection refused"
