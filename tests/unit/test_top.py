"""`xdplb top`: the rate math and the screen from two status snapshots, and the
command itself against a stand-in daemon on a real control socket. No root.
"""
from __future__ import annotations

import json
import shutil
import socket
import tempfile
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from xdplb import cli as cli_module
from xdplb import top


def backend(name, address, *, id, packets, bytes, flows, health="up", weight=1, drained=False,
            probe=0.0012, ok=True):
    return {"name": name, "address": address, "id": id, "health": health, "weight": weight, "drained": drained,
            "packets": packets, "bytes": bytes, "new_flows": flows, "probe_seconds": probe, "probe_ok": ok}


def status(step: int) -> dict:
    """A daemon's status after `step` seconds of steady traffic."""
    return {
        "version": "0.1.0", "interface": "eth0", "mode": "generic",
        "services": [{
            "name": "dicom", "vip": "10.10.0.100", "port": 104, "protocol": "tcp", "id": 0,
            "packets": 1000 * step, "bytes": 1_500_000 * step, "new_flows": 10 * step,
            "backends": [
                backend("pacs-a", "10.10.0.11", id=1, packets=600 * step, bytes=900_000 * step, flows=6 * step),
                backend("pacs-b", "10.10.0.12", id=2, packets=400 * step, bytes=600_000 * step, flows=4 * step),
                backend("pacs-c", "10.10.0.13", id=3, packets=0, bytes=0, flows=0, health="down", probe=0.5, ok=False),
            ],
        }],
        "actions": {"tx": 1000 * step, "pass": 5 * step}, "not_forwarded": {"no_backend": 2 * step},
    }


def test_rate_is_the_difference_over_time_and_unknown_after_a_restart():
    assert top.rate(100, 350, 2.0) == 125.0
    assert top.rate(100, 100, 1.0) == 0.0
    assert top.rate(None, 350, 1.0) is None      # no earlier snapshot
    assert top.rate(500, 20, 1.0) is None        # counter restarted (slot zeroed)
    assert top.rate(1, 2, 0.0) is None           # no time passed


def test_view_per_service_and_backend():
    v = top.view(status(3), status(5), 2.0)
    svc = v["services"][0]
    assert (svc["pps"], svc["bps"], svc["flows_per_s"]) == (1000.0, 12_000_000.0, 10.0)
    a, b, c = svc["backends"]
    assert (a["pps"], a["bps"], a["flows_per_s"]) == (600.0, 7_200_000.0, 6.0)
    assert (b["pps"], b["bps"], b["flows_per_s"]) == (400.0, 4_800_000.0, 4.0)
    assert (c["pps"], c["health"], c["probe_seconds"], c["probe_ok"]) == (0.0, "down", 0.5, False)
    assert v["actions_per_s"] == {"tx": 1000.0, "pass": 5.0}
    assert v["not_forwarded_per_s"] == {"no_backend": 2.0}


def test_a_backend_with_a_new_id_or_that_is_new_has_no_rate_yet():
    before, after = status(3), status(5)
    after["services"][0]["backends"][0]["id"] = 9          # removed and re-added: a fresh slot
    del before["services"][0]["backends"][1]                # pacs-b added since the last snapshot
    a, b, _ = top.view(before, after, 2.0)["services"][0]["backends"]
    assert a["pps"] is None and b["pps"] is None


def test_drained_comes_from_the_status_or_a_zero_weight():
    after = status(2)
    after["services"][0]["backends"][1]["drained"] = True
    del after["services"][0]["backends"][2]["drained"]     # an older daemon without the field
    after["services"][0]["backends"][2]["weight"] = 0
    _, b, c = top.view(status(1), after, 1.0)["services"][0]["backends"]
    assert b["drained"] and c["drained"]


def test_human_units():
    assert [top.human(x) for x in (None, 0, 2.25, 999, 1234.5, 2_500_000, 3.2e9)] == \
        ["-", "0", "2.2", "999", "1.2k", "2.5M", "3.2G"]
    assert top.human(12_000_000, "b/s") == "12.0Mb/s"


def test_render_shows_every_column():
    text = top.render(top.view(status(3), status(5), 2.0))
    line_a = next(line for line in text.splitlines() if line.strip().startswith("pacs-a"))
    assert line_a.split() == ["pacs-a", "10.10.0.11", "up", "1", "600", "7.2Mb/s", "6.0", "1.2ms"]
    line_c = next(line for line in text.splitlines() if line.strip().startswith("pacs-c"))
    assert line_c.split()[2] == "down" and line_c.endswith("500.0ms fail")
    assert "dicom 10.10.0.100:104/tcp  1.0k pps  12.0Mb/s  10 flows/s" in text
    assert "not forwarded/s: no_backend 2.0" in text


def test_an_ipv6_service_shows_its_vip_in_brackets_and_its_addresses_in_one_column():
    def six(step: int) -> dict:
        st = status(step)
        svc = st["services"][0]
        svc["vip"] = "fd00:10:10::100"
        for be, address in zip(svc["backends"], ("fd00:10:10::11", "fd00:10:10:ffff:ffff:ffff:ffff:12", "10.9.9.9")):
            be["address"] = address
        return st
    text = top.render(top.view(six(3), six(5), 2.0))
    assert "dicom [fd00:10:10::100]:104/tcp  1.0k pps" in text
    rows = [line for line in text.splitlines() if line.strip().startswith(("backend", "pacs-"))]
    columns = {line.index("health") if "health" in line else line.index(" up ") + 1 if " up " in line
               else line.index(" down ") + 1 for line in rows}
    assert len(columns) == 1, "\n".join(rows)   # the long address does not push its row's health out of line
    assert next(r for r in rows if "pacs-b" in r).split()[1] == "fd00:10:10:ffff:ffff:ffff:ffff:12"


def test_run_once_json_uses_the_time_between_the_two_requests():
    snapshots = iter([status(1), status(4)])
    now = iter([10.0, 10.0, 11.5, 11.5])     # each request is timed at both ends
    out = []
    top.run(["eth0"], lambda name: next(snapshots), 1.5, once=True, as_json=True, single=True,
            echo=out.append, clock=lambda: next(now), sleep=lambda s: None)
    (text,) = out
    v = json.loads(text)
    assert v["interval"] == 1.5
    assert v["services"][0]["pps"] == 2000.0   # 3000 packets in 1.5 s


def test_run_refreshes_until_interrupted_and_clears_the_screen_on_a_terminal():
    step = iter(range(1, 100))
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        if len(sleeps) == 4:
            raise KeyboardInterrupt

    out = []
    with pytest.raises(KeyboardInterrupt):
        top.run(["eth0"], lambda name: status(next(step)), 1.0, once=False, as_json=False, single=True,
                echo=out.append, tty=True, sleep=sleep)
    assert len(out) == 3 and all(screen.startswith(top.CLEAR_SCREEN) for screen in out)


# ---- the command, against a stand-in daemon on a real control socket -------------


class StandInDaemon:
    """Answers {"cmd": "status"} on <run dir>/eth0.sock; counters grow with each request."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "eth0.sock"
        self.requests = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(self.path))
        self.sock.listen()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                request = json.loads(conn.makefile().readline())
                assert request == {"cmd": "status"}
                self.requests += 1
                conn.sendall(json.dumps(status(self.requests)).encode() + b"\n")

    def close(self):
        self.sock.close()


@pytest.fixture
def daemon(monkeypatch):
    run_dir = Path(tempfile.mkdtemp(prefix="xdplb-top", dir="/tmp"))
    monkeypatch.setenv("XDPLB_RUN_DIR", str(run_dir))
    monkeypatch.setattr(cli_module.control, "_netns_id", lambda: None)
    d = StandInDaemon(run_dir)
    yield d
    d.close()
    shutil.rmtree(run_dir, ignore_errors=True)


def test_top_once_json_over_the_control_socket(daemon):
    result = CliRunner().invoke(cli_module.cli, ["top", "-i", "eth0", "--once", "--json", "--interval", "0.2"])
    assert result.exit_code == 0, result.output
    v = json.loads(result.output)
    assert daemon.requests == 2
    svc = v["services"][0]
    # 1000 packets between the two requests, about 0.2 s apart.
    assert 1000 / 0.5 < svc["pps"] < 1000 / 0.19
    assert [b["name"] for b in svc["backends"]] == ["pacs-a", "pacs-b", "pacs-c"]
    assert svc["backends"][2]["health"] == "down"


def test_top_once_text_for_every_running_instance(daemon):
    result = CliRunner().invoke(cli_module.cli, ["top", "--once", "--interval", "0.1"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("xdplb 0.1.0 on eth0 (generic mode)")
    assert "pacs-b" in result.output and top.CLEAR_SCREEN not in result.output


def test_top_without_a_running_instance_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("XDPLB_RUN_DIR", str(tmp_path))
    monkeypatch.setattr(cli_module.control, "_netns_id", lambda: None)
    result = CliRunner().invoke(cli_module.cli, ["top", "--once"])
    assert result.exit_code != 0
    assert f"no xdplb instance is running (no control socket in {tmp_path})" in result.output


def test_top_rejects_a_too_short_interval():
    result = CliRunner().invoke(cli_module.cli, ["top", "--interval", "0"])
    assert result.exit_code == 2 and "--interval" in result.output
