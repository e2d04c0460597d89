#!/usr/bin/env bash
# Creates .venv (once) and installs the project with its dev extra into it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import hdm_lightning, pytest, pytorch_grad_cam, captum" 2>/dev/null; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".[dev]"
fi
