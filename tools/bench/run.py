#!/usr/bin/env python3
"""Run xdplb's benchmarks (as root): print tables, write JSON and PNG charts.

    sudo .venv/bin/python tools/bench/run.py [--quick] [--suite NAME]... [--out DIR]

Suites (default: all four, in this order):
  dataplane   per-packet cost of the real XDP program under BPF_PROG_TEST_RUN,
              as a ratio to a minimal XDP forwarder (the floor)
  lab         one TCP stream (iperf3), short-connection rate (wrk) and CPU per GB
              through the namespace lab: direct, xdplb generic, xdplb native,
              nftables DNAT and HAProxy
  controller  Maglev table build, health verdict to table live, attach time,
              reload of 64 services, map memory
  nat         the NAT lab (a routed client, Orthanc behind the gateway): one
              stream, connection rate and a large C-STORE through xdplb in
              NAT mode (generic and native) next to nftables DNAT

Each suite writes DIR/<suite>.json (figures, every run, the machine and the
method), DIR/<suite>.md (the printed table) and DIR/<suite>_*.png.
--quick shrinks every suite (fewer repeats, shorter runs, smaller grids);
its figures are for checking the bench, not for quoting. The benchmarks
never fail on speed: they fail only when something does not work.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `xdplb` importable
    _TOOLS = Path(__file__).resolve().parents[1]
    sys.path[:0] = [str(_TOOLS), str(_TOOLS.parent)]

from bench import context, tables  # noqa: E402

SUITES = ("dataplane", "lab", "controller", "nat")
DEFAULT_OUT = "/tmp/xdplb-bench"


class UsageError(ValueError):
    pass


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/bench/run.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--suite", action="append", choices=SUITES, help="run only this suite (repeatable)")
    p.add_argument("--quick", action="store_true", help="small counts and grids: checks the bench, not for quoting")
    p.add_argument("--repeat", type=int, help="dataplane: runs of the program per measurement "
                                              "(default 1,000,000; --quick 100,000)")
    p.add_argument("--runs", type=int, help="measurements per figure; the median is reported (default 5; --quick 3)")
    p.add_argument("--seconds", type=float, help="lab: length of each iperf3/wrk run (default 5; --quick 2)")
    p.add_argument("--baseline", metavar="REV", help="dataplane: also time the XDP program of git revision REV "
                                                     "(for example main) next to this one")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"directory for JSON, tables and PNGs (default {DEFAULT_OUT})")
    return p


def settings_from(args) -> dict:
    """Validated numbers for every suite; UsageError names the bad option and value."""
    values = {
        "repeat": args.repeat if args.repeat is not None else (100_000 if args.quick else 1_000_000),
        "runs": args.runs if args.runs is not None else (3 if args.quick else 5),
        "seconds": args.seconds if args.seconds is not None else (2.0 if args.quick else 5.0),
    }
    if values["repeat"] < 1:
        raise UsageError(f"--repeat {values['repeat']}: must be at least 1")
    if values["runs"] < 1:
        raise UsageError(f"--runs {values['runs']}: must be at least 1")
    if not 1.0 <= values["seconds"] <= 600:
        raise UsageError(f"--seconds {values['seconds']:g}: must be between 1 and 600")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    values["out"] = out
    values["quick"] = args.quick
    values["baseline"] = args.baseline
    values["suites"] = tuple(s for s in SUITES if s in (args.suite or SUITES))
    return values


def _say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def run_suite(name: str, cfg: dict) -> dict:
    """Run one suite; write its JSON, table and charts; return its JSON document."""
    ctx = context.machine()
    started = time.monotonic()
    if name == "dataplane":
        from bench import suite_dataplane as suite

        opts = suite.Options(cfg["repeat"], cfg["runs"], suite.QUICK if cfg["quick"] else suite.FULL, _say)
        if cfg.get("baseline"):
            import tempfile

            opts.baseline = suite.baseline_sources(cfg["baseline"], Path(tempfile.mkdtemp(prefix="xdplb-baseline-")))
        ctx.update(xdp_mode="none (BPF_PROG_TEST_RUN)",
                   repeat=cfg["repeat"], runs=cfg["runs"], statistic="median of runs, each the kernel's mean ns per repeat")
    elif name == "lab":
        from bench import suite_lab as suite

        opts = suite.Options(cfg["runs"], cfg["seconds"], cfg["quick"], cfg["out"], _say)
        ctx.update(xdp_mode="per row: generic or native on veth", runs=cfg["runs"],
                   seconds_per_run=cfg["seconds"], statistic="median of runs")
    elif name == "nat":
        from bench import suite_nat as suite

        opts = suite.Options(cfg["runs"], cfg["seconds"], cfg["quick"], cfg["out"], _say)
        ctx.update(xdp_mode="per row: generic or native on veth", runs=cfg["runs"],
                   seconds_per_run=cfg["seconds"], statistic="median of runs")
    else:
        from bench import suite_controller as suite

        opts = suite.Options(cfg["runs"], cfg["quick"], cfg["out"], _say)
        ctx.update(xdp_mode="generic on veth (attach and reload in the lab)", runs=cfg["runs"],
                   statistic="median of runs")
    result = suite.run(opts)
    ctx["seconds_taken"] = round(time.monotonic() - started, 1)
    ctx["loadavg_at_end"] = context.loadavg()
    ctx["quick"] = cfg["quick"]
    out = cfg["out"]
    text = f"### {name}\n\n{tables.context_line(ctx)}\n\n{suite.render(result)}\n"
    doc = {"suite": name, "context": ctx, "result": result}
    (out / f"{name}.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    (out / f"{name}.md").write_text(text)
    charts = suite.draw(result, tables.context_line(ctx), out)
    doc["charts"] = [str(p) for p in charts]
    print(text, flush=True)
    _say(f"{name}: wrote {out / (name + '.json')}, {out / (name + '.md')} and {len(charts)} chart(s)")
    return doc


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = settings_from(args)
    except UsageError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("bench: needs root (BPF programs and network namespaces): run it with sudo", file=sys.stderr)
        return 2
    cfg["out"].mkdir(parents=True, exist_ok=True)
    for name in cfg["suites"]:
        run_suite(name, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
