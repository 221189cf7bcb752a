"""Pool file parsing: valid pools become the expected dataclasses, every kind of
mistake is a PoolError whose one sentence names the file, key path and value."""

from __future__ import annotations

import os
import re
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from hypothesis import HealthCheck as Hypothesis, example, given, settings, strategies as st

from xdplb import tomllines
from xdplb.config import (
    HEALTH_CHECK_KINDS,
    MAX_POOL_BYTES,
    Backend,
    HealthCheck,
    Pool,
    PoolError,
    Service,
    Settings,
    describe,
    load_pool,
    parse_pool,
    warnings,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "pacs.toml"

MINIMAL = """\
[[service]]
name = "synapse-dicom"
vip = "10.10.0.100"
port = 104

  [[service.backend]]
  name = "pacs-a"
  address = "10.10.0.11"

  [[service.backend]]
  name = "pacs-b"
  address = "10.10.0.12"
"""

SECOND_SERVICE = """
[[service]]
name = "synapse-web"
vip = "10.10.0.100"
port = 80

  [[service.backend]]
  name = "pacs-a"
  address = "10.10.0.11"
"""

FULL = """\
[xdplb]
metrics = "[::1]:9100"
manage_vips = false
maglev_size = 251
flow_table_size = 1024
max_services = 2
max_backends = 8
hash_seed = 4294967295

[[service]]
name = "synapse-dicom"
vip = "10.10.0.100"
port = 104
protocol = "tcp"
persistence = "flow"

  [service.health]
  check = "tcp"
  port = 11112
  interval = 2
  timeout = 0.25
  rise = 3
  fall = 5

  [[service.backend]]
  name = "pacs-a"
  address = "10.10.0.11"
  weight = 10

  [[service.backend]]
  name = "pacs-b"
  address = "10.10.0.12"
  weight = 0

[[service]]
name = "syslog.udp"
vip = "10.10.0.100"
port = 104
protocol = "udp"
persistence = "client"

  [[service.backend]]
  name = "pacs-a"
  address = "10.10.0.11"
"""


def edit(old: str, new: str, base: str = MINIMAL) -> str:
    assert old in base, old
    return base.replace(old, new, 1)


def test_full_pool_round_trips_with_defaults_filled():
    pool = parse_pool(FULL, "pacs.toml")
    assert pool == Pool(
        settings=Settings(
            metrics="[::1]:9100",
            manage_vips=False,
            maglev_size=251,
            flow_table_size=1024,
            flow_table_size6=1024,      # no IPv6 service: the minimum
            max_services=2,
            max_backends=8,
            hash_seed=4294967295,
        ),
        services=(
            Service(
                name="synapse-dicom",
                vip=IPv4Address("10.10.0.100"),
                port=104,
                protocol="tcp",
                persistence="flow",
                health=HealthCheck("tcp", 11112, 2.0, 0.25, 3, 5),
                backends=(
                    Backend("pacs-a", IPv4Address("10.10.0.11"), 10),
                    Backend("pacs-b", IPv4Address("10.10.0.12"), 0),
                ),
            ),
            Service(
                name="syslog.udp",
                vip=IPv4Address("10.10.0.100"),
                port=104,
                protocol="udp",
                persistence="client",
                health=HealthCheck("tcp", 104, 1.0, 0.5, 2, 2),
                backends=(Backend("pacs-a", IPv4Address("10.10.0.11"), 1),),
            ),
        ),
        source="pacs.toml",
    )
    assert isinstance(pool.services[0].health.interval, float)
    assert pool.services[1].key == (IPv4Address("10.10.0.100"), 104, "udp")


def test_minimal_pool_gets_all_defaults():
    pool = parse_pool(MINIMAL)
    assert pool.settings == Settings(flow_table_size6=1024)   # no IPv6 service: flows6 at the minimum
    assert pool.source == "<string>"
    (svc,) = pool.services
    assert (svc.protocol, svc.persistence) == ("tcp", "flow")
    assert svc.health == HealthCheck("tcp", 104, 1.0, 0.5, 2, 2)
    assert [b.weight for b in svc.backends] == [1, 1]


@pytest.mark.parametrize("metrics", ["", "localhost:9742", "0.0.0.0:1", "[::1]:9742", "10.1.2.3:65535"])
def test_metrics_forms_accepted(metrics):
    pool = parse_pool(f'[xdplb]\nmetrics = "{metrics}"\n' + MINIMAL)
    assert pool.settings.metrics == metrics


S0 = 'service[0] "synapse-dicom" '
B0 = S0 + 'backend[0] "pacs-a" '
B1 = S0 + 'backend[1] "pacs-b" '

INVALID = [
    ("bad ip", edit('"10.10.0.100"', '"10.10.0.300"'),
     [S0 + '.vip = "10.10.0.300"', "not a valid IP address"]),
    ("ip not a string", edit('vip = "10.10.0.100"', "vip = 10"),
     [S0 + ".vip = 10", "must be a string", "got an integer"]),
    ("ipv6 backend of an ipv4 vip", edit('"10.10.0.12"', '"fd00::12"'),
     [B1 + '.address = "fd00::12" is IPv6 but the service\'s VIP "10.10.0.100" is IPv4', "(no NAT64)"]),
    ("unspecified vip", edit('"10.10.0.100"', '"0.0.0.0"'), [S0 + '.vip = "0.0.0.0"', "unspecified"]),
    ("multicast vip", edit('"10.10.0.100"', '"224.0.0.5"'), [S0 + '.vip = "224.0.0.5"', "multicast"]),
    ("broadcast vip", edit('"10.10.0.100"', '"255.255.255.255"'),
     [S0 + '.vip = "255.255.255.255"', "broadcast"]),
    ("loopback backend", edit('"10.10.0.11"', '"127.0.0.1"'),
     [B0 + '.address = "127.0.0.1"', "loopback"]),
    ("missing vip", edit('vip = "10.10.0.100"\n', ""), [S0 + ".vip is missing"]),
    ("duplicate service name", MINIMAL + SECOND_SERVICE.replace("synapse-web", "synapse-dicom"),
     ['service[1] "synapse-dicom" .name = "synapse-dicom"', "already used by service[0]"]),
    ("duplicate vip/port/proto", MINIMAL + SECOND_SERVICE.replace("port = 80", "port = 104"),
     ['service[1] "synapse-web" (.vip, .port, .protocol) = ("10.10.0.100", 104, "tcp")',
      'already used by service[0] "synapse-dicom"']),
    ("port 0", edit("port = 104", "port = 0"), [S0 + ".port = 0 is out of range", "1 to 65535"]),
    ("port 70000", edit("port = 104", "port = 70000"), [S0 + ".port = 70000 is out of range"]),
    ("string port", edit("port = 104", 'port = "104"'),
     [S0 + '.port = "104"', "must be an integer", "got a string"]),
    ("float port", edit("port = 104", "port = 104.0"), [S0 + ".port = 104.0", "got a float"]),
    ("health port 0", edit("port = 104\n", "port = 104\n[service.health]\nport = 0\n"),
     [S0 + ".health.port = 0 is out of range"]),
    ("no backends", MINIMAL.split("\n  [[service.backend]]")[0],
     [S0.rstrip() + " has no backends", "service.backend"]),
    ("empty backend array", MINIMAL.split("\n  [[service.backend]]")[0] + "backend = []\n",
     [S0.rstrip() + " has no backends"]),
    ("backend as single table", edit("[[service.backend]]", "[service.backend]").split("\n  [[service.backend]]")[0],
     [S0 + ".backend", "[[service.backend]]", "got a table"]),
    ("service as single table", '[service]\nname = "synapse-dicom"\n',
     ["service = {...}", "[[service]]", "got a table"]),
    ("negative weight", edit('"10.10.0.12"\n', '"10.10.0.12"\n  weight = -1\n'),
     [B1 + ".weight = -1 is out of range", "0 to 1000"]),
    ("weight too big", edit('"10.10.0.12"\n', '"10.10.0.12"\n  weight = 1001\n'), [B1 + ".weight = 1001"]),
    ("bool weight", edit('"10.10.0.12"\n', '"10.10.0.12"\n  weight = true\n'),
     [B1 + ".weight = true", "got a boolean"]),
    ("duplicate backend name", edit('name = "pacs-b"', 'name = "pacs-a"'),
     ['backend[1] "pacs-a" .name = "pacs-a"', "already used by backend[0]"]),
    ("duplicate backend address", edit('"10.10.0.12"', '"10.10.0.11"'),
     [B1 + '.address = "10.10.0.11"', "already used by backend[0]"]),
    ("bad service name", edit('name = "synapse-dicom"', 'name = "synapse dicom"'),
     ['service[0] .name = "synapse dicom"', "A-Z a-z 0-9 _ . -"]),
    ("unknown check kind", edit("port = 104\n", 'port = 104\n[service.health]\ncheck = "icmp"\n'),
     [S0 + '.health.check = "icmp"', "not a known check kind", '"tcp"']),
    ("float rise", edit("port = 104\n", "port = 104\n[service.health]\nrise = 2.0\n"),
     [S0 + ".health.rise = 2.0", "must be an integer", "got a float"]),
    ("fall 0", edit("port = 104\n", "port = 104\n[service.health]\nfall = 0\n"),
     [S0 + ".health.fall = 0 is out of range", "1 to 100"]),
    ("timeout > interval", edit("port = 104\n", "port = 104\n[service.health]\ninterval = 1\ntimeout = 1.5\n"),
     [S0 + ".health.timeout = 1.5", "must not exceed", ".health.interval = 1.0"]),
    ("interval 0", edit("port = 104\n", "port = 104\n[service.health]\ninterval = 0\n"),
     [S0 + ".health.interval = 0 is out of range"]),
    ("interval too long", edit("port = 104\n", "port = 104\n[service.health]\ninterval = 3601\n"),
     [S0 + ".health.interval = 3601 is out of range"]),
    ("health not a table", edit("port = 104\n", 'port = 104\nhealth = "tcp"\n'),
     [S0 + '.health = "tcp"', "must be a table written [service.health]"]),
    ("unknown protocol", edit("port = 104\n", 'port = 104\nprotocol = "sctp"\n'),
     [S0 + '.protocol = "sctp"', 'expected one of "tcp", "udp"']),
    ("unknown persistence", edit("port = 104\n", 'port = 104\npersistence = "sticky"\n'),
     [S0 + '.persistence = "sticky"', '"flow", "client"']),
    ("toml syntax error", edit("port = 104", "port = 10 4"), ["TOML syntax error at line 4, column 11"]),
    ("unknown service key", edit("port = 104\n", 'port = 104\nprotocl = "tcp"\n'),
     [S0 + ".protocl is not a known key", 'did you mean "protocol"?']),
    ("unknown backend key", edit('"10.10.0.12"\n', '"10.10.0.12"\n  wieght = 2\n'),
     [B1 + ".wieght is not a known key", 'did you mean "weight"?']),
    ("unknown health key", edit("port = 104\n", "port = 104\n[service.health]\nintervall = 2\n"),
     [S0 + ".health.intervall is not a known key", 'did you mean "interval"?']),
    ("unknown top-level key", "[[servce]]\n" + MINIMAL, ["servce is not a known key", 'did you mean "service"?']),
    ("unknown settings key", "[xdplb]\nmaglev_sise = 251\n" + MINIMAL,
     ["xdplb.maglev_sise is not a known key", 'did you mean "maglev_size"?']),
    ("unknown key without suggestion", edit("port = 104\n", "port = 104\nzzz = 1\n"),
     [S0 + ".zzz is not a known key", "known keys are"]),
    ("non-prime maglev_size", "[xdplb]\nmaglev_size = 65536\n" + MINIMAL,
     ["xdplb.maglev_size = 65536 must be a prime", "65521", "65537"]),
    ("maglev_size too small", "[xdplb]\nmaglev_size = 13\n" + MINIMAL,
     ["xdplb.maglev_size = 13 is out of range", "251 to 1000003"]),
    ("flow table too small", "[xdplb]\nflow_table_size = 1000\n" + MINIMAL, ["xdplb.flow_table_size = 1000"]),
    ("hash seed negative", "[xdplb]\nhash_seed = -1\n" + MINIMAL, ["xdplb.hash_seed = -1"]),
    ("bad metrics", '[xdplb]\nmetrics = "9742"\n' + MINIMAL, ['xdplb.metrics = "9742"', "host:port"]),
    ("metrics ipv6 without brackets", '[xdplb]\nmetrics = "::1:9742"\n' + MINIMAL, ['xdplb.metrics = "::1:9742"']),
    ("metrics bad host", '[xdplb]\nmetrics = "pacs.local:9742"\n' + MINIMAL, ['xdplb.metrics = "pacs.local:9742"']),
    ("metrics port 0", '[xdplb]\nmetrics = "127.0.0.1:0"\n' + MINIMAL, ['xdplb.metrics = "127.0.0.1:0"']),
    ("manage_vips not bool", '[xdplb]\nmanage_vips = "yes"\n' + MINIMAL,
     ['xdplb.manage_vips = "yes" must be true or false']),
    ("too many services", "[xdplb]\nmax_services = 1\n" + MINIMAL + SECOND_SERVICE,
     ["defines 2 services", "xdplb.max_services = 1"]),
    ("too many backends", "[xdplb]\nmax_backends = 3\n" + MINIMAL + SECOND_SERVICE,
     ["defines 3 backends", "xdplb.max_backends = 3", "at most 2"]),
    ("no services", "[xdplb]\nhash_seed = 1\n", ["the pool defines no [[service]]"]),
]


@pytest.mark.parametrize("text, fragments", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_pool_is_one_clear_sentence(text, fragments):
    with pytest.raises(PoolError) as info:
        parse_pool(text, "pacs.toml")
    message = str(info.value)
    assert message.startswith("pacs.toml: ")
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_first_error_in_file_order_is_reported():
    text = edit('"10.10.0.11"', '"10.10.0.300"', edit('"10.10.0.12"', '"bad"'))
    with pytest.raises(PoolError, match=r"backend\[0\] .*10\.10\.0\.300"):
        parse_pool(text)


def test_same_vip_and_port_with_other_protocol_is_allowed():
    udp = SECOND_SERVICE.replace("port = 80", 'port = 104\nprotocol = "udp"')
    pool = parse_pool(MINIMAL + udp)
    assert [s.protocol for s in pool.services] == ["tcp", "udp"]


def test_health_check_kinds_are_listed():
    assert HEALTH_CHECK_KINDS[0] == "tcp"  # the default; every kind: test_config_health.py


def test_load_pool_missing_file_names_path_and_reason(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(PoolError) as info:
        load_pool(missing)
    assert str(missing) in str(info.value)
    assert "No such file" in str(info.value)


def test_load_pool_uses_path_as_source(tmp_path):
    path = tmp_path / "pacs.toml"
    path.write_text(edit('"10.10.0.100"', '"10.10.0.300"'))
    with pytest.raises(PoolError, match=r"^" + str(path).replace("\\", "\\\\") + r": line 3: service\[0\]"):
        load_pool(path)
    path.write_text(MINIMAL)
    assert load_pool(path).source == str(path)


def test_example_pool_loads():
    pool = load_pool(EXAMPLE)
    assert [s.name for s in pool.services] == ["synapse-dicom", "synapse-dicom-alt", "synapse-web"]
    assert [s.port for s in pool.services] == [104, 11112, 80]
    assert {s.vip for s in pool.services} == {IPv4Address("10.10.0.100")}
    assert pool.services[2].persistence == "client"
    for s in pool.services:
        assert [b.name for b in s.backends] == ["pacs-a", "pacs-b", "pacs-c"]
        assert [str(b.address) for b in s.backends] == ["10.10.0.11", "10.10.0.12", "10.10.0.13"]
    assert warnings(pool) == []


def test_describe_mentions_every_service_backend_and_drained():
    pool = parse_pool(FULL)
    text = describe(pool)
    for svc in pool.services:
        assert f'"{svc.name}"' in text
        assert f"{svc.vip}:{svc.port}/{svc.protocol}" in text
        for b in svc.backends:
            assert f'"{b.name}" {b.address}' in text
    assert "drained" in text
    assert "weight 10" in text
    assert "rise 3, fall 5" in text
    assert "client" in text


def test_warnings_for_small_table_and_fully_drained_service():
    third = '\n  [[service.backend]]\n  name = "pacs-c"\n  address = "10.10.0.13"\n'
    found = warnings(parse_pool("[xdplb]\nmaglev_size = 251\n" + MINIMAL + third))
    assert found == ['service "synapse-dicom": maglev_size 251 is less than 100 x 3 backends; '
                     "spread will be uneven"]
    drained = parse_pool(edit('"10.10.0.12"\n', '"10.10.0.12"\n  weight = 0\n',
                              edit('"10.10.0.11"\n', '"10.10.0.11"\n  weight = 0\n')))
    assert any("weight 0" in w and "synapse-dicom" in w for w in warnings(drained))
    assert warnings(parse_pool(MINIMAL)) == []


# ---- files that cannot hang or crash the controller --------------------------

def test_fifo_is_refused_without_waiting_for_a_writer(tmp_path, deadline):
    fifo = tmp_path / "pool.toml"
    os.mkfifo(fifo)
    with deadline(5), pytest.raises(PoolError) as info:
        load_pool(fifo)
    assert str(info.value) == f"cannot read pool file {fifo}: it is a FIFO (named pipe), not a regular file"


def test_dev_zero_is_refused_without_reading_it(deadline):
    with deadline(5), pytest.raises(PoolError) as info:
        load_pool("/dev/zero")
    assert str(info.value) == "cannot read pool file /dev/zero: it is a character device, not a regular file"


def test_directory_is_refused(tmp_path):
    with pytest.raises(PoolError) as info:
        load_pool(tmp_path)
    assert str(info.value) == f"cannot read pool file {tmp_path}: it is a directory, not a regular file"


def test_file_over_the_size_cap_is_refused(tmp_path):
    path = tmp_path / "huge.toml"
    path.write_text(MINIMAL)
    os.truncate(path, MAX_POOL_BYTES + 1)  # sparse: costs no disk
    with pytest.raises(PoolError) as info:
        load_pool(path)
    assert str(info.value) == (f"cannot read pool file {path}: it holds {MAX_POOL_BYTES + 1} bytes, "
                               f"more than the 16 MiB a pool file may have")
    os.truncate(path, len(MINIMAL.encode()))
    assert load_pool(path).services[0].name == "synapse-dicom"


@pytest.mark.parametrize("text, fragment", [
    ("x = " + "[" * 5000 + "]" * 5000, "TOML syntax error: arrays or inline tables nest too deeply"),
    ("x = " + "{a = " * 5000 + "1" + "}" * 5000, "TOML syntax error: arrays or inline tables nest too deeply"),
    ("x = " + "1" * 5000, "TOML syntax error: Exceeds the limit (4300 digits) for integer string conversion"),
], ids=["deep-array", "deep-inline-table", "5000-digit-integer"])
def test_what_tomllib_cannot_read_is_a_pool_error(text, fragment):
    with pytest.raises(PoolError) as info:
        parse_pool(text, "pacs.toml")
    assert str(info.value) == f"pacs.toml: {fragment}"


def test_a_deep_value_that_tomllib_reads_is_shown_three_arrays_deep():
    with pytest.raises(PoolError) as info:
        parse_pool("[xdplb]\nhash_seed = " + "[" * 400 + "]" * 400 + "\n" + MINIMAL, "pacs.toml")
    assert str(info.value) == ("pacs.toml: line 2: xdplb.hash_seed = [[[[...]]]] must be an integer from 0 to "
                               "4294967295, got an array")


# ---- semantic checks ---------------------------------------------------------

def test_backend_that_is_a_vip_is_refused_as_a_loop():
    later = SECOND_SERVICE.replace('vip = "10.10.0.100"', 'vip = "10.10.0.200"')
    text = edit('address = "10.10.0.12"', 'address = "10.10.0.200"') + later
    with pytest.raises(PoolError) as info:
        parse_pool(text, "pacs.toml")
    assert str(info.value) == (
        'pacs.toml: line 12: service[0] "synapse-dicom" backend[1] "pacs-b" .address = "10.10.0.200" is the '
        'VIP of service[1] "synapse-web"; forwarding to it would send the traffic back to xdplb in a loop'
    )
    with pytest.raises(PoolError, match=r'line 8: .*backend\[0\] "pacs-a" \.address = "10\.10\.0\.100" is the '
                                        r'VIP of service\[0\] "synapse-dicom"'):
        parse_pool(edit('address = "10.10.0.11"', 'address = "10.10.0.100"'))


def test_dicom_check_with_the_default_called_ae_title_warns():
    dicom = edit("port = 104\n", 'port = 104\n[service.health]\ncheck = "dicom"\n')
    (found,) = warnings(parse_pool(dicom))
    assert found.startswith('service "synapse-dicom": the dicom check calls AE title "ANY-SCP", xdplb\'s default;')
    assert "set health.called_ae to the PACS's own AE title" in found
    named = edit('check = "dicom"\n', 'check = "dicom"\ncalled_ae = "SYNAPSE"\n', dicom)
    assert warnings(parse_pool(named)) == []


# ---- every problem, with its line (as haproxy -c) -----------------------------

MANY_PROBLEMS = """\
[xdplb]
maglev_sise = 251
hash_seed = -1

[[service]]
name = "dicom"
vip = "10.10.0.100"
port = 104
protocl = "tcp"

  [service.health]
  check = "dicom"
  interval = 1
  timeout = 2
  path = "/x"

  [[service.backend]]
  name = "pacs-a"
  address = "10.10.0.300"

  [[service.backend]]
  name = "pacs-b"
  address = "10.10.0.12"
  weight = 1001

[[service]]
name = "web"
vip = "10.10.0.100"
port = 0
backend = [
  {name = "a", address = "10.10.0.11"},
  {name = "b", address = "10.10.0.11", weight = "x"},
]
"""


def test_every_problem_is_reported_with_its_line_in_file_order():
    with pytest.raises(PoolError) as info:
        parse_pool(MANY_PROBLEMS, "pacs.toml")
    assert info.value.problems == (
        'pacs.toml: line 2: xdplb.maglev_sise is not a known key; did you mean "maglev_size"?',
        "pacs.toml: line 3: xdplb.hash_seed = -1 is out of range; expected an integer from 0 to 4294967295",
        'pacs.toml: line 9: service[0] "dicom" .protocl is not a known key; did you mean "protocol"?',
        'pacs.toml: line 14: service[0] "dicom" .health.timeout = 2.0 must not exceed .health.interval = 1.0',
        'pacs.toml: line 15: service[0] "dicom" .health.path is not a known key for check = "dicom"; '
        'it applies only to check = "http" or "https"',
        'pacs.toml: line 19: service[0] "dicom" backend[0] "pacs-a" .address = "10.10.0.300" is not a valid '
        "IP address",
        'pacs.toml: line 24: service[0] "dicom" backend[1] "pacs-b" .weight = 1001 is out of range; '
        "expected an integer from 0 to 1000",
        'pacs.toml: line 29: service[1] "web" .port = 0 is out of range; expected an integer from 1 to 65535',
        # a bad port does not keep its backends from being checked; an inline table gets its key's line
        'pacs.toml: line 30: service[1] "web" backend[1] "b" .address = "10.10.0.11" is already used by '
        "backend[0] of this service",
        'pacs.toml: line 30: service[1] "web" backend[1] "b" .weight = "x" must be an integer from 0 to 1000, '
        "got a string",
    )
    assert str(info.value) == info.value.problems[0] + " (and 9 more problems; xdplb check lists every one)"


def test_every_bad_value_of_one_table_is_reported():
    text = edit('  name = "pacs-b"\n  address = "10.10.0.12"\n',
                '  name = "pacs b"\n  address = "10.10.0.1200"\n  weight = 1.5\n  colour = "red"\n')
    text = edit("port = 104\n", 'port = 104\n[service.health]\ninterval = "1s"\nrise = 0\n', text)
    with pytest.raises(PoolError) as info:
        parse_pool(text, "p.toml")
    assert info.value.problems == (
        'p.toml: line 6: service[0] "synapse-dicom" .health.interval = "1s" must be a number of seconds greater '
        "than 0 and at most 3600, got a string",
        'p.toml: line 7: service[0] "synapse-dicom" .health.rise = 0 is out of range; expected an integer from '
        "1 to 100",
        'p.toml: line 14: service[0] "synapse-dicom" backend[1] .name = "pacs b" must be 1 to 64 characters '
        "from A-Z a-z 0-9 _ . -",
        'p.toml: line 15: service[0] "synapse-dicom" backend[1] .address = "10.10.0.1200" is not a valid IP '
        "address",
        'p.toml: line 16: service[0] "synapse-dicom" backend[1] .weight = 1.5 must be an integer from 0 to 1000, '
        "got a float",
        'p.toml: line 17: service[0] "synapse-dicom" backend[1] .colour is not a known key; known keys are '
        '"name", "address", "weight", "port"',
    )


def test_a_check_on_a_stand_in_for_a_bad_value_says_nothing():
    # interval is bad, so timeout = 2 is not compared with a stand-in interval;
    # the bad port is not compared with the other service's port 1.
    text = edit("port = 104\n", 'port = 104\n[service.health]\ninterval = "2s"\ntimeout = 2\n')
    second = SECOND_SERVICE.replace("port = 80", 'port = "1"')
    first_on_port_1 = edit("port = 104\n", "port = 1\n", MINIMAL).replace("synapse-dicom", "first")
    with pytest.raises(PoolError) as info:
        parse_pool(text, "p.toml")
    assert len(info.value.problems) == 1 and ".health.interval" in str(info.value)
    with pytest.raises(PoolError) as info:
        parse_pool(first_on_port_1 + second, "p.toml")
    assert info.value.problems == (
        'p.toml: line 17: service[1] "synapse-web" .port = "1" must be an integer from 1 to 65535, got a string',
    )


def test_a_single_problem_is_the_message_itself():
    with pytest.raises(PoolError) as info:
        parse_pool(edit("port = 104", "port = 0"), "pacs.toml")
    assert info.value.problems == (str(info.value),)
    assert str(info.value).startswith("pacs.toml: line 4: ")


def test_pool_wide_problems_point_at_their_setting_or_come_last():
    text = "[xdplb]\nmax_services = 1\nhash_seed = -1\n" + MINIMAL + SECOND_SERVICE
    with pytest.raises(PoolError) as info:
        parse_pool(text, "p.toml")
    # max_services is not compared with when the [xdplb] table has a problem of its own
    assert info.value.problems == (
        "p.toml: line 3: xdplb.hash_seed = -1 is out of range; expected an integer from 0 to 4294967295",
    )
    with pytest.raises(PoolError) as info:
        parse_pool("[xdplb]\nmax_services = 1\n" + MINIMAL + SECOND_SERVICE, "p.toml")
    assert info.value.problems == ("p.toml: line 2: the pool defines 2 services but xdplb.max_services = 1",)
    with pytest.raises(PoolError) as info:
        parse_pool('[xdplb]\nhash_seed = "1"\n', "p.toml")
    assert info.value.problems == (
        'p.toml: line 2: xdplb.hash_seed = "1" must be an integer from 0 to 4294967295, got a string',
        "p.toml: the pool defines no [[service]]",
    )


# Lines marked "# <-" are where the scanner must place a problem; header-like
# text inside strings, arrays and comments must not move it.
TRICKY = """\
# [[service]] in a comment is not a header
[xdplb]
maglev_size = 251
hash_seed = -1  # <-

[[ service ]]  # spaced header
"na\\u006De" = "dicom"
vip = '10.10.0.100'
port = 104
health.interval = 0  # <- a dotted key makes the health table
odd = [  # <-
  [1],
  \"\"\"
[[service]]
not a header\"\"\",
  '''
[x]''',
  "]",
]
'single' = 'it''s' # <- (not a valid TOML string: replaced below)

  [[service.backend]]
  name = "pacs-a"
  address = "10.10.0.11"
  weight = -1  # <-

  [[service.backend]]
  name = 'pacs-b'
  address = \"\"\"10.10.0.12\"\"\"
  wieght = 2  # <-
"""


def marked_lines(text: str) -> list[int]:
    return [n for n, line in enumerate(text.splitlines(), 1) if "# <-" in line]


def problem_lines(err: PoolError) -> list[int]:
    return [int(re.match(r"^[^:]+: line (\d+): ", p).group(1)) for p in err.problems]


@pytest.mark.parametrize("newline", ["\n", "\r\n"], ids=["lf", "crlf"])
def test_lines_are_found_past_strings_arrays_and_comments(newline):
    text = TRICKY.replace("'single' = 'it''s'", "'single' = 'its'").replace("\n", newline)
    with pytest.raises(PoolError) as info:
        parse_pool(text, "p.toml")
    assert problem_lines(info.value) == marked_lines(TRICKY), info.value.problems


def test_an_inline_backend_array_points_at_its_key():
    text = edit("port = 104\n", 'port = 104\nbackend = [\n  {name = "a", address = "10.10.0.11", weight = -1},\n]\n',
                MINIMAL.split("\n  [[service.backend]]")[0])
    with pytest.raises(PoolError) as info:
        parse_pool(text, "p.toml")
    assert problem_lines(info.value) == [5]  # the line of "backend = [": no finer position is kept


# ---- fuzz: whatever the text, one PoolError of one-sentence problems ---------

SOURCE = "fuzz.toml"
TOML_BITS = st.sampled_from([
    "[", "]", "[[", "]]", "{", "}", "=", ".", ",", '"', "'", '"""', "'''", "#", "\n", "\r\n", " ", "\\",
    "\\u0041", "service", "backend", "health", "xdplb", "name", "vip", "port", "address", "weight",
    '"10.10.0.100"', '"10.10.0.11"', "104", "-1", "1e400", "nan", "true", "1979-05-27", "\u2028", "\x85",
    "\x00", "é", "9" * 40, "9" * 4400, '"\\n"', '"a\\u2028b"',
])


def assert_one_sentence_problems(text: str) -> None:
    try:
        parse_pool(text, SOURCE)
    except PoolError as err:
        n_lines = text.count("\n") + 1
        for message in (str(err), *getattr(err, "problems", ())):
            assert message.startswith(f"{SOURCE}: "), message
            assert len(message.splitlines()) == 1 and "\n" not in message, message
            m = re.match(rf"^{SOURCE}: line (\d+): ", message)
            assert m is None or 1 <= int(m.group(1)) <= n_lines, message


FUZZ = settings(max_examples=400, deadline=None, database=None,
                suppress_health_check=[Hypothesis.too_slow, Hypothesis.filter_too_much])


@FUZZ
@given(st.lists(TOML_BITS | st.text(max_size=3), max_size=60).map("".join))
@example('"a\\nb" = 1\n')                     # a key holding a newline, named in "not a known key"
@example('[[service]]\nname = "a\\u2028b"\n')  # a value holding U+2028, a line break to splitlines()
@example("x = " + "9" * 4400)                  # more digits than Python's int() takes
@example("x = " + "[" * 600 + "]" * 600)         # deeper than tomllib's recursion
def test_fuzz_random_text_fails_only_as_one_sentence_pool_errors(text):
    assert_one_sentence_problems(text)


@st.composite
def mutated_pool(draw) -> str:
    text = draw(st.sampled_from([MINIMAL, FULL, MANY_PROBLEMS, MINIMAL + SECOND_SERVICE, EXAMPLE.read_text()]))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        cut = draw(st.integers(0, 8))
        text = text[:at] + draw(TOML_BITS | st.text(max_size=4)) + text[at + cut:]
    return text


@FUZZ
@given(mutated_pool())
def test_fuzz_mutated_pools_fail_only_as_one_sentence_pool_errors(text):
    assert_one_sentence_problems(text)


@FUZZ
@given(mutated_pool())
def test_fuzz_the_line_scanner_reads_every_valid_document(text):
    import tomllib

    try:
        doc = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, ValueError, RecursionError):
        return
    tomllines.scan_lines(text, doc)  # unguarded: a scanner bug fails here, not just loses line numbers


@pytest.mark.parametrize("health, expected", [
    ('check = "http"\ninterval = 1\ntimeout = 2\npath = "x"\nhost = "a b"\n',
     [(8, '.health.timeout = 2.0 must not exceed .health.interval = 1.0'),
      (9, '.health.path = "x" must start with "/"'),
      (10, '.health.host = "a b" must be 1 to 255 printable ASCII characters without spaces')]),
    ('check = "dicom"\ncalling_ae = ""\ncalled_ae = "A\\\\B"\n',
     [(7, '.health.calling_ae = "" is not a valid DICOM AE title'),
      (8, '.health.called_ae = "A\\\\B" is not a valid DICOM AE title')]),
    ('check = "https"\nhost = 7\nserver_name = "-bad-"\ntls_verify = "no"\n',
     [(7, '.health.host = 7 must be a string'),
      (8, '.health.server_name = "-bad-" is not a DNS name or IP address'),
      (9, '.health.tls_verify = "no" must be true or false')]),
], ids=["http", "dicom", "https"])
def test_every_bad_value_of_a_health_table_is_reported(health, expected):
    with pytest.raises(PoolError) as info:
        parse_pool(edit("port = 104\n", "port = 104\n[service.health]\n" + health), "p.toml")
    assert problem_lines(info.value) == [line for line, _ in expected], info.value.problems
    for problem, (_, fragment) in zip(info.value.problems, expected):
        assert fragment in problem
