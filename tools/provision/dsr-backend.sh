#!/usr/bin/env bash
# dsr-backend.sh - prepare a Linux host as a direct-server-return backend.
#
# Usage: dsr-backend.sh VIP [VIP...]        (IPv4 and/or IPv6 VIPs)
#
# For xdplb (DSR on one L2 segment) every backend must accept packets sent
# to the virtual IP, but must never answer ARP or Neighbour Discovery for
# it - only the load balancer's path may attract VIP traffic.  VIPs may be
# IPv4 or IPv6 (a dual-stack backend gets both).  This script therefore:
#   * adds each IPv4 VIP as a /32 and each IPv6 VIP as a /128 on the
#     loopback device `lo`;
#   * sets net.ipv4.conf.{all,default}.arp_ignore=1   (answer ARP only for
#     addresses configured on the receiving interface - lo is never that);
#   * sets net.ipv4.conf.{all,default}.arp_announce=2 (never use the VIP as
#     the source of our own ARP requests).
# The kernel applies max(all, <dev>) for both knobs, so `all` covers every
# existing device and `default` covers devices created later.
#
# IPv6 needs nothing beyond the address on lo.  Linux answers a Neighbour
# Solicitation only for an address configured on the interface that
# received it (or one it proxies), so a VIP on lo is never advertised on
# eth0; the gateway answers for it.  Leave net.ipv6.conf.*.proxy_ndp off (the
# default) and add no `ip -6 neigh add proxy VIP` entry; the script checks
# the first and says so if it is on.  Nor can the VIP become the source of
# the backend's own solicitations: Linux takes their source from an address
# of the sending interface, and source selection prefers the outgoing
# interface's addresses (RFC 6724 rule 5) for its own connections.
#
# Idempotent: running it again changes nothing.  Needs root, ip(8), sysctl(8)
# or a writable /proc/sys.  Shared by the namespace lab and the Vagrant lab.
set -eu

PROG=dsr-backend

say() { printf '%s: %s\n' "$PROG" "$*"; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

usage() {
    printf 'usage: %s VIP [VIP...]\n' "$0" >&2
    exit 2
}

# is_ipv4 ADDR: true when ADDR is a dotted quad with octets 0..255.
is_ipv4() {
    local IFS=. octet count=0
    case "$1" in
        *[!0-9.]* | .* | *. | *..*) return 1 ;;
    esac
    for octet in $1; do
        count=$((count + 1))
        [ "${#octet}" -le 3 ] || return 1
        [ "$((10#$octet))" -le 255 ] || return 1
    done
    [ "$count" -eq 4 ]
}

# set_sysctl KEY VALUE: set a sysctl, only if it differs, and report it.
set_sysctl() {
    local key=$1 value=$2 path current
    path=/proc/sys/$(printf '%s' "$key" | tr . /)
    [ -e "$path" ] || die "sysctl $key does not exist"
    current=$(cat "$path")
    if [ "$current" = "$value" ]; then
        say "sysctl $key=$value (already set)"
        return
    fi
    if command -v sysctl >/dev/null 2>&1; then
        sysctl -q -w "$key=$value"
    else
        printf '%s\n' "$value" >"$path"
    fi
    say "sysctl $key=$value (was $current)"
}

# is_ipv6 ADDR: true when ADDR looks like an IPv6 address (hex groups and
# colons, at most one "::"); ip(8) rejects anything else that slips through.
is_ipv6() {
    case "$1" in
        *[!0-9a-fA-F:]* | *:::* | "" ) return 1 ;;
        *::*::*) return 1 ;;
        *:*) return 0 ;;
    esac
    return 1
}

# add_vip VIP BITS FAMILY: put VIP/BITS on lo unless it is already there.
add_vip() {
    local vip=$1 bits=$2 family=$3
    if ip "-$family" -o addr show dev lo to "$vip/$bits" | grep -q .; then
        say "VIP $vip/$bits already on lo"
    else
        ip addr add "$vip/$bits" dev lo
        say "added VIP $vip/$bits on lo"
    fi
}

# check_proxy_ndp: proxy_ndp on would let a proxy entry answer for the VIP.
check_proxy_ndp() {
    local path
    for path in /proc/sys/net/ipv6/conf/*/proxy_ndp; do
        [ -e "$path" ] || continue
        if [ "$(cat "$path")" != 0 ]; then
            say "warning: $path is on; keep proxy_ndp off so the backend never answers Neighbour Discovery for a VIP"
        fi
    done
}

main() {
    [ "$#" -ge 1 ] || usage
    case "$1" in -h | --help) usage ;; esac
    local vip key v6=0
    for vip in "$@"; do
        if is_ipv6 "$vip"; then
            v6=1
        else
            is_ipv4 "$vip" || die "not an IPv4 or IPv6 address: '$vip'"
        fi
    done
    [ "$(id -u)" -eq 0 ] || die "must run as root"
    command -v ip >/dev/null 2>&1 || die "ip (iproute2) not found"

    ip link set dev lo up
    for key in all default; do
        set_sysctl "net.ipv4.conf.$key.arp_ignore" 1
        set_sysctl "net.ipv4.conf.$key.arp_announce" 2
    done
    if [ "$v6" = 1 ]; then
        [ -e /proc/sys/net/ipv6/conf/lo/disable_ipv6 ] || die "this kernel has no IPv6"
        [ "$(cat /proc/sys/net/ipv6/conf/lo/disable_ipv6)" = 0 ] ||
            die "IPv6 is disabled on lo (net.ipv6.conf.lo.disable_ipv6=1); enable it for an IPv6 VIP"
        check_proxy_ndp
    fi
    for vip in "$@"; do
        if is_ipv6 "$vip"; then
            add_vip "$vip" 128 6
        else
            add_vip "$vip" 32 4
        fi
    done
    say "ready: $# VIP(s) on lo, ARP and Neighbour Discovery for them left to the gateway"
}

main "$@"
