#!/usr/bin/env bash
# GPU check (issue 3): the GPU-marked tests, then a short bf16 HDM run of a ResNet-50 (random
# weights) on 2 images with timing. Run it on a machine with a CUDA GPU; paste what it prints,
# with the GPU's name, into benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -m pytest -q -m gpu tests hdm_lightning || [ $? -eq 5 ]  # 5: no GPU test collected
for precision in 32-true bf16-mixed 16-mixed; do
  start=$(date +%s.%N)
  $PY train_masks.py --out_dir "runs/gpu-check-$precision" --resume false \
    --data.images benchmarks/two_photos.txt --data.batch_size 2 \
    --model.classifier.class_path hdm_lightning.models.TorchvisionClassifier \
    --model.classifier.init_args.name resnet50 \
    --trainer.accelerator gpu --trainer.devices 1 --trainer.precision "$precision" \
    --trainer.logger false --trainer.enable_progress_bar false 2>&1 | grep -E "Explained|steps" || true
  end=$(date +%s.%N)
  echo "precision=$precision wall_seconds=$(echo "$end - $start" | bc)"
done
$PY -c "import torch; print('peak GPU memory (GiB):', torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 'n/a')"
