"""[service.tls]: the table's keys, defaults and errors (with their lines), health_from,
and the certificate checks `xdplb check` and a reload make (real certificates made by openssl)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from xdplb.cli import cli
from xdplb.config import DEFAULT_TLS_CIPHERS, DEFAULT_TLS_CIPHERSUITES, PoolError, describe, parse_pool
from xdplb.tls import CertificateError, check_certificates, inspect, usable_certificates

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for certs.py

from certs import make_cert, openssl  # noqa: E402

DAY = 86400.0

POOL = """\
[[service]]
name = "synapse-dicom"
vip = "10.10.0.100"
port = 104
  [service.health]
  check = "dicom"
  called_ae = "ORTHANC"
  [[service.backend]]
  name = "pacs-a"
  address = "10.10.0.11"
  [[service.backend]]
  name = "pacs-b"
  address = "10.10.0.12"

[[service]]
name = "synapse-https"
vip = "10.10.0.100"
port = 443
  [service.tls]
{tls}
  [[service.backend]]
  name = "pacs-a"
  address = "10.10.0.11"
"""
T = 'service[1] "synapse-https" .tls'


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    return d, make_cert(d, "pacs")


def pool(tls_lines: str, source: str = "pacs.toml"):
    return parse_pool(POOL.format(tls=tls_lines), source)


def error(tls_lines: str) -> list[str]:
    with pytest.raises(PoolError) as info:
        pool(tls_lines)
    return list(info.value.problems)


def tls_table(cert: str, *more: str) -> str:
    return "\n".join([f'certificate = "{cert}"', 'backend_protocol = "http"', "backend_port = 8042", *more])


def test_defaults_are_tls12_with_forward_secret_aead_suites(certs):
    _, pem = certs
    svc = pool(tls_table(pem)).services[1]
    tls = svc.tls
    assert (tls.certificate, tls.backend_protocol, tls.backend_port, tls.health_from, tls.client_ca) == \
        (pem, "http", 8042, "", "")
    assert tls.min_version == "1.2"
    assert (tls.ciphers, tls.ciphersuites) == (DEFAULT_TLS_CIPHERS, DEFAULT_TLS_CIPHERSUITES)
    assert all(c.startswith("ECDHE-") and ("GCM" in c or "CHACHA20" in c) for c in tls.ciphers.split(":"))
    # Its own health check probes the backend port, not the VIP's 443.
    assert (svc.health.check, svc.health.port) == ("tcp", 8042)
    assert pool(tls_table(pem)).services[0].tls is None


def test_every_key_can_be_set(certs, tmp_path):
    d, pem = certs
    svc = pool(tls_table(pem, 'health_from = "synapse-dicom"', 'min_version = "1.3"',
                         'ciphers = "ECDHE-RSA-AES256-GCM-SHA384"', 'ciphersuites = "TLS_AES_256_GCM_SHA384"',
                         f'client_ca = "{d / "pacs.pem"}"')).services[1]
    assert (svc.tls.health_from, svc.tls.min_version, svc.tls.ciphers, svc.tls.ciphersuites, svc.tls.client_ca) \
        == ("synapse-dicom", "1.3", "ECDHE-RSA-AES256-GCM-SHA384", "TLS_AES_256_GCM_SHA384", str(d / "pacs.pem"))
    text = describe(pool(tls_table(pem, 'health_from = "synapse-dicom"', f'client_ca = "{pem}"')))
    assert f"tls: terminated by HAProxy with {pem}, TLS 1.2+, client certificates required, signed by {pem}; " \
           "cleartext http to backend port 8042" in text
    assert 'health: follows the verdicts of service "synapse-dicom"' in text


def test_relative_certificate_is_taken_from_the_pool_files_folder(certs):
    d, pem = certs
    svc = pool(tls_table("pacs.pem"), source=str(d / "pool.toml")).services[1]
    assert svc.tls.certificate == pem


@pytest.mark.parametrize("lines, expected", [
    (['backend_protocol = "http"', "backend_port = 8042"],
     "line 19: " + T + ".certificate is missing; expected the path of a PEM file"),
    (['certificate = "/nonexistent/x.pem"', 'backend_protocol = "http"', "backend_port = 8042"],
     f'line 20: {T}.certificate = "/nonexistent/x.pem" is not an existing file or directory '
     f"(looked for /nonexistent/x.pem)"),
    (["{cert}", "backend_port = 8042"],
     f'line 19: {T}.backend_protocol is missing; expected "http" (web viewers) or "tcp"'),
    (["{cert}", 'backend_protocol = "https"', "backend_port = 8042"],
     f'line 21: {T}.backend_protocol = "https" is not a known backend protocol; expected one of "http", "tcp"'),
    (["{cert}", 'backend_protocol = "tcp"'],
     f"line 19: {T}.backend_port is missing; expected an integer from 1 to 65535"),
    (["{cert}", 'backend_protocol = "tcp"', "backend_port = 0"],
     f"line 22: {T}.backend_port = 0 is out of range"),
    (["{cert}", 'backend_protocol = "tcp"', "backend_port = 104", 'min_version = "1.0"'],
     f'line 23: {T}.min_version = "1.0" is not a known minimum TLS version; expected one of "1.2", "1.3"'),
    (["{cert}", 'backend_protocol = "tcp"', "backend_port = 104", 'ciphers = "NOSUCHCIPHER"'],
     f'line 23: {T}.ciphers = "NOSUCHCIPHER" selects no cipher OpenSSL knows'),
    (["{cert}", 'backend_protocol = "tcp"', "backend_port = 104", 'ciphers = "AES128 \\n bind x"'],
     f"line 23: {T}.ciphers = "),
    (["{cert}", 'backend_protocol = "tcp"', "backend_port = 104", 'ciphersuites = "AES128-SHA"'],
     f'line 23: {T}.ciphersuites = "AES128-SHA" must be TLS 1.3 suite names joined by colons'),
    (["{cert}", 'backend_protocol = "tcp"', "backend_port = 104", 'client_ca = "/nonexistent/ca.pem"'],
     f'line 23: {T}.client_ca = "/nonexistent/ca.pem" is not an existing file'),
    (["{cert}", 'backend_protocol = "tcp"', "backend_port = 104", "sni = true"],
     f"line 23: {T}.sni is not a known key; known keys are"),
    (["{cert}", 'backend_protocol = "tcp"', "backend_port = 104", "ciphrs = 'x'"],
     f'line 23: {T}.ciphrs is not a known key; did you mean "ciphers"?'),
])
def test_each_bad_key_is_one_sentence_with_its_line(certs, lines, expected):
    _, pem = certs
    problems = error("\n".join(line.replace("{cert}", f'certificate = "{pem}"') for line in lines))
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"pacs.toml: {expected}"), problems[0]
    assert "\n" not in problems[0]


def test_path_haproxy_cannot_carry_is_refused(tmp_path):
    odd = tmp_path / 'a"b.pem'
    odd.write_text("x")
    (problem,) = error(tls_table(str(odd).replace('"', '\\"')))
    assert "holds a control character, a quote, a backslash or a dollar sign" in problem


def test_udp_service_cannot_terminate_tls(certs):
    _, pem = certs
    text = POOL.format(tls=tls_table(pem)).replace("port = 443", 'port = 443\nprotocol = "udp"')
    with pytest.raises(PoolError) as info:
        parse_pool(text, "pacs.toml")
    assert str(info.value) == ('pacs.toml: line 19: service[1] "synapse-https" .protocol = "udp" cannot carry '
                               'TLS; a service with [service.tls] is "tcp"')


def test_every_problem_is_reported_at_once(certs):
    _, pem = certs
    problems = error("\n".join([f'certificate = "{pem}"', 'backend_protocol = "ftp"', "backend_port = -1",
                                'min_version = "1.1"']))
    assert [p.split(": ")[1] for p in problems] == ["line 21", "line 22", "line 23"]


@pytest.mark.parametrize("health_from, more, expected", [
    ("nosuch", "", '.tls.health_from = "nosuch" names no service in this pool'),
    ("synapse-https", "", '.tls.health_from = "synapse-https" names the service itself; name another service '
                          'or give it a [service.health]'),
    ("synapse-dicom", '  [service.health]\n  check = "tcp"\n',
     '.tls.health_from = "synapse-dicom" contradicts the service\'s own [service.health]; remove one of them'),
    ("synapse-dicom", '  [[service.backend]]\n  name = "pacs-c"\n  address = "10.10.0.13"\n',
     '.tls.health_from = "synapse-dicom" has no verdict for backend address 10.10.0.13, which is not a backend '
     'of that service'),
])
def test_health_from_must_name_another_probing_service(certs, health_from, more, expected):
    _, pem = certs
    text = POOL.format(tls=tls_table(pem, f'health_from = "{health_from}"')) + more
    with pytest.raises(PoolError) as info:
        parse_pool(text, "pacs.toml")
    assert str(info.value) == f'pacs.toml: line 23: service[1] "synapse-https" {expected}'


def test_health_from_may_not_follow_a_follower(certs):
    _, pem = certs
    text = POOL.format(tls=tls_table(pem, 'health_from = "synapse-dicom"')) + f"""
[[service]]
name = "viewer-https"
vip = "10.10.0.100"
port = 8443
  [service.tls]
{tls_table(pem, 'health_from = "synapse-https"')}
  [[service.backend]]
  name = "pacs-a"
  address = "10.10.0.11"
"""
    with pytest.raises(PoolError) as info:
        parse_pool(text, "pacs.toml")
    assert str(info.value) == ('pacs.toml: line 36: service[2] "viewer-https" .tls.health_from = "synapse-https" '
                               'names a service that itself follows "synapse-dicom"; name the service that probes')
    ok = parse_pool(text.replace('health_from = "synapse-https"', 'health_from = "synapse-dicom"'), "pacs.toml")
    assert [s.tls.health_from for s in ok.services[1:]] == ["synapse-dicom", "synapse-dicom"]


# --- certificates ---------------------------------------------------------------------------

def test_a_good_certificate(certs):
    _, pem = certs
    now = time.time()
    cert = inspect(pem, now)
    assert cert.subject == "CN=pacs" and cert.serial > 0
    assert 364 * DAY < cert.not_after - now <= 365 * DAY
    report = check_certificates(pool(tls_table(pem)), now)
    assert (report.errors, report.warnings) == ((), ())
    assert report.certificates == (("synapse-https", cert),)


def test_key_in_a_companion_file(tmp_path):
    pem = make_cert(tmp_path, "split", key_in_file=False)
    assert inspect(pem, time.time()).subject == "CN=split"


def test_key_of_another_certificate_is_refused(tmp_path):
    a, b = make_cert(tmp_path, "a"), make_cert(tmp_path, "b")
    text = open(a, "rb").read()
    key_b = open(b, "rb").read()
    bad = tmp_path / "mixed.pem"
    bad.write_bytes(text[:text.index(b"-----BEGIN PRIVATE KEY")] + key_b[key_b.index(b"-----BEGIN PRIVATE KEY"):])
    with pytest.raises(CertificateError) as info:
        inspect(str(bad), time.time())
    assert str(info.value) == f"the private key in {bad} does not match the certificate in {bad}"


def test_missing_key_and_garbage_and_unreadable(tmp_path):
    crt = tmp_path / "nokey.pem"
    pem = make_cert(tmp_path, "k")
    data = open(pem, "rb").read()
    crt.write_bytes(data[:data.index(b"-----BEGIN PRIVATE KEY")])
    with pytest.raises(CertificateError, match=f"^certificate {crt} has no private key, neither in the file nor in "
                                               f"{crt}.key$"):
        inspect(str(crt), time.time())
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    with pytest.raises(CertificateError, match="holds no PEM certificate$"):
        inspect(str(junk), time.time())
    with pytest.raises(CertificateError, match=f"^certificate {tmp_path}/gone.pem cannot be read: No such file"):
        inspect(str(tmp_path / "gone.pem"), time.time())


def test_encrypted_key_is_refused(tmp_path):
    openssl("req", "-x509", "-newkey", "rsa:2048", "-passout", "pass:secret", "-keyout", "e.key", "-out", "e.crt",
            "-days", "3", "-subj", "/CN=e", cwd=tmp_path)
    pem = tmp_path / "e.pem"
    pem.write_bytes((tmp_path / "e.crt").read_bytes() + (tmp_path / "e.key").read_bytes())
    with pytest.raises(CertificateError, match="is encrypted; HAProxy needs it unencrypted$"):
        inspect(str(pem), time.time())


def test_expired_not_yet_valid_and_expiring_soon(certs):
    _, pem = certs
    now = time.time()
    with pytest.raises(CertificateError, match=f"^certificate {pem} expired on 20"):
        inspect(pem, now + 366 * DAY)
    with pytest.raises(CertificateError, match=f"^certificate {pem} is not valid before 20"):
        inspect(pem, now - DAY)
    p = pool(tls_table(pem))
    assert check_certificates(p, now + 334 * DAY).warnings == ()
    (warning,) = check_certificates(p, now + 340 * DAY).warnings
    assert warning.startswith(f'service "synapse-https": certificate {pem} expires in 25 days, on ')
    assert warning.endswith("; renew it")
    with pytest.raises(PoolError) as info:
        usable_certificates(p, now + 400 * DAY)
    assert str(info.value).startswith(f'pacs.toml: service "synapse-https": certificate {pem} expired on ')


def test_a_directory_of_certificates_for_sni(tmp_path):
    make_cert(tmp_path, "one")
    make_cert(tmp_path, "two", key_in_file=False)
    (tmp_path / "two.pem.ocsp").write_bytes(b"\0")
    report = check_certificates(pool(tls_table(str(tmp_path))), time.time())
    assert report.errors == ()
    assert [c.subject for _, c in report.certificates] == ["CN=one", "CN=two"]
    empty = tmp_path / "empty"
    empty.mkdir()
    report = check_certificates(pool(tls_table(str(empty))), time.time())
    assert report.errors == (f'service "synapse-https": certificate directory {empty} holds no certificate file',)


def test_check_command_refuses_a_bad_certificate_and_warns_of_expiry(tmp_path):
    good = make_cert(tmp_path, "soon", days=10)
    path = tmp_path / "pool.toml"
    path.write_text(POOL.format(tls=tls_table(good)))
    result = CliRunner().invoke(cli, ["check", str(path)])
    assert result.exit_code == 0, result.output
    assert f'warning: service "synapse-https": certificate {good} expires in 10 days' in result.output
    other = make_cert(tmp_path, "other")
    data, key = open(good, "rb").read(), open(other, "rb").read()
    with open(good, "wb") as f:
        f.write(data[:data.index(b"-----BEGIN PRIVATE KEY")] + key[key.index(b"-----BEGIN PRIVATE KEY"):])
    result = CliRunner().invoke(cli, ["check", str(path)])
    assert result.exit_code == 1
    assert result.output == (f'Error: {path}: service "synapse-https": the private key in {good} does not match '
                             f"the certificate in {good}\n")
