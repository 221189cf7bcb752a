"""The TLS tier end to end: real Orthanc servers, the real `xdplb attach` in the lb
namespace supervising Debian's HAProxy, curl and dcmtk (+tls) in the client namespace,
certificates and CA made here by openssl.

One pool, one health truth: the DICOM service is probed by C-ECHO (XDP tier);
synapse-https (VIP:443 -> Orthanc HTTP 8042) and synapse-dicom-tls (VIP:2762 ->
Orthanc DICOM 104) follow its verdicts (health_from), as does viewer-headers
(VIP:8443 -> the lab's stand-in HTTP server, which echoes the headers HAProxy
adds), and HAProxy's state is read
from its own runtime API (`show servers state`), never from xdplb. XDP mode: auto
(generic on veth, as in test_pacs.py); TLS packets are XDP_PASSed to the lb's stack.
The lab has four PACS (be1..be4); the pool starts with three, and a reload adds
the fourth. The tests run in file order and each leaves the lab as it found it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lab as labtool
import pacs_lab
from lab_xdplb import Balancer, backend_health
from make_dicom import dataset_digest, make_instance

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for certs.py

from certs import make_ca, make_expired, make_signed  # noqa: E402
from xdplb.tlstier import server_admin_states, worker_pid  # noqa: E402

pytestmark = [pytest.mark.root, pytest.mark.lab]

INTERVAL, TIMEOUT, RISE, FALL = 1.0, 0.5, 2, 2
DETECT_BOUND = FALL * INTERVAL + 1.0      # the XDP tier's promise, as in test_pacs.py
RETURN_BOUND = RISE * INTERVAL + 2.0
STARTUP_BOUND = 20.0
NAME = "pacs.lab"
SICK = "be3"
POOL = ("be1", "be2", "be3")   # the lab's fourth PACS, be4, joins in a reload
FOURTH = "be4"
HEADERS_PORT = 8080            # the lab's stand-in HTTP server: GET /headers echoes the request's headers
CALLERS = (pacs_lab.PROBE_AET, pacs_lab.MODALITY_AET)


def pool_text(lab, cert: Path, names=POOL) -> str:
    backends = "".join(f'  [[service.backend]]\n  name = "{n}"\n  address = "{lab.host_ip(n)}"\n'
                       for n in names)
    return f"""\
[xdplb]
metrics = ""

[[service]]
name = "synapse-dicom"
vip = "{lab.vip}"
port = 104
  [service.health]
  check = "dicom"
  calling_ae = "{pacs_lab.PROBE_AET}"
  called_ae = "{pacs_lab.AET}"
  interval = {INTERVAL}
  timeout = {TIMEOUT}
  rise = {RISE}
  fall = {FALL}
{backends}
[[service]]
name = "synapse-https"
vip = "{lab.vip}"
port = 443
  [service.tls]
  certificate = "{cert}"
  backend_protocol = "http"
  backend_port = {pacs_lab.HTTP_PORT}
  health_from = "synapse-dicom"
{backends}
[[service]]
name = "viewer-headers"
vip = "{lab.vip}"
port = 8443
  [service.tls]
  certificate = "{cert}"
  backend_protocol = "http"
  backend_port = {HEADERS_PORT}
  health_from = "synapse-dicom"
{backends}
[[service]]
name = "synapse-dicom-tls"
vip = "{lab.vip}"
port = 2762
  [service.tls]
  certificate = "{cert}"
  backend_protocol = "tcp"
  backend_port = {pacs_lab.DICOM_PORT}
  health_from = "synapse-dicom"
{backends}
[[service]]
name = "synapse-dicom-mtls"
vip = "{lab.vip}"
port = 2763
  [service.tls]
  certificate = "{cert}"
  backend_protocol = "tcp"
  backend_port = {pacs_lab.DICOM_PORT}
  health_from = "synapse-dicom"
  client_ca = "{cert.parent / 'ca.pem'}"
{backends}"""


@pytest.fixture(scope="module")
def pacs():
    with labtool.temporary_lab("xs", pacs=True, backends=len(POOL) + 1) as the_lab:
        # be3 accepts only known callers, so it can reject associations live, HTTP still up.
        pacs_lab.start_orthanc(the_lab, SICK, known_aets=CALLERS)
        yield the_lab


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    ca, _key = make_ca(d)
    return d, ca, make_signed(d, "pacs", NAME, serial=1001)


@pytest.fixture(scope="module")
def tier(pacs, certs, tmp_path_factory):
    work = tmp_path_factory.mktemp("xdplb-tls")
    pool = work / "pool.toml"
    pool.write_text(pool_text(pacs, certs[2]))
    b = Balancer(pacs, pool, work / "run", work / "xdplb.log").start()
    try:
        b.wait_ready()
        b.wait_for(lambda st: all(h == "up" for h in backend_health(st, "synapse-dicom").values()),
                   STARTUP_BOUND, "every PACS up")
        yield b
    finally:
        b.stop()
        b.release()
        print(b.log())


def haproxy_socket(b: Balancer) -> str:
    (path,) = b.run_dir.glob("**/eth0.haproxy.sock")
    return str(path)


def haproxy_states(b: Balancer, service: str) -> dict[str, str]:
    """{backend: "ready" | "drain" | "maint"} as HAProxy itself holds them."""
    return {server: word for (proxy, server), (word, _w) in server_admin_states(haproxy_socket(b)).items()
            if proxy == service}


def wait_states(b: Balancer, service: str, predicate, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        states = haproxy_states(b, service)
        if predicate(states):
            return states
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; HAProxy holds {states}")
        time.sleep(0.05)


def haproxy_masters(b: Balancer) -> list[int]:
    """Pids of the HAProxy masters running this balancer's configuration, read from /proc
    (never from xdplb): haproxy processes with `-f <its config>` that are the parent of
    another (their worker; a worker orphaned by a killed master has no child)."""
    (config,) = b.run_dir.glob("**/eth0.haproxy.cfg")
    needle = b"-f\0" + bytes(config) + b"\0"
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        comm, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if comm == "haproxy" and rest[0] != "Z" and needle in cmdline:
            parents[int(entry)] = int(rest[1])
    return sorted({ppid for ppid in parents.values() if ppid in parents})


def haproxy_master(b: Balancer) -> int:
    """The one HAProxy master serving the balancer's TLS services."""
    masters = haproxy_masters(b)
    assert len(masters) == 1, f"expected one haproxy master, found {masters}"
    return masters[0]


def curl(pacs, certs, path: str = "/system", check: bool = True) -> subprocess.CompletedProcess:
    _d, ca, _pem = certs
    return pacs.run("client", "curl", "-sS", "--fail", "-m", "10", "--cacert", str(ca),
                    "--resolve", f"{NAME}:443:{pacs.vip}", f"https://{NAME}{path}", check=check, timeout=30)


def served_serial(pacs) -> str:
    out = pacs.run("client", "sh", "-c", f"openssl s_client -connect {pacs.vip}:443 -servername {NAME} "
                   f"</dev/null 2>/dev/null | openssl x509 -noout -serial", timeout=30).stdout
    return out.strip()


def tls_dicom_args(certs) -> list[str]:
    return ["+tla", "+cf", str(certs[1]), "-aet", pacs_lab.MODALITY_AET, "-aec", pacs_lab.AET, "-to", "5",
            "-ta", "5"]


def test_https_through_the_vip_reaches_orthancs_web_port(pacs, certs, tier):
    import json
    system = json.loads(curl(pacs, certs).stdout)
    assert system["DicomAet"] == pacs_lab.AET
    page = curl(pacs, certs, "/app/explorer.html").stdout
    assert "<html" in page.lower()
    # Untrusted without our CA: the certificate is checked, not waved through.
    assert pacs.run("client", "curl", "-sS", "-m", "10", "--resolve", f"{NAME}:443:{pacs.vip}",
                    f"https://{NAME}/system", check=False, timeout=30).returncode == 60
    # The XDP program holds no TLS service: HAProxy on the lb's stack serves it.
    services = {s["name"]: s for s in tier.status()["services"]}
    assert services["synapse-https"]["id"] is None and services["synapse-dicom"]["id"] is not None
    assert haproxy_states(tier, "synapse-https") == {n: "ready" for n in POOL}
    # The runtime API is xdplb's alone: a 0600 socket in xdplb's 0700 run directory.
    sock = Path(haproxy_socket(tier))
    assert (sock.stat().st_mode & 0o777, sock.parent.stat().st_mode & 0o777) == (0o600, 0o700)
    # status shows HAProxy's own counters and the certificate (serial 1001 = 0x3e9).
    https = next(s for s in tier.status()["services"] if s["name"] == "synapse-https")
    assert sum(b["tls"]["connections"] for b in https["backends"]) >= 2
    assert sum(b["tls"]["bytes_out"] for b in https["backends"]) > len(page)
    assert [b["health"] for b in https["backends"]] == ["up", "up", "up"]      # followed verdicts
    assert [c["serial"] for c in https["tls"]["certificates"]] == [1001]
    text = tier.cli("status", "-i", "eth0").stdout
    assert "  tls: HAProxy running, cleartext http to port 8042, verdicts of synapse-dicom" in text


def test_http_backends_get_the_client_in_x_forwarded_for(pacs, certs, tier):
    out = pacs.run("client", "curl", "-sS", "--fail", "-m", "10", "--cacert", str(certs[1]), "--resolve",
                   f"{NAME}:8443:{pacs.vip}", f"https://{NAME}:8443/headers", timeout=30).stdout
    # HAProxy sends header names in lower case; HTTP names are case-insensitive.
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in out.splitlines() if ": " in line)}
    assert headers["x-forwarded-for"] == pacs.host_ip("client"), out
    assert headers["x-forwarded-proto"] == "https", out


def test_dicom_tls_echo_and_a_50_mb_store_arrive_byte_exact(pacs, certs, tier, tmp_path):
    echo = pacs.run("client", "echoscu", *tls_dicom_args(certs), pacs.vip, "2762", check=False, timeout=60)
    assert echo.returncode == 0, echo.stdout + echo.stderr
    big = tmp_path / "big.dcm"
    uid = make_instance(big, 50 * 1024 * 1024)
    sent = dataset_digest(big)
    started = time.monotonic()
    store = pacs.run("client", "storescu", *tls_dicom_args(certs), pacs.vip, "2762", str(big), check=False,
                     timeout=600)
    seconds = time.monotonic() - started
    assert store.returncode == 0, store.stdout + store.stderr
    holder, record = pacs_lab.find_instance(pacs, uid)
    stored = pacs_lab.download_instance(pacs, holder, record["ID"], tmp_path / "stored.dcm")
    print(f"storescu +tls: {big.stat().st_size} bytes through VIP:2762 to {holder} in {seconds:.1f}s "
          f"({big.stat().st_size / seconds / 1e6:.1f} MB/s)")
    assert dataset_digest(stored) == sent


def test_mutual_tls_admits_only_a_modality_with_a_certificate_from_the_ca(pacs, certs, tier):
    d, ca, _pem = certs
    modality = make_signed(d, "modality", "modality.lab", serial=5005)
    common = ["+cf", str(ca), "-aet", pacs_lab.MODALITY_AET, "-aec", pacs_lab.AET, "-to", "5", "-ta", "5"]
    signed = pacs.run("client", "echoscu", "+tls", str(modality), str(modality), *common, pacs.vip, "2763",
                      check=False, timeout=60)
    assert signed.returncode == 0, signed.stdout + signed.stderr
    anonymous = pacs.run("client", "echoscu", "+tla", *common, pacs.vip, "2763", check=False, timeout=60)
    assert anonymous.returncode != 0
    # A certificate from another CA is refused as well.
    other_dir = d / "other-ca"
    other_dir.mkdir(exist_ok=True)
    make_ca(other_dir, "some other CA")
    stranger = make_signed(other_dir, "stranger", "modality.lab", serial=6006)
    refused = pacs.run("client", "echoscu", "+tls", str(stranger), str(stranger), *common, pacs.vip, "2763",
                       check=False, timeout=60)
    assert refused.returncode != 0
    # Port 2762 asks no client certificate.
    assert pacs.run("client", "echoscu", "+tla", *common, pacs.vip, "2762", check=False, timeout=60).returncode == 0


@pytest.fixture(scope="module")
def everywhere(pacs, tmp_path_factory):
    """A 60 MB instance stored directly (cleartext, not through the VIP) on every pool PACS, so
    that an HTTPS download through the VIP finds it wherever HAProxy sends it:
    (Orthanc's id for it, {backend: SHA-256 of the file that Orthanc serves})."""
    path = tmp_path_factory.mktemp("everywhere") / "everywhere.dcm"
    uid = make_instance(path, 60 * 1024 * 1024)
    for name in POOL:
        stored = pacs_lab.storescu(pacs, path, host=pacs.host_ip(name))
        assert stored.returncode == 0, stored.stdout + stored.stderr
    (hit,) = [h for h in pacs_lab.rest(pacs, POOL[0], "/tools/lookup", data=uid) if h["Type"] == "Instance"]
    served = {name: pacs.run(name, "sh", "-c", f"curl -sS --fail http://127.0.0.1:{pacs_lab.HTTP_PORT}"
                             f"/instances/{hit['ID']}/file | sha256sum", timeout=120).stdout.split()[0]
              for name in POOL}
    return hit["ID"], served


def https_download(pacs, certs, orthanc_id: str, dest: Path, rate: str) -> subprocess.Popen:
    """curl through VIP:443 (HAProxy terminating TLS) downloading the instance's file at `rate`."""
    return pacs.popen("client", "curl", "-sS", "--fail", "--limit-rate", rate, "--cacert", str(certs[1]),
                      "--resolve", f"{NAME}:443:{pacs.vip}", "-o", str(dest),
                      f"https://{NAME}/instances/{orthanc_id}/file",
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def sha256(path: Path) -> str:
    import hashlib
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def reload(b: Balancer, what: str) -> dict:
    before = b.status()["last_reload"]
    b.signal(signal.SIGHUP)
    return b.wait_for(lambda s: s["last_reload"] != before, 30, what)["last_reload"]


def still_running(transfers: dict, during: str) -> None:
    """Every transfer still runs after `during`; one that ended says whether it failed."""
    for name, proc in transfers.items():
        if proc.poll() is not None:
            out = proc.communicate()[0]
            assert proc.returncode == 0, f"the {name} failed across {during}:\n{out}"
            raise AssertionError(f"the {name} ended before {during} was over; make it longer")


def served_by(pacs, certs, tries: int) -> set[str]:
    """Which PACS answered `tries` new HTTPS connections through the VIP (Orthanc's Name)."""
    import json
    return {json.loads(curl(pacs, certs).stdout)["Name"] for _ in range(tries)}


def test_a_reload_adds_a_fourth_pacs_while_a_tls_download_runs(pacs, certs, tier, everywhere, tmp_path):
    orthanc_id, served = everywhere
    original = tier.pool.read_text()
    got = tmp_path / "downloaded.dcm"
    # The download is throttled to last ~12 s; the reload and the fourth PACS's rise take ~3-5 s.
    download = https_download(pacs, certs, orthanc_id, got, "5M")
    # And a DICOM-TLS store (tcp mode) in flight across the same reload.
    big = tmp_path / "upload.dcm"
    uid = make_instance(big, 200 * 1024 * 1024)
    sent = dataset_digest(big)
    store = pacs.popen("client", "storescu", *tls_dicom_args(certs), pacs.vip, "2762", str(big),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(1.0)
        assert download.poll() is None, download.communicate()[0]
        assert store.poll() is None, store.communicate()[0]
        assert FOURTH not in haproxy_states(tier, "synapse-https")
        tier.pool.write_text(pool_text(pacs, certs[2], POOL + (FOURTH,)))
        reloaded = reload(tier, "the reload adding be4")
        still_running({"download": download, "store": store}, "the reload adding be4")
        assert reloaded["result"] == "applied", reloaded
        # HAProxy (its own runtime state) has the fourth PACS, ready once its DICOM verdict is up.
        for service in ("synapse-https", "synapse-dicom-tls"):
            wait_states(tier, service, lambda s: s.get(FOURTH) == "ready", RETURN_BOUND + 2,
                        f"{FOURTH} ready in {service}")
        assert set(haproxy_states(tier, "synapse-https")) == {*POOL, FOURTH}
        # New handshakes reach it (round robin over four: twelve connections visit every one).
        assert FOURTH in served_by(pacs, certs, 12)
        out, _ = download.communicate(timeout=300)
        downloaded = download.returncode
        store_out, _ = store.communicate(timeout=600)
    finally:
        for proc in (download, store):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        tier.pool.write_text(original)
        assert reload(tier, "the reload back to three PACS")["result"] == "applied"
    wait_states(tier, "synapse-https", lambda s: FOURTH not in s, 5, f"{FOURTH} gone again")
    assert downloaded == 0, out
    print(f"HTTPS download of {got.stat().st_size} bytes across the reload adding {FOURTH}")
    assert sha256(got) in served.values(), "the download is not byte-exact"
    assert store.returncode == 0, store_out
    holder, record = pacs_lab.find_instance(pacs, uid)
    assert dataset_digest(pacs_lab.download_instance(pacs, holder, record["ID"], tmp_path / "stored.dcm")) == sent


def test_a_pacs_rejecting_dicom_leaves_the_https_tier(pacs, certs, tier):
    refusing = time.time()
    for aet in CALLERS:
        pacs_lab.forget_caller(pacs, SICK, aet)
    try:
        states = wait_states(tier, "synapse-https", lambda s: s[SICK] == "maint", DETECT_BOUND + 2,
                             f"{SICK} in maintenance in HAProxy")
        seen = time.time() - refusing
        print(f"one health truth: {SICK} rejected DICOM; HAProxy had it in maint {seen:.2f}s later "
              f"(XDP tier bound {DETECT_BOUND:.1f}s)")
        assert seen <= DETECT_BOUND + 0.5
        assert states == {"be1": "ready", "be2": "ready", SICK: "maint"}
        assert haproxy_states(tier, "synapse-dicom-tls")[SICK] == "maint"
        # Its HTTP still answers: only the DICOM verdict took it out.
        assert pacs_lab.rest(pacs, SICK, "/system")["DicomAet"] == pacs_lab.AET
        for _ in range(6):
            curl(pacs, certs)

        # A reload starts a new HAProxy worker: the down PACS stays out.
        master = haproxy_master(tier)
        before = tier.status()["last_reload"]
        tier.signal(signal.SIGHUP)
        st = tier.wait_for(lambda s: s["last_reload"] != before, 30, "the reload")
        assert st["last_reload"]["result"] == "applied", st["last_reload"]
        assert haproxy_master(tier) == master       # reloaded, not restarted
        assert haproxy_states(tier, "synapse-https")[SICK] == "maint"
    finally:
        for aet in CALLERS:
            pacs_lab.admit_caller(pacs, SICK, aet)
    wait_states(tier, "synapse-https", lambda s: s[SICK] == "ready", RETURN_BOUND + 1, f"{SICK} ready again")


def test_xdplb_drain_drains_it_in_haproxy(pacs, certs, tier):
    tier.cli("drain", "synapse-https", "be2", "-i", "eth0")
    try:
        assert wait_states(tier, "synapse-https", lambda s: s["be2"] == "drain", 3, "be2 draining") == \
            {"be1": "ready", "be2": "drain", SICK: "ready"}
        assert haproxy_states(tier, "synapse-dicom-tls")["be2"] == "ready"   # a drain is per service
        curl(pacs, certs)
    finally:
        tier.cli("undrain", "synapse-https", "be2", "-i", "eth0")
    wait_states(tier, "synapse-https", lambda s: s["be2"] == "ready", 3, "be2 ready again")


@pytest.mark.parametrize("bad", ["wrong key", "expired", "unreadable"])
def test_a_bad_certificate_is_rejected_by_check_and_reload(pacs, certs, tier, bad):
    d, _ca, pem = certs
    good = pem.read_bytes()
    serial = served_serial(pacs)
    master, worker = haproxy_master(tier), worker_pid(haproxy_socket(tier))
    if bad == "wrong key":
        # The certificate of pacs.pem with the key of another: HAProxy could not use it.
        other = make_signed(d, "other", NAME, serial=2002).read_bytes()
        pem.write_bytes(good[:good.index(b"-----BEGIN PRIVATE KEY")] + other[other.index(b"-----BEGIN PRIVATE KEY"):])
        why = f"the private key in {pem} does not match the certificate in {pem}"
    elif bad == "expired":
        # HAProxy itself would serve it (haproxy -c accepts it): only xdplb's check stops it.
        pem.write_bytes(make_expired(d, "expired", NAME, serial=4004).read_bytes())
        why = f"certificate {pem} expired on "
    else:
        pem.unlink()     # a renewal script that failed half-way (root reads any mode, so: gone)
        why = f'.tls.certificate = "{pem}" is not an existing file or directory (looked for {pem})'
    try:
        check = tier.cli("check", str(tier.pool), check=False)
        assert check.returncode == 1
        assert why in check.stderr
        reloaded = reload(tier, "the reload")
        assert reloaded["result"] == "rejected", reloaded
        assert why in reloaded["error"]
        # Nothing changed: the same master and worker, serving the same certificate.
        assert (haproxy_master(tier), worker_pid(haproxy_socket(tier))) == (master, worker)
        assert served_serial(pacs) == serial
        curl(pacs, certs)
    finally:
        pem.write_bytes(good)


def test_a_renewed_certificate_is_served_after_sighup_and_the_old_connection_goes_on(pacs, certs, tier, tmp_path):
    d, _ca, pem = certs
    assert served_serial(pacs) == "serial=03E9"       # 1001
    good = pem.read_bytes()
    big = tmp_path / "during.dcm"
    uid = make_instance(big, 400 * 1024 * 1024)
    sent = dataset_digest(big)
    # A DICOM-TLS transfer on a connection whose handshake saw the old certificate.
    store = pacs.popen("client", "storescu", *tls_dicom_args(certs), pacs.vip, "2762", str(big),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pem.write_bytes(make_signed(d, "renewed", NAME, serial=3003).read_bytes())
    try:
        time.sleep(0.3)
        before = tier.status()["last_reload"]
        tier.signal(signal.SIGHUP)
        st = tier.wait_for(lambda s: s["last_reload"] != before, 30, "the reload")
        # Whether the transfer outlived the reload is decided here, when the
        # reload is applied, not after the checks below (a fast run of a
        # 200 MB store once finished while they ran).
        still_running({"store": store}, "the reload with the renewed certificate")
        assert st["last_reload"]["result"] == "applied", st["last_reload"]
        deadline = time.monotonic() + 5
        while served_serial(pacs) != "serial=0BBB" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert served_serial(pacs) == "serial=0BBB"     # 3003
        curl(pacs, certs)
        out, _ = store.communicate(timeout=600)
    finally:
        pem.write_bytes(good)
        if store.poll() is None:
            store.kill()
            store.wait()
        before = tier.status()["last_reload"]
        tier.signal(signal.SIGHUP)
        tier.wait_for(lambda s: s["last_reload"] != before, 30, "the reload back to the first certificate")
    assert store.returncode == 0, out
    holder, record = pacs_lab.find_instance(pacs, uid)
    assert dataset_digest(pacs_lab.download_instance(pacs, holder, record["ID"], tmp_path / "got.dcm")) == sent


def test_haproxy_killed_is_restarted(pacs, certs, tier):
    master = haproxy_master(tier)
    killed = time.monotonic()
    os.kill(master, signal.SIGKILL)
    deadline = killed + 15
    while True:
        if curl(pacs, certs, check=False).returncode == 0:
            break
        assert time.monotonic() < deadline, f"no HTTPS answer 15s after kill -9 of haproxy:\n{tier.log()[-3000:]}"
        time.sleep(0.1)
    back = time.monotonic() - killed
    print(f"kill -9 of haproxy master {master}: new handshakes work again after {back:.2f}s")
    assert haproxy_master(tier) != master
    assert back < 5.0
    assert haproxy_states(tier, "synapse-https") == {n: "ready" for n in POOL}


def restart(b: Balancer, how: str) -> float:
    """xdplb's own hitless restart, as for the XDP path: SIGUSR1 (exit 75, which systemd's unit
    restarts) or kill -9, then a new `xdplb attach`. Seconds until the new one is ready."""
    started = time.monotonic()
    if how == "SIGUSR1":
        b.signal(signal.SIGUSR1)
        assert b.proc.wait(30) == 75
    else:
        b.kill()
    b.start()
    b.wait_ready(timeout=240)       # the compile alone took 55 s on the loaded 2-core machine
    return time.monotonic() - started


def throttle(pacs, on: bool) -> None:
    """A 4 Mbit/s token bucket on both directions of the client's link (its eth0, and the
    switch port toward it), so that a transfer lasts as long as the test needs; off lets
    it finish at full speed."""
    for host, dev in (("client", "eth0"), ("sw", pacs.port("client"))):
        if on:
            pacs.run(host, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", "4mbit", "burst", "32kb",
                     "latency", "200ms")
        else:
            pacs.run(host, "tc", "qdisc", "del", "dev", dev, "root", check=False)


@pytest.mark.parametrize("how", ["SIGUSR1", "kill -9"])
def test_tls_connections_survive_xdplbs_hitless_restart(pacs, certs, tier, tmp_path, how):
    """HAProxy is left serving by the old xdplb and adopted by the new one, as the XDP maps are:
    a DICOM-TLS store (tcp mode) and an HTTPS download (http mode) spanning the restart
    complete byte-exact; one master throughout, driven by the new xdplb."""
    master = haproxy_master(tier)
    big = tmp_path / "long.dcm"
    uid = make_instance(big, 100 * 1024 * 1024)
    sent = dataset_digest(big)
    got, size = tmp_path / "downloaded.bin", 40 * 1024 * 1024
    # Throttled, the store would take ~200 s and the download ~80 s: both span the restart
    # (10-70 s here); the throttle is lifted once the restart is checked.
    throttle(pacs, True)
    store = download = None
    try:
        store = pacs.popen("client", "storescu", *tls_dicom_args(certs), pacs.vip, "2762", str(big),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        download = pacs.popen("client", "curl", "-sS", "--fail", "--cacert", str(certs[1]), "--resolve",
                              f"{NAME}:8443:{pacs.vip}", "-o", str(got), f"https://{NAME}:8443/bytes?n={size}",
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(1.0)
        still_running({"store": store, "download": download}, "the first second")
        seconds = restart(tier, how)
        still_running({"store": store, "download": download}, f"xdplb's {how} restart")
        assert haproxy_masters(tier) == [master], f"after {how}: not the one HAProxy, adopted"
        # (xdplb's log cannot show it reliably: an HAProxy reload clears O_APPEND on the log file
        # it shares with the old xdplb, and its lines then overwrite the new xdplb's.)
        tls = next(s["tls"] for s in tier.status()["services"] if s["name"] == "synapse-dicom-tls")
        assert (tls["haproxy_pid"], tls["haproxy_adopted"]) == (master, True)
        # The new xdplb drives the adopted HAProxy: a drain reaches it, and new handshakes work.
        tier.cli("drain", "synapse-https", "be2", "-i", "eth0")
        wait_states(tier, "synapse-https", lambda s: s["be2"] == "drain", 5, f"be2 draining after {how}")
        tier.cli("undrain", "synapse-https", "be2", "-i", "eth0")
        wait_states(tier, "synapse-https", lambda s: s["be2"] == "ready", 5, f"be2 ready after {how}")
        curl(pacs, certs)
        still_running({"store": store, "download": download}, "the checks after the restart")
        throttle(pacs, False)
        download_out, _ = download.communicate(timeout=300)
        store_out, _ = store.communicate(timeout=600)
    finally:
        throttle(pacs, False)
        for proc in (store, download):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert download.returncode == 0, download_out
    assert store.returncode == 0, store_out
    print(f"xdplb {how}, attached again and ready in {seconds:.1f}s with TLS connections open: "
          f"{big.stat().st_size} bytes stored and {got.stat().st_size} downloaded across it")
    assert got.read_bytes() == b"x" * size, "the download is not byte-exact"
    holder, record = pacs_lab.find_instance(pacs, uid)
    assert dataset_digest(pacs_lab.download_instance(pacs, holder, record["ID"], tmp_path / "stored.dcm")) == sent


def test_a_clean_stop_and_detach_stop_haproxy(pacs, certs, tier):
    """A restart leaves HAProxy running; a stop does not. Last in the file: it ends the tier."""
    master = haproxy_master(tier)
    tier.signal(signal.SIGUSR1)
    assert tier.proc.wait(30) == 75
    assert haproxy_masters(tier) == [master]
    curl(pacs, certs)                                   # serving with no xdplb running
    detached = tier.cli("detach", "eth0")
    assert f"the HAProxy left running (master pid {master})" in detached.stdout
    assert haproxy_masters(tier) == []
    assert curl(pacs, certs, check=False).returncode != 0
    # attach again (a fresh start, nothing to adopt), then SIGTERM: HAProxy goes with xdplb.
    tier.start()
    tier.wait_ready()
    master = haproxy_master(tier)
    tls = next(s["tls"] for s in tier.status()["services"] if s["name"] == "synapse-https")
    assert (tls["haproxy_pid"], tls["haproxy_adopted"]) == (master, False)
    assert tier.stop() == 0
    assert haproxy_masters(tier) == []
