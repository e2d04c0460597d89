"""Fusion of stage maps: which stages count, on a classifier whose evidence is known."""

import pytest
import torch

from hdm_lightning.fusion import EvidenceFusion, LearnedFusion, SumFusion, whole
from tests.helpers.region_model import REGION, RegionClassifier, region_slices

SPOT = region_slices(REGION)  # the class-1 logit rests on this square only
CORNER = (slice(None), slice(26, 32), slice(0, 6))


def scorer():
    """``score(kept)``: the class-1 logit of a bright square on ``SPOT`` over dim noise, kept by ``kept``."""
    classifier = RegionClassifier().eval()
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.2
    image[(slice(None), slice(None), *SPOT)] = 0.9

    def score(kept):
        return classifier(image * kept.unsqueeze(1))[:, 1]

    return score


def spot_scene():
    """Stage 1 found the deciding square, stage 2 (run once the evidence was gone) a corner."""
    stages = torch.zeros(2, 1, 32, 32)
    stages[0][(slice(None), *SPOT)] = 1.0
    stages[1][CORNER] = 1.0
    score = scorer()
    return stages, score, score(torch.ones(1, 32, 32))


def test_evidence_fusion_gives_a_stage_without_evidence_no_weight():
    stages, score, reference = spot_scene()
    weights = EvidenceFusion.weights(stages, score, reference)
    assert weights[0, 0] == pytest.approx(1.0, abs=1e-4)
    assert weights[1, 0] == pytest.approx(0.0, abs=1e-4)
    fused = EvidenceFusion()(stages, score, reference)
    assert fused[CORNER].max() == pytest.approx(0.0, abs=1e-4)
    assert fused[(slice(None), *SPOT)].mean() == pytest.approx(1.0)
    assert SumFusion()(stages, score, reference)[CORNER].mean() == pytest.approx(1.0)  # the pollution it fixes


def test_evidence_fusion_weights_stages_by_the_evidence_they_remove():
    # Two stages, each finding one half of the deciding square: each removes half the evidence.
    stages = torch.zeros(2, 1, 32, 32)
    rows, cols = SPOT
    middle = (rows.start + rows.stop) // 2
    stages[0][:, rows.start:middle, cols] = 1.0
    stages[1][:, middle:rows.stop, cols] = 1.0
    score = scorer()
    weights = EvidenceFusion.weights(stages, score, score(torch.ones(1, 32, 32)))
    assert weights[:, 0].tolist() == pytest.approx([0.5, 0.5], abs=1e-4)


def test_evidence_fusion_falls_back_to_equal_weights_without_evidence():
    stages = torch.rand(3, 2, 8, 8)
    fused = EvidenceFusion(anchored=False)(stages, lambda kept: torch.zeros(kept.shape[0]), torch.zeros(2))
    assert torch.allclose(fused, SumFusion()(stages, None, None))
    anchored = EvidenceFusion()(stages, lambda kept: torch.zeros(kept.shape[0]), torch.zeros(2))
    assert torch.allclose(anchored, SumFusion()(stages[:1], None, None))  # stage 1 alone


def test_learned_fusion_scale_follows_the_sparsity_term():
    stages, score, reference = spot_scene()
    light = LearnedFusion(steps=200, sparsity_weight=0.01)(stages, score, reference)
    heavy = LearnedFusion(steps=200, sparsity_weight=1.0)(stages, score, reference)
    assert light[(slice(None), *SPOT)].mean() > heavy[(slice(None), *SPOT)].mean() + 0.05


def test_evidence_fusion_weights_add_up_to_what_the_cumulative_map_removes():
    # A broad last stage covers everything at a low level: it counts for what it adds to the
    # method's cumulative removal C_T, not for all it covers.
    stages, score, reference = spot_scene()
    rows, cols = SPOT
    stages[0] = 0.0
    stages[0][:, rows, cols.start:(cols.start + cols.stop) // 2] = 1.0  # stage 1: half the square
    stages = torch.cat([stages, torch.full((1, 1, 32, 32), 0.3)])
    stages[2][(slice(None), *SPOT)] = 1.0  # stage 3: broad, brightest on the square
    from hdm_lightning.masks import cumulative
    weights = EvidenceFusion.weights(stages, score, reference)
    evidence = reference - score(torch.zeros(1, 32, 32))
    removed = (reference - score(1 - cumulative(stages))) / evidence
    assert weights[:, 0].sum() == pytest.approx(float(removed[0].clamp(0, 1)), abs=1e-4)
    assert weights[0, 0] == pytest.approx(0.5, abs=0.05)


def test_evidence_fusion_scores_the_stages_removal_as_the_stages_do():
    """With ``model.removal_threshold`` 0.5 a stage map at 0.5 on the deciding square removes it
    entirely, so that stage gets all the weight; under the soft removal it removes about half."""
    from functools import partial

    from hdm_lightning.masks import removal
    from hdm_lightning.module import ImageState, MaskExplainer

    stages, score, reference = spot_scene()
    stages[0] = 0.0
    stages[0][(slice(None), *SPOT)] = 0.5
    stages[0][0, 0, 0] = 1.0  # the map's maximum elsewhere: the square sits at 0.5 of C_1
    soft = EvidenceFusion.weights(stages, score, reference)
    hard = EvidenceFusion.weights(stages, score, reference, partial(removal, threshold=0.5))
    assert hard[0, 0] == pytest.approx(1.0, abs=1e-4) and soft[0, 0] < 0.9

    class Recording(SumFusion):
        def __call__(self, stage_maps, score, reference, removal=whole):
            self.removal = removal
            return super().__call__(stage_maps, score, reference, removal)

    model = MaskExplainer(classifier=RegionClassifier(), removal_threshold=0.5, fusion=Recording())
    image = torch.rand(3, 32, 32)
    state = ImageState(0, "x", "x", 0, image, 1, model.target_logit(image[None], torch.tensor([1]))[0],
                       stage_maps=[stages[0][0], stages[1][0]])
    model.fuse(state)  # the fusion is given the module's removal
    assert torch.equal(model.fusion.removal(torch.tensor([0.25, 0.5])), torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="model.removal_threshold"):
        MaskExplainer(classifier=RegionClassifier(), removal_threshold=0.0)


def test_anchored_fusion_keeps_stage_one_whole_and_adds_later_stages_by_their_evidence():
    """Stage 1's soft removal takes little evidence (the square sits at 0.1 of a map whose maximum
    is a stray pixel), stage 2 finds half the square: the evidence fusion lets stage 2 outweigh
    stage 1 ten to one; the anchored fusion keeps stage 1 at weight 1 and adds stage 2 at its ``w_2``."""
    stages, score, reference = spot_scene()
    rows, cols = SPOT
    middle = (rows.start + rows.stop) // 2
    stages[0] = 0.0
    stages[0][(slice(None), *SPOT)] = 0.1
    stages[0][0, 0, 0] = 1.0
    stages[1] = 0.0
    stages[1][:, middle:rows.stop, cols] = 1.0
    weights = EvidenceFusion.weights(stages, score, reference)
    assert weights[0, 0] < 0.15 and weights[1, 0] > 0.3
    anchored = EvidenceFusion()(stages, score, reference)
    expected = stages[0] + weights[1, 0] * stages[1]
    assert torch.allclose(anchored, (expected - expected.min()) / (expected.max() - expected.min()), atol=1e-6)
    plain = EvidenceFusion(anchored=False)(stages, score, reference)
    upper = (slice(None), slice(rows.start, middle), cols)
    assert anchored[upper].mean() > 2 * plain[upper].mean()  # stage 1's half of the square stays visible
    stages, score, reference = spot_scene()  # a later stage without evidence still counts for nothing
    assert EvidenceFusion()(stages, score, reference)[CORNER].max() == pytest.approx(0.0, abs=1e-4)
