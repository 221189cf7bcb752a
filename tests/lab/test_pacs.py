"""The PACS lab end to end: real Orthanc servers in the backend namespaces,
dcmtk's storescu/echoscu in the client namespace, the real `xdplb attach`
on the lb namespace's veth, DICOM instances made with pydicom.

Where instances landed is read from each Orthanc's REST API, never from
xdplb.  One balancer (TCP health check) serves the module; the tests run in
file order and each leaves the lab as it found it.  The last one replaces
that balancer with one using the DICOM health check.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

import lab as labtool
import pacs_lab
from lab_xdplb import Balancer, backend_health
from make_dicom import make_study

pytestmark = [pytest.mark.root, pytest.mark.lab]

INTERVAL, TIMEOUT, RISE, FALL = 1.0, 0.5, 2, 2
DETECT_BOUND = FALL * INTERVAL + 1.0      # the detection time the product promises
RETURN_BOUND = RISE * INTERVAL + 2.0
STARTUP_BOUND = 20.0                      # first probes of a new balancer (not a promise)
SMALL = 16 * 1024
# At least 100 MB, and long enough on a quiet 2-core machine (20-50 MB/s
# through generic XDP on veth) to span a host's loss and return (~5 s).
LONG_TRANSFER_BYTES = 512 * 1024 * 1024
SERVICE = "synapse-dicom"


@pytest.fixture(scope="module")
def pacs():
    """A PACS lab: three backends, each running Orthanc (AE SYNAPSE, 104, 8042)."""
    with labtool.temporary_lab("xp", pacs=True) as the_lab:
        yield the_lab


@pytest.fixture(scope="module")
def dicom_files(tmp_path_factory):
    """``dicom_files(n)``: n new small instances, each with its own SOP Instance UID."""
    root = tmp_path_factory.mktemp("dicom")
    made = iter(range(1, 1000))

    def make(count: int) -> list[Path]:
        return [path for path, _uid in make_study(root / f"batch{next(made)}", count, SMALL)]
    return make


def start_balancer(pacs, work: Path, check: str) -> Balancer:
    work.mkdir(parents=True, exist_ok=True)
    pool = work / "pool.toml"
    pool.write_text(pacs_lab.pool_text(pacs, check, INTERVAL, TIMEOUT, RISE, FALL))
    b = Balancer(pacs, pool, work / "run", work / "xdplb.log").start()
    try:
        b.wait_ready()
        b.wait_for(lambda st: all(h == "up" for h in backend_health(st, SERVICE).values()),
                   STARTUP_BOUND, "every PACS up")
    except BaseException:
        stop_balancer(b)
        raise
    return b


def stop_balancer(b: Balancer) -> None:
    b.stop()
    b.release()
    print(b.log())


@pytest.fixture(scope="module")
def balancer(pacs, tmp_path_factory):
    b = start_balancer(pacs, tmp_path_factory.mktemp("xdplb"), "tcp")
    try:
        yield b
    finally:
        stop_balancer(b)


def backend_record(st: dict, name: str) -> dict:
    svc = next(s for s in st["services"] if s["name"] == SERVICE)
    return next(b for b in svc["backends"] if b["name"] == name)


def delta(before: dict, after: dict) -> dict:
    return {name: after[name] - before.get(name, 0) for name in after}


def store_all_ok(pacs, files: list[Path]) -> None:
    results = pacs_lab.store_each(pacs, files)
    assert len(results) == len(files) and all(rc == 0 for _, rc in results), results


def test_c_echo_through_the_vip(pacs, balancer):
    assert all(h == "up" for h in backend_health(balancer.status(), SERVICE).values())
    echo = pacs_lab.echoscu(pacs)
    assert echo.returncode == 0, echo.stdout + echo.stderr
    # The right AE title matters: Orthanc answers as SYNAPSE on every backend.
    for name in pacs.backend_names():
        assert pacs_lab.rest(pacs, name, "/system")["DicomAet"] == "SYNAPSE"


def test_spread_60_c_stores_over_all_three_orthancs(pacs, balancer, dicom_files):
    files = dicom_files(60)
    before = pacs_lab.counts(pacs)
    store_all_ok(pacs, files)
    landed = delta(before, pacs_lab.counts(pacs))
    print(f"60 C-STORE associations through the VIP landed: {landed}")
    assert sum(landed.values()) == 60, landed
    assert set(landed) == set(pacs.backend_names()) and all(n > 0 for n in landed.values()), landed


def watch_tries(out: str) -> list[tuple[float, str]]:
    return [(float(t), result) for t, result, _file in (line.split(maxsplit=2) for line in out.splitlines())]


def test_failover_when_an_orthanc_is_killed(pacs, balancer, dicom_files):
    files = dicom_files(150)
    watch = pacs_lab.watch_store(pacs, 8.0, files)
    started = time.monotonic()
    time.sleep(1.0)  # let the watcher see the healthy state first
    killed_wall = time.time()
    pacs_lab.kill_orthanc(pacs, "be2")
    killed_at = time.monotonic() - started
    out, _ = watch.communicate(timeout=60)
    tries = watch_tries(out)
    after = [(t, r) for t, r in tries if t >= killed_at]
    failures = [t for t, r in after if r == "fail"]
    failover = (max(failures) - killed_at) if failures else 0.0
    record = backend_record(balancer.status(), "be2")
    print(f"failover: last failed C-STORE {failover:.2f}s after the kill, be2 marked down "
          f"{record['since'] - killed_wall:.2f}s after it (bound {DETECT_BOUND:.1f}s); "
          f"{len(failures)} failed of {len(after)} tries after the kill")
    assert failover <= DETECT_BOUND
    # Enough tries after the bound that, without failover, some would pick be2.
    late = [r for t, r in after if t > killed_at + DETECT_BOUND]
    assert len(late) >= 15 and all(r == "ok" for r in late), out
    assert record["health"] == "down" and not record["forwarding"]
    assert record["since"] - killed_wall <= DETECT_BOUND

    # Its return brings it new associations again.
    pacs_lab.start_orthanc(pacs, "be2")
    balancer.wait_for(lambda st: backend_health(st, SERVICE)["be2"] == "up", RETURN_BOUND, "be2 up again")
    before = pacs_lab.counts(pacs)
    store_all_ok(pacs, dicom_files(30))
    landed = delta(before, pacs_lab.counts(pacs))
    assert landed["be2"] > 0 and sum(landed.values()) == 30, landed


def test_long_transfer_survives_another_pacs_host_leaving_and_returning(pacs, balancer, tmp_path):
    big, stored = tmp_path / "long.dcm", tmp_path / "stored.dcm"
    try:
        pacs_lab.long_transfer(pacs, balancer, lambda st: backend_health(st, SERVICE), LONG_TRANSFER_BYTES,
                               big, stored, DETECT_BOUND + 1, RETURN_BOUND)
    finally:  # half a gigabyte each: do not leave them to pytest's kept temp dirs
        big.unlink(missing_ok=True)
        stored.unlink(missing_ok=True)


def test_host_loss_is_detected_in_the_configured_time(pacs, balancer, dicom_files):
    files = dicom_files(20)
    lost = "be3"
    left = time.time()
    pacs.link(lost, False)
    try:
        # The verdict, then the reconciler's pass that takes it out of the
        # table (a worker thread, a few grace periods), seen in one status.
        st = balancer.wait_for(lambda s: backend_record(s, lost)["health"] == "down"
                               and not backend_record(s, lost)["forwarding"]
                               and backend_record(s, lost)["table_slots"] == 0, DETECT_BOUND + 2,
                               f"{lost} down and out of the table")
        out_at = time.time() - left
        record = backend_record(st, lost)
        detected = record["since"] - left
        print(f"host loss: {lost} marked down {detected:.2f}s after its link went down, out of the table "
              f"by {out_at:.2f}s (bound {DETECT_BOUND:.1f}s): {record['reason']}")
        assert detected <= DETECT_BOUND
        before = pacs_lab.counts(pacs)  # REST is local to each namespace: be3's still answers
        store_all_ok(pacs, files)
        landed = delta(before, pacs_lab.counts(pacs))
        assert landed[lost] == 0 and sum(landed.values()) == len(files), landed
    finally:
        pacs.link(lost, True)
    balancer.wait_for(lambda s: backend_health(s, SERVICE)[lost] == "up", RETURN_BOUND, f"{lost} back")


def _tcp_accepts(pacs, host: str, port: int) -> bool:
    probe = ("import socket, sys\n"
             "socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()\n")
    return pacs.run("client", "/usr/bin/python3", "-c", probe, host, port, check=False).returncode == 0


def test_dicom_health_takes_out_a_pacs_that_rejects_associations(pacs, balancer, dicom_files, tmp_path):
    from xdplb.config import HEALTH_CHECK_KINDS
    assert "dicom" in HEALTH_CHECK_KINDS, "the DICOM health check (check = \"dicom\") does not exist yet"
    sick = "be3"
    callers = (pacs_lab.PROBE_AET, pacs_lab.MODALITY_AET)
    # be3's Orthanc accepts only known calling AE titles, so it can start
    # refusing associations live, its port staying open (no restart).
    pacs_lab.start_orthanc(pacs, sick, known_aets=callers)
    stop_balancer(balancer)   # one XDP program per interface: the DICOM-checked one replaces it
    b = start_balancer(pacs, tmp_path / "xdplb-dicom", "dicom")
    try:
        assert backend_record(b.status(), sick)["reason"].endswith("succeeded (status 0x0000)")
        refusing = time.time()
        for aet in callers:
            pacs_lab.forget_caller(pacs, sick, aet)
        st = b.wait_for(lambda s: backend_record(s, sick)["health"] == "down", DETECT_BOUND + 2,
                        f"{sick} down for rejecting associations")
        record = backend_record(st, sick)
        print(f"DICOM health: {sick} marked down {record['since'] - refusing:.2f}s after it began "
              f"rejecting associations (bound {DETECT_BOUND:.1f}s): {record['reason']}")
        assert "association rejected" in record["reason"]
        assert record["since"] - refusing <= DETECT_BOUND
        # The verdict reaches the table on the reconciler's next pass.
        st = b.wait_for(lambda s: not backend_record(s, sick)["forwarding"]
                        and backend_record(s, sick)["table_slots"] == 0, 3.0, f"{sick} out of the table")
        # It still accepts TCP - a TCP check would call it healthy - but no association.
        assert _tcp_accepts(pacs, pacs.host_ip(sick), pacs_lab.DICOM_PORT)
        assert pacs_lab.echoscu(pacs, host=pacs.host_ip(sick)).returncode != 0

        before = pacs_lab.counts(pacs)
        store_all_ok(pacs, dicom_files(30))
        landed = delta(before, pacs_lab.counts(pacs))
        assert landed[sick] == 0 and sum(landed.values()) == 30, landed
        assert pacs_lab.echoscu(pacs).returncode == 0

        # Accepting associations again brings it back into the table.
        for aet in callers:
            pacs_lab.admit_caller(pacs, sick, aet)
        b.wait_for(lambda s: backend_record(s, sick)["health"] == "up", RETURN_BOUND, f"{sick} up again")
        before = pacs_lab.counts(pacs)
        store_all_ok(pacs, dicom_files(30))
        assert delta(before, pacs_lab.counts(pacs))[sick] > 0
    finally:
        stop_balancer(b)
        pacs_lab.start_orthanc(pacs, sick)   # back to accepting any caller
