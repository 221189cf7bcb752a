#!/usr/bin/env bash
# tools/demo.sh - set up (installs what is missing) and run the lab demo, as root.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/tools/setup.sh"
exec "$here/.venv/bin/python" "$here/tools/demo.py"
