"""The kernel layer refuses to start where it cannot wait for RCU grace periods."""
from __future__ import annotations

import pytest

from xdplb import dataplane


def test_missing_membarrier_global_is_one_clear_sentence(monkeypatch):
    # MEMBARRIER_CMD_QUERY's answer on a kernel with nohz_full CPUs: every bit but GLOBAL.
    monkeypatch.setattr(dataplane, "_membarrier", lambda cmd: 0b1111110 if cmd == dataplane.MEMBARRIER_CMD_QUERY else -1)
    with pytest.raises(dataplane.LoadError, match=r"^this kernel does not offer membarrier\(MEMBARRIER_CMD_GLOBAL\)"):
        dataplane.check_grace_periods()


def test_this_kernel_offers_grace_periods():
    dataplane.check_grace_periods()
    dataplane.synchronize_rcu()
