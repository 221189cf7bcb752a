#!/usr/bin/env bash
# vagrant/pacs.sh VIP - provision a pacs VM: Orthanc as a DSR backend of VIP.
#
# Runs as root on every `vagrant up` (idempotent): installs Orthanc, writes
# its configuration (AE SYNAPSE, DICOM 104, HTTP 8042, storage under
# /var/lib/orthanc) with the same script the namespace lab uses, lets the
# orthanc service bind port 104, and puts the VIP on lo with the ARP
# settings of direct server return (the VIP and the sysctls do not survive
# a reboot, hence every boot).
set -eu

vip=${1:?usage: pacs.sh VIP}
provision=/vagrant/tools/provision
changed=false

# replace FILE MODE: move FILE.new over FILE if it differs; note the change.
replace() {
    if cmp -s "$1.new" "$1"; then
        rm -f "$1.new"
    else
        install -m "$2" -o root -g orthanc "$1.new" "$1"
        rm -f "$1.new"
        changed=true
    fi
}

bash "$provision/packages.sh" pacs

# Debian's unit runs Orthanc as user orthanc, which may not bind a port
# below 1024 without this capability.
dropin=/etc/systemd/system/orthanc.service.d/xdplb-lab.conf
mkdir -p "$(dirname "$dropin")"
printf '[Service]\nAmbientCapabilities=CAP_NET_BIND_SERVICE\n' >"$dropin.new"
replace "$dropin" 0644

# Debian's unit loads every *.json in /etc/orthanc; ours replaces orthanc.json.
bash "$provision/orthanc-config.sh" --out /etc/orthanc/orthanc.json.new \
    --storage /var/lib/orthanc/db-v6 --name "$(hostname)" --aet SYNAPSE --dicom-port 104 --http-port 8042
replace /etc/orthanc/orthanc.json 0640

if "$changed"; then
    systemctl daemon-reload
    systemctl restart orthanc
    echo "pacs: Orthanc reconfigured and restarted"
fi
systemctl enable --now orthanc

bash "$provision/dsr-backend.sh" "$vip"
