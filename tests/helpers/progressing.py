"""A minimal LightningModule that exposes ``progress()`` like the engine: one image finishes every
other step, one fails at the start, and the items in flight move from stage 1 to stage 2."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule
from torch.utils.data import DataLoader

IMAGES = 5
STEPS = 2 * IMAGES


class Progressing(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.steps = 0

    def progress(self) -> dict:
        done = self.steps // 2
        failed = 1 if self.steps > 0 else 0
        stage = 1 if self.steps < STEPS // 2 else 2
        return {"images_total": IMAGES + 1, "images_done": done, "images_failed": failed,
                "in_flight": {f"stage{stage}/level0": IMAGES - done, f"stage{stage}/level1": 0}}

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return (self.weight - batch.float().mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return DataLoader(torch.arange(STEPS), batch_size=1)
