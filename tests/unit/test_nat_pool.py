"""forwarding = "nat" in the pool, the desired state, the planner and the
daemon's next-hop resolution: pure logic and fakes, no root."""
from __future__ import annotations

import asyncio
import sys
from ipaddress import IPv4Address
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for fakes.py

from fakes import FakeDataplane  # noqa: E402

from xdplb import plan  # noqa: E402
from xdplb.config import PoolError, describe, parse_pool  # noqa: E402
from xdplb.desired import desired_state  # noqa: E402
from xdplb.health_fsm import Health, State  # noqa: E402
from xdplb.structs import F_SVC_NAT  # noqa: E402

NAT_POOL = """
[[service]]
name = "pacs-dicom"
vip = "10.20.0.100"
port = 104
forwarding = "nat"
  [[service.backend]]
  name = "orthanc1"
  address = "10.30.0.11"
  port = 4242
  [[service.backend]]
  name = "orthanc2"
  address = "10.30.0.12"
"""

DSR_SERVICE = """
[[service]]
name = "viewer"
vip = "10.20.0.100"
port = 80
  [[service.backend]]
  name = "web1"
  address = "{address}"
"""


def problems(text: str) -> str:
    with pytest.raises(PoolError) as info:
        parse_pool(text, "p.toml")
    return "\n".join(info.value.problems)


def test_nat_service_backend_ports_and_health_on_each_backends_port():
    pool = parse_pool(NAT_POOL)
    svc = pool.services[0]
    assert svc.forwarding == "nat"
    assert [svc.backend_port(b) for b in svc.backends] == [4242, 104]
    assert [svc.health_of(b).port for b in svc.backends] == [4242, 104]


def test_health_port_when_set_wins_over_the_backends_port():
    pool = parse_pool(NAT_POOL.replace('forwarding = "nat"', 'forwarding = "nat"\n  [service.health]\n  port = 8042'))
    svc = pool.services[0]
    assert [svc.health_of(b).port for b in svc.backends] == [8042, 8042]


def test_dsr_is_the_default_and_keeps_the_service_port_for_health():
    pool = parse_pool(NAT_POOL.replace('forwarding = "nat"\n', "").replace("  port = 4242\n", ""))
    svc = pool.services[0]
    assert svc.forwarding == "dsr"
    assert [svc.health_of(b).port for b in svc.backends] == [104, 104]


def test_backend_port_in_a_dsr_service_is_refused():
    text = problems(NAT_POOL.replace('forwarding = "nat"\n', ""))
    assert 'backend[0] "orthanc1" .port = 4242 needs forwarding = "nat"' in text


def test_unknown_forwarding_mode_is_refused():
    assert 'forwarding = "masquerade"' in problems(NAT_POOL.replace('"nat"', '"masquerade"'))


def test_nat_on_an_ipv6_service_is_refused_in_one_sentence():
    """NAT is IPv4 only: an IPv6 VIP with forwarding = "nat" is refused, naming the key and the VIP."""
    text = problems(NAT_POOL.replace('"10.20.0.100"', '"2001:db8::100"')
                    .replace('"10.30.0.11"', '"2001:db8:30::11"').replace('"10.30.0.12"', '"2001:db8:30::12"'))
    assert 'forwarding = "nat" is IPv4 only in this version, and the VIP "2001:db8::100" is IPv6' in text


def test_a_pacs_behind_both_dsr_and_nat_is_refused_with_why():
    text = problems(NAT_POOL + DSR_SERVICE.format(address="10.30.0.12"))
    assert "a PACS must be behind DSR or NAT services, not both" in text
    assert "dropped there as martians" in text


def test_a_dsr_service_on_other_backends_beside_nat_is_fine():
    parse_pool(NAT_POOL + DSR_SERVICE.format(address="10.40.0.5"))


def test_one_backend_port_behind_two_nat_services_is_refused():
    second = NAT_POOL.replace('"pacs-dicom"', '"pacs-2"').replace("10.20.0.100", "10.20.0.101")
    text = problems(NAT_POOL + second)
    assert "10.30.0.11:4242/tcp is behind NAT services" in text


def test_check_states_the_routing_requirement_once_when_nat_is_present():
    text = describe(parse_pool(NAT_POOL))
    assert text.count("to go through this gateway") == 1
    assert 'backend "orthanc1" 10.30.0.11:4242' in text
    dsr = describe(parse_pool(DSR_SERVICE.format(address="10.40.0.5")))
    assert "to go through this gateway" not in dsr


# ---- desired state and plan ----------------------------------------------------

MAC = bytes.fromhex("02000a1e000b")


def desired(text: str = NAT_POOL, healthy: bool = True):
    pool = parse_pool(text)
    health = {(s.name, b.address): Health(State.UP if healthy else State.DOWN)
              for s in pool.services for b in s.backends}
    macs = {b.address: MAC for s in pool.services for b in s.backends}
    return desired_state(pool, health, macs, bytes(6))


def test_desired_state_carries_the_nat_flag_and_backend_ports():
    (svc,) = desired().services
    assert svc.flags & F_SVC_NAT
    assert [b.port for b in svc.backends] == [4242, 104]


def test_plan_writes_reverse_translations_before_the_backends_and_their_ports():
    result = plan.plan(plan.Applied(), desired())
    kinds = [type(op).__name__ for op in result.ops]
    assert kinds.index("PutNatReverse") < kinds.index("PutBackend")
    reverse = {(str(op.address), op.port, op.protocol): (str(op.vip), op.vport)
               for op in result.ops if isinstance(op, plan.PutNatReverse)}
    assert reverse == {("10.30.0.11", 4242, "tcp"): ("10.20.0.100", 104),
                       ("10.30.0.12", 104, "tcp"): ("10.20.0.100", 104)}
    assert sorted(op.port for op in result.ops if isinstance(op, plan.PutBackend)) == [104, 4242]


def test_reverse_translation_of_a_removed_backend_stays_for_its_grace_then_goes():
    first = plan.plan(plan.Applied(), desired(), now_ns=0)
    without = NAT_POOL.replace('  [[service.backend]]\n  name = "orthanc2"\n  address = "10.30.0.12"\n', "")
    gone = plan.replace(desired(without), down_grace_ns=1000)
    second = plan.plan(first.applied, gone, now_ns=10)
    assert not any(isinstance(op, plan.DelNatReverse) for op in second.ops)
    assert (IPv4Address("10.30.0.12"), 104, "tcp") in second.applied.nat_reverse
    third = plan.plan(second.applied, gone, now_ns=2000)
    kinds = [type(op).__name__ for op in third.ops]
    assert kinds.index("ClearBackend") < kinds.index("DelNatReverse")
    assert (IPv4Address("10.30.0.12"), 104, "tcp") not in third.applied.nat_reverse


def test_a_reload_of_the_same_pool_writes_nothing():
    first = plan.plan(plan.Applied(), desired())
    assert plan.plan(first.applied, desired()).ops == ()


def test_adopted_maps_give_the_same_nat_state_so_a_restart_writes_nothing():
    dp = FakeDataplane(parse_pool(NAT_POOL).settings)
    first = plan.plan(plan.Applied(), desired())
    dp.apply(first.ops)
    want = desired()
    adopted = plan.adopt(dp.read_state(), {s.key: s.name for s in want.services})
    again = plan.plan(adopted, want)
    assert not [op for op in again.ops if isinstance(op, (plan.PutNatReverse, plan.DelNatReverse, plan.PutBackend))]
    assert again.applied.nat_reverse == first.applied.nat_reverse


def test_changing_a_backend_port_rewrites_its_target_and_its_reverse_translation():
    first = plan.plan(plan.Applied(), desired())
    moved = plan.plan(first.applied, desired(NAT_POOL.replace("port = 4242", "port = 4243")), now_ns=5)
    puts = [op for op in moved.ops if isinstance(op, plan.PutBackend)]
    assert [op.port for op in puts] == [4243]
    assert [(op.port, type(op).__name__) for op in moved.ops
            if isinstance(op, (plan.PutNatReverse, plan.DelNatReverse))] == [(4243, "PutNatReverse"),
                                                                              (4242, "DelNatReverse")]


# ---- the daemon keeps the next hops resolved -----------------------------------

def test_daemon_solicits_unresolved_route_gateways_only_for_a_nat_pool(tmp_path, monkeypatch):
    import tempfile

    from test_daemon import Harness, running

    monkeypatch.setenv("XDPLB_RUN_DIR", tempfile.mkdtemp(prefix="xdplb-t", dir="/tmp"))
    router, resolved = IPv4Address("10.10.0.1"), IPv4Address("10.10.0.2")
    for nat in (False, True):
        h = Harness(tmp_path)
        text = h.pool.read_text()
        if nat:
            text = text.replace('port = 104\n', 'port = 104\nforwarding = "nat"\n', 1)
            text = text.replace('name = "web"', 'name = "web"\nforwarding = "nat"').replace(
                'name = "store"', 'name = "store"\nforwarding = "nat"')
        h.pool.write_text(text)
        h.nl.gateways = {router, resolved}
        h.nl.neighbours[resolved] = bytes.fromhex("020000000002")
        daemon = h.daemon()

        async def scenario():
            async with running(daemon):
                pass

        asyncio.run(scenario())
        assert (router in h.nl.solicited) is nat
        assert resolved not in h.nl.solicited


def test_scheduler_probes_each_nat_backend_on_its_own_port():
    from xdplb.scheduler import ProbeScheduler

    class Supervisor:
        def __init__(self):
            self.started = []

        def start(self, name, factory):
            self.started.append(name)

        def stop(self, name):
            pass

    supervisor = Supervisor()
    scheduler = ProbeScheduler(probe=None, telemetry=None, supervisor=supervisor, on_change=lambda: None)
    scheduler.sync(parse_pool(NAT_POOL))
    assert sorted(name[1] for name in supervisor.started) == ["tcp://10.30.0.11:4242", "tcp://10.30.0.12:104"]


def test_nat_counters_are_exported_by_outcome_zeros_included():
    import dataclasses

    from test_exporter import make_source, registry_for, value

    src = make_source()
    read = src.dp.read_stats
    src.dp.read_stats = lambda s, b: dataclasses.replace(read(s, b), nat={"reply_tx": 12, "no_neigh": 3})
    reg = registry_for(src)
    assert value(reg, "xdplb_nat_packets_total", outcome="reply_tx") == 12
    assert value(reg, "xdplb_nat_packets_total", outcome="no_neigh") == 3
    assert value(reg, "xdplb_nat_packets_total", outcome="request") == 0


def test_nat_with_tls_termination_is_refused(tmp_path):
    from certs import make_cert

    pem = make_cert(tmp_path, "pacs")
    text = NAT_POOL.replace('forwarding = "nat"\n', 'forwarding = "nat"\n  [service.tls]\n  certificate = "'
                            + str(pem) + '"\n  backend_protocol = "tcp"\n  backend_port = 4242\n')
    assert 'forwarding = "nat" cannot go with [service.tls]' in problems(text)


# ---- IP forwarding: required, checked, never set ------------------------------

def _nat_text(text: str) -> str:
    """test_daemon's pool with every service NAT (a PACS is behind DSR or NAT, not both)."""
    for name in ("dicom", "web", "store"):
        text = text.replace(f'name = "{name}"', f'name = "{name}"\nforwarding = "nat"')
    return text


def test_check_names_the_forwarding_sysctl():
    assert "net.ipv4.ip_forward = 1" in describe(parse_pool(NAT_POOL))


def test_attach_with_a_nat_service_is_refused_while_forwarding_is_off(tmp_path, monkeypatch):
    import tempfile

    from test_daemon import Harness, running

    from xdplb.daemon import AttachError

    monkeypatch.setenv("XDPLB_RUN_DIR", tempfile.mkdtemp(prefix="xdplb-t", dir="/tmp"))
    h = Harness(tmp_path)
    h.pool.write_text(_nat_text(h.pool.read_text()))
    h.nl.forwarding = False
    with pytest.raises(AttachError, match=r"^NAT service\(s\) dicom, web, store need IP forwarding, but net.ipv4.ip_forward is "
                                          r"0 .*`sysctl -w net.ipv4.ip_forward=1`"):
        asyncio.run(asyncio.wait_for(h.daemon().run(), 5))
    assert h.made == [], "refused before compiling: nothing changed"
    assert not any(c[0] == "add_vip" for c in h.nl.calls)

    # The same host without NAT services attaches; forwarding on, the NAT pool attaches.
    for text, forwarding in ((h.pool.read_text().replace('forwarding = "nat"\n', ""), False),
                             (h.pool.read_text(), True)):
        ok = Harness(tmp_path)
        ok.pool.write_text(text)
        ok.nl.forwarding = forwarding

        async def scenario():
            async with running(ok.daemon()):
                assert ok.dp.attached is not None

        asyncio.run(scenario())


def test_reload_to_a_nat_service_is_rejected_while_forwarding_is_off(tmp_path, monkeypatch):
    import tempfile

    from test_daemon import Harness, running, snapshot

    monkeypatch.setenv("XDPLB_RUN_DIR", tempfile.mkdtemp(prefix="xdplb-t", dir="/tmp"))
    h = Harness(tmp_path)
    h.nl.forwarding = False
    daemon = h.daemon()

    async def scenario():
        async with running(daemon):
            before, pool = snapshot(h.dp), daemon.pool
            h.pool.write_text(_nat_text(h.pool.read_text()))
            result = await daemon.reload("test")
            assert result["result"] == "rejected"
            assert "net.ipv4.ip_forward is 0" in result["error"] and "sysctl -w" in result["error"]
            assert snapshot(h.dp) == before and daemon.pool is pool
            h.nl.forwarding = True   # the operator turns it on: the same reload applies
            assert (await daemon.reload("test"))["result"] == "applied"

    asyncio.run(scenario())
    assert h.nl.forwarding is True, "xdplb never sets it"
