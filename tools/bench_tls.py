#!/usr/bin/python3
"""Benchmark of the TLS tier: HAProxy supervised by xdplb, next to the same HAProxy run by hand.

In a namespace lab (tools/lab.py, 3 backends with their HTTP servers on port 80), as root:

  A. `xdplb attach` with the lab pool plus "web-tls" (VIP:443, TLS terminated by the
     HAProxy xdplb supervises, cleartext HTTP to port 80, health_from "web");
  B. `xdplb attach` with the lab pool alone (the same XDP program on eth0, the same VIP)
     and HAProxy started by hand (`haproxy -W -db`) on the configuration A generated.

Each measures, from the client namespace: TLS handshakes per second (`openssl s_time
-new`, full handshakes, one connection at a time) and bulk throughput (curl over HTTPS
of one large `GET /bytes?n=N`), RUNS times each, and prints the medians. XDP mode:
generic (auto on veth); TLS packets are XDP_PASSed to the lb namespace's stack in both.

  tools/bench_tls.py [--seconds 5] [--bytes 200000000] [--runs 3] [--out result.json]
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
sys.path.insert(0, str(TOOLS.parent))

import lab as labtool  # noqa: E402
from lab_xdplb import Balancer, backend_health, pool_text  # noqa: E402

TLS_SERVICE = """
[[service]]
name = "web-tls"
vip = "{vip}"
port = 443
  [service.tls]
  certificate = "{cert}"
  backend_protocol = "http"
  backend_port = 80
  health_from = "web"
{backends}"""


def make_cert(d: Path) -> Path:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "k.pem", "-out", "c.pem",
                    "-days", "2", "-subj", "/CN=bench.lab"], cwd=d, check=True, capture_output=True)
    pem = d / "pacs.pem"
    pem.write_bytes((d / "c.pem").read_bytes() + (d / "k.pem").read_bytes())
    return pem


def handshakes_per_second(lab, seconds: int) -> float:
    out = lab.run("client", "openssl", "s_time", "-connect", f"{lab.vip}:443", "-new", "-time", str(seconds),
                  timeout=seconds + 60).stdout
    m = re.search(r"(\d+) connections in ([\d.]+) real seconds", out)
    if not m:
        raise RuntimeError(f"openssl s_time said: {out[-500:]}")
    return int(m.group(1)) / float(m.group(2))


def bulk_bytes_per_second(lab, size: int) -> float:
    out = lab.run("client", "curl", "-sS", "--fail", "-k", "-o", "/dev/null", "-w", "%{speed_download}",
                  f"https://{lab.vip}/bytes?n={size}", timeout=600).stdout
    return float(out)


def measure(lab, args) -> dict:
    hs = [handshakes_per_second(lab, args.seconds) for _ in range(args.runs)]
    bulk = [bulk_bytes_per_second(lab, args.bytes) for _ in range(args.runs)]
    return {"handshakes_per_second": hs, "bulk_bytes_per_second": bulk,
            "handshakes_median": statistics.median(hs), "bulk_MBps_median": statistics.median(bulk) / 1e6}


def wait_https(lab, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while lab.run("client", "curl", "-sS", "-k", "-m", "2", "-o", "/dev/null", f"https://{lab.vip}/",
                  check=False, timeout=10).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError("no HTTPS answer on the VIP")
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, default=5, help="length of one s_time run")
    p.add_argument("--bytes", type=int, default=200_000_000, help="size of one bulk download")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="xdplb-bench-tls-"))
    results = {}
    with labtool.temporary_lab("xb") as lab:
        cert = make_cert(work)
        base = pool_text(lab)
        backends = "".join(f'  [[service.backend]]\n  name = "{n}"\n  address = "{lab.backend_ip(n)}"\n'
                           for n in lab.backend_names())
        (work / "tier.toml").write_text(base + TLS_SERVICE.format(vip=lab.vip, cert=cert, backends=backends))
        (work / "plain.toml").write_text(base)

        b = Balancer(lab, work / "tier.toml", work / "run-a", work / "xdplb-a.log").start()
        try:
            b.wait_ready()
            b.wait_for(lambda st: all(h == "up" for h in backend_health(st, "web-tls").values()), 30, "web up")
            wait_https(lab)
            results["xdplb_supervised"] = measure(lab, args)
            (config,) = (work / "run-a").glob("**/eth0.haproxy.cfg")
            shutil.copy(config, work / "by-hand.cfg")
        finally:
            b.stop()
            b.release()
        text = (work / "by-hand.cfg").read_text()
        (work / "by-hand.cfg").write_text(re.sub(r'stats socket "[^"]+"', f'stats socket "{work}/by-hand.sock"', text))

        b = Balancer(lab, work / "plain.toml", work / "run-b", work / "xdplb-b.log").start()
        haproxy = None
        try:
            b.wait_ready()
            haproxy = lab.popen("lb", "haproxy", "-W", "-db", "-f", work / "by-hand.cfg",
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_https(lab)
            results["haproxy_by_hand"] = measure(lab, args)
        finally:
            if haproxy is not None:
                haproxy.terminate()
                haproxy.wait(10)
            b.stop()
            b.release()
    results["settings"] = {"seconds": args.seconds, "bytes": args.bytes, "runs": args.runs,
                           "xdp_mode": "generic (auto on veth); TLS is XDP_PASSed to the stack"}
    for name in ("xdplb_supervised", "haproxy_by_hand"):
        r = results[name]
        print(f"{name:17} handshakes/s median {r['handshakes_median']:8.1f} "
              f"{[round(x, 1) for x in r['handshakes_per_second']]}; bulk MB/s median {r['bulk_MBps_median']:7.1f} "
              f"{[round(x / 1e6, 1) for x in r['bulk_bytes_per_second']]}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
