"""Command line: ``python train_masks.py --config FILE`` with dotted overrides for every setting.

The LightningCLI parses the module (``--model.*``), the data (``--data.*``), the Trainer
(``--trainer.*``), the schedule (``--schedule.*``), the checkpoints (``--checkpoint.*``) and the
run folder (``--out_dir``). With no argument at all it runs the demo preset. Several processes
(``--trainer.devices N --trainer.num_nodes M``) need ``--trainer.strategy ddp_independent``; a plain
``ddp`` is replaced by it, with a note (:mod:`hdm_lightning.strategy` says why).
"""

from __future__ import annotations

import re
import sys
import uuid
import warnings
from pathlib import Path

import torch
import yaml

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from hdm_lightning.callbacks import HDMSchedule, MapWriter
from hdm_lightning.dashboard import RunMetrics
from hdm_lightning.data import ExplanationDataModule
from hdm_lightning.models import output_classes
from hdm_lightning.module import MaskExplainer
from hdm_lightning.outputs import RunFolder
from hdm_lightning.pointwise import strict_mkl
from hdm_lightning.progress import ImageProgressBar
from hdm_lightning.report import failure_summary, write_report
from hdm_lightning.strategy import STRATEGY_NAME, IndependentRanksStrategy, rank_path

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
#: The class path of our strategy, which users may also give as a plain ``--trainer.strategy`` string.
OURS = f"{IndependentRanksStrategy.__module__}.{IndependentRanksStrategy.__name__}"
#: Spellings of plain DDP that the CLI replaces by :class:`IndependentRanksStrategy`.
PLAIN_DDP = ("ddp", "lightning.pytorch.strategies.DDPStrategy", "lightning.pytorch.strategies.ddp.DDPStrategy")
DEMO_ARGS = ["--config", str(CONFIGS / "demo.yaml")]


def checkpoint_dir(out_dir: str) -> str:
    return str(Path(out_dir) / "checkpoints")


class HDMCLI(LightningCLI):
    """LightningCLI with the HDM callbacks, the run folder and offline W&B logging."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--out_dir", default="runs/hdm", help="run folder: maps, overlays, index, checkpoints")
        parser.add_argument("--resume", type=bool, default=True,
                            help="continue the images in flight from the newest checkpoint (false: start them over)")
        parser.add_argument("--engine.max_items", type=int, default=16,
                            help="most items (one level of one chain of one image) optimised at once")
        parser.add_lightning_class_args(HDMSchedule, "schedule")
        parser.add_lightning_class_args(MapWriter, "writer")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.link_arguments("out_dir", "schedule.out_dir")
        parser.link_arguments("out_dir", "writer.out_dir")
        parser.link_arguments("out_dir", "checkpoint.dirpath", compute_fn=checkpoint_dir)
        parser.link_arguments("out_dir", "trainer.default_root_dir")
        parser.link_arguments("data.mean", "model.mean")
        parser.link_arguments("data.std", "model.std")
        parser.link_arguments("engine.max_items", "model.max_items")
        parser.link_arguments("schedule.max_steps", "model.lr_horizon")
        parser.set_defaults(
            {
                "checkpoint.every_n_train_steps": 100,
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 0,
                "checkpoint.enable_version_counter": False,  # always last.ckpt, which a resume reads
                "trainer.max_epochs": -1,  # the schedule stops the run; a finished run's checkpoint must not end a rerun
                "trainer.log_every_n_steps": 10,
                # spelled out, so that a run folder's config.yaml says which fusion made its maps
                "model.fusion": {"class_path": "hdm_lightning.fusion.EvidenceFusion", "init_args": {"anchored": True}},
                "trainer.enable_model_summary": False,
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.WandbLogger",
                    "init_args": {"offline": True, "project": "hdm-lightning"},
                },
            }
        )

    def _instantiate_trainer(self, config: dict, callbacks: list) -> pl.Trainer:
        """Adds the image progress bar (unless ``--trainer.enable_progress_bar false`` or another
        progress bar is given) and the run-level dashboard metrics to the Trainer's callbacks."""
        extra = [RunMetrics()]
        given = [*(config.get("callbacks") or []), *callbacks]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
            extra.append(ImageProgressBar())
        return super()._instantiate_trainer(config, [*callbacks, *extra])

    def before_instantiate_classes(self) -> None:
        self.replace_plain_ddp()
        self.place_wandb()

    def replace_plain_ddp(self) -> None:
        """``ddp`` (or ``auto`` over several devices) would average gradients across ranks and mix
        images' masks: run ours instead. Other parallel strategies fail in ``MaskExplainer.setup``."""
        strategy = self.config.get("trainer.strategy")
        if strategy == OURS:  # a class path given as a plain string: Lightning takes strings for names
            self.config["trainer.strategy"] = STRATEGY_NAME
            return
        several = several_processes(self.config.get("trainer.devices"), self.config.get("trainer.num_nodes"))
        if strategy in PLAIN_DDP or (strategy == "auto" and several):
            self.config["trainer.strategy"] = STRATEGY_NAME
        elif hasattr(strategy, "class_path") and strategy.class_path in PLAIN_DDP:
            strategy.class_path = OURS
        else:
            return
        rank_zero_info(f"trainer.strategy: plain DDP would mix different images' masks; using {STRATEGY_NAME!r}")

    def place_wandb(self) -> None:
        """W&B files go to the run folder, and a resumed run continues the same W&B run."""
        logger = self.config.get("trainer.logger")
        if hasattr(logger, "class_path") and logger.class_path.endswith("WandbLogger"):
            run_dir = Path(self.config.out_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            if logger.init_args.get("save_dir") in (None, "."):  # "." is WandbLogger's default
                logger.init_args.save_dir = str(run_dir)
            id_file = run_dir / "wandb_id.txt"
            if not id_file.is_file():
                id_file.write_text(uuid.uuid4().hex[:8])
            logger.init_args.id = logger.init_args.get("id") or id_file.read_text().strip()
            logger.init_args.resume = "allow"


def several_processes(devices: int | str | list[int] | None, num_nodes: int | None) -> bool:
    """Whether ``--trainer.devices`` and ``--trainer.num_nodes`` surely ask for more than one process.

    Example:
        >>> several_processes(2, 1), several_processes("0,1", 1), several_processes("auto", 1)
        (True, True, False)
    """
    if num_nodes is not None and num_nodes > 1:
        return True
    if isinstance(devices, str):
        devices = int(devices) if devices.isdigit() else [d for d in devices.split(",") if d.strip()]
    if isinstance(devices, int):
        return devices > 1
    return isinstance(devices, list) and len(devices) > 1


def resume_path(out_dir: str, resume: bool, world_size: int = 1) -> str | None:
    """The newest complete checkpoint of the run, or None.

    Candidates are ``<out_dir>/checkpoints/last.ckpt`` (written every few steps) and the
    ``<out_dir>/hpc_ckpt_<n>.ckpt`` that Lightning's SLURM support writes on the preemption signal;
    one is complete when every rank's file of it is there (see ``rank_path``).
    """
    if not resume:
        return None
    hpc = {re.sub(r"-rank\d+$", "", p.stem) for p in Path(out_dir).glob("hpc_ckpt_*.ckpt")}
    candidates = [Path(checkpoint_dir(out_dir)) / "last.ckpt", *(Path(out_dir) / f"{s}.ckpt" for s in hpc)]
    complete = [c for c in candidates if all(rank_path(c, r, world_size).is_file() for r in range(world_size))]
    newest = max(complete, key=lambda c: rank_path(c, 0, world_size).stat().st_mtime, default=None)
    return None if newest is None else str(newest)


#: Lightning warnings that HDM triggers by design: the classifier stays in eval mode, Adam is set
#: up when a level begins, and the masks of a manual step are checkpointed after the step.
EXPECTED_WARNINGS = (
    r".*module\(s\) in eval mode.*",
    r".*configure_optimizers` returned `None`.*",
    r".*ModelCheckpoint with manual optimization.*",
)


def main(args: list[str] | None = None) -> None:
    strict_mkl()  # before anything multiplies matrices (model.thread_invariant)
    for message in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    if not (sys.argv[1:] if args is None else args):
        print(f"No arguments: running the demo ({CONFIGS / 'demo.yaml'})")
        args = DEMO_ARGS
    cli = HDMCLI(
        MaskExplainer,
        ExplanationDataModule,
        args=args,  # None: sys.argv
        run=False,
        save_config_callback=None,
        seed_everything_default=0,
        subclass_mode_model=False,
    )
    out_dir = cli.config.out_dir
    try:
        checkpoint = prepare_run_folder(cli)
    except RunFolderError as error:
        raise SystemExit(f"error: {error}") from None
    rejected = reject_bad_inputs(cli.datamodule, cli.model.classifier, RunFolder(out_dir), cli.trainer.is_global_zero)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=checkpoint)
    finish_wandb(cli.trainer)
    if cli.trainer.is_global_zero:  # every rank has written its images before the ranks stop together
        report(RunFolder(out_dir), cli.datamodule, len(cli.datamodule.records) + rejected)


def reject_bad_inputs(datamodule: ExplanationDataModule, classifier, run: RunFolder, write: bool) -> int:
    """Checks every input before the first step (issue 9): bad targets, missing or unreadable
    files go to ``failed.jsonl`` (written by rank 0) and the rest run. Returns how many failed."""
    datamodule.setup()
    failed = datamodule.validate(output_classes(classifier, len(datamodule.mean), datamodule.image_size))
    if write:  # a rerun checks every input again; rows already in failed.jsonl are not repeated
        run.record_failures([(record.path, reason) for record, reason in failed])
    return len(failed)


class RunFolderError(ValueError):
    """The run folder cannot be used as asked; the message says why and what to do, in one line."""


def prepare_run_folder(cli: HDMCLI) -> str | None:
    """Checks and stores the folder's configuration, and picks the checkpoint to resume; before any work.

    The folder's ``config.yaml`` is the configuration that made its maps: a run whose settings
    differ in a key that can change a map (:data:`IGNORED`) is refused. ``--resume false`` removes
    the checkpoints of the images in flight (also SLURM's ``hpc_ckpt_*``, which Lightning would
    otherwise load by itself). Returns the checkpoint to resume from, or None.
    """
    out_dir = Path(cli.config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    current = yaml.safe_load(cli.parser.dump(cli.config, skip_validation=True))
    stored_path = out_dir / "config.yaml"
    has_work = any((out_dir / "maps").glob("*.npy")) or bool(in_flight_checkpoints(out_dir))
    if stored_path.is_file() and has_work:
        stored = yaml.safe_load(stored_path.read_text()) or {}
        differing = config_differences(stored, current)
        if differing:
            raise RunFolderError(
                f"{out_dir} holds maps or work made with another configuration (differing keys: "
                f"{', '.join(differing)}; stored in {stored_path}); use a new --out_dir, continue with its settings "
                f"(--config {stored_path}), or delete {out_dir} to start over"
            )
    elif cli.trainer.is_global_zero:
        cli.parser.save(cli.config, str(stored_path), overwrite=True, skip_validation=True)
    if not cli.config.resume:
        for path in in_flight_checkpoints(out_dir):
            path.unlink(missing_ok=True)
    checkpoint = resume_path(str(out_dir), cli.config.resume, cli.trainer.world_size)
    if checkpoint is not None:
        check_checkpoint(rank_path(checkpoint, cli.trainer.global_rank, cli.trainer.world_size), cli.model)
    return checkpoint


#: Settings that cannot change a map (where the work runs, how it is logged and checkpointed, which
#: images, how many at once); a folder accepts a run that differs from its configuration only in these.
IGNORED = (
    "out_dir", "resume", "config", "seed_everything", "data.images", "data.batch_size", "engine.", "model.chunk_size",
    "model.compile", "model.channels_last", "checkpoint.", "writer.", "trainer.logger", "trainer.devices",
    "trainer.num_nodes", "trainer.strategy", "trainer.accelerator", "trainer.plugins", "trainer.callbacks",
    "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.enable_checkpointing",
    "trainer.log_every_n_steps", "trainer.default_root_dir", "trainer.max_time", "trainer.max_steps",
    "trainer.max_epochs", "trainer.profiler", "trainer.deterministic", "trainer.benchmark",
)


#: Settings added after folders were made, with the value that reproduces the maps made before:
#: a stored configuration without one of them is read as having that value, so that an upgrade
#: does not refuse a folder whose maps the new version would make the same way.
ADDED = {"model.smoothness_weight": 0.0, "model.score": "logit", "model.evidence_scale": "stage", "model.map_scale": "minmax", "model.lr_hold": 0.0,
         "model.fixed_batch": False, "model.thread_invariant": False, "model.level_maps": "all",
         "model.removal_threshold": 1.0, "model.fusion.class_path": "hdm_lightning.fusion.EvidenceFusion",
         "model.fusion.init_args.anchored": False, "model.blur_keeps": 0.5, "model.blur_fade": 0.0, "model.deletion_weight": 0.0, "model.deletion_substrate": "same", "model.deletion_score": "same", "model.shrink": 0.0,
         "model.later_score": None, "model.relative_eps": 0.0, "model.lr_schedule": "constant",
         "model.deletion_restart": 0, "model.map_floor": 0.0, "model.deletion_warmup": 0, "model.deletion_threshold": 1.0, "model.deletion_edge": "hard", "model.deletion_edge_width": 0.0, "model.deletion_floor": 0.0, "model.deletion_gate": 0.0, "model.float32_stride": 0,
         "model.adam_beta2": 0.999, "model.weight_decay": 0.0, "model.mask_param": "clamp",
         "model.adam_scope": "element", "model.step_cap": 0.0,
         "model.start": "constant", "model.start_range": [0.1, 0.7], "model.start_levels": "all",
         "model.start_layer": None}

#: Settings that change a map only under mixed precision; a float32 run's folder ignores them.
MIXED_ONLY = ("model.float32_stride",)


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """Dotted keys of a nested configuration; an empty section (``init_args: {}``) adds none.

    Example:
        >>> flatten({"model": {"lr": 0.1, "classifier": {"class_path": "A", "init_args": {}}}, "out_dir": "x"})
        {'model.lr': 0.1, 'model.classifier.class_path': 'A', 'out_dir': 'x'}
    """
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_differences(stored: dict, current: dict) -> list[str]:
    """Keys (dotted) whose values differ between two configurations, other than :data:`IGNORED` ones.

    A key of :data:`ADDED` missing from either takes its value there; one of :data:`MIXED_ONLY` counts
    only where either configuration runs under mixed precision.

    Example:
        >>> config_differences({"model": {"lr": 0.1}, "out_dir": "a"}, {"model": {"lr": 0.2}, "out_dir": "b"})
        ['model.lr']
        >>> config_differences({"model": {"lr": 0.1}}, {"model": {"lr": 0.1, "score": "logit"}})
        []
    """
    old, new = {**ADDED, **flatten(stored)}, {**ADDED, **flatten(current)}
    keys = sorted(set(old) | set(new))
    mixed = any("mixed" in str(c.get("trainer.precision", "")) for c in (old, new))
    return [k for k in keys if old.get(k) != new.get(k) and not ignored(k) and (mixed or k not in MIXED_ONLY)]


def ignored(key: str) -> bool:
    """Whether ``key`` is one of :data:`IGNORED` or below one (an entry ending in a dot is a section)."""
    return any(key == i or key.startswith(i if i.endswith(".") else f"{i}.") for i in IGNORED)


def in_flight_checkpoints(out_dir: Path) -> list[Path]:
    """Checkpoints of images in flight: ``checkpoints/last*.ckpt`` and SLURM's ``hpc_ckpt_*.ckpt``."""
    return [*(out_dir / "checkpoints").glob("last*.ckpt"), *out_dir.glob("hpc_ckpt_*.ckpt")]


def check_checkpoint(path: Path, model: MaskExplainer) -> None:
    """One clear line for a checkpoint that cannot be resumed (unreadable, older engine, other pool size)."""
    advice = "delete it (or run with --resume false) to start the images in flight over; finished maps are kept"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        state = checkpoint["state_dict"]
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same advice
        raise RunFolderError(f"checkpoint {path} cannot be read ({type(error).__name__}: {error}); {advice}") from None
    if "pool.steps" not in state:
        raise RunFolderError(f"checkpoint {path} was written by an older version of the engine; {advice}")
    capacity = len(state["pool.steps"])
    if capacity != model.pool.capacity:
        raise RunFolderError(f"checkpoint {path} holds {capacity} items (engine.max_items={capacity}), this run "
                             f"{model.pool.capacity}; resume with --engine.max_items={capacity}, or {advice}")


def finish_wandb(trainer) -> None:
    """Close the W&B run, so that the process (or a later run in it) starts clean."""
    if any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
        import wandb

        wandb.finish()


def report(run: RunFolder, datamodule: ExplanationDataModule, total: int) -> None:
    """The end summary (explained, failed and where to read why), after the figures and the page."""
    done = run.read_index()
    page = write_report(run.root, redraw=False) if done or (run.root / "failed.jsonl").is_file() else None
    print(f"\n{failure_summary(run.root, total)}\nOutputs in {run.root.resolve()}:")
    print("  maps/      fused maps (.npy, original resolution)\n  stages/    stage maps\n"
          "  overlays/  PNG overlays\n  figures/   picture, every stage map and the fused map\n"
          "  index.jsonl one row per image\n  report.html every image and failure, one file"
          + (f"\nReport page: {page.resolve()}" if page is not None else ""))
    for row in list(done.values())[:10]:
        print(f"  {row['name']}: {row['class_name']} (logit {row['logit']:.2f}, kept by the map "
              f"{row['masked_logit']:.2f}), {row['steps']} steps, {row['seconds']:.1f} s")
