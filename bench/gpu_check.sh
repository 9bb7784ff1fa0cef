#!/usr/bin/env bash
# The engine's GPU check in one run (bench/gpu_check.py says what it checks); installs nothing.
# On a GPU machine (torch, no network; carry models/demo): bash bench/gpu_check.sh
# Without a GPU it runs in CPU mode (CI does, so that it keeps working).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" -m bench.gpu_check "$@"
