#!/usr/bin/env bash
# vagrant/lb.sh VIP NAME=ADDRESS... - provision the lb VM.
#
# On the local box (tools/vmbox.sh: bcc, headers and xdplb's wheels are in
# the image) it installs xdplb into /vagrant/.venv from /opt/xdplb-wheels
# with no network.  On any other box it runs the project's own set-up
# (tools/setup.sh: Debian packages, bcc, kernel headers, /vagrant/.venv with
# the xdplb command from PyPI), as an operator with a network would.  Then it writes the
# pool /etc/xdplb/vagrant.toml (DICOM health check on 104, TCP on 8042)
# with the same script the namespace lab uses, and the name of the private
# network's interface to /etc/xdplb/vagrant.iface.  Idempotent.
set -eu

vip=${1:?usage: lb.sh VIP NAME=ADDRESS...}
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
/vagrant/.venv/bin/xdplb check /etc/xdplb/vagrant.toml

# The private network's interface: the one holding this machine's address
# on the VIP's /24 (eth1 on most boxes, a predictable name on others).
iface=$(ip -o -4 addr show | awk -v net="${vip%.*}." 'index($4, net) == 1 { print $2; exit }')
[ -n "$iface" ] || { echo "lb: no interface on ${vip%.*}.0/24" >&2; exit 1; }
printf '%s\n' "$iface" >/etc/xdplb/vagrant.iface
echo "lb: ready; attach with: sudo /vagrant/.venv/bin/xdplb attach $iface /etc/xdplb/vagrant.toml"
