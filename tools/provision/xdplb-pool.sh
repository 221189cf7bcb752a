#!/usr/bin/env bash
# xdplb-pool.sh - write the xdplb pool file of a PACS lab: one VIP in front of
# Orthanc servers, for DICOM (104) and Orthanc's web/REST port (8042).
#
# Usage: xdplb-pool.sh --vip IP [--check tcp|dicom] [--interval S] [--timeout S]
#                      [--rise N] [--fall N] [--metrics ADDR] [--out FILE]
#                      NAME=ADDRESS [NAME=ADDRESS...]
#
# The DICOM service is probed by --check (default tcp); "dicom" opens an
# association (calling AE XDPLB, called AE SYNAPSE) and needs a C-ECHO
# status 0.  The web service always uses a TCP check.  --metrics "" (the
# default) turns the Prometheus endpoint off.  Values are not judged here:
# `xdplb check FILE` does that, naming the key.
#
# Shared by the namespace PACS lab (tools/pacs_lab.py) and the Vagrant lb
# machine (vagrant/lb.sh).  Needs only bash.
set -eu

PROG=xdplb-pool

die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

usage() {
    printf 'usage: %s --vip IP [--check tcp|dicom] [--interval S] [--timeout S] [--rise N] [--fall N] [--metrics ADDR] [--out FILE] NAME=ADDRESS...\n' "$0" >&2
    exit 2
}

# check_plain KEY VALUE: VALUE goes into a TOML string or number as it is.
check_plain() {
    case "$2" in
        *'"'* | *\\* | *[[:cntrl:]]* | *' '*) die "$1 may not hold quotes, backslashes, spaces or control characters: '$2'" ;;
    esac
}

# service NAME PORT CHECK: one [[service]] with its health table and backends.
service() {
    local name=$1 port=$2 check=$3 be
    printf '[[service]]\nname = "%s"\nvip = "%s"\nport = %s\n' "$name" "$vip" "$port"
    printf '  [service.health]\n  check = "%s"\n' "$check"
    if [ "$check" = dicom ]; then
        printf '  calling_ae = "XDPLB"\n  called_ae = "SYNAPSE"\n'
    fi
    printf '  interval = %s\n  timeout = %s\n  rise = %s\n  fall = %s\n' "$interval" "$timeout" "$rise" "$fall"
    for be in "${backends[@]}"; do
        printf '  [[service.backend]]\n  name = "%s"\n  address = "%s"\n' "${be%%=*}" "${be#*=}"
    done
    printf '\n'
}

main() {
    vip='' check=tcp interval=1.0 timeout=0.5 rise=2 fall=2 metrics='' out=''
    backends=()
    while [ "$#" -gt 0 ]; do
        case "$1" in
            --vip | --check | --interval | --timeout | --rise | --fall | --metrics | --out)
                [ "$#" -ge 2 ] || usage
                check_plain "$1" "$2"
                case "$1" in
                    --vip) vip=$2 ;;
                    --check) check=$2 ;;
                    --interval) interval=$2 ;;
                    --timeout) timeout=$2 ;;
                    --rise) rise=$2 ;;
                    --fall) fall=$2 ;;
                    --metrics) metrics=$2 ;;
                    --out) out=$2 ;;
                esac
                shift 2 ;;
            -h | --help) usage ;;
            -*) die "unknown option '$1' (see --help)" ;;
            *=*)
                check_plain backend "$1"
                backends+=("$1")
                shift ;;
            *) die "backend '$1' must be NAME=ADDRESS" ;;
        esac
    done
    [ -n "$vip" ] || die "--vip IP is required"
    case "$check" in tcp | dicom) ;; *) die "--check must be tcp or dicom, not '$check'" ;; esac
    [ "${#backends[@]}" -ge 1 ] || die "at least one NAME=ADDRESS backend is required"

    local text
    text=$(
        printf '# written by tools/provision/xdplb-pool.sh\n[xdplb]\nmetrics = "%s"\n\n' "$metrics"
        service synapse-dicom 104 "$check"
        service synapse-web 8042 tcp
    )
    if [ -z "$out" ]; then
        printf '%s\n' "$text"
        return
    fi
    printf '%s\n' "$text" >"$out.tmp.$$"
    mv -f "$out.tmp.$$" "$out"
}

main "$@"
