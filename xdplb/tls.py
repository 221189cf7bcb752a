"""The certificates of TLS services ([service.tls]): are they usable by HAProxy?

`xdplb check` and every reload ask ``check_certificates``: a certificate
that cannot be read, whose key is missing, encrypted or belongs to another
certificate, that has expired or is not valid yet, is an error (one sentence
each) and nothing is changed; one that expires within WARN_DAYS is a
warning. HAProxy reads a PEM holding the certificate (and its chain) with
its key, or the key from "<file>.key" next to it; ``certificate`` may also
name a directory, whose every certificate file HAProxy loads for SNI.

Pure but for reading the files: the time is an argument.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone

from cryptography import x509
from cryptography.hazmat.primitives import serialization

WARN_DAYS = 30
# Files in a certificate directory that HAProxy reads as companions of a
# certificate, not as certificates of their own.
_COMPANION_SUFFIXES = (".key", ".ocsp", ".issuer", ".sctl")
_PEM_BLOCK_RE = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.+?-----END \1-----", re.S)


class CertificateError(ValueError):
    """One sentence: why HAProxy cannot use this certificate."""


@dataclass(frozen=True)
class Certificate:
    path: str
    subject: str
    serial: int
    not_before: float   # Unix time
    not_after: float


@dataclass(frozen=True)
class Report:
    errors: tuple[str, ...]
    warnings: tuple[str, ...]
    certificates: tuple[tuple[str, Certificate], ...]   # (service name, certificate) of the good ones


def certificate_files(path: str) -> list[str]:
    """The certificate files HAProxy loads for ``certificate = path``."""
    if not os.path.isdir(path):
        return [path]
    return [os.path.join(path, name) for name in sorted(os.listdir(path))
            if not name.startswith(".") and not name.endswith(_COMPANION_SUFFIXES)
            and os.path.isfile(os.path.join(path, name))]


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20)
    except OSError as err:
        raise CertificateError(f"certificate {path} cannot be read: {err.strerror or err}") from None


def _blocks(data: bytes, kind: str) -> list[bytes]:
    return [m.group(0) for m in _PEM_BLOCK_RE.finditer(data) if m.group(1).decode().endswith(kind)]


def _public(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def inspect(path: str, now: float) -> Certificate:
    """Read one certificate file; raise CertificateError with one sentence if HAProxy cannot use it."""
    data = _read(path)
    certs = _blocks(data, "CERTIFICATE")
    if not certs:
        raise CertificateError(f"certificate {path} holds no PEM certificate")
    try:
        cert = x509.load_pem_x509_certificate(certs[0])
    except ValueError:
        raise CertificateError(f"certificate {path} holds a PEM certificate that cannot be parsed") from None
    keys, key_path = _blocks(data, "PRIVATE KEY"), path
    if not keys and os.path.exists(path + ".key"):
        key_path = path + ".key"
        keys = _blocks(_read(key_path), "PRIVATE KEY")
    if not keys:
        raise CertificateError(f"certificate {path} has no private key, neither in the file nor in {path}.key")
    try:
        key = serialization.load_pem_private_key(keys[0], password=None)
    except TypeError:
        raise CertificateError(f"the private key in {key_path} is encrypted; HAProxy needs it unencrypted") from None
    except ValueError:
        raise CertificateError(f"the private key in {key_path} cannot be parsed") from None
    if _public(key.public_key()) != _public(cert.public_key()):
        raise CertificateError(f"the private key in {key_path} does not match the certificate in {path}")
    not_before = cert.not_valid_before.replace(tzinfo=timezone.utc).timestamp()
    not_after = cert.not_valid_after.replace(tzinfo=timezone.utc).timestamp()
    if now >= not_after:
        raise CertificateError(f"certificate {path} expired on {_day(not_after)}")
    if now < not_before:
        raise CertificateError(f"certificate {path} is not valid before {_day(not_before)}")
    return Certificate(path, cert.subject.rfc4514_string(), cert.serial_number, not_before, not_after)


def _day(when: float) -> str:
    return datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def check_certificates(pool, now: float) -> Report:
    """Every TLS service's certificates: errors, warnings (expiring within WARN_DAYS), and the good ones."""
    errors: list[str] = []
    warnings: list[str] = []
    good: list[tuple[str, Certificate]] = []
    for svc in pool.services:
        if svc.tls is None:
            continue
        files = certificate_files(svc.tls.certificate)
        if not files:
            errors.append(f'service "{svc.name}": certificate directory {svc.tls.certificate} holds no '
                          f"certificate file")
        for path in files:
            try:
                cert = inspect(path, now)
            except CertificateError as err:
                errors.append(f'service "{svc.name}": {err}')
                continue
            good.append((svc.name, cert))
            days = (cert.not_after - now) / 86400
            if days < WARN_DAYS:
                warnings.append(f'service "{svc.name}": certificate {path} expires in {days:.0f} days, on '
                                f"{_day(cert.not_after)}; renew it")
    return Report(tuple(errors), tuple(warnings), tuple(good))


def usable_certificates(pool, now: float) -> Report:
    """check_certificates, with its errors raised as one PoolError (every one listed), as
    a bad pool file is: `xdplb check` and a reload both refuse such a pool and change nothing."""
    from .config import PoolError

    report = check_certificates(pool, now)
    if report.errors:
        raise PoolError.of([f"{pool.source}: {text}" for text in report.errors])
    return report
