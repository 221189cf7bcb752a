"""The daemon, driven end to end with fakes: no root, no bcc, no network.

Each test runs Daemon.run() in its own asyncio loop (asyncio.run) with a
FakeDataplane, a FakeNetlink and a FakeProber from tests/fakes.py, pool files
in tmp_path and the control socket in a private directory (XDPLB_RUN_DIR).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import stat
import sys
import tempfile
import time
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from types import MappingProxyType

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for fakes.py

from fakes import FakeDataplane, FakeNetlink, FakeProber  # noqa: E402

import xdplb.daemon  # noqa: E402
from xdplb import control, plan  # noqa: E402
from xdplb.daemon import AttachError, Daemon  # noqa: E402
from xdplb.netlink import Link  # noqa: E402

IF = "lbt0"
INDEX = 7
GW_MAC = bytes.fromhex("02000a0a0001")
VIP1, VIP2 = IPv4Address("10.10.0.100"), IPv4Address("10.10.0.101")
A, B, C, D = (IPv4Address(f"10.10.0.{i}") for i in (11, 12, 13, 14))
MACS = {a: bytes([2, 0, 10, 10, 0, a.packed[3]]) for a in (A, B, C, D)}
DICOM, WEB, STORE = (VIP1, 104, "tcp"), (VIP1, 80, "tcp"), (VIP2, 11112, "tcp")
SIZE = 251

DEFAULT_SERVICES = [
    ("dicom", VIP1, 104, [("pacs-a", A, 1), ("pacs-b", B, 1), ("pacs-c", C, 1)]),
    ("web", VIP1, 80, [("pacs-a", A, 1), ("pacs-b", B, 1)]),
    ("store", VIP2, 11112, [("pacs-a", A, 1), ("pacs-c", C, 1)]),
]


def pool_toml(services=DEFAULT_SERVICES, maglev_size: int = SIZE, rise: int = 2, fall: int = 2,
              interval: float = 0.05, timeout: float = 0.02, health_port: int | None = None,
              max_services: int = 8, max_backends: int = 32, metrics: str = "") -> str:
    lines = ["[xdplb]", f'metrics = "{metrics}"', f"maglev_size = {maglev_size}", f"max_services = {max_services}",
             f"max_backends = {max_backends}", ""]
    for name, vip, port, backends in services:
        lines += ["[[service]]", f'name = "{name}"', f'vip = "{vip}"', f"port = {port}", "",
                  "  [service.health]", f"  interval = {interval}", f"  timeout = {timeout}", f"  rise = {rise}",
                  f"  fall = {fall}", *([f"  port = {health_port}"] if health_port else []), ""]
        for bname, address, weight in backends:
            lines += ["  [[service.backend]]", f'  name = "{bname}"', f'  address = "{address}"', f"  weight = {weight}", ""]
    return "\n".join(lines)


def link(kind="veth", prog_id=None) -> Link:
    return Link(INDEX, IF, GW_MAC, kind, "native" if prog_id else None, prog_id)


@pytest.fixture
def run_dir(monkeypatch):
    # Short and private: a Unix socket path must fit in 108 bytes.
    d = Path(tempfile.mkdtemp(prefix="xdplb-t", dir="/tmp"))
    monkeypatch.setenv("XDPLB_RUN_DIR", str(d))
    monkeypatch.setenv("XDPLB_BPFFS", str(d / "bpffs"))  # never look at the real /sys/fs/bpf
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Harness:
    def __init__(self, tmp_path: Path, kind="veth", prog_id=None, preconfigured=(), refuse=(), prog_name="other"):
        self.pool = tmp_path / "pool.toml"
        self.pool.write_text(pool_toml())
        self.nl = FakeNetlink([link(kind, prog_id)], neighbours=dict(MACS), addresses={INDEX: preconfigured})
        self.prober = FakeProber()
        self.made: list[FakeDataplane] = []
        self.refuse = set(refuse)
        self.prog_name = prog_name  # what the program already on the link is called

    def factory(self, settings, **kwargs) -> FakeDataplane:
        dp = FakeDataplane(settings, **kwargs)
        dp.refuse_modes = set(self.refuse)
        self.made.append(dp)
        return dp

    @property
    def dp(self) -> FakeDataplane:
        (dp,) = self.made
        return dp

    def daemon(self, mode="auto") -> Daemon:
        return Daemon(IF, str(self.pool), mode, dataplane_factory=self.factory, netlink=self.nl, probe=self.prober,
                      prog_name_lookup=lambda prog_id: self.prog_name)


@pytest.fixture
def h(tmp_path, run_dir):
    return Harness(tmp_path)


async def until(pred, timeout: float = 5.0, what: str = "condition") -> float:
    """Wait until pred() is true; return the seconds it took."""
    started = time.monotonic()
    while not pred():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)
    return time.monotonic() - started


@contextlib.asynccontextmanager
async def running(daemon: Daemon):
    task = asyncio.create_task(daemon.run())
    try:
        await until(lambda: daemon.ready or task.done(), what="ready")
        if task.done():
            task.result()  # raise the start-up error
        yield task
    finally:
        if not task.done():
            daemon.stop()
        await asyncio.wait_for(task, 5)


def live(h: Harness, key) -> set:
    return set(h.dp.live_backends(key))


def status_backends(st: dict) -> dict:
    return {(s["name"], b["name"]): b for s in st["services"] for b in s["backends"]}


# ---- start-up ----------------------------------------------------------------

@pytest.mark.parametrize("kind, mode", [("veth", "generic"), (None, "native")])
def test_start_programs_healthy_backends_attaches_and_adds_vips(tmp_path, run_dir, kind, mode):
    h = Harness(tmp_path, kind=kind)
    h.prober.set(C, 104, ok=False)  # pacs-c fails on the DICOM port only
    daemon = h.daemon()

    async def scenario():
        async with running(daemon):
            assert h.dp.attach_calls == [(IF, mode)]
            assert h.dp.attached == (IF, mode) and daemon.mode == mode
            assert live(h, DICOM) == {A, B}
            assert live(h, WEB) == {A, B}
            assert live(h, STORE) == {A, C}  # pacs-c answers on 11112
            assert sum(h.dp.live_backends(DICOM).values()) == SIZE
            assert h.dp.vips == {VIP1, VIP2}
            assert h.dp.config[:3] == (GW_MAC, 0, False)
            assert h.nl.vips(INDEX) == {VIP1, VIP2}
            assert control.socket_path(IF).exists()

            st = daemon.status()
            assert st["ready"] is True and st["mode"] == mode and st["interface"] == IF
            assert [s["name"] for s in st["services"]] == ["dicom", "web", "store"]
            bes = status_backends(st)
            assert bes[("dicom", "pacs-c")]["health"] == "down"
            assert bes[("dicom", "pacs-c")]["forwarding"] is False
            assert bes[("dicom", "pacs-c")]["table_slots"] == 0
            assert "refused" in bes[("dicom", "pacs-c")]["reason"]
            assert bes[("store", "pacs-c")]["health"] == "up"
            assert bes[("dicom", "pacs-a")]["health"] == "up" and bes[("dicom", "pacs-a")]["forwarding"] is True
            assert bes[("dicom", "pacs-a")]["mac"] == MACS[A].hex(":")
            assert bes[("dicom", "pacs-a")]["table_slots"] + bes[("dicom", "pacs-b")]["table_slots"] == SIZE
            assert sorted(st["vips_added"]) == [str(VIP1), str(VIP2)]

    asyncio.run(scenario())


def test_maps_are_written_before_attach_and_vips_after(h):
    daemon = h.daemon()
    order = []
    nl_add = h.nl.add_vip

    def factory(settings, **kwargs):
        dp = h.factory(settings, **kwargs)
        real_apply, real_attach = dp.apply, dp.attach
        dp.apply = lambda ops: (order.append("apply"), real_apply(ops))
        dp.attach = lambda *a: (order.append("attach"), real_attach(*a))
        return dp

    h.nl.add_vip = lambda *a: (order.append("add_vip"), nl_add(*a))[1]
    daemon._dataplane_factory = factory

    async def scenario():
        async with running(daemon):
            pass

    asyncio.run(scenario())
    assert order[:4] == ["apply", "attach", "add_vip", "add_vip"]


# ---- health ------------------------------------------------------------------

def test_failing_backend_leaves_after_fall_probes_and_returns_after_rise(h, caplog):
    caplog.set_level(logging.INFO, logger="xdplb")
    daemon = h.daemon()
    target = (str(B), 104)

    async def scenario():
        async with running(daemon):
            assert live(h, DICOM) == {A, B, C}
            h.prober.set(B, 104, ok=False)
            n = h.prober.counts[target]
            await h.prober.wait_calls(B, 104, n + 1)
            assert B in live(h, DICOM)  # one failure of fall = 2: still in
            await h.prober.wait_calls(B, 104, n + 2)
            await until(lambda: live(h, DICOM) == {A, C}, what="pacs-b out")  # the reconciler's next pass
            assert live(h, WEB) == {A, B}  # probed on port 80: unaffected
            bid = h.dp.backend_by_address(DICOM, B)[0]
            assert h.dp.backends[bid][3] is False
            assert any(
                "pacs-b (10.10.0.12) of dicom: up -> down: connect to 10.10.0.12:104 refused" in r.getMessage()
                for r in caplog.records
            )

            h.prober.set(B, 104, ok=True)
            n = h.prober.counts[target]
            await h.prober.wait_calls(B, 104, n + 1)
            assert B not in live(h, DICOM)  # one success of rise = 2: still out
            await h.prober.wait_calls(B, 104, n + 2)
            await until(lambda: live(h, DICOM) == {A, B, C}, what="pacs-b back")
            assert h.dp.backends[bid][3] is True
            assert any("of dicom: down -> up: connect to 10.10.0.12:104 succeeded" in r.getMessage()
                       for r in caplog.records)

    asyncio.run(scenario())


def test_backend_without_a_mac_is_solicited_and_joins_once_resolved(h):
    del h.nl.neighbours[C]
    daemon = h.daemon()

    async def scenario():
        async with running(daemon):
            assert C in h.nl.solicited
            assert live(h, DICOM) == {A, B}  # healthy, but no MAC to send to
            h.nl.neighbours[C] = MACS[C]
            await until(lambda: live(h, DICOM) == {A, B, C}, what="pacs-c in the table")

    xdplb.daemon.MAC_REFRESH_SECONDS, saved = 0.05, xdplb.daemon.MAC_REFRESH_SECONDS
    try:
        asyncio.run(scenario())
    finally:
        xdplb.daemon.MAC_REFRESH_SECONDS = saved


# ---- reload ------------------------------------------------------------------

def snapshot(dp: FakeDataplane) -> tuple:
    return (len(dp.log), dict(dp.services), dict(dp.backends), dict(dp.tables), set(dp.vips), dp.config)


@pytest.mark.parametrize("breakage, expected", [
    (lambda text: text.replace('name = "web"', 'name = "web'), "TOML syntax error"),
    (lambda text: text.replace('address = "10.10.0.12"', 'address = "10.10.0.312"', 1),
     'address = "10.10.0.312" is not a valid IP address'),
    (lambda text: text.replace("maglev_size = 251", "maglev_size = 509"),
     "changing maglev_size 251 -> 509 needs a restart"),
    # The first IPv6 service grows flows6 from the minimum to flow_table_size (compiled in).
    (lambda text: text + ('\n[[service]]\nname = "dicom6"\nvip = "fd00:10:10::100"\nport = 104\n'
                          '  [[service.backend]]\n  name = "pacs-a"\n  address = "fd00:10:10::11"\n'),
     "changing flow_table_size6 1024 -> 262144 (the IPv6 flow table: unset, it is flow_table_size while the "
     "pool balances an IPv6 service and 1024 without one; restart xdplb to resize it, which keeps every flow "
     "while no IPv6 service is programmed) needs a restart of xdplb"),
], ids=["toml-syntax", "invalid-ip", "maglev-size", "first-ipv6-service"])
def test_rejected_reload_changes_nothing(h, caplog, breakage, expected):
    caplog.set_level(logging.INFO, logger="xdplb")
    daemon = h.daemon()

    async def scenario():
        async with running(daemon):
            before, pool = snapshot(h.dp), daemon.pool
            h.pool.write_text(breakage(pool_toml()))
            result = await daemon.reload("test")
            assert result["result"] == "rejected"
            assert expected in result["error"]
            assert str(h.pool) in result["error"]
            assert daemon.last_reload is result
            assert daemon.status()["last_reload"]["result"] == "rejected"
            assert snapshot(h.dp) == before
            assert daemon.pool is pool
            assert any("rejected" in r.getMessage() and expected in r.getMessage() for r in caplog.records)
            # Still running the old pool: a backend can still be taken out.
            h.prober.set(A, 104, ok=False)
            await until(lambda: A not in live(h, DICOM), what="pacs-a out")

    asyncio.run(scenario())


@pytest.mark.parametrize("bad_file, expected", [
    ("fifo", "it is a FIFO (named pipe), not a regular file"),
    ("dev-zero", "it is a character device, not a regular file"),
    ("deep-nesting", "TOML syntax error: arrays or inline tables nest too deeply"),
    ("directory", "it is a directory, not a regular file"),
])
def test_reload_of_a_file_that_would_hang_or_crash_keeps_the_last_good_state(h, deadline, bad_file, expected):
    daemon = h.daemon()

    async def scenario():
        async with running(daemon):
            before, pool = snapshot(h.dp), daemon.pool
            h.pool.unlink()
            if bad_file == "fifo":
                os.mkfifo(h.pool)
            elif bad_file == "dev-zero":
                h.pool.symlink_to("/dev/zero")
            elif bad_file == "directory":
                h.pool.mkdir()
            else:
                h.pool.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n" + pool_toml())
            with deadline(5):
                result = await daemon.reload("test")
            assert result == {"result": "rejected", "error": f"cannot read pool file {h.pool}: {expected}"
                              if bad_file != "deep-nesting" else f"{h.pool}: {expected}", "at": result["at"]}
            assert daemon.status()["last_reload"] == result
            assert snapshot(h.dp) == before
            assert daemon.pool is pool
            h.prober.set(A, 104, ok=False)  # still health-checking the last good pool
            await until(lambda: A not in live(h, DICOM), what="pacs-a out")

    asyncio.run(scenario())


def test_reload_survives_an_unexpected_error_while_checking_the_new_pool(h, caplog, monkeypatch):
    daemon = h.daemon()

    def broken(old, new):
        raise KeyError("a bug")

    async def scenario():
        async with running(daemon):
            before, pool = snapshot(h.dp), daemon.pool
            monkeypatch.setattr(xdplb.daemon, "restart_needed", broken)
            result = await daemon.reload("test")
            assert (result["result"], result["error"]) == ("rejected", f"{h.pool}: 'a bug'")
            assert snapshot(h.dp) == before and daemon.pool is pool
            assert any(r.exc_info and "failed unexpectedly" in r.getMessage() for r in caplog.records)

    asyncio.run(scenario())


def test_xdplb_reload_exits_non_zero_when_the_daemon_rejects_a_fifo(h, deadline):
    """What ExecReload runs: `xdplb reload -i IF` passes the daemon's verdict through its exit status."""
    from click.testing import CliRunner

    from xdplb.cli import cli

    daemon = h.daemon()

    async def scenario():
        async with running(daemon):
            h.pool.unlink()
            os.mkfifo(h.pool)
            with deadline(10):
                rejected = await asyncio.to_thread(CliRunner().invoke, cli, ["reload", "-i", IF])
            assert rejected.exit_code == 1
            assert rejected.stderr == (f"Error: reload rejected, nothing changed: cannot read pool file {h.pool}: "
                                       f"it is a FIFO (named pipe), not a regular file\n")
            h.pool.unlink()
            h.pool.write_text(pool_toml())
            applied = await asyncio.to_thread(CliRunner().invoke, cli, ["reload", "-i", IF])
            assert applied.exit_code == 0, applied.output
            assert daemon.last_reload["result"] == "applied"

    asyncio.run(scenario())


def test_valid_reload_adds_a_backend_and_drains_another(h):
    daemon = h.daemon()
    changed = [
        ("dicom", VIP1, 104, [("pacs-a", A, 0), ("pacs-b", B, 1), ("pacs-c", C, 1), ("pacs-d", D, 1)]),
        DEFAULT_SERVICES[1],
        DEFAULT_SERVICES[2],
    ]

    async def scenario():
        async with running(daemon):
            a_id = h.dp.backend_by_address(DICOM, A)[0]
            web_table = h.dp.live_table(WEB)
            h.pool.write_text(pool_toml(changed))
            result = await daemon.reload("test")
            assert result["result"] == "applied", result
            assert A not in live(h, DICOM)               # drained at once
            assert h.dp.backends[a_id][3] is True         # but still up for its flows
            await until(lambda: D in live(h, DICOM), what="pacs-d in the table")
            assert live(h, DICOM) == {B, C, D}
            assert h.prober.counts[(str(D), 104)] >= 1
            assert h.dp.live_table(WEB) == web_table      # other services untouched
            bes = status_backends(daemon.status())
            assert bes[("dicom", "pacs-d")]["health"] == "up"
            assert bes[("dicom", "pacs-a")]["weight"] == 0 and bes[("dicom", "pacs-a")]["table_slots"] == 0

    asyncio.run(scenario())


def test_reload_builds_each_changed_table_once(h, monkeypatch):
    # The dry run that validates a reload plans every table; applying it must
    # reuse that plan, not build the tables a second time.
    daemon = h.daemon()
    built = []
    real_build = xdplb.plan.maglev.build_table

    def counting_build(backends, size):
        built.append(size)
        return real_build(backends, size)

    reweighted = [("dicom", VIP1, 104, [("pacs-a", A, 2), ("pacs-b", B, 1), ("pacs-c", C, 1)]),
                  DEFAULT_SERVICES[1], DEFAULT_SERVICES[2]]

    async def scenario():
        async with running(daemon):
            dicom_table = h.dp.live_table(DICOM)
            monkeypatch.setattr(xdplb.plan.maglev, "build_table", counting_build)
            h.pool.write_text(pool_toml(reweighted))
            assert (await daemon.reload("test"))["result"] == "applied"
            assert len(built) == 1
            assert h.dp.live_table(DICOM) != dicom_table

    asyncio.run(scenario())


def test_reload_removing_a_service_and_its_vip(h):
    daemon = h.daemon()

    async def scenario():
        async with running(daemon):
            h.pool.write_text(pool_toml(DEFAULT_SERVICES[:2]))
            assert (await daemon.reload("test"))["result"] == "applied"
            assert set(h.dp.services) == {DICOM, WEB}
            assert h.dp.vips == {VIP1}
            assert h.nl.vips(INDEX) == {VIP1}
            assert daemon.added_vips == {VIP1}

    asyncio.run(scenario())


# ---- stop --------------------------------------------------------------------

def test_sigterm_detaches_and_removes_only_the_vips_it_added(tmp_path, run_dir):
    h = Harness(tmp_path, preconfigured={VIP2})
    daemon = h.daemon()

    async def scenario():
        task = asyncio.create_task(daemon.run())
        await until(lambda: daemon.ready or task.done(), what="ready")
        assert not task.done()
        path = control.socket_path(IF)
        assert path.exists() and stat.S_IMODE(path.stat().st_mode) == 0o600
        assert h.nl.vips(INDEX) == {VIP1}
        assert daemon.added_vips == {VIP1}
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(task, 5)

    asyncio.run(scenario())
    assert h.dp.attached is None and h.dp.detach_calls == 1
    assert VIP1 not in h.nl.addresses[INDEX]
    assert VIP2 in h.nl.addresses[INDEX]  # configured by the operator: left alone
    assert ("del_vip", INDEX, VIP2) not in h.nl.calls
    assert not control.socket_path(IF).exists()


def test_stop_method_cleans_up_too(h):
    daemon = h.daemon()

    async def scenario():
        async with running(daemon):
            pass  # running() calls daemon.stop()

    asyncio.run(scenario())
    assert h.dp.attached is None
    assert h.nl.addresses[INDEX] == set()
    assert not control.socket_path(IF).exists()


# ---- attach problems ---------------------------------------------------------

def test_link_with_another_xdp_program_is_refused_before_compiling(tmp_path, run_dir):
    h = Harness(tmp_path, prog_id=42, prog_name="firewall")
    daemon = h.daemon()
    with pytest.raises(AttachError, match=rf"{IF} already has an XDP program attached \('firewall', id 42\)"):
        asyncio.run(asyncio.wait_for(daemon.run(), 5))  # a run that starts would hang: fail instead
    assert h.made == []
    assert not any(c[0] == "add_vip" for c in h.nl.calls)
    assert not control.socket_path(IF).exists()


def test_leftover_xdplb_program_is_handed_to_the_dataplane_to_adopt_its_maps(tmp_path, run_dir):
    # Where its pins died with its mount namespace, only the program still
    # holds the maps: the dataplane takes them by the program's id.
    h = Harness(tmp_path, prog_id=42, prog_name=xdplb.daemon.PROG_NAME)
    daemon = h.daemon()

    async def scenario():
        async with running(daemon):
            assert h.dp.attached_prog_id == 42
            assert h.dp.attach_calls[-1][-1] == "replace"

    asyncio.run(scenario())


def test_a_fresh_attach_adopts_nothing(h):
    async def scenario():
        async with running(h.daemon()):
            assert h.dp.attached_prog_id is None

    asyncio.run(scenario())


def test_auto_on_a_nic_falls_back_to_generic_when_native_is_refused(tmp_path, run_dir, caplog):
    caplog.set_level(logging.INFO, logger="xdplb")
    h = Harness(tmp_path, kind=None, refuse={"native"})
    daemon = h.daemon()

    async def scenario():
        async with running(daemon):
            assert h.dp.attach_calls == [(IF, "native"), (IF, "generic")]
            assert h.dp.attached == (IF, "generic")
            assert daemon.status()["mode"] == "generic"

    asyncio.run(scenario())
    assert any("generic mode" in r.getMessage() and "falling back" in r.getMessage() for r in caplog.records)


def test_explicit_native_mode_does_not_fall_back(tmp_path, run_dir):
    h = Harness(tmp_path, kind=None, refuse={"native"})
    daemon = h.daemon(mode="native")
    with pytest.raises(AttachError, match="could not attach to lbt0: native: "):
        asyncio.run(asyncio.wait_for(daemon.run(), 5))  # a run that starts would hang: fail instead
    assert h.dp.attach_calls == [(IF, "native")]
    assert h.dp.attached is None
    assert h.nl.addresses[INDEX] == set()
    assert not control.socket_path(IF).exists()


@pytest.mark.parametrize("mode", ["auto", "native"])
def test_a_nic_that_strips_vlan_tags_is_refused_in_native_mode_with_the_fix(tmp_path, run_dir, mode):
    h = Harness(tmp_path, kind=None)
    h.nl.features[IF] = frozenset({"rx-vlan-hw-parse", "rx-checksum"})
    daemon = h.daemon(mode=mode)
    with pytest.raises(AttachError, match=rf"`ethtool -K {IF} rxvlan off` before attaching"):
        asyncio.run(asyncio.wait_for(daemon.run(), 5))  # a run that starts would hang: fail instead
    assert h.dp.attach_calls == [], "refused before any attach, no fallback to generic"
    assert h.nl.addresses[INDEX] == set()
    assert not control.socket_path(IF).exists()


def test_generic_mode_and_a_nic_without_vlan_stripping_attach(tmp_path, run_dir):
    stripping = Harness(tmp_path, kind=None)
    stripping.nl.features[IF] = frozenset({"rx-vlan-hw-parse"})
    plain = Harness(tmp_path, kind=None)
    plain.nl.features[IF] = frozenset({"tx-vlan-hw-insert", "rx-checksum"})

    async def scenario():
        async with running(stripping.daemon(mode="generic")):
            assert stripping.dp.attached == (IF, "generic")
        async with running(plain.daemon(mode="native")):
            assert plain.dp.attached == (IF, "native")

    asyncio.run(scenario())


def test_a_restart_onto_a_native_program_with_vlan_stripping_warns_and_replaces(tmp_path, run_dir, caplog):
    # Refusing would stop only the controller: the running program keeps its mode either way.
    h = Harness(tmp_path, kind=None, prog_id=42, prog_name=xdplb.daemon.PROG_NAME)
    h.nl.features[IF] = frozenset({"rx-vlan-hw-parse"})

    async def scenario():
        async with running(h.daemon()):
            assert h.dp.attach_calls == [(IF, "native", "replace")]

    asyncio.run(scenario())
    assert any("rxvlan off" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


# ---- neighbours --------------------------------------------------------------

def test_mac_change_is_picked_up_within_two_refresh_periods(h, monkeypatch):
    period = 0.1
    monkeypatch.setattr(xdplb.daemon, "MAC_REFRESH_SECONDS", period)
    daemon = h.daemon()
    new_mac = bytes.fromhex("02aabbccdd0c")

    def b_macs():
        return {v[2] for v in h.dp.backends.values() if v[1] == B}

    async def scenario():
        async with running(daemon):
            assert b_macs() == {MACS[B]}
            tables_before = dict(h.dp.tables)
            mark = len(h.dp.log)
            h.nl.neighbours[B] = new_mac
            took = await until(lambda: b_macs() == {new_mac}, timeout=5, what="the new MAC")
            assert took <= 2 * period + 0.1
            new_ops = h.dp.log[mark:]
            # Rewritten for both services pacs-b is in, and no table moved.
            assert sorted(op.service_id for op in new_ops if isinstance(op, plan.PutBackend)) == sorted(
                {h.dp.services[DICOM][0], h.dp.services[WEB][0]})
            assert all(op.mac == new_mac and op.up for op in new_ops if isinstance(op, plan.PutBackend))
            assert h.dp.tables == tables_before
            assert status_backends(daemon.status())[("dicom", "pacs-b")]["mac"] == new_mac.hex(":")

    asyncio.run(scenario())


# ---- control socket ----------------------------------------------------------

def test_control_socket_answers_status_and_rejects_unknown_commands(h):
    daemon = h.daemon()

    async def scenario():
        async with running(daemon):
            st = await asyncio.to_thread(control.request, IF, {"cmd": "status"})
            assert st["interface"] == IF and st["ready"] is True and st["pid"] == os.getpid()
            assert [s["name"] for s in st["services"]] == ["dicom", "web", "store"]
            assert {b["health"] for s in st["services"] for b in s["backends"]} == {"up"}
            assert await asyncio.to_thread(control.request, IF, {"cmd": "ping"}) == {"ok": True}
            bogus = await asyncio.to_thread(control.request, IF, {"cmd": "bogus"})
            assert "unknown command" in bogus["error"]

    asyncio.run(scenario())
    with pytest.raises(control.NotRunning):
        control.request(IF, {"cmd": "status"})



def test_fakes_and_the_dataplane_types_import_without_bcc():
    # A fresh interpreter that records any attempt to import bcc.
    script = (
        "import sys\n"
        "asked = []\n"
        "class Watch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'bcc':\n"
        "            asked.append(name)\n"
        "sys.meta_path.insert(0, Watch())\n"
        "sys.path.insert(0, 'tests')\n"
        "import fakes, xdplb.dataplane, xdplb.daemon\n"
        "assert not asked and 'bcc' not in sys.modules, asked\n"
        "print('ok')\n"
    )
    import subprocess

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_a_crashing_probe_counts_as_a_failure_and_probing_goes_on(h, caplog):
    caplog.set_level(logging.INFO, logger="xdplb")
    real = h.prober
    crashing = {"on": False}

    async def prober(health, address):
        if crashing["on"] and str(address) == str(B) and health.port == 104:
            real.counts[(str(address), 104)] += 1
            raise RuntimeError("probe bug")
        return await real(health, address)

    daemon = Daemon(IF, str(h.pool), "auto", dataplane_factory=h.factory, netlink=h.nl, probe=prober,
                    prog_name_lookup=lambda prog_id: h.prog_name)

    async def scenario():
        async with running(daemon):
            crashing["on"] = True
            await until(lambda: B not in live(h, DICOM), what="B out after crashing probes")
            assert any("crashed" in r.getMessage() for r in caplog.records)
            crashing["on"] = False
            await until(lambda: B in live(h, DICOM), what="B back once probes work again")

    asyncio.run(scenario())


def test_manage_vips_false_adds_no_address(h):
    h.pool.write_text(h.pool.read_text().replace('metrics = ""', 'metrics = ""\nmanage_vips = false'))
    daemon = h.daemon()

    async def scenario():
        async with running(daemon):
            assert live(h, DICOM) == {A, B, C}  # still balancing
            assert h.nl.addresses[INDEX] == set()
            assert not any(call[0] == "add_vip" for call in h.nl.calls)

    asyncio.run(scenario())


# ---- issue 11: a controller that never stalls and never gives up ----------------
#
# Each test below reproduces one failure of the daemon before the reconciler,
# scheduler and supervisor split; each fails on that code.

import xdplb.reconciler  # noqa: E402
import xdplb.supervisor  # noqa: E402
from xdplb import probes  # noqa: E402


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(xdplb.supervisor, "RESTART_DELAY", 0.02, raising=False)
    monkeypatch.setattr(xdplb.reconciler, "RETRY_MIN", 0.02, raising=False)


def test_a_failed_map_write_is_retried_and_the_killed_backend_still_leaves(h, caplog, fast_retries):
    # Point 1: one failed write used to kill the probe task of the backend
    # whose verdict caused it; the backend then stayed in the live table,
    # shown down, for good.
    caplog.set_level(logging.INFO, logger="xdplb")
    daemon = h.daemon()

    async def scenario():
        async with running(daemon):
            assert live(h, DICOM) == {A, B, C}
            h.dp.fail_writes(times=3)               # the next three map writes are refused
            h.prober.set(B, 104, ok=False)          # pacs-b dies
            await until(lambda: h.dp.failures[0][1] == 0, what="the three failed writes")
            st = daemon.status()
            assert st["map_writes"]["errors_total"] >= 3
            await until(lambda: live(h, DICOM) == {A, C}, what="pacs-b out once writes succeed")
            assert daemon.status()["map_writes"]["error"] is None
            assert any("writing the maps failed" in r.getMessage() for r in caplog.records)
            # pacs-b's probe task is alive: it comes back when it answers again.
            h.prober.set(B, 104, ok=True)
            await until(lambda: live(h, DICOM) == {A, B, C}, what="pacs-b back")
            assert h.dp.live_table_writes == []

    asyncio.run(scenario())


def test_a_failed_reload_is_rolled_back_and_repaired_from_the_kernel(h, fast_retries):
    # Point 1: a reload whose writes fail part way (one table already
    # flipped) must not leave the new pool in place, must answer, and the
    # retry must start from what the maps hold, never rewrite a live table.
    daemon = h.daemon()
    reweighted = [(n, vip, port, [(b, a, 3 if b == "pacs-a" else w) for b, a, w in bes])
                  for n, vip, port, bes in DEFAULT_SERVICES]

    async def scenario():
        async with running(daemon):
            before = {key: h.dp.live_table(key) for key in (DICOM, WEB, STORE)}
            pool = daemon.pool
            h.dp.fail_writes(times=1, op="PutService", after=1)  # the first table flips, the second fails
            h.pool.write_text(pool_toml(reweighted))
            reply = await asyncio.to_thread(control.request, IF, {"cmd": "reload"}, 30)
            assert reply["result"] == "failed" and "writing the maps failed" in reply["error"], reply
            assert daemon.pool is pool
            assert daemon.last_reload["result"] == "failed"
            await until(lambda: {key: h.dp.live_table(key) for key in before} == before,
                        what="the maps repaired to the running pool")
            assert h.dp.live_table_writes == []
            assert daemon.status()["map_writes"]["error"] is None

    asyncio.run(scenario())


def test_the_neighbour_refresh_survives_a_netlink_error(h, monkeypatch):
    # Point 1: the MAC loop died on its first netlink error.
    monkeypatch.setattr(xdplb.daemon, "MAC_REFRESH_SECONDS", 0.05)
    daemon = h.daemon()
    new_mac = bytes.fromhex("02aabbccdd0c")

    async def scenario():
        async with running(daemon):
            h.nl.fail("neighbour_macs")
            h.nl.fail("neighbour_mac")
            await asyncio.sleep(0.2)
            h.nl.neighbours[B] = new_mac
            await until(lambda: {v[2] for v in h.dp.backends.values() if v[1] == B} == {new_mac},
                        what="the new MAC after a netlink error")

    asyncio.run(scenario())


def test_a_crash_while_handling_a_probe_result_restarts_the_probe_loop(h, caplog, fast_retries):
    # Point 1: only the probe itself was guarded; an exception in handling
    # its result ended the backend's probing for good.
    caplog.set_level(logging.INFO, logger="xdplb")
    daemon = h.daemon()
    real = daemon.telemetry.probe
    crashes = []

    def probe_telemetry(service, backend, *args):
        if service == "dicom" and backend in (str(B), "pacs-b") and not crashes:
            crashes.append(1)
            raise RuntimeError("bug in result handling")
        return real(service, backend, *args)

    async def scenario():
        async with running(daemon):
            daemon.telemetry.probe = probe_telemetry
            await until(lambda: crashes, what="the crash")
            h.prober.set(B, 104, ok=False)
            await until(lambda: B not in live(h, DICOM), what="pacs-b out after the crash")
            assert any("crashed" in r.getMessage() for r in caplog.records)

    asyncio.run(scenario())


def test_one_dead_server_shared_by_six_services_gives_one_plan(tmp_path, run_dir):
    # Point 2: each service's verdict used to plan and write on its own.
    services = [(f"svc{i}", VIP1, 2000 + i, [("pacs-a", A, 1), ("pacs-b", B, 1), ("pacs-c", C, 1)])
                for i in range(6)]
    h = Harness(tmp_path)
    h.pool.write_text(pool_toml(services, health_port=9000, fall=1))
    daemon = h.daemon()

    async def scenario():
        async with running(daemon):
            await asyncio.sleep(0.2)
            calls = h.dp.apply_calls
            h.prober.set(B, 9000, ok=False)
            await until(lambda: all(B not in live(h, (VIP1, 2000 + i, "tcp")) for i in range(6)),
                        what="pacs-b out of all six")
            await asyncio.sleep(0.2)
            assert h.dp.apply_calls - calls == 1

    asyncio.run(scenario())


class LocalTcp:
    """A real TCP listener on 127.0.0.1 and a probe function that checks it
    with the real tcp probe in place of each backend (backend addresses
    cannot be loopback). Keeps every probe's measured seconds."""

    def __init__(self):
        self.server = None
        self.port = None
        self.results: list = []      # (loop time, ok, seconds)

    async def start(self):
        self.server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __call__(self, health, address):
        result = await probes.tcp_probe("127.0.0.1", self.port, health.timeout)
        self.results.append((time.monotonic(), result.ok, result.seconds))
        return result

    def stop(self):
        self.server.close()


def test_a_probe_keeps_its_verdict_while_a_64_service_reload_and_status_calls_run(tmp_path, run_dir):
    # Point 2: a 64-service reload (about 1.7 s of Maglev builds) and
    # `xdplb top`'s status calls ran on the event loop, and a healthy
    # backend's probes timed out behind them. With fall = 1 a single late
    # probe would take the backend out: the verdict must stay up.
    backends = [("pacs-a", A, 1), ("pacs-b", B, 1), ("pacs-c", C, 1), ("pacs-d", D, 1)]
    services = [(f"svc{i}", VIP1, 2000 + i, backends) for i in range(64)]
    reweighted = [(n, v, p, [(b, a, 2 if b == "pacs-a" else w) for b, a, w in bes]) for n, v, p, bes in services]
    kw = dict(maglev_size=65537, health_port=9000, fall=1, interval=0.25, timeout=0.25,
              max_services=64, max_backends=512)
    h = Harness(tmp_path)
    h.pool.write_text(pool_toml(services, **kw))

    async def scenario():
        tcp = await LocalTcp().start()
        daemon = Daemon(IF, str(h.pool), "auto", dataplane_factory=h.factory, netlink=h.nl, probe=tcp,
                        prog_name_lookup=lambda prog_id: h.prog_name)
        try:
            task = asyncio.create_task(daemon.run())
            await until(lambda: daemon.ready or task.done(), timeout=60, what="ready")
            try:
                h.pool.write_text(pool_toml(reweighted, **kw))
                status_calls = 0
                reloading = asyncio.ensure_future(asyncio.to_thread(control.request, IF, {"cmd": "reload"}, 120))
                started = time.monotonic()
                while not reloading.done():   # what `xdplb top` does, as fast as it can
                    await asyncio.to_thread(control.request, IF, {"cmd": "status"}, 120)
                    status_calls += 1
                reply = await reloading
                ended = time.monotonic()
                assert reply["result"] == "applied", reply
                during = [r for r in tcp.results if started <= r[0] <= ended]
                print(f"\nreload took {ended - started:.2f}s with {status_calls} status calls; "
                      f"{len(during)} probes during it, slowest {max((r[2] for r in during), default=0) * 1000:.1f} ms, "
                      f"all probes slowest {max(r[2] for r in tcp.results) * 1000:.1f} ms")
                assert during, "no probe completed while the reload ran"
                assert all(ok for _t, ok, _s in tcp.results)
                assert all(h_.state.value == "up" for h_ in daemon.health.values())
                assert not any(to == "down" for (_s, _b, to) in daemon.telemetry.transitions)
                assert h.dp.live_backends((VIP1, 2000, "tcp"))[A] > h.dp.live_backends((VIP1, 2000, "tcp"))[B]
            finally:
                daemon.stop()
                await asyncio.wait_for(task, 30)
        finally:
            tcp.stop()

    asyncio.run(scenario())


def test_neighbour_reads_do_not_stall_probes_and_one_dump_serves_all(h, monkeypatch):
    # Point 2: one blocking netlink lookup per backend every second ran on
    # the loop. Here each neighbour read blocks for 0.3 s.
    monkeypatch.setattr(xdplb.daemon, "MAC_REFRESH_SECONDS", 0.05)
    h.pool.write_text(pool_toml(health_port=9000, fall=1, interval=0.2, timeout=0.2))

    async def scenario():
        tcp = await LocalTcp().start()
        daemon = Daemon(IF, str(h.pool), "auto", dataplane_factory=h.factory, netlink=h.nl, probe=tcp,
                        prog_name_lookup=lambda prog_id: h.prog_name)
        try:
            async with running(daemon):
                h.nl.delay = 0.3
                dumps = h.nl.dumps
                mark = len(tcp.results)
                await until(lambda: h.nl.dumps >= dumps + 4, what="four neighbour refreshes")
                h.nl.delay = 0.0
                assert len(tcp.results) > mark
                assert all(ok for _t, ok, _s in tcp.results)
                assert all(h_.state.value == "up" for h_ in daemon.health.values())
                assert h.nl.lookups == 0       # one dump per refresh, no per-backend lookup
        finally:
            tcp.stop()

    asyncio.run(scenario())


def test_status_reads_slot_counts_planned_with_the_table_not_the_table(h):
    # Point 2: status counted each backend's slots with table.count(id):
    # O(backends x table size), about 3 s for 64 x 64 at 65537 slots.
    daemon = h.daemon()
    scans = []

    class Watched(tuple):
        def count(self, value):
            scans.append(value)
            return super().count(value)

        def __iter__(self):
            scans.append("iter")
            return super().__iter__()

    async def scenario():
        async with running(daemon):
            owner = daemon.reconciler if getattr(daemon, "reconciler", None) else daemon
            applied = owner.applied
            services = {n: dataclasses.replace(a, table=Watched(a.table)) for n, a in applied.services.items()}
            owner.applied = dataclasses.replace(applied, services=MappingProxyType(services))
            bes = status_backends(await asyncio.to_thread(control.request, IF, {"cmd": "status"}))
            assert scans == []
            assert bes[("dicom", "pacs-a")]["table_slots"] + bes[("dicom", "pacs-b")]["table_slots"] \
                + bes[("dicom", "pacs-c")]["table_slots"] == SIZE
            assert all(bes[("dicom", n)]["table_slots"] > 0 for n in ("pacs-a", "pacs-b", "pacs-c"))

    asyncio.run(scenario())


def test_a_reload_that_learns_a_new_mac_builds_each_table_once(h, monkeypatch):
    # Point 2: the reload's dry run planned without the new backend's MAC,
    # then the MAC refresh changed the desired state and every changed table
    # was built a second time.
    daemon = h.daemon()
    built = []
    real_build = xdplb.plan.maglev.build_table

    def counting_build(backends, size):
        built.append(tuple(sorted((b.key, b.weight) for b in backends)))
        return real_build(backends, size)

    changed = [("dicom", VIP1, 104, [("pacs-a", A, 2), ("pacs-b", B, 1), ("pacs-c", C, 1), ("pacs-d", D, 1)]),
               DEFAULT_SERVICES[1], DEFAULT_SERVICES[2]]
    del h.nl.neighbours[D]

    async def scenario():
        async with running(daemon):
            h.nl.neighbours[D] = MACS[D]   # resolvable now, but not yet known to the daemon
            monkeypatch.setattr(xdplb.plan.maglev, "build_table", counting_build)
            h.pool.write_text(pool_toml(changed))
            assert (await asyncio.to_thread(control.request, IF, {"cmd": "reload"}))["result"] == "applied"
            reweighted = ((str(A), 2), (str(B), 1), (str(C), 1))
            assert built.count(reweighted) == 1, built

    asyncio.run(scenario())


# ---- signals and shutdown (point 6) ----------------------------------------------

def test_sigterm_during_the_compile_attaches_nothing(h):
    daemon = h.daemon()

    def compiling(settings, **kwargs):
        dp = h.factory(settings, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)   # arrives while bcc compiles
        time.sleep(0.2)
        return dp

    daemon._dataplane_factory = compiling
    code = asyncio.run(asyncio.wait_for(daemon.run(), 10))
    assert code == 0
    assert h.dp.attach_calls == []
    assert not any(c[0] == "add_vip" for c in h.nl.calls)
    assert h.dp.log == []                      # no map was programmed either
    assert h.dp.unpinned == 1
    assert not control.socket_path(IF).exists()


def test_sighup_during_teardown_is_ignored(h, caplog):
    caplog.set_level(logging.INFO, logger="xdplb")
    daemon = h.daemon()
    more = DEFAULT_SERVICES + [("extra", IPv4Address("10.10.0.102"), 104, [("pacs-d", D, 1)])]
    real_del = h.nl.del_vip

    def del_vip(index, address):
        if not h.pool.read_text().count("extra"):
            h.pool.write_text(pool_toml(more))   # a reload now would add a VIP
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.1)
        return real_del(index, address)

    async def scenario():
        async with running(daemon):
            h.nl.del_vip = del_vip
        await asyncio.sleep(0.2)

    asyncio.run(scenario())
    assert daemon.telemetry.reloads["applied"] == 0
    assert h.nl.addresses[INDEX] == set()
    assert any("SIGHUP" in r.getMessage() and "ignored" in r.getMessage() for r in caplog.records)


def test_every_cleanup_step_runs_and_each_failure_is_logged(h, caplog):
    caplog.set_level(logging.INFO, logger="xdplb")
    daemon = h.daemon()

    def broken_detach():
        raise OSError("netlink: device busy")

    real_del = h.nl.del_vip

    def del_vip(index, address):
        if address == VIP1:
            raise OSError("address busy")
        return real_del(index, address)

    async def scenario():
        task = asyncio.create_task(daemon.run())
        await until(lambda: daemon.ready or task.done(), what="ready")
        h.dp.detach = broken_detach
        h.nl.del_vip = del_vip
        daemon.stop()
        return await asyncio.wait_for(task, 5)

    code = asyncio.run(scenario())
    assert code != 0
    assert VIP2 not in h.nl.addresses[INDEX]         # the step after the failed one ran
    assert h.dp.unpinned == 1
    assert not control.socket_path(IF).exists()
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("detaching the XDP program failed: netlink: device busy" in m for m in messages), messages
    assert any(f"removing VIP {VIP1} failed: address busy" in m for m in messages), messages


# ---- one identity for a backend (point 7) ------------------------------------------

def test_renaming_a_drained_backend_keeps_it_drained(h):
    daemon = h.daemon()
    renamed = [("dicom", VIP1, 104, [("pacs-a", A, 1), ("pacs-bee", B, 1), ("pacs-c", C, 1)]),
               DEFAULT_SERVICES[1], DEFAULT_SERVICES[2]]

    async def scenario():
        async with running(daemon):
            assert (await asyncio.to_thread(control.request, IF, {"cmd": "drain", "service": "dicom",
                                                                  "backend": "pacs-b"}))["ok"]
            await until(lambda: B not in live(h, DICOM), what="pacs-b drained")
            h.pool.write_text(pool_toml(renamed))
            assert (await asyncio.to_thread(control.request, IF, {"cmd": "reload"}))["result"] == "applied"
            await asyncio.sleep(0.2)
            assert B not in live(h, DICOM)
            bes = status_backends(daemon.status())
            assert bes[("dicom", "pacs-bee")]["drained"] is True
            saved = json.loads((run_dir_of() / f"{IF}.drained.json").read_text())
            assert saved == [["dicom", str(B)]]
            assert (await asyncio.to_thread(control.request, IF, {"cmd": "undrain", "service": "dicom",
                                                                  "backend": "pacs-bee"}))["changed"]
            await until(lambda: B in live(h, DICOM), what="pacs-bee back")

    asyncio.run(scenario())


def run_dir_of() -> Path:
    return control.run_dir()


def test_removed_backends_disappear_from_the_exporter(h):
    from prometheus_client.registry import CollectorRegistry  # noqa: F401
    from xdplb.exporter import registry_for

    daemon = h.daemon()
    without_c = [("dicom", VIP1, 104, [("pacs-a", A, 1), ("pacs-b", B, 1)]), DEFAULT_SERVICES[1], DEFAULT_SERVICES[2]]

    def series(service, backend):
        return [s for fam in registry_for(daemon).collect() for s in fam.samples
                if s.labels.get("service") == service and s.labels.get("backend") == backend]

    async def scenario():
        async with running(daemon):
            h.prober.set(C, 104, ok=False)
            await until(lambda: C not in live(h, DICOM), what="pacs-c down")
            assert series("dicom", "pacs-c")
            h.pool.write_text(pool_toml(without_c))
            assert (await asyncio.to_thread(control.request, IF, {"cmd": "reload"}))["result"] == "applied"
            assert series("dicom", "pacs-c") == []
            assert series("store", "pacs-c")           # still a backend of store
            assert series("dicom", "pacs-a")

    asyncio.run(scenario())


def test_the_periodic_full_pass_repairs_drift(h, monkeypatch, caplog):
    # statedb's contract: a periodic full reconcile repairs outside changes.
    caplog.set_level(logging.INFO, logger="xdplb")
    monkeypatch.setattr(xdplb.reconciler, "FULL_RECONCILE_SECONDS", 0.1, raising=False)
    daemon = h.daemon()

    async def scenario():
        async with running(daemon):
            bid = h.dp.backend_by_address(DICOM, A)[0]
            del h.dp.backends[bid]                   # someone cleared a backend entry
            del h.dp.services[STORE]                 # and deleted a service
            assert None in h.dp.live_backends(DICOM) and live(h, STORE) == set()
            await until(lambda: live(h, DICOM) == {A, B, C} and live(h, STORE) == {A, C},
                        what="the maps repaired")
            assert any("drifted" in r.getMessage() for r in caplog.records)

    asyncio.run(scenario())


VIP6 = IPv6Address("fd00:10:10::100")
A6, B6 = IPv6Address("fd00:10:10::11"), IPv6Address("fd00:10:10::12")


def test_the_periodic_full_pass_repairs_an_ipv6_services_client_prefix(h, monkeypatch, caplog):
    # service_ids6 (the VIP and client prefix an IPv6 service's live half
    # hashes with) is compared and repaired like the other maps.
    caplog.set_level(logging.INFO, logger="xdplb")
    monkeypatch.setattr(xdplb.reconciler, "FULL_RECONCILE_SECONDS", 0.1, raising=False)
    text = pool_toml([("dicom6", VIP6, 104, [("pacs-a", A6, 1), ("pacs-b", B6, 1)])])
    h.pool.write_text(text.replace(f'vip = "{VIP6}"', f'vip = "{VIP6}"\npersistence = "client"\nclient_prefix = 56'))
    h.nl.neighbours.update({A6: MACS[A], B6: MACS[B]})
    daemon = h.daemon()
    key = (VIP6, 104, "tcp")

    def live_ref6():
        sid, _flags, half = h.dp.services[key]
        return h.dp.refs6.get((sid, half))

    async def scenario():
        async with running(daemon):
            await until(lambda: key in h.dp.services, what="the IPv6 service written")
            assert live_ref6() == (VIP6, 56)
            sid, _flags, half = h.dp.services[key]
            h.dp.refs6[(sid, half)] = (VIP6, 128)     # someone rewrote the live half's client prefix
            await until(lambda: live_ref6() == (VIP6, 56), what="the client prefix repaired")
            assert any("drifted" in r.getMessage() and "service_ids6" in r.getMessage() for r in caplog.records)

    asyncio.run(scenario())


def test_a_dual_stack_pool_adds_both_vips_resolves_both_families_and_removes_both(tmp_path, run_dir):
    """The same PACS behind an IPv4 and an IPv6 VIP: each family's VIP is
    added and removed, each backend's MAC comes from its own family's
    neighbour entry, and an IPv6 backend without one is solicited."""
    h = Harness(tmp_path)
    h.pool.write_text(pool_toml([("dicom", VIP1, 104, [("pacs-a", A, 1), ("pacs-b", B, 1)]),
                                 ("dicom6", VIP6, 104, [("pacs-a", A6, 1), ("pacs-b", B6, 1)])]))
    h.nl.neighbours[A6] = MACS[A]
    daemon = h.daemon()

    async def scenario():
        task = asyncio.create_task(daemon.run())
        await until(lambda: daemon.ready or task.done(), what="ready")
        assert not task.done()
        assert h.nl.vips(INDEX) == {VIP1, VIP6} and daemon.added_vips == {VIP1, VIP6}
        await until(lambda: B6 in h.nl.solicited, what="pacs-b's IPv6 address solicited")
        bes = status_backends(daemon.status())
        assert bes[("dicom6", "pacs-a")]["mac"] == MACS[A].hex(":") and bes[("dicom6", "pacs-a")]["forwarding"]
        assert not bes[("dicom6", "pacs-b")]["forwarding"]          # no MAC yet: not up
        h.nl.neighbours[B6] = MACS[B]                               # the solicitation is answered
        await until(lambda: status_backends(daemon.status())[("dicom6", "pacs-b")]["forwarding"],
                    what="pacs-b forwarding over IPv6")
        assert status_backends(daemon.status())[("dicom6", "pacs-b")]["mac"] == MACS[B].hex(":")
        assert sorted(daemon.status()["vips_added"]) == sorted([str(VIP1), str(VIP6)])
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(task, 5)

    asyncio.run(scenario())
    assert VIP1 not in h.nl.addresses[INDEX] and VIP6 not in h.nl.addresses[INDEX]
    assert {c[2] for c in h.nl.calls if c[0] == "del_vip"} == {VIP1, VIP6}


DUAL_STACK = [("dicom", VIP1, 104, [("pacs-a", A, 1), ("pacs-b", B, 1)]),
              ("dicom6", VIP6, 104, [("pacs-a", A6, 1), ("pacs-b", B6, 1)])]


def test_a_reload_that_removes_the_last_ipv6_service_is_applied_and_keeps_the_running_flows6(h):
    # flow_table_size6 unset: without IPv6 it would be 1024, but a restart
    # cannot resize flows6 while services6 holds the IPv6 services, so the
    # running table (compiled at flow_table_size, 262144) is kept.
    h.pool.write_text(pool_toml(DUAL_STACK))
    h.nl.neighbours.update({A6: MACS[A], B6: MACS[B]})
    daemon = h.daemon()

    async def scenario():
        async with running(daemon):
            await until(lambda: (VIP6, 104, "tcp") in h.dp.services, what="the IPv6 service written")
            h.pool.write_text(pool_toml(DUAL_STACK[:1]))
            result = await daemon.reload("test")
            assert result["result"] == "applied", result
            assert set(h.dp.services) == {DICOM}
            assert daemon.pool.settings.flow_table_size6 == h.dp.settings.flow_table_size6 == 262144
            # ... and adding it back fits the running table: no restart either.
            h.pool.write_text(pool_toml(DUAL_STACK))
            assert (await daemon.reload("test"))["result"] == "applied"

    asyncio.run(scenario())


def test_a_start_that_kept_the_pinned_flows6_reloads_against_that_size(h):
    # The dataplane compiled flows6 at its pinned size (pinning.adopt_flows6:
    # IPv6 services still programmed, the pool on disk has none): the daemon
    # compares later reloads with that size, so re-adding IPv6 needs no restart.
    def keeps_pinned_flows6(settings, **kwargs):
        return Harness.factory(h, dataclasses.replace(settings, flow_table_size6=262144), **kwargs)

    h.pool.write_text(pool_toml(DUAL_STACK[:1]))
    h.nl.neighbours.update({A6: MACS[A], B6: MACS[B]})
    h.factory = keeps_pinned_flows6
    daemon = h.daemon()

    async def scenario():
        async with running(daemon):
            assert daemon.pool.settings.flow_table_size6 == 262144
            h.pool.write_text(pool_toml(DUAL_STACK))
            result = await daemon.reload("test")
            assert result["result"] == "applied", result

    asyncio.run(scenario())
