"""Pool file (TOML) parsing and validation.

A pool file says which virtual services (VIP, port, protocol) xdplb serves and
which PACS/DICOM backends stand behind each.  A hospital config must never be
half-understood, so everything is checked strictly: unknown keys (with a "did
you mean" hint), wrong types (a boolean is not an integer), bad addresses,
out-of-range numbers, duplicates.  The first problem found, in file order,
becomes one PoolError whose single sentence names the file, the key path and
the offending value.

Pure: ``parse_pool`` takes text and returns frozen dataclasses; only
``load_pool`` reads a file.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import math
import os
import re
import ssl
import tomllib
from dataclasses import dataclass
from os import PathLike
from typing import Any

from xdplb.maglev import is_prime

HEALTH_CHECK_KINDS = ("tcp", "http", "https", "dicom")
# Keys a [service.health] table may hold besides the common ones, per check
# kind.  A new kind adds its name to HEALTH_CHECK_KINDS, its extra keys here,
# and their fields to HealthCheck.
_HTTP_KEYS = ("path", "expect", "host")
_HEALTH_EXTRA_KEYS: dict[str, tuple[str, ...]] = {
    "tcp": (),
    "http": _HTTP_KEYS,
    "https": _HTTP_KEYS + ("ca_file", "tls_verify", "server_name"),
    "dicom": ("calling_ae", "called_ae"),
}
_HEALTH_KEYS = ("check", "port", "interval", "timeout", "rise", "fall")

PROTOCOLS = ("tcp", "udp")
NO_BACKEND_MODES = ("reset", "drop")
PERSISTENCE_MODES = ("flow", "client")

_TOP_KEYS = ("xdplb", "service")
_SETTINGS_KEYS = (
    "metrics", "manage_vips", "maglev_size", "flow_table_size",
    "max_services", "max_backends", "hash_seed", "no_backend",
    "udp_idle_timeout", "down_grace", "flood_guard_rate", "extra_macs",
)
_SERVICE_KEYS = ("name", "vip", "port", "protocol", "persistence", "health", "backend")
_BACKEND_KEYS = ("name", "address", "weight")

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_NAME_RULE = "1 to 64 characters from A-Z a-z 0-9 _ . -"

MAGLEV_SIZE_RANGE = (251, 1000003)
FLOW_TABLE_SIZE_RANGE = (1024, 16777216)
MAX_SERVICES_RANGE = (1, 1024)
MAX_BACKENDS_RANGE = (2, 65536)
HASH_SEED_RANGE = (0, 2**32 - 1)
PORT_RANGE = (1, 65535)
WEIGHT_RANGE = (0, 1000)
RISE_FALL_RANGE = (1, 100)
MAX_INTERVAL = 3600.0
UDP_IDLE_TIMEOUT_RANGE = (1.0, 86400.0)
DOWN_GRACE_MAX = 3600.0
FLOOD_GUARD_RATE_RANGE = (0, 100_000_000)
# MACs besides the interface's own that the data plane balances frames to
# (EXTRA_MACS in bpf/lb_consts.h; struct lb_config holds them).
MAX_EXTRA_MACS = 4
_MAC_RE = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}")


@dataclass(frozen=True)
class HealthCheck:
    """How the controller probes each backend of a service."""

    check: str
    port: int
    interval: float
    timeout: float
    rise: int
    fall: int
    # http and https: GET `path`, healthy when the status is `expect`; the
    # Host header is `host`, or the backend address when "".
    path: str = "/"
    expect: int = 200
    host: str = ""
    # https only.  ca_file "" with tls_verify true means the system CA store;
    # server_name "" means no SNI and the certificate must name the backend IP.
    ca_file: str = ""
    tls_verify: bool = True
    server_name: str = ""
    # dicom: the A-ASSOCIATE-RQ's calling (ours) and called (theirs) AE titles.
    calling_ae: str = "XDPLB"
    called_ae: str = "ANY-SCP"


@dataclass(frozen=True)
class Backend:
    """One PACS/DICOM server behind a service; weight 0 means drained."""

    name: str
    address: ipaddress.IPv4Address
    weight: int


@dataclass(frozen=True)
class Service:
    """A virtual service: traffic to vip:port/protocol is spread over backends."""

    name: str
    vip: ipaddress.IPv4Address
    port: int
    protocol: str
    persistence: str
    health: HealthCheck
    backends: tuple[Backend, ...]

    @property
    def key(self) -> tuple[ipaddress.IPv4Address, int, str]:
        """The (vip, port, protocol) triple the data plane matches on."""
        return (self.vip, self.port, self.protocol)


@dataclass(frozen=True)
class Settings:
    """Pool-wide settings from the optional [xdplb] table."""

    metrics: str = "127.0.0.1:9742"
    manage_vips: bool = True
    maglev_size: int = 65537
    flow_table_size: int = 262144
    max_services: int = 64
    max_backends: int = 4096
    hash_seed: int = 0
    no_backend: str = "reset"         # a service with no healthy backend: "reset" (fail fast) or "drop"
    udp_idle_timeout: float = 30.0    # seconds a UDP flow entry lives without a packet
    down_grace: float = 30.0          # seconds established flows stay on a down backend; 0: re-chosen at once
    flood_guard_rate: int = 2000      # new flow entries per second per CPU before the guard stops inserting; 0: off
    extra_macs: tuple[bytes, ...] = ()  # unicast MACs besides the interface's that are balanced (e.g. a VRRP vmac)


@dataclass(frozen=True)
class Pool:
    """A whole validated pool file; ``source`` is its path or "<string>"."""

    settings: Settings
    services: tuple[Service, ...]
    source: str


class PoolError(ValueError):
    """The pool file is unreadable or invalid; the message is one sentence."""


_MISSING = object()


def _show(value: Any) -> str:
    """Render a TOML value for an error message, in TOML-like spelling."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        return text if len(text) <= 80 else text[:76] + '..."'
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "{...}"
    if isinstance(value, list):
        inner = ", ".join(_show(v) for v in value[:5])
        return f"[{inner}{', ...' if len(value) > 5 else ''}]"
    return str(value)


def _kind(value: Any) -> str:
    """Name a TOML value's type for an error message."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return "a date/time"


def _quoted(words: tuple[str, ...] | list[str]) -> str:
    return ", ".join(f'"{w}"' for w in words)


def _path(label: str, key: str) -> str:
    return f"{label}.{key}" if label else key


class _Reader:
    """Typed getters that raise a PoolError naming the source and key path."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, sentence: str) -> PoolError:
        return PoolError(f"{self.source}: {sentence}")

    def check_keys(self, table: dict, label: str, known: tuple[str, ...]) -> None:
        for key in table:
            if key in known:
                continue
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f'did you mean "{close[0]}"?' if close else f"known keys are {_quoted(known)}"
            raise self.fail(f"{_path(label, key)} is not a known key; {hint}")

    def _get(self, table: dict, key: str, label: str, default: Any, expect: str) -> Any:
        value = table.get(key, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise self.fail(f"{_path(label, key)} is missing; expected {expect}")
            return default
        return value

    def string(self, table: dict, key: str, label: str, expect: str, default: Any = _MISSING) -> str:
        value = self._get(table, key, label, default, expect)
        if not isinstance(value, str):
            raise self.fail(
                f"{_path(label, key)} = {_show(value)} must be a string ({expect}), got {_kind(value)}"
            )
        return value

    def boolean(self, table: dict, key: str, label: str, default: Any = _MISSING) -> bool:
        value = self._get(table, key, label, default, "true or false")
        if not isinstance(value, bool):
            raise self.fail(
                f"{_path(label, key)} = {_show(value)} must be true or false, got {_kind(value)}"
            )
        return value

    def integer(
        self, table: dict, key: str, label: str, lo: int, hi: int, default: Any = _MISSING
    ) -> int:
        expect = f"an integer from {lo} to {hi}"
        value = self._get(table, key, label, default, expect)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"{_path(label, key)} = {_show(value)} must be {expect}, got {_kind(value)}")
        if not lo <= value <= hi:
            raise self.fail(f"{_path(label, key)} = {_show(value)} is out of range; expected {expect}")
        return value

    def seconds(
        self, table: dict, key: str, label: str, hi: float, default: Any = _MISSING, lo: float | None = None
    ) -> float:
        """A duration in (0, hi]; with `lo`, in [lo, hi] instead."""
        if lo is None:
            expect = f"a number of seconds greater than 0 and at most {hi:g}"
        else:
            expect = f"a number of seconds from {lo:g} to {hi:g}"
        value = self._get(table, key, label, default, expect)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(f"{_path(label, key)} = {_show(value)} must be {expect}, got {_kind(value)}")
        if not (math.isfinite(value) and (0 < value if lo is None else lo <= value) and value <= hi):
            raise self.fail(f"{_path(label, key)} = {_show(value)} is out of range; expected {expect}")
        return float(value)

    def choice(
        self, table: dict, key: str, label: str, choices: tuple[str, ...], what: str, default: str
    ) -> str:
        value = self.string(table, key, label, f"one of {_quoted(choices)}", default)
        if value not in choices:
            raise self.fail(
                f"{_path(label, key)} = {_show(value)} is not a known {what}; expected one of {_quoted(choices)}"
            )
        return value

    def table(self, parent: dict, key: str, label: str, header: str) -> dict:
        value = parent.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(
                f"{_path(label, key)} = {_show(value)} must be a table written [{header}], got {_kind(value)}"
            )
        return value

    def tables(self, parent: dict, key: str, label: str, header: str) -> list[dict]:
        value = parent.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.fail(
                f"{_path(label, key)} = {_show(value)} must be an array of tables written "
                f"[[{header}]], got {_kind(value) if not isinstance(value, list) else 'an array of other values'}"
            )
        return value

    def name(self, table: dict, label: str) -> str:
        value = self.string(table, "name", label, _NAME_RULE)
        if not _NAME_RE.fullmatch(value):
            raise self.fail(f"{_path(label, 'name')} = {_show(value)} must be {_NAME_RULE}")
        return value

    def address(self, table: dict, key: str, label: str, role: str) -> ipaddress.IPv4Address:
        expect = 'an IPv4 address such as "10.10.0.100"'
        text = self.string(table, key, label, expect)
        where = f"{_path(label, key)} = {_show(text)}"
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            raise self.fail(f"{where} is not a valid IPv4 address") from None
        if addr.version == 6:
            raise self.fail(f"{where} is an IPv6 address; IPv6 is not supported yet")
        problem = _unusable_address(addr)
        if problem:
            raise self.fail(f"{where} is {problem}, which cannot be used as a {role}")
        return addr


def _unusable_address(addr: ipaddress.IPv4Address) -> str:
    """Return why an address cannot carry balanced traffic, or "" if it can."""
    if addr.is_unspecified:
        return "the unspecified address"
    if addr == ipaddress.IPv4Address("255.255.255.255"):
        return "the broadcast address"
    if addr.is_multicast:
        return "a multicast address"
    if addr.is_loopback:
        return "a loopback address"
    return ""


def _valid_metrics(text: str) -> bool:
    """True for "" or "host:port" with an IP (IPv6 in brackets) or localhost."""
    if text == "":
        return True
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            return False
        try:
            if ipaddress.ip_address(host).version != 6:
                return False
        except ValueError:
            return False
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            return False
        if host != "localhost":
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                return False
    return port.isascii() and port.isdigit() and 1 <= int(port) <= 65535


def _nearby_primes(n: int) -> tuple[int, int]:
    below = n - 1
    while below > 2 and not is_prime(below):
        below -= 1
    above = n + 1
    while not is_prime(above):
        above += 1
    return below, above


def _parse_settings(r: _Reader, doc: dict) -> Settings:
    label = "xdplb"
    t = r.table(doc, "xdplb", "", "xdplb")
    r.check_keys(t, label, _SETTINGS_KEYS)
    d = Settings()
    metrics = r.string(t, "metrics", label, '"host:port" or ""', d.metrics)
    if not _valid_metrics(metrics):
        raise r.fail(
            f"{label}.metrics = {_show(metrics)} must be \"\" (disabled) or \"host:port\" with an IP "
            f'address or localhost, e.g. "127.0.0.1:9742" or "[::1]:9742"'
        )
    manage_vips = r.boolean(t, "manage_vips", label, d.manage_vips)
    maglev_size = r.integer(t, "maglev_size", label, *MAGLEV_SIZE_RANGE, d.maglev_size)
    if not is_prime(maglev_size):
        below, above = _nearby_primes(maglev_size)
        raise r.fail(
            f"{label}.maglev_size = {maglev_size} must be a prime number; "
            f"the nearest primes are {below} and {above}"
        )
    return Settings(
        metrics=metrics,
        manage_vips=manage_vips,
        maglev_size=maglev_size,
        flow_table_size=r.integer(t, "flow_table_size", label, *FLOW_TABLE_SIZE_RANGE, d.flow_table_size),
        max_services=r.integer(t, "max_services", label, *MAX_SERVICES_RANGE, d.max_services),
        max_backends=r.integer(t, "max_backends", label, *MAX_BACKENDS_RANGE, d.max_backends),
        hash_seed=r.integer(t, "hash_seed", label, *HASH_SEED_RANGE, d.hash_seed),
        no_backend=r.choice(t, "no_backend", label, NO_BACKEND_MODES, "no_backend behaviour", d.no_backend),
        udp_idle_timeout=r.seconds(t, "udp_idle_timeout", label, UDP_IDLE_TIMEOUT_RANGE[1], d.udp_idle_timeout,
                                   lo=UDP_IDLE_TIMEOUT_RANGE[0]),
        down_grace=r.seconds(t, "down_grace", label, DOWN_GRACE_MAX, d.down_grace, lo=0.0),
        flood_guard_rate=r.integer(t, "flood_guard_rate", label, *FLOOD_GUARD_RATE_RANGE, d.flood_guard_rate),
        extra_macs=_extra_macs(r, t, label),
    )


def _extra_macs(r: _Reader, t: dict, label: str) -> tuple[bytes, ...]:
    """[xdplb] extra_macs: unicast MACs, besides the interface's, whose frames are balanced."""
    key = "extra_macs"
    value = t.get(key, [])
    expect = f'an array of at most {MAX_EXTRA_MACS} MAC addresses such as ["00:00:5e:00:01:33"]'
    if not isinstance(value, list):
        raise r.fail(f"{label}.{key} = {_show(value)} must be {expect}, got {_kind(value)}")
    if len(value) > MAX_EXTRA_MACS:
        raise r.fail(f"{label}.{key} = {_show(value)} holds {len(value)} addresses; expected {expect}")
    macs: list[bytes] = []
    for i, text in enumerate(value):
        where = f"{label}.{key}[{i}] = {_show(text)}"
        if not isinstance(text, str) or not _MAC_RE.fullmatch(text):
            raise r.fail(f'{where} is not a MAC address written like "00:00:5e:00:01:33"')
        mac = bytes.fromhex(text.replace(":", ""))
        if mac[0] & 1:
            raise r.fail(f"{where} is a multicast or broadcast address; only unicast MACs can be balanced")
        if mac == bytes(6):
            raise r.fail(f"{where} is the all-zero address, which no frame is sent to")
        if mac in macs:
            raise r.fail(f"{where} repeats {label}.{key}[{macs.index(mac)}]")
        macs.append(mac)
    return tuple(macs)


_HTTP_PATH_RE = re.compile(r"/[\x21-\x7e]*")
_HTTP_HOST_RE = re.compile(r"[\x21-\x7e]{1,255}")
_DNS_NAME_RE = re.compile(
    r"(?=.{1,253}\.?$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)
_AE_RULE = "1 to 16 printable ASCII characters, no backslash, not all spaces"
HTTP_STATUS_RANGE = (100, 599)


def _check_kind_keys(r: _Reader, t: dict, label: str, check: str) -> None:
    """Reject keys of another check kind by name, then any other unknown key."""
    known = _HEALTH_KEYS + _HEALTH_EXTRA_KEYS[check]
    for key in t:
        if key in known:
            continue
        owners = [k for k in HEALTH_CHECK_KINDS if key in _HEALTH_EXTRA_KEYS[k]]
        if owners:
            raise r.fail(
                f"{label}.{key} is not a known key for check = {_show(check)}; it applies only to "
                f"check = {' or '.join(_show(k) for k in owners)}"
            )
        r.check_keys(t, label, known)  # raises on this key, with a "did you mean"


def _ca_file(r: _Reader, t: dict, label: str) -> str:
    """The CA bundle's absolute path; a relative one is taken from the pool file's folder."""
    text = r.string(t, "ca_file", label, "the path of a PEM CA certificate file", "")
    if text == "":
        return ""
    where = f"{label}.ca_file = {_show(text)}"
    base = os.path.dirname(os.path.abspath(r.source)) if r.source != "<string>" else os.getcwd()
    path = os.path.join(base, os.path.expanduser(text))
    if not os.path.isfile(path):
        raise r.fail(f"{where} is not an existing file (looked for {path})")
    try:
        ssl.create_default_context(cafile=path)
    except (ssl.SSLError, OSError) as err:
        raise r.fail(f"{where} is not a readable PEM CA certificate file: {err.strerror or err}") from None
    return os.path.normpath(path)


def _ae_title(r: _Reader, t: dict, label: str, key: str, default: str) -> str:
    value = r.string(t, key, label, _AE_RULE, default)
    if not (1 <= len(value) <= 16 and value.isascii() and value.isprintable()
            and "\\" not in value and value.strip(" ")):
        raise r.fail(f"{label}.{key} = {_show(value)} is not a valid DICOM AE title; expected {_AE_RULE}")
    return value


def _parse_health(r: _Reader, svc: dict, svc_label: str, service_port: int) -> HealthCheck:
    label = f"{svc_label}.health"
    t = r.table(svc, "health", svc_label, "service.health")
    check = r.choice(t, "check", label, HEALTH_CHECK_KINDS, "check kind", "tcp")
    _check_kind_keys(r, t, label, check)
    port = r.integer(t, "port", label, *PORT_RANGE, service_port)
    interval = r.seconds(t, "interval", label, MAX_INTERVAL, 1.0)
    timeout = r.seconds(t, "timeout", label, MAX_INTERVAL, 0.5)
    if timeout > interval:
        raise r.fail(
            f"{label}.timeout = {_show(timeout)} must not exceed .health.interval = {_show(interval)}"
        )
    rise = r.integer(t, "rise", label, *RISE_FALL_RANGE, 2)
    fall = r.integer(t, "fall", label, *RISE_FALL_RANGE, 2)
    d = HealthCheck(check, port, interval, timeout, rise, fall)
    extra: dict[str, Any] = {}
    if check in ("http", "https"):
        path = r.string(t, "path", label, 'a URL path starting with "/"', d.path)
        if not _HTTP_PATH_RE.fullmatch(path):
            raise r.fail(
                f'{label}.path = {_show(path)} must start with "/" and hold only printable '
                f"ASCII without spaces (percent-encode others)"
            )
        extra["path"] = path
        extra["expect"] = r.integer(t, "expect", label, *HTTP_STATUS_RANGE, d.expect)
        host = r.string(t, "host", label, "an HTTP Host header value", d.host)
        if "host" in t and not _HTTP_HOST_RE.fullmatch(host):
            raise r.fail(
                f"{label}.host = {_show(host)} must be 1 to 255 printable ASCII characters without spaces"
            )
        extra["host"] = host
    if check == "https":
        ca_file = _ca_file(r, t, label)
        tls_verify = r.boolean(t, "tls_verify", label, d.tls_verify)
        if ca_file and not tls_verify:
            raise r.fail(
                f"{label}.tls_verify = false contradicts .ca_file = {_show(t['ca_file'])}; "
                f"remove one of them"
            )
        server_name = r.string(t, "server_name", label, "a DNS name or IP address", d.server_name)
        if "server_name" in t and not (_DNS_NAME_RE.fullmatch(server_name) or _is_ip(server_name)):
            raise r.fail(f"{label}.server_name = {_show(server_name)} is not a DNS name or IP address")
        extra.update(ca_file=ca_file, tls_verify=tls_verify, server_name=server_name)
    if check == "dicom":
        extra["calling_ae"] = _ae_title(r, t, label, "calling_ae", d.calling_ae)
        extra["called_ae"] = _ae_title(r, t, label, "called_ae", d.called_ae)
    return dataclasses.replace(d, **extra)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _item_label(prefix: str, index: int, table: dict) -> str:
    """E.g. 'service[0] "synapse-dicom" ' — the name only if it is well formed."""
    name = table.get("name")
    if isinstance(name, str) and _NAME_RE.fullmatch(name):
        return f'{prefix}[{index}] "{name}" '
    return f"{prefix}[{index}] "


def _parse_backends(r: _Reader, svc: dict, svc_label: str) -> tuple[Backend, ...]:
    raw = r.tables(svc, "backend", svc_label, "service.backend")
    if not raw:
        raise r.fail(
            f"{svc_label.rstrip()} has no backends; add at least one [[service.backend]] "
            f"table under it (service.backend is missing or empty)"
        )
    backends: list[Backend] = []
    names: dict[str, int] = {}
    addresses: dict[ipaddress.IPv4Address, int] = {}
    for i, t in enumerate(raw):
        label = svc_label + _item_label("backend", i, t)
        r.check_keys(t, label, _BACKEND_KEYS)
        name = r.name(t, label)
        if name in names:
            raise r.fail(
                f'{label}.name = {_show(name)} is already used by backend[{names[name]}] of this service'
            )
        names[name] = i
        address = r.address(t, "address", label, "backend address")
        if address in addresses:
            raise r.fail(
                f'{label}.address = "{address}" is already used by backend[{addresses[address]}] '
                f"of this service"
            )
        addresses[address] = i
        weight = r.integer(t, "weight", label, *WEIGHT_RANGE, 1)
        backends.append(Backend(name, address, weight))
    return tuple(backends)


def _parse_service(r: _Reader, index: int, t: dict, earlier: list[Service]) -> Service:
    label = _item_label("service", index, t)
    r.check_keys(t, label, _SERVICE_KEYS)
    name = r.name(t, label)
    for j, other in enumerate(earlier):
        if other.name == name:
            raise r.fail(f"{label}.name = {_show(name)} is already used by service[{j}]")
    vip = r.address(t, "vip", label, "VIP")
    port = r.integer(t, "port", label, *PORT_RANGE)
    protocol = r.choice(t, "protocol", label, PROTOCOLS, "protocol", "tcp")
    for j, other in enumerate(earlier):
        if other.key == (vip, port, protocol):
            raise r.fail(
                f'{label}(.vip, .port, .protocol) = ("{vip}", {port}, "{protocol}") is already used '
                f'by service[{j}] "{other.name}"'
            )
    persistence = r.choice(t, "persistence", label, PERSISTENCE_MODES, "persistence mode", "flow")
    health = _parse_health(r, t, label, port)
    backends = _parse_backends(r, t, label)
    return Service(name, vip, port, protocol, persistence, health, backends)


def _syntax_error(source: str, err: tomllib.TOMLDecodeError) -> PoolError:
    text = str(err)
    m = re.search(r"\s*\((at line (\d+), column (\d+)|at end of document)\)$", text)
    if m:
        message = text[: m.start()]
        where = f"line {m.group(2)}, column {m.group(3)}" if m.group(2) else "end of document"
        return PoolError(f"{source}: TOML syntax error at {where}: {message}")
    return PoolError(f"{source}: TOML syntax error: {text}")


def parse_pool(text: str, source: str = "<string>") -> Pool:
    """Parse and validate pool TOML text; raise PoolError for the first problem."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise _syntax_error(source, err) from None
    r = _Reader(source)
    r.check_keys(doc, "", _TOP_KEYS)
    settings = _parse_settings(r, doc)
    raw = r.tables(doc, "service", "", "service")
    if not raw:
        raise r.fail("the pool defines no [[service]]")
    if len(raw) > settings.max_services:
        raise r.fail(
            f"the pool defines {len(raw)} services but xdplb.max_services = {settings.max_services}"
        )
    services: list[Service] = []
    for i, t in enumerate(raw):
        services.append(_parse_service(r, i, t, services))
    total = sum(len(s.backends) for s in services)
    if total > settings.max_backends - 1:
        raise r.fail(
            f"the pool defines {total} backends in total but xdplb.max_backends = "
            f"{settings.max_backends} allows at most {settings.max_backends - 1}"
        )
    return Pool(settings, tuple(services), source)


def load_pool(path: str | PathLike[str]) -> Pool:
    """Read and parse a pool file; an unreadable file is a PoolError naming it."""
    name = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise PoolError(f"cannot read pool file {name}: {err.strerror or err}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PoolError(f"{name}: file is not valid UTF-8 (byte {err.start})") from None
    return parse_pool(text, name)


def warnings(pool: Pool) -> list[str]:
    """Return advice about a valid pool that is legal but probably unintended."""
    out: list[str] = []
    m = pool.settings.maglev_size
    for s in pool.services:
        n = len(s.backends)
        if m < 100 * n:
            out.append(
                f'service "{s.name}": maglev_size {m} is less than 100 x {n} backends; '
                f"spread will be uneven"
            )
        if all(b.weight == 0 for b in s.backends):
            out.append(
                f'service "{s.name}": every backend has weight 0 (drained); new connections '
                f"to {s.vip}:{s.port}/{s.protocol} will find no backend"
            )
    if not pool.settings.manage_vips and pool.settings.no_backend == "reset":
        out.append(
            'no_backend = "reset" hands packets of a service with no healthy backend to this host\'s '
            "own stack, which resets them only if the host holds the VIP; with manage_vips = false "
            'add the VIPs yourself or use no_backend = "drop"'
        )
    return out


_PERSISTENCE_TEXT = {"flow": "flow (5-tuple)", "client": "client (source IP)"}


def _health_detail(h: HealthCheck) -> str:
    """What a check kind does beyond connecting, e.g. ' GET /health expecting 200'."""
    if h.check == "dicom":
        return f' C-ECHO from AE "{h.calling_ae}" to AE "{h.called_ae}"'
    if h.check not in ("http", "https"):
        return ""
    text = f" GET {h.path} expecting {h.expect}, Host {h.host or 'the backend address'}"
    if h.check == "https":
        if not h.tls_verify:
            text += ", certificate not verified"
        else:
            text += f", certificate verified against {h.ca_file or 'the system CA store'}"
            text += f" for {h.server_name or 'the backend IP address'}"
        if h.server_name:
            text += f", SNI {h.server_name}"
    return text


def describe(pool: Pool) -> str:
    """Return a human-readable, multi-line account of what would be programmed."""
    st = pool.settings
    total = sum(len(s.backends) for s in pool.services)
    lines = [
        f"pool {pool.source}: {len(pool.services)} service(s), {total} backend(s)",
        f"  metrics: {st.metrics or 'disabled'}; manage VIPs: {'yes' if st.manage_vips else 'no'}",
        f"  maglev_size {st.maglev_size}, flow_table_size {st.flow_table_size}, "
        f"max_services {st.max_services}, max_backends {st.max_backends}, hash_seed {st.hash_seed}, "
        f"no healthy backend: {st.no_backend}",
        f"  UDP flows expire after {st.udp_idle_timeout:g}s idle; established flows stay on a down backend "
        + (f"for {st.down_grace:g}s" if st.down_grace else "for 0s (re-chosen at once)")
        + "; flood guard: "
        + (f"no new flow entries above {st.flood_guard_rate} per second per CPU" if st.flood_guard_rate else "off")
        + "; also balanced: frames to "
        + (", ".join(m.hex(":") for m in st.extra_macs) if st.extra_macs else "the interface's MAC only"),
    ]
    for s in pool.services:
        h = s.health
        lines.append(
            f'service "{s.name}": {s.vip}:{s.port}/{s.protocol}, '
            f"persistence {_PERSISTENCE_TEXT.get(s.persistence, s.persistence)}"
        )
        lines.append(
            f"  health: {h.check} port {h.port}{_health_detail(h)}, every {h.interval:g}s, "
            f"timeout {h.timeout:g}s, rise {h.rise}, fall {h.fall}"
        )
        for b in s.backends:
            state = "weight 0 (drained)" if b.weight == 0 else f"weight {b.weight}"
            lines.append(f'  backend "{b.name}" {b.address}: {state}')
    return "\n".join(lines) + "\n"
