#!/usr/bin/env bash
# Set up .venv for mmlens on a fresh machine (idempotent). `--test` adds the test extra.
# torch is pinned to the CPU wheel on disk through constraints.txt; the library itself only asks torch>=2.4.
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q -c constraints.txt "torch==2.13.0"
.venv/bin/python -m pip install -q -c constraints.txt -e ".${extra}"
# PyPI's torchvision breaks on this torch; transformers falls back to PIL image processors without it.
if .venv/bin/python -m pip show -q torchvision >/dev/null 2>&1; then .venv/bin/python -m pip uninstall -y -q torchvision; fi
.venv/bin/python -c "import mmlens, torch; print(f'mmlens {mmlens.__version__} ready (torch {torch.__version__})')"
