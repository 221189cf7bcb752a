"""Fixtures for the namespace-lab tests.

``tools/`` is put on ``sys.path`` here, so test modules simply ``import lab``
(the module ``tools/lab.py``).  Each module gets its own lab with an unused
prefix (``xt1``, ``xt2``, ...), so a developer's running ``xl`` lab, or
another test module's lab, never clashes with it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

import lab as labtool  # noqa: E402  (needs the sys.path entry above)


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")


@pytest.fixture(scope="module")
def lab():
    """A running lab (3 backends, default VIP), torn down after the module."""
    _need_root()
    with labtool.temporary_lab("xt") as the_lab:
        yield the_lab


@pytest.fixture
def spare_prefix():
    """An unused prefix for a test that builds its own lab; cleaned after."""
    _need_root()
    prefix = labtool.unused_prefix("xs")
    try:
        yield prefix
    finally:
        labtool.Lab(prefix=prefix).down()
