#!/usr/bin/env bash
# GPU check (issues 3 and 8): the GPU-marked tests, then ResNet-50 (random weights) at 224 px in
# bf16 through the engine: images per second for the fast and paper schedules, useful passes per
# second against the raw forward+backward throughput at the same batch size, the share of time
# outside the classifier, and peak GPU memory measured in the process that did the work
# (benchmarks/throughput.py prints one row per schedule). Then the same with torch.compile and
# channels_last. Run it on a machine with a CUDA GPU; paste what it prints, with the GPU's name,
# into benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
IMAGES=${IMAGES:-32}      # photos are repeated to this many images
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -m pytest -q -m gpu tests hdm_lightning || [ $? -eq 5 ]  # 5: no GPU test collected
common=(--classifier resnet50 --accelerator gpu --precision bf16-mixed --size 224 --images "$IMAGES"
        --max_items 256 --stages 3 --threads 8 --repeats 20 --schedules fast --paper)
$PY benchmarks/throughput.py "${common[@]}"
$PY benchmarks/throughput.py "${common[@]}" --compile --channels_last --chunk_size 256
