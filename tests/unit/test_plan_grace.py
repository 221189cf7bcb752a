"""The planner's side of the down grace: when each backend went down, removed
backends kept (down, id reserved) for the grace, then cleared; and the flow
settings carried into lb_config. Pure: plans applied to the FakeDataplane."""
from __future__ import annotations

import sys
from ipaddress import IPv4Address
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for fakes.py

from fakes import FakeDataplane  # noqa: E402

from xdplb.config import Settings, parse_pool  # noqa: E402
from xdplb.desired import desired_state  # noqa: E402
from xdplb.plan import Applied, ClearBackend, PutBackend, SetConfig, adopt, plan, retire_due  # noqa: E402

from test_plan import GW_MAC, addr, be, desired, svc  # noqa: E402

S = 1_000_000_000
GRACE = 30 * S


class Kernel:
    def __init__(self):
        self.dp = FakeDataplane(Settings(maglev_size=251, max_services=8, max_backends=8))
        self.applied = Applied()

    def step(self, d, now):
        result = plan(self.applied, d, now)
        self.dp.apply(result.ops)
        self.applied = result.applied
        return result


def graced(*services, grace=GRACE):
    return replace(desired(*services, max_backends=8), down_grace_ns=grace)


def test_down_since_is_when_it_went_down_and_stays_until_it_is_up():
    k = Kernel()
    k.step(graced(svc("dicom", [be(11), be(12)])), now=100 * S)
    b12 = k.applied.backends[("dicom", str(addr(12)))].id
    assert k.dp.down_since[b12] == 0
    result = k.step(graced(svc("dicom", [be(11), be(12, healthy=False)])), now=200 * S)
    assert PutBackend(b12, 0, addr(12), bytes([2, 0, 10, 10, 0, 12]), False, 200 * S) in result.ops
    # Still down later: nothing is rewritten, the time it went down is kept.
    assert k.step(graced(svc("dicom", [be(11), be(12, healthy=False)])), now=210 * S).ops == ()
    assert k.dp.down_since[b12] == 200 * S
    k.step(graced(svc("dicom", [be(11), be(12)])), now=220 * S)
    assert k.dp.down_since[b12] == 0 and k.dp.backends[b12][3] is True


def test_lost_mac_counts_as_going_down():
    k = Kernel()
    k.step(graced(svc("dicom", [be(11), be(12)])), now=1 * S)
    b12 = k.applied.backends[("dicom", str(addr(12)))].id
    k.step(graced(svc("dicom", [be(11), be(12, mac=False)])), now=5 * S)
    assert k.dp.backends[b12][3] is False and k.dp.down_since[b12] == 5 * S


def test_never_up_backend_has_no_grace():
    k = Kernel()
    k.step(graced(svc("dicom", [be(11), be(12, healthy=False)])), now=1 * S)
    b12 = k.applied.backends[("dicom", str(addr(12)))].id
    assert k.dp.down_since[b12] == 0


def test_removed_backend_is_kept_down_with_its_id_reserved_until_the_grace_ends():
    k = Kernel()
    k.step(graced(svc("dicom", [be(11), be(12)])), now=100 * S)
    b12 = k.applied.backends[("dicom", str(addr(12)))].id
    result = k.step(graced(svc("dicom", [be(11)])), now=200 * S)
    assert ClearBackend(b12) not in result.ops
    assert k.dp.backends[b12][3] is False and k.dp.down_since[b12] == 200 * S
    assert not retire_due(k.applied, 200 * S + GRACE - 1)
    assert retire_due(k.applied, 200 * S + GRACE)
    # New backends during the grace never take the reserved id, even when the
    # id space is nearly used up (ids 1..7 here).
    crowd = [be(i) for i in range(11, 17)]
    k.step(graced(svc("dicom", [be(11)]), svc("other", crowd[1:], port=80)), now=210 * S)
    assert b12 not in {b.id for b in k.applied.backends.values()}
    # After the grace the next plan clears it and frees the id.
    result = k.step(graced(svc("dicom", [be(11)]), svc("other", crowd[1:], port=80)), now=200 * S + GRACE)
    assert ClearBackend(b12) in result.ops and b12 not in k.dp.backends
    assert not k.applied.retired


def test_backend_back_within_the_grace_gets_its_old_id():
    k = Kernel()
    k.step(graced(svc("dicom", [be(11), be(12)])), now=100 * S)
    b12 = k.applied.backends[("dicom", str(addr(12)))].id
    k.step(graced(svc("dicom", [be(11)])), now=200 * S)
    k.step(graced(svc("dicom", [be(11), be(12)])), now=205 * S)
    assert k.applied.backends[("dicom", str(addr(12)))].id == b12
    assert k.dp.backends[b12][3] is True and k.dp.down_since[b12] == 0
    assert not k.applied.retired


def test_removed_backend_already_down_past_its_grace_is_cleared_at_once():
    k = Kernel()
    k.step(graced(svc("dicom", [be(11), be(12)])), now=100 * S)
    k.step(graced(svc("dicom", [be(11), be(12, healthy=False)])), now=110 * S)
    b12 = k.applied.backends[("dicom", str(addr(12)))].id
    result = k.step(graced(svc("dicom", [be(11)])), now=110 * S + GRACE)
    assert ClearBackend(b12) in result.ops and not k.applied.retired


def test_grace_zero_clears_removed_backends_at_once():
    k = Kernel()
    k.step(graced(svc("dicom", [be(11), be(12)]), grace=0), now=100 * S)
    b12 = k.applied.backends[("dicom", str(addr(12)))].id
    result = k.step(graced(svc("dicom", [be(11)]), grace=0), now=101 * S)
    assert ClearBackend(b12) in result.ops and not k.applied.retired


def test_adoption_keeps_when_backends_went_down():
    k = Kernel()
    k.step(graced(svc("dicom", [be(11), be(12)])), now=100 * S)
    k.step(graced(svc("dicom", [be(11), be(12, healthy=False)])), now=150 * S)
    b12 = k.applied.backends[("dicom", str(addr(12)))].id
    adopted = adopt(k.dp.read_state(), {(IPv4Address("10.10.0.100"), 104, "tcp"): "dicom"})
    assert adopted.backends[("dicom", str(addr(12)))].down_since == 150 * S
    again = plan(adopted, graced(svc("dicom", [be(11), be(12, healthy=False)])), 160 * S)
    assert not any(isinstance(op, PutBackend) and op.id == b12 for op in again.ops)


def test_pool_flow_settings_reach_lb_config():
    pool = parse_pool('[xdplb]\nudp_idle_timeout = 5\ndown_grace = 2.5\nflood_guard_rate = 700\n'
                      'extra_macs = ["00:00:5e:00:01:33"]\n'
                      '[[service]]\nname = "d"\nvip = "10.10.0.100"\nport = 104\n'
                      '[[service.backend]]\nname = "a"\naddress = "10.10.0.11"\n')
    d = desired_state(pool, {}, {}, GW_MAC)
    (op,) = [op for op in plan(Applied(), d, 1).ops if isinstance(op, SetConfig)]
    assert op == SetConfig(GW_MAC, 0, False, (bytes.fromhex("00005e000133"),), 5 * S, 2_500_000_000, 700)
