"""Known-answer tests of the mask maths (HDM-METHOD.md sections 1-3)."""

import pytest
import torch

from hdm_lightning import masks as M


def test_chain_sizes_match_the_reference_example():
    chains = M.build_chains([6, 7, 8, 9, 10, 11], [2, 3, 5], 50)
    assert len(chains) == 18
    # 18 benchmark + 24 auxiliary level optimisations in the original; we share the benchmark
    auxiliary = sum(len(c.sizes) - 1 for c in chains)
    assert auxiliary == 24
    assert chains[0].sizes == (6, 12, 24, 48)
    assert [c.sizes for c in chains if c.benchmark == 11] == [(11, 22, 44), (11, 33), (11,)]
    assert [len(M.chains_at_level(chains, level)) for level in range(4)] == [6, 17, 6, 1]


def test_chains_reject_block_factor_one():
    with pytest.raises(ValueError, match="block_factors"):
        M.build_chains([6], [1], 50)


def test_replicate_is_nearest_block_upsampling():
    mask = torch.arange(4.0).view(1, 2, 2)
    out = M.replicate(mask, 3)
    assert out.shape == (1, 6, 6)
    assert torch.equal(out[0, :3, :3], torch.zeros(3, 3))
    assert torch.equal(out[0, 3:, 3:], torch.full((3, 3), 3.0))


def test_superimposed_mask_is_zero_where_previous_level_is():
    previous = torch.tensor([[[1.0, 0.0], [0.5, 1.0]]])
    fine = torch.rand(1, 4, 4)
    p = M.superimpose(previous, fine, 2)
    assert torch.equal(p[0, :2, 2:], torch.zeros(2, 2))
    assert torch.allclose(p[0, 2:, :2], 0.5 * fine[0, 2:, :2])
    assert torch.equal(M.superimpose(None, fine, 2), fine)


def test_level_map_is_zero_wherever_previous_level_map_is():
    size = (32, 32)
    previous = M.level_map(torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]), None, size)
    current = M.level_map(torch.rand(1, 8, 8), previous, size)
    assert (previous == 0).sum() > 0
    assert torch.all(current[previous == 0] == 0)
    assert current.max() == pytest.approx(1.0)


def test_minmax_and_constant_map():
    maps = torch.stack([torch.tensor([[2.0, 4.0]]), torch.full((1, 2), 3.0)])
    out = M.minmax(maps)
    assert torch.equal(out[0], torch.tensor([[0.0, 1.0]]))
    assert torch.equal(out[1], torch.zeros(1, 2))


def test_losses_per_item():
    masked, reference = torch.tensor([1.0, 3.0]), torch.tensor([2.0, 3.0])
    assert torch.allclose(M.consistency_loss(masked, reference, 0.5), torch.tensor([0.5, 0.0]))
    a = torch.tensor([[[1.0, -1.0], [0.0, 0.0]], [[0.5, 0.5], [0.5, 0.5]]])
    assert torch.allclose(M.sparsity_loss(a, 2.0), torch.tensor([1.0, 1.0]))


def test_sparsity_gradient_reaches_only_the_trainable_level():
    previous = torch.rand(1, 3, 3, requires_grad=True)
    current = torch.rand(1, 6, 6, requires_grad=True)
    M.sparsity_loss(current, 1.0).sum().backward()
    assert previous.grad is None and current.grad is not None


def test_apply_mask_keeps_or_replaces_pixels():
    images = torch.randn(1, 3, 4, 4)
    baseline = torch.zeros_like(images)
    keep = torch.zeros(1, 4, 4)
    keep[:, :2] = 1
    out = M.apply_mask(images, keep, baseline)
    assert torch.equal(out[:, :, :2], images[:, :, :2])
    assert torch.equal(out[:, :, 2:], torch.zeros(1, 3, 2, 4))


def test_remove_found_zeroes_pixels_in_pixel_space():
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.2, 0.2])
    rgb = torch.rand(1, 3, 4, 4)
    images = (rgb - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    found = torch.zeros(1, 4, 4)
    found[0, 0, 0] = 1.0
    found[0, 1, 1] = 0.5
    out = M.remove_found(images, found, mean, std) * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)
    assert torch.allclose(out[0, :, 0, 0], torch.zeros(3), atol=1e-6)  # black in pixel space
    assert torch.allclose(out[0, :, 1, 1], rgb[0, :, 1, 1] * 0.5, atol=1e-6)
    assert torch.allclose(out[0, :, 3, 3], rgb[0, :, 3, 3], atol=1e-6)


def test_sum_maps_normalises_each_map_first():
    a = torch.tensor([[[0.0, 10.0, 5.0]]])
    b = torch.tensor([[[1.0, 0.0, 0.0]]])
    assert torch.equal(M.sum_maps(torch.stack([a, b])), torch.tensor([[[1.0, 1.0, 0.0]]]))


def test_log_odds_score_is_the_log_odds_of_the_softmax_probability():
    logits = torch.randn(5, 10, dtype=torch.float64) * 4
    targets = torch.arange(5)
    p = logits.softmax(1).gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(M.class_score(logits, targets, "log_odds").double(), (p / (1 - p)).log(),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(M.class_score(logits, targets, "logit"), logits.float().diagonal()[:5])


def test_smoothness_is_zero_on_constant_masks_and_pulls_a_spike_towards_its_neighbours():
    flat = torch.full((2, 5, 5), 0.3)
    assert torch.all(M.smoothness_loss(flat, 1.0) == 0)
    spike = torch.zeros(1, 5, 5)
    spike[0, 2, 2] = 1.0
    spike.requires_grad_(True)
    M.smoothness_loss(spike, 2.0).sum().backward()
    # four unit steps around the spike: 2 * 4 / 25; its gradient 2 * 2 * 4 / 25 lowers it, raises each neighbour
    assert M.smoothness_loss(spike, 2.0).item() == pytest.approx(8 / 25)
    assert spike.grad[0, 2, 2].item() == pytest.approx(16 / 25)
    assert spike.grad[0, 1, 2].item() == pytest.approx(-4 / 25)
    assert spike.grad[0, 0, 0].item() == 0


def test_floor_map_cuts_the_faint_values_the_classifier_does_not_need():
    """The object (0.6-1.0) carries the score, a context patch at 0.25 a little of it, the haze
    (0.03-0.08) none: the floor cuts the haze (to a thousandth, in its order) and stops below the
    context, whose cut would cost 2 > 0.05 · 18 (the evidence: the whole image's score over
    nothing's); what stays is unchanged, the map's order of pixels too, and the score returned is
    the cut map's."""
    fused = torch.zeros(8, 8)
    fused[:4, :4] = torch.linspace(0.6, 1.0, 16).view(4, 4)
    fused[6:, 6:] = 0.25
    fused[4:6] = 0.03 + 0.05 * torch.rand(2, 8, generator=torch.Generator().manual_seed(0))

    def score(kept):  # (k, 8, 8) -> (k, 1)
        return (kept[:, :4, :4].sum(dim=(1, 2)) + 8 * kept[:, 6:, 6:].flatten(1).mean(dim=1))[:, None]

    cut, floor, kept = M.floor_map(fused, score, 0.05)
    assert floor == 0.2
    assert torch.equal(cut[fused > floor], fused[fused > floor])
    assert torch.allclose(cut[fused <= floor], M.BELOW_FLOOR * fused[fused <= floor])
    assert cut[4:6].sum() < 1e-3 * fused[4:6].sum() + 1e-9 and torch.equal(cut[6:, 6:], fused[6:, 6:])
    order = lambda m: m.flatten().argsort(descending=True, stable=True)  # what deletion and insertion read
    assert torch.equal(order(cut), order(fused))
    assert torch.allclose(kept, score(cut[None])[0])
    assert M.floor_map(fused, score, 0.0)[:2] == (fused, 0.0)


def test_floor_map_keeps_what_any_view_needs():
    """Two views of the same cut (the masks' substrate, the deletion term's mean colour): the haze
    that the first view does not need but the second does stays."""
    fused = torch.tensor([[1.0, 0.08, 0.0]])

    def score(kept):
        return torch.stack([10 * kept[:, 0, 0], 10 * kept[:, 0, 0] + 20 * kept[:, 0, 1]], dim=1)

    assert M.floor_map(fused, score, 0.05)[1] == 0.05  # cutting 0.08 costs the second view 1.6 > 0.05 · 30
    assert M.floor_map(fused, lambda kept: score(kept)[:, :1], 0.05)[1] == 0.5  # the first view alone cuts it


def test_floor_map_stops_at_the_first_level_that_costs_too_much():
    """A score that drops when the values at 0.1 go and rises again once the 0.3 ones go too (a
    classifier is not monotone in what it sees) keeps the floor below 0.1: the search never jumps
    over a level that costs the class its evidence."""
    fused = torch.tensor([[1.0, 0.3, 0.1, 0.0]])

    def score(kept):
        return (10 * kept[:, 0, 0] + 5 * (kept[:, 0, 2] > 0.01) - 8 * (kept[:, 0, 1] > 0.01))[:, None]

    cut, floor, _ = M.floor_map(fused, score, 0.05)
    assert floor == 0.05 and torch.equal(cut, fused)


def test_smooth_removal_meets_the_hard_one_at_both_ends_with_no_kink_at_the_threshold():
    found = torch.linspace(0, 1, 101, requires_grad=True)
    smooth, hard = M.smooth_removal(found, 0.5), M.removal(found, 0.5)
    assert torch.equal(smooth[found >= 0.5], hard[found >= 0.5])  # all removed from the threshold on
    assert smooth[0] == hard[0] == 0
    assert bool((smooth >= hard).all())  # removes at least as much below the threshold
    (slope,) = torch.autograd.grad(smooth.sum(), found)
    assert slope[1] == pytest.approx(2 * (1 - 0.01 / 0.5) / 0.5)  # 2 / threshold near 0 ...
    assert slope[49] == pytest.approx(2 * (1 - 0.49 / 0.5) / 0.5, abs=1e-5)  # ... falling linearly ...
    assert slope[50:].abs().max() == 0  # ... to 0 at the threshold: no drop there


def test_rounded_removal_is_the_hard_one_outside_its_band_with_a_continuous_slope_inside():
    found = torch.linspace(0, 1, 101, dtype=torch.float64, requires_grad=True)
    rounded, hard = M.rounded_removal(found, 0.5, 0.2), M.removal(found, 0.5)
    outside = (found <= 0.4 + 1e-9) | (found >= 0.6 - 1e-9)  # x = found / 0.5 outside 1 ± 0.2
    assert torch.allclose(rounded[outside], hard[outside])
    assert bool((rounded <= hard + 1e-12).all()) and float(rounded[50]) == pytest.approx(1 - 0.2 / 4)
    (slope,) = torch.autograd.grad(rounded.sum(), found)
    assert float(slope[10]) == pytest.approx(2) and slope[60:].abs().max() == 0
    assert float(slope[50]) == pytest.approx(1)  # half of 1 / threshold at the threshold: falling linearly ...
    assert slope.diff()[1:].abs().max() < 0.11  # ... with no jump (a step of 0.01 moves it by 0.1 at most)


def test_floored_removal_removes_nothing_below_its_floor_and_ramps_to_the_threshold_without_jumps():
    found = torch.linspace(0, 1, 101, dtype=torch.float64, requires_grad=True)
    floored = M.floored_removal(found, 0.5, 0.2, 0.25)  # z = (found - 0.25) / 0.25, bands ±0.05 and 0.25 ± 0.05
    (slope,) = torch.autograd.grad(floored.sum(), found)
    assert floored[:20].abs().max() == 0 and slope[:20].abs().max() == 0  # below 0.2: untouched, no gradient
    assert float(floored[25]) == pytest.approx(0.2 / 4) and float(slope[25]) == pytest.approx(2)  # half of 1 / 0.25
    assert float(floored[35]) == pytest.approx(0.4) and float(slope[35]) == pytest.approx(4)  # the ramp's slope
    assert torch.allclose(floored[56:], torch.ones(45, dtype=torch.float64))  # whole from 0.55 on
    assert slope.diff().abs().max() < 0.81  # no jump: a step of 0.01 moves the slope by 4 · 0.01 / 0.05 at most
    assert torch.equal(M.floored_removal(found, 0.5, 0.0, 0.25), ((found - 0.25) / 0.25).clamp(0, 1))


def test_strong_part_keeps_each_rows_strong_gradient_and_drops_its_weak_part_without_jumps():
    """Each row is gated against its own largest element: a row of strong gradients does not silence
    another row's evidence, signs stay, and the weight rises from 0 to 1 between half the gate and it."""
    strong = torch.linspace(-1, 1, 201, dtype=torch.float64)
    grad = torch.stack([strong, strong * 1e-3]).view(2, 1, 201)  # the second row a thousand times weaker
    gated = M.strong_part(grad, 0.4)
    assert torch.allclose(gated[1], gated[0] * 1e-3)  # per row, not against the batch
    magnitude = strong.abs()
    assert torch.equal(gated[0, 0][magnitude >= 0.4], strong[magnitude >= 0.4])  # at the gate or above: whole
    assert gated[0, 0][magnitude <= 0.2].abs().max() == 0  # below half the gate: nothing
    assert float(gated[0, 0][130]) == pytest.approx(0.3 * 0.5)  # |g| 0.3: half its weight
    assert bool((gated.sign() * grad.sign() >= 0).all()) and bool((gated.abs() <= grad.abs()).all())
    assert gated[0, 0].diff().abs().max() < 0.03  # a step of 0.01 in g moves the gated one by 0.025 at most
