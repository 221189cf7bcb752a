"""The daemon's share of the flow semantics: it re-reads the interface's MAC
(the program balances only frames sent to it) and clears a removed backend
once its grace has passed. Fakes only (tests/fakes.py), no root."""
from __future__ import annotations

import asyncio
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for fakes.py

import xdplb.daemon  # noqa: E402

from test_daemon import C, DICOM, IF, h, run_dir, running, until  # noqa: E402,F401  (fixtures)


def test_interface_mac_change_reaches_lb_config(h, monkeypatch):
    period = 0.05
    monkeypatch.setattr(xdplb.daemon, "MAC_REFRESH_SECONDS", period)
    daemon = h.daemon()
    new_mac = bytes.fromhex("02aabbccdd01")

    async def scenario():
        async with running(daemon):
            old = h.dp.config[0]
            h.nl.links[IF] = dataclasses.replace(h.nl.links[IF], mac=new_mac)
            took = await until(lambda: h.dp.config[0] == new_mac, timeout=5, what="the new interface MAC")
            assert took <= 2 * period + 0.1
            assert old != new_mac and daemon.link.mac == new_mac

    asyncio.run(scenario())


def test_removed_backend_is_cleared_when_its_grace_ends(h, monkeypatch):
    monkeypatch.setattr(xdplb.daemon, "MAC_REFRESH_SECONDS", 0.05)
    text = h.pool.read_text().replace('metrics = ""', 'metrics = ""\ndown_grace = 0.5')
    h.pool.write_text(text)
    daemon = h.daemon()

    async def scenario():
        async with running(daemon):
            found = h.dp.backend_by_address(DICOM, C)
            assert found is not None and found[1][3] is True
            c_id = found[0]
            start = text.index('  [[service.backend]]\n  name = "pacs-c"')
            h.pool.write_text(text[:start] + text[start:].split("\n\n", 1)[1])   # pacs-c leaves dicom
            assert daemon.reload("test")["result"] == "applied"
            assert h.dp.backends[c_id][3] is False, "kept, down, during the grace"
            assert h.dp.down_since[c_id] > 0
            took = await until(lambda: c_id not in h.dp.backends, timeout=5, what="the retired id cleared")
            assert 0.3 <= took <= 1.0

    asyncio.run(scenario())
