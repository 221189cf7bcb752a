"""The down grace with real DICOM: a paced C-STORE (dcmtk's storescu in the
client namespace) to Orthanc through `xdplb attach` in generic XDP mode on
the lab's veth, while the PACS that holds the association loses its link.

- grace 30 s (the default): a 3 s link flap, long enough for the PACS to be
  marked down, costs nothing; the store completes and its data set is intact;
- grace 3 s, PACS stays down: the stalled store is reset within the bound
  TCP's retransmission backoff gives (below), not left to hang;
- grace 0: the same flap breaks the store, as before the grace existed.

The store is paced by a token bucket (tc tbf) on the client's link, so it
lasts about 20 s whatever the machine's speed. Which PACS holds the
association is read from the backends' own sockets (ss), where the store
landed from Orthanc's REST API, never from xdplb.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

import lab as labtool
import pacs_lab
from lab_xdplb import Balancer, backend_health
from make_dicom import dataset_digest, make_instance

pytestmark = [pytest.mark.root, pytest.mark.lab]

INTERVAL, TIMEOUT, RISE, FALL = 1.0, 0.5, 2, 2
DETECT_BOUND = FALL * INTERVAL + 1.0
SERVICE = "synapse-dicom"
PACE = "24mbit"                    # client's link: 3 MB/s
STORE_BYTES = 64 * 1024 * 1024     # about 22 s at that pace
FLAP_SECONDS = 3.0
# Linux's smallest retransmission timeout (TCP_RTO_MIN); on the lab's veths
# the smoothed RTT is microseconds, so the first RTO is this.
RTO_MIN = 0.2


@pytest.fixture(scope="module")
def pacs():
    with labtool.temporary_lab("xg", pacs=True) as the_lab:
        the_lab.run("client", "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", PACE,
                    "burst", "64kb", "latency", "500ms")
        yield the_lab


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """(path, SOP Instance UID) of one large instance; each test stores it anew."""
    path = tmp_path_factory.mktemp("grace") / "paced.dcm"
    uid = make_instance(path, STORE_BYTES)
    yield path, uid
    path.unlink(missing_ok=True)


def balancer_with_grace(pacs, work: Path, grace: float) -> Balancer:
    work.mkdir(parents=True, exist_ok=True)
    text = pacs_lab.pool_text(pacs, "tcp", INTERVAL, TIMEOUT, RISE, FALL)
    assert "[xdplb]\n" in text
    pool = work / "pool.toml"
    pool.write_text(text.replace("[xdplb]\n", f"[xdplb]\ndown_grace = {grace}\n", 1))
    b = Balancer(pacs, pool, work / "run", work / "xdplb.log").start()
    try:
        b.wait_ready()
        b.wait_for(lambda st: all(h == "up" for h in backend_health(st, SERVICE).values()), 20.0,
                   "every PACS up")
    except BaseException:
        stop(b)
        raise
    return b


def stop(b: Balancer) -> None:
    b.stop()
    b.release()
    print(b.log())


@pytest.fixture
def grace_balancer(pacs, tmp_path):
    made = []

    def start(grace: float) -> Balancer:
        made.append(balancer_with_grace(pacs, tmp_path / "xdplb", grace))
        return made[-1]
    yield start
    for b in made:
        stop(b)


def carrier(pacs, deadline: float = 10.0) -> str:
    """The backend holding the client's established DICOM association to the
    VIP, found by the client's own port: an earlier test's broken store can
    leave a stale established socket on another backend."""
    end = time.monotonic() + deadline
    while True:
        mine = pacs.run("client", "ss", "-Htn", "state", "established",
                        f"( dport = :{pacs_lab.DICOM_PORT} and dst {pacs.vip} )").stdout.split()
        if mine:
            port = mine[-2].rsplit(":", 1)[1]     # Local Address:Port (no State column with a state filter)
            match = f"( sport = :{pacs_lab.DICOM_PORT} and dst {pacs.host_ip('client')}:{port} )"
            holders = [name for name in pacs.backend_names()
                       if pacs.run(name, "ss", "-Htn", "state", "established", match).stdout.strip()]
            if len(holders) == 1:
                return holders[0]
        assert time.monotonic() < end, "no single PACS holds the client's association"
        time.sleep(0.05)


def since(st: dict, name: str) -> float:
    svc = next(s for s in st["services"] if s["name"] == SERVICE)
    return next(b for b in svc["backends"] if b["name"] == name)["since"]


class PacedStore:
    """storescu of one large instance, started now, ended or killed on exit."""

    def __init__(self, pacs, path: Path):
        self.pacs = pacs
        self.started = time.monotonic()
        self.proc = pacs_lab.storescu(pacs, path, popen=True)

    def __enter__(self) -> "PacedStore":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> tuple[int, str, float]:
        """(exit status, output, seconds since start)."""
        out, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, time.monotonic() - self.started


def flap(pacs, b: Balancer, name: str) -> tuple[float, float]:
    """Take `name`'s link down for FLAP_SECONDS (and until it is marked down),
    then back. Returns (seconds until marked down, seconds the link was down)."""
    left_wall, left = time.time(), time.monotonic()
    pacs.link(name, False)
    try:
        st = b.wait_for(lambda s: backend_health(s, SERVICE)[name] == "down", DETECT_BOUND + 1, f"{name} down")
        marked = since(st, name) - left_wall
        time.sleep(max(0.0, FLAP_SECONDS - (time.monotonic() - left)))
    finally:
        pacs.link(name, True)
    return marked, time.monotonic() - left


def test_store_survives_its_pacs_losing_its_link_for_3_seconds(pacs, grace_balancer, study, tmp_path):
    path, uid = study
    b = grace_balancer(30.0)
    with PacedStore(pacs, path) as store:
        holder = carrier(pacs)
        time.sleep(2.0)
        assert store.running(), "the store ended before the flap; pace it slower"
        marked, down = flap(pacs, b, holder)
        b.wait_for(lambda s: backend_health(s, SERVICE)[holder] == "up", RISE * INTERVAL + 3, f"{holder} up")
        assert store.running(), "the store ended before its PACS was back"
        rc, out, seconds = store.wait(timeout=180)
    events = b.status()["events"]
    print(f"grace 30 s: {holder} marked down {marked:.2f}s after its link went down, link down {down:.2f}s; "
          f"store {'completed' if rc == 0 else 'FAILED'} in {seconds:.1f}s; "
          f"{events['down_grace']} packets kept on the down PACS, {events['flow_reselect']} re-chosen")
    assert rc == 0, out
    assert events["down_grace"] > 0, "the flap must have put packets through the grace path"
    found = pacs_lab.find_instance(pacs, uid)
    assert found is not None and found[0] == holder, found
    got = pacs_lab.download_instance(pacs, holder, found[1]["ID"], tmp_path / "stored.dcm")
    assert dataset_digest(got) == dataset_digest(path), "the stored data set differs from the one sent"


def test_short_grace_resets_a_store_to_a_pacs_that_stays_down(pacs, grace_balancer, study):
    """Bound: the client's first segment is lost at T0, its retransmissions
    follow at T0 + RTO·(2^k − 1). The flow is re-chosen from T0 + D + G (D:
    detection, read from the balancer; G: grace); the first retransmission
    after that comes before T0 + 2(D + G) + RTO, reaches another PACS, and
    its RST ends the store. Before T0 + D + G the store must still stand."""
    grace = 3.0
    b = grace_balancer(grace)
    with PacedStore(pacs, study[0]) as store:
        holder = carrier(pacs)
        time.sleep(2.0)
        assert store.running()
        left_wall, left = time.time(), time.monotonic()
        pacs.link(holder, False)
        try:
            st = b.wait_for(lambda s: backend_health(s, SERVICE)[holder] == "down", DETECT_BOUND + 1,
                            f"{holder} down")
            detect = since(st, holder) - left_wall
            bound = 2 * (detect + grace) + RTO_MIN + 1.0     # + 1 s for storescu to notice and exit
            rc, out, _ = store.wait(timeout=bound + 30)
            ended = time.monotonic() - left
        finally:
            pacs.link(holder, True)
    print(f"grace {grace:g} s, {holder} gone: marked down {detect:.2f}s after its link went down; store reset "
          f"{ended:.2f}s after (grace ends at {detect + grace:.2f}s, bound {bound:.2f}s)")
    assert rc != 0, out
    assert ended >= detect + grace - 0.1, "reset before the grace ended"
    assert ended <= bound, f"reset {ended:.2f}s after the loss, later than the bound {bound:.2f}s"
    b.wait_for(lambda s: backend_health(s, SERVICE)[holder] == "up", RISE * INTERVAL + 3, f"{holder} back")


def test_grace_zero_the_flap_breaks_the_store(pacs, grace_balancer, study):
    b = grace_balancer(0)
    with PacedStore(pacs, study[0]) as store:
        holder = carrier(pacs)
        time.sleep(2.0)
        assert store.running()
        marked, down = flap(pacs, b, holder)
        rc, out, seconds = store.wait(timeout=180)
    b.wait_for(lambda s: backend_health(s, SERVICE)[holder] == "up", RISE * INTERVAL + 3, f"{holder} back")
    print(f"grace 0: {holder} marked down {marked:.2f}s after its link went down, link down {down:.2f}s; "
          f"store ended with status {rc} after {seconds:.1f}s")
    assert rc != 0, "with grace 0 a flow is re-chosen the moment its PACS is marked down"
