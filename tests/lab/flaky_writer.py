"""`xdplb attach` with the real map writer, made to refuse one write on demand.

Run as `python tests/lab/flaky_writer.py IFACE POOL` in the lb namespace, as
`xdplb attach IFACE --pool POOL` would run. It is the real daemon, the real
BccDataplane and the real maps; the only change is that when the file named
by $XDPLB_FAIL_WRITE exists, the next apply() removes it and raises before
its first write, as a refused map update would.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from xdplb.daemon import Daemon  # noqa: E402
from xdplb.dataplane import BccDataplane  # noqa: E402


class OneRefusedWrite(BccDataplane):
    def apply(self, ops) -> None:
        trigger = Path(os.environ["XDPLB_FAIL_WRITE"])
        ops = list(ops)
        if trigger.exists() and ops:
            trigger.unlink()
            logging.getLogger("xdplb").warning("test: refusing the first of %d map writes", len(ops))
            raise OSError("injected by the lab test: bpf_map_update_elem refused")
        super().apply(ops)


def main() -> int:
    ifname, pool = sys.argv[1], sys.argv[2]
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=f"xdplb[{ifname}]: %(message)s")
    return asyncio.run(Daemon(ifname, pool, "generic", dataplane_factory=OneRefusedWrite).run())


if __name__ == "__main__":
    sys.exit(main())
