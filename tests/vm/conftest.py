"""Fixtures of the VM test: ``tools/`` on ``sys.path`` (as for tests/lab)."""
from __future__ import annotations

import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[2] / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

# tests/ too: the packet-equivalence test reads the fixture table of tests/packet.
TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
