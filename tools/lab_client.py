#!/usr/bin/python3
"""Traffic for the lab, run inside the client namespace (stdlib only).

  lab_client.py hello HOST PORT N        N new TCP connections; prints each backend name
  lab_client.py watch HOST PORT SECONDS  one new connection every 50 ms; prints
                                         "<t> ok <name>" or "<t> fail <error>" per try
  lab_client.py upload HOST PORT BYTES SECONDS [SPORT]
                                         one connection (from source port SPORT if given)
                                         that streams BYTES evenly over SECONDS to the
                                         sink, then prints the sink's reply
  lab_client.py udp HOST PORT N SIZE     N datagrams of SIZE bytes from N source ports;
                                         prints each reply's backend name

Every line goes to stdout as soon as it is known (flushed), so a test can
read progress while the command runs.
"""
from __future__ import annotations

import socket
import sys
import time


def _say(text: str) -> None:
    print(text, flush=True)


def hello(host: str, port: int, count: int, timeout: float = 2.0) -> int:
    failures = 0
    for _ in range(count):
        try:
            with socket.create_connection((host, port), timeout=timeout) as sock:
                _say(sock.recv(256).decode().strip() or "(empty)")
        except OSError as exc:
            failures += 1
            _say(f"fail {exc}")
    return 1 if failures else 0


def watch(host: str, port: int, seconds: float, timeout: float = 0.5) -> int:
    start = time.monotonic()
    while (now := time.monotonic() - start) < seconds:
        try:
            with socket.create_connection((host, port), timeout=timeout) as sock:
                sock.settimeout(timeout)
                name = sock.recv(256).decode().strip()
                _say(f"{now:.3f} ok {name}" if name else f"{now:.3f} fail empty reply")
        except OSError as exc:
            _say(f"{now:.3f} fail {type(exc).__name__}")
        time.sleep(max(0.0, 0.05 - (time.monotonic() - start - now)))
    return 0


def upload(host: str, port: int, total: int, seconds: float, sport: int = 0) -> int:
    chunk = 16384
    chunks = max(1, total // chunk)
    pause = seconds / chunks
    sent = 0
    with socket.create_connection((host, port), timeout=10, source_address=("", sport)) as sock:
        _say(f"connected from port {sock.getsockname()[1]}")
        for i in range(chunks):
            size = chunk if i < chunks - 1 else total - sent
            sock.sendall(b"\xa5" * size)
            sent += size
            time.sleep(pause)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while data := sock.recv(256):
            reply += data
    _say(f"sent {sent}")
    _say(f"reply {reply.decode().strip()}")
    return 0


def udp(host: str, port: int, count: int, size: int) -> int:
    failures = 0
    for _ in range(count):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(2.0)
            sock.sendto(b"u" * size, (host, port))
            try:
                _say(sock.recv(256).decode().strip())
            except OSError as exc:
                failures += 1
                _say(f"fail {exc}")
    return 1 if failures else 0


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__)
        return 0 if len(argv) >= 2 else 2
    cmd, args = argv[1], argv[2:]
    try:
        if cmd == "hello":
            return hello(args[0], int(args[1]), int(args[2]))
        if cmd == "watch":
            return watch(args[0], int(args[1]), float(args[2]))
        if cmd == "upload":
            return upload(args[0], int(args[1]), int(args[2]), float(args[3]), int(args[4]) if len(args) > 4 else 0)
        if cmd == "udp":
            return udp(args[0], int(args[1]), int(args[2]), int(args[3]))
    except (IndexError, ValueError):
        print(f"lab_client.py: bad arguments for {cmd}; see --help", file=sys.stderr)
        return 2
    print(f"lab_client.py: unknown command {cmd!r}; see --help", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
