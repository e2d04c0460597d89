"""Faithfulness on real photos: HDM against the baselines, EfficientNet-Lite0, on the CPU.

Seven photos shipped with scikit-image, matplotlib and scikit-learn, each explained for the class
the packaged EfficientNet-Lite0 predicts, by every method through its command line; then
``hdm_lightning.evaluate`` scores deletion and insertion AUC (RISE protocol) and Average Drop /
Increase in Confidence. ``--photo_set held_out``: six other package photos, on which no setting was
chosen. No ground truth: localisation is measured by
``benchmarks/synthetic_localisation.py``.

Usage:
    python benchmarks/photos_faithfulness.py [--out runs/photos]
    python benchmarks/photos_faithfulness.py --methods HDM "HDM reference" --photos 4 --num_steps 56 --refuse
    python benchmarks/photos_faithfulness.py --photo_set held_out --out runs/photos_held_out
    python benchmarks/photos_faithfulness.py --methods --hdm "HDM 120 steps=--schedule.max_steps 120" --photos 4
    python benchmarks/photos_faithfulness.py --methods HDM Grad-CAM --common "--model.classifier=\
        hdm_lightning.models.EfficientNetLite --model.classifier.variant=lite2 --data.image_size=260"
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ["skimage:chelsea", "skimage:coffee", "skimage:astronaut", "skimage:rocket",
          "matplotlib:grace_hopper.jpg", "sklearn:china.jpg", "sklearn:flower.jpg"]
#: Photos no setting was chosen on (listed before any method ran on them): the other package photos
#: that EfficientNet-Lite0 gives a class, two of objects (moped 0.50, tripod 0.95), four of scenes
#: or textures (spotlight 0.70, thimble 0.18, loudspeaker 0.21, lampshade 0.21).
HELD_OUT = ["skimage:motorcycle_left", "skimage:camera", "skimage:clock_motion", "skimage:coins",
            "skimage:hubble_deep_field", "skimage:retina"]
PHOTO_SETS = {"tuning": PHOTOS, "held_out": HELD_OUT}
#: The HDM command line every HDM row shares; each row adds its settings.
HDM_RUN = ["train_masks.py", "--model.chunk_size=8", "--trainer.accelerator=cpu", "--trainer.logger=false",
           "--trainer.enable_progress_bar=false"]
#: The defaults before stop 28 (configs/sufficient.yaml): no deletion term, the constant start (the
#: defaults start from Grad-CAM since stop 47); every row built on it was measured so.
#: configs/fast.yaml's rate and steps: the defaults' up to stop 55, as every row below "HDM" was measured.
FAST = ["--model.lr=0.05", "--schedule.min_steps=20", "--schedule.max_steps=40"]
SUFFICIENT = [*HDM_RUN, *FAST, "--model.deletion_weight=0", "--model.start=constant"]
BEFORE = [*SUFFICIENT, "--model.evidence_scale=stage"]  # the defaults before issue 7's evidence_scale
METHODS = {
    "HDM": HDM_RUN,
    "HDM fast": [*HDM_RUN, "--config", "configs/fast.yaml"],  # the preset (the defaults to stop 55; before stop 69
    # this row was its rate and steps on the defaults of the day, since stop 60 with the deletion gate)
    "HDM sufficient": SUFFICIENT,
    # the reference's term, fusion and constant rate at the fast preset's sizes and steps (the defaults
    # before issue 7)
    "HDM reference": [*SUFFICIENT, "--model.consistency=SquaredConsistency", "--model.fusion=SumFusion",
                      "--model.lr=0.05", "--model.lr_schedule=constant", "--model.relative_eps=0"],
    # ablations of the defaults before evidence_scale became "image" (README "Faithfulness")
    "HDM undamped": [*BEFORE, "--model.relative_eps=0"],
    "HDM squared term": [*BEFORE, "--model.consistency=SquaredConsistency"],
    "HDM constant rate": [*BEFORE, "--model.lr_schedule=constant"],
    "HDM lr 0.1": [*BEFORE, "--model.lr=0.1"],
    "HDM log-odds": [*BEFORE, "--model.score=log_odds"],
    "HDM log-odds lr 0.1": [*BEFORE, "--model.score=log_odds", "--model.lr=0.1"],
    "HDM log-odds, image evidence": [*SUFFICIENT, "--model.score=log_odds"],
    "HDM image evidence": [*SUFFICIENT, "--model.evidence_scale=image"],  # the defaults before stop 28: as "HDM sufficient"
    "HDM mask scale": [*SUFFICIENT, "--model.map_scale=mask"],
    "HDM log-odds, mask scale": [*SUFFICIENT, "--model.score=log_odds", "--model.map_scale=mask"],
    "HDM constant, image evidence": [*SUFFICIENT, "--model.lr_schedule=constant"],
    "HDM hold 0.5": [*SUFFICIENT, "--model.lr_hold=0.5"],
    "Grad-CAM": ["-m", "hdm_lightning.explain_baseline", "--baseline=GradCAM"],
    "Grad-CAM++": ["-m", "hdm_lightning.explain_baseline", "--baseline=GradCAMPlusPlus"],
    "Integrated Gradients": ["-m", "hdm_lightning.explain_baseline", "--baseline=IntegratedGradients",
                             "--baseline.internal_batch_size=10"],
    "RISE": ["-m", "hdm_lightning.explain_baseline", "--baseline=RISE", "--baseline.n_masks=1000",
             "--baseline.batch_size=25"],
}


def run(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *command], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def fused_otherwise(run_folder: Path, out: Path, stage: int | None) -> Path:
    """A run folder whose maps are ``run_folder``'s stage maps fused by the plain normalised sum
    (``stage`` None) or one stage alone: is a figure due to the fusion or to the stage maps?"""
    import shutil

    import numpy as np
    import torch

    from hdm_lightning.masks import sum_maps

    (out / "maps").mkdir(parents=True, exist_ok=True)
    shutil.copy(run_folder / "index.jsonl", out / "index.jsonl")
    for path in (run_folder / "maps").glob("*.npy"):
        stages = sorted((run_folder / "stages").glob(f"{path.stem}_stage*.npy"))
        chosen = stages if stage is None else [stages[stage - 1]]
        fused = sum_maps(torch.stack([torch.from_numpy(np.load(p))[None] for p in chosen]))[0]
        np.save(out / "maps" / path.name, fused.numpy().astype(np.float32))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "photos")
    parser.add_argument("--methods", nargs="*", default=[m for m in METHODS if not m.startswith("HDM ")],
                        choices=list(METHODS))
    parser.add_argument("--photo_set", choices=list(PHOTO_SETS), default="tuning",
                        help="the seven photos the settings were measured on, or six held-out ones")
    parser.add_argument("--photos", type=int, default=None, help="how many of the photos (first N)")
    parser.add_argument("--num_steps", type=int, default=224, help="points of the deletion/insertion curves")
    parser.add_argument("--hdm", action="append", default=[], metavar="NAME=ARGS",
                        help="add an HDM row: a name and train_masks.py overrides, e.g. 'HDM 120 steps="
                             "--schedule.max_steps 120'")
    parser.add_argument("--common", default="", metavar="ARGS",
                        help="options of every method and of the scoring: another classifier and its input size")
    parser.add_argument("--refuse", action="store_true",
                        help="also score the HDM run's stage maps fused by the plain sum, and its stage 1 alone")
    args = parser.parse_args()
    methods = {name: METHODS[name] for name in args.methods}
    for item in args.hdm:
        name, sep, extra = item.partition("=")
        if not sep or not name.strip():
            parser.error(f"--hdm {item!r}: expected NAME=ARGS")
        methods[name.strip()] = [*HDM_RUN, *extra.split()]
    args.out.mkdir(parents=True, exist_ok=True)
    listing = args.out / "photos.txt"
    listing.write_text("\n".join(PHOTO_SETS[args.photo_set][: args.photos]) + "\n")
    data = [f"--data.images={listing}", "--data.batch_size=4", *args.common.split()]
    folders, seconds = {}, {}
    for name, command in methods.items():
        folders[name] = args.out / name.split(" (")[0].replace(" ", "_")
        seconds[name] = run([*command, *data, f"--out_dir={folders[name]}"])
    if args.refuse and "HDM" in folders:
        for label, stages in (("HDM_sum_of_stages", None), ("HDM_stage_1", 1)):
            folders[label], seconds[label] = fused_otherwise(folders["HDM"], args.out / label, stages), 0.0
    run(["-m", "hdm_lightning.evaluate", "--runs", *map(str, folders.values()), *data,
         "--metrics=[deletion,insertion,confidence]", f"--deletion.num_steps={args.num_steps}",
         f"--insertion.num_steps={args.num_steps}", f"--out_dir={args.out / 'eval'}"])
    lines = (args.out / "eval" / "results.md").read_text().splitlines()
    lines[0] += " seconds |"
    lines[1] += "---|"
    for i, name in enumerate(folders, start=2):
        lines[i] += f" {seconds[name]:.0f} |"
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
