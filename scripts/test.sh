#!/usr/bin/env bash
# Run the test suite (installs what it needs first). Without a CUDA device the Triton kernels
# run in the Triton interpreter on the CPU; GPU-only tests are skipped. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install.sh
exec "$PY" -m pytest tests -n "${HOPE_TEST_WORKERS:-2}" -q "$@"
