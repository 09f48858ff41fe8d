#!/usr/bin/env bash
# Run the benchmark + numerics suite (installs what it needs first). Small default sizes on a
# CPU-only machine; extra args go to `python -m benchmarks` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install.sh
exec "$PY" -m benchmarks "$@"
