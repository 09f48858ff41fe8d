#!/usr/bin/env bash
# Install hope-kernels and what it needs into the current Python (set PYTHON to choose one).
# A torch that is already installed is kept; where none is, HOPE_TORCH_SPEC picks the one to
# install (default: the CPU build this project is tested with).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_quiet() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "[install] torch not found: installing ${HOPE_TORCH_SPEC:-torch==2.13.0}"
    pip_quiet "${HOPE_TORCH_SPEC:-torch==2.13.0}"
fi
# Checked from outside the repo, so only an installed (editable) copy of this checkout counts.
installed_root=$(cd / && "$PY" -c "import hope_kernels, hope, pytest, xdist, pytest_benchmark, matplotlib, yaml, tqdm, transformers, safetensors, os; print(os.path.dirname(os.path.dirname(os.path.realpath(hope_kernels.__file__))))" 2>/dev/null || true)
if [ "$installed_root" != "$(pwd -P)" ]; then
    echo "[install] pip install -e .[test,bench,hf]"
    pip_quiet -e ".[test,bench,hf]"
fi
