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
