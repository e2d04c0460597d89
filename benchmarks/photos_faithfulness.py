"""Faithfulness on real photos: HDM against the baselines, EfficientNet-Lite0, on the CPU.

Seven photos shipped with scikit-image, matplotlib and scikit-learn, each explained for the class
the packaged EfficientNet-Lite0 predicts, by every method through its command line; then
``hdm_lightning.evaluate`` scores deletion and insertion AUC (RISE protocol) and Average Drop /
Increase in Confidence. No ground truth: localisation is measured by
``benchmarks/synthetic_localisation.py``.

Usage:
    python benchmarks/photos_faithfulness.py [--out runs/photos]
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
METHODS = {
    "HDM": ["train_masks.py", "--model.chunk_size=8", "--trainer.accelerator=cpu", "--trainer.logger=false",
            "--trainer.enable_progress_bar=false"],
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "photos")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    listing = args.out / "photos.txt"
    listing.write_text("\n".join(PHOTOS) + "\n")
    data = [f"--data.images={listing}", "--data.batch_size=4"]
    folders, seconds = {}, {}
    for name, command in METHODS.items():
        folders[name] = args.out / name.split(" (")[0].replace(" ", "_")
        seconds[name] = run([*command, *data, f"--out_dir={folders[name]}"])
    run(["-m", "hdm_lightning.evaluate", "--runs", *map(str, folders.values()), *data,
         "--metrics=[deletion,insertion,confidence]", f"--out_dir={args.out / 'eval'}"])
    lines = (args.out / "eval" / "results.md").read_text().splitlines()
    lines[0] += " seconds |"
    lines[1] += "---|"
    for i, name in enumerate(METHODS, start=2):
        lines[i] += f" {seconds[name]:.0f} |"
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
