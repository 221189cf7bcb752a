"""Announcing VIPs (xdplb/announce.py): the pure decision, the placement
fingerprint, the counter watch, and the daemon publishing decisions as routes
and a ready file, with fakes (no root, no kernel, no BIRD).
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sys
from ipaddress import IPv4Address
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for fakes.py
sys.path.insert(0, str(Path(__file__).resolve().parent))      # tests/unit, for the daemon harness

from test_daemon import A, B, C, IF, VIP1, VIP2, Harness, h, pool_toml, run_dir, running, until  # noqa: E402,F401 (fixtures)

from xdplb import control  # noqa: E402
from xdplb.announce import StillWatch, decide, placement_fingerprint, ready_value, record_path  # noqa: E402
from xdplb.config import PoolError, parse_pool  # noqa: E402
from xdplb.health_fsm import Health, State  # noqa: E402

TABLE = 100


def pool_with(extra: str, **kwargs):
    return pool_toml(**kwargs).replace("[xdplb]\n", "[xdplb]\n" + extra + "\n", 1)


POOL = parse_pool(pool_toml())
UP, DOWN, UNKNOWN = Health(State.UP), Health(State.DOWN), Health(State.UNKNOWN)


def every(state: Health) -> dict:
    return {(s.name, b.address): state for s in POOL.services for b in s.backends}


# ---- the decision ----------------------------------------------------------------

def test_every_vip_is_announced_when_serving_and_a_backend_is_up():
    got = decide(POOL, every(UP), serving=True, draining=False)
    assert set(got) == {VIP1, VIP2}
    assert all(d.announce for d in got.values())
    assert ready_value(got) == 0


@pytest.mark.parametrize("serving, draining, why", [(False, False, "not attached"), (True, True, "draining")])
def test_not_serving_or_draining_withdraws_every_vip(serving, draining, why):
    got = decide(POOL, every(UP), serving=serving, draining=draining)
    assert not any(d.announce for d in got.values())
    assert all(why in d.reason for d in got.values())
    assert ready_value(got) == 2


def test_a_backend_without_its_first_verdict_holds_back_its_vip_only():
    health = every(UP)
    health[("store", C)] = UNKNOWN           # store (VIP2) has pacs-a up, but pacs-c not yet judged
    got = decide(POOL, health, serving=True, draining=False)
    assert got[VIP1].announce
    assert not got[VIP2].announce and "first verdict of 1 backend" in got[VIP2].reason
    assert ready_value(got) == 1


def test_a_vip_with_no_healthy_backend_is_withdrawn_and_one_up_backend_brings_it_back():
    health = every(DOWN)
    got = decide(POOL, health, serving=True, draining=False)
    assert not got[VIP1].announce and got[VIP1].reason == "no healthy backend"
    health[("web", B)] = UP                  # one service of VIP1 has one backend up
    got = decide(POOL, health, serving=True, draining=False)
    assert got[VIP1].announce and not got[VIP2].announce


def test_a_drained_backend_still_counts_its_flows_need_the_node():
    text = pool_toml(services=[("dicom", VIP1, 104, [("pacs-a", A, 0), ("pacs-b", B, 1)])])
    pool = parse_pool(text)
    health = {("dicom", A): UP, ("dicom", B): DOWN}
    assert decide(pool, health, serving=True, draining=False)[VIP1].announce


# ---- the placement fingerprint ------------------------------------------------------

def _svc(pool, name="dicom"):
    return next(s for s in pool.services if s.name == name)


def test_fingerprint_ignores_order_and_names_and_sees_every_placement_input():
    base = [("dicom", VIP1, 104, [("pacs-a", A, 1), ("pacs-b", B, 2)])]
    p = parse_pool(pool_toml(services=base))
    fp = placement_fingerprint(p.settings, _svc(p))
    assert len(fp) == 12 and int(fp, 16) >= 0
    swapped = parse_pool(pool_toml(services=[("dicom", VIP1, 104, [("b", B, 2), ("a", A, 1)])]))
    assert placement_fingerprint(swapped.settings, _svc(swapped)) == fp
    changed = {
        "weight": parse_pool(pool_toml(services=[("dicom", VIP1, 104, [("pacs-a", A, 1), ("pacs-b", B, 1)])])),
        "backend": parse_pool(pool_toml(services=[("dicom", VIP1, 104, [("pacs-a", A, 1), ("pacs-c", C, 2)])])),
        "maglev_size": parse_pool(pool_toml(services=base, maglev_size=257)),
        "hash_seed": parse_pool(pool_with("hash_seed = 7", services=base)),
    }
    for what, other in changed.items():
        assert placement_fingerprint(other.settings, _svc(other)) != fp, what
    other = dataclasses.replace(p.settings, hash_seed=p.settings.hash_seed)
    assert placement_fingerprint(other, _svc(p)) == fp


# ---- the counter watch -----------------------------------------------------------------

def test_still_watch_needs_idle_seconds_without_a_change():
    w = StillWatch(2.0, now=0.0, count=10)
    assert not w.observe(1.0, 10)
    assert not w.observe(1.5, 11)            # moved: the idle time starts again
    assert not w.observe(3.4, 11)
    assert w.observe(3.5, 11)
    assert w.moved == 1


# ---- config ----------------------------------------------------------------------------

@pytest.mark.parametrize("line, message", [
    ("announce_table = 254", "kernel's main table"),
    ("announce_table = 255", "kernel's local table"),
    ("announce_table = 0", "out of range"),
    ('announce_table = "100"', "must be an integer"),
    ('ready_file = "xdplb.ready"', "must be an absolute file path"),
    ("stop_drain = -1", "out of range"),
    ("stop_drain_idle = 0", "out of range"),
])
def test_bad_announce_settings_are_refused_in_one_sentence(line, message):
    with pytest.raises(PoolError, match=message):
        parse_pool(pool_with(line))


def test_announce_settings_default_to_nothing():
    st = parse_pool(pool_toml()).settings
    assert (st.announce_table, st.ready_file, st.stop_drain) == (None, "", 0.0)
    st = parse_pool(pool_with('announce_table = 4000\nready_file = "/run/x.ready"\nstop_drain = 20')).settings
    assert (st.announce_table, st.ready_file, st.stop_drain) == (4000, "/run/x.ready", 20.0)


# ---- the daemon publishing decisions -------------------------------------------------------

def announcing(h: Harness, tmp_path: Path, extra: str = "", **kwargs) -> Path:
    ready = tmp_path / "ready"
    h.pool.write_text(pool_with(f'announce_table = {TABLE}\nready_file = "{ready}"\n{extra}', **kwargs))
    return ready


def routes(h) -> set:
    return set(h.nl.routes.get(TABLE, ()))


def test_ready_node_announces_every_servable_vip_and_a_stop_withdraws_them(h, tmp_path):
    ready = announcing(h, tmp_path)
    daemon = h.daemon()

    async def scenario():
        async with running(daemon):
            await until(lambda: routes(h) == {VIP1, VIP2}, what="both VIPs announced")
            await until(lambda: ready.exists() and ready.read_text() == "0\n", what="ready file 0")
            st = daemon.status()["announce"]
            assert st["table"] == TABLE and st["vips"][str(VIP1)]["announced"] is True
            assert record_path(control.run_dir(), IF).read_text() == f"{TABLE}\n"
            assert h.dp.attached is not None
        # Withdrawn before the program was detached.
        calls = [c[0] for c in h.nl.calls]
        assert "withdraw" in calls
        assert routes(h) == set()
        assert ready.read_text() == "2\n"
        assert not record_path(control.run_dir(), IF).exists()

    asyncio.run(scenario())


def test_no_announce_table_touches_no_route(h, tmp_path):
    daemon = h.daemon()

    async def scenario():
        async with running(daemon):
            await until(lambda: daemon.status()["announce"]["vips"], what="a decision")
        assert not [c for c in h.nl.calls if c[0] in ("announce", "withdraw")]

    asyncio.run(scenario())


def test_a_vip_whose_backends_all_fail_is_withdrawn_and_returns_after_rise(h, tmp_path):
    ready = announcing(h, tmp_path, rise=3, fall=2)
    daemon = h.daemon()

    async def scenario():
        async with running(daemon):
            await until(lambda: routes(h) == {VIP1, VIP2}, what="both VIPs announced")
            h.prober.set(A, 11112, ok=False)
            h.prober.set(C, 11112, ok=False)   # store is VIP2's only service
            await until(lambda: routes(h) == {VIP1}, what="VIP2 withdrawn")
            assert ready.read_text() == "1\n"
            assert daemon.status()["announce"]["vips"][str(VIP2)]["reason"] == "no healthy backend"
            h.prober.set(C, 11112, ok=True)
            before = h.prober.counts[(str(C), 11112)]
            await until(lambda: routes(h) == {VIP1, VIP2}, what="VIP2 announced again")
            # Not on the first good probe: only once rise (3) good probes made it up.
            assert h.prober.counts[(str(C), 11112)] - before >= 3
            assert ready.read_text() == "0\n"

    asyncio.run(scenario())


def test_drain_node_withdraws_waits_for_still_counters_and_undrain_announces_again(h, tmp_path):
    announcing(h, tmp_path)
    daemon = h.daemon()

    async def scenario():
        async with running(daemon):
            await until(lambda: routes(h) == {VIP1, VIP2}, what="both VIPs announced")

            async def traffic():          # flows still on this node for a moment after the withdrawal
                for _ in range(6):
                    h.dp.action_counts["tx"] += 10
                    await asyncio.sleep(0.1)

            pump = asyncio.create_task(traffic())
            reply = await daemon.handle_request({"cmd": "drain-node", "idle": 0.3, "timeout": 10})
            await pump
            assert reply["ok"] and reply["still"] is True
            assert reply["withdrawn"] == [str(VIP1), str(VIP2)]
            assert reply["forwarded_during"] > 0
            assert 0.55 <= reply["waited"] < 10  # the traffic lasted 0.6 s, then 0.3 s still
            assert routes(h) == set() and daemon.status()["announce"]["node_draining"] is True
            # Health changes while drained do not announce anything.
            h.prober.set(B, 104, ok=False)
            await asyncio.sleep(0.3)
            assert routes(h) == set()
            assert (await daemon.handle_request({"cmd": "undrain-node"}))["changed"] is True
            await until(lambda: routes(h) == {VIP1, VIP2}, what="announced again")

    asyncio.run(scenario())


def test_drain_node_gives_up_at_the_timeout_while_traffic_keeps_flowing(h, tmp_path):
    announcing(h, tmp_path)
    daemon = h.daemon()

    async def scenario():
        async with running(daemon):
            stop = asyncio.Event()

            async def traffic():
                while not stop.is_set():
                    h.dp.action_counts["redirect"] += 1
                    await asyncio.sleep(0.05)

            pump = asyncio.create_task(traffic())
            reply = await daemon.handle_request({"cmd": "drain-node", "idle": 0.5, "timeout": 1.0})
            stop.set()
            await pump
            assert reply["still"] is False and 1.0 <= reply["waited"] < 2.0

    asyncio.run(scenario())


@pytest.mark.parametrize("message", [{"cmd": "drain-node", "idle": "x"}, {"cmd": "drain-node", "timeout": -1}])
def test_a_bad_drain_node_request_gets_one_sentence_and_changes_nothing(h, tmp_path, message):
    announcing(h, tmp_path)
    daemon = h.daemon()

    async def scenario():
        async with running(daemon):
            await until(lambda: routes(h) == {VIP1, VIP2}, what="both VIPs announced")
            reply = await daemon.handle_request(message)
            assert "error" in reply and "drain-node" in reply["error"]
            assert daemon.node_draining is False and routes(h) == {VIP1, VIP2}

    asyncio.run(scenario())


def test_sigterm_with_stop_drain_withdraws_and_waits_before_detaching(h, tmp_path):
    announcing(h, tmp_path, "stop_drain = 5\nstop_drain_idle = 0.5")
    daemon = h.daemon()
    seen = {}

    async def scenario():
        task = asyncio.create_task(daemon.run())
        await until(lambda: routes(h) == {VIP1, VIP2}, what="both VIPs announced")
        os.kill(os.getpid(), signal.SIGTERM)
        await until(lambda: daemon.node_draining, what="draining")
        await until(lambda: routes(h) == set(), what="withdrawn")
        seen["attached while withdrawn"] = h.dp.attached is not None
        assert await asyncio.wait_for(task, 10) == 0

    asyncio.run(scenario())
    assert seen["attached while withdrawn"] is True
    assert h.dp.attached is None


def test_sigusr1_leaves_the_routes_and_the_ready_file(h, tmp_path):
    ready = announcing(h, tmp_path, "stop_drain = 5")
    daemon = h.daemon()

    async def scenario():
        task = asyncio.create_task(daemon.run())
        await until(lambda: routes(h) == {VIP1, VIP2} and ready.exists(), what="both VIPs announced")
        os.kill(os.getpid(), signal.SIGUSR1)
        return await asyncio.wait_for(task, 5)

    assert asyncio.run(scenario()) == 75
    assert routes(h) == {VIP1, VIP2} and ready.read_text() == "0\n"
    assert not [c for c in h.nl.calls if c[0] == "withdraw"]


def test_a_fresh_start_withdraws_routes_a_dead_instance_left(h, tmp_path):
    ready = announcing(h, tmp_path)
    h.nl.routes[TABLE] = {VIP1, IPv4Address("10.10.0.199")}
    h.prober.default = False               # nothing healthy: nothing may be announced
    daemon = h.daemon()

    async def scenario():
        async with running(daemon):
            await until(lambda: daemon.status()["announce"]["vips"], what="a decision")
            assert routes(h) == set()
            assert ready.read_text() == "2\n"

    asyncio.run(scenario())


def test_a_hitless_restart_keeps_the_routes_it_adopts(tmp_path, run_dir):
    import xdplb.daemon
    h = Harness(tmp_path, prog_id=42, prog_name=xdplb.daemon.PROG_NAME)
    announcing(h, tmp_path)
    h.nl.routes[TABLE] = {VIP1, VIP2}
    daemon = h.daemon()

    async def scenario():
        task = asyncio.create_task(daemon.run())
        await until(lambda: daemon.ready or task.done(), what="ready")
        assert not [c for c in h.nl.calls if c[0] == "withdraw"]
        assert routes(h) == {VIP1, VIP2}
        daemon.stop()
        await asyncio.wait_for(task, 5)

    asyncio.run(scenario())


def test_a_failed_route_change_is_retried(h, tmp_path):
    announcing(h, tmp_path)
    h.nl.fail("announce", times=2)
    daemon = h.daemon()

    async def scenario():
        async with running(daemon):
            await until(lambda: routes(h) == {VIP1, VIP2}, what="announced after the retries")
            assert daemon.announcer.errors_total >= 1 and daemon.announcer.error is None

    asyncio.run(scenario())


def test_a_reload_to_another_table_moves_the_routes(h, tmp_path):
    announcing(h, tmp_path)
    daemon = h.daemon()

    async def scenario():
        async with running(daemon):
            await until(lambda: routes(h) == {VIP1, VIP2}, what="both VIPs announced")
            h.pool.write_text(h.pool.read_text().replace(f"announce_table = {TABLE}", "announce_table = 200"))
            assert (await daemon.reload("test"))["result"] == "applied"
            await until(lambda: h.nl.routes.get(200) == {VIP1, VIP2}, what="announced in table 200")
            assert routes(h) == set()

    asyncio.run(scenario())


def test_stop_drain_that_does_not_fit_the_units_stop_timeout_is_warned_about():
    from xdplb.config import DETACH_SECONDS, UNIT_TIMEOUT_STOP, warnings

    unit = (Path(__file__).resolve().parents[2] / "tools" / "systemd" / "xdplb@.service").read_text()
    assert f"\nTimeoutStopSec={UNIT_TIMEOUT_STOP:g}\n" in unit   # the number the warning judges by
    fits = parse_pool(pool_with(f"stop_drain = {UNIT_TIMEOUT_STOP - DETACH_SECONDS:g}"))
    assert not [w for w in warnings(fits) if "stop_drain" in w]
    (warning,) = [w for w in warnings(parse_pool(pool_with("stop_drain = 60"))) if "stop_drain" in w]
    assert "TimeoutStopSec=65" in warning


# ---- the command line ---------------------------------------------------------------------

def test_drain_node_and_undrain_node_commands_through_the_control_socket(h, tmp_path):
    from click.testing import CliRunner

    from xdplb.cli import cli

    announcing(h, tmp_path)
    daemon = h.daemon()

    async def scenario():
        async with running(daemon):
            await until(lambda: routes(h) == {VIP1, VIP2}, what="both VIPs announced")
            drained = await asyncio.to_thread(CliRunner().invoke, cli,
                                              ["drain-node", "-i", IF, "--idle", "0.3", "--timeout", "5"])
            assert drained.exit_code == 0, drained.output
            assert drained.output.startswith(f"drained {IF}: withdrew {VIP1}, {VIP2}; no packet forwarded for 0.3s")
            assert routes(h) == set()
            back = await asyncio.to_thread(CliRunner().invoke, cli, ["undrain-node", "-i", IF])
            assert back.exit_code == 0 and "announced again" in back.output, back.output
            await until(lambda: routes(h) == {VIP1, VIP2}, what="announced again")

    asyncio.run(scenario())


def test_detach_removes_the_routes_a_dead_instance_left(h, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import xdplb.netlink
    from xdplb.cli import cli

    announcing(h, tmp_path)
    daemon = h.daemon()

    async def scenario():
        task = asyncio.create_task(daemon.run())
        await until(lambda: routes(h) == {VIP1, VIP2}, what="both VIPs announced")
        os.kill(os.getpid(), signal.SIGUSR1)    # leaves everything, as a crash would
        return await asyncio.wait_for(task, 5)

    assert asyncio.run(scenario()) == 75
    h.nl.routes[TABLE].add(IPv4Address("10.10.0.150"))
    monkeypatch.setattr(xdplb.netlink, "Netlink", lambda: h.nl)
    result = CliRunner().invoke(cli, ["detach", IF])
    assert result.exit_code == 0, result.output
    assert f"VIP route {VIP1} (table {TABLE})" in result.output
    assert routes(h) == set()
    assert not record_path(control.run_dir(), IF).exists()


def test_status_shows_each_vips_decision(h, tmp_path):
    from xdplb.cli import _render_status

    ready = announcing(h, tmp_path)
    h.prober.set(A, 11112, ok=False)
    h.prober.set(C, 11112, ok=False)
    daemon = h.daemon()

    async def scenario():
        async with running(daemon):
            await until(lambda: routes(h) == {VIP1}, what="VIP1 announced")
            return _render_status(daemon.status())

    text = asyncio.run(scenario())
    assert f"announce (routes in table {TABLE}, ready file {ready})\n" in text
    assert f"  {VIP1} announced: 3 backend(s) up\n" in text
    assert f"  {VIP2} withdrawn: no healthy backend\n" in text


def test_undrain_node_is_refused_while_stopping(h, tmp_path):
    announcing(h, tmp_path, "stop_drain = 5\nstop_drain_idle = 2")
    daemon = h.daemon()

    async def scenario():
        task = asyncio.create_task(daemon.run())
        await until(lambda: routes(h) == {VIP1, VIP2}, what="both VIPs announced")
        daemon.stop()
        await until(lambda: daemon.node_draining, what="the stop drain")
        reply = await daemon.handle_request({"cmd": "undrain-node"})
        assert "stopping" in reply["error"]
        await asyncio.sleep(0.3)
        assert routes(h) == set()
        await asyncio.wait_for(task, 10)

    asyncio.run(scenario())


def test_check_describes_where_the_decisions_go():
    from xdplb.config import describe

    assert "announces" not in describe(parse_pool(pool_toml()))
    text = describe(parse_pool(pool_with('announce_table = 100\nready_file = "/run/r"\nstop_drain = 20')))
    assert ("  announces servable VIPs: routes in kernel table 100 (proto 120), ready file /run/r; SIGTERM "
            "withdraws and waits up to 20s for 2s of still counters\n") in text


def test_drain_node_without_announcements_says_nothing_was_withdrawn(h):
    from click.testing import CliRunner

    from xdplb.cli import cli

    daemon = h.daemon()

    async def scenario():
        async with running(daemon):
            return await asyncio.to_thread(CliRunner().invoke, cli,
                                           ["drain-node", "-i", IF, "--idle", "0.2", "--timeout", "5"])

    result = asyncio.run(scenario())
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"drained {IF}: withdrew no VIP (none was announced); no packet forwarded")
