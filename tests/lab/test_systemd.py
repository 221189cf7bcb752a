"""The shipped unit, tools/systemd/xdplb@.service, as systemd would run it.

No systemd runs here, so the test reads the unit, expands %i, ${...} and
$MAINPID the way systemd does, and runs its command lines itself in the
lab's lb namespace (generic mode on veth): ExecStartPre, ExecStart,
ExecReload (a good and a rejected reload), then the restart path (SIGUSR1 -> exit 75, which
RestartForceExitStatus restarts) and the stop path (KillSignal).
`systemd-analyze verify` checks the unit file itself.
"""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from lab_xdplb import Balancer, lb_addresses, pool_text, xdp_attached

UNIT = Path(__file__).resolve().parents[2] / "tools" / "systemd" / "xdplb@.service"
XDPLB = str(Path(sys.executable).with_name("xdplb"))


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def expand(command: str, instance: str, env: dict, mainpid: int | None = None) -> list[str]:
    """systemd's specifier and variable expansion, for what the unit uses."""
    command = command.replace("%i", instance)
    command = re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], command)
    if mainpid is not None:
        command = command.replace("$MAINPID", str(mainpid))
    argv = shlex.split(command)
    # The install step links /usr/local/bin/xdplb to the venv's script.
    return [XDPLB if a == "/usr/local/bin/xdplb" else a for a in argv]


@pytest.fixture(scope="module")
def unit():
    return parse_unit(UNIT.read_text())


def test_unit_file_verifies(tmp_path):
    systemd_analyze = shutil.which("systemd-analyze")
    assert systemd_analyze, "systemd-analyze is missing: tools/setup.sh installs systemd"
    text = UNIT.read_text().replace("/usr/local/bin/xdplb", XDPLB)
    copy = tmp_path / "xdplb@eth0.service"
    copy.write_text(text)
    result = subprocess.run([systemd_analyze, "verify", str(copy)], capture_output=True, text=True)
    problems = [line for line in result.stderr.splitlines() if "xdplb@eth0.service" in line]
    assert result.returncode == 0 and not problems, result.stderr


def test_unit_promises(unit):
    service = unit["Service"]
    # `xdplb reload` passes the daemon's verdict through; a bare HUP could not.
    assert service["ExecReload"] == ["/usr/local/bin/xdplb reload -i %i"]
    assert expand(service["ExecReload"][0], "eth0", {}) == [XDPLB, "reload", "-i", "eth0"]
    assert service["Restart"] == ["on-failure"]
    assert service["RestartForceExitStatus"] == ["75"]
    # A restart must not take HAProxy (the TLS tier) down with xdplb: the next xdplb adopts it.
    assert service["KillMode"] == ["process"]
    assert "/etc/xdplb/%i.toml" in unit["Unit"]["ConditionPathExists"][0]


@pytest.mark.root
@pytest.mark.lab
def test_unit_command_lines_run_reload_restart_and_stop(lab, unit, tmp_path):
    service = unit["Service"]
    env = dict(e.split("=", 1) for e in service["Environment"])
    env["XDPLB_POOL_DIR"] = str(tmp_path)  # as /etc/default/xdplb could set it
    pool = tmp_path / "eth0.toml"
    pool.write_text(pool_text(lab))

    pre = expand(service["ExecStartPre"][0], "eth0", env)
    assert subprocess.run(pre, capture_output=True, text=True).returncode == 0

    start = expand(service["ExecStart"][0], "eth0", env)
    assert start == [XDPLB, "attach", "eth0", str(pool)]
    b = Balancer(lab, pool, tmp_path / "run", tmp_path / "xdplb.log")
    try:
        b.start(start)
        b.wait_ready()

        pool.write_text(pool_text(lab, skip=("be3",)))
        reload_cmd = expand(service["ExecReload"][0], "eth0", env, mainpid=b.proc.pid)
        subprocess.run(reload_cmd, check=True, env=b.env(), timeout=90)
        st = b.status()
        assert st["last_reload"]["result"] == "applied"
        assert all(len(s["backends"]) == 2 for s in st["services"])

        # A rejected reload fails `systemctl reload`, with the file's problem; the old pool stays.
        pool.write_text(pool_text(lab).replace("weight = 1", "weight = -1", 1))
        rejected = subprocess.run(reload_cmd, capture_output=True, text=True, env=b.env(), timeout=90)
        assert rejected.returncode == 1, rejected
        assert f"reload rejected, nothing changed: {pool}: line " in rejected.stderr
        assert ".weight = -1 is out of range" in rejected.stderr
        st = b.status()
        assert st["last_reload"]["result"] == "rejected"
        assert all(len(s["backends"]) == 2 for s in st["services"])
        pool.write_text(pool_text(lab, skip=("be3",)))  # the restart below reads it again

        # Hitless restart: SIGUSR1 -> exit 75 -> systemd starts ExecStart again.
        b.signal(__import__("signal").SIGUSR1)
        code = b.proc.wait(20)
        assert str(code) in service["RestartForceExitStatus"]
        assert xdp_attached(lab)
        b.start(start)
        b.wait_ready()
        assert "adopted pinned maps" in b.log()

        assert b.stop() == 0  # KillSignal=SIGTERM
        assert service["KillSignal"] == ["SIGTERM"]
        assert not xdp_attached(lab) and lab.vip not in lb_addresses(lab)
    finally:
        b.stop()
        b.cli("detach", "eth0", check=False)
        b.release()
