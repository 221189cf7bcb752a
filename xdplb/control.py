"""Control socket: how `xdplb status`, `drain`, `reload` and `top` reach the daemon.

Where: one Unix stream socket per attached interface, `<run dir>/<ifname>.sock`,
created with mode 0600 in a root-owned run directory. Interfaces in
different network namespaces may share a name (every lab host has an eth0),
so outside the initial namespace the run directory is a sub-directory
named after the namespace's inode.

Liveness: the daemon holds an exclusive flock on `<ifname>.lock`, beside
the socket, for its whole life (InstanceLock). The kernel lets go of it when
the process ends, however it ends, and a lock means the same in every pid
namespace, where a pid file does not. A daemon that is busy (a large
reload, a slow map read) may take seconds to answer, so a ping timeout
says nothing about whether it runs; the lock does. A second `attach` and
`xdplb detach` take the lock before they touch the socket, the program or
the maps, and so never take them from a running daemon.

Protocol: one request per connection, a JSON object on one line (UTF-8, at
most MAX_REQUEST bytes) with a "cmd" string; one JSON object on one line
back. ControlServer does the framing, the limits, the peer check (root
only, by SO_PEERCRED) and the idle timeout, and answers every malformed
request with {"error": "<one sentence>"}; the daemon supplies only a
handler from a request dict to a reply dict.
"""
from __future__ import annotations

import asyncio
import fcntl
import inspect
import json
import logging
import os
import socket
import stat
import struct
import time
from pathlib import Path
from typing import Awaitable, Callable, Union

log = logging.getLogger("xdplb")

DEFAULT_RUN_DIR = "/run/xdplb"
MAX_REQUEST = 16 * 1024   # bytes in one request line; real requests are under 200
IDLE_TIMEOUT = 5.0        # seconds a client may take to send its request, or to take its reply
REQUEST_TIMEOUT = 5.0     # client side: seconds to wait for an answer (status, drain, top)
RELOAD_TIMEOUT = 60.0     # client side: seconds to wait for a reload's answer
LOCK_WAIT = 1.0           # seconds a starting daemon retries a lock that a prober holds for an instant

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ControlError(RuntimeError):
    """The daemon could not be asked, or did not answer; the message is one sentence."""


class NotRunning(ControlError):
    pass


class NoAnswer(ControlError):
    """The daemon is running (it holds its lock) but did not answer in time."""


class AlreadyRunning(RuntimeError):
    """Another process holds the instance lock of this interface."""


class UnsafeRunDir(RuntimeError):
    """The run directory is not one only root can write to."""


# ---- where ---------------------------------------------------------------------


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


def lock_path(ifname: str) -> Path:
    return run_dir() / f"{ifname}.lock"


def _safe_dir(path: Path) -> None:
    """Create `path` (0700) if it is missing; refuse one that another user owns
    or can write to, since whoever can write there can replace the socket."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeRunDir(f"{path} is not a directory (a symlink or a file is in its place); "
                           f"refusing to use it as xdplb's run directory")
    if st.st_uid != os.geteuid():
        raise UnsafeRunDir(f"{path} is owned by uid {st.st_uid}, not by uid {os.geteuid()}; "
                           f"refusing to put xdplb's control socket there")
    if st.st_mode & 0o022:
        raise UnsafeRunDir(f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):04o}); "
                           f"refusing to put xdplb's control socket there")


def prepare_run_dir() -> Path:
    """The run directory, created if missing and checked: root's own, writable by no one else."""
    base = Path(os.environ.get("XDPLB_RUN_DIR", DEFAULT_RUN_DIR))
    base.parent.mkdir(parents=True, exist_ok=True)
    _safe_dir(base)
    here = run_dir()
    if here != base:
        _safe_dir(here)
    return here


# ---- liveness --------------------------------------------------------------------


class InstanceLock:
    """An exclusive flock on `<run dir>/<ifname>.lock`, held while an xdplb
    instance (or `xdplb detach`) owns the interface.

    release() removes the file while still holding the lock, so acquire()
    checks, once it has the lock, that the file it locked is still the one
    at the path; otherwise two processes could each lock a different file."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, ifname: str, wait: float = LOCK_WAIT) -> "InstanceLock":
        path = lock_path(ifname)
        deadline = time.monotonic() + wait
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                # `is_running` takes a shared lock for an instant; try again shortly.
                if time.monotonic() >= deadline:
                    raise AlreadyRunning(f"another xdplb instance is running on {ifname} "
                                         f"(it holds the lock {path})") from None
                time.sleep(0.05)
                continue
            try:
                mine = os.fstat(fd)
                there = os.stat(path)
                if (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino):
                    return cls(path, fd)
            except FileNotFoundError:
                pass
            os.close(fd)  # the holder before us removed it as it let go: lock the new one

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None


def is_running(ifname: str) -> bool:
    """True while a process holds the instance lock of `ifname`, however busy it is."""
    try:
        fd = os.open(lock_path(ifname), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def prepare(ifname: str) -> tuple[Path, InstanceLock]:
    """Claim `ifname` for a starting daemon: check the run directory, take the
    instance lock (AlreadyRunning if another instance holds it) and clear a
    stale socket, which only a dead instance can have left behind.
    Returns the socket path and the lock, to hold until the daemon ends."""
    prepare_run_dir()
    lock = InstanceLock.acquire(ifname)
    path = socket_path(ifname)
    try:
        path.unlink(missing_ok=True)
    except BaseException:
        lock.release()
        raise
    return path, lock


# ---- the client ---------------------------------------------------------------------


def request(ifname: str, message: dict, timeout: float | None = None) -> dict:
    """Send one request to the daemon on `ifname` and return its reply.

    Raises a ControlError with a one-sentence message: NotRunning when no
    instance runs there, NoAnswer when it runs but does not answer in time."""
    timeout = REQUEST_TIMEOUT if timeout is None else timeout
    path = socket_path(ifname)
    try:
        return request_path(path, message, timeout)
    except (FileNotFoundError, ConnectionRefusedError):
        if _running(ifname):
            raise NotRunning(f"the xdplb instance on {ifname} is still starting: its control socket "
                             f"is not open yet; try again in a few seconds") from None
        if path.exists():
            raise NotRunning(f"no xdplb instance is running on {ifname} (stale socket {path})") from None
        raise NotRunning(f"no xdplb instance is running on {ifname} (no control socket at {path})") from None
    except PermissionError:
        raise NotRunning(f"permission denied on {path}: the control socket is root only") from None
    except TimeoutError:
        if _running(ifname) is False:
            raise NoAnswer(f"the xdplb instance on {ifname} stopped without answering") from None
        raise NoAnswer(f"the xdplb instance on {ifname} did not answer within {timeout:g}s: "
                       f"it is running but busy; try again") from None
    except EOFError:
        raise NoAnswer(f"the xdplb instance on {ifname} closed the connection without replying") from None
    except OSError as exc:
        raise ControlError(f"cannot talk to the xdplb instance on {ifname} at {path}: "
                           f"{exc.strerror or exc}") from None
    except ValueError:
        raise ControlError(f"the xdplb instance on {ifname} sent a reply that is not a JSON object") from None


def _running(ifname: str) -> bool | None:
    """is_running, or None when this user may not even look."""
    try:
        return is_running(ifname)
    except OSError:
        return None


def request_path(path: Path, message: dict, timeout: float = REQUEST_TIMEOUT) -> dict:
    """One JSON request and reply over the control socket at `path`, all
    within `timeout` seconds.

    Raises OSError when the socket cannot be reached (TimeoutError when the
    answer is late), EOFError when the daemon closes it without a reply and
    ValueError when the reply is not a JSON object."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        try:
            sock.sendall(json.dumps(message).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before it read the request (not root): the reason waits to be read
        data = b""
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{path}: no answer within {timeout:g}s")
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    if not data:
        raise EOFError(f"{path}: closed without a reply")
    reply = json.loads(data)
    if not isinstance(reply, dict):
        raise ValueError(f"{path}: the reply is not a JSON object")
    return reply


# ---- the server -----------------------------------------------------------------------


Handler = Callable[[dict], Union[dict, Awaitable[dict]]]
_EXAMPLE = '{"cmd": "status"}'


class BadRequest(ValueError):
    """A request the server answers itself; the message is one sentence."""


def parse_request(line: bytes) -> dict:
    """One request line -> its JSON object with a "cmd" string, or BadRequest."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"the request is not UTF-8 text; send one JSON object on one line, such as {_EXAMPLE}") from None
    if not text.strip():
        raise BadRequest(f"the request is empty; send one JSON object on one line, such as {_EXAMPLE}")
    try:
        request = json.loads(text)
    except RecursionError:
        raise BadRequest("the request is nested too deeply to be a control request") from None
    except ValueError as exc:
        raise BadRequest(f"the request is not valid JSON ({exc})") from None
    if not isinstance(request, dict):
        raise BadRequest(f"the request must be a JSON object such as {_EXAMPLE}, not {_json_kind(request)}")
    if not isinstance(request.get("cmd"), str):
        raise BadRequest(f'the request has no "cmd" string; for example {_EXAMPLE}')
    return request


def _json_kind(value) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


class ControlServer:
    """The daemon's side of the control socket.

    `handler(request)` gets a parsed request (a dict with a "cmd" string)
    and returns the reply dict, or a coroutine that does. Everything else
    is answered here: input that is not one JSON object on one line within
    MAX_REQUEST bytes, a client that is not root, a handler that raises.
    A client that sends nothing (or does not read its reply) for
    `idle_timeout` seconds is dropped. Nothing a client sends puts a
    traceback in the log.
    """

    def __init__(self, path: Path | str, handler: Handler, *, idle_timeout: float | None = None,
                 max_request: int = MAX_REQUEST, allowed_uids: tuple[int, ...] = (0,)):
        self.path = Path(path)
        self.handler = handler
        self.idle_timeout = IDLE_TIMEOUT if idle_timeout is None else idle_timeout
        self.max_request = max_request
        self.allowed_uids = allowed_uids
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> "ControlServer":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # The socket is born 0600: there is no moment at which it is open
            # to others, as there is between bind() and a chmod() after it.
            old = os.umask(0o177)
            try:
                sock.bind(str(self.path))
            finally:
                os.umask(old)
            self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=self.max_request)
        except BaseException:
            sock.close()
            raise
        return self

    def close(self) -> None:
        """Stop accepting and remove the socket file."""
        if self._server is not None:
            self._server.close()
            self._server = None
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            reply = await self._reply_to(reader, writer)
            if reply is not None:
                writer.write(reply)
                await asyncio.wait_for(writer.drain(), self.idle_timeout)
        except (ConnectionError, TimeoutError):
            writer.transport.abort()  # gone, or not reading its reply: drop it
        except Exception as exc:  # no input may take the loop's error handler (and a traceback) with it
            log.error("control socket: dropped a connection: %s", exc)
            writer.transport.abort()
        finally:
            writer.close()

    async def _reply_to(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes | None:
        refused = self._refuse_peer(writer)
        if refused is not None:
            return _encode({"error": refused})
        try:
            line = await asyncio.wait_for(reader.readuntil(b"\n"), self.idle_timeout)
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                return None  # connected and left without a word
            line = exc.partial  # the last request of a client that then shut down its side
        except asyncio.LimitOverrunError:
            return _encode({"error": f"the request is longer than {self.max_request} bytes; "
                                     f"send one JSON object on one line, such as {_EXAMPLE}"})
        except TimeoutError:
            return _encode({"error": f"no request within {self.idle_timeout:g}s; closing"})
        try:
            request = parse_request(line)
        except BadRequest as exc:
            return _encode({"error": str(exc)})
        return _encode(await self._handle(request))

    def _refuse_peer(self, writer: asyncio.StreamWriter) -> str | None:
        sock = writer.get_extra_info("socket")
        pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        if uid in self.allowed_uids:
            return None
        log.warning("control socket: refused a client running as uid %d (pid %d): root only", uid, pid)
        return "the xdplb control socket is for root only"

    async def _handle(self, request: dict) -> dict:
        cmd = request["cmd"]
        try:
            reply = self.handler(request)
            if inspect.isawaitable(reply):
                reply = await reply
        except Exception as exc:
            log.error("control socket: the %r request failed: %s", cmd, exc)
            log.debug("control socket: the %r request failed", cmd, exc_info=True)
            return {"error": f"the {cmd!r} request failed inside xdplb: {exc}"}
        if not isinstance(reply, dict):
            log.error("control socket: the %r request returned %s, not a reply object", cmd, type(reply).__name__)
            return {"error": f"the {cmd!r} request failed inside xdplb: no reply object"}
        return reply


def _encode(reply: dict) -> bytes:
    try:
        return json.dumps(reply).encode() + b"\n"
    except (TypeError, ValueError) as exc:
        log.error("control socket: cannot encode a reply: %s", exc)
        return json.dumps({"error": f"xdplb could not encode its reply: {exc}"}).encode() + b"\n"
