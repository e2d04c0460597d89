"""The LightningModule of an explanation run: its parameters are the mask pool.

One optimisation step is one Lightning training step: every item in flight (one level of one chain
of one image in one stage, :mod:`hdm_lightning.pool`) is sent through the frozen classifier in one
batch (split by ``chunk_size``), and each item's Adam moments and step count are its own.
:class:`~hdm_lightning.callbacks.HDMSchedule` admits and retires items; the per-image steps of the
method (a stage begins, an item ends, a stage ends, the stage maps are fused) are the methods of
this module that take an :class:`ImageState`, and their maths is in :mod:`hdm_lightning.masks`.

Masks of different items never share a parameter element and the loss is a sum of per-item terms,
so each item's gradient is its own. Several processes run under
:class:`~hdm_lightning.strategy.IndependentRanksStrategy`, which never wraps the module in
``DistributedDataParallel``: each rank optimises the masks of its own images, and DDP's gradient
averaging would mix them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchvision.transforms.functional import gaussian_blur
from typing_extensions import override

from hdm_lightning import masks as M
from hdm_lightning.data import IMAGENET_MEAN, IMAGENET_STD
from hdm_lightning.consistency import Consistency, EvidenceConsistency
from hdm_lightning.fusion import EvidenceFusion, Fusion
from hdm_lightning.models import EfficientNetLite0, freeze
from hdm_lightning.pointwise import MKL_STRICT, one_row_differs, pointwise_as_matmul, strict_mkl
from hdm_lightning.pool import Group, Item, ItemAdam, MaskPool, constant_lr, cosine_lr, item_size, sharing
from hdm_lightning.precision import high_resolution_modules, run_in_float32
from hdm_lightning.start import gradcam_map, start_values
from hdm_lightning.strategy import STRATEGY_NAME, IndependentRanksStrategy
from hdm_lightning.targets import KeepTarget, TargetPolicy


@dataclass
class ImageState:
    """What one image in flight needs between its items: its stage, the maps so far, the logits.

    ``slot`` is its row in the module's image buffers (stage input, substrate, target, logits).
    """

    key: int  # record index
    name: str
    path: str
    slot: int
    image: Tensor  # (C, H, W), normalised
    target: int  # the class explained (top-1 where the input gave none)
    logit: Tensor  # f_c(x), 0-d
    later_logit: Tensor | None = None  # f_c(x) in the later stages' score (``later_score``), 0-d
    stage: int = 0
    stage_target: int = -1  # class of the current stage (target policy)
    reference: Tensor | None = None  # f_c(x^(t)), 0-d
    floor: Tensor | None = None  # what a drop is measured from (``evidence_scale``), 0-d
    empty: Tensor | None = None  # the deletion term's score with everything removed to its base, 0-d
    deletion_scale: Tensor | None = None  # the evidence the deletion term's share is of, 0-d
    substrate: str = ""  # what a mask value of 0 shows for this image (``blur``, ``mean``); "": ``model.substrate``
    pending_substrates: list[str] = field(default_factory=list)  # ``substrate: both``: the passes still to run
    pass_substrates: list[str] = field(default_factory=list)  # the substrates of the finished passes
    pass_maps: list[Tensor] = field(default_factory=list)  # their fused maps, (H, W) each
    pass_stage_maps: list[Tensor] = field(default_factory=list)  # their stage maps, (t, H, W) each
    evidence: Tensor | None = None  # stage 1's f_c(x) − f_c(x_0), 0-d
    later_evidence: Tensor | None = None  # the same in the later stages' score (``later_score``), 0-d
    stage_maps: list[Tensor] = field(default_factory=list)  # S_1 … S_t, (H, W) each
    references: list[Tensor] = field(default_factory=list)  # f_c(x^(t)) of each finished stage
    stage_sum: Tensor | None = None  # Σ level maps of the current stage, (H, W)
    stage_loss: Tensor | None = None  # Σ over the current stage's retired items of each one's last loss, 0-d
    stage_items: int = 0  # items of the current stage that retired with a loss
    final_losses: list[Tensor] = field(default_factory=list)  # per finished stage: mean last loss of its items
    previous: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)  # chain -> (P_l, M_l)
    pending: list[Item] = field(default_factory=list)  # items waiting for a free row
    running: int = 0  # items in the pool
    start_map: Tensor | None = None  # the current stage's Grad-CAM (``start: gradcam``), (H, W)
    kept: bool = True  # false once the stopping rule has stopped the image
    steps: int = 0  # optimisation steps of its items
    seconds: float = 0.0

    def state_dict(self) -> dict[str, Any]:
        state = {k: move(v, torch.device("cpu")) for k, v in vars(self).items() if k != "pending"}
        state["pending"] = [(i.image, i.stage, i.chain, i.level) for i in self.pending]
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device) -> ImageState:
        values = {k: move(v, device) for k, v in state.items() if k != "pending"}
        return cls(**values, pending=[Item(*p) for p in state["pending"]])


def move(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor inside (lists, tuples, dicts) on ``device``."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(move(v, device) for v in value)
    if isinstance(value, dict):
        return {k: move(v, device) for k, v in value.items()}
    return value


class MaskExplainer(LightningModule):
    """HDM mask optimisation against a frozen classifier (``HDM-METHOD.md`` sections 1-3).

    The defaults (``configs/fine.yaml``; since stop 56) are 2 benchmark sizes, 2 block factors, lr 0.025 decayed
    over 80 steps, smooth masks, the deletion term in log-odds and masks that start from the class's Grad-CAM,
    usable on a CPU; ``configs/fast.yaml`` takes twice the rate over half the steps (the defaults to stop 55);
    ``configs/paper.yaml`` sets the reference constants.

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
        deletion_weight: ``λ_d`` of :func:`~hdm_lightning.masks.deletion_loss`: the evidence left in the
            stage input with the mask's kept regions removed (not in the paper; 0 leaves it out, as
            ``configs/sufficient.yaml`` and ``paper.yaml`` do). It costs a second classifier pass per
            item and step; it asks the kept regions to be evidence the class needs, not only evidence
            that suffices (issue 7: on the blur a mask kept a cup's rim, enough for "espresso", while
            removing the rim left the class; a moped's wheel and engine, while the rest of the bike
            held the class).
        deletion_substrate: what the deletion term removes the kept regions to: ``same`` (the masks'
            substrate) or ``mean`` (the mean colour, what the deletion AUC removes to). Under the blur
            a removed region keeps its colours, so ``same`` asks for less than the deletion AUC does.
        deletion_mix: under ``deletion_substrate: mean``, the share of the masks' substrate in what the
            removed regions show (0: the mean colour alone). The mean colour carries the maps'
            divergence under other arithmetic (stage 1 across thread counts 0.975, 0.995 removing to the
            blur, which costs deletion AUC; docs/experiments.md, stop 63): an experiment between the two.
        deletion_score: the score the deletion term measures the evidence left in: ``same`` (the
            stage's score) or ``log_odds`` (:func:`~hdm_lightning.masks.class_score`; monotone in the
            probability the deletion AUC reads), its evidence then measured over the deletion base
            (the mean colour under ``deletion_substrate: mean``), not over the masks' substrate. A
            logit rises on unrelated content: with the class's tile of a mosaic at the mean colour,
            the other three tiles keep the bow tie's logit at 2.08 against 0.03 on the mean-colour
            image, so the logit term asks the mask to keep them too; their log-odds stay near the
            empty image's (−6.78 against −6.88; the shuttle −6.79 against −6.96).
        deletion_restart: with the deletion term, Adam starts over (moments and bias correction) after
            each item's step ``deletion_restart`` (:func:`~hdm_lightning.pool.restarted`; 0 never;
            without the term never). The term's first steps, while the masks are still at their start,
            raise faint regions all over the image, and Adam's memory of those large gradients holds
            them up against the sparsity term: a haze over the map that three tiles of a mosaic weigh
            more than the class's own (issue 7). Started over after step 3, the sparsity term lowers it
            (224-px mosaics: share in the class's tile 0.536 against 0.471, every target's up), but the
            deletion AUC rose on both photo sets (0.081 against 0.079, 0.033 against 0.027): not the
            default (docs/experiments.md, stop 29).
        deletion_warmup: with the deletion term, its weight rises linearly from 0 over each item's first
            ``deletion_warmup`` steps (0: the full weight from the first step). The term's first
            gradients, at the masks' start and the schedule's highest rates, raise faint values all
            over the image (issue 7's haze); warmed up, the masks first find what keeps the class. Alone
            it trades the term's deletion gain for share and insertion; with ``lr 0.1`` (40 steps) the
            224-px mosaics' share in the class's tile is 0.736 against the defaults' 0.471, 0.773 with
            one stage (the ``scenes`` preset; docs/experiments.md, stops 34 and 35).
        deletion_threshold: how much of a kept region the deletion term removes:
            ``clamp(Up(P) / threshold, 0, 1)`` (:func:`~hdm_lightning.masks.removal`); 1 removes
            ``Up(P)`` as the masks keep it (the defaults to stop 49). At 0.5 (since stop 50) a region
            kept at half or more is removed entirely, so once the class's regions are, what is left
            of the class is gone and the term's gradient with it, instead of a dense gradient over
            the whole image while the kept regions are only partly removed (the haze, issue 7).
            EfficientNet-Lite0 (docs/experiments.md, stop 50): 224-px mosaics share in the class's
            tile 0.750 against 0.692 (pointing 1.00 both); tuning photos deletion / insertion 0.050 /
            0.362 against 0.060 / 0.346; on the decoy toy the term moves less of the map off the decoy.
        deletion_edge: ``hard`` removes ``clamp(Up(P) / threshold, 0, 1)``; ``smooth``
            :func:`~hdm_lightning.masks.smooth_removal`, whose slope falls to 0 at the threshold (an
            experiment of stop 51 on the maps' dependence on arithmetic noise).
        deletion_edge_width: with the hard edge, its kink at the threshold rounded over
            ``Up(P) / threshold`` in ``1 ± width`` (:func:`~hdm_lightning.masks.rounded_removal`;
            0 keeps the kink; the smooth edge and threshold 1 have no kink inside the masks' range
            and ignore it). At the kink the term's gradient jumps from ``1 / threshold`` to 0, masks
            that the sparsity term lowers onto it chatter across it, and which side an element ends
            on is decided by float noise: the maps then depend on the thread count (issue 7).
        deletion_floor: mask values at or below it are not removed by the deletion term
            (:func:`~hdm_lightning.masks.floored_removal`: the removal ramps from the floor to the
            threshold, both kinks rounded by ``deletion_edge_width``, in place of ``deletion_edge``'s removal; 0,
            the default, ramps from 0).
            The term's gradient then does not raise faint values over what the class does not hold.
        deletion_gate: the deletion term's gradient on each mask element kept only where it is at
            least ``gate`` of the item's largest, none below half of that
            (:func:`~hdm_lightning.masks.strong_part`; 0 keeps it whole, as to stop 59): the term then
            raises what its removal clearly lowers, not every faint element Adam's normalised steps
            would carry up (issue 7's haze). At 0.1 (since stop 60): 224-px mosaics' share in the
            class's tile 0.830 against 0.793 (pointing 1.00 both; every class up), stage 1 at 448 px
            +0.06-0.15 on mosaic B; at 0.3 single photos lose deletion AUC (docs/experiments.md, stop 60).
        smoothness_weight: ``λ_s`` of :func:`~hdm_lightning.masks.smoothness_loss` (squared differences
            of neighbouring mask elements; not in the paper, 0 leaves it out). Among the many masks
            that keep a class's score about equally well it makes the smooth, compact one the
            optimum, so float rounding on Adam's path no longer picks one (issue 7, stability).
        lr: Adam learning rate of the masks (the first step's, under the cosine schedule). With the
            deletion term, 0.2 lets the 40 decayed steps bring back the faint values its first steps
            raise over the whole image (224-px mosaics: share in the class's tile 0.611 against 0.471)
            at an insertion AUC 0.016 lower (issue 7, stop 33: docs/experiments.md, "The haze is the
            step budget's").
        lr_schedule: ``cosine`` decays each item's rate to 0 over ``lr_horizon`` of its steps (stable
            maps, issue 7); ``constant`` is the reference's.
        lr_horizon: steps of the cosine decay; the CLI links it to ``schedule.max_steps``.
        lr_hold: share of ``lr_horizon`` run at the full rate before the cosine decay starts.
        relative_eps: Adam's ``ε`` for an ``s×s`` mask as a share of the sparsity term's gradient
            ``λ_1/s²`` (0: Adam's usual 1e-8). Adam moves every element by about ``lr`` whatever the
            size of its gradient, so once a later stage has little evidence left, float noise in the
            consistency gradient steers the masks (issue 7, stability); with ``ε`` on the scale of the
            sparsity push, an element whose gradient is far below it moves far less than ``lr``. At
            0.5 an element that only the sparsity term pushes moves ``lr/1.5`` a step, so a mask's
            background falls from 0.5 to 0 within the decayed steps rather than just at their end,
            leaving no faint haze over the rest of the image (issue 7, scenes of several objects).
        adam_beta2: Adam's second-moment decay. At the usual 0.999 the bias-corrected second moment
            is, over a level's 20-80 steps, the mean of every squared gradient so far: the deletion
            term's large first gradients keep an element's later steps small, and a background
            that only the sparsity term pushes falls slowly (the haze over the map, issue 7). 0.9
            thins the haze a little and trades deletion AUC for insertion (stop 38): not the default.
        weight_decay: AdamW's decoupled weight decay of the masks (:func:`~hdm_lightning.pool.decay_step`;
            0: none): each step lowers every element by ``weight_decay`` times its rate times its
            value. The haze over the map shrinks geometrically while the order of its faint values,
            which ranks the background for the deletion AUC, stays. At 1 it raises insertion on the
            tuning photos but not on the held-out ones, and weak classes' maps leave their mosaic
            tiles (stop 39): not the default.
        adam_scope: what Adam divides an element's step by: ``element`` (its own second moment, Adam)
            or ``mask`` (the root mean square of its mask's second moments: one step size a mask, so
            the steps keep the gradient's proportions and an element whose gradient is float noise
            moves by noise, not by about ``lr``; :func:`~hdm_lightning.pool.adam_step`). At ``lr 1``
            (stop 41) the haze is gone (224-px mosaics 0.637 against 0.471) but single-photo
            insertion is 0.02 lower and the maps part under another batch shape (0.53): not the default.
        step_cap: bounds every element's step by ``step_cap`` times its item's rate (0: no bound).
            With ``adam_scope: mask`` an element whose gradient is many times its mask's root mean
            square would jump to 0 or 1 in one step; bounded, it moves at most as Adam at
            ``step_cap · lr`` would, and the steps stay in the gradient's proportions below the bound.
            At ``lr 1, step_cap 0.1`` (stop 42) the 224-px mosaics' share is 0.698 (the defaults 0.471),
            but deletion AUC on single photos is worse (0.080 and 0.034 against 0.072 and 0.027) and
            the maps less stable (0.960 at 96 px): not the default.
        score: the class score the masks must keep: ``logit`` (the reference's ``f_c``) or
            ``log_odds`` (``f_c − logsumexp_{k≠c} f_k``; :func:`~hdm_lightning.masks.class_score`).
            Every "logit" of the method (the consistency term, the stage references and floors, the
            fusion weights, the outputs' ``logit`` and ``masked_logit``) is then this score, except
            what ``later_score`` sets.
        later_score: the score the masks of stages 2 on keep (their consistency term, references
            and floors) and the fusion weighs the stages in; None: ``score``. Once the earlier
            stages removed most of the class's evidence, the log-odds of a class barely present is
            decided by the other classes' logits, and a later stage's masks follow float noise
            (issue 7, stability); its logit is steadier.
        evidence_scale: what a later stage's drop is a share of in :class:`EvidenceConsistency`:
            ``image`` (the image's, as in stage 1; the original class's, also under ``Repredict``) or
            ``stage`` (the evidence its input still holds).
            Under ``stage`` a stage that starts with little evidence left weighs tiny changes of the
            score as heavily as stage 1 weighs the whole class, and float noise steers its masks.
        map_scale: how level and stage maps are scaled: ``minmax`` (the reference: each level map
            and each stage map stretched to ``[0, 1]``) or ``mask`` (a level map is what its masks
            kept, ``Up(a_l) ⊙ M_{l−1}`` on their own ``[0, 1]`` scale, and a stage map the mean of its
            level maps). Under ``minmax`` a level or stage whose masks fell towards 0 is stretched
            to full range, float noise included (issue 7, stability); under ``mask`` it stays faint.
        level_maps: which level maps a stage map sums: ``last`` (each chain's finest level only) or
            ``all`` (the reference: every level of every chain). A level map already carries the
            coarser levels of its chain as factors (``M_l = minmax(Up(a_l) ⊙ M_{l−1})``), so the
            finest one is the chain's result; the coarse benchmark maps (7×7, 10×10 cells of 32 and
            22 px) add broad blur around it (issue 7, scenes of several objects).
        removal_threshold: how much of what the stages found the next stage loses:
            ``clamp(C_t / threshold, 0, 1)`` (:func:`~hdm_lightning.masks.removal`); 1 is the
            reference's soft ``x ⊙ (1 − C_t)``, under which most of the class's evidence survives
            the removal (issue 7). The evidence fusion scores the stages' removals the same way.
        init_value: initial value of every mask element (under ``start: constant``).
        start: where a level's mask starts: ``gradcam`` (the default since stop 47;
            :mod:`hdm_lightning.start`: the class's Grad-CAM on the stage input, each cell
            ``low + (high − low) ·`` its share of the peak cell, ``start_range``; once a stage, on the
            image alone) or ``constant`` (``init_value``, the reference's). From the constant, 20-40
            steps leave a haze over everything that is not evidence (issue 7).
        start_range: ``[low, high]`` of a ``gradcam`` start; ``[0.2, 0.8]`` since stop 48 (better
            deletion and insertion on single photos than ``[0.1, 0.7]``, about the same mosaics).
        start_levels: the ``first`` level of each chain starts from Grad-CAM (the benchmark masks;
            finer levels at ``init_value``, guided by their parent; the default), or ``all`` levels.
        start_layer: the layer Grad-CAM weighs (dotted path); None picks the last one with a
            convolution (:func:`~hdm_lightning.baselines.find_target_layer`). A classifier without
            one starts from ``init_value``, with a warning.
        clamp: project masks onto ``[0, 1]`` after each step (the original code does not; without
            it masks may go negative and level maps lose their nesting).
        mask_param: ``clamp`` (Adam moves the masks, projected onto ``[0, 1]``) or ``sigmoid`` (Adam
            moves each mask's logit ``θ``, the mask is ``σ(θ)``: no clamp, so faint values never tie
            at 0, and a step in ``θ`` moves a mask least near 0 and 1; ``lr`` is then a rate in
            ``θ``). Measured on stage 1 (issue 7, stop 40): at ``lr 0.8, relative_eps 0.02`` the
            haze over a mosaic's other tiles is gone (medians 0.00-0.01) and deletion AUC is as the
            defaults', but the share in the class's tile (cat 0.80, bow tie 0.64) stays below
            ``lr 0.2``'s with the clamp (0.92, 0.70): not the default.
        shrink: after each Adam step every mask element falls by ``shrink`` times the step's
            learning rate (:func:`~hdm_lightning.pool.shrink_step`, an L1 proximal step outside
            Adam's per-element scaling; 0 leaves it out). With the deletion term, whose first steps
            raise faint regions everywhere that the sparsity gradient then barely moves, it clears
            that haze (issue 7, stop 26).
        substrate: what a mask value of 0 shows: ``blur`` (a Gaussian blur of the stage input, Fong
            and Vedaldi's perturbation), ``mean`` (zero in normalised space, the dataset mean
            colour: the reference's ``x ⊙ Up(P)``) or ``auto`` (the blur, unless it keeps more than
            ``blur_keeps`` of the class's evidence; then the mean colour; chosen once an image, from
            its own logits). On the mean colour a kept bright patch can read as an object the
            classifier knows (a spotlight, abacus beads) and keep a class's score with an artefact; a
            blur keeps the image's colours and layout without its detail (issue 7), but where the
            class survives the blur (a bright blob, a texture at a large input size) the masks have
            no evidence to keep and the map is noise. ``both`` runs every stage twice, once on
            ``auto``'s choice and once on the mean colour, and the map is the min-max of the mean of
            the two fused maps (under ``LearnedFusion`` its scale is lost): each substrate finds
            evidence the other misses (the blur the detail, the mean colour the colours and shapes);
            on Lite2 their mean ranks the pixels better for deletion than either alone, on Lite0 it
            does not (docs/experiments.md, "Necessary evidence on Lite2"); twice the passes.
        blur_sigma: standard deviation in pixels of the ``blur`` substrate.
        blur_fade: how far the ``blur`` substrate is faded towards the mean colour, in ``[0, 1]``:
            ``(1 − fade) · blur`` in normalised space. 0 keeps the blur's colours (what the insertion
            AUC starts from); 1 is the mean colour (what the deletion AUC removes to). Between, a mask
            must keep both the detail the blur removes and the colour the fade removes.
        blur_keeps: under ``substrate: auto``, the share of the class's evidence over the mean colour
            (``f_c(x) − f_c(mean)``) that the blurred image (faded by ``blur_fade``: the substrate the
            masks would get) may keep before the mean colour is used.
        target_policy: class explained by later stages; None means :class:`KeepTarget`.
        fusion: how stage maps are fused; None means :class:`EvidenceFusion` (stage 1 whole, each
            later stage weighted by the evidence its regions add); :class:`SumFusion` is the
            reference's equal sum.
        map_floor: how much of the class's evidence the fused map's floor may cost
            (:func:`~hdm_lightning.masks.floor_map`; 0, the default, leaves the map as fused). The
            values up to the highest level whose cut keeps every view's score within this share of
            the view's evidence are scaled by 1e-3 (their mass goes, the map's order of pixels
            stays), checked against the classifier on the masks' substrate and, with the deletion
            term, on its mean colour in log-odds (:meth:`floor_views`; up to 22 passes an image).
            The index row's ``floor`` says where it was cut. The faint values the deletion term
            leaves over a scene are evidence in that second view, so at 0.05 the floor is low
            (0.02-0.1) and the mosaics' share in the class's tile moves from 0.470 to 0.482 only
            (issue 7, stop 30: docs/experiments.md, "The map's floor").
        chunk_size: most masked images per classifier forward (gradients accumulate over
            chunks); None sends every item in flight in one batch. Bounds memory.
        max_items: most items in flight (``engine.max_items``): the pool's rows per mask size.
        compile: run the classifier through ``torch.compile``; batches are then padded to
            ``chunk_size`` (or ``max_items``) so that their shape never changes.
        fixed_batch: pad every classifier batch to ``chunk_size`` (or ``max_items``) rows also
            without ``compile``. A row's arithmetic then does not depend on the other items in the
            batch nor on its place in it (the kernels are chosen by shape), so the same image gets
            the bitwise same map in a batch of one or of many on one machine and thread count; the
            padding rows cost passes (issue 7, stability).
        thread_invariant: run the classifier's 1×1 convolutions as matrix products
            (:mod:`hdm_lightning.pointwise`) with MKL's strict reproducibility: on CPU oneDNN splits their
            sums by the thread count, and the optimisation carries that into the map (one process
            against two correlate 0.974 at 224 px). With it a map is the same to the bit in a batch of
            one or four, in one process or two, at one thread or two on one CPU type (issue 7, stop 66).
            Where a classifier pass of one row takes other bits than the row among others (small inputs:
            EfficientNet-Lite0 at 64 px), such passes are padded to two rows (stop 68). Not under
            ``compile`` (the compiled graph keeps oneDNN's convolutions) nor on GPUs.
        channels_last: give the classifier channels-last inputs: faster convolutions on GPUs, and on
            CPU the layout in which ``thread_invariant``'s products need no copies (a pass and
            backward as fast as oneDNN's). A classifier that calls ``.view`` on a convolution's
            output may need ``.reshape`` (the error says so) or this off.
        float32_stride: under mixed precision (``bf16-mixed``, ``16-mixed``) the classifier's layers
            before its feature maps fall below ``1/float32_stride`` of the input's side run in float32
            (:mod:`hdm_lightning.precision`; 0: every layer in the lower precision). Most of bf16's
            error in the masks' gradient is made there (cosine with float32's 0.90-0.96 all in bf16,
            0.984-0.995 with the layers to stride 8 in float32; EfficientNet-Lite0). No effect in float32.
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
        deletion_weight: float = 2.0,
        deletion_substrate: Literal["same", "mean"] = "mean",
        deletion_mix: float = 0.0,
        deletion_score: Literal["same", "log_odds"] = "log_odds",
        deletion_restart: int = 0,
        deletion_warmup: int = 0,
        deletion_threshold: float = 0.5,
        deletion_edge: str = "hard",
        deletion_edge_width: float = 0.2,
        deletion_floor: float = 0.0,
        deletion_gate: float = 0.1,
        smoothness_weight: float = 4.0,
        lr: float = 2.5e-2,
        lr_schedule: Literal["constant", "cosine"] = "cosine",
        lr_horizon: int = 80,
        lr_hold: float = 0.0,
        relative_eps: float = 0.5,
        adam_beta2: float = 0.999,
        weight_decay: float = 0.0,
        adam_scope: Literal["element", "mask"] = "element",
        step_cap: float = 0.0,
        score: Literal["logit", "log_odds"] = "logit",
        later_score: Literal["logit", "log_odds"] | None = None,
        evidence_scale: Literal["stage", "image"] = "image",
        map_scale: Literal["minmax", "mask"] = "minmax",
        level_maps: Literal["all", "last"] = "last",
        removal_threshold: float = 1.0,
        init_value: float = 0.5,
        start: Literal["constant", "gradcam"] = "gradcam",
        start_range: tuple[float, float] = (0.2, 0.8),
        start_levels: Literal["all", "first"] = "first",
        start_layer: str | None = None,
        clamp: bool = True,
        mask_param: Literal["clamp", "sigmoid"] = "clamp",
        shrink: float = 0.0,
        substrate: Literal["mean", "blur", "auto", "both"] = "auto",
        blur_sigma: float = 10.0,
        blur_keeps: float = 0.5,
        blur_fade: float = 0.0,
        target_policy: TargetPolicy | None = None,
        fusion: Fusion | None = None,
        map_floor: float = 0.0,
        chunk_size: int | None = None,
        max_items: int = 16,
        compile: bool = False,
        fixed_batch: bool = False,
        thread_invariant: bool = True,
        channels_last: bool = True,
        float32_stride: int = 8,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if not benchmark_sizes or min(benchmark_sizes) < 1:
            raise ValueError(f"model.benchmark_sizes must be positive sizes, got {benchmark_sizes}")
        if lr <= 0:
            raise ValueError(f"model.lr must be > 0, got {lr}")
        if min(sparsity_weight, smoothness_weight, deletion_weight) < 0:
            raise ValueError(f"model.sparsity_weight, model.smoothness_weight and model.deletion_weight must be "
                             f">= 0, got {sparsity_weight}, {smoothness_weight}, {deletion_weight}")
        if shrink < 0 or (shrink and not clamp):
            raise ValueError(f"model.shrink must be >= 0 and needs model.clamp (masks kept in [0, 1]), got "
                             f"shrink {shrink}, clamp {clamp}")
        if mask_param not in ("clamp", "sigmoid") or (mask_param == "sigmoid" and (shrink or weight_decay)):
            raise ValueError(f"model.mask_param must be 'clamp' or 'sigmoid' (then without model.shrink and "
                             f"model.weight_decay), got {mask_param!r}")
        if deletion_warmup < 0:
            raise ValueError(f"model.deletion_warmup must be >= 0 (0: the full weight at once), got {deletion_warmup}")
        if not 0 < deletion_threshold <= 1:
            raise ValueError(f"model.deletion_threshold must be in (0, 1], got {deletion_threshold}")
        if deletion_edge not in ("hard", "smooth"):
            raise ValueError(f"model.deletion_edge must be 'hard' or 'smooth', got {deletion_edge!r}")
        if not 0 <= deletion_edge_width <= 1:
            raise ValueError(f"model.deletion_edge_width must be in [0, 1], got {deletion_edge_width}")
        if not 0 <= deletion_floor < deletion_threshold:
            raise ValueError(f"model.deletion_floor must be in [0, model.deletion_threshold) = [0, "
                             f"{deletion_threshold}), got {deletion_floor}")
        if deletion_gate < 0:
            raise ValueError(f"model.deletion_gate must be >= 0 (0: off), got {deletion_gate}")
        if deletion_restart < 0:
            raise ValueError(f"model.deletion_restart must be >= 0 (0: never), got {deletion_restart}")
        if not 0 <= map_floor < 1:
            raise ValueError(f"model.map_floor must be in [0, 1) (0: no floor), got {map_floor}")
        if not 0 <= deletion_mix <= 1:
            raise ValueError(f"model.deletion_mix must be in [0, 1] (0: the mean colour), got {deletion_mix}")
        if deletion_substrate not in ("same", "mean"):
            raise ValueError(f"model.deletion_substrate must be 'same' or 'mean', got {deletion_substrate!r}")
        if deletion_score not in ("same", "log_odds"):
            raise ValueError(f"model.deletion_score must be 'same' or 'log_odds', got {deletion_score!r}")
        if blur_sigma <= 0:
            raise ValueError(f"model.blur_sigma must be > 0, got {blur_sigma}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"model.chunk_size must be >= 1 or null, got {chunk_size}")
        if lr_schedule not in ("constant", "cosine") or lr_horizon < 1:
            raise ValueError(f"model.lr_schedule must be 'constant' or 'cosine' and model.lr_horizon >= 1, got "
                             f"{lr_schedule!r}, {lr_horizon}")
        if not 0 <= lr_hold < 1:
            raise ValueError(f"model.lr_hold must be in [0, 1), got {lr_hold}")
        if relative_eps < 0:
            raise ValueError(f"model.relative_eps must be >= 0, got {relative_eps}")
        if not 0 <= adam_beta2 < 1:
            raise ValueError(f"model.adam_beta2 must be in [0, 1), got {adam_beta2}")
        if adam_scope not in ("element", "mask"):
            raise ValueError(f"model.adam_scope must be 'element' or 'mask', got {adam_scope!r}")
        if step_cap < 0:
            raise ValueError(f"model.step_cap must be >= 0 (0: no bound), got {step_cap}")
        if weight_decay < 0:
            raise ValueError(f"model.weight_decay must be >= 0 (0: none), got {weight_decay}")
        if score not in ("logit", "log_odds") or later_score not in ("logit", "log_odds", None):
            raise ValueError(f"model.score and model.later_score must be 'logit' or 'log_odds', got {score!r}, "
                             f"{later_score!r}")
        if evidence_scale not in ("stage", "image"):
            raise ValueError(f"model.evidence_scale must be 'stage' or 'image', got {evidence_scale!r}")
        if map_scale not in ("minmax", "mask"):
            raise ValueError(f"model.map_scale must be 'minmax' or 'mask', got {map_scale!r}")
        if level_maps not in ("all", "last"):
            raise ValueError(f"model.level_maps must be 'all' or 'last', got {level_maps!r}")
        if not 0 < removal_threshold <= 1:
            raise ValueError(f"model.removal_threshold must be in (0, 1], got {removal_threshold}")
        if substrate not in ("mean", "blur", "auto", "both"):
            raise ValueError(f"model.substrate must be 'mean', 'blur', 'auto' or 'both', got {substrate!r}")
        if not 0 < blur_keeps <= 1:
            raise ValueError(f"model.blur_keeps must be in (0, 1], got {blur_keeps}")
        if not 0 <= blur_fade <= 1:
            raise ValueError(f"model.blur_fade must be in [0, 1], got {blur_fade}")
        if start not in ("constant", "gradcam") or start_levels not in ("all", "first"):
            raise ValueError(f"model.start must be 'constant' or 'gradcam' and model.start_levels 'all' or 'first', "
                             f"got {start!r}, {start_levels!r}")
        if len(start_range) != 2 or not 0 <= start_range[0] <= start_range[1] <= 1:
            raise ValueError(f"model.start_range must be [low, high] with 0 <= low <= high <= 1, got {start_range}")
        if float32_stride < 0:
            raise ValueError(f"model.float32_stride must be >= 0 (0: no layer kept in float32), got {float32_stride}")
        self.save_hyperparameters(ignore=["classifier", "consistency", "target_policy", "fusion"])
        self.classifier = freeze(classifier if classifier is not None else EfficientNetLite0())
        if channels_last:
            self.classifier.to(memory_format=torch.channels_last)
        # a plain attribute, not a second registered copy of the classifier
        object.__setattr__(self, "forward_classifier", torch.compile(self.classifier) if compile else self.classifier)
        self.chains = M.build_chains(list(benchmark_sizes), list(block_factors), max_size)
        self.pool = MaskPool([s for c in self.chains for s in c.sizes], max_items, init_value,
                             sigmoid=mask_param == "sigmoid")
        self.register_buffer("item_image", torch.zeros(max_items, dtype=torch.long))  # image row of each item
        self.target_policy = target_policy or KeepTarget()
        self.consistency = consistency or EvidenceConsistency()
        self.fusion = fusion or EvidenceFusion()
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints leave the frozen classifier out
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)
        self.finished: list = []  # explanations the schedule finished, for MapWriter
        self.counts = {"images_total": 0, "images_done": 0, "images_failed": 0}  # kept by HDMSchedule
        self.class_names = getattr(self.classifier, "class_names", lambda: None)()
        self.float32_hooks: list | None = None  # installed at the first step (float32_stride)
        self.pointwise_hooks: list = []  # installed for the fit (thread_invariant)
        self.pad_one_row: bool | None = None  # found at the first step (thread_invariant)
        if thread_invariant:
            strict_mkl()  # before the classifier's first product; checked again at the fit's start

    # ----------------------------------------------------------------- the optimisation step
    def size_of(self, item: Item) -> int:
        return item_size(self.chains, item)

    def item_losses(self, logit: Tensor, trainable: list[Tensor], images: Tensor, left: Tensor | None = None) -> Tensor:
        """The loss of each item (``HDM-METHOD.md`` section 1), ``(k,)``: the one place its form lives.

        Args:
            logit: ``f_c`` of each item's masked image, ``(k,)``.
            trainable: the items' trainable masks ``a_l``, one ``(k_s, s, s)`` tensor per size, in
                the order of ``logit``.
            images: each item's image row, ``(k,)``: ``self.reference[images]`` is ``f_c(x^(t))``,
                ``self.floor[images]`` what a drop is measured from, ``self.empty[images]`` the deletion
                term's score with everything removed to its base (the substrate, or the mean colour) and
                ``self.deletion_scale[images]`` the evidence its share is of.
            left: the deletion term's score of each item's stage input with the kept regions removed
                (``deletion_weight``).
        """
        sparsity, smoothness = self.hparams.sparsity_weight, self.hparams.smoothness_weight
        mask_terms = torch.cat([M.sparsity_loss(a, sparsity) + (M.smoothness_loss(a, smoothness) if smoothness else 0)
                                for a in trainable])  # one pass over the groups, one cat
        reference, floor = self.reference[images], self.floor[images]
        losses = self.consistency(logit, reference, floor) + mask_terms
        if left is not None:
            losses = losses + self.deletion_losses(left, images)
        return losses

    def deletion_losses(self, left: Tensor, images: Tensor) -> Tensor:
        """The deletion term of :meth:`item_losses`, ``(k,)``."""
        return M.deletion_loss(left, self.empty[images], self.deletion_scale[images],
                               self.hparams.deletion_weight, M.MIN_EVIDENCE)

    def chunk_losses(self, chunk: list[Group], backward: Callable[..., None] | None = None) -> Tensor:
        """Losses of one classifier batch of items, ``(k,)``.

        With ``backward`` (``manual_backward``) each classifier pass is backpropagated as soon as its
        loss is known, down to the kept masks ``Up(P_l)``, whose gradient then goes to the masks once,
        and the losses come back detached: a step that held the kept images' graph and the deletion
        term's until one backward ran 2-21 % slower on a 2-core CPU (batches of 2-8,
        EfficientNet-Lite0 at 224 px; ``benchmarks/pass_order.py``) and held twice the activations.
        """
        slots = self.pool.slots(chunk)  # (k,)
        images = self.item_image[slots]  # (k,)
        with torch.autocast(self.device.type, enabled=False):  # masks stay float32 (issue 3)
            kept = self.pool.kept(chunk, self.stage_input.shape[-2:])  # (k, H, W)
            up = kept if backward is None else kept.detach().requires_grad_()  # the passes' graphs end here
            masked = M.apply_mask(self.stage_input[images], up, self.substrate[images])  # (k, C, H, W)
        kind = self.log_odds[images] if self.mixed_scores else None  # per row only where stages differ
        losses = self.item_losses(self.target_logit(masked, self.target[images], kind),
                                  [self.pool.trainable(group) for group in chunk], images)
        if backward is not None:
            backward(losses.sum())  # (scaled under 16-mixed, as are up.grad's parts)
            losses = losses.detach()
        if self.hparams.deletion_weight:  # a second pass, the first's batch shape
            with torch.autocast(self.device.type, enabled=False):
                removed = M.apply_mask(self.stage_input[images], 1 - self.deletion_removal(up),
                                       self.deletion_base(images))
            term = self.deletion_losses(self.target_logit(removed, self.target[images], self.deletion_kind or kind),
                                        images)
            if self.hparams.deletion_warmup:
                term = term * self.deletion_ramp(slots)
            if backward is not None:
                self.backward_deletion(term, up, kept, backward)
                term = term.detach()
            losses = losses + term
        if backward is not None and up.grad is not None:
            kept.backward(up.grad)  # already scaled: not through the precision plugin again
        return losses

    def backward_deletion(self, term: Tensor, up: Tensor, kept: Tensor, backward: Callable[..., None]) -> None:
        """Backpropagates the deletion term to the kept pixels ``up``; under ``deletion_gate`` on to
        the masks at once, where only the strong part of its gradient is kept."""
        gate = self.hparams.deletion_gate
        if not gate:
            backward(term.sum())
            return
        first, up.grad = up.grad, None
        backward(term.sum())
        deletion, up.grad = up.grad, None
        if first is not None:
            kept.backward(first, retain_graph=True)
        self.pool.gated_backward(lambda: kept.backward(deletion), gate)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        return -1 if self.trainer.should_stop else None  # -1 ends the epoch: HDMSchedule found no work left

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        optimiser = self.optimizers()
        optimiser.zero_grad()
        if len(self.pool) == 0:  # an idle rank: an empty step keeps global_step equal on all ranks
            optimiser.step()
            return None
        if self.float32_hooks is None:
            self.keep_high_resolution_float32()
        if self.pad_one_row is None:
            self.pad_one_row = self.one_row_needs_padding()
        losses = []
        for chunk in self.pool.chunks(self.size_of, self.hparams.chunk_size):  # gradients accumulate
            chunk_loss = self.chunk_losses(chunk, self.manual_backward)  # sums: each item's gradient is its own
            self.pool.record(chunk, chunk_loss)
            losses.append(chunk_loss.detach())
        optimiser.step()
        loss = torch.cat(losses).mean()
        rank = f"rank{self.global_rank}/" if self.trainer.world_size > 1 else ""  # ranks explain different images
        self.log(f"{rank}loss", loss, on_step=True)
        return loss

    @override
    def configure_optimizers(self):
        rate = constant_lr
        if self.hparams.lr_schedule == "cosine":
            rate = partial(cosine_lr, horizon=self.hparams.lr_horizon, hold=self.hparams.lr_hold)
        return ItemAdam(self.pool, self.size_of, lr=self.hparams.lr,
                        clamp=self.hparams.clamp and self.hparams.mask_param == "clamp", rate=rate,
                        eps=self.adam_eps, betas=(0.9, self.hparams.adam_beta2), shrink=self.hparams.shrink,
                        adam_restart=self.hparams.deletion_restart if self.hparams.deletion_weight else 0,
                        decay=self.hparams.weight_decay, scope=self.hparams.adam_scope,
                        cap=self.hparams.step_cap)

    def keep_high_resolution_float32(self) -> None:
        """Under mixed precision, hooks that run the classifier's layers down to ``float32_stride`` in
        float32 (found from one pass of an image row's shape); none otherwise."""
        self.float32_hooks = []
        if self.hparams.float32_stride and "mixed" in str(self.trainer.precision):
            example = torch.zeros_like(self.stage_input[:1])
            names = high_resolution_modules(self.classifier, example, self.hparams.float32_stride)
            self.float32_hooks = run_in_float32(self.classifier, names)

    def one_row_needs_padding(self) -> bool:
        """``thread_invariant``: whether a classifier pass of one item must be padded to two rows for its bits
        to be those of the item among others (:func:`~hdm_lightning.pointwise.one_row_differs`, probed once on a
        random row of the images' shape). An item runs alone when its image's other chains have ended, or with
        one chain; without the padding EfficientNet-Lite0's maps at 64 px differed between a batch of one image
        and of four (stage 3 correlation 0.67; stop 68)."""
        if (not self.hparams.thread_invariant or self.hparams.compile or self.hparams.fixed_batch
                or self.device.type != "cpu"):  # as the products: a GPU's kernels are not made bitwise
            return False
        row = torch.rand(self.stage_input[:1].shape, generator=torch.Generator().manual_seed(0)).to(self.stage_input)
        return one_row_differs(lambda batch: self.target_logit(batch, batch.new_zeros(len(batch), dtype=torch.long)),
                               row)

    @override
    def on_fit_start(self) -> None:
        """``thread_invariant``: the classifier's 1×1 convolutions as matrix products for the fit (on
        CPU, eager), and a warning where MKL ran before it could be made strict."""
        if not self.hparams.thread_invariant or self.hparams.compile or self.device.type != "cpu":
            return
        if not self.pointwise_hooks:
            self.pointwise_hooks = pointwise_as_matmul(self.classifier)
        if torch.backends.mkl.is_available() and not strict_mkl():
            rank_zero_warn(f"model.thread_invariant: MKL ran before it could be asked for sums that do not depend on "
                           f"the thread count, so maps may differ in their last bits between batch sizes and thread "
                           f"counts; set MKL_CBWR={MKL_STRICT} in the environment (or create the MaskExplainer before "
                           f"any matrix product)")

    @override
    def teardown(self, stage: str) -> None:
        """Leaves the classifier as it came (``explain`` hands the user's module back)."""
        for handle in [*(self.float32_hooks or []), *self.pointwise_hooks]:
            handle.remove()
        self.float32_hooks, self.pointwise_hooks = None, []
        self.pad_one_row = None  # probed again at the next fit's first step: it depends on the images' shape

    def deletion_ramp(self, slots: Tensor) -> Tensor:
        """The share of ``deletion_weight`` the items in pool ``slots`` get at their current step under
        ``deletion_warmup``, ``(k,)``."""
        return (self.pool.steps[slots].float() / self.hparams.deletion_warmup).clamp(max=1.0)

    @property
    def deletes_to_mean(self) -> bool:
        """Whether the deletion term removes to the mean colour rather than the masks' substrate."""
        return bool(self.hparams.deletion_weight) and self.hparams.deletion_substrate == "mean"

    @property
    def deletion_kind(self) -> str | None:
        """The deletion term's score where it is not the stage's own (``deletion_score``), else None."""
        if not self.hparams.deletion_weight or self.hparams.deletion_score == "same":
            return None
        return self.hparams.deletion_score

    def deletion_removal(self, kept: Tensor) -> Tensor:
        """How much of each pixel the deletion term removes, from the upsampled kept masks ``(k, H, W)``:
        ``deletion_floor``'s ramp where set, else ``deletion_edge``'s removal at ``deletion_threshold``."""
        threshold, width, floor = (self.hparams.deletion_threshold, self.hparams.deletion_edge_width,
                                   self.hparams.deletion_floor)
        if floor:
            return M.floored_removal(kept, threshold, width, floor)
        if self.hparams.deletion_edge == "smooth":
            return M.smooth_removal(kept, threshold)
        if threshold == 1:
            return kept
        return M.rounded_removal(kept, threshold, width) if width else M.removal(kept, threshold)

    def deletion_base(self, images: Tensor) -> Tensor:
        """What the deletion term's removed regions show: the items' substrate rows ``(k, C, H, W)``, or
        the mean colour as a 0-d zero (broadcast, so a step copies and allocates no image rows for it)."""
        if not self.deletes_to_mean:
            return self.substrate[images]
        if self.hparams.deletion_mix:
            return self.deletion_base_of(self.substrate[images])
        return self.substrate.new_zeros(())

    def deletion_base_of(self, substrate: Tensor) -> Tensor:
        """The mean colour (zeros) with ``deletion_mix`` of ``substrate`` blended in."""
        mix = self.hparams.deletion_mix
        return substrate * mix if mix else torch.zeros_like(substrate)

    @property
    def passes_per_step(self) -> int:
        """Classifier passes an item costs each step: its masked image, and the image without the
        kept regions where the deletion term is on."""
        return 2 if self.hparams.deletion_weight else 1

    def adam_eps(self, size: int) -> float:
        """Adam's ``ε`` for ``size×size`` masks (see ``relative_eps``)."""
        return self.hparams.relative_eps * self.hparams.sparsity_weight / size**2 or 1e-8

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

    # ---------------------------------------------------------------- classifier helpers
    def target_logit(self, images: Tensor, targets: Tensor, kind: str | Tensor | None = None) -> Tensor:
        """``f_c(x)`` (the class score: ``kind``, by default ``model.score``; a bool tensor picks
        ``log_odds`` per row, :func:`~hdm_lightning.masks.class_score`) for each image, float32, ``(N,)``. With
        ``compile`` or ``fixed_batch`` the batch is padded to a fixed size (the padding rows carry no
        gradient and are dropped)."""
        count = images.shape[0]
        if self.hparams.compile or self.hparams.fixed_batch:
            fixed = self.hparams.chunk_size or self.hparams.max_items
            padding = (-count) % fixed
            images = torch.cat([images, images.new_zeros((padding, *images.shape[1:]))]) if padding else images
        elif count == 1 and self.pad_one_row:  # a one-row pass would take other bits than a row among others
            images = torch.cat([images, torch.zeros_like(images)])
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        kind = self.hparams.score if kind is None else kind
        return M.class_score(self.forward_classifier(images)[:count], targets, kind)

    @property
    def mixed_scores(self) -> bool:
        """Whether stage 1 and the later stages keep different scores (``later_score``)."""
        return self.hparams.later_score not in (None, self.hparams.score)

    def score_of(self, stage: int) -> str:
        """The score the masks of ``stage`` (0-based) keep (``score``, ``later_score``)."""
        return self.hparams.score if stage == 0 or self.hparams.later_score is None else self.hparams.later_score

    def make_substrate(self, images: Tensor, kind: str = "") -> Tensor:
        """What a mask value of 0 shows, ``kind`` ``blur`` or ``mean`` (""; ``model.substrate``, whose
        ``auto`` starts from the blur)."""
        if (kind or self.hparams.substrate) == "mean":
            return torch.zeros_like(images)
        sigma = self.hparams.blur_sigma
        radius = min(int(3 * sigma), min(images.shape[-2:]) - 1)  # reflect padding needs radius < side
        return (1 - self.hparams.blur_fade) * gaussian_blur(images, kernel_size=2 * radius + 1, sigma=sigma)

    @override
    def train(self, mode: bool = True) -> MaskExplainer:
        super().train(mode)
        self.classifier.eval()  # frozen: BatchNorm and dropout never switch to training
        return self

    # ---------------------------------------------------------------- image rows
    def image_rows(self, capacity: int, shape: tuple[int, ...]) -> None:
        """Buffers of the images in flight (stage input, substrate, target, logits), ``capacity`` rows.

        Not saved: a resume rebuilds them from the images' states (:meth:`load_stage`).
        """
        if getattr(self, "stage_input", None) is not None and self.stage_input.shape == (capacity, *shape):
            return
        for name, row in (("stage_input", shape), ("substrate", shape)):
            self.register_buffer(name, torch.zeros(capacity, *row, device=self.device), persistent=False)
        self.register_buffer("target", torch.zeros(capacity, dtype=torch.long, device=self.device), persistent=False)
        self.register_buffer("log_odds", torch.zeros(capacity, dtype=torch.bool, device=self.device), persistent=False)
        for name in ("reference", "floor", "empty", "deletion_scale"):
            self.register_buffer(name, torch.zeros(capacity, device=self.device), persistent=False)

    def stage_input_of(self, state: ImageState) -> Tensor:
        """``x^(t)``: the image, or the image with the regions of the stages so far removed, ``(C, H, W)``."""
        if not state.stage_maps:
            return state.image
        found = M.cumulative(torch.stack(state.stage_maps)[:, None])  # C_t, (1, H, W)
        found = M.removal(found, self.hparams.removal_threshold)
        return M.remove_found(state.image[None], found, self.mean, self.std)[0]

    @torch.no_grad()
    def load_stage(self, state: ImageState, stage_input: Tensor | None = None, substrate: Tensor | None = None) -> None:
        """Fills the image's row for its current stage from its state (stage input, substrate, logits);
        ``begin_stage`` passes the stage input and substrate it already made, a resume rebuilds them."""
        stage_input = self.stage_input_of(state) if stage_input is None else stage_input
        self.stage_input[state.slot] = stage_input
        if substrate is None:
            substrate = self.make_substrate(stage_input[None], state.substrate)[0]
        self.substrate[state.slot] = substrate
        self.target[state.slot] = state.stage_target
        self.log_odds[state.slot] = self.score_of(state.stage) == "log_odds"
        self.reference[state.slot], self.floor[state.slot] = state.reference, state.floor
        self.empty[state.slot] = state.floor if state.empty is None else state.empty  # None: an older checkpoint
        scale = state.reference - state.floor if state.deletion_scale is None else state.deletion_scale
        self.deletion_scale[state.slot] = scale

    # ---------------------------------------------------------------- an image's method steps
    @torch.no_grad()
    def begin_image(self, key: int, name: str, path: str, slot: int, image: Tensor, target: int) -> ImageState:
        """A new image ``(C, H, W)``; a target of -1 becomes the model's top-1 class."""
        image = image.to(self.device)
        logits = self.classifier(image[None]).float()[0]  # (K,)
        if not -1 <= target < logits.shape[0]:
            raise ValueError(f"target {target} outside [0, {logits.shape[0]}) (-1: top-1 class)")
        target = int(logits.argmax()) if target < 0 else target
        targets = torch.tensor([target], device=self.device)
        score = M.class_score(logits[None], targets, self.hparams.score)[0]
        later = M.class_score(logits[None], targets, self.score_of(1))[0]
        substrate = self.choose_substrate(image, score, targets)
        pending_substrates = ["mean"] if self.hparams.substrate == "both" and substrate != "mean" else []
        return ImageState(key, name, path, slot, image, target, score, later_logit=later, substrate=substrate,
                          pending_substrates=pending_substrates)

    @torch.no_grad()
    def choose_substrate(self, image: Tensor, score: Tensor, target: Tensor) -> str:
        """The image's (first) substrate: ``model.substrate``, or under ``auto`` and ``both`` the blur
        unless the blurred image keeps more than ``blur_keeps`` of the class's evidence over the mean
        colour (issue 7: at 448 px a spotlight and a thimble kept their whole logit under the blur)."""
        if self.hparams.substrate not in ("auto", "both"):
            return self.hparams.substrate
        candidates = torch.stack([self.make_substrate(image[None], "blur")[0], torch.zeros_like(image)])
        blurred, mean = M.class_score(self.classifier(candidates).float(), target.expand(2), self.hparams.score)
        return "mean" if blurred - mean > self.hparams.blur_keeps * (score - mean) else "blur"

    @torch.no_grad()
    def begin_stage(self, state: ImageState) -> None:
        """Stage ``state.stage``: its target, ``f_c(x^(t))``, the floor, and its row; no item yet."""
        stage_input = self.stage_input_of(state)
        substrate = self.make_substrate(stage_input[None], state.substrate)[0]
        rows = [stage_input, substrate] + ([self.deletion_base_of(substrate)] if self.deletes_to_mean else [])
        logits = self.classifier(torch.stack(rows)).float()  # (2, K), (3, K) with the mean colour
        original = torch.tensor([state.target], device=self.device)
        target = original if state.stage == 0 else self.target_policy(logits[:1], original)
        state.stage_target = int(target[0])
        scores = M.class_score(logits, target.expand(len(rows)), self.score_of(state.stage))
        state.reference, state.floor, state.empty = scores[0], scores[1], scores[-1]
        if state.stage == 0:
            state.evidence = state.reference - state.floor
            later = M.class_score(logits[:2], target.expand(2), self.score_of(1))
            state.later_evidence = later[0] - later[1]  # the same evidence in the later stages' score
        elif self.hparams.evidence_scale == "image":  # the drop is then a share of stage 1's evidence
            state.floor = state.reference - (state.evidence if state.later_evidence is None else state.later_evidence)
        self.set_deletion_reference(state, logits, target)
        state.stage_sum = torch.zeros(stage_input.shape[-2:], device=self.device)
        state.previous = {}
        if self.hparams.start == "gradcam":
            state.start_map = gradcam_map(self.classifier, stage_input, state.stage_target, self.hparams.start_layer)
        self.load_stage(state, stage_input, substrate)

    def set_deletion_reference(self, state: ImageState, logits: Tensor, target: Tensor) -> None:
        """The deletion term's empty score and the evidence its share is of, from the stage's rows'
        ``logits`` (stage input, substrate[, mean colour]). In the stage's score: the stage's floor
        and evidence. In ``deletion_score``'s own score: the empty image's score, and the evidence over
        it (over the mean colour under ``deletion_substrate: mean``); later stages under
        ``evidence_scale image`` keep stage 1's."""
        if self.deletion_kind is None:
            state.deletion_scale = state.reference - state.floor
            return
        deletion_scores = M.class_score(logits, target.expand(len(logits)), self.deletion_kind)
        state.empty = deletion_scores[-1]
        if state.stage == 0 or self.hparams.evidence_scale != "image":
            state.deletion_scale = deletion_scores[0] - deletion_scores[-1]

    @torch.no_grad()
    def end_item(self, state: ImageState, item: Item, mask: Tensor, superimposed: Tensor,
                 loss: Tensor | None = None) -> None:
        """Level map ``M_l = minmax(Up(a_l) ⊙ M_{l-1})`` (without the minmax under ``map_scale=mask``)
        added to the stage sum (once per chain it stands for; under ``level_maps=last`` only for the
        chains it ends); ``P_l`` and ``M_l`` kept for the chains' next level. ``loss``, the item's last
        loss (0-d, on the device: no host sync), is added to the stage's final-loss accumulator."""
        if loss is not None:
            state.stage_loss = loss.detach().clone() if state.stage_loss is None else state.stage_loss + loss
            state.stage_items += 1
        chains = sharing(self.chains, item)
        previous = state.previous[item.chain][1][None] if item.level > 0 else None
        stretch = self.hparams.map_scale == "minmax"
        level_map = M.level_map(mask[None], previous, state.stage_sum.shape, stretch)[0]  # (H, W)
        state.stage_sum = state.stage_sum + len(self.counted_chains(item)) * level_map
        for chain in chains:
            state.previous[chain] = (superimposed, level_map)

    def counted_chains(self, item: Item) -> list[int]:
        """The chains whose stage sum an item's level map enters (see ``level_maps``)."""
        chains = sharing(self.chains, item)
        if self.hparams.level_maps == "all":
            return chains
        return [c for c in chains if len(self.chains[c].sizes) == item.level + 1]

    def start_of(self, state: ImageState, item: Item) -> Tensor | None:
        """The start of an item's mask ``(s, s)`` (``start``); None: the constant ``init_value``."""
        if state.start_map is None or (item.level > 0 and self.hparams.start_levels == "first"):
            return None
        return start_values(state.start_map, self.size_of(item), *self.hparams.start_range)

    def guide(self, state: ImageState, item: Item) -> Tensor | None:
        """``R_b(P_{l-1})`` of an item, ``(s, s)``; None at level 0."""
        if item.level == 0:
            return None
        return M.replicate(state.previous[item.chain][0], self.chains[item.chain].block)

    @torch.no_grad()
    def end_stage(self, state: ImageState) -> None:
        """Stage map ``S_t = minmax(Σ level maps)`` (``map_scale=mask``: their mean) appended to the
        image's maps, with ``f_c(x^(t))`` and the stage's final loss (the mean of its items' last
        losses, where they were given)."""
        if self.hparams.map_scale == "minmax":
            state.stage_maps.append(M.minmax(state.stage_sum[None])[0])
        else:  # the mean of the level maps summed
            summed = sum(len(c.sizes) for c in self.chains) if self.hparams.level_maps == "all" else len(self.chains)
            state.stage_maps.append(state.stage_sum / summed)
        state.references.append(state.reference)
        if state.stage_items:
            state.final_losses.append(state.stage_loss / state.stage_items)
        state.stage_sum, state.previous = None, {}
        state.stage_loss, state.stage_items = None, 0

    @torch.no_grad()
    def remaining_probability(self, state: ImageState) -> float:
        """Softmax probability of the image's class once every region found so far is removed
        (called after :meth:`end_stage`)."""
        probabilities = self.classifier(self.stage_input_of(state)[None]).float().softmax(dim=1)
        return float(probabilities[0, state.target])

    def fuse(self, state: ImageState) -> dict[str, Tensor]:
        """The fused map of an image whose stages are over, and the target logit on the image kept by it.

        The fusion gets the stages the image ran, ``(t, 1, H, W)`` (fewer than ``T`` where the
        stopping rule stopped it), and scores the evidence of the stages in the later stages' score
        (``later_score``: the score their masks kept); the masked logit is in ``score``, on the
        last pass's substrate. Under ``substrate: both`` the map is the min-max of the mean of the
        passes' maps, and stage ``t``'s map the mean of the passes' stage ``t`` maps. Last, the
        values up to the map's floor are scaled down (``map_floor``); ``floor`` is where it was cut.
        """
        fused = self.fuse_pass(state)
        if state.pass_maps:
            fused = M.minmax(torch.stack([*state.pass_maps, fused])[None].mean(dim=1))[0]
            stage_maps = [*state.pass_stage_maps, torch.stack(state.stage_maps)]
            depth = max(len(s) for s in stage_maps)
            stages = torch.stack([torch.stack([s[t] for s in stage_maps if len(s) > t]).mean(dim=0)
                                  for t in range(depth)])
        else:
            stages = torch.stack(state.stage_maps)
        with torch.no_grad():
            fused, floor, kept = M.floor_map(fused, partial(self.floor_views, state), self.hparams.map_floor)
        return {"map": fused, "stage_maps": stages, "masked_logit": kept[0], "floor": floor}

    def floor_views(self, state: ImageState, kept: Tensor) -> Tensor:
        """The target's scores on the images kept by ``kept`` ``(k, H, W)`` that the map's floor must not
        lower, ``(k, v)``: on the current substrate in ``score`` (what the masks kept) and, with the
        deletion term, on its base in its score (what the deletion term, and so the Average Drop and
        the deletion AUC, remove to: the mean colour in log-odds at the defaults); without a floor
        the first only (the masked logit of the index row)."""
        views = [self.pass_score(state, kept)]
        if self.hparams.map_floor and (self.deletes_to_mean or self.deletion_kind is not None):
            mean_colour = torch.zeros_like(state.image[None]) if self.deletes_to_mean else None
            views.append(self.pass_score(state, kept, self.deletion_kind or self.score_of(0), mean_colour))
        return torch.stack(views, dim=1)

    def pass_score(self, state: ImageState, kept: Tensor, kind: str | None = None, base: Tensor | None = None) -> Tensor:
        """The target's score on the image kept by each of ``kept`` ``(k, H, W)`` on ``base`` (None: the
        current substrate), ``(k,)``."""
        image = state.image[None]
        target = torch.full((len(kept),), state.target, device=self.device)
        base = self.make_substrate(image, state.substrate) if base is None else base
        return self.target_logit(M.apply_mask(image, kept, base), target, kind)

    def fuse_pass(self, state: ImageState) -> Tensor:
        """The fused map of the current pass's stages, ``(H, W)``."""
        stage_maps = torch.stack(state.stage_maps)[:, None]  # (t, 1, H, W)
        removal = partial(M.removal, threshold=self.hparams.removal_threshold)
        reference = state.logit if state.later_logit is None else state.later_logit
        later = partial(self.pass_score, state, kind=self.score_of(1))
        return self.fusion(stage_maps, later, reference[None], removal).detach()[0]

    def next_pass(self, state: ImageState) -> bool:
        """Under ``substrate: both``, keeps the finished pass's maps and begins the next substrate's first
        stage on the whole image; False when no pass is left."""
        if not state.pending_substrates:
            return False
        state.pass_maps.append(self.fuse_pass(state))
        state.pass_stage_maps.append(torch.stack(state.stage_maps))
        state.pass_substrates.append(state.substrate)
        state.substrate = state.pending_substrates.pop(0)
        state.stage, state.stage_maps, state.references, state.kept = 0, [], [], True
        state.final_losses = []  # the index row's final_loss: the last pass's stages
        self.begin_stage(state)
        return True

    # ---------------------------------------------------------------------- progress
    def progress(self) -> dict[str, Any]:
        """Images of this rank (total, done, failed) and the items in flight per stage and level."""
        in_flight: dict[str, int] = {}
        for item in self.pool.in_flight().values():
            key = f"stage{item.stage}/level{item.level}"
            in_flight[key] = in_flight.get(key, 0) + 1
        return {**self.counts, "in_flight": in_flight}

    # ------------------------------------------------------------------ checkpoints
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("classifier.")]:
            del state[key]
