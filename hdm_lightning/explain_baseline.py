"""Command line: explain images with a baseline method into the same run folder as HDM.

``python -m hdm_lightning.explain_baseline --baseline GradCAM --data.images PATH --out_dir runs/gradcam``

The baseline is picked by class name (``--baseline RISE --baseline.n_masks 2000``), the
classifier (``--model.classifier``) and the data (``--data.*``) have the same keys as in
``train_masks.py``, so one YAML file describes the inputs of both. The run folder gets the HDM
layout (``maps/``, ``overlays/``, ``index.jsonl``; see :mod:`hdm_lightning.outputs`), so
:mod:`hdm_lightning.evaluate` compares HDM and the baselines alike. Images whose map exists
are skipped: a killed run continues where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace
from torch import Tensor, nn

from hdm_lightning import masks as M
from hdm_lightning.baselines import Baseline
from hdm_lightning.data import ExplanationDataModule
from hdm_lightning.models import EfficientNetLite0, freeze
from hdm_lightning.outputs import RunFolder


@dataclass(frozen=True)
class Explained:
    """A batch's maps ``(N, H, W)``, explained classes ``(N,)`` and their logits ``(N,)``.

    ``logit`` is ``f_c(x)``; ``masked_logit`` is ``f_c(x ⊙ m)`` with a zero substrate in
    normalised space (the dataset mean colour), as HDM's index reports it.
    """

    maps: Tensor
    targets: Tensor
    logit: Tensor
    masked_logit: Tensor


def explain_batch(baseline: Baseline, classifier: nn.Module, images: Tensor, targets: Tensor) -> Explained:
    """Maps of ``baseline`` for ``(N, C, H, W)`` images; targets of -1 become the top-1 class."""
    with torch.no_grad():
        logits = classifier(images).float()  # (N, K)
    targets = torch.where(targets < 0, logits.argmax(dim=1), targets)  # (N,)
    maps = baseline.explain(classifier, images, targets)  # (N, H, W)
    with torch.no_grad():
        kept = M.apply_mask(images, maps, torch.zeros_like(images))  # (N, C, H, W)
        masked_logits = classifier(kept).float()  # (N, K)
    return Explained(
        maps=maps,
        targets=targets,
        logit=logits.gather(1, targets[:, None])[:, 0],
        masked_logit=masked_logits.gather(1, targets[:, None])[:, 0],
    )


def class_name(names: list[str] | None, target: int) -> str:
    """The class's name where the classifier knows it, else its index.

    Example:
        >>> class_name(["cat", "dog"], 1), class_name(None, 7)
        ('dog', '7')
    """
    return names[target] if names and target < len(names) else str(target)


def resolve_device(device: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pending(run: RunFolder, datamodule: ExplanationDataModule) -> list[int]:
    """Indices of the records whose map is not in the run folder yet."""
    return [i for i, record in enumerate(datamodule.records) if not run.is_done(record.name)]


def explain_folder(
    baseline: Baseline, classifier: nn.Module, datamodule: ExplanationDataModule, run: RunFolder, device: torch.device
) -> int:
    """Explains every image not done yet, batch by batch; returns how many maps were written."""
    datamodule.setup()
    todo = pending(run, datamodule)
    names = getattr(classifier, "class_names", lambda: None)()
    written = 0
    for start in range(0, len(todo), datamodule.batch_size):
        batch = datamodule.batch(todo[start : start + datamodule.batch_size])
        for index, error in batch["failed"]:
            run.record_failure(datamodule.records[index].path, error)
        if not batch["indices"]:
            continue
        clock = time.perf_counter()
        result = explain_batch(baseline, classifier, batch["images"].to(device), batch["targets"].to(device))
        seconds = (time.perf_counter() - clock) / len(batch["indices"])
        for n, index in enumerate(batch["indices"]):
            record = datamodule.records[index]
            target = int(result.targets[n])
            row = {
                "name": record.name,
                "image": record.path,
                "target": target,
                "class_name": class_name(names, target),
                "logit": float(result.logit[n]),
                "masked_logit": float(result.masked_logit[n]),
                "steps": 0,
                "seconds": round(seconds, 3),
                "sha256": batch["hashes"][n],
            }
            no_stages = result.maps.new_zeros((0, *result.maps.shape[1:]))  # (0, H, W)
            placement = batch["frames"][n]
            fused = datamodule.map_to_original(result.maps[n], placement.height, placement.width)  # (H, W)
            run.write(record.name, datamodule.picture(record.path), fused, no_stages, row)
            written += 1
    return written


def build_parser() -> ArgumentParser:
    """The command's parser: ``--baseline``, ``--model.classifier``, ``--data.*``, ``--out_dir``."""
    parser = ArgumentParser(prog="python -m hdm_lightning.explain_baseline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file with any of the settings below")
    parser.add_subclass_arguments(Baseline, "baseline", required=True, help="the method, by class name")
    parser.add_argument("--model.classifier", type=nn.Module | None, default=None,
                        help="the network to explain; None loads the packaged EfficientNet-Lite0")
    parser.add_class_arguments(ExplanationDataModule, "data")
    parser.add_argument("--out_dir", default="runs/baseline", help="run folder: maps, overlays, index")
    parser.add_argument("--device", default="auto", help="torch device of the classifier; auto: cuda if available")
    return parser


def load_classifier(classifier: nn.Module | None) -> nn.Module:
    """The configured classifier (or the packaged default), frozen."""
    return freeze(classifier if classifier is not None else EfficientNetLite0())


def main(args: list[str] | None = None) -> RunFolder:
    """Parses ``args`` (None: ``sys.argv``), explains the images and returns the run folder."""
    parser = build_parser()
    config = parser.parse_args(args)
    init: Namespace = parser.instantiate(config)
    run = RunFolder(config.out_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    parser.save(config, str(run.root / "config.yaml"), overwrite=True, skip_validation=True)
    device = resolve_device(config.device)
    classifier = load_classifier(init.model.classifier).to(device)
    written = explain_folder(init.baseline, classifier, init.data, run, device)
    done = run.read_index()
    print(f"{type(init.baseline).__name__}: wrote {written} maps; {len(done)} of {len(init.data.records)} "
          f"images explained in {Path(run.root).resolve()}")
    return run


if __name__ == "__main__":
    main()
