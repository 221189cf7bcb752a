#!/usr/bin/python3
"""Native ÷ generic XDP in the lb guest of the Vagrant lab, in one run (as root).

Boots the lb machine bridged to a namespace lab (tools/vm_lab.py), serves
iperf3 on be1, and measures one TCP stream from the client namespace through
the VIP with xdplb attached in native mode on the guest's virtio-net NIC,
then in generic mode on the same NIC, the same guest, the same run
(``--rounds`` streams in each mode; each mode is one attach, i.e.
one bcc compile, which takes minutes under TCG).  Under QEMU's software emulation (TCG)
the absolute figures say little about real hardware; the ratio is the
number to read, and the output says which accelerator ran.

    tools/vm_bench.py [--seconds 5] [--rounds 3] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOOLS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS_DIR))

import lab as labtool  # noqa: E402
import vm_lab  # noqa: E402
from bench import parse  # noqa: E402
from bench.lab_baselines import IPERF_PORT  # noqa: E402
from lab_xdplb import backend_health  # noqa: E402

SERVICE = "iperf"


def pool_text(lab) -> str:
    return "\n".join([
        "[xdplb]", 'metrics = ""', "",
        "[[service]]", f'name = "{SERVICE}"', f'vip = "{lab.vip}"', f"port = {IPERF_PORT}",
        "  [service.health]", "  interval = 1.0", "  timeout = 1.0",
        "  [[service.backend]]", '  name = "be1"', f'  address = "{lab.backend_ip(1)}"', ""])


def stream(lab, seconds: float) -> parse.IperfResult:
    done = lab.run("client", "iperf3", "-c", lab.vip, "-p", IPERF_PORT, "-t", f"{seconds:g}", "-O", "1", "-J",
                   check=False, timeout=seconds + 60)
    return parse.iperf3(done.stdout or done.stderr)


def measure(vm, mode: str, seconds: float, rounds: int, work: Path) -> list[dict]:
    """``rounds`` streams with xdplb attached once in ``mode`` (each attach is a bcc compile)."""
    b = vm_lab.GuestBalancer(vm, work / f"xdplb-{mode}.log").start(pool_text(vm.lab), mode=mode)
    try:
        b.wait_for(lambda st: backend_health(st, SERVICE)["be1"] == "up", 900, f"be1 up ({mode})")
        attached = next(line for line in b.log().splitlines() if "attached to" in line)
        results = [stream(vm.lab, seconds) for _ in range(rounds)]
    finally:
        b.stop()
    return [{"mode": mode, "attach": attached, "gbits": r.gbits, "retransmits": r.retransmits} for r in results]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="xdplb-vm-bench-"))
    with labtool.temporary_lab("xb") as lab:
        vm = vm_lab.VmLab(lab)
        vm.build_box()
        try:
            vm.up()
            accel = next((line for line in vm.up_output.splitlines() if "xdplb: libvirt uses" in line), "?")
            lab.popen("be1", "iperf3", "-s", "-4", "-p", IPERF_PORT, stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL)
            time.sleep(1.0)
            runs = [run for mode in ("native", "generic")
                    for run in measure(vm, mode, args.seconds, args.rounds, work)]
        finally:
            vm.destroy()
    median = {mode: statistics.median(r["gbits"] for r in runs if r["mode"] == mode)
              for mode in ("native", "generic")}
    ratio = median["native"] / median["generic"] if median["generic"] else float("nan")
    print(f"accelerator: {accel}")
    for r in runs:
        print(f"  {r['mode']:8} {r['gbits'] * 1000:8.1f} Mbit/s  retransmits {r['retransmits']:5}  ({r['attach']})")
    print(f"native / generic (median of {args.rounds} x {args.seconds:g} s each, one iperf3 stream through "
          f"the VIP, lb guest on virtio-net): {ratio:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"accelerator": accel, "runs": runs, "median_gbits": median,
                                         "native_over_generic": ratio}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
