"""Real certificates for tests, made by the openssl command line."""
from __future__ import annotations

import subprocess
from pathlib import Path


def openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_cert(d: Path, name: str, days: int = 365, key_in_file: bool = True) -> str:
    """A self-signed certificate for CN=name valid from now for `days`; its key in the PEM
    or in <pem>.key. Returns the PEM's path."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt",
            "-days", str(days), "-subj", f"/CN={name}", cwd=d)
    pem = d / f"{name}.pem"
    if key_in_file:
        pem.write_bytes((d / f"{name}.crt").read_bytes() + (d / f"{name}.key").read_bytes())
        (d / f"{name}.key").unlink()
        (d / f"{name}.crt").unlink()
    else:
        (d / f"{name}.crt").rename(pem)
        (d / f"{name}.key").rename(d / f"{name}.pem.key")
    return str(pem)


def make_ca(d: Path, name: str = "xdplb test CA") -> tuple[Path, Path]:
    """A CA certificate and its key: (ca.pem, ca.key)."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", f"/CN={name}", cwd=d)
    return d / "ca.pem", d / "ca.key"


def make_signed(d: Path, name: str, dns: str, serial: int, days: int = 2) -> Path:
    """<name>.pem: a certificate for `dns` (CN and subjectAltName) signed by d's CA (make_ca),
    with its key, and the given serial number."""
    (d / f"{name}.ext").write_text(f"subjectAltName=DNS:{dns}\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={dns}", cwd=d)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-set_serial", str(serial),
            "-out", f"{name}.crt", "-days", str(days), "-extfile", f"{name}.ext", cwd=d)
    pem = d / f"{name}.pem"
    pem.write_bytes((d / f"{name}.crt").read_bytes() + (d / f"{name}.key").read_bytes())
    return pem


def make_expired(d: Path, name: str, dns: str, serial: int) -> Path:
    """<name>.pem: like make_signed, but valid only from 10 days ago until yesterday (openssl's
    command line cannot date a certificate in the past, so it is built with cryptography)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    ca = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), password=None)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns)]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(serial)
            .not_valid_before(now - datetime.timedelta(days=10)).not_valid_after(now - datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = d / f"{name}.pem"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return pem
