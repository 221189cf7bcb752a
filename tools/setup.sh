#!/usr/bin/env bash
# tools/setup.sh - install what xdplb needs on a Debian/Ubuntu machine, as root.
#
# Installs the Debian packages (bcc from python3-bpfcc, the lab's tools, the
# test suite's real servers and clients), makes kernel headers visible to bcc,
# and builds .venv (from /usr/bin/python3 with --system-site-packages so it
# sees Debian's bcc) with xdplb and its test dependencies. Safe to run again.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (it installs packages and kernel header links)"
command -v apt-get >/dev/null || die "this set-up needs apt-get (Debian or Ubuntu)"

# Everything the code, the lab and the tests use. Keep in one list.
packages=(
    python3 python3-venv python3-pip python3-bpfcc   # controller and bcc
    iproute2 ethtool iputils-ping procps              # lab and kernel layer
    gcc libc6-dev linux-libc-dev                      # struct layout test
    curl openssl python3-cryptography                 # demo client, test TLS certificates; certificate checks (xdplb/tls.py)
    orthanc dcmtk                                     # PACS lab: real DICOM servers and clients
    prometheus                                        # exporter test: a real Prometheus scrapes xdplb
    nftables haproxy iperf3 wrk                       # benchmark baselines and load
    bird2 keepalived                                  # several balancers: BGP announcements and a VRRP pair (lab)
    shellcheck vagrant vagrant-libvirt                # provisioning script checks, Vagrantfile validation (libvirt provider)
    systemd                                           # systemd-analyze verify for the unit file
    qemu-system-x86 qemu-utils mmdebstrap bc rsync    # VM lab: tools/vmbox.sh builds the box, QEMU runs it
    libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients
    libvirt-daemon-config-network dnsmasq-base iptables  # vagrant-libvirt's management network
)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
else
    say "Debian packages present"
fi

# bcc compiles the XDP program against /lib/modules/$(uname -r)/build.
kver=$(uname -r)
moddir=/lib/modules/$kver
if [ -e "$moddir/build/include" ] || [ -e "$moddir/build/Makefile" ]; then
    say "kernel headers for $kver found at $moddir/build"
else
    if apt-get install -y -qq "linux-headers-$kver" >/dev/null 2>&1; then
        say "installed linux-headers-$kver"
    else
        say "no header package exists for the running kernel $kver;"
        say "linking the distribution's generic headers instead (bcc needs only the UAPI and BPF helpers)"
        arch=$(dpkg --print-architecture)
        dpkg-query -W "linux-headers-$arch" >/dev/null 2>&1 \
            || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "linux-headers-$arch" >/dev/null
        hdr=$(find /usr/src -maxdepth 1 -name "linux-headers-*-$arch" | sort -V | tail -n 1)
        common=$(find /usr/src -maxdepth 1 -name "linux-headers-*-common" | sort -V | tail -n 1)
        [ -n "$hdr" ] && [ -n "$common" ] || die "linux-headers-$arch did not install headers under /usr/src"
        mkdir -p "$moddir"
        ln -sfn "$hdr" "$moddir/build"
        ln -sfn "$common" "$moddir/source"
        say "linked $moddir/build -> $hdr and $moddir/source -> $common"
    fi
fi

if [ ! -x .venv/bin/python ]; then
    say "creating .venv from /usr/bin/python3 with system site packages (for bcc)"
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
.venv/bin/python -c "import bcc" || die "python3-bpfcc is installed but .venv cannot import bcc"
say "ready: $(.venv/bin/xdplb --version 2>/dev/null || echo .venv/bin/xdplb)"
