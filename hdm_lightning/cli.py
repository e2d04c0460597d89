"""Command line: ``python train_masks.py --config FILE`` with dotted overrides for every setting.

The LightningCLI parses the module (``--model.*``), the data (``--data.*``), the Trainer
(``--trainer.*``), the schedule (``--schedule.*``), the checkpoints (``--checkpoint.*``) and the
run folder (``--out_dir``). With no argument at all it runs the demo preset.
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from hdm_lightning.callbacks import HDMSchedule, MapWriter
from hdm_lightning.data import ExplanationDataModule
from hdm_lightning.module import MaskExplainer
from hdm_lightning.outputs import RunFolder

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEMO_ARGS = ["--config", str(CONFIGS / "fast.yaml"), "--config", str(CONFIGS / "demo.yaml")]


def checkpoint_dir(out_dir: str) -> str:
    return str(Path(out_dir) / "checkpoints")


class HDMCLI(LightningCLI):
    """LightningCLI with the HDM callbacks, the run folder and offline W&B logging."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--out_dir", default="runs/hdm", help="run folder: maps, overlays, index, checkpoints")
        parser.add_argument("--resume", type=bool, default=True, help="continue from <out_dir>/checkpoints/last.ckpt")
        parser.add_lightning_class_args(HDMSchedule, "schedule")
        parser.add_lightning_class_args(MapWriter, "writer")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.link_arguments("out_dir", "schedule.out_dir")
        parser.link_arguments("out_dir", "writer.out_dir")
        parser.link_arguments("out_dir", "checkpoint.dirpath", compute_fn=checkpoint_dir)
        parser.link_arguments("out_dir", "trainer.default_root_dir")
        parser.link_arguments("data.mean", "model.mean")
        parser.link_arguments("data.std", "model.std")
        parser.set_defaults(
            {
                "checkpoint.every_n_train_steps": 100,
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 0,
                "trainer.max_epochs": 1,
                "trainer.log_every_n_steps": 10,
                "trainer.enable_model_summary": False,
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.WandbLogger",
                    "init_args": {"offline": True, "project": "hdm-lightning"},
                },
            }
        )

    def before_instantiate_classes(self) -> None:
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


def resume_path(out_dir: str, resume: bool) -> str | None:
    last = Path(checkpoint_dir(out_dir)) / "last.ckpt"
    return str(last) if resume and last.is_file() else None


def main(args: list[str] | None = None) -> None:
    if not (sys.argv[1:] if args is None else args):
        print(f"No arguments: running the demo ({CONFIGS / 'fast.yaml'} + {CONFIGS / 'demo.yaml'})")
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
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    cli.parser.save(cli.config, str(Path(out_dir) / "config.yaml"), overwrite=True, skip_validation=True)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=resume_path(out_dir, cli.config.resume))
    report(RunFolder(out_dir), cli.datamodule)


def report(run: RunFolder, datamodule: ExplanationDataModule) -> None:
    done = run.read_index()
    print(f"\nExplained {len(done)} of {len(datamodule.records)} images. Outputs in {run.root.resolve()}:")
    print(f"  maps/      fused maps (.npy, original resolution)\n  stages/    stage maps\n"
          f"  overlays/  PNG overlays\n  index.jsonl one row per image")
    for row in list(done.values())[:10]:
        print(f"  {row['name']}: {row['class_name']} (logit {row['logit']:.2f}, kept by the map "
              f"{row['masked_logit']:.2f}), {row['steps']} steps, {row['seconds']:.1f} s")
