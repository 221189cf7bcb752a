#!/usr/bin/env bash
# vagrant/modality.sh [VIP ROUTER_IP] - provision the modality VM: dcmtk
# (storescu, echoscu), curl for Orthanc's REST API, and Debian's pydicom so
# that /vagrant/tools/make_dicom.py can generate studies.  Idempotent.
#
# With VIP ROUTER_IP (the multi-node lab, XDPLB_VM_BGP=1): the VIP is
# reached through the router, whose ECMP route spreads connections over the
# balancers; the route does not survive a reboot, hence every boot there.
set -eu

bash /vagrant/tools/provision/packages.sh modality dicomgen

if [ $# -eq 2 ]; then
    ip route replace "$1/32" via "$2"
    echo "modality: $1 via the router $2"
fi
