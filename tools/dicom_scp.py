#!/usr/bin/env python3
"""A small DICOM storage SCP on pynetdicom 3, for IPv6 backends of the lab.

  dicom_scp.py --store DIR [--bind ADDR] [--port 104] [--aet SYNAPSE]
               [--ready-file FILE]

Debian's Orthanc speaks DICOM through DCMTK 3.6.7, which listens on IPv4
only (and whose storescu/echoscu open IPv4 sockets only), so the lab's IPv6
PACS are this: an SCP that answers C-ECHO and accepts every storage SOP
class, and writes each instance it receives to ``DIR/<SOP Instance UID>.dcm``
exactly as received (a Part 10 file: preamble, meta header, then the data
set bytes as they came off the wire, never decoded), so a test can compare
them with what it sent (make_dicom.dataset_digest). Large instances are
written to disk while they arrive (pynetdicom's chunked receive) and then
renamed into place, so a file in DIR is always complete.

It logs (stdout) the peer of every association, as its socket sees it:
``association from ADDRESS port PORT AE "TITLE"`` when it is accepted, and
``stored UID from ADDRESS`` for each instance, so a test behind a NAT
balancer can tell whose address the PACS saw (``pacs6_lab.peers`` reads them).

``--bind ::`` (the default) listens on IPv6 only (IPV6_V6ONLY), so an
Orthanc on 0.0.0.0 can hold the same port for IPv4 on the same host.
Once listening it creates ``--ready-file``; SIGTERM stops it. Needs the
project's venv python (pynetdicom is not in Debian's python3).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path

from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

INCOMING = ".incoming"   # inside the store directory: same file system, so the rename is atomic


class _V6OnlyServer(ThreadedAssociationServer):
    """Sets IPV6_V6ONLY on an IPv6 listener before it binds."""

    def server_bind(self) -> None:
        if self.socket.family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()


def _store_handler(store: Path):
    def handle(event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        if not uid or "/" in uid or uid.startswith("."):
            return 0xA900  # Error: data set does not match SOP class (no usable UID)
        os.replace(event.dataset_path, store / f"{uid}.dcm")  # pynetdicom's own unlink then finds nothing
        print(f"stored {uid} from {event.assoc.requestor.address}", flush=True)
        return 0x0000
    return handle


def _log_association(event) -> None:
    peer = event.assoc.requestor
    print(f'association from {peer.address} port {peer.port} AE "{peer.ae_title}"', flush=True)


def serve(store: Path, bind: str, port: int, aet: str) -> ThreadedAssociationServer:
    """Start the SCP (non-blocking); returns the running server."""
    (store / INCOMING).mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(store / INCOMING)   # where pynetdicom spools each arriving data set
    _config.STORE_RECV_CHUNKED_DATASET = True
    ae = AE(ae_title=aet)
    ae.maximum_pdu_size = 0                    # unlimited: the sender's PDUs may be as large as it likes
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax)
    return ae.make_server((bind, port), evt_handlers=[(evt.EVT_C_STORE, _store_handler(store)),
                                                     (evt.EVT_ACCEPTED, _log_association)],
                          server_class=_V6OnlyServer)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dicom_scp.py", description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True, type=Path, help="directory for received instances")
    p.add_argument("--bind", default="::", help="address to listen on (default ::, IPv6 only)")
    p.add_argument("--port", type=int, default=104)
    p.add_argument("--aet", default="SYNAPSE", help="AE title it answers as (default SYNAPSE)")
    p.add_argument("--ready-file", type=Path, help="created once it listens")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server = serve(args.store, args.bind, args.port, args.aet)
    except OSError as exc:
        print(f"dicom_scp.py: cannot listen on [{args.bind}]:{args.port}: {exc.strerror or exc}",
              file=sys.stderr, flush=True)
        return 1
    threading.Thread(target=server.serve_forever, daemon=True).start()
    if args.ready_file:
        args.ready_file.write_text(f"{os.getpid()}\n")
    print(f"listening as {args.aet} on [{args.bind}]:{args.port}, storing in {args.store}", flush=True)
    stop.wait()
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
