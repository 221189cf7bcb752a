"""IPv6 in the pool: VIPs and backends of one family per service, addresses in
one canonical text (RFC 5952) however the pool spells them, and the IPv6
client persistence prefix. Each refusal is one sentence naming key and value."""
from __future__ import annotations

import ipaddress

import pytest

from xdplb import maglev, pinning
from xdplb.config import PoolError, Settings, describe, parse_pool
from xdplb.desired import keep_running_flows6, restart_needed

POOL6 = """\
[[service]]
name = "pacs6"
vip = "{vip}"
port = 104
{extra}
  [[service.backend]]
  name = "pacs-a"
  address = "{a}"

  [[service.backend]]
  name = "pacs-b"
  address = "{b}"
"""
S0 = 'service[0] "pacs6" '
B1 = S0 + 'backend[1] "pacs-b" '


def pool6(vip="2001:db8::100", a="2001:db8::11", b="2001:db8::12", extra=""):
    return POOL6.format(vip=vip, a=a, b=b, extra=extra)


def test_ipv6_vip_and_backends_are_accepted():
    svc = parse_pool(pool6()).services[0]
    assert svc.vip == ipaddress.IPv6Address("2001:db8::100")
    assert [b.address for b in svc.backends] == [ipaddress.IPv6Address("2001:db8::11"),
                                                 ipaddress.IPv6Address("2001:db8::12")]
    assert svc.client_prefix == 128


# RFC 5952 section 4: lower case, leading zeros dropped, the longest run of
# zero fields (the first of equal runs) as "::", never "::" for one field.
RFC5952 = [
    ("2001:0DB8:0000:0000:0000:0000:0000:0001", "2001:db8::1"),
    ("2001:db8:0:0:1:0:0:1", "2001:db8::1:0:0:1"),          # first of two equal runs
    ("2001:db8:0:0:0:1:0:1", "2001:db8::1:0:1"),            # the longer run
    ("2001:db8:0:1:1:1:1:1", "2001:db8:0:1:1:1:1:1"),       # one zero field stays
    ("2001:DB8::0:1", "2001:db8::1"),
    ("2001:db8:aaaa:bbbb:cccc:dddd:eeee:AAAA", "2001:db8:aaaa:bbbb:cccc:dddd:eeee:aaaa"),
    ("2001:db8::0001", "2001:db8::1"),
]


@pytest.mark.parametrize("written,canonical", RFC5952)
def test_addresses_reach_maglev_keys_and_labels_in_rfc5952_text(written, canonical):
    svc = parse_pool(pool6(vip="2001:db8:ffff::100", a=written)).services[0]
    assert str(svc.backends[0].address) == canonical
    assert canonical in describe(parse_pool(pool6(vip="2001:db8:ffff::100", a=written)))


def test_two_spellings_of_one_pool_build_the_same_maglev_table():
    """Every node must build the same table from a pool however it spells
    the addresses: Maglev keys are the canonical text."""
    def table(text):
        svc = parse_pool(text).services[0]
        return maglev.build_table([maglev.MaglevBackend(str(b.address), b.weight, i)
                                   for i, b in enumerate(svc.backends, 1)], 251)

    plain = pool6(a="2001:db8::11", b="2001:db8::12")
    odd = pool6(a="2001:0DB8:0:0:0:0:0:0011", b="2001:db8:0000::0:12")
    assert table(plain) == table(odd)
    assert parse_pool(plain).services == parse_pool(odd).services


@pytest.mark.parametrize("address,fragment", [
    ("fe80::11", "is a link-local address"),
    ("fe80::11%eth0", "is an address with a zone index"),
    ("::ffff:10.0.0.11", 'is an IPv4-mapped address (write "10.0.0.11"'),
    ("ff02::11", "is a multicast address"),
    ("::1", "is a loopback address"),
    ("::", "is the unspecified address"),
    ("2001:db8::g", "is not a valid IP address"),
])
def test_unusable_ipv6_backend_is_one_sentence_naming_key_and_value(address, fragment):
    with pytest.raises(PoolError) as err:
        parse_pool(pool6(b=address))
    assert str(err.value) == err.value.problems[0]
    assert f'{B1}.address = "{address}" {fragment}' in str(err.value)


def test_a_service_and_its_backends_share_a_family():
    with pytest.raises(PoolError) as err:
        parse_pool(pool6(b="10.10.0.12"))
    assert (f'{B1}.address = "10.10.0.12" is IPv4 but the service\'s VIP "2001:db8::100" is IPv6; '
            f"a service and its backends share a family (no NAT64)") in str(err.value)


def test_backend_equal_to_an_ipv6_vip_spelled_otherwise_is_a_loop():
    with pytest.raises(PoolError, match=r'"2001:db8::100" is the VIP of service\[0\] "pacs6"'):
        parse_pool(pool6(b="2001:DB8:0::100"))


def test_client_prefix_shapes_ipv6_client_persistence():
    svc = parse_pool(pool6(extra='persistence = "client"\nclient_prefix = 64\n')).services[0]
    assert svc.client_prefix == 64
    assert "the first 64 bits of its address" in describe(parse_pool(
        pool6(extra='persistence = "client"\nclient_prefix = 64\n')))


@pytest.mark.parametrize("extra,fragment", [
    ('persistence = "client"\nclient_prefix = 0\n', ".client_prefix = 0 is out of range; expected an integer from 1 to 128"),
    ('persistence = "client"\nclient_prefix = 129\n', ".client_prefix = 129 is out of range"),
    ('persistence = "client"\nclient_prefix = "64"\n', '.client_prefix = "64" must be an integer'),
    ("client_prefix = 64\n", '.client_prefix = 64 needs persistence = "client"'),
])
def test_bad_client_prefix_is_one_sentence(extra, fragment):
    with pytest.raises(PoolError) as err:
        parse_pool(pool6(extra=extra))
    assert S0 + fragment in str(err.value)


def test_client_prefix_on_an_ipv4_service_is_refused():
    with pytest.raises(PoolError) as err:
        parse_pool(pool6(vip="10.10.0.100", a="10.10.0.11", b="10.10.0.12",
                         extra='persistence = "client"\nclient_prefix = 24\n'))
    assert (S0 + '.client_prefix = 24 applies to IPv6 services only, and the VIP "10.10.0.100" is IPv4'
            in str(err.value))


def test_dual_stack_one_pool_behind_an_ipv4_and_an_ipv6_vip():
    text = pool6() + pool6(vip="10.10.0.100", a="10.10.0.11", b="10.10.0.12").replace('"pacs6"', '"pacs4"')
    pool = parse_pool(text)
    assert [s.vip.version for s in pool.services] == [6, 4]


# ---- flows6's size: flow_table_size6 ------------------------------------------

POOL4 = pool6(vip="10.0.0.100", a="10.0.0.11", b="10.0.0.12")


def flows6_entries(text: str) -> int:
    settings = parse_pool(text).settings
    assert settings.flows6_entries == settings.flow_table_size6
    return pinning.map_specs(settings)["flows6"].entries


def test_flows6_is_the_minimum_without_an_ipv6_service_and_flow_table_size_with_one():
    assert flows6_entries(POOL4) == 1024
    assert flows6_entries(pool6()) == 262144
    assert flows6_entries("[xdplb]\nflow_table_size = 4096\n" + pool6()) == 4096
    assert flows6_entries("[xdplb]\nflow_table_size = 4096\n" + POOL4) == 1024
    # A dual-stack pool balances IPv6: the full size.
    assert flows6_entries(POOL4 + pool6().replace('"pacs6"', '"pacs6b"')) == 262144


def test_flow_table_size6_set_in_the_pool_is_kept_with_or_without_an_ipv6_service():
    assert flows6_entries("[xdplb]\nflow_table_size6 = 8192\n" + POOL4) == 8192
    assert flows6_entries("[xdplb]\nflow_table_size6 = 8192\n" + pool6()) == 8192
    assert flows6_entries("[xdplb]\nflow_table_size6 = 1024\n" + pool6()) == 1024


def test_settings_built_in_code_size_flows6_as_flows():
    assert Settings(flow_table_size=4096).flows6_entries == 4096
    assert pinning.map_specs(Settings(flow_table_size=4096))["flows6"].entries == 4096


@pytest.mark.parametrize("value,words", [
    ("1000", "xdplb.flow_table_size6 = 1000 is out of range; expected an integer from 1024 to 16777216"),
    ("16777217", "xdplb.flow_table_size6 = 16777217 is out of range"),
    ('"big"', 'xdplb.flow_table_size6 = "big" must be an integer from 1024 to 16777216, got a string'),
])
def test_a_bad_flow_table_size6_is_one_sentence_naming_key_and_value(value, words):
    with pytest.raises(PoolError) as err:
        parse_pool(f"[xdplb]\nflow_table_size6 = {value}\n" + pool6())
    assert words in str(err.value)
    assert len(str(err.value).splitlines()) == 1


def reload_check(old_text: str, new_text: str) -> tuple[list[str], int]:
    """What the daemon's reload decides: (what blocks it, flows6's size after it)."""
    old = parse_pool(old_text)
    new = keep_running_flows6(old, parse_pool(new_text))
    return restart_needed(old, new), new.settings.flow_table_size6


DUAL = POOL4 + pool6().replace('"pacs6"', '"pacs6b"')


def test_a_reload_that_adds_the_first_ipv6_service_says_flows6_needs_a_restart_and_why():
    # That restart works: no IPv6 service is programmed, so flows6 is replaced.
    (text,), _ = reload_check(POOL4, DUAL)
    assert text == ("flow_table_size6 1024 -> 262144 (the IPv6 flow table: unset, it is flow_table_size while "
                    "the pool balances an IPv6 service and 1024 without one; restart xdplb to resize it, which "
                    "keeps every flow while no IPv6 service is programmed)")
    pinned = "[xdplb]\nflow_table_size6 = 1024\n"
    assert reload_check(pinned + POOL4, pinned + DUAL) == ([], 1024)
    # Another IPv6 service beside the first changes nothing compiled.
    assert reload_check(pool6(), pool6() + POOL4.replace('"pacs6"', '"pacs4"')) == ([], 262144)


def test_a_reload_that_removes_the_last_ipv6_service_is_accepted_and_keeps_the_running_flows6():
    # An unset flow_table_size6 never blocks: a restart could not resize flows6
    # while services6 holds the IPv6 services, so the running table stays.
    assert reload_check(DUAL, POOL4) == ([], 262144)
    # Adding IPv6 back to the kept table needs nothing either.
    kept = keep_running_flows6(parse_pool(DUAL), parse_pool(POOL4))
    assert restart_needed(kept, keep_running_flows6(kept, parse_pool(DUAL))) == []
    # Dropping an explicit flow_table_size6 with the last IPv6 service: kept as well.
    assert reload_check("[xdplb]\nflow_table_size6 = 8192\n" + DUAL, POOL4) == ([], 8192)


def test_an_explicit_flow_table_size6_change_names_only_steps_that_work():
    # IPv6 services are programmed: a restart cannot resize flows6 either.
    (text,), _ = reload_check(DUAL, "[xdplb]\nflow_table_size6 = 8192\n" + DUAL)
    assert text == ("flow_table_size6 262144 -> 8192 (the IPv6 flow table; IPv6 services are programmed, so a "
                    "restart cannot resize it either: keep flow_table_size6 = 262144, or first reload this pool "
                    "without its IPv6 services and with flow_table_size6 = 262144, then restart xdplb with the "
                    "new size and the IPv6 services)")
    assert "restart xdplb to resize it" not in text
    # None programmed: the restart works, and is the step named.
    (text,), _ = reload_check(POOL4, "[xdplb]\nflow_table_size6 = 8192\n" + POOL4)
    assert text == ("flow_table_size6 1024 -> 8192 (the IPv6 flow table; restart xdplb to resize it, which keeps "
                    "every flow while no IPv6 service is programmed)")


def test_the_all_drained_warning_brackets_an_ipv6_vip_before_its_port():
    from xdplb.config import warnings

    text = pool6().replace('address = "2001:db8::11"\n', 'address = "2001:db8::11"\n  weight = 0\n')
    text = text.replace('address = "2001:db8::12"\n', 'address = "2001:db8::12"\n  weight = 0\n')
    (line,) = [w for w in warnings(parse_pool(text)) if "weight 0" in w]
    assert "new connections to [2001:db8::100]:104/tcp will find no backend" in line
