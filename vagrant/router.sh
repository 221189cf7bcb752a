#!/usr/bin/env bash
# vagrant/router.sh VIP NAME=IP:AS... - provision the router VM of the
# multi-node lab (XDPLB_VM_BGP=1): BIRD 2 with one BGP session per balancer
# node and `merge paths`, so the kernel holds one ECMP route to the VIP with
# a nexthop per node that announces it, hashed on L4 ports
# (fib_multipath_hash_policy = 1).  The configuration is the shipped recipe
# examples/bird-router.conf with this machine's address and the nodes put in
# (tools/provision/bird-config.sh).
#
# The modality reaches the VIP through this router on the same segment, and
# the PACS reply to it directly (DSR), so the router sends no ICMP redirects.
# Idempotent.
set -eu

vip=${1:?usage: router.sh VIP NAME=IP:AS...}
shift

if ! command -v bird >/dev/null; then     # the local box has it; other boxes get it from Debian
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q bird2
fi

iface=$(ip -o -4 addr show | awk -v net="${vip%.*}." 'index($4, net) == 1 { print $2; exit }')
[ -n "$iface" ] || { echo "router: no interface on ${vip%.*}.0/24" >&2; exit 1; }
self=$(ip -o -4 addr show dev "$iface" | awk '{ sub("/.*", "", $4); print $4; exit }')

cat >/etc/sysctl.d/60-xdplb-router.conf <<SYSCTL
net.ipv4.ip_forward = 1
net.ipv4.fib_multipath_hash_policy = 1
net.ipv4.conf.all.send_redirects = 0
net.ipv4.conf.$iface.send_redirects = 0
SYSCTL
sysctl -q -p /etc/sysctl.d/60-xdplb-router.conf

bash /vagrant/tools/provision/bird-config.sh router --id "$self" --iface "$iface" --install "$@"
echo "router: BIRD peers with $*; watch: sudo birdc show protocols; ip route show $vip"
