#!/usr/bin/env bash
# packages.sh - install (or, with --check, only verify) the Debian packages of
# one or more xdplb lab roles.
#
# Usage: packages.sh [--check] ROLE [ROLE...]
#
# Roles:
#   pacs      a PACS backend: Orthanc, curl for its REST API, iproute2/procps
#             for the VIP and ARP settings of dsr-backend.sh
#   modality  a modality or workstation: dcmtk (storescu, echoscu), curl
#   dicomgen  python3-pydicom, for tools/make_dicom.py outside the project's
#             .venv (the namespace lab uses .venv's pydicom instead)
# (The balancer itself is set up by tools/setup.sh, as on real hardware.)
#
# Only missing packages are installed, so a second run changes nothing and
# needs no network.  --check installs nothing and fails, naming the missing
# packages, when any is absent: the namespace lab runs it that way.
# Shared by the namespace PACS lab (tools/pacs_lab.py) and vagrant/*.sh.
set -eu

PROG=packages

say() { printf '%s: %s\n' "$PROG" "$*"; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

usage() {
    printf 'usage: %s [--check] pacs|modality|dicomgen [ROLE...]\n' "$0" >&2
    exit 2
}

# role_packages ROLE: print the role's packages, one per line.
role_packages() {
    case "$1" in
        pacs) printf '%s\n' orthanc curl iproute2 procps ;;
        modality) printf '%s\n' dcmtk curl ;;
        dicomgen) printf '%s\n' python3-pydicom ;;
        *) die "unknown role '$1': use pacs, modality or dicomgen" ;;
    esac
}

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'ok installed'
}

main() {
    local check=false role pkg
    local -a wanted=() missing=()
    [ "$#" -ge 1 ] || usage
    if [ "$1" = --check ]; then
        check=true
        shift
    fi
    [ "$#" -ge 1 ] || usage
    for role in "$@"; do
        case "$role" in -h | --help) usage ;; esac
        # role_packages dies in a subshell here, so test its status.
        local list
        list=$(role_packages "$role") || exit 1
        while read -r pkg; do
            case " ${wanted[*]} " in *" $pkg "*) ;; *) wanted+=("$pkg") ;; esac
        done <<<"$list"
    done
    command -v dpkg-query >/dev/null 2>&1 || die "dpkg-query not found: this needs Debian or Ubuntu"
    for pkg in "${wanted[@]}"; do
        installed "$pkg" || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        say "present: ${wanted[*]}"
        return
    fi
    if "$check"; then
        die "missing packages for $*: ${missing[*]} (run tools/setup.sh or tools/provision/packages.sh $*)"
    fi
    [ "$(id -u)" -eq 0 ] || die "must run as root to install: ${missing[*]}"
    say "installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    say "installed: ${missing[*]}"
}

main "$@"
