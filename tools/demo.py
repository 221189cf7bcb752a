#!/usr/bin/env python3
"""The demo: build the lab, balance the example pool, show spread and failover.

Run by tools/demo.sh after set-up (as root, with .venv's python):
  1. builds the namespace lab (client, lb, three PACS stand-ins, one bridge);
  2. runs `xdplb attach eth0 examples/pacs.toml` in the lb namespace;
  3. opens 60 DICOM-port (104) connections through the VIP, and 20 web
     requests (port 80, client persistence), and shows where they went;
  4. kills pacs-b's server, measures how long new connections fail, and
     shows it return;
  5. stops xdplb (SIGTERM) and tears the lab down, leaving nothing behind.

`demo.py --pacs` runs the PACS profile instead (tools/pacs_lab.py demo):
real Orthanc servers behind the VIP, dcmtk C-STOREs of generated studies,
instances per server from Orthanc's REST API, and a failover.
"""
from __future__ import annotations

import collections
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import lab as labtool  # noqa: E402
from lab_xdplb import Balancer, backend_health, client, client_popen  # noqa: E402

POOL = ROOT / "examples" / "pacs.toml"
NAMES = {"be1": "pacs-a", "be2": "pacs-b", "be3": "pacs-c"}


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def spread(lab, port: int, count: int) -> None:
    counts = collections.Counter(client(lab, "hello", lab.vip, port, count))
    for name in sorted(counts):
        print(f"   {NAMES.get(name, name):8} {counts[name]:3}  {'#' * counts[name]}")


def main() -> int:
    lab = labtool.Lab(prefix="xl")
    lab.down()
    work = Path(tempfile.mkdtemp(prefix="xdplb-demo-"))
    step("building the lab: client 10.10.0.2, gateway (lb) 10.10.0.10, PACS 10.10.0.11-13, VIP 10.10.0.100")
    lab.up()
    balancer = Balancer(lab, POOL, work / "run", work / "xdplb.log")
    try:
        step(f"sudo xdplb attach eth0 {POOL.relative_to(ROOT)}   (in the lb namespace)")
        started = time.monotonic()
        balancer.start()
        balancer.wait_ready()
        print(f"   ready after {time.monotonic() - started:.1f}s; its log:")
        print("   " + balancer.log().strip().replace("\n", "\n   "))

        step("60 new DICOM associations (TCP 104) to the VIP: which PACS answered")
        spread(lab, 104, 60)
        step("20 web viewer connections (TCP 80, persistence = client): one PACS per workstation")
        web: collections.Counter = collections.Counter()
        for _ in range(20):
            out = lab.run("client", "curl", "-s", "-m", "2", f"http://{lab.vip}/", check=False).stdout.strip()
            web[NAMES.get(out, out)] += 1
        for name, count in sorted(web.items()):
            print(f"   {name:8} {count:3}")

        step("xdplb status")
        print(balancer.cli("status", "-i", "eth0").stdout)

        step("Prometheus metrics on 127.0.0.1:9742 (the pool's [xdplb] metrics), per backend")
        metrics = lab.run("lb", "curl", "-s", "-m", "5", "http://127.0.0.1:9742/metrics", check=False).stdout
        for line in metrics.splitlines():
            if line.startswith(("xdplb_backend_flows_total", "xdplb_backend_up")) and "synapse-dicom\"" in line:
                print(f"   {line}")

        step("killing pacs-b's server; a client opens a new association every 50 ms for 6 s")
        watch = client_popen(lab, "watch", lab.vip, 104, 6)
        t0 = time.monotonic()
        time.sleep(1.0)
        lab.kill_backend("be2")
        killed = time.monotonic() - t0
        out, _ = watch.communicate(timeout=30)
        tries = [line.split(maxsplit=2) for line in out.splitlines()]
        fails = [float(t) for t, r, _ in tries if r == "fail" and float(t) >= killed]
        last = max(fails) - killed if fails else 0.0
        print(f"   {len(fails)} of {sum(1 for t, *_ in tries if float(t) >= killed)} tries failed after the kill; "
              f"the last one {last:.2f}s after it (health: interval 1s, fall 2)")
        after = collections.Counter(NAMES.get(r[2], r[2]) for r in tries if r[1] == "ok" and float(r[0]) > killed + last)
        print(f"   after failover: {dict(after)}")
        print("   " + "\n   ".join(line for line in balancer.log().splitlines() if "be2" in line or "pacs-b" in line))

        step("pacs-b comes back")
        lab.start_backend("be2")
        balancer.wait_for(lambda st: backend_health(st, "synapse-dicom")["pacs-b"] == "up", 10, "pacs-b up")
        spread(lab, 104, 30)
    finally:
        step("SIGTERM: xdplb detaches and removes the VIP; tearing the lab down")
        code = balancer.stop() if balancer.proc else 0
        print(f"   xdplb exited with {code}")
        lab.down()
    print("\ndemo complete")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--pacs"]:
        import pacs_lab
        sys.exit(pacs_lab.demo())
    sys.exit(main())
