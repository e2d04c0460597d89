#!/usr/bin/env bash
# Creates .venv (once) and installs the project with its dev extra into it.
# On x86_64, torch==2.14.1 is a CUDA build: the venv takes about 6 GB.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import hdm_lightning, pytest, pytorch_grad_cam, captum" 2>/dev/null; then
  free_gb=$(df -Pk . | awk 'NR==2 {print int($4 / 1048576)}')
  echo "setup_env: installing into .venv ($free_gb GB free on $(df -P . | awk 'NR==2 {print $6}'); about 6 GB needed)"
  if [ "$free_gb" -lt 7 ]; then
    echo "setup_env: warning: less than 7 GB free; the install may fail with 'No space left on device'" >&2
  fi
  .venv/bin/pip install -q --no-cache-dir --upgrade pip
  .venv/bin/pip install -q --no-cache-dir -e ".[dev]"
fi
