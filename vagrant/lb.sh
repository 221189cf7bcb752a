#!/usr/bin/env bash
# vagrant/lb.sh VIP NAME=ADDRESS... - provision the lb VM.
#
# Runs the project's own set-up (tools/setup.sh: Debian packages, bcc,
# kernel headers, /vagrant/.venv with the xdplb command), then writes the
# pool /etc/xdplb/vagrant.toml (DICOM health check on 104, TCP on 8042)
# with the same script the namespace lab uses, and the name of the private
# network's interface to /etc/xdplb/vagrant.iface.  Idempotent.
set -eu

vip=${1:?usage: lb.sh VIP NAME=ADDRESS...}
shift

bash /vagrant/tools/setup.sh

mkdir -p /etc/xdplb
bash /vagrant/tools/provision/xdplb-pool.sh --out /etc/xdplb/vagrant.toml --vip "$vip" \
    --check dicom --metrics 127.0.0.1:9742 "$@"
/vagrant/.venv/bin/xdplb check /etc/xdplb/vagrant.toml

# The private network's interface: the one holding this machine's address
# on the VIP's /24 (eth1 on most boxes, a predictable name on others).
iface=$(ip -o -4 addr show | awk -v net="${vip%.*}." 'index($4, net) == 1 { print $2; exit }')
[ -n "$iface" ] || { echo "lb: no interface on ${vip%.*}.0/24" >&2; exit 1; }
printf '%s\n' "$iface" >/etc/xdplb/vagrant.iface
echo "lb: ready; attach with: sudo /vagrant/.venv/bin/xdplb attach $iface /etc/xdplb/vagrant.toml"
