"""Suite-wide rules.

With XDPLB_REQUIRE_ROOT_TESTS=1 (tools/test.sh sets it when run as root, so
always in CI) a skipped test is reported as a failure: a root test that
quietly skips would hide a missing feature or a missing install step.
"""
from __future__ import annotations

import os

import pytest

STRICT = os.environ.get("XDPLB_REQUIRE_ROOT_TESTS") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped under XDPLB_REQUIRE_ROOT_TESTS=1: {reason}"


class DeadlineExceeded(Exception):
    """Raised inside the test by SIGALRM when a call that must return promptly blocks."""


@pytest.fixture
def deadline():
    """``with deadline(5): ...`` fails the test instead of hanging it when the body blocks
    (SIGALRM interrupts even a blocking open() of a FIFO in the main thread)."""
    import contextlib
    import signal

    @contextlib.contextmanager
    def limit(seconds: float):
        def expire(signum, frame):
            raise DeadlineExceeded(f"still blocked after {seconds}s")

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    return limit
