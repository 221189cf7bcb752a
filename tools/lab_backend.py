#!/usr/bin/python3
"""Tiny multi-protocol backend server for the xdplb namespace lab.

Runs inside one backend namespace (started by ``tools/lab.py``) and answers
every request with its own name, so a test can tell which backend a load
balanced connection landed on.  Standard library only.

Listeners (bound to ``--bind``, default 0.0.0.0 so that traffic addressed
to the VIP on ``lo`` is accepted as well; ``--bind ::`` serves IPv6 and,
through mapped addresses, IPv4 on the same sockets, for the dual-stack lab):

* HTTP on 80 and 8080: ``GET /bytes?n=N`` returns N bytes of payload,
  ``GET /random?n=N&seed=S`` N pseudo-random bytes that ``pattern(S, N)``
  reproduces (a transfer checked byte for byte), ``GET /peer`` the
  connection's source address as this server sees it (``"<name> <address>\\n"``),
  ``GET /headers`` the request's headers as received (what a proxy added),
  any other GET returns ``"<name>\\n"``; every response carries
  ``X-Backend: <name>``.
* sink on TCP 9000: reads until EOF, then writes ``"<name> <count>\\n"``.
* UDP echo on 5000: answers each datagram with ``"<name> <len>\\n"``.
* UDP mirror on 5001: answers each datagram with ``"<name> <source address>\\n"``
  followed by the datagram itself, byte for byte.
* hello on TCP 104 and 11112: writes ``"<name>\\n"`` on connect, reads until
  EOF, closes (a stand-in for DICOM).

Once every listener is bound it prints ``ready <name> pid=<pid>`` and, when
``--ready-file`` is given, creates that file.  SIGTERM / SIGINT exit at once.
"""

from __future__ import annotations

import argparse
import http.server
import os
import random
import signal
import socket
import socketserver
import sys
import threading
import urllib.parse

MAX_BYTES = 1 << 31          # upper bound for /bytes?n=
CHUNK = 64 * 1024            # write / read chunk size
IDLE_TIMEOUT = 600.0         # seconds a silent TCP client may hold a thread


def _ports(text: str) -> list[int]:
    """Parse a comma separated port list such as ``"80,8080"``."""
    return [int(p) for p in text.split(",") if p.strip()]


class _TCPServer(socketserver.ThreadingTCPServer):
    """Threaded TCP server that rebinds quickly and never blocks exit."""

    allow_reuse_address = True
    daemon_threads = True


class _HTTPServer(http.server.ThreadingHTTPServer):
    """Threaded HTTP server that rebinds quickly and never blocks exit."""

    allow_reuse_address = True
    daemon_threads = True


def make_http_handler(name: str) -> type[http.server.BaseHTTPRequestHandler]:
    """Build the HTTP handler class that answers as backend ``name``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "xdplb-lab-backend"
        timeout = IDLE_TIMEOUT

        def do_GET(self) -> None:  # noqa: N802 (http.server naming)
            url = urllib.parse.urlsplit(self.path)
            if url.path == "/random":
                query = urllib.parse.parse_qs(url.query)
                try:
                    size, seed = int(query.get("n", ["0"])[0]), int(query.get("seed", ["0"])[0])
                except ValueError:
                    size = seed = -1
                if not 0 <= size <= MAX_BYTES or seed < 0:
                    self._reply(400, b"bad n or seed\n")
                    return
                self._headers(200, size)
                for part in pattern(seed, size):
                    self.wfile.write(part)
            elif url.path == "/peer":
                self._reply(200, f"{name} {self.client_address[0]}\n".encode())
            elif url.path == "/bytes":
                query = urllib.parse.parse_qs(url.query)
                try:
                    size = int(query.get("n", ["0"])[0])
                except ValueError:
                    size = -1
                if not 0 <= size <= MAX_BYTES:
                    self._reply(400, b"bad n\n")
                    return
                self._reply_bytes(size)
            elif url.path == "/headers":
                self._reply(200, str(self.headers).encode())
            else:
                self._reply(200, f"{name}\n".encode())

        def _headers(self, code: int, length: int) -> None:
            self.send_response(code)
            self.send_header("X-Backend", name)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(length))
            self.send_header("Connection", "close")
            self.end_headers()

        def _reply(self, code: int, body: bytes) -> None:
            self._headers(code, len(body))
            self.wfile.write(body)

        def _reply_bytes(self, size: int) -> None:
            self._headers(200, size)
            block = b"x" * CHUNK
            left = size
            while left > 0:
                part = block if left >= CHUNK else block[:left]
                self.wfile.write(part)
                left -= len(part)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            """Keep the log quiet: one line per request would flood it."""

    return Handler


def make_sink_handler(name: str) -> type[socketserver.BaseRequestHandler]:
    """Build the handler that counts bytes until EOF, then reports them."""

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock: socket.socket = self.request
            sock.settimeout(IDLE_TIMEOUT)
            count = 0
            try:
                while True:
                    data = sock.recv(CHUNK)
                    if not data:
                        break
                    count += len(data)
                sock.sendall(f"{name} {count}\n".encode())
            except OSError:
                pass  # client went away; nothing to report to

    return Handler


def make_hello_handler(name: str) -> type[socketserver.BaseRequestHandler]:
    """Build the handler that greets with the name, then drains until EOF."""

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock: socket.socket = self.request
            sock.settimeout(IDLE_TIMEOUT)
            try:
                sock.sendall(f"{name}\n".encode())
                while sock.recv(CHUNK):
                    pass
            except OSError:
                pass

    return Handler


def make_udp_handler(name: str) -> type[socketserver.BaseRequestHandler]:
    """Build the UDP handler that answers ``"<name> <len>\\n"``."""

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data, sock = self.request
            try:
                sock.sendto(f"{name} {len(data)}\n".encode(), self.client_address)
            except OSError:
                pass

    return Handler


def make_mirror_handler(name: str) -> type[socketserver.BaseRequestHandler]:
    """Build the UDP handler that answers ``"<name> <source address>\\n"`` and the datagram."""

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data, sock = self.request
            try:
                sock.sendto(f"{name} {self.client_address[0]}\n".encode() + data, self.client_address)
            except OSError:
                pass

    return Handler


def pattern(seed: int, size: int):
    """``size`` pseudo-random bytes determined by ``seed``, in CHUNK-sized parts."""
    rng = random.Random(seed)
    left = size
    while left > 0:
        part = rng.randbytes(min(CHUNK, left))
        left -= len(part)
        yield part


class _UDPServer(socketserver.UDPServer):
    """UDP server that rebinds quickly."""

    allow_reuse_address = True


def _server(cls: type, bind: str, port: int, handler: type) -> socketserver.BaseServer:
    """``cls`` bound to (bind, port); an IPv6 socket when ``bind`` is IPv6."""
    if ":" in bind:
        cls = type(cls.__name__ + "6", (cls,), {"address_family": socket.AF_INET6})
    return cls((bind, port), handler)


def build_servers(args: argparse.Namespace) -> list[socketserver.BaseServer]:
    """Bind every listener; raises OSError if any port is unavailable."""
    servers: list[socketserver.BaseServer] = []
    for port in _ports(args.http_ports):
        servers.append(_server(_HTTPServer, args.bind, port, make_http_handler(args.name)))
    servers.append(_server(_TCPServer, args.bind, args.sink_port, make_sink_handler(args.name)))
    servers.append(_server(_UDPServer, args.bind, args.udp_port, make_udp_handler(args.name)))
    servers.append(_server(_UDPServer, args.bind, args.mirror_port, make_mirror_handler(args.name)))
    for port in _ports(args.hello_ports):
        servers.append(_server(_TCPServer, args.bind, port, make_hello_handler(args.name)))
    return servers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line: name, bind address, ports, ready file."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="backend name reported to clients")
    p.add_argument("--bind", default="0.0.0.0", help="address to bind (default 0.0.0.0; :: for both families)")
    p.add_argument("--ready-file", help="file created once all listeners are bound")
    p.add_argument("--http-ports", default="80,8080")
    p.add_argument("--sink-port", type=int, default=9000)
    p.add_argument("--udp-port", type=int, default=5000)
    p.add_argument("--mirror-port", type=int, default=5001)
    p.add_argument("--hello-ports", default="104,11112")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Bind, announce readiness, serve until SIGTERM/SIGINT."""
    args = parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        servers = build_servers(args)
    except OSError as exc:
        print(f"error {args.name}: cannot bind: {exc}", file=sys.stderr, flush=True)
        return 1
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    if args.ready_file:
        with open(args.ready_file, "w", encoding="ascii") as fh:
            fh.write(f"{os.getpid()}\n")
    print(f"ready {args.name} pid={os.getpid()}", flush=True)
    while not stop.wait(3600):
        pass
    print(f"stopping {args.name}", flush=True)
    if args.ready_file:
        try:
            os.unlink(args.ready_file)
        except OSError:
            pass
    return 0  # daemon threads die with the process; no slow shutdown()


if __name__ == "__main__":
    sys.exit(main())
