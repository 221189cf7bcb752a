"""The Vagrant lb machine, booted for real, running xdplb in native mode on virtio-net.

Builds (or reuses) the local box with tools/vmbox.sh, boots ``vagrant up lb``
(vagrant-libvirt on QEMU: KVM where the CPU has it, TCG here) with its own
provisioning (vagrant/lb.sh installs xdplb offline from the box's wheels),
bridges the guest's lab NIC to a namespace PACS lab (real Orthanc backends,
dcmtk in the client namespace; tools/vm_lab.py), attaches the real
``xdplb attach eth1 --mode auto`` inside the guest and carries DICOM
through it, then runs the packet fixture table through the attached
program natively and by BPF_PROG_TEST_RUN (tools/vm_packets.py).
XDP mode: native (driver mode, virtio-net), checked on the guest's link.  Where instances landed is read from each Orthanc, never from
xdplb.  The tests run in file order; the last one destroys the machine and
checks nothing is left.
"""
from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

import lab as labtool
import pacs_lab
import vm_lab
import vm_packets
from lab_xdplb import backend_health
from make_dicom import make_study
from packet.conftest import GW_MAC
from packet.test_fixtures import CASES
from xdplb import structs

pytestmark = [pytest.mark.root, pytest.mark.lab]

# 2 s, not the namespace lab's 1 s: a pynetdicom association in a 1-vCPU TCG guest on a loaded
# host missed 1 s timeouts (all three PACS flapped while the guest forwarded a long C-STORE).
INTERVAL, TIMEOUT, RISE, FALL = 2.0, 2.0, 2, 2
DETECT_BOUND = FALL * INTERVAL + 1.0      # the detection time the product promises
RETURN_BOUND = RISE * INTERVAL + 3.0
STARTUP_BOUND = 1800.0                    # bcc compile under TCG: 250-760 s on a loaded 2-core host (not a promise)
SERVICE = "synapse-dicom"
# "At least 50 MB" (the issue): under TCG 50 MB takes 2.6-5.1 s through the
# guest, less than another host's loss and return take to be seen (10-40 s here, loaded).
LONG_TRANSFER_BYTES = 1024 * 1024 * 1024
FIXTURE_VLAN = 42                         # the 802.1Q fixtures' VLAN: registered so QEMU lets it in
XDP_ATTACHED_DRV = 1


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    with labtool.temporary_lab("xv", pacs=True) as pacs:
        machine = vm_lab.VmLab(pacs)
        machine.build_box()
        try:
            machine.up()
            yield machine
        finally:
            machine.destroy()
            print("VM timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in machine.timings.items()))


@pytest.fixture(scope="module")
def balancer(vm, tmp_path_factory):
    log = tmp_path_factory.mktemp("guest-xdplb") / "xdplb.log"
    b = vm_lab.GuestBalancer(vm, log)
    started = time.monotonic()
    b.start(pool_text(vm.lab))
    try:
        b.wait_for(lambda st: all(h == "up" for h in backend_health(st, SERVICE).values()),
                   STARTUP_BOUND, "every PACS up")
        vm.timings["xdplb attach (bcc compile) to all up"] = time.monotonic() - started
        yield b
    finally:
        b.stop()
        print(b.log())


@pytest.fixture(scope="module")
def dicom_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicom")
    made = iter(range(1, 1000))

    def make(count: int) -> list[Path]:
        return [path for path, _uid in make_study(root / f"batch{next(made)}", count, 16 * 1024)]
    return make


def pool_text(lab) -> str:
    return pacs_lab.pool_text(lab, "dicom", INTERVAL, TIMEOUT, RISE, FALL)


def fixture_services(lab) -> str:
    """The packet fixture table's other services (tests/packet/conftest.py), on the lab's backends.

    Added by a reload just before the fixture table runs: their probes
    would double the work of a 1-vCPU guest under TCG, where the DICOM
    probes already come close to their 1 s timeout.
    """
    lines = []
    for name, port, protocol, persistence, health_port in (("web", 80, "tcp", "client", pacs_lab.HTTP_PORT),
                                                           ("udp-echo", 5000, "udp", "flow", pacs_lab.DICOM_PORT)):
        lines += ["", "[[service]]", f'name = "{name}"', f'vip = "{lab.vip}"', f"port = {port}",
                  f'protocol = "{protocol}"', f'persistence = "{persistence}"', "  [service.health]",
                  '  check = "tcp"', f"  port = {health_port}", f"  interval = {INTERVAL}", f"  timeout = {TIMEOUT}"]
        for backend in lab.backend_names():
            lines += ["  [[service.backend]]", f'  name = "{backend}"', f'  address = "{lab.host_ip(backend)}"']
    return "\n".join(lines) + "\n"


def all_up(st: dict) -> bool:
    return all(h == "up" for svc in st["services"] for h in backend_health(st, svc["name"]).values())


def delta(before: dict, after: dict) -> dict:
    return {name: after[name] - before.get(name, 0) for name in after}


def backend_record(st: dict, name: str) -> dict:
    svc = next(s for s in st["services"] if s["name"] == SERVICE)
    return next(b for b in svc["backends"] if b["name"] == name)


def test_vagrant_up_says_which_accelerator(vm):
    assert "xdplb: libvirt uses " in vm.up_output, vm.up_output[-3000:]
    said = next(line for line in vm.up_output.splitlines() if "xdplb: libvirt uses " in line)
    print(said)
    flags = Path("/proc/cpuinfo").read_text()
    hardware = " vmx" in flags or " svm" in flags
    assert ("hardware KVM" in said) == hardware, said
    assert "offline from /opt/xdplb-wheels" in vm.up_output, vm.up_output[-3000:]


def test_auto_mode_picks_native_on_virtio_net(vm, balancer):
    assert "attached to eth1 in native mode" in balancer.log(), balancer.log()
    link = json.loads(vm.ssh(f"ip -j -d link show {vm_lab.GUEST_IFACE}").stdout)[0]
    assert link["xdp"]["mode"] == XDP_ATTACHED_DRV, link.get("xdp")
    driver = vm.ssh(f"readlink /sys/class/net/{vm_lab.GUEST_IFACE}/device/driver").stdout.strip()
    assert driver.endswith("/virtio_net"), driver


def test_60_c_stores_spread_over_all_three_orthancs(vm, balancer, dicom_files):
    files = dicom_files(60)
    before = pacs_lab.counts(vm.lab)
    started = time.monotonic()
    results = pacs_lab.store_each(vm.lab, files)
    vm.timings["60 C-STOREs"] = time.monotonic() - started
    assert len(results) == 60 and all(rc == 0 for _, rc in results), results
    landed = delta(before, pacs_lab.counts(vm.lab))
    print(f"60 C-STOREs through native XDP in the guest landed: {landed}")
    assert sum(landed.values()) == 60, landed
    assert set(landed) == set(vm.lab.backend_names()) and all(n > 0 for n in landed.values()), landed


def test_killed_orthanc_fails_over_within_the_bound(vm, balancer, dicom_files):
    files = dicom_files(150)
    watch = pacs_lab.watch_store(vm.lab, 10.0, files)
    started = time.monotonic()
    time.sleep(1.0)
    killed_wall = time.time()
    pacs_lab.kill_orthanc(vm.lab, "be2")
    killed_at = time.monotonic() - started
    out, _ = watch.communicate(timeout=120)
    tries = [(float(t), r) for t, r, _f in (line.split(maxsplit=2) for line in out.splitlines())]
    after = [(t, r) for t, r in tries if t >= killed_at]
    failures = [t for t, r in after if r == "fail"]
    failover = (max(failures) - killed_at) if failures else 0.0
    record = backend_record(balancer.status(), "be2")
    print(f"failover (native XDP in the guest): last failed C-STORE {failover:.2f}s after the kill, "
          f"be2 down {record['since'] - killed_wall:.2f}s after it (bound {DETECT_BOUND:.1f}s); "
          f"{len(failures)} failed of {len(after)} tries after the kill")
    assert failover <= DETECT_BOUND
    late = [r for t, r in after if t > killed_at + DETECT_BOUND]
    assert len(late) >= 10 and all(r == "ok" for r in late), out
    assert record["health"] == "down" and not record["forwarding"]
    assert record["since"] - killed_wall <= DETECT_BOUND
    pacs_lab.start_orthanc(vm.lab, "be2")
    balancer.wait_for(lambda st: backend_health(st, SERVICE)["be2"] == "up", RETURN_BOUND + 10, "be2 up")


def test_long_c_store_survives_another_backends_loss(vm, balancer, tmp_path):
    big, stored = tmp_path / "long.dcm", tmp_path / "stored.dcm"
    try:
        started = time.monotonic()
        summary = pacs_lab.long_transfer(vm.lab, balancer, lambda st: backend_health(st, SERVICE),
                                         LONG_TRANSFER_BYTES, big, stored, DETECT_BOUND + 15, RETURN_BOUND + 30)
        vm.timings["long C-STORE across a loss"] = time.monotonic() - started
        print(f"through native XDP in the guest: {summary}")
    finally:
        big.unlink(missing_ok=True)
        stored.unlink(missing_ok=True)


def guest_tap(vm) -> str:
    """The tap of the guest's lab NIC: the port of the host bridge that is not our veth."""
    ports = sorted(p.name for p in Path(f"/sys/class/net/{vm.bridge}/brif").iterdir() if p.name != vm.veth_host)
    assert len(ports) == 1, ports
    return ports[0]


def test_fixture_table_native_in_the_guest_matches_bpf_prog_test_run(vm, balancer):
    """The packet fixture table natively on virtio-net and by BPF_PROG_TEST_RUN, same program, same maps.

    Quiet first: xdplb's probes stopped (SIGSTOP: program and maps stay),
    the guest's stack deaf on eth1 behind the program (tc drop after XDP),
    the backends unable to answer (no VIP, no forwarding), since any of those
    would move the counter or loop frames back.  Frames go into the guest's
    tap directly (the host's bridges would drop malformed IPv4 first).
    """
    balancer.reload(pool_text(vm.lab) + fixture_services(vm.lab))
    balancer.wait_for(all_up, RETURN_BOUND + 60, "every backend of every service up")
    iface = vm_lab.GUEST_IFACE
    guest_mac = vm.ssh(f"cat /sys/class/net/{iface}/address").stdout.strip()
    mac = bytes.fromhex(guest_mac.replace(":", ""))
    frames = [(description, mac + bytes(packet)[6:] if bytes(packet)[:6] == GW_MAC else bytes(packet),
               structs.ACTIONS[action]) for description, packet, _flow, action, _output, _counter in CASES]
    lab = vm.lab
    vm.sudo("ip", "link", "add", "link", iface, "name", f"{iface}.{FIXTURE_VLAN}", "type", "vlan",
            "id", FIXTURE_VLAN)
    balancer.signal("STOP")
    vm.sudo("tc", "qdisc", "add", "dev", iface, "clsact")
    vm.sudo("tc", "filter", "add", "dev", iface, "ingress", "matchall", "action", "drop")
    for name in lab.backend_names():
        lab.run(name, "ip", "addr", "del", f"{lab.vip}/32", "dev", "lo")
        lab.run(name, "sysctl", "-qw", "net.ipv4.ip_forward=0")
    try:
        time.sleep(2.0)   # the last probe's packets
        started = time.monotonic()
        records, captured = vm_packets.compare(
            vm.ssh_argv(vm_packets.serve_command(iface)),
            ["/usr/bin/python3", vm_packets.__file__, "send", guest_tap(vm)], lab, frames, guest_mac)
        vm.timings["packet equivalence"] = time.monotonic() - started
    finally:
        for name in lab.backend_names():
            lab.run(name, "ip", "addr", "add", f"{lab.vip}/32", "dev", "lo", check=False)
        vm.sudo("tc", "qdisc", "del", "dev", iface, "clsact", check=False)
        balancer.signal("CONT")
        vm.sudo("ip", "link", "del", f"{iface}.{FIXTURE_VLAN}", check=False)

    by_mac = {lab.mac(name).replace(":", ""): name for name in lab.backend_names()}
    problems, padded_changes, forwarded, seen_as = [], [], 0, Counter()
    for r in records:
        native = r["native"][-1]
        padded = r["length"] < vm_packets.MIN_FRAME
        print(f"{r['description']}: {r['length']} B{' (under 60 B)' if padded else ''}; native "
              f"{' then '.join(json.dumps(d) for d in r['native'])}; test run {r['test_run']} "
              f"{json.dumps(r['test_run_delta'])}; expected {r['expected']}"
              f"{'; unpadded test run ' + r['unpadded_test_run'] if padded else ''}"
              f"{'; captured at ' + ','.join(r['captured_at']) if r['captured_at'] else ''}")
        if r["test_run_delta"] != {r["test_run"]: 1}:
            problems.append(f"{r['description']}: the test run moved {r['test_run_delta']}")
        if native != {r["test_run"]: 1}:
            problems.append(f"{r['description']}: native {native}, test run {r['test_run']}")
        if not padded and r["test_run"] != r["expected"]:
            problems.append(f"{r['description']}: {r['test_run']}, the fixture table says {r['expected']}")
        if padded and r["unpadded_test_run"] != r["test_run"]:
            padded_changes.append(r["description"])
        if r["test_run"] == "tx":
            sends = sum(1 for d in r["native"] if "tx" in d)
            forwarded += sends
            target = by_mac.get(r["output"][:12])
            # A short frame: the program saw it padded to 60 bytes or as sent (the capture says which).
            outputs = ({"padded": r["output"], "as sent": r["unpadded_output"]} if r["unpadded_output"]
                       else {"as sent": r["output"]})
            got = Counter((name, kind) for name, frames_hex in captured.items() for f in frames_hex
                          for kind, out in outputs.items() if f == out)
            if sum(got.values()) != sends or {name for name, _kind in got} != {target}:
                problems.append(f"{r['description']}: sent {sends}x to {target}, captured {dict(got)}")
            seen_as.update(kind for _name, kind in got)
    other = sum(len(v) for v in captured.values()) - forwarded
    print(f"{len(records)} fixtures, {forwarded} forwarded frames captured byte-exact at their backend; "
          f"({dict(seen_as)}); {other} other frames from the guest reached the backends (its stack's own); "
          f"padding to 60 bytes changed the test-run verdict of: {padded_changes or 'none'}")
    assert not problems, "\n".join(problems)
    assert forwarded >= sum(1 for r in records if r["expected"] == "tx")


def test_vagrant_destroy_leaves_no_domain_volume_or_tap(vm, balancer):
    balancer.stop()
    assert vm.taps, "the running domain showed no tap"
    left = vm.destroy()
    assert left == [], left
    # The box's base volume stays by design (vagrant-libvirt reuses it).
    vols = subprocess.run(["virsh", "vol-list", vm_lab.POOL], capture_output=True, text=True).stdout
    assert "bookworm-lab" in vols, vols
