#!/usr/bin/python3
"""PACS lab: real Orthanc in every backend namespace, dcmtk in the client.

Builds on ``tools/lab.py``: ``Lab(pacs=True)`` (or ``tools/lab.py up
--pacs``) makes the usual namespaces, leaves DICOM ports 104/11112 free of
the stand-in servers and calls ``start_all`` here, which starts Debian's
Orthanc in each backend namespace with a configuration written by the
shared ``tools/provision/orthanc-config.sh`` (AE title SYNAPSE, DICOM 104,
HTTP 8042, every address, storage in ``<state dir>/orthanc/<backend>/``).
``Lab.down()`` calls ``stop_all``, which stops them and removes the storage.

Client side: ``storescu``/``echoscu`` (dcmtk) run in the client namespace;
``watch_store`` makes one new C-STORE association every ~100 ms and records
which tries failed.  Counts come from each Orthanc's REST API
(``/statistics``), queried with curl inside the backend's namespace, never
from xdplb.  Standard library only (DICOM files come from make_dicom.py).

CLI (as root, on a lab made with ``tools/lab.py up --pacs``)::

    tools/pacs_lab.py counts [--prefix P]            instances held by each Orthanc
    tools/pacs_lab.py store [--prefix P] FILE...     one storescu association per file, via the VIP
    tools/pacs_lab.py echo [--prefix P]              echoscu through the VIP
    tools/pacs_lab.py watch HOST PORT SECONDS FILE...
                                                     (run in the client namespace by watch_store)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

TOOLS_DIR = Path(__file__).resolve().parent
if str(TOOLS_DIR) not in sys.path:
    sys.path.insert(0, str(TOOLS_DIR))

import lab as labtool  # noqa: E402  (tools/ on sys.path above)

ORTHANC = "/usr/sbin/Orthanc"
CONFIG_SCRIPT = TOOLS_DIR / "provision" / "orthanc-config.sh"
PACKAGES_SCRIPT = TOOLS_DIR / "provision" / "packages.sh"
POOL_SCRIPT = TOOLS_DIR / "provision" / "xdplb-pool.sh"
AET = "SYNAPSE"               # the PACS's AE title, as a modality is configured
MODALITY_AET = "MODALITY"     # the calling AE title of the lab's dcmtk clients
PROBE_AET = "XDPLB"           # calling AE of xdplb's DICOM health check (set by xdplb-pool.sh)
DICOM_PORT = 104
HTTP_PORT = 8042
READY_DEADLINE = 30.0         # seconds for an Orthanc to answer REST and DICOM
STOP_GRACE = 5.0
POLL = 0.1

# Run inside a backend namespace: wait until Orthanc answers REST on
# 127.0.0.1 and accepts TCP on DICOM_PORT at the host's own address.
_READY_PROBE = """
import socket, sys, time, urllib.request
host, dicom, http, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
deadline = time.monotonic() + budget
while True:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{http}/system", timeout=1).read()
        socket.create_connection((host, dicom), timeout=1).close()
        break
    except OSError as exc:
        if time.monotonic() > deadline:
            sys.exit(f"Orthanc on {host} not answering REST {http} and DICOM {dicom}: {exc}")
        time.sleep(0.1)
"""

# Run in the client namespace: exit 0 when HOST:PORT accepts a TCP connection.
_TCP_CONNECT = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()"

# Popen objects of running Orthancs, keyed by (state dir, backend), so a
# killed one is reaped rather than left a zombie.
_PROCS: dict[tuple[str, str], subprocess.Popen] = {}


# ---- Orthanc servers --------------------------------------------------------

def orthanc_dir(lab, name: str) -> Path:
    """Config, storage, log and pid file of one backend's Orthanc."""
    return Path(lab.state_dir) / "orthanc" / name


def orthanc_pid(lab, name: str) -> int | None:
    """Pid of a backend's Orthanc if it runs (not a zombie), else None."""
    try:
        pid = int((orthanc_dir(lab, name) / "pid").read_text())
        stat = Path(f"/proc/{pid}/stat").read_text()
        exe = os.readlink(f"/proc/{pid}/exe")
    except (OSError, ValueError):
        return None
    if stat.rsplit(")", 1)[-1].split()[0] == "Z" or not exe.endswith("/Orthanc"):
        return None
    return pid


def check_packages() -> None:
    """Fail clearly if Orthanc or dcmtk is missing (shared provisioning check)."""
    proc = subprocess.run(["bash", str(PACKAGES_SCRIPT), "--check", "pacs", "modality"],
                          capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise labtool.LabError(proc.stderr.strip() or proc.stdout.strip())


def write_config(lab, name: str, known_aets: tuple[str, ...] = (), dicom_port: int = DICOM_PORT,
                 modalities: dict[str, str] | None = None) -> Path:
    """Write ``name``'s Orthanc configuration with the shared provisioning script.

    ``modalities`` ({AE title: IPv4 address}) makes Orthanc accept only those
    callers, each from its own address (DicomCheckModalityHost).
    """
    base = orthanc_dir(lab, name)
    (base / "storage").mkdir(parents=True, exist_ok=True)
    config = base / "orthanc.json"
    argv = ["bash", str(CONFIG_SCRIPT), "--out", str(config), "--storage", str(base / "storage"),
            "--name", name, "--aet", AET, "--dicom-port", str(dicom_port), "--http-port", str(HTTP_PORT)]
    for known in known_aets:
        argv += ["--known-aet", known]
    for aet, host in (modalities or {}).items():
        argv += ["--modality", f"{aet}={host}"]
    if modalities:
        argv.append("--check-modality-host")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise labtool.LabError(f"{CONFIG_SCRIPT.name} for {name}: {proc.stderr.strip()}")
    return config


def start_orthanc(lab, name: str, known_aets: tuple[str, ...] = (), dicom_port: int = DICOM_PORT,
                  modalities: dict[str, str] | None = None) -> None:
    """(Re)start ``name``'s Orthanc, keeping its storage; wait until it serves.

    With ``known_aets`` it accepts associations only from those calling AE
    titles, and ``forget_caller`` can withdraw one while it runs; with
    ``modalities`` only from those AE titles at those addresses.
    """
    if name not in lab.backend_names():
        raise labtool.LabError(f"no backend {name!r}: use {', '.join(lab.backend_names())}")
    stop_orthanc(lab, name)
    config = write_config(lab, name, known_aets, dicom_port, modalities)
    base = orthanc_dir(lab, name)
    with open(base / "log", "ab") as log:
        # `ip netns exec` execs, so the Popen's pid is Orthanc's own.
        proc = lab.popen(name, ORTHANC, config, stdin=subprocess.DEVNULL, stdout=log,
                         stderr=subprocess.STDOUT, start_new_session=True)
    _PROCS[(str(lab.state_dir), name)] = proc
    (base / "pid").write_text(f"{proc.pid}\n")
    wait_orthanc_ready(lab, name, dicom_port=dicom_port)


def wait_orthanc_ready(lab, name: str, budget: float = READY_DEADLINE, dicom_port: int = DICOM_PORT) -> None:
    probe = lab.run(name, "/usr/bin/python3", "-c", _READY_PROBE, lab.host_ip(name), dicom_port,
                    HTTP_PORT, budget, check=False, timeout=budget + 10)
    if probe.returncode != 0:
        log = orthanc_dir(lab, name) / "log"
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:]) if log.exists() else ""
        raise labtool.LabError(f"{name}: {probe.stderr.strip()}; {log}:\n{tail}")


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it may have just exited
        os.kill(pid, sig)


def stop_server(running, proc: subprocess.Popen | None, graceful: bool) -> None:
    """Stop a server whose pid ``running()`` gives (None once it is gone):
    SIGTERM, then SIGKILL after STOP_GRACE, or SIGKILL at once; reap ``proc``."""
    pid = running()
    if pid is not None:
        _signal(pid, signal.SIGTERM if graceful else signal.SIGKILL)
        deadline = time.monotonic() + STOP_GRACE
        while running() is not None:
            if proc is not None and proc.poll() is not None:
                break
            if time.monotonic() > deadline:
                _signal(pid, signal.SIGKILL)
                deadline += STOP_GRACE
            time.sleep(0.02)
    if proc is not None:
        try:
            proc.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            pass


def stop_orthanc(lab, name: str, graceful: bool = True) -> None:
    """Stop ``name``'s Orthanc: SIGTERM (then SIGKILL), or SIGKILL at once."""
    stop_server(lambda: orthanc_pid(lab, name), _PROCS.pop((str(lab.state_dir), name), None), graceful)
    (orthanc_dir(lab, name) / "pid").unlink(missing_ok=True)


def kill_orthanc(lab, name: str) -> None:
    """SIGKILL ``name``'s Orthanc: its port closes, its host stays."""
    stop_orthanc(lab, name, graceful=False)


def start_all(lab) -> None:
    """Start an Orthanc in every backend namespace (called by Lab.up)."""
    check_packages()
    if not Path(ORTHANC).exists():
        raise labtool.LabError(f"{ORTHANC} not found: install orthanc (tools/setup.sh)")
    for name in lab.backend_names():
        start_orthanc(lab, name)


def stop_all(lab) -> None:
    """Stop every Orthanc of the lab and delete their storage (called by Lab.down).

    Every backend directory found counts, not only this Lab's backends: a
    crashed run may have had more than the Lab that cleans up after it."""
    root = Path(lab.state_dir) / "orthanc"
    found = {d.name for d in root.iterdir() if d.is_dir()} if root.is_dir() else set()
    for name in sorted(found | set(lab.backend_names())):
        stop_orthanc(lab, name)
    shutil.rmtree(Path(lab.state_dir) / "orthanc", ignore_errors=True)


# ---- pool file --------------------------------------------------------------

def pool_text(lab, check: str = "tcp", interval: float = 1.0, timeout: float = 0.5,
              rise: int = 2, fall: int = 2) -> str:
    """The lab's pool, from the shared tools/provision/xdplb-pool.sh.

    DICOM (104) probed by ``check`` ("tcp", or "dicom": an association from
    PROBE_AET to SYNAPSE and a C-ECHO), Orthanc's web port 8042 by TCP.
    """
    argv = ["bash", str(POOL_SCRIPT), "--vip", lab.vip, "--check", check, "--interval", str(interval),
            "--timeout", str(timeout), "--rise", str(rise), "--fall", str(fall),
            *(f"{name}={lab.host_ip(name)}" for name in lab.backend_names())]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise labtool.LabError(f"{POOL_SCRIPT.name}: {proc.stderr.strip()}")
    return proc.stdout


# ---- Orthanc's REST API -----------------------------------------------------

def rest(lab, name: str, path: str, data: str | None = None, raw: bool = False, method: str | None = None):
    """GET (or POST ``data`` to) ``name``'s Orthanc at ``path``; parsed JSON."""
    argv = ["curl", "-sS", "--fail", "-m", "30", f"http://127.0.0.1:{HTTP_PORT}{path}"]
    if data is not None:
        argv += ["--data-binary", data]
    if method is not None:
        argv += ["-X", method]
    out = lab.run(name, *argv, timeout=60).stdout
    return out if raw else json.loads(out)


def forget_caller(lab, name: str, aet: str) -> None:
    """Make ``name``'s Orthanc (started with known_aets) reject calls from ``aet``, live."""
    rest(lab, name, f"/modalities/{aet}", method="DELETE", raw=True)


def admit_caller(lab, name: str, aet: str) -> None:
    """Undo ``forget_caller``: accept associations from ``aet`` again, live."""
    rest(lab, name, f"/modalities/{aet}", data=json.dumps([aet, "127.0.0.1", DICOM_PORT]),
         method="PUT", raw=True)


def instance_count(lab, name: str) -> int:
    """Instances ``name``'s Orthanc holds, from its /statistics."""
    return int(rest(lab, name, "/statistics")["CountInstances"])


def counts(lab) -> dict[str, int]:
    """{backend: instances held}, for every backend whose Orthanc runs."""
    return {name: instance_count(lab, name) for name in lab.backend_names()
            if orthanc_pid(lab, name) is not None}


def find_instance(lab, sop_instance_uid: str) -> tuple[str, dict] | None:
    """(backend, Orthanc's /instances/{id} record) of the server holding the UID."""
    for name in lab.backend_names():
        if orthanc_pid(lab, name) is None:
            continue
        for hit in rest(lab, name, "/tools/lookup", data=sop_instance_uid):
            if hit.get("Type") == "Instance":
                return name, rest(lab, name, f"/instances/{hit['ID']}")
    return None


def download_instance(lab, name: str, orthanc_id: str, dest: Path) -> Path:
    """Save the DICOM file ``name``'s Orthanc stored for ``orthanc_id``."""
    lab.run(name, "curl", "-sS", "--fail", "-m", "300", "-o", dest,
            f"http://127.0.0.1:{HTTP_PORT}/instances/{orthanc_id}/file", timeout=320)
    return dest


# ---- dcmtk clients in the client namespace ----------------------------------

def _dcmtk_args(host: str, port: int, called: str, calling: str) -> list[str]:
    # -to: TCP connect timeout; -ta: association (ACSE) timeout.
    return ["-aet", calling, "-aec", called, "-to", "5", "-ta", "5", host, str(port)]


def storescu(lab, *files: Path | str, host: str | None = None, port: int = DICOM_PORT,
             called: str = AET, calling: str = MODALITY_AET, timeout: float = 600,
             popen: bool = False, source: str = "client"):
    """One storescu association carrying ``files``, from ``source``'s namespace."""
    argv = ["storescu", *_dcmtk_args(host or lab.vip, port, called, calling), *map(str, files)]
    if popen:
        return lab.popen(source, *argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return lab.run(source, *argv, check=False, timeout=timeout)


def echoscu(lab, host: str | None = None, port: int = DICOM_PORT, called: str = AET,
            calling: str = MODALITY_AET, source: str = "client") -> subprocess.CompletedProcess:
    """One C-ECHO (echoscu) from ``source``'s namespace."""
    argv = ["echoscu", *_dcmtk_args(host or lab.vip, port, called, calling)]
    return lab.run(source, *argv, check=False, timeout=30)


def store_each(lab, files: list[Path], host: str | None = None) -> list[tuple[str, int]]:
    """One storescu association per file (a new TCP flow each), in one shell.

    Returns ``[(file, storescu exit status), ...]``.
    """
    args = " ".join(_dcmtk_args(host or lab.vip, DICOM_PORT, AET, MODALITY_AET))
    script = f'for f in "$@"; do storescu {args} "$f" >/dev/null 2>&1; echo "$? $f"; done'
    out = lab.run("client", "bash", "-c", script, "store_each", *map(str, files),
                  check=False, timeout=30 + 10 * len(files)).stdout
    return [(f, int(rc)) for rc, f in (line.split(" ", 1) for line in out.splitlines())]


def watch_store(lab, seconds: float, files: list[Path], host: str | None = None) -> subprocess.Popen:
    """Start ``watch`` in the client namespace; its stdout gives one line per try."""
    return lab.popen("client", "/usr/bin/python3", Path(__file__), "watch", host or lab.vip,
                     DICOM_PORT, seconds, *map(str, files), stdout=subprocess.PIPE, text=True)


def _dcmtk_store_once(host: str, port: int, path: str) -> bool:
    # Short timeouts: a try that hangs on a vanished host must not hide
    # the next one; DIMSE timeout bounds the C-STORE itself.
    return subprocess.run(["storescu", "-aet", MODALITY_AET, "-aec", AET, "-to", "1", "-ta", "1",
                           "-td", "2", host, str(port), path],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


def watch(host: str, port: int, seconds: float, files: list[str], send=_dcmtk_store_once) -> int:
    """Send the files one association each, ~every 100 ms, for ``seconds``.

    Prints ``<t> ok|fail <file>`` per try, t = seconds since the start (the
    start of the try).  Each file is sent once; running out of files ends it.
    ``send(host, port, path)`` makes one association and says whether the
    C-STORE succeeded: dcmtk's storescu here, pynetdicom for IPv6
    (tools/dicom_scu.py).
    """
    start = time.monotonic()
    for path in files:
        now = time.monotonic() - start
        if now >= seconds:
            break
        ok = send(host, port, path)
        print(f"{now:.3f} {'ok' if ok else 'fail'} {path}", flush=True)
        time.sleep(max(0.0, 0.1 - (time.monotonic() - start - now)))
    return 0


def carrier(lab) -> str:
    """The backend holding the client's (only) established DICOM association."""
    match = f"( sport = :{DICOM_PORT} and dst {lab.host_ip('client')} )"
    holders = [name for name in lab.backend_names()
               if lab.run(name, "ss", "-Htn", "state", "established", match).stdout.strip()]
    if len(holders) != 1:
        raise AssertionError(f"the client's association is held by {holders}, not by one backend")
    return holders[0]


def long_transfer(lab, balancer, health, size: int, big: Path, stored: Path,
                  down_bound: float, up_bound: float) -> str:
    """One C-STORE of a ``size``-byte instance that must survive another backend's host leaving.

    While storescu sends ``big`` (written here) in one association, another
    backend's link goes down (no RST: the host vanishes from the segment)
    until ``balancer`` (anything with ``wait_for(predicate, timeout, what)``
    over ``xdplb status --json``) shows it down, then comes back until it is
    up; ``health(status)`` gives {backend: "up"|"down"}.  Then the stored
    instance is fetched back from the carrier's Orthanc into ``stored`` and
    its data set must match byte for byte.  AssertionError otherwise,
    including when the transfer ended before the loss, which proves
    nothing.  Returns a one-line summary with the timings.
    """
    from make_dicom import dataset_digest, make_instance   # pydicom: not for the namespace side

    made = time.monotonic()
    uid = make_instance(big, size)
    sent_size, sent_digest = dataset_digest(big)
    print(f"made a {big.stat().st_size} byte instance in {time.monotonic() - made:.1f}s", flush=True)
    started = time.monotonic()
    store = storescu(lab, big, popen=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                holder = carrier(lab)
                break
            except AssertionError:
                if time.monotonic() > deadline or store.poll() is not None:
                    raise
                time.sleep(0.05)
        other = next(name for name in lab.backend_names() if name != holder)
        lab.link(other, False)
        balancer.wait_for(lambda st: health(st)[other] == "down", down_bound, f"{other} down")
        down_at = time.monotonic() - started
        lab.link(other, True)
        balancer.wait_for(lambda st: health(st)[other] == "up", up_bound, f"{other} up")
        returned_at = time.monotonic() - started
        assert store.poll() is None, (f"the transfer ended {returned_at:.1f}s in, before {other} had left "
                                      f"and returned; send a larger instance")
        out, _ = store.communicate(timeout=900)
    finally:
        if store.poll() is None:
            store.kill()
            store.wait()
    seconds = time.monotonic() - started
    assert store.returncode == 0, out

    found = find_instance(lab, uid)
    assert found is not None, f"no Orthanc holds {uid}"
    where, record = found
    assert where == holder, f"{uid} landed on {where}, the association was held by {holder}"
    download_instance(lab, where, record["ID"], stored)
    got_size, got_digest = dataset_digest(stored)
    summary = (f"{big.stat().st_size} bytes to {holder} in {seconds:.1f}s "
               f"({big.stat().st_size / seconds / 1e6:.1f} MB/s); {other} marked down {down_at:.1f}s in "
               f"and back up {returned_at:.1f}s in; Orthanc reports FileSize {record['FileSize']}, "
               f"data set {got_size} bytes (sent {sent_size})")
    print(f"long transfer: {summary}", flush=True)
    assert (got_size, got_digest) == (sent_size, sent_digest), summary
    assert abs(record["FileSize"] - big.stat().st_size) < 256, summary   # only the meta header differs
    return summary


# ---- the demo (tools/demo.sh, tools/demo.py) --------------------------------

def demo(prefix: str = labtool.DEFAULT_PREFIX) -> int:
    """Build a PACS lab, balance it, send studies, show counts and a failover."""
    import tempfile

    from lab_xdplb import Balancer, backend_health
    from make_dicom import make_study
    from xdplb.config import HEALTH_CHECK_KINDS

    def step(text: str) -> None:
        print(f"\n== {text}", flush=True)

    def show_counts(before: dict[str, int] | None = None) -> None:
        for name, count in counts(lab).items():
            new = f"  (+{count - before.get(name, 0)})" if before is not None else ""
            print(f"   {name}: {count:3} instances{new}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="xdplb-pacs-demo-"))
    lab = labtool.Lab(prefix=prefix, pacs=True)
    lab.down()
    step(f"PACS lab: Orthanc (AE {AET}, DICOM {DICOM_PORT}, HTTP {HTTP_PORT}) on be1-be3, dcmtk on the client")
    lab.up()
    # be3 accepts only known callers, so it can start rejecting associations
    # later while its port still accepts TCP.
    callers = (PROBE_AET, MODALITY_AET)
    start_orthanc(lab, "be3", known_aets=callers)
    check = "dicom" if "dicom" in HEALTH_CHECK_KINDS else "tcp"
    pool = work / "pool.toml"
    pool.write_text(pool_text(lab, check))
    balancer = Balancer(lab, pool, work / "run", work / "xdplb.log")
    try:
        step(f"xdplb attach eth0 in the lb namespace (health check: {check})")
        balancer.start()
        balancer.wait_ready(timeout=240)   # bcc compiles at attach: ~10 s idle, a minute on a busy 2-core host
        proc = echoscu(lab)
        print(f"   C-ECHO to {lab.vip}:{DICOM_PORT}: {'ok' if proc.returncode == 0 else 'FAILED'}")

        step("5 studies of 4 instances (256 KiB each), one storescu association per instance")
        files = [path for path, _ in make_study(work / "studies", 20, 256 * 1024, studies=5)]
        before = counts(lab)
        results = store_each(lab, files)
        print(f"   {sum(rc == 0 for _, rc in results)} of {len(results)} C-STOREs succeeded; "
              "instances per PACS (Orthanc's /statistics):")
        show_counts(before)

        step("killing be2's Orthanc; a C-STORE every ~100 ms for 6 s")
        spares = [path for path, _ in make_study(work / "failover", 80, 16 * 1024)]
        before = counts(lab)
        watcher = watch_store(lab, 6.0, spares)
        started = time.monotonic()
        time.sleep(1.0)
        kill_orthanc(lab, "be2")
        killed = time.monotonic() - started
        out, _ = watcher.communicate(timeout=60)
        tries = [(float(t), r) for t, r, _ in (line.split(maxsplit=2) for line in out.splitlines())]
        failed = [t for t, r in tries if r == "fail" and t >= killed]
        last = max(failed) if failed else killed
        later = [r for t, r in tries if t > last]
        print(f"   {len(failed)} of {sum(t >= killed for t, _ in tries)} C-STOREs failed after the kill, "
              f"the last {last - killed:.2f}s after it; {later.count('ok')} of {len(later)} later ones succeeded")
        print("   " + "\n   ".join(line for line in balancer.log().splitlines() if "be2" in line))
        print("   instances per running PACS:")
        show_counts(before)

        step("be2's Orthanc comes back")
        start_orthanc(lab, "be2")
        balancer.wait_for(lambda st: backend_health(st, "synapse-dicom")["be2"] == "up", 10, "be2 up")
        before = counts(lab)
        store_each(lab, [path for path, _ in make_study(work / "after", 12, 64 * 1024)])
        show_counts(before)

        step(f"be3's Orthanc starts rejecting associations (calling AEs {', '.join(callers)} no longer known); "
             "its port still accepts TCP")
        for aet in callers:
            forget_caller(lab, "be3", aet)
        st = balancer.wait_for(lambda st: backend_health(st, "synapse-dicom")["be3"] == "down", 10, "be3 down")
        record = next(b for s in st["services"] if s["name"] == "synapse-dicom" for b in s["backends"]
                      if b["name"] == "be3")
        tcp = lab.run("client", "/usr/bin/python3", "-c", _TCP_CONNECT, lab.host_ip("be3"), DICOM_PORT,
                      check=False).returncode == 0
        print(f"   TCP connect to be3:{DICOM_PORT}: {'accepted' if tcp else 'refused'} (a TCP check would "
              f"call it healthy); C-ECHO to be3: "
              f"{'ok' if echoscu(lab, host=lab.host_ip('be3')).returncode == 0 else 'rejected'}")
        print(f"   xdplb's DICOM check took be3 out: {record['reason']}")
        before = counts(lab)
        results = store_each(lab, [path for path, _ in make_study(work / "rejecting", 12, 64 * 1024)])
        print(f"   {sum(rc == 0 for _, rc in results)} of {len(results)} C-STOREs succeeded:")
        show_counts(before)
    finally:
        step("stopping xdplb and tearing the lab down")
        balancer.stop()
        balancer.release()
        lab.down()
        shutil.rmtree(work, ignore_errors=True)
    print("\nPACS demo complete")
    return 0


# ---- command line -----------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--prefix", default=labtool.DEFAULT_PREFIX)
    p = argparse.ArgumentParser(prog="pacs_lab.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("counts", parents=[common], help="instances held by each Orthanc")
    store = sub.add_parser("store", parents=[common], help="storescu each file through the VIP")
    store.add_argument("files", nargs="+", type=Path)
    sub.add_parser("echo", parents=[common], help="echoscu through the VIP")
    w = sub.add_parser("watch", help="(internal) C-STORE loop, run in the client namespace")
    w.add_argument("host")
    w.add_argument("port", type=int)
    w.add_argument("seconds", type=float)
    w.add_argument("files", nargs="+")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "watch":
        return watch(args.host, args.port, args.seconds, args.files)
    try:
        lab = labtool.Lab.load(args.prefix)
        if not lab.is_up() or not getattr(lab, "pacs", False):
            raise labtool.LabError(f"no PACS lab {lab.prefix}: run tools/lab.py up --pacs first")
        if args.command == "counts":
            for name, count in counts(lab).items():
                print(f"{name} {count}")
        elif args.command == "store":
            failed = 0
            for path, rc in store_each(lab, args.files):
                failed += rc != 0
                print(f"{'ok  ' if rc == 0 else 'FAIL'} {path}")
            return 1 if failed else 0
        else:
            proc = echoscu(lab)
            print(f"C-ECHO to {lab.vip}:{DICOM_PORT}: {'ok' if proc.returncode == 0 else 'failed'}")
            sys.stdout.write(proc.stdout + proc.stderr)
            return proc.returncode
    except labtool.LabError as exc:
        print(f"pacs_lab.py: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
