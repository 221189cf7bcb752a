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


# ---- IPv6 NAT services: the same pool keys and checks ------------------------

# NAT_POOL over IPv6, spelled loosely: the pool canonicalises (RFC 5952).
NAT6_POOL = (NAT_POOL.replace('"10.20.0.100"', '"2001:DB8:0:0::100"')
             .replace('"10.30.0.11"', '"2001:db8:30:0:0:0:0:11"').replace('"10.30.0.12"', '"2001:0db8:30::12"'))
DSR6_SERVICE = DSR_SERVICE.replace('"10.20.0.100"', '"2001:db8::200"')


def test_an_ipv6_nat_service_parses_with_canonical_addresses_and_backend_ports():
    (svc,) = parse_pool(NAT6_POOL).services
    assert svc.forwarding == "nat"
    assert str(svc.vip) == "2001:db8::100"
    assert [str(b.address) for b in svc.backends] == ["2001:db8:30::11", "2001:db8:30::12"]
    assert [svc.backend_port(b) for b in svc.backends] == [4242, 104]
    assert [svc.health_of(b).port for b in svc.backends] == [4242, 104]


def test_an_ipv6_nat_service_keeps_to_one_family():
    text = problems(NAT6_POOL.replace('"2001:db8:30:0:0:0:0:11"', '"10.30.0.11"'))
    assert ('backend[0] "orthanc1" .address = "10.30.0.11" is IPv4 but the service\'s VIP "2001:db8::100" is IPv6; '
            "a service and its backends share a family (no NAT64)") in text


def test_an_ipv6_pacs_behind_both_dsr_and_nat_is_refused_however_spelled():
    text = problems(NAT6_POOL + DSR6_SERVICE.format(address="2001:db8:30::0:12"))
    assert 'backend 2001:db8:30::12 is behind service "pacs-dicom" (nat) and service "viewer" (dsr)' in text
    assert "dropped there as martians" in text
    parse_pool(NAT6_POOL + DSR6_SERVICE.format(address="2001:db8:40::5"))   # other backends: fine


def test_one_ipv6_backend_port_behind_two_nat_services_is_refused_in_bracketed_form():
    second = NAT6_POOL.replace('"pacs-dicom"', '"pacs-2"').replace("2001:DB8:0:0::100", "2001:db8::101")
    text = problems(NAT6_POOL + second.replace('"2001:db8:30:0:0:0:0:11"', '"2001:DB8:30::11"'))
    assert 'backend [2001:db8:30::11]:4242/tcp is behind NAT services "pacs-dicom" and "pacs-2"' in text
    # The same address and port over UDP is another reply key: fine.
    parse_pool(NAT6_POOL + second.replace('port = 104', 'port = 104\nprotocol = "udp"', 1))


def test_check_describes_an_ipv6_nat_service_with_bracketed_backends_and_the_ipv6_sysctl():
    text = describe(parse_pool(NAT6_POOL))
    assert 'service "pacs-dicom": [2001:db8::100]:104/tcp' in text
    assert "forwarding nat (destination and port translated, client address kept)" in text
    assert 'backend "orthanc1" [2001:db8:30::11]:4242: weight 1' in text
    assert 'backend "orthanc2" [2001:db8:30::12]:104: weight 1' in text
    assert text.count("to go through this gateway") == 1
    assert ("on the attached interface (net.ipv6.conf.<interface>.forwarding = 1, which attach and reload "
            "require and never set)") in text
    assert "net.ipv4" not in text   # no IPv4 NAT service: nothing to ask of IPv4
    both = describe(parse_pool(NAT_POOL + NAT6_POOL.replace('"pacs-dicom"', '"pacs-dicom6"')))
    assert "(net.ipv4.conf.<interface>.forwarding = 1 and net.ipv6.conf.<interface>.forwarding = 1, which" in both
    assert both.count("to go through this gateway") == 1


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


def _set_forwarding(nl, version: int, everywhere: bool, attached: bool) -> None:
    """Every interface's forwarding of IP `version` as writing the namespace's switch
    (net.ipv4.ip_forward, net.ipv6.conf.all.forwarding) leaves it, then the attached one's own."""
    setattr(nl, "forwarding" if version == 4 else "forwarding6", everywhere)
    nl.if_forwarding[(version, "lbt0")] = attached


def test_check_names_the_attached_interfaces_forwarding_sysctl():
    # bpf_fib_lookup reads the ingress interface's own forwarding, not net.ipv4.ip_forward.
    text = describe(parse_pool(NAT_POOL))
    assert "IP forwarding on the attached interface (net.ipv4.conf.<interface>.forwarding = 1," in text
    assert "ip_forward" not in text


def test_attach_with_a_nat_service_is_refused_while_forwarding_is_off(tmp_path, monkeypatch):
    import tempfile

    from test_daemon import Harness, running

    from xdplb.daemon import AttachError

    monkeypatch.setenv("XDPLB_RUN_DIR", tempfile.mkdtemp(prefix="xdplb-t", dir="/tmp"))
    h = Harness(tmp_path)
    h.pool.write_text(_nat_text(h.pool.read_text()))
    h.nl.forwarding = False
    with pytest.raises(AttachError, match=r"^NAT service\(s\) dicom, web, store need IP forwarding on lbt0, but "
                                          r"net.ipv4.conf.lbt0.forwarding is 0, .*"
                                          r"`sysctl -w net.ipv4.conf.lbt0.forwarding=1`"):
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
    _set_forwarding(h.nl, 4, everywhere=True, attached=False)   # on everywhere but the attached interface
    daemon = h.daemon()

    async def scenario():
        async with running(daemon):
            before, pool = snapshot(h.dp), daemon.pool
            h.pool.write_text(_nat_text(h.pool.read_text()))
            result = await daemon.reload("test")
            assert result["result"] == "rejected"
            assert "net.ipv4.conf.lbt0.forwarding is 0" in result["error"] and "sysctl -w" in result["error"]
            assert snapshot(h.dp) == before and daemon.pool is pool
            # The operator turns it on there (only there): the same reload applies.
            _set_forwarding(h.nl, 4, everywhere=False, attached=True)
            assert (await daemon.reload("test"))["result"] == "applied"

    asyncio.run(scenario())
    assert h.nl.if_forwarding[(4, "lbt0")] is True and h.nl.forwarding is False, "xdplb never sets it"


# ---- IPv6 NAT on the host: forwarding and next hops, per family ------------------

def _nat6_harness(tmp_path, monkeypatch, dual: bool = False):
    """test_daemon's Harness with an IPv6 NAT service (and, `dual`, an IPv4 one)."""
    import tempfile
    from ipaddress import IPv6Address

    from test_daemon import A, B, MACS, VIP1, Harness, pool_toml

    monkeypatch.setenv("XDPLB_RUN_DIR", tempfile.mkdtemp(prefix="xdplb-t", dir="/tmp"))
    a6, b6 = IPv6Address("fd00:10:10::11"), IPv6Address("fd00:10:10::12")
    services = [("dicom6", IPv6Address("fd00:10:10::100"), 104, [("pacs-a", a6, 1), ("pacs-b", b6, 1)])]
    if dual:
        services.append(("dicom", VIP1, 104, [("pacs-a", A, 1), ("pacs-b", B, 1)]))
    h = Harness(tmp_path)
    h.pool.write_text(_nat_text(pool_toml(services)).replace('name = "dicom6"', 'name = "dicom6"\nforwarding = "nat"'))
    h.nl.neighbours.update({a6: MACS[A], b6: MACS[B]})
    return h


def test_attach_with_an_ipv6_nat_service_is_refused_while_ipv6_forwarding_is_off(tmp_path, monkeypatch):
    from test_daemon import running

    from xdplb.daemon import AttachError

    h = _nat6_harness(tmp_path, monkeypatch)
    h.nl.forwarding6 = False
    with pytest.raises(AttachError, match=r"^NAT service\(s\) dicom6 need IP forwarding on lbt0, but "
                                          r"net.ipv6.conf.lbt0.forwarding is 0, .*"
                                          r"`sysctl -w net.ipv6.conf.lbt0.forwarding=1` \(xdplb does not change it "
                                          r"for you; .*accept_ra = 2\)$"):
        asyncio.run(asyncio.wait_for(h.daemon().run(), 5))
    assert h.made == [], "refused before compiling: nothing changed"
    assert [c for c in h.nl.calls if c[0] == "ip_forwarding"] == [("ip_forwarding", 6, "lbt0")], \
        "no IPv4 NAT service: IPv4 forwarding is not asked"

    # IPv4 forwarding off does not concern an IPv6-only NAT pool; IPv6 forwarding on, it attaches.
    ok = _nat6_harness(tmp_path, monkeypatch)
    ok.nl.forwarding = False

    async def scenario():
        async with running(ok.daemon()):
            assert ok.dp.attached is not None

    asyncio.run(scenario())
    assert ok.nl.forwarding6 is True and ok.nl.forwarding is False, "xdplb never sets either"


def test_a_dual_stack_nat_pool_names_each_family_whose_forwarding_is_off(tmp_path, monkeypatch):
    from xdplb.daemon import AttachError

    h = _nat6_harness(tmp_path, monkeypatch, dual=True)
    h.nl.forwarding = h.nl.forwarding6 = False
    with pytest.raises(AttachError) as info:
        asyncio.run(asyncio.wait_for(h.daemon().run(), 5))
    text = str(info.value)
    assert "NAT service(s) dicom need IP forwarding on lbt0, but net.ipv4.conf.lbt0.forwarding is 0" in text
    assert "NAT service(s) dicom6 need IP forwarding on lbt0, but net.ipv6.conf.lbt0.forwarding is 0" in text


@pytest.mark.parametrize("version", [4, 6])
def test_attach_reads_the_attached_interfaces_own_forwarding_not_the_namespace_switch(tmp_path, monkeypatch,
                                                                                       version):
    """bpf_fib_lookup (nat.h, nat6.h) reads the forwarding of the ingress
    interface, the attached one: on everywhere else but off there, every reply
    would be dropped (no_route), so attach refuses; off everywhere else but on
    there (the uplink keeping its RAs, for one), the replies go out, so it attaches."""
    from test_daemon import running

    from xdplb.daemon import AttachError

    h = _nat6_harness(tmp_path, monkeypatch, dual=True)
    _set_forwarding(h.nl, version, everywhere=True, attached=False)
    with pytest.raises(AttachError, match=rf"need IP forwarding on lbt0, but net.ipv{version}.conf.lbt0.forwarding "
                                          rf"is 0, .*`sysctl -w net.ipv{version}.conf.lbt0.forwarding=1`"):
        asyncio.run(asyncio.wait_for(h.daemon().run(), 5))
    assert h.made == [], "refused before compiling: nothing changed"

    ok = _nat6_harness(tmp_path, monkeypatch, dual=True)
    _set_forwarding(ok.nl, version, everywhere=False, attached=True)

    async def scenario():
        async with running(ok.daemon()):
            assert ok.dp.attached is not None

    asyncio.run(scenario())
    assert ("ip_forwarding", version, "lbt0") in ok.nl.calls
    everywhere = ok.nl.forwarding if version == 4 else ok.nl.forwarding6
    assert ok.nl.if_forwarding[(version, "lbt0")] is True and everywhere is False, "xdplb never sets either"


def test_the_refusal_names_a_dotted_interfaces_sysctl_as_sysctl_writes_it():
    from xdplb import modes

    text = modes.nat_forwarding_refusal(["dicom6"], False, 6, "eth0.100")
    assert "need IP forwarding on eth0.100, but net.ipv6.conf.eth0/100.forwarding is 0" in text
    assert "`sysctl -w net.ipv6.conf.eth0/100.forwarding=1`" in text
    assert modes.forwarding_path(6, "eth0.100") == "/proc/sys/net/ipv6/conf/eth0.100/forwarding"
    assert modes.nat_forwarding_refusal(["dicom6"], True, 6, "eth0.100") is None


def test_reload_to_an_ipv6_nat_service_is_rejected_while_ipv6_forwarding_is_off(tmp_path, monkeypatch):
    from test_daemon import running, snapshot

    h = _nat6_harness(tmp_path, monkeypatch)
    nat6_text = h.pool.read_text()
    # The same IPv6 service with direct server return first (an IPv6 service from the start:
    # adding the first one would resize the IPv6 flow table, which needs a restart).
    h.pool.write_text(nat6_text.replace('name = "dicom6"\nforwarding = "nat"', 'name = "dicom6"'))
    _set_forwarding(h.nl, 6, everywhere=True, attached=False)   # on everywhere but the attached interface
    daemon = h.daemon()

    async def scenario():
        async with running(daemon):
            before, pool = snapshot(h.dp), daemon.pool
            h.pool.write_text(nat6_text)
            result = await daemon.reload("test")
            assert result["result"] == "rejected"
            assert "net.ipv6.conf.lbt0.forwarding is 0" in result["error"], result
            assert snapshot(h.dp) == before and daemon.pool is pool
            _set_forwarding(h.nl, 6, everywhere=False, attached=True)   # the operator turns it on there
            assert (await daemon.reload("test"))["result"] == "applied"

    asyncio.run(scenario())


def test_daemon_keeps_the_ipv6_routers_resolved_for_an_ipv6_nat_pool_only(tmp_path, monkeypatch):
    """The routers towards IPv6 clients are solicited on the attached link
    (a link-local one included) for a pool with an IPv6 NAT service; an
    IPv4-only NAT pool solicits only IPv4 routers, a DSR pool none."""
    from ipaddress import IPv6Address

    from test_daemon import INDEX, Harness, running

    router6, router4 = IPv6Address("fe80::1"), IPv4Address("10.10.0.1")
    dirs = {name: tmp_path / name for name in ("nat6", "nat4", "dsr")}
    for d in dirs.values():
        d.mkdir()
    cases = {"nat6": _nat6_harness(dirs["nat6"], monkeypatch), "nat4": Harness(dirs["nat4"]),
             "dsr": Harness(dirs["dsr"])}
    cases["nat4"].pool.write_text(_nat_text(cases["nat4"].pool.read_text()))
    solicited = {}
    for name, h in cases.items():
        h.nl.gateways = {router6, router4}
        h.nl.solicits = []
        record = h.nl.solicit
        h.nl.solicit = lambda address, index=0, h=h, record=record: (h.nl.solicits.append((address, index)),
                                                                      record(address, index))

        async def scenario(h=h):
            async with running(h.daemon()):
                pass

        asyncio.run(scenario())
        solicited[name] = {a for a, _ in h.nl.solicits if a in (router6, router4)}
        assert all(i == INDEX for a, i in h.nl.solicits if a == router6), "a link-local router needs its link"
    assert solicited == {"nat6": {router6}, "nat4": {router4}, "dsr": set()}
