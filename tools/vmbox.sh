#!/usr/bin/env bash
# tools/vmbox.sh - build (or reuse) the Vagrant libvirt box of xdplb's VM lab,
# from Debian packages alone, as root.
#
# Usage: tools/vmbox.sh [--force] [--print-dir]
#
# The box "xdplb/bookworm-lab" is Debian bookworm with everything the lb
# machine needs already inside, because a guest under software emulation
# (QEMU TCG) is slow at apt and pip and usually cannot reach the registries
# the host reaches:
#   - systemd, ssh (Vagrant's insecure key for user vagrant, password-less
#     sudo), DHCP on eth0 (systemd-networkd), /etc/hosts with the hostname;
#   - the kernel and initrd, also copied out next to the image for QEMU's
#     direct kernel boot (no boot loader in the image);
#   - bcc (python3-bpfcc), the kernel headers bcc compiles against, numpy,
#     iproute2, ethtool, rsync;
#   - /opt/xdplb-wheels: wheels of xdplb's other Python dependencies, built
#     on the host (the versions in the host's .venv), so vagrant/lb.sh
#     installs xdplb from the synced repository with no network.
#
# Cached by its inputs: this script, the host's apt sources, Vagrant's
# insecure key and the pinned wheel list are hashed; a second run with the
# same inputs changes nothing and takes about a second.  A new hash builds
# a new box and replaces the old one, including libvirt's copy of its base
# volume.  Every step prints how long it took.
#
# Output (under $XDPLB_BOX_CACHE, default /var/cache/xdplb-box):
#   <hash>/box.img, vmlinuz, initrd.img, xdplb-bookworm-lab.box
#   current -> <hash>         (vagrant/Vagrantfile boots current/vmlinuz)
# --print-dir prints the directory of the current box and exits.
set -euo pipefail

PROG=vmbox
here=$(cd "$(dirname "$0")/.." && pwd)
BOX_NAME=xdplb/bookworm-lab
SUITE=bookworm
CACHE=${XDPLB_BOX_CACHE:-/var/cache/xdplb-box}
POOL=default
IMAGE_SLACK_MB=900
# Debian packages inside the box; keep in one list (it is part of the hash).
PACKAGES=(
    systemd-sysv udev dbus openssh-server sudo
    linux-image-amd64 linux-headers-amd64 initramfs-tools
    iproute2 ethtool iputils-ping procps rsync ca-certificates
    python3 python3-venv python3-pip python3-setuptools python3-wheel
    python3-bpfcc python3-numpy python3-cryptography bird2 keepalived
)
# xdplb's Python dependencies shipped as wheels (numpy comes from Debian).
WHEEL_DEPS=(click pyroute2 prometheus-client pynetdicom pydicom)

say() { printf '%s: %s\n' "$PROG" "$*"; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

T0=$(date +%s.%N)
STEP_START=
STEP_NAME=
step() {
    step_end
    STEP_NAME=$1
    STEP_START=$(date +%s.%N)
    say "$STEP_NAME ..."
}
step_end() {
    [ -n "$STEP_NAME" ] || return 0
    say "$(printf '%s: %.1f s' "$STEP_NAME" "$(echo "$(date +%s.%N) - $STEP_START" | bc)")"
    STEP_NAME=
}

force=false
for arg in "$@"; do
    case "$arg" in
        --force) force=true ;;
        --print-dir) readlink -f "$CACHE/current"; exit ;;
        -h | --help) sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$arg': use --force or --print-dir" ;;
    esac
done

[ "$(id -u)" -eq 0 ] || die "run as root (mmdebstrap, chroot and the libvirt pool need it)"
for tool in mmdebstrap mkfs.ext4 qemu-img vagrant bc; do
    command -v "$tool" >/dev/null || die "$tool not found: run tools/setup.sh"
done
insecure_key=$(ls /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub 2>/dev/null | head -n 1 || true)
[ -n "$insecure_key" ] || die "Vagrant's insecure public key (keys/vagrant.pub) not found: install vagrant"
[ -x "$here/.venv/bin/pip" ] || die "$here/.venv missing: run tools/setup.sh"

# The apt sources the host uses: the box is built from the same mirror.
sources=$(ls /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1 || true)
[ -n "$sources" ] || sources=/etc/apt/sources.list

# Wheel pins: the versions the host's .venv runs.
pins=$("$here/.venv/bin/pip" freeze --disable-pip-version-check 2>/dev/null \
    | grep -iE "^($(IFS='|'; echo "${WHEEL_DEPS[*]}" | sed 's/-/[-_]/g'))==" | sort) \
    || die "cannot read the wheel versions from $here/.venv"

hash=$( { cat "$0"; grep -v '^#' "$sources"; cat "$insecure_key"; echo "$pins"; } | sha256sum | cut -c1-16)
dir=$CACHE/$hash
vagrant_home=${VAGRANT_HOME:-$HOME/.vagrant.d}
box_stamp=$vagrant_home/boxes/${BOX_NAME//\//-VAGRANTSLASH-}/0/libvirt/xdplb-inputs

if ! "$force" && [ -f "$dir/done" ] && [ "$(cat "$box_stamp" 2>/dev/null)" = "$hash" ]; then
    ln -sfn "$hash" "$CACHE/current"
    say "box $BOX_NAME is current (inputs $hash): nothing to do"
    exit 0
fi

if "$force" || [ ! -f "$dir/done" ]; then
    rm -rf "$dir"
    mkdir -p "$dir"
    work=$(mktemp -d "$CACHE/build.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    root=$work/root

    step "wheels of ${WHEEL_DEPS[*]} (host .venv versions)"
    mkdir -p "$work/wheels"
    # shellcheck disable=SC2086
    "$here/.venv/bin/pip" wheel -q --disable-pip-version-check --no-deps -w "$work/wheels" $pins

    step "mmdebstrap $SUITE with ${#PACKAGES[@]} packages"
    mmdebstrap --quiet --mode=root --variant=apt --include="$(IFS=,; echo "${PACKAGES[*]}")" \
        "$SUITE" "$root" "$sources"

    step "configure: user vagrant, ssh, DHCP, hostname, wheels"
    echo xdplb-box >"$root/etc/hostname"
    printf '127.0.0.1\tlocalhost\n127.0.1.1\txdplb-box\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
    printf '/dev/vda\t/\text4\terrors=remount-ro\t0\t1\n' >"$root/etc/fstab"
    printf '[Match]\nName=eth0\n\n[Network]\nDHCP=ipv4\n' >"$root/etc/systemd/network/10-eth0.network"
    chroot "$root" systemctl enable -q systemd-networkd ssh
    chroot "$root" systemctl disable -q systemd-networkd-wait-online 2>/dev/null || true
    chroot "$root" useradd -m -s /bin/bash -G sudo vagrant
    echo 'vagrant:vagrant' | chroot "$root" chpasswd
    printf 'vagrant ALL=(ALL) NOPASSWD: ALL\nDefaults:vagrant !requiretty\n' >"$root/etc/sudoers.d/vagrant"
    chmod 0440 "$root/etc/sudoers.d/vagrant"
    install -d -m 0700 -o 1000 -g 1000 "$root/home/vagrant/.ssh"
    install -m 0600 -o 1000 -g 1000 "$insecure_key" "$root/home/vagrant/.ssh/authorized_keys"
    printf 'UseDNS no\n' >"$root/etc/ssh/sshd_config.d/vagrant.conf"
    # Serial console for `virsh console` and the boot log.
    chroot "$root" systemctl enable -q serial-getty@ttyS0.service
    cp -r "$work/wheels" "$root/opt/xdplb-wheels"
    echo "$hash" >"$root/etc/xdplb-box"
    chroot "$root" apt-get clean
    kernel=$(cd "$root/boot" && ls vmlinuz-* | sort -V | tail -n 1)
    cp "$root/boot/$kernel" "$dir/vmlinuz"
    cp "$root/boot/initrd.img-${kernel#vmlinuz-}" "$dir/initrd.img"
    chmod 0644 "$dir/vmlinuz" "$dir/initrd.img"

    step "ext4 image (mkfs.ext4 -d) and compressed qcow2"
    used_mb=$(du -sm "$root" | cut -f1)
    size_mb=$((used_mb + IMAGE_SLACK_MB))
    truncate -s "${size_mb}M" "$work/root.raw"
    mkfs.ext4 -q -L root -d "$root" "$work/root.raw"
    qemu-img convert -c -O qcow2 "$work/root.raw" "$dir/box.img"
    virtual_gb=$(( (size_mb + 1023) / 1024 ))

    step "box file"
    printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %s}\n' "$virtual_gb" >"$work/metadata.json"
    echo "$hash" >"$work/xdplb-inputs"
    tar -C "$work" -cf "$dir/xdplb-bookworm-lab.box" metadata.json xdplb-inputs
    tar -C "$dir" -rf "$dir/xdplb-bookworm-lab.box" box.img
    touch "$dir/done"
    step_end
    say "image: $(du -h "$dir/box.img" | cut -f1) qcow2, ${size_mb} MB file system, kernel $kernel"
fi

step "vagrant box add $BOX_NAME"
vagrant box add --force --name "$BOX_NAME" "$dir/xdplb-bookworm-lab.box" >/dev/null
# vagrant-libvirt copies a box into the storage pool once and reuses that
# base volume: drop the stale copy of an older build.
if command -v virsh >/dev/null && virsh -q pool-info "$POOL" >/dev/null 2>&1; then
    virsh -q vol-list "$POOL" 2>/dev/null | awk '{print $1}' \
        | grep "^${BOX_NAME//\//-VAGRANTSLASH-}_vagrant_box_image" \
        | while read -r vol; do virsh -q vol-delete --pool "$POOL" "$vol" >/dev/null && say "removed stale base volume $vol"; done
fi
ln -sfn "$hash" "$CACHE/current"
step_end
# Older builds: keep only the current one.
find "$CACHE" -mindepth 1 -maxdepth 1 -type d ! -name "$hash" ! -name 'build.*' -exec rm -rf {} +
say "$(printf 'box %s ready (inputs %s) in %.1f s' "$BOX_NAME" "$hash" "$(echo "$(date +%s.%N) - $T0" | bc)")"
