#!/usr/bin/env bash
# Installs jaxtune into ./.venv. With --test, also the test extra (pytest, torch CPU).
# torch goes first and pinned to 2.13.0 (a CPU wheel on this project's machines; elsewhere install
# the CPU wheel first, see README "Install"): an unpinned torch pulls a CUDA
# build of several GB (see DEVELOPERS.md). PYTHON=/path/to/python3 picks the interpreter (3.10+).
set -euo pipefail
cd "$(dirname "$0")/.."
case "$#:${1:-}" in
  0:|1:--test) ;;
  *) echo "usage: bash tools/install.sh [--test]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
# A .venv that a failed first run left without pip (Debian without python3-venv), or one made by
# another Python than 3.10+, is made again rather than reused forever; one made without pip on
# purpose (uv) gets pip if it can.
if [ -x .venv/bin/python ] && ! .venv/bin/python -c 'import pip' 2>/dev/null; then
  .venv/bin/python -m ensurepip >/dev/null 2>&1 || true
fi
if [ -x .venv/bin/python ] && ! .venv/bin/python -c 'import sys, pip; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "tools/install.sh: .venv has no pip or a Python older than 3.10; making it again" >&2
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
    echo "error: jaxtune needs Python 3.10 or newer; $PY is $("$PY" -V 2>&1). Set PYTHON=/path/to/python3.10+." >&2
    exit 2
  }
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "--test" ]; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[test]"
else
  .venv/bin/python -m pip install -q -e .
fi
