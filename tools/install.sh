#!/usr/bin/env bash
# Installs jaxtune into ./.venv. With --test, also the test extra (pytest, torch CPU).
# torch goes first and pinned to 2.13.0 (a CPU wheel on this project's machines; elsewhere install
# the CPU wheel first, see README "Install"): an unpinned torch pulls a CUDA
# build of several GB (see DEVELOPERS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "--test" ]; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[test]"
else
  .venv/bin/python -m pip install -q -e .
fi
