"""Command line: score the maps of several run folders side by side.

``python -m hdm_lightning.evaluate --runs runs/hdm runs/gradcam --data.images PATH --out_dir runs/eval``

Every run folder (HDM or :mod:`hdm_lightning.explain_baseline`) is one method. Each is scored on
the images explained in all of them, so the means compare like with like. An image goes through
the :class:`~hdm_lightning.data.ExplanationDataModule` of ``--data.*`` (the preprocessing of the
explanation), its map is resized to the classifier input, and its class is the run's index row.
Metrics (``--metrics``; default: every one the inputs allow):

- ``deletion``, ``insertion``: RISE AUCs and their mean curves;
- ``confidence``: Average Drop and Increase in Confidence;
- ``pointing``, ``energy``, ``localisation``: pointing game, energy pointing game and top-p %
  Dice/IoU/precision/sensitivity, with ``--ground_truth``.

Outputs in ``--out_dir``: ``results.csv`` and ``results.md`` (one row per method, means over
images), ``deletion.png``, ``insertion.png`` (mean curves) and ``gallery.png`` (maps side by
side); with ``--wandb true`` the same go to an offline W&B run.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn
from torchmetrics import Metric

from hdm_lightning.data import ExplanationDataModule, ImageRecord
from hdm_lightning.explain_baseline import load_classifier, resolve_device
from hdm_lightning.geometry import Frame, map_to_model
from hdm_lightning.groundtruth import GroundTruth
from hdm_lightning.metrics import (
    AverageDropIncrease,
    DeletionAUC,
    EnergyPointingGame,
    InsertionAUC,
    PointingGame,
    TopPercentLocalisation,
)
from hdm_lightning.outputs import RunFolder, overlay

MetricName = Literal["deletion", "insertion", "confidence", "pointing", "energy", "localisation"]
METRICS: tuple[str, ...] = get_args(MetricName)
GROUND_TRUTH_METRICS = ("pointing", "energy", "localisation")
#: What each metric's ``update`` takes, by the names of :func:`evaluate`'s batch tensors.
INPUTS = {
    "deletion": ("images", "maps", "targets"),
    "insertion": ("images", "maps", "targets"),
    "confidence": ("images", "maps", "targets"),
    "pointing": ("maps", "masks", "targets"),
    "energy": ("maps", "masks"),
    "localisation": ("maps", "masks"),
}
#: Column of a metric whose ``compute`` gives one number (the others name their own).
COLUMNS = {"deletion": "deletion_auc", "insertion": "insertion_auc", "pointing": "pointing_game",
           "energy": "energy_pointing_game"}
LOWER_IS_BETTER = ("deletion_auc", "average_drop")
CURVES = ("deletion", "insertion")
#: torchmetrics' distributed and caching options: not settings of an evaluation.
METRIC_RUNTIME_ARGS = {"compute_on_cpu", "dist_sync_on_step", "process_group", "dist_sync_fn",
                       "distributed_available_fn", "sync_on_compute", "compute_with_cache"}
#: Metrics with settings of their own: ``--<group>.<argument>``, less what the evaluation gives.
METRIC_GROUPS = (
    ("deletion", DeletionAUC, {"classifier"}),
    ("insertion", InsertionAUC, {"classifier"}),
    ("pointing", PointingGame, {"num_classes"}),
    ("localisation", TopPercentLocalisation, set()),
)
GALLERY_IMAGES = 6


@dataclass
class Results:
    """The images scored (name -> path) and, per method (run label), the table row, the mean
    deletion/insertion curves and each image's deletion/insertion AUC (in the order of ``images``)."""

    images: dict[str, str]
    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    curves: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    per_image: dict[str, dict[str, Tensor]] = field(default_factory=dict)


# ------------------------------------------------------------------------------ inputs
def maps_in_frames(maps: Sequence[np.ndarray], frames: Sequence[Frame]) -> Tensor:
    """Maps over the original pictures -> ``(N, S, S)`` float32 in [0, 1] over the classifier
    input, placed as the pictures are (``data.resize``: squashed, or scaled and padded with 0).

    Example:
        >>> from hdm_lightning.geometry import frame
        >>> maps_in_frames([np.ones((4, 6), dtype=np.float32)], [frame(4, 6, 2, "squash")])
        tensor([[[1., 1.],
                 [1., 1.]]])
    """
    placed = [map_to_model(torch.from_numpy(m), f) for m, f in zip(maps, frames)]
    return torch.stack(placed).clamp(0, 1)  # (N, S, S)


def truth_in_frames(ground_truth: GroundTruth, keys: Sequence[str], frames: Sequence[Frame]) -> Tensor:
    """Ground-truth masks drawn at the size each picture has inside the input, then placed:
    ``(N, S, S)`` bool, false on the padding."""
    masks = [map_to_model(ground_truth.mask_for(k, f.inner_height, f.inner_width).float(), f) > 0.5
             for k, f in zip(keys, frames)]
    return torch.stack(masks)  # (N, S, S)


def check_pictures(label: str, index: dict[str, dict], records: Sequence[ImageRecord], hashes: Sequence[str]) -> None:
    """``ValueError`` naming the first image whose file is not the picture the run explained.

    Index rows carry the SHA-256 of the explained file; rows without one (older runs) pass.
    """
    for record, digest in zip(records, hashes):
        expected = index[record.name].get("sha256")
        if expected is not None and expected != digest:
            raise ValueError(
                f"runs: {label}: image {record.name!r} is not the picture its map was made for: {record.path} has "
                f"sha256 {digest[:12]}…, the run explained {index[record.name].get('image')} with {expected[:12]}…; "
                "was the image folder changed, or another one given?")


def method_labels(runs: Sequence[str]) -> list[str]:
    """Folder names where they tell the runs apart, else the paths as given.

    Example:
        >>> method_labels(["runs/hdm", "runs/gradcam"]), method_labels(["a/hdm", "b/hdm"])
        (['hdm', 'gradcam'], ['a/hdm', 'b/hdm'])
    """
    names = [Path(run).name for run in runs]
    return names if len(set(names)) == len(names) else list(runs)


def image_key(path: str, images: str) -> str:
    """The name ground truth knows an image by: its path under the image folder (or list's folder).

    Example:
        >>> listing = "/data/cub/list.txt"
        >>> image_key("/data/cub/001.Albatross/a.jpg", listing), image_key("/else/b.jpg", listing)
        ('001.Albatross/a.jpg', 'b.jpg')
    """
    root = Path(images) if Path(images).is_dir() else Path(images).parent
    file = Path(path)
    return file.relative_to(root).as_posix() if file.is_relative_to(root) else file.name


def shared_indices(indexes: Sequence[dict[str, dict]], datamodule: ExplanationDataModule) -> list[int]:
    """Records explained in every run, in data order; ``ValueError`` if there is none."""
    indices = [i for i, r in enumerate(datamodule.records) if all(r.name in index for index in indexes)]
    if not indices:
        raise ValueError(f"runs: no image of data.images={datamodule.images!r} is explained in every run")
    return indices


# ----------------------------------------------------------------------------- metrics
def build_metrics(names: Sequence[str], classifier: nn.Module, num_classes: int, settings: dict) -> dict[str, Metric]:
    """One fresh metric per name; ``settings`` holds the keyword arguments of each group."""
    factories = {
        "deletion": lambda: DeletionAUC(classifier, **settings["deletion"]),
        "insertion": lambda: InsertionAUC(classifier, **settings["insertion"]),
        "confidence": lambda: AverageDropIncrease(classifier),
        "pointing": lambda: PointingGame(num_classes, **settings["pointing"]),
        "energy": lambda: EnergyPointingGame(),
        "localisation": lambda: TopPercentLocalisation(**settings["localisation"]),
    }
    return {name: factories[name]() for name in names}


def table_row(metrics: dict[str, Metric], count: int) -> dict[str, float]:
    """``images`` and one column per number the metrics compute."""
    row = {"images": float(count)}
    for name, metric in metrics.items():
        value = metric.compute()
        scalars = value if isinstance(value, dict) else {COLUMNS[name]: value}
        row.update({column: float(v) for column, v in scalars.items()})
    return row


def choose_metrics(metrics: Sequence[str] | None, ground_truth: GroundTruth | None) -> list[str]:
    """The requested metrics, or all those the inputs allow; ground-truth ones need ground truth."""
    if metrics is None:
        return [m for m in METRICS if ground_truth is not None or m not in GROUND_TRUTH_METRICS]
    needing = [m for m in metrics if m in GROUND_TRUTH_METRICS]
    if needing and ground_truth is None:
        raise ValueError(f"metrics={list(metrics)} is invalid without ground_truth: {needing} need one")
    return list(dict.fromkeys(metrics))


def evaluate(
    runs: dict[str, RunFolder],
    classifier: nn.Module,
    datamodule: ExplanationDataModule,
    ground_truth: GroundTruth | None,
    metric_names: Sequence[str],
    settings: dict,
    device: torch.device,
) -> Results:
    """Scores every run on the images explained in all of them, one batch of images at a time."""
    datamodule.setup()
    indexes = {label: run.read_index() for label, run in runs.items()}
    indices = shared_indices(list(indexes.values()), datamodule)
    num_classes = 1 + max(int(row["target"]) for index in indexes.values() for row in index.values())
    scores = {
        label: {k: m.to(device) for k, m in build_metrics(metric_names, classifier, num_classes, settings).items()}
        for label in runs
    }
    for start in range(0, len(indices), datamodule.batch_size):
        batch = datamodule.batch(indices[start : start + datamodule.batch_size])
        if batch["failed"]:
            _, error = batch["failed"][0]
            raise ValueError(f"data.images: an explained image cannot be read any more: {error}")
        records = [datamodule.records[i] for i in batch["indices"]]
        frames = batch["frames"]
        inputs = {"images": batch["images"].to(device)}  # (B, C, S, S)
        if ground_truth is not None:
            keys = [image_key(r.path, datamodule.images) for r in records]
            inputs["masks"] = truth_in_frames(ground_truth, keys, frames).to(device)  # (B, S, S)
        for label, run in runs.items():
            check_pictures(label, indexes[label], records, batch["hashes"])
            inputs["maps"] = maps_in_frames([run.load_map(r.name) for r in records], frames).to(device)  # (B, S, S)
            targets = [indexes[label][r.name]["target"] for r in records]
            inputs["targets"] = torch.tensor(targets, dtype=torch.long, device=device)  # (B,)
            for name, metric in scores[label].items():
                metric.update(*(inputs[key] for key in INPUTS[name]))
    results = Results(images={datamodule.records[i].name: datamodule.records[i].path for i in indices})
    for label, metrics in scores.items():
        results.rows[label] = table_row(metrics, len(indices))
        results.curves[label] = {name: metrics[name].curve().cpu() for name in CURVES if name in metrics}
        results.per_image[label] = {COLUMNS[name]: metrics[name].per_image().cpu()
                                    for name in CURVES if name in metrics}
    return results


# ----------------------------------------------------------------------------- outputs
def write_tables(results: Results, out_dir: Path) -> list[str]:
    """``results.csv`` and ``results.md``; returns the columns."""
    columns = ["method", *next(iter(results.rows.values()))]
    lines = [dict(method=label, **row) for label, row in results.rows.items()]
    with open(out_dir / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(lines)
    cells = [[line["method"], *(f"{line[c]:.4g}" for c in columns[1:])] for line in lines]
    table = [f"| {' | '.join(columns)} |", f"|{'---|' * len(columns)}", *(f"| {' | '.join(c)} |" for c in cells)]
    lower = [c for c in columns if c in LOWER_IS_BETTER]
    note = (f"\nMeans over {len(results.images)} images. Lower is better for {', '.join(lower) or 'none'}; "
            "higher for the rest.\n")
    (out_dir / "results.md").write_text("\n".join(table) + "\n" + note)
    write_per_image(results, out_dir / "per_image.csv")
    return columns


def write_per_image(results: Results, path: Path) -> None:
    """``per_image.csv``: one row per image and method with its deletion/insertion AUC, for paired
    comparisons (a mean over a few photos can hinge on one of them)."""
    scores = {label: columns for label, columns in results.per_image.items() if columns}
    if not scores:
        return
    names = list(next(iter(scores.values())))
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "method", *names])
        for label, columns in scores.items():
            for i, image in enumerate(results.images):
                writer.writerow([image, label, *(f"{float(columns[n][i]):.6g}" for n in names)])


def plot_curves(results: Results, name: str, path: Path) -> None:
    """The mean ``name`` curve of every method against the fraction of pixels changed."""
    figure = Figure(figsize=(5, 4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, curves in results.curves.items():
        curve = curves[name]  # (n + 1,)
        auc = results.rows[label][COLUMNS[name]]
        axes.plot(torch.linspace(0, 1, len(curve)).numpy(), curve.numpy(), label=f"{label} (AUC {auc:.3f})")
    axes.set(xlabel=f"fraction of pixels {'deleted' if name == 'deletion' else 'inserted'}",
             ylabel="probability of the class", title=f"{name.capitalize()} curves", ylim=(0, 1.02))
    axes.legend()
    figure.savefig(path, dpi=100)


def plot_gallery(runs: dict[str, RunFolder], images: dict[str, str], path: Path,
                 datamodule: ExplanationDataModule) -> None:
    """A grid: one row per image (the first ``GALLERY_IMAGES``), the image then each method's map."""
    shown = list(images)[:GALLERY_IMAGES]
    index = {label: run.read_index() for label, run in runs.items()}
    figure = Figure(figsize=(2 * (1 + len(runs)), 2 * len(shown)), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.subplots(len(shown), 1 + len(runs), squeeze=False)
    for r, name in enumerate(shown):
        picture = datamodule.picture(images[name])
        grid[r, 0].imshow(picture)
        grid[r, 0].set_title(name, fontsize=8)
        for c, (label, run) in enumerate(runs.items(), start=1):
            grid[r, c].imshow(overlay(picture, run.load_map(name)))
            grid[r, c].set_title(f"{label}: {index[label][name]['class_name']}", fontsize=8)
    for axes in grid.flat:
        axes.set_axis_off()
    figure.savefig(path, dpi=100)


def log_to_wandb(results: Results, columns: list[str], out_dir: Path, project: str) -> None:
    """The table and the figures to an offline W&B run under ``out_dir``."""
    import wandb

    run = wandb.init(project=project, dir=str(out_dir), mode="offline", job_type="evaluate", reinit="finish_previous")
    data = [[label, *(row[c] for c in columns[1:])] for label, row in results.rows.items()]
    pictures = {p.stem: wandb.Image(str(p)) for p in sorted(out_dir.glob("*.png"))}
    run.log({"results": wandb.Table(columns=columns, data=data), **pictures})
    run.finish()


# --------------------------------------------------------------------------------- CLI
def build_parser() -> ArgumentParser:
    """``--runs``, ``--model.classifier``, ``--data.*``, ``--ground_truth``, metric groups, outputs."""
    parser = ArgumentParser(prog="python -m hdm_lightning.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file with any of the settings below")
    parser.add_argument("--runs", type=str, nargs="+", required=True, help="run folders, one per method")
    parser.add_argument("--model.classifier", type=nn.Module | None, default=None,
                        help="the network the maps explain; None loads the packaged EfficientNet-Lite0")
    parser.add_class_arguments(ExplanationDataModule, "data")
    parser.add_argument("--ground_truth", type=GroundTruth | None, default=None,
                        help="object masks for the pointing game and top-p % localisation")
    parser.add_argument("--metrics", type=list[MetricName] | None, default=None,
                        help="metrics to compute; None: every one the inputs allow")
    for group, metric, given in METRIC_GROUPS:
        parser.add_class_arguments(metric, group, skip=given | METRIC_RUNTIME_ARGS, instantiate=False)
    parser.add_argument("--out_dir", default="runs/eval", help="folder of the table and the figures")
    parser.add_argument("--device", default="auto", help="torch device of the classifier; auto: cuda if available")
    parser.add_argument("--wandb", type=bool, default=False, help="log the table and figures to offline W&B")
    parser.add_argument("--wandb_project", default="hdm-lightning", help="W&B project name")
    return parser


def main(args: list[str] | None = None) -> Results:
    """Parses ``args`` (None: ``sys.argv``), scores the runs, writes and returns the results."""
    parser = build_parser()
    config = parser.parse_args(args)
    init: Namespace = parser.instantiate(config)
    metric_names = choose_metrics(config.metrics, init.ground_truth)
    missing = [run for run in config.runs if not (Path(run) / "index.jsonl").is_file()]
    if missing:
        raise ValueError(f"runs: {missing} hold no index.jsonl; run train_masks.py or explain_baseline first")
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parser.save(config, str(out_dir / "config.yaml"), overwrite=True, skip_validation=True)
    device = resolve_device(config.device)
    runs = {label: RunFolder(run) for label, run in zip(method_labels(config.runs), config.runs)}
    settings = {group: config[group].as_dict() for group, _, _ in METRIC_GROUPS}
    classifier = load_classifier(init.model.classifier).to(device)
    results = evaluate(runs, classifier, init.data, init.ground_truth, metric_names, settings, device)
    columns = write_tables(results, out_dir)
    for name in CURVES:
        if name in metric_names:
            plot_curves(results, name, out_dir / f"{name}.png")
    plot_gallery(runs, results.images, out_dir / "gallery.png", init.data)
    if config.wandb:
        log_to_wandb(results, columns, out_dir, config.wandb_project)
    print((out_dir / "results.md").read_text())
    return results


if __name__ == "__main__":
    main()
