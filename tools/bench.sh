#!/usr/bin/env bash
# tools/bench.sh - set up (installs what is missing), then run the benchmarks.
#
# As root: tools/setup.sh first (the same set-up as tools/test.sh), then
# tools/bench/run.py with every argument passed on, for example
#   sudo tools/bench.sh                       # all four suites, full counts
#   sudo tools/bench.sh --quick --suite lab   # one suite, small counts
# Results go to /tmp/xdplb-bench unless --out DIR says otherwise.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
if [ "$(id -u)" -ne 0 ]; then
    echo "bench: needs root (BPF programs and network namespaces): run it with sudo" >&2
    exit 2
fi
tools/setup.sh
exec .venv/bin/python tools/bench/run.py "$@"
