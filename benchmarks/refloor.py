"""A finished run's fused maps made again from its stage maps with the map's floor at other levels.

The pair "floor off" and "floor at 0.05" from the *same* stage maps tells what the floor
(``model.map_floor``) does to a benchmark's figures, apart from the day's arithmetic: each stage
map is brought back from the photo's size to the classifier input, fused by the engine's own
``MaskExplainer.fuse`` (the run's settings but the floor), and brought to the photo's size again;
every level goes through the same round trip, so the maps differ only by the floor. One run folder per
level is written beside the others (``maps/``, ``index.jsonl``), which ``hdm_lightning.evaluate``
scores like any run. For runs of the packaged EfficientNet-Lite0 at 224 px with ``resize: squash``
(``photos_faithfulness.py``'s).

    python benchmarks/refloor.py runs/photos7_floor3/HDM_floor3 --out runs/refloor --levels 0 0.05
    python -m hdm_lightning.evaluate --runs runs/refloor/floor_0 runs/refloor/floor_0.05 \\
        --data.images=runs/photos7_floor3/photos.txt "--metrics=[deletion,insertion,confidence]"
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hdm_lightning.data import IMAGENET_MEAN, IMAGENET_STD, load_pixels, to_tensor  # noqa: E402
from hdm_lightning.geometry import frame, map_to_model, map_to_original  # noqa: E402
from hdm_lightning.models import EfficientNetLite  # noqa: E402
from hdm_lightning.module import ImageState, MaskExplainer  # noqa: E402

SIZE, MEAN, STD = 224, torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)


def instance(spec: dict):
    """An object from a ``{class_path, init_args}`` entry of a ``config.yaml``."""
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))


def explainer(run: Path) -> MaskExplainer:
    """The run's module settings (``config.yaml``), its classifier the packaged Lite0."""
    settings = yaml.safe_load((run / "config.yaml").read_text())["model"]
    settings.pop("classifier", None)
    settings = {k: instance(v) if isinstance(v, dict) and "class_path" in v else v for k, v in settings.items()}
    return MaskExplainer(classifier=EfficientNetLite("lite0"), **settings)


def refloor(run: Path, out: Path, level: float, model: MaskExplainer) -> Path:
    """Writes ``out`` (a run folder) with every map of ``run`` fused again at floor ``level``."""
    if out.exists():
        shutil.rmtree(out)
    (out / "maps").mkdir(parents=True)
    model.hparams.map_floor = level
    rows = [json.loads(line) for line in (run / "index.jsonl").read_text().splitlines() if line.strip()]
    for row in rows:
        pixels, _ = load_pixels(row["image"])
        placement = frame(pixels.shape[0], pixels.shape[1], SIZE, "squash")
        stages = [map_to_model(torch.from_numpy(np.load(path)), placement)
                  for path in sorted((run / "stages").glob(f"{row['name']}_stage*.npy"))]
        state = ImageState(0, row["name"], row["image"], 0, to_tensor(pixels, placement, MEAN, STD), row["target"],
                           torch.tensor(row["logit"]), substrate=row["substrate"], stage_maps=stages)
        with torch.no_grad():
            fused = model.fuse(state)
        np.save(out / "maps" / f"{row['name']}.npy", map_to_original(fused["map"], placement).numpy())
        print(f"{out.name} {row['name']}: floor {float(fused['floor'])} (the run's {row.get('floor', 0.0)})")
        row["floor"] = float(fused["floor"])
    (out / "index.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished run folder (config.yaml, index.jsonl, stages/)")
    parser.add_argument("--out", type=Path, required=True, help="folder for one run folder per level")
    parser.add_argument("--levels", nargs="+", type=float, default=[0.0, 0.05], help="model.map_floor values")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = explainer(args.run)
    for level in args.levels:
        refloor(args.run, args.out / f"floor_{level:g}", level, model)


if __name__ == "__main__":
    main()
