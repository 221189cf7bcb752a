"""Health state machine: first result decides, rise/fall hysteresis, reasons."""

from __future__ import annotations

import pytest

from xdplb.health_fsm import Health, State, Transition, is_changing, step


def run(results, rise=2, fall=3, start=Health()):
    """Feed (ok, reason) pairs at times 1, 2, ...; return final Health and transitions."""
    h, seen = start, []
    for t, (ok, reason) in enumerate(results, start=1):
        h, tr = step(h, ok, reason, float(t), rise, fall)
        if tr:
            seen.append(tr)
    return h, seen


OK = (True, "connect ok")
FAIL = (False, "connect to 10.10.0.11:104 refused")


@pytest.mark.parametrize("result, state", [(OK, State.UP), (FAIL, State.DOWN)])
def test_first_result_decides_at_once(result, state):
    h, tr = step(Health(), result[0], result[1], 5.0, rise=3, fall=3)
    assert h == Health(state, 0, result[1], 5.0)
    assert tr == Transition(State.UNKNOWN, state, result[1], 5.0)


def test_fall_needs_consecutive_failures():
    h, seen = run([OK, FAIL, FAIL], fall=3)
    assert h.state is State.UP and h.streak == 2 and len(seen) == 1
    h, seen = run([OK, FAIL, FAIL, FAIL], fall=3)
    assert h.state is State.DOWN and h.streak == 0
    assert seen[-1] == Transition(State.UP, State.DOWN, FAIL[1], 4.0)


def test_success_resets_fall_streak():
    h, seen = run([OK, FAIL, FAIL, OK, FAIL, FAIL], fall=3)
    assert h.state is State.UP and h.streak == 2 and len(seen) == 1


def test_rise_needs_consecutive_successes():
    h, seen = run([FAIL, OK], rise=2)
    assert h.state is State.DOWN and h.streak == 1
    h, seen = run([FAIL, OK, FAIL, OK], rise=2)
    assert h.state is State.DOWN and h.streak == 1
    h, seen = run([FAIL, OK, OK], rise=2)
    assert h.state is State.UP
    assert seen == [
        Transition(State.UNKNOWN, State.DOWN, FAIL[1], 1.0),
        Transition(State.DOWN, State.UP, OK[1], 3.0),
    ]


def test_rise_and_fall_of_one_flip_immediately():
    h, seen = run([OK, FAIL, OK], rise=1, fall=1)
    assert h.state is State.UP and [t.new for t in seen] == [State.UP, State.DOWN, State.UP]


def test_reason_updates_but_since_keeps_time_of_change():
    h, _ = run([OK, OK, (True, "connect ok in 2 ms")])
    assert h.reason == "connect ok in 2 ms" and h.since == 1.0
    h, _ = run([OK, FAIL])
    assert h.reason == FAIL[1] and h.since == 1.0


def test_is_changing_while_streak_in_progress():
    h, _ = run([OK])
    assert not is_changing(h)
    h, _ = run([OK, FAIL])
    assert is_changing(h)
    h, _ = run([OK, FAIL, OK])
    assert not is_changing(h)
    h, _ = run([OK, FAIL, FAIL, FAIL])
    assert h.state is State.DOWN and not is_changing(h)
    assert not is_changing(Health())


def test_rejects_nonpositive_rise_or_fall():
    with pytest.raises(ValueError):
        step(Health(), True, "", 0.0, rise=0, fall=1)
