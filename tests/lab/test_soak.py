"""Soak: five minutes of DICOM stores through the VIP while the PACS pool is
disturbed in every way an operator or a failure would, in the PACS lab
(real `xdplb attach`, generic XDP on veth, Orthanc, dcmtk, curl).

Bounded and self-stopping: the store watcher ends after SOAK_SECONDS and
the disturbance cycles stop before it. Asserts that no C-STORE fails
outside the detection window after a PACS is killed, and that the daemon's
file descriptors and memory stay flat; prints both.
"""
from __future__ import annotations

import json
import os
import time

import pytest

import lab as labtool
import pacs_lab
from lab_xdplb import Balancer, backend_health
from make_dicom import make_study

pytestmark = [pytest.mark.root, pytest.mark.lab]

SOAK_SECONDS = 300.0
INTERVAL, TIMEOUT, RISE, FALL = 1.0, 0.5, 2, 2
DETECT_BOUND = FALL * INTERVAL + 1.0       # the failover bound the product promises (README)
# A try is stamped when it starts (on the watcher's clock, which starts a
# few hundred ms after ours); one already under way when its PACS is killed
# fails with it. storescu's timeouts (-to 1 -ta 1) bound how long before
# the kill such a try can have started.
IN_FLIGHT = 1.5
RETURN_BOUND = RISE * INTERVAL + 5.0
SERVICE = "synapse-dicom"
METRICS = "127.0.0.1:9752"
FD_SLACK = 3                               # fds the daemon may hold momentarily (a client, a probe)
RSS_SLACK_KIB = 8 * 1024


@pytest.fixture(scope="module")
def pacs():
    with labtool.temporary_lab("xk", pacs=True) as the_lab:
        yield the_lab


def _proc(pid: int) -> tuple[int, int]:
    """(open file descriptors, resident KiB) of a process."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    rss = next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS:"))
    return fds, rss


def test_soak_stores_through_kills_drains_reloads_top_and_scrapes(pacs, tmp_path):
    base = pacs_lab.pool_text(pacs, "tcp", INTERVAL, TIMEOUT, RISE, FALL).replace(
        'metrics = ""', f'metrics = "{METRICS}"')
    pool = tmp_path / "pool.toml"
    pool.write_text(base)
    b = Balancer(pacs, pool, tmp_path / "run", tmp_path / "xdplb.log").start()
    names = pacs.backend_names()
    try:
        b.wait_ready()
        b.wait_for(lambda st: all(h == "up" for h in backend_health(st, SERVICE).values()), 20, "every PACS up")
        pid = b.status()["pid"]
        files = [path for path, _uid in make_study(tmp_path / "study", 5000, 8 * 1024)]
        counts_before = pacs_lab.counts(pacs)

        def chores() -> None:
            top = json.loads(b.cli("top", "-i", "eth0", "--once", "--json", "--interval", "0.5").stdout)
            assert top["services"], top
            scrape = pacs.run("lb", "curl", "-sf", f"http://{METRICS}/metrics", timeout=10).stdout
            assert "xdplb_backend_up{" in scrape

        watch = pacs_lab.watch_store(pacs, SOAK_SECONDS, files)
        t0 = time.monotonic()
        kills: list[float] = []
        samples: list[tuple[float, int, int]] = []
        cycle = 0
        while time.monotonic() - t0 < SOAK_SECONDS - 45:
            victim, other = names[cycle % len(names)], names[(cycle + 1) % len(names)]
            kills.append(time.monotonic() - t0)
            pacs_lab.kill_orthanc(pacs, victim)
            b.wait_for(lambda st: backend_health(st, SERVICE)[victim] == "down", DETECT_BOUND + 2, f"{victim} down")
            chores()
            time.sleep(2)
            pacs_lab.start_orthanc(pacs, victim)
            b.wait_for(lambda st: backend_health(st, SERVICE)[victim] == "up", RETURN_BOUND, f"{victim} up")
            b.cli("drain", SERVICE, other, "-i", "eth0")
            chores()
            time.sleep(2)
            b.cli("undrain", SERVICE, other, "-i", "eth0")
            ip = pacs.host_ip(other)
            pool.write_text(base if cycle % 2 else base.replace(f'address = "{ip}"', f'address = "{ip}"\n  weight = 2', 1))
            b.cli("reload", "-i", "eth0")
            chores()
            samples.append((time.monotonic() - t0, *_proc(pid)))
            cycle += 1
        out, _ = watch.communicate(timeout=SOAK_SECONDS + 120)
        st = b.status()
        samples.append((time.monotonic() - t0, *_proc(pid)))
    finally:
        code = b.stop()
        b.release()
        print(b.log()[-2000:])
    assert code == 0

    tries = [(float(t), r) for t, r, _f in (line.split(maxsplit=2) for line in out.splitlines())]
    failed = [t for t, r in tries if r == "fail"]
    outside = [t for t in failed if not any(k - IN_FLIGHT <= t <= k + DETECT_BOUND for k in kills)]
    landed = {n: pacs_lab.counts(pacs)[n] - counts_before.get(n, 0) for n in names}
    (t_start, fd_start, rss_start), (t_end, fd_end, rss_end) = samples[0], samples[-1]
    print(f"\nsoak {tries[-1][0]:.0f}s: {len(tries)} C-STOREs, {len(failed)} failed "
          f"(at {', '.join(f'{t:.1f}' for t in failed) or 'none'}); PACS kills at "
          f"{', '.join(f'{k:.1f}' for k in kills)}; {cycle} cycles of kill/restart, drain/undrain, reload, "
          f"top and scrape; stored per PACS {landed}; daemon fds {fd_start} at {t_start:.0f}s -> {fd_end} at "
          f"{t_end:.0f}s, RSS {rss_start} KiB -> {rss_end} KiB; map write errors {st['map_writes']['errors_total']}")
    assert tries[-1][0] >= SOAK_SECONDS - 5, "the store watcher ran out of files before the end"
    assert cycle >= 5
    assert outside == [], f"C-STOREs failed outside the detection windows at {outside}"
    # Every acknowledged store is in some Orthanc (one cut off by a kill may be there too).
    assert len(tries) - len(failed) <= sum(landed.values()) <= len(tries)
    assert fd_end - fd_start <= FD_SLACK, samples
    assert rss_end - rss_start <= RSS_SLACK_KIB, samples
