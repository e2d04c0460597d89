"""The LightningModule of an explanation: its parameters are the masks of the current level.

One optimisation step is one Lightning training step. :class:`~hdm_lightning.callbacks.HDMSchedule`
moves the module through images, stages and levels with ``begin_*``/``end_*``; the tensors that
carry a batch through the method (stage inputs, previous levels, maps so far) are buffers, so a
checkpoint holds everything a resume needs. The classifier is frozen, kept in eval mode and left
out of checkpoints.

Masks of different images and chains never share a parameter element, and the loss is a sum of
per-item terms, so each mask's gradient is its own: a batch of images gives each image the result
it gets alone. Several processes run under :class:`~hdm_lightning.strategy.IndependentRanksStrategy`,
which never wraps the module in ``DistributedDataParallel``: each rank optimises the masks of its
own images, and DDP's gradient averaging would mix different images' masks.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import ParallelStrategy
from torch import Tensor, nn
from torchvision.transforms.functional import gaussian_blur
from typing_extensions import override

from hdm_lightning import masks as M
from hdm_lightning.data import IMAGENET_MEAN, IMAGENET_STD
from hdm_lightning.consistency import Consistency, EvidenceConsistency
from hdm_lightning.fusion import EvidenceFusion, Fusion
from hdm_lightning.models import EfficientNetLite0, freeze
from hdm_lightning.strategy import STRATEGY_NAME, IndependentRanksStrategy
from hdm_lightning.targets import KeepTarget, TargetPolicy

#: Buffers that carry one batch through the method; rebuilt from a checkpoint's shapes.
BATCH_BUFFERS = (
    "images", "substrate", "stage_input", "targets", "original_targets", "reference", "floor",
    "original_reference", "active", "previous_maps", "stage_sum", "stage_maps",
)


class MaskExplainer(LightningModule):
    """HDM mask optimisation against a frozen classifier (``HDM-METHOD.md`` sections 1-3).

    The defaults are the ``fast`` preset (2 benchmark sizes, 2 block factors, lr 0.05), usable on
    a CPU; ``configs/paper.yaml`` sets the reference constants.

    Args:
        classifier: the network to explain; None loads the packaged EfficientNet-Lite0.
        benchmark_sizes: sizes ``s0`` of the benchmark masks.
        block_factors: block factors ``b`` of the auxiliary chains; empty gives MDM's
            independent single-level masks.
        max_size: largest auxiliary mask size.
        consistency: the activation-consistency term; None means :class:`EvidenceConsistency`
            (one-sided, relative to the class's evidence); :class:`SquaredConsistency` is the
            reference's ``λ_c (f_c(x ⊙ Up(P)) − f_c(x))²``.
        sparsity_weight: ``λ_1`` of the mask-value term.
        lr: Adam learning rate of the masks.
        init_value: initial value of every mask element.
        clamp: project masks onto ``[0, 1]`` after each step (the original code does not; without
            it masks may go negative and level maps lose their nesting).
        substrate: what a mask value of 0 shows: ``mean`` (zero in normalised space, the dataset
            mean colour) or ``blur`` (a Gaussian blur of the image).
        blur_sigma: standard deviation in pixels of the ``blur`` substrate.
        target_policy: class explained by later stages; None means :class:`KeepTarget`.
        fusion: how stage maps are fused; None means :class:`EvidenceFusion` (each stage weighted
            by the evidence its regions hold); :class:`SumFusion` is the reference's equal sum.
        chunk_size: most masked images per classifier forward (gradients accumulate over
            chunks); None puts the whole level in one batch. Bounds memory; on a CPU, small
            batches of 6-8 images are also faster per image.
        mean: normalisation mean of the classifier input (linked from the data settings).
        std: normalisation std of the classifier input (linked from the data settings).
    """

    def __init__(
        self,
        classifier: nn.Module | None = None,
        benchmark_sizes: tuple[int, ...] = (7, 10),
        block_factors: tuple[int, ...] = (2, 3),
        max_size: int = 50,
        consistency: Consistency | None = None,
        sparsity_weight: float = 1.0,
        lr: float = 5e-2,
        init_value: float = 0.5,
        clamp: bool = True,
        substrate: Literal["mean", "blur"] = "mean",
        blur_sigma: float = 10.0,
        target_policy: TargetPolicy | None = None,
        fusion: Fusion | None = None,
        chunk_size: int | None = None,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if not benchmark_sizes or min(benchmark_sizes) < 1:
            raise ValueError(f"model.benchmark_sizes must be positive sizes, got {benchmark_sizes}")
        if lr <= 0:
            raise ValueError(f"model.lr must be > 0, got {lr}")
        if sparsity_weight < 0:
            raise ValueError(f"model.sparsity_weight must be >= 0, got {sparsity_weight}")
        if blur_sigma <= 0:
            raise ValueError(f"model.blur_sigma must be > 0, got {blur_sigma}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"model.chunk_size must be >= 1 or null, got {chunk_size}")
        if substrate not in ("mean", "blur"):
            raise ValueError(f"model.substrate must be 'mean' or 'blur', got {substrate!r}")
        self.save_hyperparameters(ignore=["classifier", "consistency", "target_policy", "fusion"])
        self.classifier = freeze(classifier if classifier is not None else EfficientNetLite0())
        self.chains = M.build_chains(list(benchmark_sizes), list(block_factors), max_size)
        self.num_levels = M.num_levels(self.chains)
        self.target_policy = target_policy or KeepTarget()
        self.consistency = consistency or EvidenceConsistency()
        self.fusion = fusion or EvidenceFusion()
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints leave the frozen classifier out
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)
        self.masks = nn.ParameterList()
        self.stage, self.level, self.chain_ids = -1, -1, []
        self.last_loss: Tensor | None = None  # (K, N) losses of the last step
        self.live: list[int] | None = None  # chains with an active item; None: recompute
        self.explaining = True  # HDMSchedule clears it when no image is left on any rank
        self.idle = False  # HDMSchedule sets it when this rank is done but another one is not
        self.finished: list = []  # explanations the schedule finished, for MapWriter
        self.class_names = getattr(self.classifier, "class_names", lambda: None)()

    # ----------------------------------------------------------------- the optimisation step
    def superimposed(self, chains: list[int]) -> list[Tensor]:
        """``P_l`` of the level's chains ``chains`` (positions in ``chain_ids``), ``(N, s_l, s_l)`` each."""
        return [
            M.superimpose(
                self.previous_mask(self.chain_ids[i]) if self.level > 0 else None,
                self.masks[i],
                self.chains[self.chain_ids[i]].block,
            )
            for i in chains
        ]

    def item_losses(self, chains: list[int]) -> Tensor:
        """Loss of the (chain, image) items of the level's chains ``chains``, ``(k, N)``."""
        with torch.autocast(self.device.type, enabled=False):  # masks stay float32 (issue 3)
            size = self.stage_input.shape[-2:]
            kept = torch.stack([M.upsample(p, size) for p in self.superimposed(chains)])  # (k, N, H, W)
        k, n = kept.shape[:2]
        difference = (self.stage_input - self.substrate)[None]  # (1, N, C, H, W)
        masked = (self.substrate[None] + difference * kept[:, :, None]).flatten(0, 1)  # (k·N, C, H, W)
        logit = self.target_logit(masked, self.targets.repeat(k)).view(k, n)
        sparsity = torch.stack([M.sparsity_loss(self.masks[i], self.hparams.sparsity_weight) for i in chains])
        return self.consistency(logit, self.reference, self.floor) + sparsity

    def chain_chunks(self) -> list[list[int]]:
        """The level's chains that still have an active item, in groups whose items fit in one
        classifier batch of ``chunk_size`` (at least one chain, i.e. ``N`` images, per group)."""
        if self.live is None:  # refreshed after each convergence check: one host sync per check
            self.live = [i for i, active in enumerate(self.active.any(dim=1).tolist()) if active]
        per_chunk = len(self.live)
        if self.hparams.chunk_size is not None:
            per_chunk = max(1, self.hparams.chunk_size // self.stage_input.shape[0])
        return [self.live[i : i + per_chunk] for i in range(0, len(self.live), per_chunk)]

    @override
    def setup(self, stage: str) -> None:
        """Refuses strategies that would wrap the module in ``DistributedDataParallel`` (see above)."""
        strategy = self.trainer.strategy
        if isinstance(strategy, ParallelStrategy) and not isinstance(strategy, IndependentRanksStrategy):
            raise ValueError(
                f"trainer.strategy {type(strategy).__name__} would average gradients across ranks and mix "
                f"different images' masks; use trainer.strategy={STRATEGY_NAME!r} to run several processes"
            )
        if self.trainer.world_size > 1 and getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(  # a rank with no image left takes gradient-free steps, which GradScaler refuses
                "trainer.precision=16-mixed cannot run on several ranks; use bf16-mixed or 32-true"
            )

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        return None if self.explaining else -1  # -1 ends the epoch: every image is done

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        optimiser = self.optimizers()
        if self.idle:  # an empty step keeps global_step, which collectives are keyed to, equal on all ranks
            optimiser.zero_grad()
            optimiser.step()  # no gradient: nothing changes
            return None
        before = [a.detach().clone() for a in self.masks]
        optimiser.zero_grad()  # chains without an active item get no gradient: Adam skips them
        losses = self.last_loss.clone() if self.last_loss is not None else self.active.new_zeros(
            self.active.shape, dtype=torch.float32)  # (K, N); converged items keep their last loss
        for chains in self.chain_chunks():  # gradients accumulate over chunks
            chunk = self.item_losses(chains)  # (k, N)
            self.manual_backward(chunk.sum())  # a sum: each item's gradient is its own
            losses[chains] = chunk.detach()
        optimiser.step()
        self.project(before)
        self.last_loss = losses
        rank = f"rank{self.global_rank}/" if self.trainer.world_size > 1 else ""  # ranks explain different images
        self.log(f"{rank}stage{self.stage}/level{self.level}/loss", losses.mean(), on_step=True)
        return losses.sum()

    @torch.no_grad()
    def project(self, before: list[Tensor]) -> None:
        """Clamp to ``[0, 1]`` and keep converged items where they stopped."""
        for a, old, active in zip(self.masks, before, self.active):
            new = a.clamp(0, 1) if self.hparams.clamp else a
            a.copy_(torch.where(active[:, None, None], new, old))

    @override
    def configure_optimizers(self):
        if len(self.masks) == 0:
            return None  # between batches; HDMSchedule sets up Adam when a level begins
        return torch.optim.Adam(self.masks.parameters(), lr=self.hparams.lr)

    # ---------------------------------------------------------------- classifier helpers
    def target_logit(self, images: Tensor, targets: Tensor) -> Tensor:
        """``f_c(x)`` for each image, float32, ``(N,)``."""
        return self.classifier(images).float().gather(1, targets[:, None])[:, 0]

    def make_substrate(self, images: Tensor) -> Tensor:
        if self.hparams.substrate == "mean":
            return torch.zeros_like(images)
        sigma = self.hparams.blur_sigma
        return gaussian_blur(images, kernel_size=2 * int(3 * sigma) + 1, sigma=sigma)

    # ---------------------------------------------------------------- the schedule's calls
    @torch.no_grad()
    def begin_batch(self, images: Tensor, targets: Tensor) -> None:
        """New images ``(N, C, H, W)``; targets of -1 become the model's top-1 class."""
        images = images.to(self.device)
        logits = self.classifier(images)
        targets = targets.to(self.device)
        if bool(((targets < -1) | (targets >= logits.shape[1])).any()):
            raise ValueError(f"targets {targets.tolist()} outside [0, {logits.shape[1]}) (-1: top-1 class)")
        top1 = logits.argmax(dim=1)
        self.set_buffer("images", images)
        self.set_buffer("original_targets", torch.where(targets < 0, top1, targets))
        self.set_buffer("original_reference", self.target_logit(images, self.original_targets))
        self.set_buffer("stage_maps", images.new_zeros((0, *images.shape[:1], *images.shape[-2:])))

    @torch.no_grad()
    def begin_stage(self, stage: int) -> None:
        """Stage input ``x^(t)``: the image, or the image with the regions found so far removed."""
        self.stage = stage
        stage_input = self.images if stage == 0 else self.remaining_input()
        logits = self.classifier(stage_input).float()
        targets = self.original_targets if stage == 0 else self.target_policy(logits, self.original_targets)
        n, (h, w) = stage_input.shape[0], stage_input.shape[-2:]
        self.set_buffer("stage_input", stage_input)
        self.set_buffer("substrate", self.make_substrate(stage_input))
        self.set_buffer("targets", targets)
        self.set_buffer("reference", logits.gather(1, targets[:, None])[:, 0])
        self.set_buffer("floor", self.target_logit(self.substrate, targets))  # f_c(x_0): no evidence left
        self.set_buffer("stage_sum", stage_input.new_zeros((n, h, w)))
        self.set_buffer("previous_maps", stage_input.new_zeros((len(self.chains), n, h, w)))

    def begin_level(self, level: int) -> None:
        """Fresh masks ``a_l`` for every chain that has a level ``level``."""
        self.level = level
        self.chain_ids = M.chains_at_level(self.chains, level)
        n = self.stage_input.shape[0]
        self.masks = nn.ParameterList(
            nn.Parameter(torch.full((n, s, s), self.hparams.init_value, device=self.device))
            for s in (self.chains[c].sizes[level] for c in self.chain_ids)
        )
        self.set_buffer("active", torch.ones(len(self.chain_ids), n, dtype=torch.bool, device=self.device))
        self.last_loss, self.live = None, None

    @torch.no_grad()
    def end_level(self) -> None:
        """Freeze ``P_l`` and add the level maps ``M_l`` to the stage sum."""
        size = self.stage_input.shape[-2:]
        for c, a, p in zip(self.chain_ids, self.masks, self.superimposed(list(range(len(self.masks))))):
            sharing = [c] if self.level > 0 else self.sharing_benchmark(c)
            previous = self.previous_maps[c] if self.level > 0 else None
            level_map = M.level_map(a.detach(), previous, size)  # (N, H, W)
            self.stage_sum += len(sharing) * level_map  # level maps are min-max normalised already
            for chain in sharing:
                self.set_buffer(f"previous_mask_{chain}", p.detach().clone())
                self.previous_maps[chain] = level_map

    @torch.no_grad()
    def end_stage(self, kept: Tensor) -> None:
        """Stage map ``S_t = minmax(Σ level maps)``, appended to the maps so far.

        Images that the stopping rule has stopped (``kept`` false) get an empty stage map.
        """
        stage_map = M.minmax(self.stage_sum) * kept[:, None, None]
        self.set_buffer("stage_maps", torch.cat([self.stage_maps, stage_map[None]]))

    @torch.no_grad()
    def remaining_probability(self) -> Tensor:
        """Softmax probability of the original class on the image with all found regions removed."""
        probabilities = self.classifier(self.remaining_input()).float().softmax(dim=1)
        return probabilities.gather(1, self.original_targets[:, None])[:, 0]

    def fuse(self) -> dict[str, Tensor]:
        """The fused map and the target logit on the image kept by it, per image."""
        substrate = self.make_substrate(self.images)

        def score(kept: Tensor) -> Tensor:
            return self.target_logit(M.apply_mask(self.images, kept, substrate), self.original_targets)

        fused = self.fusion(self.stage_maps, score, self.original_reference).detach()
        with torch.no_grad():
            masked_logit = score(fused)
        stages_run = (self.stage_maps.flatten(2).amax(dim=2) > 0).sum(dim=0)  # (N,) stopped images: fewer
        return {"map": fused, "stage_maps": self.stage_maps.transpose(0, 1), "masked_logit": masked_logit,
                "stages_run": stages_run}

    # ---------------------------------------------------------------------- helpers
    def remaining_input(self) -> Tensor:
        found = M.sum_maps(self.stage_maps)  # C_t, (N, H, W)
        return M.remove_found(self.images, found, self.mean, self.std)

    def previous_mask(self, chain: int) -> Tensor:
        return getattr(self, f"previous_mask_{chain}")

    def sharing_benchmark(self, chain: int) -> list[int]:
        benchmark = self.chains[chain].benchmark
        return [i for i, c in enumerate(self.chains) if c.benchmark == benchmark]

    def set_buffer(self, name: str, value: Tensor) -> None:
        self.register_buffer(name, value)

    @override
    def train(self, mode: bool = True) -> MaskExplainer:
        super().train(mode)
        self.classifier.eval()  # frozen: BatchNorm and dropout never switch to training
        return self

    # ------------------------------------------------------------------ checkpoints
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("classifier.")]:
            del state[key]
        checkpoint["hdm_layout"] = {"stage": self.stage, "level": self.level, "chain_ids": self.chain_ids}

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Re-create masks and buffers with the checkpoint's shapes before Lightning loads them."""
        layout = checkpoint.get("hdm_layout", {"stage": -1, "level": -1, "chain_ids": []})
        self.stage, self.level, self.chain_ids = layout["stage"], layout["level"], list(layout["chain_ids"])
        state = checkpoint["state_dict"]
        count = sum(1 for k in state if k.startswith("masks."))
        self.masks = nn.ParameterList(nn.Parameter(torch.empty_like(state[f"masks.{i}"])) for i in range(count))
        for key, value in state.items():
            if key in BATCH_BUFFERS or key.startswith("previous_mask_"):
                self.set_buffer(key, torch.empty_like(value))
