"""Truncated or corrupted packets are never forwarded and never abort.

Every prefix of valid frames is run through the real program; random byte
corruption is added with hypothesis. A frame may be forwarded only if its
headers up to the L4 ports are all present and valid.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.l2 import Dot1Q

from xdplb import structs

from . import packets as P

pytestmark = pytest.mark.root

# (frame, bytes needed before the program may forward it)
VALID = [
    (P.syn(sport=50001), 14 + 20 + 20),
    (P.udp(sport=50002), 14 + 20 + 8),
    (P.vlan_syn(Dot1Q), 14 + 4 + 20 + 20),
    (P.with_options(), 14 + 36 + 20),
]


@pytest.mark.parametrize("frame,needed", VALID, ids=["tcp", "udp", "vlan", "ip-options"])
def test_every_truncation_is_safe(harness, frame, needed):
    raw = bytes(frame)
    for length in range(14, len(raw) + 1):
        verdict = harness.run(raw[:length])
        assert verdict.action != structs.XDP_ABORTED, length
        if length < needed:
            assert verdict.action in (structs.XDP_PASS, structs.XDP_DROP), f"length {length}: {verdict.action_name}"
            if verdict.action == structs.XDP_PASS:
                assert verdict.data == raw[:length], f"length {length}: passed but modified"
        else:
            # tot_len now claims more than is present; the headers we read are whole.
            assert verdict.action == structs.XDP_TX, f"length {length}: {verdict.action_name}"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_frames_never_abort_and_pass_untouched(harness, data):
    raw = bytearray(bytes(data.draw(st.sampled_from([f for f, _ in VALID]))))
    for _ in range(data.draw(st.integers(1, 6))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    raw = bytes(raw[: data.draw(st.integers(14, len(raw)))])
    verdict = harness.run(raw)
    assert verdict.action in (structs.XDP_PASS, structs.XDP_DROP, structs.XDP_TX)
    if verdict.action == structs.XDP_PASS:
        assert verdict.data == raw
    if verdict.action == structs.XDP_TX:
        assert verdict.data[12:] == raw[12:], "only the MAC addresses may change"


def test_random_bytes(harness):
    import random

    rng = random.Random(7)
    for _ in range(2000):
        raw = bytes(rng.getrandbits(8) for _ in range(rng.randint(14, 90)))
        verdict = harness.run(raw)
        assert verdict.action != structs.XDP_ABORTED
        if verdict.action == structs.XDP_PASS:
            assert verdict.data == raw
