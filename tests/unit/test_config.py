"""Pool file parsing: valid pools become the expected dataclasses, every kind of
mistake is a PoolError whose one sentence names the file, key path and value."""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path

import pytest

from xdplb.config import (
    HEALTH_CHECK_KINDS,
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
    assert pool.settings == Settings()
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
     [S0 + '.vip = "10.10.0.300"', "not a valid IPv4 address"]),
    ("ip not a string", edit('vip = "10.10.0.100"', "vip = 10"),
     [S0 + ".vip = 10", "must be a string", "got an integer"]),
    ("ipv6 vip", edit('"10.10.0.100"', '"fd00::100"'),
     [S0 + '.vip = "fd00::100"', "IPv6 is not supported yet"]),
    ("ipv6 backend", edit('"10.10.0.12"', '"fd00::12"'),
     [B1 + '.address = "fd00::12"', "IPv6 is not supported yet"]),
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
