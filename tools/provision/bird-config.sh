#!/usr/bin/env bash
# bird-config.sh - print the BIRD 2 configuration of a balancer node or of
# the router in front of the nodes, from the recipes the README ships
# (examples/bird-balancer.conf, examples/bird-router.conf) with this
# machine's addresses put in.
#
# Usage: bird-config.sh node --id IP --as N --router IP [--router-as N] --iface IF [--install]
#        bird-config.sh router --id IP [--router-as N] --iface IF [--install] NAME=IP:AS...
#
# node: this node's address (router id, BGP local address) and AS, the
# router's address and AS (default 65000), and the interface BFD runs on.
# router: its address and AS, the BFD interface, and one BGP peer per
# balancer node (the recipe's example peers are replaced).  The output is
# not judged here: `bird -p -c FILE` does that.  --install (root) writes
# it to /etc/bird/bird.conf instead, once `bird -p -c` accepts it, and
# (re)starts the bird service.  Shared by the Vagrant
# lab's lb, lb2 and router machines; the namespace lab (tools/ha_lab.py)
# renders the same recipes.  Needs bash, sed and awk.
set -eu

PROG=bird-config
examples=$(cd "$(dirname "$0")/../../examples" && pwd)

die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

role=${1:-}
case "$role" in
    node | router) shift ;;
    *) die "the first argument must be node or router, not '$role'" ;;
esac

id='' as='' router='' router_as=65000 iface='' install=false
peers=()
args=()      # every argument but --install
while [ $# -gt 0 ]; do
    case "$1" in
        --id | --as | --router | --router-as | --iface)
            [ $# -ge 2 ] || die "$1 needs a value"
            case "$1" in
                --id) id=$2 ;;
                --as) as=$2 ;;
                --router) router=$2 ;;
                --router-as) router_as=$2 ;;
                --iface) iface=$2 ;;
            esac
            args+=("$1" "$2")
            shift 2 ;;
        --install) install=true; shift ;;
        -*) die "unknown option '$1'" ;;
        *=*:*) peers+=("$1"); args+=("$1"); shift ;;
        *) die "peer '$1' must be NAME=IP:AS" ;;
    esac
done
[ -n "$id" ] || die "--id IP is required"
[ -n "$iface" ] || die "--iface IF is required"

if "$install"; then
    bash "$0" "$role" "${args[@]}" >/etc/bird/bird.conf.new
    bird -p -c /etc/bird/bird.conf.new
    install -m 0640 -o bird -g bird /etc/bird/bird.conf.new /etc/bird/bird.conf
    rm -f /etc/bird/bird.conf.new
    systemctl enable bird
    systemctl restart bird
    exit 0
fi

if [ "$role" = node ]; then
    if [ -z "$as" ] || [ -z "$router" ]; then die "a node needs --as N and --router IP"; fi
    [ ${#peers[@]} -eq 0 ] || die "a node takes no NAME=IP:AS peers (its peer is --router)"
    sed -E -e "s/^router id [0-9.]+;/router id $id;/" \
        -e "s/^(\s*)interface \"\w+\" \{/\1interface \"$iface\" {/" \
        -e "s/^(\s*)local [0-9.]+ as [0-9]+;/\1local $id as $as;/" \
        -e "s/^(\s*)neighbor [0-9.]+ as [0-9]+;/\1neighbor $router as $router_as;/" \
        "$examples/bird-balancer.conf"
    exit 0
fi

[ ${#peers[@]} -gt 0 ] || die "a router needs at least one NAME=IP:AS peer"
# The recipe up to its example peers (they end the file), then ours.
sed -E -e "s/^router id [0-9.]+;/router id $id;/" \
    -e "s/^(\s*)interface \"\w+\" \{/\1interface \"$iface\" {/" \
    -e "s/^(\s*)local [0-9.]+ as [0-9]+;/\1local $id as $router_as;/" \
    "$examples/bird-router.conf" | awk '/^protocol bgp [A-Za-z0-9_]+ from balancers \{/ { exit } { print }'
for peer in "${peers[@]}"; do
    name=${peer%%=*} address=${peer#*=}
    printf 'protocol bgp %s from balancers {\n\tneighbor %s as %s;\n}\n' "$name" "${address%%:*}" "${address#*:}"
done
