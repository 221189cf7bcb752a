"""Backends drained at run time (`xdplb drain`), kept across restarts.

A drained backend is named by its identity, (service name, backend
address), as health verdicts and the planner name it: renaming the backend
in the pool keeps it drained, and a drain whose backend left the pool is
dropped rather than left behind. The set is saved as JSON beside the
control socket, as [service, address] pairs; files from older versions hold
[service, backend name] pairs and are read through the pool.
"""
from __future__ import annotations

import ipaddress
import json
from pathlib import Path


def identities(pool) -> set:
    """(service name, address) of every backend of the pool."""
    return {(s.name, be.address) for s in pool.services for be in s.backends}


class Drains:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.keys: set[tuple] = set()     # (service name, IPv4Address | IPv6Address)

    def within(self, pool, keys: set | None = None) -> set:
        """The drains (of `keys`, or the current ones) that name a backend of `pool`."""
        return (self.keys if keys is None else keys) & identities(pool)

    def load(self, pool) -> None:
        try:
            pairs = json.loads(self.path.read_text())
        except (OSError, ValueError):
            pairs = []
        by_name = {(s.name, be.name): be.address for s in pool.services for be in s.backends}
        keys = set()
        for pair in pairs if isinstance(pairs, list) else ():
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                continue
            try:
                keys.add((pair[0], ipaddress.ip_address(pair[1])))
            except ValueError:
                if tuple(pair) in by_name:
                    keys.add((pair[0], by_name[tuple(pair)]))
        self.keys = self.within(pool, keys)

    def save(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path.write_text(json.dumps(sorted([s, str(a)] for s, a in self.keys)))

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    @staticmethod
    def find(pool, service: str, backend: str):
        """(key, backend name) of `backend` (a name or an address) in `service`,
        or an error sentence."""
        svc = next((s for s in pool.services if s.name == service), None)
        if svc is None:
            return f"no service {service!r}; services: {', '.join(s.name for s in pool.services)}"
        be = next((b for b in svc.backends if backend == b.name or _same_address(backend, b.address)), None)
        if be is None:
            return (f"service {service!r} has no backend {backend!r}; "
                    f"backends: {', '.join(b.name for b in svc.backends)}")
        return (service, be.address), be.name

    def set(self, key: tuple, drained: bool) -> bool:
        """Drain or undrain `key` and save; True if that changed anything."""
        changed = (key not in self.keys) if drained else (key in self.keys)
        if changed:
            (self.keys.add if drained else self.keys.discard)(key)
            self.save()
        return changed


def _same_address(text: str, address) -> bool:
    """Whether `text` spells `address` (IPv6 has many spellings of one address)."""
    try:
        return ipaddress.ip_address(text) == address
    except ValueError:
        return False
