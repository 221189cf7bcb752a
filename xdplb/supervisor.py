"""Keeps the daemon's long-running tasks alive.

A probe loop, the neighbour refresh or the reconciler that raises is
logged with its traceback and started again after a pause that doubles on
each crash in a row (up to MAX_DELAY), so one bug or one kernel error never
silently stops health checking. Cancelling (stop, stop_all) is the only way
a supervised task ends, apart from its coroutine returning.
"""
from __future__ import annotations

import asyncio
import collections
import logging
from typing import Awaitable, Callable, Hashable

log = logging.getLogger("xdplb")

RESTART_DELAY = 0.2     # seconds before the first restart
MAX_DELAY = 10.0        # ... doubling up to this while it keeps crashing
HEALTHY_AFTER = 30.0    # a run this long resets the delay


class Supervisor:
    def __init__(self) -> None:
        self._tasks: dict[Hashable, asyncio.Task] = {}
        self.restarts: collections.Counter = collections.Counter()   # name -> restarts so far

    def start(self, name: Hashable, factory: Callable[[], Awaitable]) -> None:
        """Run `factory()` as a task named `name` (a no-op if it already runs)."""
        if name in self._tasks and not self._tasks[name].done():
            return
        self._tasks[name] = asyncio.get_running_loop().create_task(self._keep(name, factory))

    def running(self, name: Hashable) -> bool:
        task = self._tasks.get(name)
        return task is not None and not task.done()

    def names(self) -> list:
        return [name for name, task in self._tasks.items() if not task.done()]

    def stop(self, name: Hashable) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()

    async def stop_all(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _keep(self, name: Hashable, factory: Callable[[], Awaitable]) -> None:
        loop = asyncio.get_running_loop()
        delay = RESTART_DELAY
        while True:
            started = loop.time()
            try:
                await factory()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                if loop.time() - started >= HEALTHY_AFTER:
                    delay = RESTART_DELAY
                self.restarts[name] += 1
                log.exception("task %s crashed; restarting it in %gs", _label(name), round(delay, 3))
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_DELAY)


def _label(name: Hashable) -> str:
    return name if isinstance(name, str) else " ".join(map(str, name)) if isinstance(name, tuple) else repr(name)
