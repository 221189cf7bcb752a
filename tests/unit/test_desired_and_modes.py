"""desired_state (pool + health + MACs -> Desired), restart_needed, and the
choice of XDP attach modes."""
from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address

import pytest

from xdplb.config import parse_pool
from xdplb.desired import COMPILED_SETTINGS, desired_state, restart_needed
from xdplb.health_fsm import Health, State
from xdplb.modes import MODES, attempts, vlan_strip_refusal

POOL = """\
[xdplb]
maglev_size = 251
max_services = 4
max_backends = 16
hash_seed = 99

[[service]]
name = "dicom"
vip = "10.10.0.100"
port = 104
persistence = "client"

  [[service.backend]]
  name = "pacs-a"
  address = "10.10.0.11"
  weight = 3

  [[service.backend]]
  name = "pacs-b"
  address = "10.10.0.12"

  [[service.backend]]
  name = "pacs-c"
  address = "10.10.0.13"

[[service]]
name = "web"
vip = "10.10.0.101"
port = 80
protocol = "udp"

  [[service.backend]]
  name = "pacs-a"
  address = "10.10.0.11"
  weight = 0
"""

A, B, C = IPv4Address("10.10.0.11"), IPv4Address("10.10.0.12"), IPv4Address("10.10.0.13")
GW = bytes.fromhex("02000a0a0001")
MACS = {A: bytes.fromhex("02000a0a000b"), B: bytes.fromhex("02000a0a000c")}


def by_address(service):
    return {b.address: b for b in service.backends}


def test_only_health_up_counts_as_healthy():
    pool = parse_pool(POOL)
    health = {
        ("dicom", A): Health(State.UP),
        ("dicom", B): Health(State.DOWN),
        ("dicom", C): Health(State.UNKNOWN),
        ("web", A): Health(State.DOWN),   # same address, other service: judged on its own
    }
    d = desired_state(pool, health, MACS, GW)
    dicom, web = d.services
    assert {a: b.healthy for a, b in by_address(dicom).items()} == {A: True, B: False, C: False}
    assert by_address(web)[A].healthy is False
    # A backend with no health entry at all is UNKNOWN, hence not healthy.
    d = desired_state(pool, {}, MACS, GW)
    assert not any(b.healthy for s in d.services for b in s.backends)


def test_macs_are_looked_up_by_address_and_up_needs_one():
    pool = parse_pool(POOL)
    health = {(s.name, b.address): Health(State.UP) for s in pool.services for b in s.backends}
    d = desired_state(pool, health, MACS, GW)
    dicom, web = d.services
    got = by_address(dicom)
    assert got[A].mac == MACS[A] and got[B].mac == MACS[B] and got[C].mac is None
    assert by_address(web)[A].mac == MACS[A]  # one MAC per address, whatever the service
    assert (got[A].up, got[B].up, got[C].up) == (True, True, False)


def test_desired_carries_services_settings_and_gateway_mac():
    pool = parse_pool(POOL)
    d = desired_state(pool, {}, MACS, GW)
    assert (d.mac, d.hash_seed, d.maglev_size, d.max_services, d.max_backends) == (GW, 99, 251, 4, 16)
    dicom, web = d.services
    assert (dicom.name, dicom.vip, dicom.port, dicom.protocol, dicom.persistence) == (
        "dicom", IPv4Address("10.10.0.100"), 104, "tcp", "client")
    assert (web.name, web.key) == ("web", (IPv4Address("10.10.0.101"), 80, "udp"))
    assert [(b.name, b.weight) for b in dicom.backends] == [("pacs-a", 3), ("pacs-b", 1), ("pacs-c", 1)]
    assert [(b.name, b.weight) for b in web.backends] == [("pacs-a", 0)]


def test_restart_needed_lists_each_changed_compiled_setting():
    old = parse_pool(POOL)
    assert restart_needed(old, old) == []
    new = replace(old, settings=replace(old.settings, maglev_size=509, max_backends=32))
    assert restart_needed(old, new) == ["maglev_size 251 -> 509", "max_backends 16 -> 32"]
    for key in COMPILED_SETTINGS:
        value = getattr(old.settings, key) + 1
        changed = replace(old, settings=replace(old.settings, **{key: value}))
        (text,) = restart_needed(old, changed)
        if key == "flow_table_size6":   # says why it changed and what to do: see test_config_ipv6.py
            assert text.startswith(f"{key} {getattr(old.settings, key)} -> {value} (the IPv6 flow table"), text
        else:
            assert text == f"{key} {getattr(old.settings, key)} -> {value}"


def test_restart_not_needed_for_runtime_settings():
    old = parse_pool(POOL)
    new = replace(old, settings=replace(old.settings, hash_seed=1, manage_vips=False, metrics=""),
                  services=old.services[:1])
    assert restart_needed(old, new) == []


# ---- attach modes -----------------------------------------------------------

def test_auto_on_veth_tries_generic_only():
    got = attempts("auto", "veth")
    assert [m for m, _ in got] == ["generic"]
    assert "veth" in got[0][1]


@pytest.mark.parametrize("kind", [None, "bond", "vlan"])
def test_auto_on_other_links_tries_native_then_generic(kind):
    got = attempts("auto", kind)
    assert [m for m, _ in got] == ["native", "generic"]
    assert all(why for _, why in got)


@pytest.mark.parametrize("mode", ["native", "generic"])
@pytest.mark.parametrize("kind", [None, "veth"])
def test_explicit_mode_is_the_only_attempt(mode, kind):
    assert attempts(mode, kind) == [(mode, "requested")]


@pytest.mark.parametrize("mode", ["bogus", "", "Native", "skb"])
def test_unknown_mode_raises(mode):
    with pytest.raises(ValueError, match="unknown mode"):
        attempts(mode, None)


def test_modes_list_is_what_attempts_accepts():
    assert MODES == ("auto", "native", "generic")
    for mode in MODES:
        assert attempts(mode, None)


# ---- VLAN tag stripping (rx-vlan-offload) in native mode ---------------------

def test_no_vlan_stripping_no_refusal():
    assert vlan_strip_refusal("eth0", None, frozenset({"tx-vlan-hw-insert", "rx-checksum"})) is None


def test_ctag_stripping_is_refused_with_one_sentence_and_the_command():
    text = vlan_strip_refusal("eth0", None, frozenset({"rx-vlan-hw-parse", "tx-vlan-hw-insert"}))
    assert text.count(". ") == 0 and "\n" not in text, "one sentence"
    assert "eth0 strips VLAN tags" in text and "rx-vlan-hw-parse is on" in text
    assert "`ethtool -K eth0 rxvlan off`" in text


def test_stag_stripping_names_its_own_feature():
    text = vlan_strip_refusal("bond0", None, frozenset({"rx-vlan-hw-parse", "rx-vlan-stag-hw-parse"}))
    assert "`ethtool -K bond0 rxvlan off rx-vlan-stag-hw-parse off`" in text


def test_veth_is_never_refused():
    # veth reports both features on, but has no hardware that strips a tag.
    assert vlan_strip_refusal("eth0", "veth", frozenset({"rx-vlan-hw-parse", "rx-vlan-stag-hw-parse"})) is None
