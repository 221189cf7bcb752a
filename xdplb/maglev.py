"""Weighted Maglev lookup table (Eisenbud et al., NSDI'16, section 3.4).

The XDP program picks a backend as ``table[flow_hash % size]``.  Maglev gives
every backend an equal (or weight-proportional) share of the table, and when a
backend is added or removed only a small fraction of the other backends' slots
change owner, so most established flows keep their backend even when a
flow-table entry is missing.

Everything here is pure and deterministic: the same backends and size give the
same table in every process on every machine (hashes come from BLAKE2b, never
from Python's per-process ``hash()``), whatever order the backends are given in.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np

NO_BACKEND = 0
"""Table value meaning "no backend": the data plane drops or passes such flows."""

_OFFSET_PERSON = b"xdplb.maglev.off"
_SKIP_PERSON = b"xdplb.maglev.skp"


@dataclass(frozen=True)
class MaglevBackend:
    """One candidate for the table.

    ``key`` is the backend's stable identity (its address string): it alone
    decides where the backend's preferred slots are, so renumbering ``id``
    never moves flows.  ``id`` (>= 1) is the value written into the table.
    ``weight`` 0 means drained: the backend gets no slots.
    """

    key: str
    weight: int
    id: int


def is_prime(n: int) -> bool:
    """Return True when ``n`` is a prime number (trial division; fine up to ~10**12)."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    if n % 3 == 0:
        return n == 3
    f = 5
    while f * f <= n:
        if n % f == 0 or n % (f + 2) == 0:
            return False
        f += 6
    return True


def _hash64(key: str, person: bytes) -> int:
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8, person=person).digest()
    return int.from_bytes(digest, "little")


@functools.lru_cache(maxsize=16384)
def permutation_params(key: str, size: int) -> tuple[int, int]:
    """Return ``(offset, skip)`` of the backend's preference list for a table of ``size``.

    The backend prefers slots ``(offset + j * skip) % size`` for j = 0, 1, ...;
    with ``size`` prime and ``1 <= skip < size`` this visits every slot once.
    The two hashes are independent BLAKE2b digests (different personalisation).
    Cached: a rebuild after a health change hashes the same backends again.
    """
    if size < 2:
        raise ValueError(f"table size must be at least 2, got {size!r}")
    offset = _hash64(key, _OFFSET_PERSON) % size
    skip = _hash64(key, _SKIP_PERSON) % (size - 1) + 1
    return offset, skip


def _check_backends(backends: Sequence[MaglevBackend]) -> None:
    seen: set[str] = set()
    for b in backends:
        if b.key in seen:
            raise ValueError(f"duplicate Maglev backend key {b.key!r}")
        seen.add(b.key)
        if isinstance(b.weight, bool) or not isinstance(b.weight, int) or b.weight < 0:
            raise ValueError(f"backend {b.key!r} weight must be an integer >= 0, got {b.weight!r}")
        if isinstance(b.id, bool) or not isinstance(b.id, int) or b.id < 1:
            raise ValueError(f"backend {b.key!r} id must be an integer >= 1, got {b.id!r}")


def build_table(backends: Sequence[MaglevBackend], size: int = 65537) -> list[int]:
    """Return the Maglev table: a list of ``size`` backend ids (0 = no backend).

    Backends are sorted by key, then take turns claiming their next free
    preferred slot.  Weights use exact credit scheduling: in round r a backend
    of weight w has earned ``floor(r * w / max_weight)`` claims, so over the
    whole fill each backend owns about ``size * w / sum(weights)`` slots (the
    weight applies in every round, not only the first).  Claim k of backend i
    falls in round ``ceil(k * max_weight / w_i)``, and claims are made in
    order of (round, backend index): :func:`claim_order`.
    """
    if not is_prime(size):
        raise ValueError(f"table size must be a prime number, got {size!r}")
    _check_backends(backends)
    eligible = sorted((b for b in backends if b.weight > 0), key=lambda b: b.key)
    if not eligible:
        return [NO_BACKEND] * size
    params = [permutation_params(b.key, size) for b in eligible]
    claimer = claim_order([b.weight for b in eligible], size)
    return _fill(params, [b.id for b in eligible], claimer, size)


def claim_order(weights: Sequence[int], size: int) -> list[int]:
    """Return, for each of the ``size`` claims in turn, the index (into
    ``weights``) of the backend that makes it.

    Equivalent to visiting every backend every round and letting it claim when
    its credit allows, but computed at once: the order depends only on the
    weights, never on the table.
    """
    w = np.asarray(weights, dtype=np.int64)
    n = len(w)
    top = int(w.max())
    if int(w.min()) == top:
        return np.tile(np.arange(n, dtype=np.int64), -(-size // n))[:size].tolist()
    # Enough rounds for `size` claims: sum(floor(R * w / top)) >= R * sum(w) / top - n.
    rounds = -(-(size + n) * top // int(w.sum()))
    per_backend = rounds * w // top
    backend = np.repeat(np.arange(n, dtype=np.int64), per_backend)
    first = np.repeat(np.cumsum(per_backend) - per_backend, per_backend)
    k = np.arange(len(backend), dtype=np.int64) - first + 1
    wk = w[backend]
    round_of = (k * top + wk - 1) // wk
    # `backend` is ascending, so a stable sort by round gives (round, backend).
    return backend[np.argsort(round_of, kind="stable")[:size]].tolist()


def _fill(params: list[tuple[int, int]], ids: list[int], claimer: list[int], size: int) -> list[int]:
    """Make the claims in order: each claimer takes its next free preferred slot.

    Walking a preference list to the next free slot costs about
    ``size / free`` steps, so the last few hundred claims would cost more
    than half of all the steps (the sum is ``size * ln(size)``).  Once no
    more than ``_tail_length(size)`` slots are free, each claim looks at the
    free slots instead: slot f is ``(f - c) * inverse(skip) % size`` steps
    after c in a preference list, and the nearest one is the claimer's next
    free slot, exactly as the walk would find it.
    """
    pos = [offset for offset, _ in params]
    skips = [skip for _, skip in params]
    table = [NO_BACKEND] * size
    walk = max(0, size - _tail_length(size))
    for i in claimer[:walk]:
        c = pos[i]
        s = skips[i]
        while table[c]:
            c = (c + s) % size
        table[c] = ids[i]
        pos[i] = (c + s) % size
    free = []
    slot = -1
    for _ in range(size - walk):
        slot = table.index(NO_BACKEND, slot + 1)
        free.append(slot)
    for i in claimer[walk:]:
        c = pos[i]
        s = skips[i]
        inv = pow(s, -1, size)
        slot = min(free, key=lambda f: (f - c) * inv % size)
        free.remove(slot)
        table[slot] = ids[i]
        pos[i] = (slot + s) % size
    return table


def _tail_length(size: int) -> int:
    """How many last claims search the free list rather than walk: where a
    walk (about ``size / free`` steps) costs more than a search (``free``)."""
    return math.isqrt(size)


def slot_counts(table: Sequence[int]) -> dict[int, int]:
    """Return how many slots each id owns (id 0, "no backend", included if present)."""
    return dict(Counter(table))


def changed_slots(old: Sequence[int], new: Sequence[int]) -> int:
    """Return how many slots differ between two tables of the same size."""
    if len(old) != len(new):
        raise ValueError(f"tables differ in size: {len(old)} vs {len(new)}")
    return sum(1 for a, b in zip(old, new) if a != b)
