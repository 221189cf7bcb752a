"""The command line, through click's CliRunner: no root, no bcc, no daemon."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import xdplb.cli
import xdplb.pinning
from xdplb.cli import cli
from xdplb.config import load_pool

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "pacs.toml"

BAD_WEIGHT = """\
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
  weight = -1
"""


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def no_root(monkeypatch):
    """Fail loudly if a command gets as far as its root check."""
    calls = []

    def refuse(what):
        calls.append(what)
        raise click.ClickException("the root check was reached")

    monkeypatch.setattr(xdplb.cli, "_need_root", refuse)
    return calls


def test_help_lists_the_commands(runner):
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0, result.output
    for command in ("attach", "check", "status", "detach"):
        assert re.search(rf"^\s+{command}\s", result.stdout, re.M), command


def test_check_help(runner):
    result = runner.invoke(cli, ["check", "--help"])
    assert result.exit_code == 0, result.output
    assert "--pool" in result.stdout
    assert "Validate a pool file" in result.stdout


def test_check_example_prints_every_service_and_its_maglev_shares(runner):
    pool = load_pool(EXAMPLE)
    result = runner.invoke(cli, ["check", "--pool", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"ok: {EXAMPLE} is valid" in out
    assert "Maglev slots with every backend up:" in out
    size = pool.settings.maglev_size
    for svc in pool.services:
        assert f'service "{svc.name}": {svc.vip}:{svc.port}/{svc.protocol}' in out
        (line,) = [ln for ln in out.splitlines() if ln.startswith(f"  {svc.name}: ")]
        shares = re.findall(r"([\w.-]+) (\d+) \((\d+\.\d)%\)", line)
        assert [name for name, _, _ in shares] == [b.name for b in svc.backends]
        counts = [int(n) for _, n, _ in shares]
        assert sum(counts) == size  # every slot has an owner
        equal = size / len(svc.backends)
        assert all(abs(c - equal) <= 0.01 * size for c in counts)


def test_check_states_the_flow_tables_per_cpu_capacity(runner, monkeypatch):
    # A 32-CPU gateway must hold 100k concurrent associations whatever CPU inserts them.
    monkeypatch.setattr(xdplb.pinning, "possible_cpus", lambda: 32)
    result = runner.invoke(cli, ["check", "--pool", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    (line,) = [ln for ln in result.stdout.splitlines() if ln.startswith("flow table:")]
    assert "262144 entries in one LRU shared by all 32 possible CPUs" in line
    per_cpu = int(re.search(r"per-CPU capacity (\d+) flows", line).group(1))
    assert per_cpu == 262144 - 32 * 128 and per_cpu >= 100_000


def test_check_bad_pool_prints_only_the_one_sentence_error(runner, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(BAD_WEIGHT)
    result = runner.invoke(cli, ["check", "--pool", str(path)])
    assert result.exit_code != 0
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    error = lines[0]
    assert error.startswith(f"Error: {path}: ")
    assert 'backend[1] "pacs-b" .weight = -1' in error   # key path and value
    assert "out of range" in error


def test_check_bad_syntax(runner, tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('[[service]\nname = "x"\n')
    result = runner.invoke(cli, ["check", "--pool", str(path)])
    assert result.exit_code != 0
    assert result.stdout == ""
    assert result.stderr.startswith(f"Error: {path}: TOML syntax error at line 1")


def test_check_missing_file(runner, tmp_path):
    path = tmp_path / "nope.toml"
    result = runner.invoke(cli, ["check", "--pool", str(path)])
    assert result.exit_code != 0
    assert result.stdout == ""
    assert f"cannot read pool file {path}" in result.stderr
    assert "No such file" in result.stderr


def test_attach_with_an_invalid_pool_fails_before_the_root_check(runner, tmp_path, no_root):
    path = tmp_path / "bad.toml"
    path.write_text(BAD_WEIGHT)
    result = runner.invoke(cli, ["attach", "lbt-none0", "--pool", str(path)])
    assert result.exit_code != 0
    assert no_root == []
    assert f"{path}: " in result.stderr and ".weight = -1" in result.stderr
    assert "needs root" not in result.output and "root check" not in result.output
    assert len(result.stderr.splitlines()) == 1


def test_attach_with_a_valid_pool_needs_root(runner, no_root):
    result = runner.invoke(cli, ["attach", "lbt-none0", "--pool", str(EXAMPLE)])
    assert result.exit_code != 0
    assert no_root == ["xdplb attach"]


def test_status_with_no_instance(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("XDPLB_RUN_DIR", str(tmp_path / "run"))
    result = runner.invoke(cli, ["status"])
    assert result.exit_code != 0
    assert "no xdplb instance is running" in result.stderr
    assert result.stdout == ""


def test_status_of_a_named_interface_with_no_instance(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("XDPLB_RUN_DIR", str(tmp_path / "run"))
    result = runner.invoke(cli, ["status", "-i", "lbt0"])
    assert result.exit_code != 0
    assert "no xdplb instance is running on lbt0" in result.stderr


def test_unknown_mode_is_rejected_by_click(runner, no_root):
    result = runner.invoke(cli, ["attach", "lbt-none0", "--pool", str(EXAMPLE), "--mode", "bogus"])
    assert result.exit_code == 2  # click's usage error
    assert "Invalid value for '--mode'" in result.stderr
    assert "'bogus' is not one of" in result.stderr
    assert no_root == []


# Run in a fresh interpreter: records every attempt to import bcc (whether
# or not bcc is installed), runs --help and check, and fails if bcc was asked for.
NO_BCC = r"""
import sys

attempts = []

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "bcc" or name.startswith("bcc."):
            attempts.append(name)
        return None

sys.meta_path.insert(0, Watch())

from click.testing import CliRunner
from xdplb.cli import cli

runner = CliRunner()
result = runner.invoke(cli, ["--help"])
assert result.exit_code == 0, result.output
result = runner.invoke(cli, ["check", "--help"])
assert result.exit_code == 0, result.output
result = runner.invoke(cli, ["check", "--pool", sys.argv[1]])
assert result.exit_code == 0, result.output
assert "is valid" in result.output
assert not attempts, attempts
assert "bcc" not in sys.modules
print("no bcc")
"""


def test_help_and_check_never_import_bcc():
    proc = subprocess.run([sys.executable, "-c", NO_BCC, str(EXAMPLE)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "no bcc"
