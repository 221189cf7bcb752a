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
STOP_GRACE = 5.0        # seconds a cancelled task has to end before stop_all cancels it again


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
        """Cancel every task and wait until all have ended. A task still running
        STOP_GRACE seconds after its cancel is named in the log and cancelled
        again: a cancellation can be lost (Python 3.11's asyncio.wait_for drops
        one that lands as the awaited operation completes), and the daemon's
        stop must not wait forever, in silence, on one such task."""
        names = {task: name for name, task in self._tasks.items()}
        self._tasks.clear()
        pending = set(names)
        while pending:
            for task in pending:
                task.cancel()
            done, pending = await asyncio.wait(pending, timeout=STOP_GRACE)
            for task in done:
                if not task.cancelled():
                    task.exception()     # retrieved: _keep ends only by a cancel or a return
            if pending:
                log.warning("task(s) %s still running %gs after being cancelled; cancelling again",
                            ", ".join(sorted(_label(names[t]) for t in pending)), STOP_GRACE)

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
