#!/usr/bin/env bash
# tools/test.sh - set up (installs what is missing) and run the whole test suite.
#
# As root it runs everything: unit tests, packet tests (the real XDP program
# under BPF_PROG_TEST_RUN) and lab tests (real TCP through network
# namespaces), and treats any skipped test as a failure. As a normal user
# only the unit tests can run; the root ones report "needs root".
# Extra arguments go to pytest, e.g. tools/test.sh tests/unit -k maglev
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
if [ "$(id -u)" -eq 0 ]; then
    tools/setup.sh
    export XDPLB_REQUIRE_ROOT_TESTS=1
else
    echo "test: not root: running without set-up; root tests will be skipped" >&2
fi
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
