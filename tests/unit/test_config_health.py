"""[service.health] for the http, https and dicom check kinds: defaults,
every key's bad values, keys of another kind, and the CA file."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from xdplb.config import HEALTH_CHECK_KINDS, HealthCheck, PoolError, describe, load_pool, parse_pool

POOL = """\
[[service]]
name = "synapse-dicom"
vip = "10.10.0.100"
port = 104

  [service.health]
{health}

  [[service.backend]]
  name = "pacs-a"
  address = "10.10.0.11"
"""
H = 'service[0] "synapse-dicom" .health'


def health(lines: str, source: str = "pacs.toml") -> HealthCheck:
    return parse_pool(POOL.format(health=lines), source).services[0].health


def error(lines: str, source: str = "pacs.toml") -> str:
    with pytest.raises(PoolError) as info:
        health(lines, source)
    message = str(info.value)
    assert message.startswith(f"{source}: ") and "\n" not in message
    return message


@pytest.fixture(scope="module")
def ca_pem(tmp_path_factory):
    d = tmp_path_factory.mktemp("ca")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
                    "-out", "ca.pem", "-days", "2", "-subj", "/CN=xdplb test CA"],
                   cwd=d, check=True, capture_output=True)
    return d / "ca.pem"


def test_every_kind_is_listed():
    assert HEALTH_CHECK_KINDS == ("tcp", "http", "https", "dicom")


def test_http_defaults():
    h = health('check = "http"')
    assert (h.check, h.port, h.path, h.expect, h.host) == ("http", 104, "/", 200, "")


def test_http_keys():
    h = health('check = "http"\nport = 8042\npath = "/system?x=1"\nexpect = 204\nhost = "pacs-a.example:8042"')
    assert (h.port, h.path, h.expect, h.host) == (8042, "/system?x=1", 204, "pacs-a.example:8042")


def test_https_defaults_use_the_system_store_and_the_backend_ip():
    h = health('check = "https"')
    assert (h.path, h.expect, h.host, h.ca_file, h.tls_verify, h.server_name) == ("/", 200, "", "", True, "")
    assert "verified against the system CA store for the backend IP address" in describe(
        parse_pool(POOL.format(health='check = "https"')))


def test_https_keys(ca_pem):
    h = health(f'check = "https"\nca_file = "{ca_pem}"\nserver_name = "pacs.example.test"\npath = "/ok"')
    assert (h.ca_file, h.tls_verify, h.server_name, h.path) == (str(ca_pem), True, "pacs.example.test", "/ok")
    assert health('check = "https"\ntls_verify = false').tls_verify is False
    assert health('check = "https"\nserver_name = "10.10.0.11"').server_name == "10.10.0.11"


def test_relative_ca_file_is_found_next_to_the_pool_file(tmp_path, ca_pem):
    (tmp_path / "tls").mkdir()
    shutil.copy(ca_pem, tmp_path / "tls" / "pacs-ca.pem")
    pool_file = tmp_path / "pool.toml"
    pool_file.write_text(POOL.format(health='check = "https"\nca_file = "tls/pacs-ca.pem"'))
    assert load_pool(pool_file).services[0].health.ca_file == str(tmp_path / "tls" / "pacs-ca.pem")


def test_dicom_defaults_and_keys():
    h = health('check = "dicom"')
    assert (h.calling_ae, h.called_ae) == ("XDPLB", "ANY-SCP")
    h = health('check = "dicom"\ncalling_ae = "XDPLB GW 1"\ncalled_ae = "SYNAPSE_PACS_A16"')
    assert (h.calling_ae, h.called_ae) == ("XDPLB GW 1", "SYNAPSE_PACS_A16")


def test_tcp_check_keeps_its_old_shape():
    assert health('check = "tcp"') == HealthCheck("tcp", 104, 1.0, 0.5, 2, 2)


def test_describe_shows_what_each_kind_does(ca_pem):
    text = describe(parse_pool(POOL.format(health='check = "dicom"\ncalled_ae = "PACS-A"')))
    assert 'health: dicom port 104 C-ECHO from AE "XDPLB" to AE "PACS-A", every 1s' in text
    text = describe(parse_pool(POOL.format(
        health=f'check = "https"\nport = 443\npath = "/ok"\nca_file = "{ca_pem}"\nserver_name = "pacs.example.test"')))
    assert (f"health: https port 443 GET /ok expecting 200, Host the backend address, certificate verified "
            f"against {ca_pem} for pacs.example.test, SNI pacs.example.test, every 1s") in text
    text = describe(parse_pool(POOL.format(health='check = "https"\ntls_verify = false')))
    assert "certificate not verified" in text


@pytest.mark.parametrize("lines, fragments", [
    ('check = "tcp"\npath = "/"',
     [f'{H}.path is not a known key for check = "tcp"; it applies only to check = "http" or "https"']),
    ('path = "/"', [f'{H}.path is not a known key for check = "tcp"']),
    ('check = "http"\nca_file = "/etc/ssl/ca.pem"',
     [f'{H}.ca_file is not a known key for check = "http"; it applies only to check = "https"']),
    ('check = "http"\ncalled_ae = "PACS"',
     [f'{H}.called_ae is not a known key for check = "http"; it applies only to check = "dicom"']),
    ('check = "dicom"\nexpect = 200', [f'{H}.expect is not a known key for check = "dicom"']),
    ('check = "https"\ntls_verfy = false', [f'{H}.tls_verfy is not a known key', 'did you mean "tls_verify"?']),
    ('check = "dicom"\ncalling_at = "X"', [f'{H}.calling_at is not a known key', 'did you mean "calling_ae"?']),
])
def test_keys_of_another_kind_are_unknown(lines, fragments):
    message = error(lines)
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("lines, fragments", [
    ('check = "http"\npath = "health"', [f'{H}.path = "health" must start with "/"']),
    ('check = "http"\npath = "/a b"', [f'{H}.path = "/a b" must start with "/" and hold only printable ASCII']),
    ('check = "http"\npath = "/\\r\\nX: y"', [f'{H}.path = "/\\r\\nX: y"', "without spaces"]),
    ('check = "http"\npath = 1', [f"{H}.path = 1 must be a string", "got an integer"]),
    ('check = "http"\nexpect = 99', [f"{H}.expect = 99 is out of range", "100 to 599"]),
    ('check = "http"\nexpect = 600', [f"{H}.expect = 600 is out of range"]),
    ('check = "http"\nexpect = "200"', [f'{H}.expect = "200" must be an integer from 100 to 599, got a string']),
    ('check = "http"\nhost = ""', [f'{H}.host = "" must be 1 to 255 printable ASCII characters without spaces']),
    ('check = "http"\nhost = "a b"', [f'{H}.host = "a b" must be 1 to 255']),
    ('check = "https"\nhost = "x\\r\\nEvil: 1"', [f'{H}.host = "x\\r\\nEvil: 1" must be 1 to 255']),
    ('check = "https"\ntls_verify = "no"', [f'{H}.tls_verify = "no" must be true or false, got a string']),
    ('check = "https"\nserver_name = "pacs_a..example"', [f'{H}.server_name = "pacs_a..example" is not a DNS name']),
    ('check = "https"\nserver_name = ""', [f'{H}.server_name = "" is not a DNS name or IP address']),
    ('check = "dicom"\ncalling_ae = ""', [f'{H}.calling_ae = "" is not a valid DICOM AE title',
                                          "1 to 16 printable ASCII characters"]),
    ('check = "dicom"\ncalled_ae = "SEVENTEEN-CHARS-X"', [f'{H}.called_ae = "SEVENTEEN-CHARS-X" is not a valid']),
    ('check = "dicom"\ncalled_ae = "    "', [f'{H}.called_ae = "    " is not a valid DICOM AE title']),
    ('check = "dicom"\ncalled_ae = "PACS\\\\A"', [f'{H}.called_ae = "PACS\\\\A" is not a valid', "no backslash"]),
    ('check = "dicom"\ncalling_ae = "PACS\\tA"', [f'{H}.calling_ae = "PACS\\tA" is not a valid']),
    ('check = "dicom"\ncalling_ae = "PACSÄ"', [f'{H}.calling_ae = "PACSÄ" is not a valid']),
    ('check = "dicom"\ncalling_ae = 7', [f"{H}.calling_ae = 7 must be a string", "got an integer"]),
])
def test_bad_values_are_one_sentence_naming_key_and_value(lines, fragments):
    message = error(lines)
    for fragment in fragments:
        assert fragment in message


def test_missing_ca_file_is_an_error(tmp_path):
    missing = tmp_path / "nope.pem"
    message = error(f'check = "https"\nca_file = "{missing}"')
    assert f'{H}.ca_file = "{missing}" is not an existing file (looked for {missing})' in message


def test_relative_missing_ca_file_names_where_it_looked(tmp_path):
    pool_file = tmp_path / "pool.toml"
    pool_file.write_text(POOL.format(health='check = "https"\nca_file = "tls/ca.pem"'))
    with pytest.raises(PoolError) as info:
        load_pool(pool_file)
    assert f'.ca_file = "tls/ca.pem" is not an existing file (looked for {tmp_path}/tls/ca.pem)' in str(info.value)


def test_ca_file_that_is_not_pem_is_an_error(tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    message = error(f'check = "https"\nca_file = "{junk}"')
    assert f'{H}.ca_file = "{junk}" is not a readable PEM CA certificate file' in message


def test_ca_file_with_tls_verify_false_contradicts(ca_pem):
    message = error(f'check = "https"\nca_file = "{ca_pem}"\ntls_verify = false')
    assert f'{H}.tls_verify = false contradicts .ca_file = "{ca_pem}"; remove one of them' in message
