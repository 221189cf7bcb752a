"""The daemon, driven end to end with fakes: no root, no bcc, no network.

Each test runs Daemon.run() in its own asyncio loop (asyncio.run) with a
FakeDataplane, a FakeNetlink and a FakeProber from tests/fakes.py, pool files
in tmp_path and the control socket in a private directory (XDPLB_RUN_DIR).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import stat
import sys
import tempfile
import time
from ipaddress import IPv4Address
from pathlib import Path

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


def pool_toml(services=DEFAULT_SERVICES, maglev_size: int = SIZE, rise: int = 2, fall: int = 2) -> str:
    lines = ["[xdplb]", 'metrics = ""', f"maglev_size = {maglev_size}", "max_services = 8", "max_backends = 32", ""]
    for name, vip, port, backends in services:
        lines += ["[[service]]", f'name = "{name}"', f'vip = "{vip}"', f"port = {port}", "",
                  "  [service.health]", "  interval = 0.05", "  timeout = 0.02", f"  rise = {rise}", f"  fall = {fall}", ""]
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
            assert live(h, DICOM) == {A, C}
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
            assert live(h, DICOM) == {A, B, C}
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
     'address = "10.10.0.312" is not a valid IPv4 address'),
    (lambda text: text.replace("maglev_size = 251", "maglev_size = 509"),
     "changing maglev_size 251 -> 509 needs a restart"),
], ids=["toml-syntax", "invalid-ip", "maglev-size"])
def test_rejected_reload_changes_nothing(h, caplog, breakage, expected):
    caplog.set_level(logging.INFO, logger="xdplb")
    daemon = h.daemon()

    async def scenario():
        async with running(daemon):
            before, pool = snapshot(h.dp), daemon.pool
            h.pool.write_text(breakage(pool_toml()))
            result = daemon.reload("test")
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
            result = daemon.reload("test")
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
            assert daemon.reload("test")["result"] == "applied"
            assert len(built) == 1
            assert h.dp.live_table(DICOM) != dicom_table

    asyncio.run(scenario())


def test_reload_removing_a_service_and_its_vip(h):
    daemon = h.daemon()

    async def scenario():
        async with running(daemon):
            h.pool.write_text(pool_toml(DEFAULT_SERVICES[:2]))
            assert daemon.reload("test")["result"] == "applied"
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


def test_leftover_xdplb_program_without_pinned_maps_is_refused_before_compiling(tmp_path, run_dir):
    h = Harness(tmp_path, prog_id=42, prog_name=xdplb.daemon.PROG_NAME)
    daemon = h.daemon()
    with pytest.raises(AttachError, match="no maps are pinned"):
        asyncio.run(asyncio.wait_for(daemon.run(), 5))  # a run that starts would hang: fail instead
    assert h.made == []
    assert not any(c[0] == "add_vip" for c in h.nl.calls)
    assert not control.socket_path(IF).exists()


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
