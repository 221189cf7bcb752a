#!/usr/bin/env bash
# vagrant/modality.sh - provision the modality VM: dcmtk (storescu,
# echoscu), curl for Orthanc's REST API, and Debian's pydicom so that
# /vagrant/tools/make_dicom.py can generate studies.  Idempotent.
set -eu

bash /vagrant/tools/provision/packages.sh modality dicomgen
