"""The TLS tier end to end: real Orthanc servers, the real `xdplb attach` in the lb
namespace supervising Debian's HAProxy, curl and dcmtk (+tls) in the client namespace,
certificates and CA made here by openssl.

One pool, one health truth: the DICOM service is probed by C-ECHO (XDP tier);
synapse-https (VIP:443 -> Orthanc HTTP 8042) and synapse-dicom-tls (VIP:2762 ->
Orthanc DICOM 104) follow its verdicts (health_from), and HAProxy's state is read
from its own runtime API (`show servers state`), never from xdplb. XDP mode: auto
(generic on veth, as in test_pacs.py); TLS packets are XDP_PASSed to the lb's stack.
The tests run in file order and each leaves the lab as it found it.
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

from certs import make_ca, make_signed  # noqa: E402
from xdplb.tlstier import server_admin_states  # noqa: E402

pytestmark = [pytest.mark.root, pytest.mark.lab]

INTERVAL, TIMEOUT, RISE, FALL = 1.0, 0.5, 2, 2
DETECT_BOUND = FALL * INTERVAL + 1.0      # the XDP tier's promise, as in test_pacs.py
RETURN_BOUND = RISE * INTERVAL + 2.0
STARTUP_BOUND = 20.0
NAME = "pacs.lab"
SICK = "be3"
CALLERS = (pacs_lab.PROBE_AET, pacs_lab.MODALITY_AET)


def pool_text(lab, cert: Path) -> str:
    backends = "".join(f'  [[service.backend]]\n  name = "{n}"\n  address = "{lab.host_ip(n)}"\n'
                       for n in lab.backend_names())
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
    with labtool.temporary_lab("xs", pacs=True) as the_lab:
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


def haproxy_master(b: Balancer) -> int:
    """The pid of the haproxy master that the xdplb daemon runs as its child."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm, ppid = stat[stat.index("(") + 1:stat.rindex(")")], int(stat[stat.rindex(")") + 2:].split()[1])
        if comm == "haproxy" and ppid == b.proc.pid:
            return int(entry)
    raise AssertionError("no haproxy child of xdplb")


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
    assert haproxy_states(tier, "synapse-https") == {n: "ready" for n in pacs.backend_names()}
    # status shows HAProxy's own counters and the certificate (serial 1001 = 0x3e9).
    https = next(s for s in tier.status()["services"] if s["name"] == "synapse-https")
    assert sum(b["tls"]["connections"] for b in https["backends"]) >= 2
    assert sum(b["tls"]["bytes_out"] for b in https["backends"]) > len(page)
    assert [b["health"] for b in https["backends"]] == ["up", "up", "up"]      # followed verdicts
    assert [c["serial"] for c in https["tls"]["certificates"]] == [1001]
    text = tier.cli("status", "-i", "eth0").stdout
    assert "  tls: HAProxy running, cleartext http to port 8042, verdicts of synapse-dicom" in text


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


def test_a_running_dicom_tls_transfer_survives_a_reload_that_changes_the_pool(pacs, certs, tier, tmp_path):
    big = tmp_path / "long.dcm"
    uid = make_instance(big, 400 * 1024 * 1024)
    sent = dataset_digest(big)
    original = tier.pool.read_text()
    store = pacs.popen("client", "storescu", *tls_dicom_args(certs), pacs.vip, "2762", str(big),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(1.0)
        assert store.poll() is None, store.communicate()[0]
        # A real change: be1 of synapse-https gets weight 2.
        tier.pool.write_text(original.replace(
            'health_from = "synapse-dicom"\n  [[service.backend]]\n  name = "be1"\n  address = "10.10.0.11"\n',
            'health_from = "synapse-dicom"\n  [[service.backend]]\n  name = "be1"\n  address = "10.10.0.11"\n'
            '  weight = 2\n', 1))
        assert tier.pool.read_text() != original
        before = tier.status()["last_reload"]
        tier.signal(signal.SIGHUP)
        st = tier.wait_for(lambda s: s["last_reload"] != before, 30, "the reload")
        assert st["last_reload"]["result"] == "applied", st["last_reload"]
        weights = {srv: w for (px, srv), (_word, w) in server_admin_states(haproxy_socket(tier)).items()
                   if px == "synapse-https"}
        assert weights == {"be1": 2, "be2": 1, "be3": 1}
        reloaded_while_running = store.poll() is None
        out, _ = store.communicate(timeout=600)
    finally:
        tier.pool.write_text(original)
        if store.poll() is None:
            store.kill()
            store.wait()
    assert reloaded_while_running, "the transfer ended before the reload; make it larger"
    assert store.returncode == 0, out
    holder, record = pacs_lab.find_instance(pacs, uid)
    stored = pacs_lab.download_instance(pacs, holder, record["ID"], tmp_path / "stored.dcm")
    assert dataset_digest(stored) == sent
    before = tier.status()["last_reload"]
    tier.signal(signal.SIGHUP)
    tier.wait_for(lambda s: s["last_reload"] != before, 30, "the reload back")


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


def test_a_bad_certificate_is_rejected_by_check_and_reload(pacs, certs, tier, tmp_path):
    d, _ca, pem = certs
    good = pem.read_bytes()
    other = make_signed(d, "other", NAME, serial=2002).read_bytes()
    serial = served_serial(pacs)
    # The certificate of pacs.pem with the key of another: HAProxy could not use it.
    pem.write_bytes(good[:good.index(b"-----BEGIN PRIVATE KEY")] + other[other.index(b"-----BEGIN PRIVATE KEY"):])
    try:
        check = tier.cli("check", str(tier.pool), check=False)
        assert check.returncode == 1
        assert f"does not match the certificate in {pem}" in check.stderr
        before = tier.status()["last_reload"]
        tier.signal(signal.SIGHUP)
        st = tier.wait_for(lambda s: s["last_reload"] != before, 30, "the reload")
        assert st["last_reload"]["result"] == "rejected"
        assert f"the private key in {pem} does not match the certificate in {pem}" in st["last_reload"]["error"]
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
        running_after_reload = store.poll() is None
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
    assert running_after_reload, "the transfer ended before the reload; make it larger"
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
    assert haproxy_states(tier, "synapse-https") == {n: "ready" for n in pacs.backend_names()}
