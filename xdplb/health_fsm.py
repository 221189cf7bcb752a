"""Health state machine with rise/fall hysteresis (as in HAProxy and ExaBGP).

One flapping probe must not pull a PACS server out of rotation, and one lucky
probe must not put a broken one back: a backend that is UP goes DOWN only after
``fall`` consecutive failed probes, and a DOWN backend comes back UP only after
``rise`` consecutive successes.  A backend nobody has probed yet is UNKNOWN and
its first probe result decides at once.

Pure: ``step`` takes the current Health and one probe result and returns the
new Health plus the Transition it caused, if any.  Time is passed in.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class State(enum.Enum):
    """What the controller believes about a backend."""

    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True)
class Health:
    """A backend's health as of its latest probe.

    ``streak`` counts consecutive results that disagree with ``state``: failures
    while UP (toward ``fall``), successes while DOWN (toward ``rise``).
    ``reason`` is the latest probe's text; ``since`` is when ``state`` last changed.
    """

    state: State = State.UNKNOWN
    streak: int = 0
    reason: str = ""
    since: float = 0.0


@dataclass(frozen=True)
class Transition:
    """A change of state, with the reason of the probe that caused it."""

    old: State
    new: State
    reason: str
    at: float


def step(
    h: Health, ok: bool, reason: str, now: float, rise: int, fall: int
) -> tuple[Health, Transition | None]:
    """Apply one probe result; return the new Health and the Transition, if any."""
    if rise < 1 or fall < 1:
        raise ValueError(f"rise and fall must be >= 1, got rise={rise!r} fall={fall!r}")
    result = State.UP if ok else State.DOWN

    if h.state is State.UNKNOWN:
        return _change(h, result, reason, now)

    if result is h.state:
        return Health(h.state, 0, reason, h.since), None

    streak = h.streak + 1
    needed = rise if result is State.UP else fall
    if streak >= needed:
        return _change(h, result, reason, now)
    return Health(h.state, streak, reason, h.since), None


def _change(h: Health, new: State, reason: str, now: float) -> tuple[Health, Transition]:
    return Health(new, 0, reason, now), Transition(h.state, new, reason, now)


def is_changing(h: Health) -> bool:
    """True while a streak toward rise or fall is in progress (probe faster then)."""
    return h.streak > 0
