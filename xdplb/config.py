"""Pool file (TOML) parsing and validation.

A pool file says which virtual services (VIP, port, protocol) xdplb serves and
which PACS/DICOM backends stand behind each.  A hospital config must never be
half-understood, so everything is checked strictly: unknown keys (with a "did
you mean" hint), wrong types (a boolean is not an integer), bad addresses,
out-of-range numbers, duplicates, a backend that is a VIP.  Every problem
found becomes one sentence naming the file, the line, the key path and the
offending value, as `haproxy -c` does; a PoolError carries them all in file
order.  A bad value is noted and checking goes on with a stand-in; a check
that compares values is skipped (says nothing) where one of them is a
stand-in, so no problem is reported that only follows from another.

Pure: ``parse_pool`` takes text and returns frozen dataclasses; only
``load_pool`` reads a file, and only a regular file of at most
MAX_POOL_BYTES, so a FIFO, a device or a runaway file cannot hang or exhaust
the controller.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import ipaddress
import json
import math
import os
import re
import ssl
import stat
import tomllib
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

from xdplb.addrtext import host_port
from xdplb.maglev import is_prime
from xdplb.modes import forwarding_sysctl
from xdplb.tomllines import BARE_KEY_RE, line_index

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
# How a service reaches its backends: "dsr" (the backends hold the VIP and
# answer the client directly) or "nat" (destination and port translated, the
# client's address kept, replies translated back by the gateway).
FORWARDING_MODES = ("dsr", "nat")

_TOP_KEYS = ("xdplb", "service")
_SETTINGS_KEYS = (
    "metrics", "manage_vips", "maglev_size", "flow_table_size", "flow_table_size6",
    "max_services", "max_backends", "hash_seed", "no_backend",
    "udp_idle_timeout", "down_grace", "flood_guard_rate", "extra_macs",
    "announce_table", "ready_file", "stop_drain", "stop_drain_idle",
)
_SERVICE_KEYS = ("name", "vip", "port", "protocol", "persistence", "forwarding", "client_prefix", "health",
                 "tls", "backend")
# client_prefix: the prefix length of the client address that client persistence hashes (IPv6 only).
CLIENT_PREFIX_RANGE = (1, 128)
_TLS_KEYS = ("certificate", "backend_protocol", "backend_port", "health_from", "min_version",
             "ciphers", "ciphersuites", "client_ca")
TLS_BACKEND_PROTOCOLS = ("http", "tcp")
TLS_MIN_VERSIONS = ("1.2", "1.3")
# Safe defaults (Mozilla's "intermediate" profile): forward-secret AEAD suites
# only, for TLS 1.2; TLS 1.3 suites are all AEAD.
DEFAULT_TLS_CIPHERS = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
                       "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
                       "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305")
DEFAULT_TLS_CIPHERSUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
_BACKEND_KEYS = ("name", "address", "weight", "port")

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
MAX_POOL_BYTES = 16 * 1024 * 1024  # 65535 backends commented line by line as in examples/pacs.toml: 13.7 MiB
UDP_IDLE_TIMEOUT_RANGE = (1.0, 86400.0)
DOWN_GRACE_MAX = 3600.0
ANNOUNCE_TABLE_RANGE = (1, 2**32 - 1)
RESERVED_TABLES = {253: "default", 254: "main", 255: "local"}
STOP_DRAIN_MAX = 3600.0
UNIT_TIMEOUT_STOP = 30.0          # TimeoutStopSec of tools/systemd/xdplb@.service (a test keeps them equal)
DETACH_SECONDS = 5.0              # what detaching, unpinning and removing VIPs may take after the drain
STOP_DRAIN_IDLE_RANGE = (0.5, 600.0)
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
class TlsTermination:
    """[service.tls]: HAProxy terminates TLS on vip:port and speaks
    ``backend_protocol`` in cleartext to each backend's ``backend_port``."""

    certificate: str                 # absolute path: a PEM with its key, or a directory of them (SNI)
    backend_protocol: str            # "http" (viewers) or "tcp" (DICOM TLS to plain DICOM)
    backend_port: int
    health_from: str = ""            # follow that service's verdicts instead of probing
    min_version: str = "1.2"
    ciphers: str = DEFAULT_TLS_CIPHERS            # TLS 1.2 cipher list (OpenSSL syntax)
    ciphersuites: str = DEFAULT_TLS_CIPHERSUITES  # TLS 1.3 suites
    client_ca: str = ""              # absolute path; set = clients must present a certificate it signed


@dataclass(frozen=True)
class Backend:
    """One PACS/DICOM server behind a service; weight 0 means drained."""

    name: str
    address: ipaddress.IPv4Address | ipaddress.IPv6Address   # str() is the canonical text (RFC 5952)
    weight: int
    port: int = 0          # NAT services: the port it listens on (0: the service port); DSR: always 0


@dataclass(frozen=True)
class Service:
    """A virtual service: traffic to vip:port/protocol is spread over backends."""

    name: str
    vip: ipaddress.IPv4Address | ipaddress.IPv6Address   # the backends share its family
    port: int
    protocol: str
    persistence: str
    health: HealthCheck
    backends: tuple[Backend, ...]
    tls: TlsTermination | None = None
    forwarding: str = "dsr"
    client_prefix: int = 128   # IPv6 client persistence hashes this many leading bits of the client address

    @property
    def key(self) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int, str]:
        """The (vip, port, protocol) triple the data plane matches on."""
        return (self.vip, self.port, self.protocol)

    def backend_port(self, backend: Backend) -> int:
        """The port the backend's traffic goes to: its own in a NAT service, else the service's."""
        return backend.port or self.port

    def health_of(self, backend: Backend) -> HealthCheck:
        """The check one backend gets: health.port when the pool sets it (port 0 means
        unset, only in NAT services), else the backend's real port."""
        if self.health.port:
            return self.health
        return dataclasses.replace(self.health, port=self.backend_port(backend))


@dataclass(frozen=True)
class Settings:
    """Pool-wide settings from the optional [xdplb] table."""

    metrics: str = "127.0.0.1:9742"
    manage_vips: bool = True
    maglev_size: int = 65537
    flow_table_size: int = 262144
    # flows6's entries. A parsed pool always holds a number: the pool's own, else
    # flow_table_size when the program balances an IPv6 service, else the minimum
    # (flows6 is then never written, and would cost as much locked memory as flows).
    # None (settings built in code): as flow_table_size.
    flow_table_size6: int | None = None
    # True where flow_table_size6 was not set and follows from the services
    # alone: such a size never blocks a reload or a restart (desired.py,
    # pinning.py); the running flows6 is kept instead.
    flows6_size_implied: bool = field(default=False, compare=False)
    max_services: int = 64
    max_backends: int = 4096
    hash_seed: int = 0
    no_backend: str = "reset"         # a service with no healthy backend: "reset" (fail fast) or "drop"
    udp_idle_timeout: float = 30.0    # seconds a UDP flow entry lives without a packet
    down_grace: float = 30.0          # seconds established flows stay on a down backend; 0: re-chosen at once
    flood_guard_rate: int = 2000      # new flow entries per second per CPU before the guard stops inserting; 0: off
    extra_macs: tuple[bytes, ...] = ()  # unicast MACs besides the interface's that are balanced (e.g. a VRRP vmac)
    announce_table: int | None = None  # kernel routing table of the VIP routes BIRD/FRR announce; None: no routes
    ready_file: str = ""              # keepalived track_file: 0 when every VIP would be announced; "": none
    stop_drain: float = 0.0           # seconds SIGTERM spends withdrawing and waiting before it detaches; 0: off
    stop_drain_idle: float = 2.0      # ... counters still this long end that wait early

    @property
    def flows6_entries(self) -> int:
        """max_entries of flows6 (the IPv6 flow table)."""
        return self.flow_table_size if self.flow_table_size6 is None else self.flow_table_size6


@dataclass(frozen=True)
class Pool:
    """A whole validated pool file; ``source`` is its path or "<string>"."""

    settings: Settings
    services: tuple[Service, ...]
    source: str


class PoolError(ValueError):
    """The pool file is unreadable or invalid.

    str() is one sentence; ``problems`` holds every problem found, one
    sentence each ("FILE: line N: ..."), in file order.
    """

    def __init__(self, message: str, problems: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.problems = tuple(problems) or (message,)

    @classmethod
    def of(cls, problems: list[str]) -> PoolError:
        more = len(problems) - 1
        if not more:
            return cls(problems[0])
        return cls(f"{problems[0]} (and {more} more problem{'s' if more > 1 else ''}; "
                   f"xdplb check lists every one)", tuple(problems))


class _Problem(PoolError):
    """A problem found by a check, before the file and line are put in front of it."""

    def __init__(self, sentence: str, table: dict | None = None, key: str | None = None) -> None:
        super().__init__(sentence)
        self.sentence = sentence
        self.place = (table, key)


_MISSING = object()


def _printable(text: str) -> str:
    """Escape what would break an error message's single line (U+2028 too)."""
    return "".join(c if c.isprintable() else json.dumps(c)[1:-1] for c in text)


def _show(value: Any, depth: int = 0) -> str:
    """Render a TOML value for an error message, in TOML-like spelling, at most
    three arrays deep (tomllib accepts hundreds)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = _printable(json.dumps(value, ensure_ascii=False))
        return text if len(text) <= 80 else text[:76] + '..."'
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "{...}"
    if isinstance(value, list):
        if depth == 3:
            return "[...]"
        inner = ", ".join(_show(v, depth + 1) for v in value[:5])
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
    if not BARE_KEY_RE.fullmatch(key):
        key = _show(key)  # written quoted in the file too; may hold anything
    return f"{label}.{key}" if label else key


class _Section:
    """One table being checked (see _Reader.section)."""

    def __init__(self, places: tuple) -> None:
        self.places = places    # (table, key) pairs that locate it, innermost first
        self.bad_values = 0     # bad values noted while this was the innermost section
        self.ok = True          # no bad value and no failed check here or in a nested section


class _Reader:
    """Typed getters that note every bad value and go on, and the list of problems found.

    A getter given a bad value notes it and returns a stand-in (the default,
    or a neutral value of its type; None for a name or address), so the
    table's other keys are still checked.  A check raises ``r.fail(sentence)``
    instead; the enclosing ``section`` notes it, unless that section already
    noted a bad value (the check may have judged a stand-in), and validation
    goes on with the next table.  One run finds every problem.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.found: list[tuple[str, tuple]] = []   # (sentence, (table, key) places for its line)
        self.vips: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str] = {}  # a backend must not be one
        self._sections: list[_Section] = []
        self._bad_values = 0
        self._bad_keys: set[tuple[int, str]] = set()

    def fail(self, sentence: str, table: dict | None = None, key: str | None = None) -> PoolError:
        return _Problem(sentence, table, key)

    def note(self, sentence: str, table: dict | None = None, key: str | None = None) -> None:
        places = [(table, key)]
        for section in reversed(self._sections):
            places.extend(section.places)
        self.found.append((sentence, tuple(places)))

    def bad(self, sentence: str, table: dict, key: str, stand_in: Any = None) -> Any:
        """Note a bad value of ``key`` and return ``stand_in``: the table's other keys are still checked."""
        self.note(sentence, table, key)
        self._bad_keys.add((id(table), key))
        self._bad_values += 1
        if self._sections:
            self._sections[-1].bad_values += 1
        return stand_in

    def good(self, table: dict, *keys: str) -> bool:
        """True when no problem was noted with these keys: a check comparing them may judge them."""
        return not any((id(table), key) in self._bad_keys for key in keys)

    @contextlib.contextmanager
    def section(self, *places: tuple):
        """Check one table; yields its _Section, whose ``ok`` says afterwards
        whether its values can be trusted by checks across tables."""
        section = _Section(places)
        self._sections.append(section)
        try:
            yield section
        except _Problem as problem:
            section.ok = False
            if not section.bad_values:
                self.note(problem.sentence, *problem.place)
        finally:
            self._sections.pop()
            if section.bad_values:
                section.ok = False
            if not section.ok and self._sections:
                self._sections[-1].ok = False

    def check_keys(self, table: dict, label: str, known: tuple[str, ...]) -> None:
        for key in table:
            if key not in known:
                self.unknown_key(table, label, key, known)

    def unknown_key(self, table: dict, label: str, key: str, known: tuple[str, ...]) -> None:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f'did you mean "{close[0]}"?' if close else f"known keys are {_quoted(known)}"
        self.note(f"{_path(label, key)} is not a known key; {hint}", table, key)

    def _get(self, table: dict, key: str, label: str, default: Any, expect: str) -> Any:
        """The value, the default, or _MISSING once a missing required key is noted."""
        value = table.get(key, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                return self.bad(f"{_path(label, key)} is missing; expected {expect}", table, key, _MISSING)
            return default
        return value

    def string(self, table: dict, key: str, label: str, expect: str, default: Any = _MISSING) -> str:
        stand_in = "" if default is _MISSING else default
        value = self._get(table, key, label, default, expect)
        if value is _MISSING:
            return stand_in
        if not isinstance(value, str):
            return self.bad(
                f"{_path(label, key)} = {_show(value)} must be a string ({expect}), got {_kind(value)}",
                table, key, stand_in,
            )
        return value

    def boolean(self, table: dict, key: str, label: str, default: Any = _MISSING) -> bool:
        stand_in = False if default is _MISSING else default
        value = self._get(table, key, label, default, "true or false")
        if value is _MISSING:
            return stand_in
        if not isinstance(value, bool):
            return self.bad(
                f"{_path(label, key)} = {_show(value)} must be true or false, got {_kind(value)}",
                table, key, stand_in,
            )
        return value

    def integer(
        self, table: dict, key: str, label: str, lo: int, hi: int, default: Any = _MISSING
    ) -> int:
        expect = f"an integer from {lo} to {hi}"
        stand_in = lo if default is _MISSING else default
        value = self._get(table, key, label, default, expect)
        if value is _MISSING:
            return stand_in
        if isinstance(value, bool) or not isinstance(value, int):
            return self.bad(f"{_path(label, key)} = {_show(value)} must be {expect}, got {_kind(value)}",
                             table, key, stand_in)
        if not lo <= value <= hi:
            return self.bad(f"{_path(label, key)} = {_show(value)} is out of range; expected {expect}",
                             table, key, stand_in)
        return value

    def seconds(
        self, table: dict, key: str, label: str, hi: float, default: Any = _MISSING, lo: float | None = None
    ) -> float:
        """A duration in (0, hi]; with `lo`, in [lo, hi] instead."""
        if lo is None:
            expect = f"a number of seconds greater than 0 and at most {hi:g}"
        else:
            expect = f"a number of seconds from {lo:g} to {hi:g}"
        stand_in = float(hi if default is _MISSING else default)
        value = self._get(table, key, label, default, expect)
        if value is _MISSING:
            return stand_in
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return self.bad(f"{_path(label, key)} = {_show(value)} must be {expect}, got {_kind(value)}",
                             table, key, stand_in)
        if not (math.isfinite(value) and (0 < value if lo is None else lo <= value) and value <= hi):
            return self.bad(f"{_path(label, key)} = {_show(value)} is out of range; expected {expect}",
                             table, key, stand_in)
        return float(value)

    def choice(
        self, table: dict, key: str, label: str, choices: tuple[str, ...], what: str, default: str
    ) -> str:
        bad_before = self._bad_values
        value = self.string(table, key, label, f"one of {_quoted(choices)}", default)
        if self._bad_values == bad_before and value not in choices:
            return self.bad(
                f"{_path(label, key)} = {_show(value)} is not a known {what}; expected one of {_quoted(choices)}",
                table, key, default,
            )
        return value

    def table(self, parent: dict, key: str, label: str, header: str) -> dict:
        value = parent.get(key, {})
        if not isinstance(value, dict):
            return self.bad(
                f"{_path(label, key)} = {_show(value)} must be a table written [{header}], got {_kind(value)}",
                parent, key, {},
            )
        return value

    def tables(self, parent: dict, key: str, label: str, header: str) -> list[dict]:
        value = parent.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            return self.bad(
                f"{_path(label, key)} = {_show(value)} must be an array of tables written "
                f"[[{header}]], got {_kind(value) if not isinstance(value, list) else 'an array of other values'}",
                parent, key, [],
            )
        return value

    def name(self, table: dict, label: str) -> str | None:
        """The name, or None once a problem with it is noted."""
        bad_before = self._bad_values
        value = self.string(table, "name", label, _NAME_RULE)
        if self._bad_values != bad_before:
            return None
        if not _NAME_RE.fullmatch(value):
            return self.bad(f"{_path(label, 'name')} = {_show(value)} must be {_NAME_RULE}", table, "name", None)
        return value

    def address(self, table: dict, key: str, label: str, role: str
                ) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """The address (IPv4 or IPv6), or None once a problem with it is noted."""
        expect = 'an IP address such as "10.10.0.100" or "2001:db8::100"'
        bad_before = self._bad_values
        text = self.string(table, key, label, expect)
        if self._bad_values != bad_before:
            return None
        where = f"{_path(label, key)} = {_show(text)}"
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            return self.bad(f"{where} is not a valid IP address", table, key, None)
        problem = _unusable_address(addr)
        if problem:
            return self.bad(f"{where} is {problem}, which cannot be used as a {role}", table, key, None)
        return addr


def _unusable_address(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """Return why an address cannot carry balanced traffic, or "" if it can."""
    if addr.version == 6:
        return _unusable_ipv6(addr)
    if addr.is_unspecified:
        return "the unspecified address"
    if addr == ipaddress.IPv4Address("255.255.255.255"):
        return "the broadcast address"
    if addr.is_multicast:
        return "a multicast address"
    if addr.is_loopback:
        return "a loopback address"
    return ""


def _unusable_ipv6(addr: ipaddress.IPv6Address) -> str:
    """The IPv6 kinds refused, and why. Every one left has one canonical text
    (RFC 5952, what str() gives), so every node builds the same Maglev table
    from a pool however it spells its addresses."""
    if addr.scope_id:
        return "an address with a zone index"
    if addr.ipv4_mapped is not None:
        return f'an IPv4-mapped address (write "{addr.ipv4_mapped}": a service and its backends share a family)'
    if addr.is_unspecified:
        return "the unspecified address"
    if addr.is_multicast:
        return "a multicast address"
    if addr.is_loopback:
        return "a loopback address"
    if addr.is_link_local:
        return "a link-local address (valid on one link only)"
    return ""


def parse_metrics_address(text: str, any_port: bool = False) -> tuple[str, int]:
    """ "127.0.0.1:9742" -> ("127.0.0.1", 9742); "[::1]:9742" -> ("::1", 9742).

    The host is an IPv4 address, an IPv6 address in brackets, or localhost;
    the port 1-65535 (0, "any free port", only with any_port). Raises
    ValueError with one sentence otherwise. The pool check and the exporter
    both use this one parser.
    """
    bad = f'metrics address "{text}" is not "host:port" or "[IPv6]:port"'
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        try:
            ok = bool(sep) and ipaddress.ip_address(host).version == 6
        except ValueError:
            ok = False
    else:
        host, sep, port = text.rpartition(":")
        ok = bool(sep)
        if ok and host != "localhost":
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError(f"metrics address \"{text}\" names {host!r}, which is not an IP address "
                                 f"or localhost") from None
    if not ok or not (port.isascii() and port.isdigit()) or not (0 if any_port else 1) <= int(port) <= 65535:
        raise ValueError(bad)
    return host, int(port)


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
    try:
        if metrics:
            parse_metrics_address(metrics)
    except ValueError:
        metrics = r.bad(
            f"{label}.metrics = {_show(metrics)} must be \"\" (disabled) or \"host:port\" with an IP "
            f'address or localhost, e.g. "127.0.0.1:9742" or "[::1]:9742"', t, "metrics", d.metrics
        )
    manage_vips = r.boolean(t, "manage_vips", label, d.manage_vips)
    maglev_size = r.integer(t, "maglev_size", label, *MAGLEV_SIZE_RANGE, d.maglev_size)
    if not is_prime(maglev_size):
        below, above = _nearby_primes(maglev_size)
        maglev_size = r.bad(
            f"{label}.maglev_size = {maglev_size} must be a prime number; "
            f"the nearest primes are {below} and {above}", t, "maglev_size", d.maglev_size
        )
    return Settings(
        metrics=metrics,
        manage_vips=manage_vips,
        maglev_size=maglev_size,
        flow_table_size=r.integer(t, "flow_table_size", label, *FLOW_TABLE_SIZE_RANGE, d.flow_table_size),
        flow_table_size6=(r.integer(t, "flow_table_size6", label, *FLOW_TABLE_SIZE_RANGE)
                          if "flow_table_size6" in t else None),
        max_services=r.integer(t, "max_services", label, *MAX_SERVICES_RANGE, d.max_services),
        max_backends=r.integer(t, "max_backends", label, *MAX_BACKENDS_RANGE, d.max_backends),
        hash_seed=r.integer(t, "hash_seed", label, *HASH_SEED_RANGE, d.hash_seed),
        no_backend=r.choice(t, "no_backend", label, NO_BACKEND_MODES, "no_backend behaviour", d.no_backend),
        udp_idle_timeout=r.seconds(t, "udp_idle_timeout", label, UDP_IDLE_TIMEOUT_RANGE[1], d.udp_idle_timeout,
                                   lo=UDP_IDLE_TIMEOUT_RANGE[0]),
        down_grace=r.seconds(t, "down_grace", label, DOWN_GRACE_MAX, d.down_grace, lo=0.0),
        flood_guard_rate=r.integer(t, "flood_guard_rate", label, *FLOOD_GUARD_RATE_RANGE, d.flood_guard_rate),
        extra_macs=_extra_macs(r, t, label),
        announce_table=_announce_table(r, t, label),
        ready_file=_ready_file(r, t, label),
        stop_drain=r.seconds(t, "stop_drain", label, STOP_DRAIN_MAX, d.stop_drain, lo=0.0),
        stop_drain_idle=r.seconds(t, "stop_drain_idle", label, STOP_DRAIN_IDLE_RANGE[1], d.stop_drain_idle,
                                  lo=STOP_DRAIN_IDLE_RANGE[0]),
    )


def _announce_table(r: _Reader, t: dict, label: str) -> int | None:
    """[xdplb] announce_table: a kernel routing table of its own for the VIP routes, never main/local/default."""
    if "announce_table" not in t:
        return None
    table = r.integer(t, "announce_table", label, *ANNOUNCE_TABLE_RANGE, None)
    if table in RESERVED_TABLES:
        return r.bad(f"{label}.announce_table = {table} is the kernel's {RESERVED_TABLES[table]} table; "
                     f"give xdplb a table of its own (e.g. 100), which BIRD's kernel protocol imports",
                     t, "announce_table", None)
    return table


def _ready_file(r: _Reader, t: dict, label: str) -> str:
    """[xdplb] ready_file: an absolute path (keepalived's track_file reads it), or "" for none."""
    path = r.string(t, "ready_file", label, 'an absolute path or ""', "")
    if path and (not path.startswith("/") or path.endswith("/") or "\0" in path):
        return r.bad(f'{label}.ready_file = {_show(path)} must be an absolute file path such as '
                     f'"/run/xdplb/eth0.ready", or "" for none', t, "ready_file", "")
    return path


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
            r.note(
                f"{label}.{key} is not a known key for check = {_show(check)}; it applies only to "
                f"check = {' or '.join(_show(k) for k in owners)}", t, key
            )
        else:
            r.unknown_key(t, label, key, known)


def _ca_file(r: _Reader, t: dict, label: str, key: str = "ca_file") -> str:
    """A CA bundle's absolute path; a relative one is taken from the pool file's folder."""
    path = _existing_path(r, t, label, key, "the path of a PEM CA certificate file", os.path.isfile, "file")
    if not path:
        return ""
    try:
        ssl.create_default_context(cafile=path)
    except (ssl.SSLError, OSError) as err:
        return r.bad(f"{label}.{key} = {_show(t[key])} is not a readable PEM CA certificate file: "
                     f"{err.strerror or err}", t, key, "")
    return path


def _existing_path(r: _Reader, t: dict, label: str, key: str, expect: str, exists, kind: str) -> str:
    """``t[key]`` made absolute (a relative path is taken from the pool file's folder), or ""
    when it is absent or once a problem with it is noted."""
    text = r.string(t, key, label, expect, "")
    if text == "":
        return ""
    base = os.path.dirname(os.path.abspath(r.source)) if r.source != "<string>" else os.getcwd()
    path = os.path.normpath(os.path.join(base, os.path.expanduser(text)))
    if not exists(path):
        return r.bad(f"{label}.{key} = {_show(text)} is not an existing {kind} (looked for {path})", t, key, "")
    if not _CONFIG_PATH_RE.fullmatch(path):
        return r.bad(f"{label}.{key} = {_show(text)} holds a control character, a quote, a backslash or a "
                     f"dollar sign, which HAProxy's configuration cannot carry; rename the file", t, key, "")
    return path


_CONFIG_PATH_RE = re.compile(r'[^"\\$\x00-\x1f\x7f]+')
_CIPHER_LIST_RE = re.compile(r"[A-Za-z0-9_+=@!:.-]+")
_TLS13_SUITES_RE = re.compile(r"TLS_[A-Z0-9_]+(:TLS_[A-Z0-9_]+)*")


def _parse_tls(r: _Reader, svc: dict, svc_label: str) -> TlsTermination | None:
    """[service.tls], or None when the service has none."""
    if "tls" not in svc:
        return None
    label = f"{svc_label}.tls"
    t = r.table(svc, "tls", svc_label, "service.tls")
    r.check_keys(t, label, _TLS_KEYS)
    d = TlsTermination("", "tcp", 1)
    certificate = _existing_path(r, t, label, "certificate",
                                 "the path of a PEM file holding the certificate and its key, or a "
                                 "directory of them", os.path.exists, "file or directory")
    if "certificate" not in t:
        r.string(t, "certificate", label, "the path of a PEM file holding the certificate and its key")
    backend_protocol = r.choice(t, "backend_protocol", label, TLS_BACKEND_PROTOCOLS, "backend protocol",
                                d.backend_protocol)
    if "backend_protocol" not in t:
        r.bad(f'{label}.backend_protocol is missing; expected "http" (web viewers) or "tcp" (DICOM TLS '
              f"to plain DICOM)", t, "backend_protocol")
    backend_port = r.integer(t, "backend_port", label, *PORT_RANGE)
    health_from = r.string(t, "health_from", label, "the name of the service whose verdicts to follow", "")
    if health_from and "health" in svc:
        r.bad(f"{label}.health_from = {_show(health_from)} contradicts the service's own [service.health]; "
              f"remove one of them", t, "health_from")
    min_version = r.choice(t, "min_version", label, TLS_MIN_VERSIONS, "minimum TLS version", d.min_version)
    ciphers = r.string(t, "ciphers", label, "an OpenSSL cipher list for TLS 1.2", d.ciphers)
    if r.good(t, "ciphers") and not _valid_ciphers(ciphers):
        ciphers = r.bad(f"{label}.ciphers = {_show(ciphers)} selects no cipher OpenSSL knows", t, "ciphers",
                        d.ciphers)
    ciphersuites = r.string(t, "ciphersuites", label, "TLS 1.3 suite names joined by colons", d.ciphersuites)
    if r.good(t, "ciphersuites") and not _TLS13_SUITES_RE.fullmatch(ciphersuites):
        ciphersuites = r.bad(f"{label}.ciphersuites = {_show(ciphersuites)} must be TLS 1.3 suite names joined "
                             f'by colons, e.g. "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384"',
                             t, "ciphersuites", d.ciphersuites)
    client_ca = _ca_file(r, t, label, "client_ca")
    return TlsTermination(certificate, backend_protocol, backend_port, health_from, min_version,
                          ciphers, ciphersuites, client_ca)


def _valid_ciphers(text: str) -> bool:
    if not _CIPHER_LIST_RE.fullmatch(text):
        return False
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(text)
    except ssl.SSLError:
        return False
    return True


def _check_health_from(r: _Reader, raw: list[dict], services: list[Service]) -> None:
    """Each health_from names another service, which probes for itself and has every
    backend address of the follower: a verdict is per (service, address)."""
    by_name = {s.name: s for s in services}
    names = {t.get("name") for t in raw}
    for i, t in enumerate(raw):
        svc = by_name.get(t.get("name"))
        if svc is None or svc.tls is None or not svc.tls.health_from:
            continue
        tls_table = t["tls"]
        where = f"{_item_label('service', i, t)}.tls.health_from = {_show(svc.tls.health_from)}"
        followed = by_name.get(svc.tls.health_from)
        if svc.tls.health_from == svc.name:
            r.note(f"{where} names the service itself; name another service or give it a [service.health]",
                   tls_table, "health_from")
        elif followed is None:
            if svc.tls.health_from not in names:  # else that service's own problem is reported
                r.note(f"{where} names no service in this pool", tls_table, "health_from")
        elif followed.tls is not None and followed.tls.health_from:
            r.note(f'{where} names a service that itself follows "{followed.tls.health_from}"; '
                   f"name the service that probes", tls_table, "health_from")
        else:
            theirs = {b.address for b in followed.backends}
            missing = [str(b.address) for b in svc.backends if b.address not in theirs]
            if missing:
                r.note(f"{where} has no verdict for backend address {', '.join(missing)}, which is not a "
                       f"backend of that service", tls_table, "health_from")


def _ae_title(r: _Reader, t: dict, label: str, key: str, default: str) -> str:
    value = r.string(t, key, label, _AE_RULE, default)
    if not (1 <= len(value) <= 16 and value.isascii() and value.isprintable()
            and "\\" not in value and value.strip(" ")):
        return r.bad(f"{label}.{key} = {_show(value)} is not a valid DICOM AE title; expected {_AE_RULE}",
                     t, key, default)
    return value


def _parse_health(r: _Reader, svc: dict, svc_label: str, service_port: int) -> HealthCheck:
    label = f"{svc_label}.health"
    t = r.table(svc, "health", svc_label, "service.health")
    check = r.choice(t, "check", label, HEALTH_CHECK_KINDS, "check kind", "tcp")
    _check_kind_keys(r, t, label, check)
    port = r.integer(t, "port", label, *PORT_RANGE) if "port" in t else service_port
    interval = r.seconds(t, "interval", label, MAX_INTERVAL, 1.0)
    timeout = r.seconds(t, "timeout", label, MAX_INTERVAL, 0.5)
    if timeout > interval and r.good(t, "interval", "timeout"):
        r.bad(f"{label}.timeout = {_show(timeout)} must not exceed .health.interval = {_show(interval)}",
              t, "timeout")
    rise = r.integer(t, "rise", label, *RISE_FALL_RANGE, 2)
    fall = r.integer(t, "fall", label, *RISE_FALL_RANGE, 2)
    d = HealthCheck(check, port, interval, timeout, rise, fall)
    extra: dict[str, Any] = {}
    if check in ("http", "https"):
        path = r.string(t, "path", label, 'a URL path starting with "/"', d.path)
        if not _HTTP_PATH_RE.fullmatch(path):
            path = r.bad(
                f'{label}.path = {_show(path)} must start with "/" and hold only printable '
                f"ASCII without spaces (percent-encode others)", t, "path", d.path
            )
        extra["path"] = path
        extra["expect"] = r.integer(t, "expect", label, *HTTP_STATUS_RANGE, d.expect)
        host = r.string(t, "host", label, "an HTTP Host header value", d.host)
        if "host" in t and r.good(t, "host") and not _HTTP_HOST_RE.fullmatch(host):
            r.bad(f"{label}.host = {_show(host)} must be 1 to 255 printable ASCII characters without spaces",
                  t, "host")
        extra["host"] = host
    if check == "https":
        ca_file = _ca_file(r, t, label)
        tls_verify = r.boolean(t, "tls_verify", label, d.tls_verify)
        if ca_file and not tls_verify:
            r.bad(f"{label}.tls_verify = false contradicts .ca_file = {_show(t['ca_file'])}; "
                  f"remove one of them", t, "tls_verify")
        server_name = r.string(t, "server_name", label, "a DNS name or IP address", d.server_name)
        if "server_name" in t and r.good(t, "server_name") and not (
                _DNS_NAME_RE.fullmatch(server_name) or _is_ip(server_name)):
            r.bad(f"{label}.server_name = {_show(server_name)} is not a DNS name or IP address", t, "server_name")
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


def _parse_backends(r: _Reader, svc: dict, svc_label: str, vip, nat: bool) -> tuple[Backend, ...]:
    """The service's backends; `vip` (None when it is bad) names the family they must share;
    only a NAT service's backends may name a port."""
    raw = r.tables(svc, "backend", svc_label, "service.backend")
    if not raw:
        raise r.fail(
            f"{svc_label.rstrip()} has no backends; add at least one [[service.backend]] "
            f"table under it (service.backend is missing or empty)"
        )
    backends: list[Backend] = []
    names: dict[str, int] = {}
    addresses: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, int] = {}
    for i, t in enumerate(raw):
        label = svc_label + _item_label("backend", i, t)
        with r.section((t, None), (svc, "backend")):
            r.check_keys(t, label, _BACKEND_KEYS)
            name = r.name(t, label)
            if name in names:
                r.bad(f'{label}.name = {_show(name)} is already used by backend[{names[name]}] of this service',
                      t, "name")
            elif name is not None:
                names[name] = i
            address = r.address(t, "address", label, "backend address")
            if address in addresses:
                r.bad(f'{label}.address = "{address}" is already used by backend[{addresses[address]}] '
                      f"of this service", t, "address")
            elif address is not None and vip is not None and address.version != vip.version:
                r.bad(f'{label}.address = "{address}" is IPv{address.version} but the service\'s VIP '
                      f'"{vip}" is IPv{vip.version}; a service and its backends share a family (no NAT64)',
                      t, "address")
            elif address in r.vips:
                r.bad(f'{label}.address = "{address}" is the VIP of {r.vips[address]}; forwarding to it '
                      f"would send the traffic back to xdplb in a loop", t, "address")
            elif address is not None:
                addresses[address] = i
            weight = r.integer(t, "weight", label, *WEIGHT_RANGE, 1)
            port = r.integer(t, "port", label, *PORT_RANGE) if "port" in t else 0
            if port and not nat:
                r.bad(f'{label}.port = {port} needs forwarding = "nat" in its service: with direct server '
                      f"return the backend answers on the service port itself", t, "port")
            backends.append(Backend(name, address, weight, port))
    return tuple(backends)


def _parse_service(r: _Reader, index: int, t: dict, earlier: list[Service]) -> Service | None:
    """One [[service]], or None when a problem was noted.  Its own keys, its
    health table and each backend are checked apart: a bad port does not hide
    a bad backend."""
    label = _item_label("service", index, t)
    r.check_keys(t, label, _SERVICE_KEYS)
    port = PORT_RANGE[0]  # the health check's default port, should the service's own be bad
    with r.section((t, None)) as own:  # the service's own keys
        name = r.name(t, label)
        for j, other in enumerate(earlier):
            if other.name == name:
                r.bad(f"{label}.name = {_show(name)} is already used by service[{j}]", t, "name")
        vip = r.address(t, "vip", label, "VIP")
        port = r.integer(t, "port", label, *PORT_RANGE)
        protocol = r.choice(t, "protocol", label, PROTOCOLS, "protocol", "tcp")
        for j, other in enumerate(earlier):
            if r.good(t, "vip", "port", "protocol") and other.key == (vip, port, protocol):
                r.bad(f'{label}(.vip, .port, .protocol) = ("{vip}", {port}, "{protocol}") is already used '
                      f'by service[{j}] "{other.name}"', t, "port")
                break
        persistence = r.choice(t, "persistence", label, PERSISTENCE_MODES, "persistence mode", "flow")
        forwarding = r.choice(t, "forwarding", label, FORWARDING_MODES, "forwarding mode", "dsr")
        client_prefix = _client_prefix(r, t, label, vip, persistence)
    nat = forwarding == "nat"
    with r.section((t.get("tls"), None), (t, "tls")) as checked_tls:
        tls = _parse_tls(r, t, label)
        if tls is not None and protocol != "tcp" and r.good(t, "protocol"):
            r.bad(f'{label}.protocol = "{protocol}" cannot carry TLS; a service with [service.tls] is "tcp"',
                  t, "protocol")
        if tls is not None and nat:
            r.bad(f'{label}.forwarding = "nat" cannot go with [service.tls]: HAProxy terminates that service '
                  f"on the gateway itself", t, "forwarding")
    with r.section((t.get("health"), None), (t, "health")) as checked_health:
        # Behind TLS termination the backends listen on backend_port, not on the VIP's port; in a NAT
        # service each backend is probed on its own port unless health.port says otherwise (0: unset).
        health = _parse_health(r, t, label, 0 if nat else tls.backend_port if tls else port)
    with r.section((t, "backend")) as checked_backends:
        backends = _parse_backends(r, t, label, vip if r.good(t, "vip") else None, nat)
    if not (own.ok and checked_tls.ok and checked_health.ok and checked_backends.ok):
        return None
    return Service(name, vip, port, protocol, persistence, health, backends, tls, forwarding,
                   client_prefix)


def _check_forwarding_mix(r: _Reader, raw: list[dict], services: list[Service]) -> None:
    """A PACS is behind DSR services or NAT services, never both; and one
    (backend address, port, protocol) is behind at most one NAT service."""
    table_of = {t.get("name"): t for t in raw if isinstance(t, dict)}
    mode_of: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, Service] = {}
    nat_targets: dict[tuple, Service] = {}
    for svc in services:
        t = table_of.get(svc.name)
        for be in svc.backends:
            other = mode_of.setdefault(be.address, svc)
            if other.forwarding != svc.forwarding:
                r.note(f'backend {be.address} is behind service "{other.name}" ({other.forwarding}) and '
                       f'service "{svc.name}" ({svc.forwarding}); a PACS must be behind DSR or NAT services, not '
                       f"both: once it routes through this gateway for NAT, its DSR replies (source address the "
                       f"VIP, which is local to the gateway) are dropped there as martians", t, "backend")
                return
            if svc.forwarding != "nat":
                continue
            target = (be.address, svc.backend_port(be), svc.protocol)
            first = nat_targets.setdefault(target, svc)
            if first is not svc:
                r.note(f'backend {host_port(be.address, target[1])}/{svc.protocol} is behind NAT services "{first.name}" '
                       f'and "{svc.name}"; its replies are translated back by (address, port, protocol) alone, '
                       f"so they could not tell which VIP to answer from: give each service its own backend port",
                       t, "backend")
                return


def _client_prefix(r: _Reader, t: dict, label: str, vip, persistence: str) -> int:
    """client_prefix: how many leading bits of an IPv6 client's address client
    persistence hashes (clients behind privacy addresses change the rest)."""
    if "client_prefix" not in t:
        return CLIENT_PREFIX_RANGE[1]
    prefix = r.integer(t, "client_prefix", label, *CLIENT_PREFIX_RANGE)
    where = f"{_path(label, 'client_prefix')} = {_show(t['client_prefix'])}"
    if vip is not None and vip.version != 6 and r.good(t, "vip", "client_prefix"):
        r.bad(f'{where} applies to IPv6 services only, and the VIP "{vip}" is IPv4', t, "client_prefix")
    elif persistence != "client" and r.good(t, "persistence", "client_prefix"):
        r.bad(f'{where} needs persistence = "client" (it shapes the client hash)', t, "client_prefix")
    return prefix


def _syntax_error(source: str, err: tomllib.TOMLDecodeError) -> PoolError:
    text = _printable(str(err))
    m = re.search(r"\s*\((at line (\d+), column (\d+)|at end of document)\)$", text)
    if m:
        message = text[: m.start()]
        where = f"line {m.group(2)}, column {m.group(3)}" if m.group(2) else "end of document"
        return PoolError(f"{source}: TOML syntax error at {where}: {message}")
    return PoolError(f"{source}: TOML syntax error: {text}")


def _decode(text: str, source: str) -> dict:
    """tomllib.loads, with each way it can fail turned into a one-sentence PoolError."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise _syntax_error(source, err) from None
    except RecursionError:
        raise PoolError(f"{source}: TOML syntax error: arrays or inline tables nest too deeply") from None
    except ValueError as err:  # an integer of more digits than Python converts
        raise PoolError(f"{source}: TOML syntax error: {_printable(str(err).partition(':')[0])}") from None
    except MemoryError:
        raise PoolError(f"{source}: the pool text is too large to parse") from None


def _vips(raw: list[dict]) -> dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str]:
    """Each VIP written in the services, and the first service that uses it; bad ones are
    reported by their own service."""
    vips: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str] = {}
    for i, t in enumerate(raw):
        with contextlib.suppress(ValueError, TypeError):
            address = ipaddress.ip_address(t.get("vip"))
            if not _unusable_address(address):
                vips.setdefault(address, _item_label("service", i, t).rstrip())
    return vips


def _validate(r: _Reader, doc: dict) -> Pool | None:
    """Check the whole document, noting every problem in ``r``; the Pool if there are none."""
    with r.section():  # problems of the whole pool, which no table's section catches
        r.check_keys(doc, "", _TOP_KEYS)
        with r.section((doc.get("xdplb"), None), (doc, "xdplb")) as checked_settings:
            settings = _parse_settings(r, doc)
        raw = r.tables(doc, "service", "", "service")
        if not raw:
            raise r.fail("the pool defines no [[service]]")
        if checked_settings.ok and len(raw) > settings.max_services:
            r.note(f"the pool defines {len(raw)} services but xdplb.max_services = {settings.max_services}",
                   doc.get("xdplb"), "max_services")
        r.vips = _vips(raw)
        services: list[Service] = []
        for i, t in enumerate(raw):
            service = _parse_service(r, i, t, services)
            if service is not None:
                services.append(service)
        _check_health_from(r, raw, services)
        _check_forwarding_mix(r, raw, services)
        total = sum(len(s.backends) for s in services)
        if checked_settings.ok and total > settings.max_backends - 1:
            r.note(
                f"the pool defines {total} backends in total but xdplb.max_backends = "
                f"{settings.max_backends} allows at most {settings.max_backends - 1}",
                doc.get("xdplb"), "max_backends",
            )
        if not r.found:
            return Pool(_with_flows6_size(settings, services), tuple(services), r.source)
    return None


def balances_ipv6(services) -> bool:
    """Whether the XDP program balances an IPv6 service of these (a TLS
    service's packets go to HAProxy on the gateway's stack instead)."""
    return any(s.vip.version == 6 and s.tls is None for s in services)


def _with_flows6_size(settings: Settings, services) -> Settings:
    """flow_table_size6 resolved: the pool's, else flow_table_size when the
    program balances an IPv6 service, else the minimum."""
    if settings.flow_table_size6 is not None:
        return settings
    size = settings.flow_table_size if balances_ipv6(services) else FLOW_TABLE_SIZE_RANGE[0]
    return dataclasses.replace(settings, flow_table_size6=size, flows6_size_implied=True)


def _report(r: _Reader, text: str, doc: dict) -> PoolError:
    """One PoolError for every problem noted, each with its line, in file order
    (problems of the whole pool last)."""
    lines = line_index(text, doc)
    found = sorted(((lines.find(places), sentence) for sentence, places in r.found),
                   key=lambda f: math.inf if f[0] is None else f[0])
    return PoolError.of([f"{r.source}: line {line}: {sentence}" if line else f"{r.source}: {sentence}"
                         for line, sentence in found])


def parse_pool(text: str, source: str = "<string>") -> Pool:
    """Parse and validate pool TOML text; raise one PoolError naming every problem found."""
    doc = _decode(text, source)
    r = _Reader(source)
    pool = _validate(r, doc)
    if pool is None:
        raise _report(r, text, doc)
    return pool


def _refuse_non_regular(name: str, st: os.stat_result) -> None:
    """A FIFO would hang the reader and a device (/dev/zero) never end: only regular files."""
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"))
    if not stat.S_ISREG(st.st_mode):
        kind = next((text for test, text in kinds if test(st.st_mode)), "not a file")
        raise PoolError(f"cannot read pool file {name}: it is {kind}, not a regular file")
    if st.st_size > MAX_POOL_BYTES:
        raise _too_large(name, st.st_size)


def _too_large(name: str, size: int) -> PoolError:
    return PoolError(f"cannot read pool file {name}: it holds {size} bytes, more than the "
                     f"{MAX_POOL_BYTES // 2**20} MiB a pool file may have")


def _read_pool_file(name: str) -> bytes:
    try:
        _refuse_non_regular(name, os.stat(name))  # before opening: opening some devices acts
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            _refuse_non_regular(name, os.fstat(f.fileno()))  # the name may point elsewhere by now
            data = f.read(MAX_POOL_BYTES + 1)
    except OSError as err:
        raise PoolError(f"cannot read pool file {name}: {err.strerror or err}") from None
    if len(data) > MAX_POOL_BYTES:  # it grew after the fstat
        raise _too_large(name, len(data))
    return data


def load_pool(path: str | PathLike[str]) -> Pool:
    """Read and parse a pool file; a file that cannot be read is a PoolError naming it."""
    name = str(path)
    data = _read_pool_file(name)
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
        if s.health.check == "dicom" and s.health.called_ae == HealthCheck.called_ae:
            out.append(
                f'service "{s.name}": the dicom check calls AE title "{s.health.called_ae}", xdplb\'s '
                f"default; a PACS that checks the called AE title rejects it and every backend goes down, "
                f"so set health.called_ae to the PACS's own AE title"
            )
        if all(b.weight == 0 for b in s.backends):
            out.append(
                f'service "{s.name}": every backend has weight 0 (drained); new connections '
                f"to {host_port(s.vip, s.port)}/{s.protocol} will find no backend"
            )
    stop_drain = pool.settings.stop_drain
    if stop_drain > UNIT_TIMEOUT_STOP - DETACH_SECONDS:
        out.append(
            f"stop_drain = {stop_drain:g} s does not fit the shipped systemd unit's TimeoutStopSec="
            f"{UNIT_TIMEOUT_STOP:g}: systemd would kill xdplb mid-drain with the program attached; give the unit "
            f"TimeoutStopSec={stop_drain + DETACH_SECONDS:g} or more (systemctl edit xdplb@IFACE)"
        )
    if not pool.settings.manage_vips and pool.settings.no_backend == "reset":
        out.append(
            'no_backend = "reset" hands packets of a service with no healthy backend to this host\'s '
            "own stack, which resets them only if the host holds the VIP; with manage_vips = false "
            'add the VIPs yourself or use no_backend = "drop"'
        )
    return out


def nat_routing_sentence(versions) -> str:
    """What a pool with NAT services of these IP versions needs of the
    network: one sentence, naming the forwarding sysctl of each family
    (the attached interface's own: check has no interface)."""
    sysctls = " and ".join(f"{forwarding_sysctl(v, '<interface>')} = 1" for v in sorted(versions))
    return ("  routing: NAT services need the backends' route to the clients to go through this "
            "gateway (its address on their subnet as their default route), with IP forwarding on "
            f"the attached interface ({sysctls}, which attach and reload require and never set); replies "
            "that bypass it reach the clients untranslated and are reset")

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


def _tls_detail(tls: TlsTermination) -> str:
    clients = f"client certificates required, signed by {tls.client_ca}" if tls.client_ca else \
        "no client certificate asked"
    return (f"  tls: terminated by HAProxy with {tls.certificate}, TLS {tls.min_version}+, {clients}; "
            f"cleartext {tls.backend_protocol} to backend port {tls.backend_port}")


def describe(pool: Pool) -> str:
    """Return a human-readable, multi-line account of what would be programmed."""
    st = pool.settings
    total = sum(len(s.backends) for s in pool.services)
    lines = [
        f"pool {pool.source}: {len(pool.services)} service(s), {total} backend(s)",
        f"  metrics: {st.metrics or 'disabled'}; manage VIPs: {'yes' if st.manage_vips else 'no'}",
        f"  maglev_size {st.maglev_size}, flow_table_size {st.flow_table_size}, "
        f"flow_table_size6 {st.flows6_entries}, "
        f"max_services {st.max_services}, max_backends {st.max_backends}, hash_seed {st.hash_seed}, "
        f"no healthy backend: {st.no_backend}",
        f"  UDP flows expire after {st.udp_idle_timeout:g}s idle; established flows stay on a down backend "
        + (f"for {st.down_grace:g}s" if st.down_grace else "for 0s (re-chosen at once)")
        + "; flood guard: "
        + (f"no new flow entries above {st.flood_guard_rate} per second per CPU" if st.flood_guard_rate else "off")
        + "; also balanced: frames to "
        + (", ".join(m.hex(":") for m in st.extra_macs) if st.extra_macs else "the interface's MAC only"),
    ]
    if st.announce_table is not None or st.ready_file:
        where = ([f"routes in kernel table {st.announce_table} (proto 120)"] if st.announce_table is not None else []) \
            + ([f"ready file {st.ready_file}"] if st.ready_file else [])
        lines.append("  announces servable VIPs: " + ", ".join(where) + "; SIGTERM "
                     + (f"withdraws and waits up to {st.stop_drain:g}s for {st.stop_drain_idle:g}s of still counters"
                        if st.stop_drain else "withdraws and detaches at once"))
    nat_versions = {s.vip.version for s in pool.services if s.forwarding == "nat"}
    if nat_versions:
        lines.append(nat_routing_sentence(nat_versions))
    for s in pool.services:
        h = s.health
        lines.append(
            f'service "{s.name}": {host_port(s.vip, s.port)}/{s.protocol}, '
            f"persistence {_PERSISTENCE_TEXT.get(s.persistence, s.persistence)}"
            + (f" (the first {s.client_prefix} bits of its address)"
               if s.vip.version == 6 and s.persistence == "client" else "")
            + (", forwarding nat (destination and port translated, client address kept)"
               if s.forwarding == "nat" else "")
        )
        if s.tls is not None:
            lines.append(_tls_detail(s.tls))
        if s.tls is not None and s.tls.health_from:
            lines.append(f'  health: follows the verdicts of service "{s.tls.health_from}"')
        else:
            lines.append(
                f"  health: {h.check} port {h.port or 'of each backend'}{_health_detail(h)}, every {h.interval:g}s, "
                f"timeout {h.timeout:g}s, rise {h.rise}, fall {h.fall}"
            )
        for b in s.backends:
            state = "weight 0 (drained)" if b.weight == 0 else f"weight {b.weight}"
            where = host_port(b.address, s.backend_port(b)) if s.forwarding == "nat" else str(b.address)
            lines.append(f'  backend "{b.name}" {where}: {state}')
    return "\n".join(lines) + "\n"
