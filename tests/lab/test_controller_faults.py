"""The controller under faults, in the PACS lab (generic XDP on veth).

The real daemon, real maps (through tests/lab/flaky_writer.py, which only
makes the real map writer refuse one write on demand), real Orthanc
servers and dcmtk's storescu through the VIP.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

import lab as labtool
import pacs_lab
from lab_xdplb import Balancer, backend_health
from make_dicom import make_study

pytestmark = [pytest.mark.root, pytest.mark.lab]

INTERVAL, TIMEOUT, RISE, FALL = 1.0, 0.5, 2, 2
DETECT_BOUND = FALL * INTERVAL + 1.0      # the failover bound the product promises (README)
SERVICE = "synapse-dicom"
FLAKY = Path(__file__).with_name("flaky_writer.py")


@pytest.fixture(scope="module")
def pacs():
    with labtool.temporary_lab("xf", pacs=True) as the_lab:
        yield the_lab


def test_a_pacs_killed_while_a_map_write_fails_still_leaves_within_the_bound(pacs, tmp_path, monkeypatch):
    trigger = tmp_path / "fail-next-write"
    monkeypatch.setenv("XDPLB_FAIL_WRITE", str(trigger))
    pool = tmp_path / "pool.toml"
    # The DICOM service only, so the failover's first pass is the one refused.
    text = pacs_lab.pool_text(pacs, "tcp", INTERVAL, TIMEOUT, RISE, FALL)
    pool.write_text(text.split('\n[[service]]\nname = "synapse-web"')[0])
    assert "synapse-web" not in pool.read_text()
    b = Balancer(pacs, pool, tmp_path / "run", tmp_path / "xdplb.log")
    b.start([sys.executable, str(FLAKY), "eth0", str(pool)])
    try:
        b.wait_ready()
        b.wait_for(lambda st: all(h == "up" for h in backend_health(st, SERVICE).values()), 20, "every PACS up")
        files = [path for path, _uid in make_study(tmp_path / "study", 150, 16 * 1024)]
        watch = pacs_lab.watch_store(pacs, 8.0, files)
        started = time.monotonic()
        time.sleep(1.0)
        trigger.touch()                       # the failover's own writes are refused once
        killed_wall = time.time()
        pacs_lab.kill_orthanc(pacs, "be2")
        killed_at = time.monotonic() - started
        out, _ = watch.communicate(timeout=60)
        tries = [(float(t), r) for t, r, _f in (line.split(maxsplit=2) for line in out.splitlines())]
        after = [(t, r) for t, r in tries if t >= killed_at]
        failures = [t for t, r in after if r == "fail"]
        failover = (max(failures) - killed_at) if failures else 0.0
        st = b.status()
        svc = next(s for s in st["services"] if s["name"] == SERVICE)
        be2 = next(x for x in svc["backends"] if x["name"] == "be2")
        print(f"\nfailover with one refused map write: last failed C-STORE {failover:.2f}s after the kill "
              f"(bound {DETECT_BOUND:.1f}s), {len(failures)} failed of {len(after)} tries after it; "
              f"map write errors {st.get('map_writes')}, be2 {be2['health']} "
              f"{be2['since'] - killed_wall:.2f}s after the kill")
        assert not trigger.exists(), "the injected failure never happened"
        assert failover <= DETECT_BOUND
        late = [r for t, r in after if t > killed_at + DETECT_BOUND]
        assert len(late) >= 15 and all(r == "ok" for r in late), out
        assert be2["health"] == "down" and not be2["forwarding"] and be2["table_slots"] == 0
        assert st["map_writes"]["errors_total"] >= 1 and st["map_writes"]["error"] is None
        assert "refusing the first of" in b.log() and "rebuilt the applied state from the maps" in b.log()

        # The probe task survived: be2 comes back when its Orthanc does.
        pacs_lab.start_orthanc(pacs, "be2")
        b.wait_for(lambda s: backend_health(s, SERVICE)["be2"] == "up", RISE * INTERVAL + 3, "be2 up again")
    finally:
        assert b.stop() == 0, b.log()
        b.release()
        print(b.log()[-3000:])
