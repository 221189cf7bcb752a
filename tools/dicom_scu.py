#!/usr/bin/env python3
"""DICOM C-STORE and C-ECHO over IPv4 or IPv6 with pynetdicom 3: the lab's
modality for IPv6 VIPs.

Debian's dcmtk 3.6.7 cannot be that client: its storescu and echoscu have
no IPv6 option, reject an IPv6 address ("Illegal service parameter") and,
given a host name, resolve it to IPv4 and open an AF_INET socket. So the
dual-stack lab stores through an IPv6 VIP with this, a real DICOM SCU
(pynetdicom's association and DIMSE code), and through the IPv4 VIP with
dcmtk as before.

  dicom_scu.py store HOST PORT FILE...           one association per file;
                                                 prints "<exit status> <file>"
  dicom_scu.py watch HOST PORT SECONDS FILE...   pacs_lab.watch's loop and output
  dicom_scu.py echo HOST PORT

Options (before the command): --aet (calling, default MODALITY), --aec
(called, default SYNAPSE), --timeout (connect/ACSE, default 5 s). A file is
sent as it is on disk (pynetdicom streams it without decoding), so a
multi-hundred-megabyte instance costs no memory. Needs the project's venv
python (pynetdicom is not in Debian's python3).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pydicom.filereader import read_file_meta_info
from pynetdicom import AE
from pynetdicom.sop_class import Verification

TOOLS_DIR = Path(__file__).resolve().parent
if str(TOOLS_DIR) not in sys.path:
    sys.path.insert(0, str(TOOLS_DIR))

import pacs_lab  # noqa: E402  (tools/ on sys.path above)

DIMSE_TIMEOUT = 600.0   # seconds one C-STORE may take (a large instance through a failover)


def _ae(aet: str, timeout: float) -> AE:
    ae = AE(ae_title=aet)
    ae.connection_timeout = ae.acse_timeout = timeout
    ae.dimse_timeout = ae.network_timeout = DIMSE_TIMEOUT
    ae.maximum_pdu_size = 0
    return ae


def _one_association(ae: AE, host: str, port: int, aec: str, request) -> bool:
    """Associate, run ``request(assoc)`` (a C-STORE or C-ECHO returning its
    status Dataset), release; True when the status was 0x0000."""
    assoc = ae.associate(host, port, ae_title=aec)
    if not assoc.is_established:
        return False
    try:
        status = request(assoc)
        ok = bool(status) and status.get("Status") == 0x0000
        if assoc.is_established:
            assoc.release()
        return ok
    finally:
        if assoc.is_established:
            assoc.abort()


def store_once(host: str, port: int, path: str, aet: str = pacs_lab.MODALITY_AET,
               aec: str = pacs_lab.AET, timeout: float = 5.0, dimse_timeout: float = DIMSE_TIMEOUT) -> bool:
    """One association carrying one file; True when the C-STORE returned 0x0000."""
    meta = read_file_meta_info(path)
    ae = _ae(aet, timeout)
    ae.dimse_timeout = dimse_timeout
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    return _one_association(ae, host, port, aec, lambda assoc: assoc.send_c_store(Path(path)))


def echo(host: str, port: int, aet: str, aec: str, timeout: float) -> bool:
    ae = _ae(aet, timeout)
    ae.add_requested_context(Verification)
    return _one_association(ae, host, port, aec, lambda assoc: assoc.send_c_echo())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dicom_scu.py", description=__doc__.splitlines()[0])
    p.add_argument("--aet", default=pacs_lab.MODALITY_AET)
    p.add_argument("--aec", default=pacs_lab.AET)
    p.add_argument("--timeout", type=float, default=5.0)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("store", "watch", "echo"):
        c = sub.add_parser(name)
        c.add_argument("host")
        c.add_argument("port", type=int)
        if name == "watch":
            c.add_argument("seconds", type=float)
        if name != "echo":
            c.add_argument("files", nargs="+")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    if args.command == "echo":
        ok = echo(args.host, args.port, args.aet, args.aec, args.timeout)
        print("ok" if ok else "failed")
        return 0 if ok else 1
    if args.command == "watch":
        # Short timeouts, as the dcmtk watcher uses: a try that hangs on a
        # vanished host must not hide the next one.
        return pacs_lab.watch(args.host, args.port, args.seconds, args.files,
                              send=lambda h, p, f: store_once(h, p, f, args.aet, args.aec, 1.0, 2.0))
    failed = 0
    for path in args.files:
        ok = store_once(args.host, args.port, path, args.aet, args.aec, args.timeout)
        failed += not ok
        print(f"{0 if ok else 1} {path}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
