"""Run-time drains: one identity (service, address), saved beside the socket."""
from __future__ import annotations

import ipaddress
import json

from xdplb.config import parse_pool
from xdplb.drains import Drains

POOL = """
[[service]]
name = "dicom"
vip = "10.10.0.100"
port = 104
  [[service.backend]]
  name = "pacs-a"
  address = "10.10.0.11"
  [[service.backend]]
  name = "pacs-b"
  address = "10.10.0.12"
"""
A, B = ipaddress.IPv4Address("10.10.0.11"), ipaddress.IPv4Address("10.10.0.12")


def test_saved_by_address_and_read_back(tmp_path):
    pool = parse_pool(POOL, "t.toml")
    drains = Drains(tmp_path / "run" / "eth0.drained.json")
    key, name = drains.find(pool, "dicom", "pacs-b")
    assert (key, name) == (("dicom", B), "pacs-b")
    assert drains.find(pool, "dicom", "10.10.0.12") == (key, name)
    assert drains.set(key, True) and not drains.set(key, True)
    assert json.loads(drains.path.read_text()) == [["dicom", "10.10.0.12"]]
    again = Drains(drains.path)
    again.load(parse_pool(POOL.replace('"pacs-b"', '"pacs-bee"'), "t.toml"))   # renamed: still drained
    assert again.keys == {("dicom", B)}


def test_older_name_files_are_mapped_and_stale_or_broken_entries_dropped(tmp_path):
    pool = parse_pool(POOL, "t.toml")
    path = tmp_path / "eth0.drained.json"
    path.write_text(json.dumps([["dicom", "pacs-a"], ["dicom", "gone"], ["web", "10.10.0.12"], "junk", [1, 2]]))
    drains = Drains(path)
    drains.load(pool)
    assert drains.keys == {("dicom", A)}
    path.write_text("{not json")
    drains.load(pool)
    assert drains.keys == set()
    assert "no backend 'pacs-z'" in Drains(path).find(pool, "dicom", "pacs-z")
    assert "no service 'web'" in Drains(path).find(pool, "web", "pacs-a")


def test_an_ipv6_backend_drained_stays_drained_across_a_restart(tmp_path):
    pool = parse_pool(POOL.replace('"10.10.0.100"', '"2001:db8::100"').replace('"10.10.0.11"', '"2001:db8::11"')
                      .replace('"10.10.0.12"', '"2001:db8::12"'), "t.toml")
    drains = Drains(tmp_path / "eth0.drained.json")
    key, _ = drains.find(pool, "dicom", "pacs-b")
    assert drains.find(pool, "dicom", "2001:DB8:0::12") == (key, "pacs-b")   # any spelling of its address
    drains.set(key, True)
    again = Drains(drains.path)
    again.load(pool)
    assert again.keys == {("dicom", ipaddress.IPv6Address("2001:db8::12"))}
