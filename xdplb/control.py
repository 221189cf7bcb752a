"""Control socket: how `xdplb status` (and later drain/reload) reach the daemon.

One Unix stream socket per attached interface, mode 0600 in a 0700
directory, so only root can talk to the daemon. Requests and replies are one
JSON object per line. Interfaces in different network namespaces may share
a name (every lab host has an eth0), so outside the initial namespace the
socket lives in a sub-directory named after the namespace's inode.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

DEFAULT_RUN_DIR = "/run/xdplb"


class NotRunning(RuntimeError):
    pass


def _netns_id() -> str | None:
    try:
        mine = os.stat("/proc/self/ns/net").st_ino
        init = os.stat("/proc/1/ns/net").st_ino
    except OSError:
        return None
    return None if mine == init else f"netns-{mine}"


def run_dir() -> Path:
    base = Path(os.environ.get("XDPLB_RUN_DIR", DEFAULT_RUN_DIR))
    ns = _netns_id()
    return base / ns if ns else base


def socket_path(ifname: str) -> Path:
    return run_dir() / f"{ifname}.sock"


def request(ifname: str, message: dict, timeout: float = 5.0) -> dict:
    """Send one request to the daemon on `ifname` and return its reply."""
    path = socket_path(ifname)
    if not path.exists():
        raise NotRunning(f"no xdplb instance is running on {ifname} (no control socket at {path})")
    try:
        return request_path(path, message, timeout)
    except (ConnectionRefusedError, FileNotFoundError):
        raise NotRunning(f"no xdplb instance is running on {ifname} (stale socket {path})") from None
    except PermissionError:
        raise NotRunning(f"permission denied on {path}: the control socket is root only") from None
    except EOFError:
        raise NotRunning(f"the xdplb instance on {ifname} closed the connection without replying") from None


def request_path(path: Path, message: dict, timeout: float = 5.0) -> dict:
    """One JSON request and reply over the control socket at `path`.

    Raises OSError when the socket cannot be reached, EOFError when the
    daemon closes it without a reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps(message).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    if not data:
        raise EOFError(f"{path}: closed without a reply")
    return json.loads(data)


def prepare(ifname: str) -> Path:
    """Create the directory (0700) and clear a stale socket; return the path."""
    path = socket_path(ifname)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    if path.exists():
        try:
            request(ifname, {"cmd": "ping"}, timeout=1.0)
        except (NotRunning, OSError, ValueError):
            path.unlink()
        else:
            raise RuntimeError(f"another xdplb instance is already running on {ifname} ({path})")
    return path
