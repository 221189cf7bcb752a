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


def test_stop_all_cancels_again_a_task_that_lost_its_cancellation_and_says_so(monkeypatch, caplog):
    # A task that swallows its first cancellation, as a coroutine inside
    # Python 3.11's asyncio.wait_for does when the cancel lands as the awaited
    # operation completes (CPython gh-86296): stop_all waited for it forever.
    monkeypatch.setattr(xdplb.supervisor, "STOP_GRACE", 0.05, raising=False)
    cancels = []

    async def deaf_once():
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancels.append(asyncio.get_running_loop().time())
                if len(cancels) > 1:
                    raise      # the second cancel is heard

    async def quiet():
        await asyncio.sleep(3600)

    async def scenario():
        sup = Supervisor()
        sup.start(("probe", "tcp://10.0.0.1:104"), deaf_once)
        sup.start("neighbour refresh", quiet)
        await asyncio.sleep(0.01)
        await asyncio.wait_for(sup.stop_all(), 5)   # without the second cancel: TimeoutError
        assert sup.names() == []

    with caplog.at_level(logging.WARNING, logger="xdplb"):
        asyncio.run(scenario())
    assert len(cancels) == 2
    assert [r.getMessage() for r in caplog.records] == [
        "task(s) probe tcp://10.0.0.1:104 still running 0.05s after being cancelled; cancelling again"]


def test_drift_names_what_differs_and_nothing_when_the_maps_agree():
    vip, a = ipaddress.IPv4Address("10.0.0.100"), ipaddress.IPv4Address("10.0.0.11")
    desired = plan.Desired((plan.ServiceState("s", vip, 80, "tcp", "flow",
                                              (plan.BackendState("a", a, 1, b"\x02" * 6, True),)),),
                           b"\x02\0\0\0\0\1", 0, 7, 4, 8)
    applied = plan.plan(plan.Applied(), desired).applied
    services, backends, tables, vips, config, refs6 = expected_kernel(applied)
    assert refs6 == {}                               # an IPv4 service has no service_ids6 entry
    same = KernelState(dict(services), dict(backends), dict(tables), set(vips), config)
    assert drift(same, applied) == []
    (bid,) = backends
    gone = KernelState(dict(services), {}, dict(tables), set(vips), config)
    assert drift(gone, applied) == ["backends"]
    flipped = KernelState({k: (i, f, 1 - h) for k, (i, f, h) in services.items()}, dict(backends),
                          dict(tables), set(vips), None)
    assert drift(flipped, applied) == ["services", "lb_config"]


def test_drift_compares_an_ipv6_services_vip_and_client_prefix_in_its_live_half():
    # service_ids6 holds what the data plane reads for an IPv6 service besides
    # its services6 entry: the VIP it checks and the client prefix it hashes.
    vip, a = ipaddress.IPv6Address("fd00::100"), ipaddress.IPv6Address("fd00::11")
    desired = plan.Desired((plan.ServiceState("s6", vip, 104, "tcp", "client",
                                              (plan.BackendState("a", a, 1, b"\x02" * 6, True),),
                                              client_prefix=56),),
                           b"\x02\0\0\0\0\1", 0, 7, 4, 8)
    applied = plan.plan(plan.Applied(), desired).applied
    services, backends, tables, vips, config, refs6 = expected_kernel(applied)
    (sid,) = refs6
    assert refs6 == {sid: (vip, 56)}

    def kernel(refs):
        return KernelState(dict(services), dict(backends), dict(tables), set(vips), config, refs6=refs)

    assert drift(kernel({sid: (vip, 56)}), applied) == []
    assert drift(kernel({sid: (vip, 128)}), applied) == ["IPv6 VIPs and client prefixes (service_ids6)"]
    assert drift(kernel({sid: (ipaddress.IPv6Address("::"), 56)}), applied) == [
        "IPv6 VIPs and client prefixes (service_ids6)"]
    assert drift(kernel({}), applied) == ["IPv6 VIPs and client prefixes (service_ids6)"]
    # An adopting controller takes the prefix from the kernel, so what it
    # adopted agrees with the maps it adopted.
    adopted = plan.adopt(kernel({sid: (vip, 48)}), {(vip, 104, "tcp"): "s6"})
    assert adopted.services["s6"].client_prefix == 48
    assert drift(kernel({sid: (vip, 48)}), adopted) == []
