"""Pool keys of the flow-table semantics: UDP idle timeout, down-backend
grace, flood guard and the extra MACs the data plane balances frames to.
Valid values become Settings fields; every bad one is a one-sentence
PoolError naming the key and value."""
from __future__ import annotations

import pytest

from xdplb.config import PoolError, Settings, describe, parse_pool

SERVICE = """
[[service]]
name = "dicom"
vip = "10.10.0.100"
port = 104
  [[service.backend]]
  name = "pacs-a"
  address = "10.10.0.11"
"""


def settings(text: str) -> Settings:
    return parse_pool("[xdplb]\n" + text + SERVICE, "pool.toml").settings


def test_defaults():
    s = parse_pool(SERVICE).settings
    assert (s.udp_idle_timeout, s.down_grace, s.flood_guard_rate, s.extra_macs) == (30.0, 30.0, 2000, ())


def test_values_are_read():
    s = settings('udp_idle_timeout = 5\ndown_grace = 0\nflood_guard_rate = 0\n'
                 'extra_macs = ["00:00:5E:00:01:33", "02:00:00:00:00:01"]\n')
    assert s.udp_idle_timeout == 5.0 and isinstance(s.udp_idle_timeout, float)
    assert s.down_grace == 0.0
    assert s.flood_guard_rate == 0
    assert s.extra_macs == (bytes.fromhex("00005e000133"), bytes.fromhex("020000000001"))


@pytest.mark.parametrize("line, message", [
    ("udp_idle_timeout = 0", r"xdplb\.udp_idle_timeout = 0 is out of range; expected a number of seconds from 1 to 86400"),
    ("udp_idle_timeout = true", r"xdplb\.udp_idle_timeout = true must be a number of seconds"),
    ("down_grace = -1", r"xdplb\.down_grace = -1 is out of range; expected a number of seconds from 0 to 3600"),
    ("down_grace = nan", r"xdplb\.down_grace = nan is out of range"),
    ("down_grace = \"30s\"", r'xdplb\.down_grace = "30s" must be a number of seconds from 0 to 3600, got a string'),
    ("flood_guard_rate = -5", r"xdplb\.flood_guard_rate = -5 is out of range; expected an integer from 0 to 100000000"),
    ("flood_guard_rate = 1.5", r"xdplb\.flood_guard_rate = 1\.5 must be an integer"),
    ('extra_macs = "00:00:5e:00:01:33"', r"xdplb\.extra_macs = \"00:00:5e:00:01:33\" must be an array of at most 4 MAC"),
    ('extra_macs = ["00:00:5e:00:01"]', r'xdplb\.extra_macs\[0\] = "00:00:5e:00:01" is not a MAC address'),
    ('extra_macs = [1]', r"xdplb\.extra_macs\[0\] = 1 is not a MAC address"),
    ('extra_macs = ["01:00:5e:00:00:12"]', r"is a multicast or broadcast address; only unicast MACs"),
    ('extra_macs = ["ff:ff:ff:ff:ff:ff"]', r"is a multicast or broadcast address"),
    ('extra_macs = ["00:00:00:00:00:00"]', r"is the all-zero address"),
    ('extra_macs = ["02:00:00:00:00:01", "02:00:00:00:00:01"]', r"extra_macs\[1\] = \"02:00:00:00:00:01\" repeats xdplb\.extra_macs\[0\]"),
    ('extra_macs = ["02:00:00:00:00:01", "02:00:00:00:00:02", "02:00:00:00:00:03", "02:00:00:00:00:04", '
     '"02:00:00:00:00:05"]', r"holds 5 addresses"),
    ("flood_gaurd_rate = 1", r'xdplb\.flood_gaurd_rate is not a known key; did you mean "flood_guard_rate"\?'),
])
def test_bad_values_are_one_sentence(line, message):
    with pytest.raises(PoolError, match=r"^pool\.toml: " + r".*" + message) as err:
        settings(line + "\n")
    assert "\n" not in str(err.value)


def test_describe_says_what_the_keys_do():
    text = describe(parse_pool("[xdplb]\ndown_grace = 0\nextra_macs = [\"00:00:5e:00:01:33\"]\n" + SERVICE))
    assert "UDP flows expire after 30s idle" in text
    assert "for 0s (re-chosen at once)" in text
    assert "no new flow entries above 2000 per second per CPU" in text
    assert "00:00:5e:00:01:33" in text
