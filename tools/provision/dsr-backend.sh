#!/usr/bin/env bash
# dsr-backend.sh - prepare a Linux host as a direct-server-return backend.
#
# Usage: dsr-backend.sh VIP [VIP...]
#
# For xdplb (DSR on one L2 segment) every backend must accept packets sent
# to the virtual IP, but must never answer ARP for it - only the load
# balancer's path may attract VIP traffic.  This script therefore:
#   * adds each VIP as a /32 on the loopback device `lo`;
#   * sets net.ipv4.conf.{all,default}.arp_ignore=1   (answer ARP only for
#     addresses configured on the receiving interface - lo is never that);
#   * sets net.ipv4.conf.{all,default}.arp_announce=2 (never use the VIP as
#     the source of our own ARP requests).
# The kernel applies max(all, <dev>) for both knobs, so `all` covers every
# existing device and `default` covers devices created later.
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

# add_vip VIP: put VIP/32 on lo unless it is already there.
add_vip() {
    local vip=$1
    if ip -4 -o addr show dev lo | grep -qF " inet $vip/32 "; then
        say "VIP $vip/32 already on lo"
    else
        ip addr add "$vip/32" dev lo
        say "added VIP $vip/32 on lo"
    fi
}

main() {
    [ "$#" -ge 1 ] || usage
    case "$1" in -h | --help) usage ;; esac
    local vip key
    for vip in "$@"; do
        is_ipv4 "$vip" || die "not an IPv4 address: '$vip'"
    done
    [ "$(id -u)" -eq 0 ] || die "must run as root"
    command -v ip >/dev/null 2>&1 || die "ip (iproute2) not found"

    ip link set dev lo up
    for key in all default; do
        set_sysctl "net.ipv4.conf.$key.arp_ignore" 1
        set_sysctl "net.ipv4.conf.$key.arp_announce" 2
    done
    for vip in "$@"; do
        add_vip "$vip"
    done
    say "ready: $# VIP(s) on lo, ARP for them suppressed"
}

main "$@"
