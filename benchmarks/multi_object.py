"""Multi-object benchmark on real photos: is the map right for any class of a scene?

Two 2×2 mosaics of package-shipped photos of different ImageNet classes (8 targets: every tile
is explained for the class the classifier gives it alone, whatever its rank in the mosaic;
EfficientNet-Lite0, or another variant with ``--variant``)
and one scene with two instances of one class (the cat, once mirrored). Scores, from
``benchmarks/mosaics.py``: share of the map's positive mass in the class's tile (energy grid
pointing game, Rao, Boehle and Schiele, CVPR 2022; chance 0.25), pointing (argmax in the tile)
and, for the two instances, whether both are covered.

Baselines run in this process through ``hdm_lightning.baselines``; HDM variants through the
project's command line (``train_masks.py``), one run folder per target. Every (method, target)
result is cached under ``<results>/[<variant>/]size<S>/<method>/`` (map ``.npy``, scores ``.json`` written
last), so a rerun computes only what is missing; a cached result made with other settings is an
error, not silently reused (``--redo`` recomputes). Writes ``summary.md`` and ``maps.png`` there.

Usage:
    python benchmarks/multi_object.py --size 224 --only Grad-CAM --only Grad-CAM++ --threads 1
    python benchmarks/multi_object.py                      # everything at 448 px (tiles of 224)
    python benchmarks/multi_object.py --hdm "HDM lr 0.1=--model.lr 0.1" --only "HDM lr 0.1"
    python benchmarks/multi_object.py --report-only        # tables and figure from the cache
    python benchmarks/multi_object.py --report-only --figure "HDM defaults" --figure Grad-CAM --figure_out docs/mosaics448.png
    python benchmarks/multi_object.py --variant lite2 --size 224 --only "HDM defaults" --only Grad-CAM
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mosaics import COVER_RULE, Target, build_scenes, normalise, score

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = ROOT / "benchmarks" / "results" / "multi_object"

#: configs/fast.yaml's rate and steps: the defaults' up to stop 55.
FAST = ["--model.lr", "0.05", "--schedule.min_steps", "20", "--schedule.max_steps", "40"]
#: configs/sufficient.yaml: no deletion term, the constant start (the defaults' until stop 47), as every
#: variant below was measured.
NO_DELETION = ["--model.deletion_weight", "0", "--model.start", "constant", *FAST]
#: HDM variants: name -> command-line overrides of ``train_masks.py`` (``--hdm NAME=ARGS`` adds more).
HDM_VARIANTS: dict[str, list[str]] = {
    "HDM defaults": [],
    "HDM fast": ["--config", "configs/fast.yaml"],  # the preset (the defaults to stop 55; before stop 69 this row
    # was its rate and steps on the defaults of the day, since stop 60 with the deletion gate, which the preset leaves off)
    "HDM sufficient": NO_DELETION,  # the defaults before stop 28 (configs/sufficient.yaml)
    # measured before evidence_scale "image" became the default (README "Several objects")
    "HDM log-odds": [*NO_DELETION, "--model.score", "log_odds", "--model.evidence_scale", "stage"],
    "HDM log-odds, image evidence": [*NO_DELETION, "--model.score", "log_odds", "--model.evidence_scale", "image"],
    "HDM image evidence": [*NO_DELETION, "--model.evidence_scale", "image"],
    "HDM mask scale": [*NO_DELETION, "--model.map_scale", "mask"],
    "HDM log-odds, mask scale": [*NO_DELETION, "--model.score", "log_odds", "--model.map_scale", "mask"],
    "HDM paper-loss, 1 stage": [*NO_DELETION, "--schedule.stages", "1"],
}
#: Arguments of every HDM run; the size, input and run folder are added per target.
HDM_COMMON = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--data.batch_size", "1"]


#: Baselines whose attribution is signed: scored on its positive part (``positive_part``), the
#: others on ``Baseline.explain``'s min-max normalised map.
SIGNED = {"Occlusion", "IntegratedGradients"}


def baselines(size: int) -> dict[str, object]:
    """Baselines at their published settings, set explicitly; pixel sizes scale with ``size / 224``."""
    from hdm_lightning.baselines import RISE, ExtremalPerturbation, GradCAM, GradCAMPlusPlus, Occlusion

    k = size / 224
    return {
        "Grad-CAM": GradCAM(),
        "Grad-CAM++": GradCAMPlusPlus(),
        # Zeiler and Fergus style sliding window; 16/8 px at 224 (the class's defaults).
        "Occlusion": Occlusion(window=round(16 * k), stride=round(8 * k), batch_size=32),
        # Petsiuk et al.: N = 4000 masks of a 7×7 grid, p1 = 0.5.
        "RISE": RISE(n_masks=4000, grid_size=7, p1=0.5, batch_size=50, seed=0),
        # Fong et al.: 800 iterations, areas 0.05-0.2 summed, mask step 7 and sigma 21 at 224 px.
        "Extremal perturbation": ExtremalPerturbation(
            areas=(0.05, 0.1, 0.2), steps=800, lr=0.05, reg_weight=300.0, reg_growth=100.0,
            mask_stride=round(7 * k), mask_sigma=21.0 * k, smoothness=0.0, blur_sigma=20.0 * k),
    }


def slug(name: str) -> str:
    """Folder name of a method: ``Grad-CAM++`` -> ``Grad_CAMpp``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name.replace("+", "p")).strip("_")


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ------------------------------------------------------------------------------------ the engine
def engine_files() -> list[Path]:
    """The code and presets an HDM run depends on, relative to the repository root."""
    files = [*ROOT.glob("hdm_lightning/**/*.py"), ROOT / "train_masks.py", *ROOT.glob("configs/*.yaml")]
    return sorted(p.relative_to(ROOT) for p in files if "__pycache__" not in p.parts)


def meaning(path: Path) -> str:
    """What of a file can change a run: a config's parsed values, a module's syntax tree without its
    docstrings; comments and wording are left out, so editing them keeps the cached results."""
    import ast

    import yaml

    if path.suffix == ".yaml":
        return json.dumps(yaml.safe_load(path.read_text()), sort_keys=True)
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def engine_snapshot(base: Path) -> tuple[str, Path]:
    """Hash of the HDM engine's files and a frozen copy of them under ``<base>/engines/<hash>``.

    HDM runs start ``train_masks.py`` from the copy (its folder comes first on ``sys.path``,
    before the editable install), so a run is not changed by edits to the tree while it lasts,
    and results are cached per engine hash (of each file's :func:`meaning`): after an edit that can
    change a run, HDM variants are computed afresh and the earlier results stay where they are.
    """
    import hashlib
    import shutil

    files = engine_files()
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path).encode() + b"\0" + meaning(ROOT / path).encode() + b"\0")
    name = digest.hexdigest()[:12]
    target = base / "engines" / name
    if not target.is_dir():
        staging = base / "engines" / f".{name}.tmp{os.getpid()}"
        for path in files:
            (staging / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / path, staging / path)
        os.replace(staging, target)
    return name, target


# ------------------------------------------------------------------------------------- the cache
def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def cached(folder: Path, target: Target, config: dict) -> dict | None:
    """The cached result of ``target`` in ``folder``, or None; an error if made with another config."""
    path = folder / f"{target.id}.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    if result["target"]["target"] != target.target:
        raise ValueError(f"{path} explains class {result['target']['target']}, this scene's target is class "
                         f"{target.target}: another classifier's results? (--variant keeps them apart)")
    if result["config"] != config:
        raise ValueError(f"{path} was computed with config {result['config']}, now {config}: "
                         "rerun with --redo for this method, or give the new settings another name")
    return result


def save(folder: Path, target: Target, saliency: np.ndarray, result: dict) -> dict:
    """Map first, scores last: a result exists exactly when its ``.json`` does."""
    buffer = io.BytesIO()
    np.save(buffer, saliency.astype(np.float32))
    write_atomic(folder / f"{target.id}.npy", buffer.getvalue())
    write_atomic(folder / f"{target.id}.json", (json.dumps(result, indent=1) + "\n").encode())
    return result


# ------------------------------------------------------------------------------------ the methods
def run_baselines(method, classifier, image: torch.Tensor, targets: list[Target]):
    """``(map, seconds, extra)`` of each target of one scene: RISE in one shared pass, others one by one."""
    from hdm_lightning.baselines import RISE

    if isinstance(method, RISE) and len(targets) > 1:
        start = time.perf_counter()
        maps = rise_shared(method, classifier, image, [t.target for t in targets])
        seconds = (time.perf_counter() - start) / len(targets)
        yield from ((m.numpy(), seconds, {"shared_pass_targets": len(targets)}) for m in maps)
        return
    for t in targets:
        start = time.perf_counter()
        if type(method).__name__ in SIGNED:
            saliency = positive_part(method, classifier, image, t.target)
        else:
            saliency = method.explain(classifier, image[None], torch.tensor([t.target]))[0]
        yield saliency.numpy(), time.perf_counter() - start, {}


def positive_part(method, classifier, image: torch.Tensor, target: int) -> torch.Tensor:
    """``max(a, 0) / max(a)`` of a signed attribution ``a``: zero stays "no effect".

    ``Baseline.explain`` min-max normalises, which lifts the pixels without effect to a
    positive level and so fills every tile with mass; the energy share needs the positive
    evidence only (Rao, Boehle and Schiele score positive attributions). Same guards as ``explain``.
    """
    from hdm_lightning.baselines.base import untouched

    with untouched(classifier), torch.inference_mode(False), torch.enable_grad():
        raw = method.attribute(classifier, image[None].clone(), torch.tensor([target]))[0].detach().float()
    positive = raw.clamp_min(0)
    return positive / positive.max().clamp_min(torch.finfo(positive.dtype).tiny)


@torch.no_grad()
def rise_shared(rise, classifier, image: torch.Tensor, targets: list[int]) -> torch.Tensor:
    """``RISE.explain`` of one ``(C, H, W)`` image for several classes with one pass over the masks.

    The same masks (same seed and order) and the same sum ``Σ_i f_c(I ⊙ M_i) M_i / (N p1)`` as
    :class:`hdm_lightning.baselines.RISE`, for all classes at once: every masked image is scored
    once instead of once per class. Returns ``(T, H, W)`` maps, min-max normalised like ``explain``.
    """
    from hdm_lightning.baselines.rise import render_masks, rise_grids
    from hdm_lightning.masks import minmax

    grids, offsets = rise_grids(rise.n_masks, rise.grid_size, rise.p1, torch.Generator().manual_seed(rise.seed))
    saliency = image.new_zeros(len(targets), *image.shape[-2:])  # (T, H, W)
    for chunk in zip(grids.split(rise.batch_size), offsets.split(rise.batch_size)):
        masks = render_masks(*chunk, image.shape[-2:])  # (B, H, W)
        probs = classifier(image[None] * masks[:, None]).softmax(dim=1)[:, targets]  # (B, T)
        saliency += torch.einsum("bt,bhw->thw", probs, masks)
    return minmax(saliency / (rise.n_masks * rise.p1))


def run_hdm(engine: Path, overrides: list[str], work: Path, scene_png: Path, target: Target, size: int,
            threads: int, variant: str = "lite0") -> tuple[np.ndarray, float, dict]:
    """One ``train_masks.py`` run for one target in its own folder (a killed run resumes there)."""
    from hdm_lightning.models import EfficientNetLite

    work.mkdir(parents=True, exist_ok=True)
    image = work / f"{target.id}.png"
    image.write_bytes(scene_png.read_bytes())
    manifest = work / "manifest.csv"
    manifest.write_text(f"image,target\n{image.name},{target.target}\n")
    out_dir = work / "run"
    # the scene's image, folder and size last: a ``--config`` among the overrides must not replace them
    command = [sys.executable, str(engine / "train_masks.py"), *HDM_COMMON, *EfficientNetLite.options(variant),
               *overrides, "--data.images", str(manifest), "--out_dir", str(out_dir), "--data.image_size", str(size)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    with open(work / "log.txt", "a") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        done = subprocess.run(command, cwd=engine, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        tail = "\n".join((work / "log.txt").read_text().splitlines()[-15:])
        raise RuntimeError(f"train_masks.py failed for {target.id} (log: {work / 'log.txt'}):\n{tail}")
    saliency = np.load(out_dir / "maps" / f"{target.id}.npy")
    rows = [json.loads(line) for line in (out_dir / "index.jsonl").read_text().splitlines() if line.strip()]
    row = next((r for r in rows if r.get("name") == target.id), {})
    if row.get("target", target.target) != target.target:
        raise RuntimeError(f"{out_dir}: explained class {row['target']}, expected {target.target}")
    stages = sorted((out_dir / "stages").glob(f"{target.id}_stage*.npy"))
    extra = {"wall_seconds": round(wall, 2), "index_row": row,
             "stage_shares": [round(score(torch.from_numpy(np.load(p)), target.tiles)["share"], 4) for p in stages]}
    return saliency, float(row.get("seconds", wall)), extra


# ------------------------------------------------------------------------------------ the report
def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(map(str, r)) + " |" for r in rows)])


def summary(results: dict, targets: list[Target], methods: list[str], size: int, engine: str,
            variant: str = "lite0") -> str:
    singles = [t for t in targets if t.kind == "mosaic"]
    pairs = [t for t in targets if t.kind == "two_instances"]
    main, per_target = [], []
    for m in methods:
        got = results.get(m, {})
        share = [got[t.id]["scores"]["share"] for t in singles if t.id in got]
        point = [got[t.id]["scores"]["pointing"] for t in singles if t.id in got]
        both = [got[t.id]["scores"]["both_covered"] for t in pairs if t.id in got]
        secs = [r["seconds"] for r in got.values()]
        if not got:
            main.append([m, "-", "-", "-", "-", "0"])
            continue
        main.append([m, f"{np.mean(share):.3f}" if share else "-", f"{np.mean(point):.2f}" if point else "-",
                     f"{sum(both)}/{len(both)}" if both else "-", f"{np.mean(secs):.1f}",
                     f"{len(got)}/{len(targets)}"])
    for t in targets:
        row = [t.scene, "+".join(map(str, t.tiles)), "+".join(t.photos), f"{t.class_name} ({t.target})",
               f"{t.prob_alone:.2f}", t.rank_in_scene]
        for m in methods:
            r = results.get(m, {}).get(t.id)
            if r is None:
                row.append("-")
                continue
            s = r["scores"]
            cell = f"{s['share']:.2f} {'✓' if s['pointing'] else '✗'}"
            if "both_covered" in s:
                cell += " (" + "/".join(f"{x:.2f}" for x in s["instance_shares"]) + \
                        (", both" if s["both_covered"] else ", not both") + ")"
            row.append(cell)
        per_target.append(row)
    stage_rows = [[m, t.id, " / ".join(f"{x:.2f}" for x in r["stage_shares"]), f"{r['scores']['share']:.2f}"]
                  for m in methods for t in targets
                  if (r := results.get(m, {}).get(t.id)) is not None and r.get("stage_shares")]
    side = size // 2
    return "\n\n".join([
        f"# Multi-object benchmark, {size} px input (tiles of {side} px), EfficientNet-{variant.capitalize()}",
        f"Command: `python benchmarks/multi_object.py --size {size}"
        f"{'' if variant == 'lite0' else ' --variant ' + variant}` (commit {git_commit()}). "
        f"Share: positive mass of the map in the class's tile (chance 0.25), mean over the "
        f"{len(singles)} mosaic targets; pointing: the map's maximum in that tile; {COVER_RULE}. "
        f"HDM: engine {engine} (hash of hdm_lightning, train_masks.py and configs, comments and docstrings aside; "
        "results of other engines are "
        "kept in their own folders and not shown). Seconds per target: this machine, threads as run (HDM: "
        "the run's optimisation time, `seconds` of its index row, without process start-up; RISE: one pass "
        "over its masks serves every "
        "target of a scene, with the same maps as one call per target, and the pass's time is divided among them). "
        "Maps as `Baseline.explain` returns them (min-max), except signed attributions (Occlusion), scored on "
        "their positive part: min-max would lift every pixel without effect to a positive level. Pixel sizes of "
        "Occlusion and extremal perturbation scale with the input side (16/8 px window/stride, mask step 7 and "
        "sigma 21, blur 20 at 224 px).",
        table(["method", "share in the class's tile", "pointing", "both instances covered", "seconds per target",
               "targets done"], main),
        "Per target: share, pointing (✓/✗) and, for two instances, each instance's share. Tiles in raster "
        "order (0 top-left, 3 bottom-right); p alone: probability of the class on its tile alone; rank: of the "
        "class in the scene's logits.",
        table(["scene", "tile", "photo", "class", "p alone", "rank in scene", *methods], per_target),
        *(["HDM stage maps: share in the class's tile(s) of each stage map, and of the fused map.",
           table(["method", "target", "stage shares", "fused"], stage_rows)] if stage_rows else []),
    ]) + "\n"


def figure(path: Path, scenes: dict, targets: list[Target], folders: dict[str, Path]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    methods = list(folders)
    fig, axes = plt.subplots(len(targets), len(methods) + 1, figsize=(1.6 * (len(methods) + 1), 1.6 * len(targets)),
                             squeeze=False)
    for i, t in enumerate(targets):
        image = np.asarray(scenes[t.scene])
        half = image.shape[0] // 2
        for j, m in enumerate([None, *methods]):
            ax = axes[i, j]
            ax.set_xticks([]), ax.set_yticks([])
            if m is None:
                ax.imshow(image)
                ax.set_ylabel(f"{t.class_name[:16]}\nrank {t.rank_in_scene}", fontsize=6)
            elif (folders[m] / f"{t.id}.npy").is_file():
                ax.imshow(image, alpha=0.35)
                ax.imshow(np.load(folders[m] / f"{t.id}.npy"), cmap="jet", alpha=0.65, vmin=0, vmax=1)
            for tile in t.tiles:
                row, col = divmod(tile, 2)
                ax.add_patch(Rectangle((col * half, row * half), half - 1, half - 1, fill=False, ec="white", lw=1.2))
            if i == 0:
                ax.set_title("scene" if m is None else m, fontsize=6)
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------- the main
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=448, help="input side in pixels (tiles of size/2); default 448")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="cache and report folder")
    parser.add_argument("--only", action="append", default=[], metavar="METHOD",
                        help="compute only this method (repeatable); the report still lists every cached one")
    parser.add_argument("--target", action="append", default=[], metavar="ID",
                        help="compute (and draw) only this target (repeatable), e.g. mosaic_a_285 (ids are printed first)")
    parser.add_argument("--hdm", action="append", default=[], metavar="NAME=ARGS",
                        help="add an HDM variant: a name and train_masks.py overrides, e.g. 'lr 0.1=--model.lr 0.1'")
    parser.add_argument("--redo", action="store_true", help="recompute the selected methods' cached results")
    parser.add_argument("--report-only", action="store_true", help="compute nothing; tables and figure from the cache")
    parser.add_argument("--threads", type=int, default=1, help="torch threads here and in each HDM run")
    parser.add_argument("--figure", action="append", default=[], metavar="METHOD",
                        help="a column of the figure (repeatable, in this order); default every method with results")
    parser.add_argument("--figure_out", type=Path, default=None,
                        help="where the figure goes; default <results>/[<variant>/]size<S>/maps.png")
    parser.add_argument("--variant", default="lite0",
                        help="EfficientNet-Lite variant explained (lite0 … lite4; all but lite0 need the `lite` "
                             "extra); results of a variant other than lite0 go to <results>/<variant>/")
    return parser.parse_args()


def hdm_variants(extra: list[str]) -> dict[str, list[str]]:
    variants = dict(HDM_VARIANTS)
    for item in extra:
        name, sep, args = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--hdm {item!r} is invalid: expected NAME=ARGS, e.g. 'lr 0.1=--model.lr 0.1'")
        variants[name.strip()] = shlex.split(args)
    return variants


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from hdm_lightning.models import EfficientNetLite, freeze

    classifier = freeze(EfficientNetLite(args.variant))
    scenes, targets = build_scenes(classifier, classifier.class_names(), args.size)
    # absolute: each HDM run starts in its engine's folder, where a relative path would name another place
    base = args.results.resolve() / ("" if args.variant == "lite0" else args.variant) / f"size{args.size}"
    for name, image in scenes.items():
        (base / "scenes").mkdir(parents=True, exist_ok=True)
        image.save(base / "scenes" / f"{name}.png")
    write_atomic(base / "targets.json", (json.dumps([t.as_dict() for t in targets], indent=1) + "\n").encode())
    for t in targets:
        print(f"{t.id}: {'+'.join(t.photos)} -> {t.class_name} (p alone {t.prob_alone:.2f}, rank in scene "
              f"{t.rank_in_scene})", flush=True)

    methods = {**baselines(args.size), **hdm_variants(args.hdm)}
    if unknown := sorted(set(args.target) - {t.id for t in targets}):
        raise ValueError(f"--target {unknown}: unknown target; known: {[t.id for t in targets]}")
    for option, names in (("--only", args.only), ("--figure", args.figure)):
        if unknown := [m for m in names if m not in methods]:
            raise ValueError(f"{option} {unknown}: unknown method; known: {list(methods)}")
    engine, engine_dir = engine_snapshot(base)
    folders = {m: base / slug(m) / (f"engine-{engine}" if isinstance(methods[m], list) else "") for m in methods}
    if len(set(folders.values())) != len(folders):
        raise ValueError(f"methods {list(methods)}: two names give the same folder; rename one")
    results: dict[str, dict] = {}
    for name, method in methods.items():
        is_hdm = isinstance(method, list)
        config = ({"cli_overrides": method, "common": HDM_COMMON, "engine": engine} if is_hdm
                  else {"class": type(method).__name__, **vars(method),
                        "map": "positive part / max" if type(method).__name__ in SIGNED else "min-max"})
        config = json.loads(json.dumps(config))  # tuples -> lists, as read back
        selected = not args.report_only and (not args.only or name in args.only)
        results[name] = {}
        missing = []
        for t in targets:
            wanted = selected and (not args.target or t.id in args.target)
            found = None if (wanted and args.redo) else cached(folders[name], t, config)
            if found is not None:
                results[name][t.id] = found
            elif wanted:
                missing.append(t)
        for scene in dict.fromkeys(t.scene for t in missing):
            todo = [t for t in missing if t.scene == scene]
            print(f"{name} / {', '.join(t.id for t in todo)} ...", flush=True)
            png = base / "scenes" / f"{scene}.png"
            if is_hdm:
                outputs = (run_hdm(engine_dir, method, folders[name] / "work" / t.id, png, t, args.size, args.threads,
                                   args.variant) for t in todo)
            else:
                from PIL import Image

                outputs = run_baselines(method, classifier, normalise(Image.open(png).convert("RGB"), args.size), todo)
            for t, (saliency, seconds, extra) in zip(todo, outputs):
                results[name][t.id] = save(folders[name], t, saliency, {
                    "method": name, "config": config, "target": t.as_dict(), "seconds": round(seconds, 3),
                    "threads": args.threads, "commit": git_commit(),
                    "scores": score(torch.from_numpy(saliency), t.tiles), **extra})
                print(f"  {t.id}: {results[name][t.id]['scores']} in {seconds:.1f} s", flush=True)
    shown = [m for m in methods if results[m]]
    text = summary(results, targets, shown, args.size, engine, args.variant)
    write_atomic(base / "summary.md", text.encode())
    if missing := [m for m in args.figure if m not in shown]:
        raise ValueError(f"--figure {missing}: no results of this engine at {args.size} px; compute them first")
    picture = args.figure_out or base / "maps.png"
    rows = [t for t in targets if not args.target or t.id in args.target]
    figure(picture, scenes, rows, {m: folders[m] for m in args.figure or shown})
    print(text)
    print(f"written: {base / 'summary.md'}, {picture}")


if __name__ == "__main__":
    main()
