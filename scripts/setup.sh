#!/usr/bin/env bash
# Creates/refreshes the project venv in .venv (idempotent: re-runs only when pyproject.toml changes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ -f "$STAMP" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first: the pinned CPU build, so nothing later pulls a multi-GB CUDA wheel.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
rm -f .venv/.installed-*
touch "$STAMP"
