#!/usr/bin/python3
"""The IPv6 half of the dual-stack PACS lab: pynetdicom storage servers.

``Lab(pacs=True, vip6=...)`` (``tools/lab.py up --pacs --vip6 fd00:10:10::100``)
runs Orthanc on IPv4 in every backend (tools/pacs_lab.py) and, beside it on
the same DICOM port, ``tools/dicom_scp.py`` on IPv6 only: Debian's Orthanc
listens through DCMTK 3.6.7, which has no IPv6. Each SCP answers as the
same AE title (SYNAPSE) and stores every instance under
``<state dir>/scp6/<backend>/store/<SOP Instance UID>.dcm`` exactly as
received. Counts and lookups read those directories, never xdplb. Clients
in the client namespace use tools/dicom_scu.py (pynetdicom), since dcmtk's
SCUs cannot reach an IPv6 address either.

The SCP and the SCU need the project's venv python (pynetdicom); whoever
builds the lab passes it (``Lab(python6=sys.executable)``; the CLI uses the
python running it).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

TOOLS_DIR = Path(__file__).resolve().parent
if str(TOOLS_DIR) not in sys.path:
    sys.path.insert(0, str(TOOLS_DIR))

import lab as labtool  # noqa: E402
import pacs_lab  # noqa: E402

SCP = TOOLS_DIR / "dicom_scp.py"
SCU = TOOLS_DIR / "dicom_scu.py"
READY_DEADLINE = 30.0

_PROCS: dict[tuple[str, str], subprocess.Popen] = {}


def scp_dir(lab, name: str) -> Path:
    return Path(lab.state_dir) / "scp6" / name


def store_dir(lab, name: str) -> Path:
    return scp_dir(lab, name) / "store"


def scp_pid(lab, name: str) -> int | None:
    """Pid of a backend's SCP if it runs (not a zombie), else None."""
    try:
        pid = int((scp_dir(lab, name) / "pid").read_text())
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    if stat.rsplit(")", 1)[-1].split()[0] == "Z" or SCP.name.encode() not in cmdline:
        return None
    return pid


def start_scp(lab, name: str, port: int = pacs_lab.DICOM_PORT) -> None:
    """(Re)start ``name``'s IPv6 SCP on ``port``, keeping what it stored; wait until it listens."""
    stop_scp(lab, name)
    base = scp_dir(lab, name)
    store_dir(lab, name).mkdir(parents=True, exist_ok=True)
    ready = base / "ready"
    ready.unlink(missing_ok=True)
    with open(base / "log", "ab") as log:
        proc = lab.popen(name, lab.python6, SCP, "--store", store_dir(lab, name), "--bind", "::",
                         "--port", port, "--aet", pacs_lab.AET, "--ready-file", ready,
                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    _PROCS[(str(lab.state_dir), name)] = proc
    (base / "pid").write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + READY_DEADLINE
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = (base / "log").read_text(errors="replace")[-2000:]
            raise labtool.LabError(f"{name}: the IPv6 SCP did not start; {base / 'log'}:\n{tail}")
        time.sleep(0.05)


def stop_scp(lab, name: str, graceful: bool = True) -> None:
    pacs_lab.stop_server(lambda: scp_pid(lab, name), _PROCS.pop((str(lab.state_dir), name), None), graceful)
    (scp_dir(lab, name) / "pid").unlink(missing_ok=True)


def kill_scp(lab, name: str) -> None:
    """SIGKILL ``name``'s SCP: its port closes, its host stays."""
    stop_scp(lab, name, graceful=False)


def start_all(lab, port: int = pacs_lab.DICOM_PORT) -> None:
    for name in lab.backend_names():
        start_scp(lab, name, port)


def stop_all(lab) -> None:
    for name in lab.backend_names():
        stop_scp(lab, name)
    shutil.rmtree(Path(lab.state_dir) / "scp6", ignore_errors=True)


# ---- what each SCP holds ----------------------------------------------------

def counts(lab) -> dict[str, int]:
    """{backend: instances its IPv6 SCP stored}."""
    return {name: len(list(store_dir(lab, name).glob("*.dcm"))) for name in lab.backend_names()}


_STORED_LINE = re.compile(r"^stored (\S+) from (\S+)$", re.MULTILINE)


def peers(lab, name: str) -> dict[str, str]:
    """{SOP Instance UID: the peer address that stored it}, as ``name``'s SCP
    logged it (the association's source address as its socket saw it)."""
    try:
        text = (scp_dir(lab, name) / "log").read_text(errors="replace")
    except FileNotFoundError:
        return {}
    return dict(_STORED_LINE.findall(text))


def find_instance(lab, sop_instance_uid: str) -> tuple[str, Path] | None:
    """(backend, stored file) of the SCP holding the UID."""
    for name in lab.backend_names():
        path = store_dir(lab, name) / f"{sop_instance_uid}.dcm"
        if path.exists():
            return name, path
    return None


# ---- clients in the client namespace (pynetdicom) ----------------------------

def store_each(lab, files: list[Path], host: str | None = None) -> list[tuple[str, int]]:
    """One association per file through the IPv6 VIP: [(file, exit status), ...]."""
    out = lab.run("client", lab.python6, SCU, "store", host or lab.vip6, pacs_lab.DICOM_PORT,
                  *map(str, files), check=False, timeout=60 + 10 * len(files)).stdout
    return [(f, int(rc)) for rc, f in (line.split(" ", 1) for line in out.splitlines())]


def storescu(lab, *files: Path, host: str | None = None, popen: bool = False, timeout: float = 900,
             port: int = pacs_lab.DICOM_PORT):
    """One process storing ``files`` (an association each) through the IPv6 VIP (or ``host``:``port``)."""
    argv = [lab.python6, SCU, "store", host or lab.vip6, port, *map(str, files)]
    if popen:
        return lab.popen("client", *argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return lab.run("client", *argv, check=False, timeout=timeout)


def watch_store(lab, seconds: float, files: list[Path], host: str | None = None) -> subprocess.Popen:
    """pacs_lab.watch over IPv6: one line per try on stdout."""
    return lab.popen("client", lab.python6, SCU, "watch", host or lab.vip6, pacs_lab.DICOM_PORT, seconds,
                     *map(str, files), stdout=subprocess.PIPE, text=True)


def echo(lab, host: str | None = None) -> subprocess.CompletedProcess:
    return lab.run("client", lab.python6, SCU, "echo", host or lab.vip6, pacs_lab.DICOM_PORT,
                   check=False, timeout=30)


# ---- pool --------------------------------------------------------------------

SERVICE6 = "synapse-dicom6"


def pool_text(lab, check: str = "tcp", interval: float = 1.0, timeout: float = 0.5,
              rise: int = 2, fall: int = 2) -> str:
    """The dual-stack pool: pacs_lab's IPv4 services (Orthanc) and, on the
    IPv6 VIP, the same PACS hosts' IPv6 SCPs as ``synapse-dicom6``, probed by
    ``check`` (tcp, or dicom: an association and a C-ECHO over IPv6)."""
    lines = [pacs_lab.pool_text(lab, check, interval, timeout, rise, fall).rstrip(), "",
             "[[service]]", f'name = "{SERVICE6}"', f'vip = "{lab.vip6}"', f"port = {pacs_lab.DICOM_PORT}",
             "  [service.health]", f'  check = "{check}"']
    if check == "dicom":
        lines += [f'  calling_ae = "{pacs_lab.PROBE_AET}"', f'  called_ae = "{pacs_lab.AET}"']
    lines += [f"  interval = {interval}", f"  timeout = {timeout}", f"  rise = {rise}", f"  fall = {fall}"]
    for name in lab.backend_names():
        lines += ["  [[service.backend]]", f'  name = "{name}"', f'  address = "{lab.backend_ip6(name)}"']
    return "\n".join(lines) + "\n"
