#!/bin/bash
# Does a plain run finish on the classifiers people bring? Each torchvision / timm architecture below
# (random weights: nothing is downloaded) explains one package photo, 2 stages of at most 6 steps a
# level, and the line says its exit status, seconds and maps written. Not a quality figure: a smoke
# run of the whole pipeline (the float32-stride trace, the substrate choice, the removal, the writers).
#
# Usage: bash benchmarks/architectures.sh [OUT]     (default OUT: runs/architectures; about 25 min on 2 cores)
set -u
cd "$(dirname "$0")/.."
OUT=${1:-runs/architectures}
PY=${PYTHON:-python}
mkdir -p "$OUT"
echo "skimage:chelsea" > "$OUT/photo.txt"
run() {  # NAME SIZE PRECISION CLASSIFIER-ARGS...
  local name=$1 size=$2 precision=$3; shift 3
  local folder="$OUT/${name}_${precision}" start=$SECONDS
  rm -rf "$folder"
  $PY train_masks.py --data.images "$OUT/photo.txt" --data.image_size "$size" --schedule.stages 2 \
    --schedule.max_steps 6 --schedule.min_steps 2 --out_dir "$folder" --trainer.logger=false \
    --trainer.enable_progress_bar=false --trainer.precision "$precision" "$@" > "$folder.log" 2>&1
  local rc=$?
  echo "$name $precision ${size}px rc=$rc $((SECONDS - start))s maps=$(ls "$folder/maps" 2>/dev/null | wc -l)" | tee -a "$OUT/summary.txt"
}
TV=hdm_lightning.models.TorchvisionClassifier
TIMM=hdm_lightning.models.TimmClassifier
for name in resnet18 vgg11_bn densenet121 mobilenet_v3_small convnext_tiny efficientnet_b0 regnet_y_400mf \
            squeezenet1_1 alexnet googlenet shufflenet_v2_x0_5 mnasnet0_5; do
  run "tv_$name" 96 32-true --model.classifier=$TV --model.classifier.name=$name
done
run tv_resnet18 96 bf16-mixed --model.classifier=$TV --model.classifier.name=resnet18
run tv_vit_b_16 224 32-true --model.classifier=$TV --model.classifier.name=vit_b_16
run tv_swin_t 224 32-true --model.classifier=$TV --model.classifier.name=swin_t
run tv_inception_v3 299 32-true --model.classifier=$TV --model.classifier.name=inception_v3
for name in vit_tiny_patch16_224 deit_tiny_patch16_224 resnet18; do
  run "timm_$name" 224 32-true --model.classifier=$TIMM --model.classifier.name=$name
done
run timm_vit_tiny_patch16_224 224 bf16-mixed --model.classifier=$TIMM --model.classifier.name=vit_tiny_patch16_224
