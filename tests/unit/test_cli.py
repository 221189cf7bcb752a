"""The command line, through click's CliRunner: no root, no bcc, no daemon."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
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


def test_check_states_the_ipv6_flow_tables_size_and_where_it_comes_from(runner, monkeypatch, tmp_path):
    monkeypatch.setattr(xdplb.pinning, "possible_cpus", lambda: 2)

    def flows6_line(text: str) -> str:
        pool = tmp_path / "pool.toml"
        pool.write_text(text)
        result = runner.invoke(cli, ["check", "--pool", str(pool)])
        assert result.exit_code == 0, result.output
        (line,) = [ln for ln in result.stdout.splitlines() if ln.startswith("IPv6 flow table:")]
        return line

    ipv4 = EXAMPLE.read_text()
    line = flows6_line(ipv4)
    assert line.startswith("IPv6 flow table: 1024 entries in one LRU shared by all 2 possible CPUs")
    assert line.endswith("(the minimum: the pool balances no IPv6 service; the first one makes it "
                         "flow_table_size, which needs a restart)")
    six = ('\n[[service]]\nname = "dicom6"\nvip = "fd00::100"\nport = 104\n'
           '  [[service.backend]]\n  name = "pacs6"\n  address = "fd00::11"\n')
    line = flows6_line(ipv4 + six)
    assert line.startswith("IPv6 flow table: 262144 entries")
    assert line.endswith("(as flow_table_size: the pool balances an IPv6 service)")
    line = flows6_line(ipv4.replace("# flow_table_size6 = 262144", "flow_table_size6 = 8192") + six)
    assert line.startswith("IPv6 flow table: 8192 entries") and line.endswith("(flow_table_size6)")


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


# ---- the pool as a positional argument ---------------------------------------

def test_check_takes_the_pool_as_an_argument(runner):
    result = runner.invoke(cli, ["check", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    assert f"ok: {EXAMPLE} is valid" in result.stdout


def test_attach_takes_the_pool_as_its_second_argument(runner, no_root):
    result = runner.invoke(cli, ["attach", "lbt-none0", str(EXAMPLE)])
    assert no_root == ["xdplb attach"], result.output  # the pool was read and found valid


@pytest.mark.parametrize("command", [["check"], ["attach", "lbt-none0"]])
def test_pool_given_twice_or_not_at_all_is_a_usage_error(runner, no_root, command):
    both = runner.invoke(cli, [*command, str(EXAMPLE), "--pool", str(EXAMPLE)])
    assert both.exit_code == 2
    assert "give the pool file once: as the POOL argument or with --pool, not both" in both.stderr
    neither = runner.invoke(cli, command)
    assert neither.exit_code == 2
    assert "missing the pool file: xdplb " in neither.stderr
    assert no_root == []


# ---- files that cannot hang it, and one exit status for unreadable ones ------

def test_check_of_a_fifo_returns_at_once(runner, tmp_path, deadline):
    fifo = tmp_path / "pool.toml"
    os.mkfifo(fifo)
    with deadline(5):
        result = runner.invoke(cli, ["check", str(fifo)])
    assert result.exit_code == 1
    assert result.stderr == f"Error: cannot read pool file {fifo}: it is a FIFO (named pipe), not a regular file\n"


@contextlib.contextmanager
def unprivileged():
    """As root, become nobody (real and effective, as click's os.access check sees it) until the end."""
    if os.geteuid() != 0:
        yield
        return
    os.setresgid(65534, 65534, 0)
    os.setresuid(65534, 65534, 0)
    try:
        yield
    finally:
        os.setresuid(0, 0, 0)
        os.setresgid(0, 0, 0)


def test_unreadable_missing_and_directory_pools_exit_alike(runner):
    folder = Path(tempfile.mkdtemp(prefix="xdplb-cli-"))
    try:
        folder.chmod(0o755)
        unreadable = folder / "secret.toml"
        unreadable.write_text(EXAMPLE.read_text())
        unreadable.chmod(0o000)
        with unprivileged():
            results = {name: runner.invoke(cli, ["check", str(path)])
                       for name, path in [("unreadable", unreadable), ("missing", folder / "nope.toml"),
                                          ("directory", folder)]}
    finally:
        shutil.rmtree(folder)
    assert {name: r.exit_code for name, r in results.items()} == {"unreadable": 1, "missing": 1, "directory": 1}
    assert results["unreadable"].stderr == f"Error: cannot read pool file {unreadable}: Permission denied\n"
    assert results["missing"].stderr == f"Error: cannot read pool file {folder}/nope.toml: No such file or directory\n"
    assert results["directory"].stderr == (f"Error: cannot read pool file {folder}: it is a directory, "
                                           f"not a regular file\n")


def test_check_lists_every_problem_on_its_own_line(runner, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(BAD_WEIGHT.replace('name = "pacs-a"', 'name = "pacs a"') + "[[servce]]\n")
    result = runner.invoke(cli, ["check", str(path)])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f'Error: {path}: line 7: service[0] "dicom" backend[0] .name = "pacs a" must be 1 to 64 characters '
        f"from A-Z a-z 0-9 _ . -",
        f'Error: {path}: line 13: service[0] "dicom" backend[1] "pacs-b" .weight = -1 is out of range; '
        f"expected an integer from 0 to 1000",
        f'Error: {path}: line 14: servce is not a known key; did you mean "service"?',
        "Error: 3 problems found; nothing was changed",
    ]


def test_check_warns_about_the_default_called_ae_title(runner, tmp_path):
    path = tmp_path / "dicom.toml"
    path.write_text(BAD_WEIGHT.replace("weight = -1", "weight = 1").replace(
        "port = 104\n", 'port = 104\n[service.health]\ncheck = "dicom"\n'))
    result = runner.invoke(cli, ["check", str(path)])
    assert result.exit_code == 0, result.output
    assert 'warning: service "dicom": the dicom check calls AE title "ANY-SCP"' in result.stdout


def test_check_prints_each_services_placement_fingerprint(runner, tmp_path):
    from xdplb.addrtext import host_port
    from xdplb.announce import placement_fingerprint

    # An IPv6 VIP beside the example's IPv4 ones: its address is bracketed
    # before the port, as everywhere else xdplb prints an address and port.
    dual = tmp_path / "dual.toml"
    dual.write_text(EXAMPLE.read_text() + '\n[[service]]\nname = "dicom6"\nvip = "fd00::100"\nport = 104\n'
                    '  [[service.backend]]\n  name = "pacs6"\n  address = "fd00::11"\n')
    pool = load_pool(dual)
    result = runner.invoke(cli, ["check", "--pool", str(dual)])
    assert result.exit_code == 0, result.output
    for svc in pool.services:
        fp = placement_fingerprint(pool.settings, svc)
        assert f"  {svc.name} {host_port(svc.vip, svc.port)}/{svc.protocol} {fp}\n" in result.stdout
    assert f"  dicom6 [fd00::100]:104/tcp " in result.stdout
    # Another hash_seed (a node configured apart) shows another fingerprint.
    other = tmp_path / "other.toml"
    other.write_text(EXAMPLE.read_text().replace("hash_seed = 0\n", "hash_seed = 99\n", 1))
    again = runner.invoke(cli, ["check", str(other)])
    assert again.exit_code == 0, again.output
    svc = pool.services[0]
    assert f"{svc.vip}:{svc.port}/{svc.protocol} {placement_fingerprint(pool.settings, svc)}" not in again.stdout
