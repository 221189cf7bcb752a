#!/usr/bin/env bash
# vagrant/lb.sh [--bgp ROUTER_IP AS] VIP NAME=ADDRESS... - provision a balancer VM (lb, lb2).
#
# On the local box (tools/vmbox.sh: bcc, headers and xdplb's wheels are in
# the image) it installs xdplb into /vagrant/.venv from /opt/xdplb-wheels
# with no network.  On any other box it runs the project's own set-up
# (tools/setup.sh: Debian packages, bcc, kernel headers, /vagrant/.venv with
# the xdplb command from PyPI), as an operator with a network would.  Then it writes the
# pool /etc/xdplb/vagrant.toml (DICOM health check on 104, TCP on 8042)
# with the same script the namespace lab uses, and the name of the private
# network's interface to /etc/xdplb/vagrant.iface.  Idempotent.
#
# --bgp ROUTER_IP AS (the multi-node lab, XDPLB_VM_BGP=1): the node holds
# the VIP on lo with the ARP settings of a DSR backend (it must never answer
# ARP for it), the pool says `manage_vips = false` and `announce_table =
# 100`, and BIRD 2 runs examples/bird-balancer.conf with this node's address
# and AS (tools/provision/bird-config.sh), announcing the VIP to the router
# while xdplb is attached and has a healthy backend.
set -eu

router='' as=''
if [ "${1:-}" = --bgp ]; then
    router=${2:?usage: lb.sh --bgp ROUTER_IP AS VIP NAME=ADDRESS...}
    as=${3:?usage: lb.sh --bgp ROUTER_IP AS VIP NAME=ADDRESS...}
    shift 3
fi
vip=${1:?usage: lb.sh [--bgp ROUTER_IP AS] VIP NAME=ADDRESS...}
shift

if [ -d /opt/xdplb-wheels ]; then
    # --no-build-isolation: build with Debian's setuptools, not one from PyPI;
    # -e: the controller reads bpf/*.c from the repository at attach time.
    [ -x /vagrant/.venv/bin/python ] || python3 -m venv --system-site-packages /vagrant/.venv
    /vagrant/.venv/bin/pip install -q --disable-pip-version-check --no-index \
        --find-links /opt/xdplb-wheels --no-build-isolation -e /vagrant
    echo "lb: xdplb installed offline from /opt/xdplb-wheels: $(/vagrant/.venv/bin/xdplb --version)"
else
    bash /vagrant/tools/setup.sh
fi

mkdir -p /etc/xdplb
bash /vagrant/tools/provision/xdplb-pool.sh --out /etc/xdplb/vagrant.toml --vip "$vip" \
    --check dicom --metrics 127.0.0.1:9742 "$@"
if [ -n "$router" ]; then
    sed -i 's/^\[xdplb\]$/&\nmanage_vips = false\nannounce_table = 100/' /etc/xdplb/vagrant.toml
fi
/vagrant/.venv/bin/xdplb check /etc/xdplb/vagrant.toml

# The private network's interface: the one holding this machine's address
# on the VIP's /24 (eth1 on most boxes, a predictable name on others).
iface=$(ip -o -4 addr show | awk -v net="${vip%.*}." 'index($4, net) == 1 { print $2; exit }')
[ -n "$iface" ] || { echo "lb: no interface on ${vip%.*}.0/24" >&2; exit 1; }
printf '%s\n' "$iface" >/etc/xdplb/vagrant.iface

if [ -n "$router" ]; then
    bash /vagrant/tools/provision/dsr-backend.sh "$vip"
    self=$(ip -o -4 addr show dev "$iface" | awk '{ sub("/.*", "", $4); print $4; exit }')
    bash /vagrant/tools/provision/bird-config.sh node --id "$self" --as "$as" --router "$router" \
        --iface "$iface" --install
    echo "lb: BIRD announces $vip to $router (AS $as) while xdplb serves it"
fi
echo "lb: ready; attach with: sudo /vagrant/.venv/bin/xdplb attach $iface /etc/xdplb/vagrant.toml"
