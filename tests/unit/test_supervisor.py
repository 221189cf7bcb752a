"""The supervisor restarts crashed tasks with a growing pause; the
reconciler's drift check compares read-back maps with the applied state."""
from __future__ import annotations

import asyncio
import ipaddress
import logging

import xdplb.supervisor
from xdplb import plan
from xdplb.dataplane import KernelState
from xdplb.reconciler import drift, expected_kernel
from xdplb.supervisor import Supervisor


def test_a_crashing_task_is_logged_and_restarted_with_a_doubling_pause(monkeypatch, caplog):
    monkeypatch.setattr(xdplb.supervisor, "RESTART_DELAY", 0.01)
    runs = []

    async def flaky():
        runs.append(asyncio.get_running_loop().time())
        if len(runs) < 4:
            raise RuntimeError(f"crash {len(runs)}")
        await asyncio.sleep(3600)

    async def scenario():
        sup = Supervisor()
        sup.start("flaky", flaky)
        sup.start("flaky", flaky)           # already running: not a second copy
        while len(runs) < 4:
            await asyncio.sleep(0.005)
        assert sup.running("flaky") and sup.restarts["flaky"] == 3
        await sup.stop_all()
        assert not sup.running("flaky") and sup.names() == []

    with caplog.at_level(logging.ERROR, logger="xdplb"):
        asyncio.run(scenario())
    assert [r.getMessage() for r in caplog.records] == [
        f"task flaky crashed; restarting it in {delay}s" for delay in ("0.01", "0.02", "0.04")]
    assert all(r.exc_info for r in caplog.records)   # with the traceback


def test_drift_names_what_differs_and_nothing_when_the_maps_agree():
    vip, a = ipaddress.IPv4Address("10.0.0.100"), ipaddress.IPv4Address("10.0.0.11")
    desired = plan.Desired((plan.ServiceState("s", vip, 80, "tcp", "flow",
                                              (plan.BackendState("a", a, 1, b"\x02" * 6, True),)),),
                           b"\x02\0\0\0\0\1", 0, 7, 4, 8)
    applied = plan.plan(plan.Applied(), desired).applied
    services, backends, tables, vips, config = expected_kernel(applied)
    same = KernelState(dict(services), dict(backends), dict(tables), set(vips), config)
    assert drift(same, applied) == []
    (bid,) = backends
    gone = KernelState(dict(services), {}, dict(tables), set(vips), config)
    assert drift(gone, applied) == ["backends"]
    flipped = KernelState({k: (i, f, 1 - h) for k, (i, f, h) in services.items()}, dict(backends),
                          dict(tables), set(vips), None)
    assert drift(flipped, applied) == ["services", "lb_config"]
