"""The Vagrant VM lab and the provisioning scripts it shares with the
namespace lab, checked as far as a machine that cannot boot VMs allows:
`vagrant validate` (Debian's vagrant) for both providers, shellcheck on
every provisioning script, and the shared scripts' output and errors.
The namespace PACS lab (tests/lab/test_pacs.py) runs the same scripts for real.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from xdplb.config import parse_pool

ROOT = Path(__file__).resolve().parents[2]
VAGRANT_DIR = ROOT / "vagrant"
PROVISION_DIR = ROOT / "tools" / "provision"
SCRIPTS = sorted([*VAGRANT_DIR.glob("*.sh"), *PROVISION_DIR.glob("*.sh")])


def _need(tool: str) -> str:
    path = shutil.which(tool)
    assert path, f"{tool} not found: tools/setup.sh installs it"
    return path


def test_every_provisioning_script_is_found():
    names = {p.relative_to(ROOT).as_posix() for p in SCRIPTS}
    assert {"vagrant/lb.sh", "vagrant/pacs.sh", "vagrant/modality.sh", "vagrant/router.sh",
            "tools/provision/bird-config.sh", "tools/provision/dsr-backend.sh",
            "tools/provision/orthanc-config.sh", "tools/provision/packages.sh",
            "tools/provision/xdplb-pool.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_shellcheck(script):
    proc = subprocess.run([_need("shellcheck"), "--shell=bash", str(script)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _validate(vagrant_dir: Path, tmp_path: Path, provider: str, bgp: bool = False) -> subprocess.CompletedProcess:
    """`vagrant validate` for one provider, leaving nothing in the repository.

    VirtualBox is not packaged by Debian, and vagrant refuses to validate for
    a provider whose VBoxManage it cannot find; a stub that only prints a
    version lets vagrant's own VirtualBox config validator run.  No VM, box
    or network is touched: validate only loads and checks the Vagrantfile.
    """
    env = _env(tmp_path, provider, bgp)
    if provider == "virtualbox":
        stub = tmp_path / "bin" / "VBoxManage"
        stub.parent.mkdir()
        stub.write_text("#!/bin/sh\necho 7.0.14r161095\n")
        stub.chmod(0o755)
        env["PATH"] = f"{stub.parent}:{env['PATH']}"
    return subprocess.run([_need("vagrant"), "validate"], cwd=vagrant_dir, env=env,
                          capture_output=True, text=True, timeout=300)


def _env(tmp_path: Path, provider: str, bgp: bool) -> dict:
    return dict(os.environ, VAGRANT_DEFAULT_PROVIDER=provider, VAGRANT_CHECKPOINT_DISABLE="1",
                VAGRANT_DOTFILE_PATH=str(tmp_path / "dotfile"), VAGRANT_HOME=str(tmp_path / "home"),
                XDPLB_VM_BGP="1" if bgp else "0")


@pytest.mark.parametrize("bgp", [False, True], ids=["one-balancer", "multi-node"])
@pytest.mark.parametrize("provider", ["libvirt", "virtualbox"])
def test_vagrant_validate(provider, bgp, tmp_path):
    proc = _validate(VAGRANT_DIR, tmp_path, provider, bgp)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "validated successfully" in proc.stdout
    assert not (VAGRANT_DIR / ".vagrant").exists()


@pytest.mark.parametrize("provider,block_line", [
    ("libvirt", '    lv.nic_model_type = "virtio"\n'),
    ("virtualbox", "    vb.linked_clone = true\n"),
])
def test_vagrant_validate_rejects_a_bad_provider_setting(provider, block_line, tmp_path):
    """The check above can fail: a misspelt key in either provider block."""
    copy = tmp_path / "vagrant"
    shutil.copytree(VAGRANT_DIR, copy, ignore=shutil.ignore_patterns(".vagrant"))
    text = (copy / "Vagrantfile").read_text()
    assert text.count(block_line) == 1
    prefix = block_line.split(".")[0]
    (copy / "Vagrantfile").write_text(text.replace(block_line, block_line + f"{prefix}.memroy = 512\n"))
    proc = _validate(copy, tmp_path, provider)
    assert proc.returncode != 0
    assert "memroy" in proc.stdout + proc.stderr


# Vagrant's own loader reads the Vagrantfile and lists every machine's shell
# provisioners (no provider, box or VM is touched).
PROVISIONERS_RB = """
require "json"
require "vagrant"
env = Vagrant::Environment.new(cwd: ARGV[0])
out = env.machine_names.to_h do |name|
  config = env.vagrantfile.machine_config(name, nil, nil)[:config]
  [name, config.vm.provisioners.map { |p| [p.config.path, p.config.args, p.run.to_s] }]
end
puts JSON.generate(out)
"""


def _provisioners(tmp_path: Path, bgp: bool) -> dict[str, list[list]]:
    """machine -> [[script, args, run], ...] in the Vagrantfile's order."""
    libs = sorted(Path("/usr/share/rubygems-integration/all/gems").glob("vagrant-[0-9]*/lib"))
    assert libs, "Debian's vagrant not found: tools/setup.sh installs it"
    script = tmp_path / "provisioners.rb"
    script.write_text(PROVISIONERS_RB)
    proc = subprocess.run([_need("ruby"), "-I", str(libs[-1]), str(script), str(VAGRANT_DIR)],
                          env=_env(tmp_path, "virtualbox", bgp), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


PACS_ARGS = ["pacs1=192.168.56.11", "pacs2=192.168.56.12", "pacs3=192.168.56.13"]
VIP = "192.168.56.100"


def test_the_one_balancer_lab_is_as_before(tmp_path):
    machines = _provisioners(tmp_path, bgp=False)
    assert list(machines) == ["lb", "pacs1", "pacs2", "pacs3", "modality"]
    assert machines["lb"] == [["lb.sh", [VIP, *PACS_ARGS], ""]]
    assert machines["modality"] == [["modality.sh", None, ""]]


def test_the_multi_node_lab_adds_lb2_and_a_router_provisioned_by_the_shared_scripts(tmp_path):
    machines = _provisioners(tmp_path, bgp=True)
    assert list(machines) == ["lb", "lb2", "router", "pacs1", "pacs2", "pacs3", "modality"]
    # Both balancers: the same script as the one-balancer lb, in BGP mode.
    assert machines["lb"] == [["lb.sh", ["--bgp", "192.168.56.30", "65011", VIP, *PACS_ARGS], ""]]
    assert machines["lb2"] == [["lb.sh", ["--bgp", "192.168.56.30", "65012", VIP, *PACS_ARGS], ""]]
    assert machines["router"] == [["router.sh", [VIP, "lb=192.168.56.10:65011", "lb2=192.168.56.14:65012"], ""]]
    assert machines["pacs2"] == [["pacs.sh", [VIP], "always"]]
    assert machines["modality"] == [["modality.sh", [VIP, "192.168.56.30"], "always"]]
    for script in ("lb.sh", "router.sh"):
        assert "/vagrant/tools/provision/bird-config.sh" in (VAGRANT_DIR / script).read_text()


def test_the_vagrant_bird_configs_are_the_recipes_and_bird_accepts_them(tmp_path):
    """What lb.sh --bgp and router.sh install, rendered here from the
    Vagrantfile's own arguments, passes BIRD's config check."""
    router_args = _provisioners(tmp_path, bgp=True)["router"][0][1]
    configs = {
        "router": _run_bird_config("router", "--id", "192.168.56.30", "--iface", "eth1", *router_args[1:]),
        "lb2": _run_bird_config("node", "--id", "192.168.56.14", "--as", "65012", "--router", "192.168.56.30",
                                "--iface", "eth1"),
    }
    for name, text in configs.items():
        conf = tmp_path / f"{name}.conf"
        conf.write_text(text)
        proc = subprocess.run([_need("bird"), "-p", "-c", str(conf)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    router, node = configs["router"], configs["lb2"]
    assert "protocol bgp lb from balancers {\n\tneighbor 192.168.56.10 as 65011;\n}" in router
    assert "protocol bgp lb2 from balancers {\n\tneighbor 192.168.56.14 as 65012;\n}" in router
    assert "10.20.0." not in router and "protocol bgp lb1 " not in router   # the recipe's example peers are gone
    assert "\tlocal 192.168.56.30 as 65000;" in router and 'interface "eth1" {' in router
    assert "merge paths yes" in router and "error wait time 1, 5;" in router
    assert "\tlocal 192.168.56.14 as 65012;" in node and "\tneighbor 192.168.56.30 as 65000;" in node
    assert 'interface "eth1" {' in node and "10.20.0." not in node


def _run_bird_config(*args: str) -> str:
    proc = _run("bird-config.sh", *args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("args,message", [
    (["switch"], "the first argument must be node or router, not 'switch'"),
    (["node", "--id", "10.0.0.2", "--iface", "eth0", "--as", "65001"], "a node needs --as N and --router IP"),
    (["router", "--id", "10.0.0.1", "--iface", "eth0"], "a router needs at least one NAME=IP:AS peer"),
    (["router", "--id", "10.0.0.1", "--iface", "eth0", "lb=10.0.0.2"], "peer 'lb=10.0.0.2' must be NAME=IP:AS"),
])
def test_bird_config_rejects_bad_input(args, message):
    proc = _run("bird-config.sh", *args)
    assert proc.returncode != 0 and message in proc.stderr and proc.stdout == "", proc.stderr


def test_vagrantfile_provisions_only_with_scripts_under_vagrant():
    text = (VAGRANT_DIR / "Vagrantfile").read_text()
    for machine in ("lb", "pacs", "modality", "router"):
        assert f'path: "{machine}.sh"' in text
    assert "inline:" not in text
    for script in VAGRANT_DIR.glob("*.sh"):
        assert "/vagrant/tools/" in script.read_text(), f"{script.name} calls no shared script"


# ---- the shared scripts' output and errors (run for real by the PACS lab) ----

def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(PROVISION_DIR / script), *args],
                          capture_output=True, text=True, timeout=60)


def test_orthanc_config_is_the_lab_pacs(tmp_path):
    out = tmp_path / "orthanc.json"
    proc = _run("orthanc-config.sh", "--storage", str(tmp_path / "db"), "--name", "pacs1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    config = json.loads(out.read_text())
    assert config["DicomAet"] == "SYNAPSE" and config["DicomPort"] == 104 and config["HttpPort"] == 8042
    assert config["RemoteAccessAllowed"] is True and config["AuthenticationEnabled"] is False
    assert config["StorageDirectory"] == config["IndexDirectory"] == str(tmp_path / "db")
    assert config["DicomAlwaysAllowEcho"] is True and config["DicomAlwaysAllowStore"] is True
    assert config["DicomModalities"] == {} and config["Name"] == "pacs1"


def test_orthanc_config_known_callers_only(tmp_path):
    proc = _run("orthanc-config.sh", "--storage", "/srv/db", "--known-aet", "XDPLB", "--known-aet", "CT1")
    config = json.loads(proc.stdout)
    assert config["DicomAlwaysAllowEcho"] is False and config["DicomAlwaysAllowStore"] is False
    assert set(config["DicomModalities"]) == {"XDPLB", "CT1"}


def test_orthanc_config_authorises_callers_by_address(tmp_path):
    """The NAT lab's PACS: a caller is known by AE title and address, and the address is checked."""
    proc = _run("orthanc-config.sh", "--storage", "/srv/db", "--dicom-port", "4242", "--modality", "MODALITY=10.20.0.2",
                "--modality", "XDPLB=10.10.0.10", "--check-modality-host")
    assert proc.returncode == 0, proc.stderr
    config = json.loads(proc.stdout)
    assert config["DicomCheckModalityHost"] is True and config["DicomPort"] == 4242
    assert config["DicomAlwaysAllowEcho"] is False and config["DicomAlwaysAllowStore"] is False
    assert config["DicomModalities"] == {"MODALITY": ["MODALITY", "10.20.0.2", 104],
                                         "XDPLB": ["XDPLB", "10.10.0.10", 104]}
    assert json.loads(_run("orthanc-config.sh", "--storage", "/srv/db").stdout)["DicomCheckModalityHost"] is False


@pytest.mark.parametrize("args,message", [
    (["--storage", "/srv/db", "--modality", "MODALITY"], "--modality needs AET=HOST, not 'MODALITY'"),
    (["--storage", "/srv/db", "--modality", "CT=10.20.0"], "--modality needs an IPv4 address, not '10.20.0'"),
    (["--storage", "/srv/db", "--modality", "CT=10.20.0.256"], "--modality needs an IPv4 address, not '10.20.0.256'"),
    (["--storage", "/srv/db", "--aet", "MUCH-TOO-LONG-AE-TITLE"], "--aet must be 1..16"),
    (["--storage", "/srv/db", "--dicom-port", "70000"], "--dicom-port must be a port number 1..65535, not '70000'"),
    (["--storage", "relative/db"], "--storage must be an absolute path, not 'relative/db'"),
    (["--storage", '/srv/"db'], "--storage must be non-empty text without quotes"),
    (["--aet", "SYNAPSE"], "--storage DIR is required"),
])
def test_orthanc_config_rejects_bad_input(args, message, tmp_path):
    out = tmp_path / "orthanc.json"
    proc = _run("orthanc-config.sh", *args, "--out", str(out))
    assert proc.returncode != 0
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("check", ["tcp", "dicom"])
def test_pool_script_writes_a_pool_xdplb_accepts(check):
    proc = _run("xdplb-pool.sh", "--vip", "192.168.56.100", "--check", check, "--metrics", "127.0.0.1:9742",
                "pacs1=192.168.56.11", "pacs2=192.168.56.12", "pacs3=192.168.56.13")
    assert proc.returncode == 0, proc.stderr
    pool = parse_pool(proc.stdout, "xdplb-pool.sh")
    assert [(s.name, s.port, s.health.check) for s in pool.services] == [
        ("synapse-dicom", 104, check), ("synapse-web", 8042, "tcp")]
    assert [str(b.address) for b in pool.services[0].backends] == [
        "192.168.56.11", "192.168.56.12", "192.168.56.13"]


@pytest.mark.parametrize("args,message", [
    (["--vip", "10.0.0.1", "--check", "http", "a=10.0.0.2"], "--check must be tcp or dicom, not 'http'"),
    (["--vip", "10.0.0.1"], "at least one NAME=ADDRESS backend is required"),
    (["--vip", "10.0.0.1", "pacs1"], "backend 'pacs1' must be NAME=ADDRESS"),
    (["a=10.0.0.2"], "--vip IP is required"),
])
def test_pool_script_rejects_bad_input(args, message):
    proc = _run("xdplb-pool.sh", *args)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def test_packages_script_names_an_unknown_role():
    proc = _run("packages.sh", "--check", "pacs", "gateway")
    assert proc.returncode != 0
    assert "unknown role 'gateway': use pacs, modality or dicomgen" in proc.stderr
