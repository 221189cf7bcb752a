#!/usr/bin/env python3
"""The demo: xdplb in front of three real Orthanc PACS, fed by dcmtk.

Run by tools/demo.sh after set-up (as root, with .venv's python); it is
``tools/pacs_lab.py``'s demo:
  1. builds the namespace PACS lab: client (dcmtk), lb, three Orthanc
     servers (AE SYNAPSE, DICOM 104, HTTP 8042), one bridge;
  2. runs the real ``xdplb attach eth0`` in the lb namespace with the pool
     of tools/provision/xdplb-pool.sh (``check = "dicom"``: association +
     C-ECHO), as the Vagrant lb machine does;
  3. C-STOREs 5 generated studies (storescu, one association per instance)
     through the VIP and shows the instances each Orthanc holds (its REST
     API, not xdplb);
  4. kills be2's Orthanc and measures how long new C-STOREs fail; brings it back;
  5. makes be3's Orthanc reject associations while its port still accepts
     TCP - what a TCP check misses - and shows the DICOM check take it out;
  6. stops xdplb and tears the lab down, leaving nothing behind.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pacs_lab  # noqa: E402

if __name__ == "__main__":
    sys.exit(pacs_lab.demo())
