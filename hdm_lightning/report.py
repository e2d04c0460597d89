"""What users see after a run: a figure per image, one self-contained HTML page, a W&B table.

``python -m hdm_lightning.report --run runs/hdm`` reads a finished (or interrupted) run folder
(:mod:`hdm_lightning.outputs` layout) and writes:

- ``figures/<name>.png``: the picture, every stage's map and the fused map over it, titled with
  the class and the logits (on the picture, and kept by the map);
- ``report.html``: every image with its figure, class, logits, steps and seconds, and every
  failure with its reason; the figures are embedded (base64), so the page is one file to share;
- with ``--wandb true``, the same rows as a W&B table in an offline run under the run folder.

Pictures are decoded with the run's own ``data`` settings (from its ``config.yaml``), so windowed
DICOM or 16-bit pictures look as they did to the classifier.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from jsonargparse import ArgumentParser
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from hdm_lightning.data import load_image
from hdm_lightning.images import Decoding
from hdm_lightning.outputs import RunFolder, atomic_write_bytes

FIGURE_MAX_SIDE = 384  # pixels of the picture in a figure: maps are resized to it for display
PANEL_INCHES = 2.6
COLOUR_MAP = "jet"
ALPHA = 0.5


@dataclass
class Entry:
    """One explained image: its index row, figure file and why its picture could not be shown."""

    row: dict
    figure: Path
    problem: str | None = None


# ------------------------------------------------------------------------------- inputs
def run_decoding(root: Path) -> Decoding:
    """The decoding settings the run used (``config.yaml``'s ``data``), else the defaults."""
    config = root / "config.yaml"
    data = (yaml.safe_load(config.read_text()) or {}).get("data", {}) if config.is_file() else {}
    window, background = data.get("window"), data.get("background")
    return Decoding(
        window=tuple(window) if window else None,
        background=tuple(background) if background else Decoding.background,
        allow_large_images=bool(data.get("allow_large_images", False)),
    )


def read_failures(root: Path) -> list[dict]:
    """``failed.jsonl`` rows, once each (a rerun that records the same failure again adds nothing)."""
    path = root / "failed.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return list({(row["image"], row["error"]): row for row in rows}.values())


def stage_maps(run: RunFolder, name: str) -> list[np.ndarray]:
    """The stage maps ``stages/<name>_stage<t>.npy``, in stage order."""
    files = sorted(run.root.glob(f"stages/{name}_stage*.npy"), key=lambda p: int(p.stem.rsplit("_stage", 1)[1]))
    return [np.load(f) for f in files if f.stem.rsplit("_stage", 1)[0] == name]


def kept_ratio(row: dict) -> float | None:
    """The share of the logit the map keeps (masked logit / logit), when the logit is positive.

    Example:
        >>> kept_ratio({"logit": 4.0, "masked_logit": 3.0}), kept_ratio({"logit": -1.0, "masked_logit": 0.5})
        (0.75, None)
    """
    return row["masked_logit"] / row["logit"] if row.get("logit", 0) > 0 else None


def title(row: dict) -> str:
    """``name: class (target) · logit 4.21 · kept by the map 3.90 (93 %)``."""
    ratio = kept_ratio(row)
    kept = f"kept by the map {row['masked_logit']:.2f}" + (f" ({100 * ratio:.0f} %)" if ratio is not None else "")
    return f"{row['name']}: {row['class_name']} (class {row['target']}) · logit {row['logit']:.2f} · {kept}"


# ------------------------------------------------------------------------------ figures
def shrink(picture: Image.Image) -> Image.Image:
    scale = min(1.0, FIGURE_MAX_SIDE / max(picture.size))
    return picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))))


def figure_png(picture: Image.Image | None, maps: list[np.ndarray], fused: np.ndarray, heading: str) -> bytes:
    """PNG bytes: the picture, then each stage map and the fused map over it (``[0, 1]`` in jet)."""
    panels = [("picture", None), *((f"stage {t}", m) for t, m in enumerate(maps, start=1)), ("fused", fused)]
    figure = Figure(figsize=(PANEL_INCHES * len(panels), PANEL_INCHES + 0.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    base = shrink(picture) if picture is not None else None
    for ax, (label, saliency) in zip(axes, panels):
        if base is not None:
            ax.imshow(base)
        if saliency is not None:
            shown = np.asarray(Image.fromarray(saliency.astype(np.float32)).resize(base.size if base else saliency.shape[::-1]))
            ax.imshow(shown, cmap=COLOUR_MAP, vmin=0, vmax=1, alpha=ALPHA if base is not None else 1.0)
        ax.set_title(label, fontsize=9)
        ax.set_axis_off()
    figure.suptitle(heading, fontsize=9)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    return buffer.getvalue()


def write_figure(run: RunFolder, row: dict, decoding: Decoding = Decoding()) -> Entry:
    """``figures/<name>.png`` of one finished image (the engine may call it as images finish and
    log the file); a picture that cannot be read any more leaves the maps alone on the figure."""
    problem, picture = None, None
    try:
        picture = load_image(row["image"], decoding)
    except ValueError as error:
        problem = str(error)
    name = row["name"]
    path = run.root / "figures" / f"{name}.png"
    atomic_write_bytes(path, figure_png(picture, stage_maps(run, name), run.load_map(name), title(row)))
    return Entry(row, path, problem)


def write_figures(run: RunFolder, decoding: Decoding, redraw: bool = True) -> list[Entry]:
    """``figures/<name>.png`` for every finished image of the run; with ``redraw`` false, only
    those that have none yet (a finished image's maps never change, so neither does its figure)."""
    entries = []
    for name, row in run.read_index().items():
        figure = run.root / "figures" / f"{name}.png"
        entries.append(Entry(row, figure) if figure.is_file() and not redraw else write_figure(run, row, decoding))
    return entries


# --------------------------------------------------------------------------------- HTML
STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}img{max-width:100%;display:block}
section{margin:1.5em 0;padding-bottom:1em;border-bottom:1px solid #ddd}.problem{color:#a00}"""


def cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def image_section(entry: Entry) -> str:
    row = entry.row
    data = base64.b64encode(entry.figure.read_bytes()).decode()
    ratio = kept_ratio(row)
    fields = [("class", f"{row['class_name']} ({row['target']})"), ("logit", row["logit"]),
              ("kept by the map", row["masked_logit"]), ("kept share", "–" if ratio is None else f"{100 * ratio:.0f} %"),
              ("map floor", row.get("floor", "–")),  # values up to it scaled by 1e-3 (model.map_floor)
              ("stages", row.get("stages", "–")), ("steps", row["steps"]), ("seconds", row["seconds"]),
              ("image", row["image"])]
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{cell(v)}</td></tr>" for k, v in fields)
    note = f'<p class="problem">{html.escape(entry.problem)}</p>' if entry.problem else ""
    return (f'<section id="{html.escape(row["name"])}"><h2>{html.escape(row["name"])}</h2>'
            f'<img alt="{html.escape(row["name"])}" src="data:image/png;base64,{data}">'
            f"<table>{table}</table>{note}</section>")


def failures_section(failures: list[dict]) -> str:
    if not failures:
        return "<h2>Failures</h2><p>None.</p>"
    rows = "".join(f"<tr><td>{cell(f['image'])}</td><td>{cell(f['error'])}</td></tr>" for f in failures)
    return f'<h2 id="failures">Failures</h2><table><tr><th>image</th><th>reason</th></tr>{rows}</table>'


def report_html(root: Path, entries: list[Entry], failures: list[dict]) -> str:
    summary = (f"{len(entries)} images explained, {len(failures)} failed"
               + (' (<a href="#failures">reasons</a>)' if failures else ""))
    body = "".join(image_section(e) for e in entries)
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>HDM run {html.escape(root.name)}</title>"
            f"<style>{STYLE}</style></head><body><h1>HDM run {html.escape(str(root))}</h1><p>{summary}</p>"
            f"{body}{failures_section(failures)}</body></html>")


# -------------------------------------------------------------------------------- W&B
TABLE_COLUMNS = ["name", "figure", "class_name", "target", "logit", "masked_logit", "kept_share", "stages", "steps",
                 "seconds", "image", "error"]


def wandb_table(run_dir: str | Path):
    """A ``wandb.Table`` with the report's rows: one per explained image (with its figure, written
    by :func:`write_report` first) and one per failure (with its reason)."""
    import wandb

    run = RunFolder(run_dir)
    table = wandb.Table(columns=TABLE_COLUMNS)
    for name, row in run.read_index().items():
        figure = run.root / "figures" / f"{name}.png"
        table.add_data(name, wandb.Image(str(figure)) if figure.is_file() else None, row["class_name"], row["target"],
                       row["logit"], row["masked_logit"], kept_ratio(row), row.get("stages"), row["steps"],
                       row["seconds"], row["image"], None)
    for failure in read_failures(run.root):
        table.add_data(Path(failure["image"]).stem, None, None, None, None, None, None, None, None, None,
                       failure["image"], failure["error"])
    return table


def log_wandb(run_dir: Path, project: str) -> None:
    """The table to an offline W&B run under the run folder."""
    import wandb

    run = wandb.init(project=project, dir=str(run_dir), mode="offline", job_type="report", reinit="finish_previous")
    run.log({"report": wandb_table(run_dir)})
    run.finish()


# ------------------------------------------------------------------------------ command
def failure_summary(run_dir: str | Path, total: int) -> str:
    """The end-of-run line: images explained of ``total``, how many failed and where to read why."""
    run = RunFolder(run_dir)
    index = run.read_index()
    explained = {row["image"] for row in index.values()}
    failed = [f for f in read_failures(run.root) if f["image"] not in explained]
    line = f"Explained {len(index)} of {total} images"
    if failed:
        line += f"; {len(failed)} failed, reasons in {run.root.resolve() / 'failed.jsonl'}"
    return line + f". Report: python -m hdm_lightning.report --run {run.root}"


def write_report(run_dir: str | Path, redraw: bool = True) -> Path:
    """Figures and ``report.html`` of a run folder; returns the page's path. With ``redraw``
    false, existing figures are kept (what the training command does at the end of each run)."""
    run = RunFolder(run_dir)
    if not (run.root / "index.jsonl").is_file() and not (run.root / "failed.jsonl").is_file():
        raise ValueError(f"--run {run.root}: no index.jsonl or failed.jsonl; is it a run folder of train_masks.py?")
    entries = write_figures(run, run_decoding(run.root), redraw)
    page = run.root / "report.html"
    atomic_write_bytes(page, report_html(run.root, entries, read_failures(run.root)).encode())
    return page


def main(args: list[str] | None = None) -> Path:
    parser = ArgumentParser(prog="python -m hdm_lightning.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="the run folder (--out_dir of train_masks.py)")
    parser.add_argument("--wandb", type=bool, default=False, help="also log the rows as a table to offline W&B")
    parser.add_argument("--wandb_project", default="hdm-lightning", help="W&B project name")
    config = parser.parse_args(args)
    page = write_report(config.run)
    if config.wandb:
        log_wandb(Path(config.run), config.wandb_project)
    print(f"Report: {page.resolve()}")
    return page


if __name__ == "__main__":
    main()
