#!/usr/bin/env bash
# orthanc-config.sh - write the Orthanc configuration of one xdplb PACS backend.
#
# Usage: orthanc-config.sh --storage DIR [--out FILE] [--name NAME] [--aet AET]
#                          [--dicom-port N] [--http-port N] [--known-aet AET]...
#                          [--modality AET=HOST]... [--check-modality-host]
#
# Prints (or, with --out, atomically writes) a JSON configuration for
# Debian's Orthanc: DICOM server with AE title AET (default SYNAPSE) on
# DICOM port N (default 104), REST/web server on HTTP port N (default 8042),
# both on every address - so connections to the VIP on lo are accepted, as
# direct server return needs - remote HTTP access without authentication
# (a lab: never expose this), storage and SQLite index in DIR, C-ECHO and
# C-STORE accepted from any calling AE.  With --known-aet (repeatable) only
# those calling AE titles are accepted: Orthanc rejects other associations,
# and its REST API (DELETE /modalities/AET) can withdraw one while it runs -
# a PACS that accepts TCP but refuses associations, without a restart.
# --modality AET=HOST (repeatable) adds a known caller at that IPv4 address;
# with --check-modality-host Orthanc also checks the caller's address
# (DicomCheckModalityHost), as a PACS that authorises modalities by AE title
# and IP address does: the NAT lab (tools/lab_nat.py) needs that.
#
# Shared by the namespace PACS lab (tools/pacs_lab.py) and the Vagrant pacs
# machines (vagrant/pacs.sh).  Needs only bash; writes nothing but FILE.
set -eu

PROG=orthanc-config

die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

usage() {
    printf 'usage: %s --storage DIR [--out FILE] [--name NAME] [--aet AET] [--dicom-port N] [--http-port N] [--known-aet AET]... [--modality AET=HOST]... [--check-modality-host]\n' "$0" >&2
    exit 2
}

# check_port KEY VALUE: VALUE must be a TCP port number.
check_port() {
    case "$2" in
        '' | *[!0-9]*) die "$1 must be a port number 1..65535, not '$2'" ;;
    esac
    if [ "${#2}" -gt 5 ] || [ "$((10#$2))" -lt 1 ] || [ "$((10#$2))" -gt 65535 ]; then
        die "$1 must be a port number 1..65535, not '$2'"
    fi
}

# check_text KEY VALUE: VALUE goes into a JSON string as it is, so it may
# not hold quotes, backslashes or control characters.
check_text() {
    case "$2" in
        '' | *'"'* | *\\* | *[[:cntrl:]]*)
            die "$1 must be non-empty text without quotes, backslashes or control characters, not '$2'" ;;
    esac
}

# check_aet KEY VALUE: an AE title here is 1..16 of A-Z a-z 0-9 _ . -
check_aet() {
    case "$2" in
        '' | *[!A-Za-z0-9_.-]*) die "$1 must be 1..16 of A-Z a-z 0-9 _ . -, not '$2'" ;;
    esac
    [ "${#2}" -le 16 ] || die "$1 must be 1..16 of A-Z a-z 0-9 _ . -, not '$2' (${#2} characters)"
}

# check_ipv4 KEY VALUE: VALUE must be a dotted-quad IPv4 address.
check_ipv4() {
    local IFS=. octets
    read -r -a octets <<<"$2"
    case "$2" in
        *[!0-9.]* | .* | *. | *..*) die "$1 needs an IPv4 address, not '$2'" ;;
    esac
    [ "${#octets[@]}" -eq 4 ] || die "$1 needs an IPv4 address, not '$2'"
    local o
    for o in "${octets[@]}"; do
        if [ "${#o}" -gt 3 ] || [ "$((10#$o))" -gt 255 ]; then
            die "$1 needs an IPv4 address, not '$2'"
        fi
    done
}

# known_entry AET HOST: one DicomModalities entry, with its leading separator.
known_entry() {
    known="$known${known:+,}
    \"$1\" : [ \"$1\", \"$2\", 104 ]"
}

main() {
    local storage='' out='' name='' aet=SYNAPSE dicom_port=104 http_port=8042 known='' check_host=false
    while [ "$#" -gt 0 ]; do
        case "$1" in
            --storage) [ "$#" -ge 2 ] || usage; storage=$2; shift 2 ;;
            --out) [ "$#" -ge 2 ] || usage; out=$2; shift 2 ;;
            --name) [ "$#" -ge 2 ] || usage; name=$2; shift 2 ;;
            --aet) [ "$#" -ge 2 ] || usage; aet=$2; shift 2 ;;
            --dicom-port) [ "$#" -ge 2 ] || usage; dicom_port=$2; shift 2 ;;
            --http-port) [ "$#" -ge 2 ] || usage; http_port=$2; shift 2 ;;
            --known-aet)
                [ "$#" -ge 2 ] || usage
                check_aet --known-aet "$2"
                known_entry "$2" 127.0.0.1
                shift 2 ;;
            --modality)
                [ "$#" -ge 2 ] || usage
                case "$2" in *=*) ;; *) die "--modality needs AET=HOST, not '$2'" ;; esac
                check_aet --modality "${2%%=*}"
                check_ipv4 --modality "${2#*=}"
                known_entry "${2%%=*}" "${2#*=}"
                shift 2 ;;
            --check-modality-host) check_host=true; shift ;;
            -h | --help) usage ;;
            *) die "unknown argument '$1' (see --help)" ;;
        esac
    done
    [ -n "$storage" ] || die "--storage DIR is required"
    case "$storage" in /*) ;; *) die "--storage must be an absolute path, not '$storage'" ;; esac
    check_text --storage "$storage"
    check_aet --aet "$aet"
    check_port --dicom-port "$dicom_port"
    check_port --http-port "$http_port"
    [ -n "$name" ] || name=$aet
    check_text --name "$name"

    # Known calling AEs only: Orthanc then rejects every other association.
    # With --known-aet the host is a placeholder, which DicomCheckModalityHost
    # false ignores; --check-modality-host makes Orthanc compare it too.
    local allow_any=true
    [ -z "$known" ] || allow_any=false

    local json
    json=$(cat <<EOF
{
  "Name" : "$name",
  "StorageDirectory" : "$storage",
  "IndexDirectory" : "$storage",
  "StorageCompression" : false,
  "MaximumStorageSize" : 0,
  "MaximumPatientCount" : 0,
  "Plugins" : [ ],
  "HttpServerEnabled" : true,
  "HttpPort" : $((10#$http_port)),
  "RemoteAccessAllowed" : true,
  "AuthenticationEnabled" : false,
  "DicomServerEnabled" : true,
  "DicomAet" : "$aet",
  "DicomPort" : $((10#$dicom_port)),
  "DicomCheckCalledAet" : false,
  "DicomAlwaysAllowEcho" : $allow_any,
  "DicomAlwaysAllowStore" : $allow_any,
  "DicomModalities" : {$known
  },
  "DicomCheckModalityHost" : $check_host,
  "DicomScpTimeout" : 30,
  "SaveJobs" : false
}
EOF
)
    if [ -z "$out" ]; then
        printf '%s\n' "$json"
        return
    fi
    # Write next to FILE and rename, so a reader never sees half a file.
    printf '%s\n' "$json" >"$out.tmp.$$"
    mv -f "$out.tmp.$$" "$out"
}

main "$@"
