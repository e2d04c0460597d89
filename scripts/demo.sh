#!/usr/bin/env bash
# The demo: sets up .venv if needed, then explains the built-in photos with EfficientNet-Lite0.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python train_masks.py "$@"
