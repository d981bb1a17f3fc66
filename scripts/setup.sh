#!/usr/bin/env bash
# Set up voxelflow in ./.venv on a fresh machine: CPU torch first (a bare torch
# requirement would pull a multi-GB CUDA build), then the project with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # A machine with CUDA installs its own torch build before running this script.
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
.venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/python -m pip check
# The UI test drives a real Chromium (Debian's package; Playwright's own browser download is not
# used). Installed when missing and this is a root shell with apt (CI, a fresh container);
# elsewhere install it yourself (`apt-get install chromium`) or the UI test is skipped, saying so.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "setup: could not install chromium; the Prefect UI test will be skipped" >&2
fi
