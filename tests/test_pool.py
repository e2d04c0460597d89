"""The mask pool on its own, without a Trainer: items enter and leave, per-item optimiser state,
packing into classifier batches, convergence, and an item's independence of its pool-mates."""

import pytest
import torch
from torch import Tensor

from hdm_lightning import masks as M
from hdm_lightning.pool import (
    Convergence, Item, MaskPool, adam_step, cosine_lr, first_items, item_size, successors,
)
from tests.helpers.tiny import SIZE, SpotClassifier

CHAINS = M.build_chains([3, 4], [2, 3], 16)  # (3, 6, 12), (3, 9), (4, 8, 16), (4, 12)


def size_of(item: Item) -> int:
    return item_size(CHAINS, item)


@pytest.mark.parametrize(("item", "expected"), [
    (Item(0, 0, 0, 0), [(0, 1), (1, 1)]),  # the shared benchmark mask guides both chains of s0 = 3
    (Item(0, 0, 2, 0), [(2, 1), (3, 1)]),
    (Item(0, 0, 0, 1), [(0, 2)]),
    (Item(0, 0, 1, 1), []),  # the chain (3, 9) ends
    (Item(0, 0, 2, 2), []),
])
def test_successors_follow_the_chains(item, expected):
    assert [(s.chain, s.level) for s in successors(CHAINS, item)] == expected
    assert all((s.image, s.stage) == (item.image, item.stage) for s in successors(CHAINS, item))


def test_a_stage_walks_every_level_of_every_chain_once():
    seen, pending = [], first_items(CHAINS, image=4, stage=2)
    while pending:
        item = pending.pop(0)
        seen.append((item.chain, item.level))
        pending += successors(CHAINS, item)
    # level 0 once per benchmark size, then every chain's own levels: 2 + 4 + 2 = 8 optimisations
    assert sorted(seen) == [(0, 0), (0, 1), (0, 2), (1, 1), (2, 0), (2, 1), (2, 2), (3, 1)]


def test_items_enter_and_leave_with_fresh_state():
    pool = MaskPool([3, 6], capacity=3, init_value=0.5)
    first = pool.admit(Item(0, 0, 0, 0), 3)
    with torch.no_grad():
        pool.masks["3"][first] = 0.9
        pool.exp_avg_3[first] = 1.0
        pool.steps[first] = 7
    guide = torch.rand(6, 6)
    second = pool.admit(Item(1, 0, 0, 1), 6, guide)
    assert (len(pool), pool.free()) == (2, 1)
    mask, superimposed = pool.retire(first, 3)
    assert torch.all(mask == 0.9) and torch.equal(superimposed, mask)  # level 0: P_0 = a_0
    again = pool.admit(Item(2, 0, 2, 0), 3)
    assert again == first  # the freed row is reused, reset
    assert torch.all(pool.masks["3"][again] == 0.5) and torch.all(pool.exp_avg_3[again] == 0)
    assert pool.steps[again] == 0 and pool.best[again] == float("inf")
    torch.testing.assert_close(pool.guide_6[second], guide)
    assert pool.in_flight() == {0: Item(2, 0, 2, 0), 1: Item(1, 0, 0, 1)}


def test_chunks_split_the_items_by_chunk_size():
    pool = MaskPool([3, 4, 6], capacity=5, init_value=0.5)
    for image, (chain, level) in enumerate([(0, 0), (2, 0), (0, 1), (0, 0), (2, 0)]):  # sizes 3, 4, 6, 3, 4
        item = Item(image, 0, chain, level)
        pool.admit(item, size_of(item))
    whole = pool.chunks(size_of, None)
    assert len(whole) == 1 and sum(len(g.slots) for g in whole[0]) == 5
    parts = pool.chunks(size_of, 2)
    assert [sum(len(g.slots) for g in chunk) for chunk in parts] == [2, 2, 1]
    assert sorted(torch.cat([MaskPool.slots(c) for c in parts]).tolist()) == [0, 1, 2, 3, 4]
    assert all(len({g.size for g in chunk}) == len(chunk) for chunk in parts)  # one group per size


def test_adam_step_equals_torch_adam_for_each_item_at_its_own_step():
    torch.manual_seed(0)
    target = torch.rand(2, 3, 3)
    param = torch.full((2, 3, 3), 0.5)
    avg, avg_sq = torch.zeros_like(param), torch.zeros_like(param)
    steps = torch.tensor([0, 0])
    references = [torch.nn.Parameter(torch.full((3, 3), 0.5)) for _ in range(2)]
    optimisers = [torch.optim.Adam([p], lr=0.05) for p in references]
    for step in range(12):
        moving = [0, 1] if step >= 5 else [0]  # item 1 enters 5 steps later: its own step count
        grad = 2 * (param - target)
        rows = torch.tensor(moving)
        steps[rows] += 1
        new, avg[rows], avg_sq[rows] = adam_step(param[rows], grad[rows], avg[rows], avg_sq[rows], steps[rows], 0.05)
        param[rows] = new
        for i in moving:
            optimisers[i].zero_grad()
            references[i].grad = 2 * (references[i].detach() - target[i])
            optimisers[i].step()
    assert steps.tolist() == [12, 7]
    for i in range(2):
        torch.testing.assert_close(param[i], references[i].detach(), atol=1e-6, rtol=0)


def test_adam_step_takes_a_learning_rate_per_item():
    param, grad = torch.ones(2, 1, 1), torch.ones(2, 1, 1)
    new, _, _ = adam_step(param, grad, torch.zeros_like(param), torch.zeros_like(param), torch.tensor([1, 1]),
                          torch.tensor([0.1, 0.2]))
    torch.testing.assert_close(new.flatten(), torch.tensor([0.9, 0.8]))


@pytest.mark.parametrize(("losses", "expected_stop"), [
    ([1.0] * 8, 4),  # flat from the start: stops at its check after min_steps (since = 2 = patience)
    ([1.0 / (1 + s) for s in range(8)], 6),  # always improving: runs to max_steps
])
def test_an_item_is_checked_at_its_own_steps(losses, expected_stop):
    rule = Convergence(min_steps=4, max_steps=6, patience=2, min_delta=0.01, check_every=2)
    pool = MaskPool([3], capacity=2, init_value=0.5)
    other = pool.admit(Item(9, 0, 0, 0), 3)
    pool.step(size_of, lr=0.1, clamp=True)  # the other item is one step ahead
    slot = pool.admit(Item(0, 0, 0, 0), 3)
    for step in range(1, 9):
        with torch.no_grad():
            pool.loss[slot] = losses[step - 1]
            pool.loss[other] = 1.0
        pool.step(size_of, lr=0.1, clamp=True)
        assert pool.due(rule) == (rule.due(step) or rule.due(step + 1))
        stopped = pool.converged(rule)
        if slot in stopped:
            assert step == expected_stop
            return
    pytest.fail("the item never stopped")


def test_pool_state_round_trips_through_a_state_dict():
    pool = MaskPool([3, 6], capacity=2, init_value=0.5)
    pool.admit(Item(3, 1, 0, 1), 6, torch.rand(6, 6))
    pool.step(size_of, lr=0.1, clamp=True)
    restored = MaskPool([3, 6], capacity=2, init_value=0.5)
    restored.load_state_dict(pool.state_dict())
    assert restored.items == pool.items and restored.clock == 1 and restored.own_steps(0) == 1
    for key, value in pool.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, restored.state_dict()[key]), key
    with pytest.raises(ValueError, match="engine.max_items"):
        MaskPool([3, 6], capacity=3, init_value=0.5).load_state_dict(pool.state_dict())


# ------------------------------------------------------- an item alone and in a pool with others
def optimise(entries, steps: int, chunk_size=None):
    """Runs ``steps`` pool steps of HDM's loss on SpotClassifier; ``entries`` are (item, image, enters_at).

    Returns each entry's superimposed mask at the end. Pure torch, the way the module does it.
    """
    classifier = SpotClassifier().eval()
    pool = MaskPool([c for chain in CHAINS for c in chain.sizes], capacity=len(entries), init_value=0.5)
    images = torch.stack([image for _, image, _ in entries])  # (E, C, H, W)
    reference = classifier(images)[:, 1].detach()
    rows = {}
    for step in range(steps):
        for e, (item, _, enters_at) in enumerate(entries):
            if enters_at == step:
                rows[pool.admit(item, size_of(item))] = e
        for chunk in pool.chunks(size_of, chunk_size):
            owners = torch.tensor([rows[s] for s in MaskPool.slots(chunk).tolist()])
            kept = pool.kept(chunk, (SIZE, SIZE))
            logit = classifier(M.apply_mask(images[owners], kept, torch.zeros_like(images[owners])))[:, 1]
            sparsity = torch.cat([M.sparsity_loss(pool.trainable(g), 1.0) for g in chunk])
            loss = M.consistency_loss(logit, reference[owners], 1e-2) + sparsity
            loss.sum().backward()
            pool.record(chunk, loss)
        pool.step(size_of, lr=0.05, clamp=True)
        for mask in pool.masks.values():
            mask.grad = None
    return {e: pool.retire(slot, size_of(entries[e][0]))[1] for slot, e in rows.items()}


def test_one_item_alone_equals_the_same_item_in_a_pool_with_others():
    torch.manual_seed(0)
    pictures = torch.rand(4, 3, SIZE, SIZE) * 2 - 1
    pictures[0, :, 8:16, 18:26] = 1.0
    mine = (Item(0, 0, 0, 0), pictures[0], 0)
    others = [(Item(1, 0, 2, 0), pictures[1], 0), (Item(2, 0, 0, 0), pictures[2], 3),
              (Item(3, 0, 2, 0), pictures[3], 7)]
    alone = optimise([mine], steps=25)[0]
    crowded = optimise([others[0], mine, *others[1:]], steps=25, chunk_size=3)[1]
    assert not torch.equal(alone, torch.full_like(alone, 0.5))  # it did move
    torch.testing.assert_close(crowded, alone, atol=1e-5, rtol=0)


def test_an_eps_on_the_sparsity_scale_damps_steps_driven_by_tiny_gradients():
    """``model.relative_eps``: a gradient far below ``ε`` moves its element far less than ``lr``, a
    gradient far above it by about ``lr`` (Adam alone moves both by ``lr``)."""
    from hdm_lightning.module import MaskExplainer

    explainer = MaskExplainer(SpotClassifier(), benchmark_sizes=(4,), block_factors=(), relative_eps=1.0,
                              sparsity_weight=1.0)
    eps = explainer.adam_eps(4)
    assert eps == pytest.approx(1 / 16)
    grad = torch.tensor([[[eps * 1e-3, eps * 1e3]]])
    zeros = torch.zeros_like(grad)
    for epsilon, expected in ((1e-8, [0.1, 0.1]), (eps, [1e-4, 0.1])):
        new, _, _ = adam_step(torch.ones_like(grad), grad, zeros, zeros, torch.tensor([1]), 0.1, eps=epsilon)
        assert (1 - new).flatten().tolist() == pytest.approx(expected, rel=1e-2)
    assert MaskExplainer(SpotClassifier(), relative_eps=0.0).adam_eps(4) == 1e-8


def test_a_held_rate_stays_at_lr_then_decays_to_zero_by_the_horizon():
    """``model.lr_hold``: the first ``hold · T`` item steps run at ``lr``, the rest follow the cosine,
    ending at 0 at ``T``; a hold outside [0, 1) is refused, naming the setting."""
    from hdm_lightning.module import MaskExplainer

    steps = torch.arange(1, 42)
    rates = cosine_lr(0.05, steps, 40, hold=0.25)
    assert torch.all(rates[:11] == 0.05) and rates[11] < 0.05
    assert torch.all(rates[1:] <= rates[:-1]) and rates[40] == 0 and rates[39] > 0
    torch.testing.assert_close(cosine_lr(0.05, steps, 40, hold=0.0), cosine_lr(0.05, steps, 40))
    with pytest.raises(ValueError, match="model.lr_hold"):
        MaskExplainer(SpotClassifier(), lr_hold=1.0)


def push_then_pull(steps: int = 43, pull: float = 1e-3, **step_options) -> tuple[Tensor, Tensor]:
    """One 3×3 item: three steps of a large upward push on every element (the deletion term at the masks'
    start), then a small downward ``pull`` (the sparsity term); element (0, 0) is pushed up throughout.
    Returns the mask after the push and at the end."""
    pool = MaskPool([3], capacity=1, init_value=0.5)
    slot = pool.admit(Item(0, 0, 0, 0), 3)
    mask = pool.masks["3"]
    for step in range(steps):
        mask.grad = torch.full_like(mask, -1.0 if step < 3 else pull)
        mask.grad[slot, 0, 0] = -1.0
        pool.step(size_of, lr=0.05, clamp=True, **step_options)
        if step == 2:
            after_push = mask[slot].detach().clone()
    return after_push, mask[slot].detach().clone()


def test_shrink_lowers_an_element_that_adams_memory_of_a_large_gradient_holds():
    """``model.shrink`` (issue 7, stop 26): three steps of a large upward push (the deletion term at the
    masks' start), then 40 of a tiny downward one (the sparsity term). Adam's moments remember the large
    gradients: the momentum of the push outweighs the tiny gradient for about 50 steps and the second
    moment shrinks every later step, so the element keeps rising (to 1.0 here). The shrink step,
    outside that scaling, brings it to 0. An element that a large gradient holds up stays at 1 either
    way."""
    final = {shrink: push_then_pull(shrink=shrink)[1] for shrink in (0.0, 0.5)}
    assert final[0.0][1, 1] > 0.5  # measured: 0.65 after the push, 1.0 at the end
    assert final[0.5][1, 1] == 0.0
    assert final[0.0][0, 0] == final[0.5][0, 0] == 1.0


def test_a_restart_forgets_the_large_gradients_of_the_first_steps():
    """``model.deletion_restart`` (``MaskPool.step``'s ``adam_restart``; issue 7, stop 29): the same three
    steps of a large push, then the tiny pull. Adam started over after step 3 forgets the push: the pulled
    element falls to 0, while without the restart it keeps rising; an element that a large gradient holds
    up stays at 1 either way. The first three steps are Adam's own (the same mask after them), and the
    first restarted step is Adam's first: ``lr`` against the gradient's sign."""
    after_push, final = zip(*(push_then_pull(adam_restart=restart) for restart in (0, 3)))
    torch.testing.assert_close(after_push[0], after_push[1])
    first_restarted = push_then_pull(steps=4, adam_restart=3)[1]
    assert first_restarted[1, 1].item() == pytest.approx(after_push[1][1, 1].item() - 0.05)
    assert final[0][1, 1] > 0.5
    assert final[1][1, 1] == 0.0
    assert final[0][0, 0] == final[1][0, 0] == 1.0


def test_a_short_second_moment_lets_the_pull_act_after_the_push():
    """``model.adam_beta2`` (issue 7, stop 38): three steps of a large push, then a pull a tenth of its size.
    At β2 0.999 the bias-corrected second moment is the mean of every squared gradient so far, so the
    push shrinks each later step and the pulled element ends near where the push left it; at β2 0.9 the
    push is forgotten within tens of steps and the pull brings it well down. Under the push's constant
    gradient both give the same steps (the bias-corrected moment is its square either way); an element
    that a large gradient holds up stays at 1 either way."""
    runs = {beta2: push_then_pull(pull=0.1, betas=(0.9, beta2)) for beta2 in (0.999, 0.9)}
    torch.testing.assert_close(runs[0.999][0], runs[0.9][0])
    assert runs[0.9][1][1, 1] < runs[0.999][1][1, 1] - 0.2  # measured: 0.20 against 0.52
    assert runs[0.999][1][0, 0] == runs[0.9][1][0, 0] == 1.0
    from hdm_lightning.module import MaskExplainer

    with pytest.raises(ValueError, match="model.adam_beta2"):
        MaskExplainer(SpotClassifier(), adam_beta2=1.0)


def test_weight_decay_lowers_the_haze_and_keeps_the_order_of_its_faint_values():
    """``model.weight_decay`` (AdamW's decoupled decay, issue 7, stop 39): after the push and under the tiny
    pull, Adam's memory keeps the pushed element rising (1.0 here); the decay, outside Adam's scaling,
    brings it down (0.16), while an element that a large gradient pushes throughout stays near 1 (0.94).
    Faint values with no gradient shrink in proportion, so their order (which ranks the background for
    the deletion AUC) stays, where ``shrink`` sets them all to 0 alike."""
    final = {decay: push_then_pull(decay=decay)[1] for decay in (0.0, 1.0)}
    assert final[0.0][1, 1] > 0.5
    assert final[1.0][1, 1] < final[0.0][1, 1] - 0.5
    assert final[1.0][0, 0] > 0.9

    def faint(**options) -> Tensor:
        pool = MaskPool([3], capacity=1, init_value=0.5)
        slot = pool.admit(Item(0, 0, 0, 0), 3)
        mask = pool.masks["3"]
        with torch.no_grad():
            mask[slot] = torch.linspace(0.05, 0.45, 9).view(3, 3)
        for _ in range(20):
            mask.grad = torch.zeros_like(mask)
            pool.step(size_of, lr=0.05, clamp=True, **options)
        return mask[slot].detach().flatten()

    decayed = faint(decay=2.0)
    assert torch.all(decayed[1:] > decayed[:-1])  # the order stays
    torch.testing.assert_close(decayed / decayed[-1], torch.linspace(0.05, 0.45, 9) / 0.45)  # so do the ratios
    assert decayed[-1] < 0.45 * 0.2
    assert torch.all(faint(shrink=0.5) == 0)  # shrink ties them at 0
    from hdm_lightning.module import MaskExplainer

    with pytest.raises(ValueError, match="model.weight_decay"):
        MaskExplainer(SpotClassifier(), weight_decay=-1.0)


def test_sigmoid_masks_stay_inside_0_1_and_a_pull_never_ties_faint_values():
    """``model.mask_param: sigmoid``: the row holds the mask's logit θ, the mask is σ(θ). A pull that drives
    clamped masks to exactly 0 (where they tie, and the deletion and insertion curves order them by raster)
    lowers the sigmoid masks geometrically: below their start, above 0, in their first order."""
    def pulled(sigmoid: bool) -> Tensor:
        pool = MaskPool([3], capacity=1, init_value=0.5, sigmoid=sigmoid)
        slot = pool.admit(Item(0, 0, 0, 0), 3)
        mask = pool.masks["3"]
        start = torch.linspace(0.05, 0.45, 9).view(3, 3)
        with torch.no_grad():
            mask[slot] = torch.logit(start) if sigmoid else start
        for _ in range(40):
            mask.grad = torch.full_like(mask, 1e-3)
            pool.step(size_of, lr=0.2, clamp=not sigmoid)
        return pool.trainable(pool.chunks(size_of, None)[0][0]).detach()[0].flatten()

    sigmoid = pulled(True)
    assert torch.all(sigmoid > 0) and torch.all(sigmoid < torch.linspace(0.05, 0.45, 9) / 100)
    assert torch.all(sigmoid[1:] > sigmoid[:-1])
    assert torch.all(pulled(False) == 0)  # clamped, they tie at 0
    fresh = MaskPool([3], capacity=1, init_value=0.3, sigmoid=True)
    slot = fresh.admit(Item(0, 0, 0, 0), 3)
    torch.testing.assert_close(fresh.retire(slot, 3)[0], torch.full((3, 3), 0.3))
    from hdm_lightning.module import MaskExplainer

    with pytest.raises(ValueError, match="model.mask_param"):
        MaskExplainer(SpotClassifier(), mask_param="sigmoid", weight_decay=1.0)


def test_one_step_size_a_mask_keeps_the_gradients_proportions_and_does_not_amplify_noise():
    """``model.adam_scope=mask``: each element's step is divided by the root mean square of its mask's
    second moment, not its own. Two gradients that differ by float noise on elements whose gradient
    is tiny: Adam's own scaling moves those elements by about ``lr`` in the noise's direction (the
    runs part by about ``2·lr``); one step size a mask moves them in proportion to their gradient.
    A property of the step: on real photos at ``lr 1`` the maps part more under another batch shape,
    not less (issue 7, stop 41), because the mask's strongest elements jump to 0 or 1."""
    torch.manual_seed(0)
    strong = torch.zeros(1, 4, 4)
    strong[0, 0, 0] = 1.0
    noise = 1e-6 * torch.randn(2, 1, 4, 4)
    zeros = torch.zeros(1, 4, 4)

    def five_steps(scope: str, run: int) -> Tensor:
        param, avg, avg_sq = torch.full((1, 4, 4), 0.5), zeros, zeros
        for step in range(1, 6):
            param, avg, avg_sq = adam_step(param, strong + noise[run], avg, avg_sq, torch.tensor([step]), 0.05,
                                           scope=scope)
        return param

    element, mask = ([five_steps(scope, run) for run in range(2)] for scope in ("element", "mask"))
    assert (element[0] - element[1]).abs().max() > 0.15
    assert (mask[0] - mask[1]).abs().max() < 1e-5
    # the strong element: lr a step alone; lr · g / rms(g) = 4 lr under one step size for its 16 elements
    assert 0.5 - element[0][0, 0, 0] == pytest.approx(0.25, abs=1e-3)
    assert 0.5 - mask[0][0, 0, 0] == pytest.approx(1.0, abs=1e-3)
    from hdm_lightning.module import MaskExplainer

    with pytest.raises(ValueError, match="model.adam_scope"):
        MaskExplainer(SpotClassifier(), adam_scope="pixel")


def test_a_step_cap_bounds_the_mask_wide_steps_largest_jumps_and_keeps_the_small_ones_proportional():
    """``model.step_cap``: no element moves more than ``cap · lr`` a step. Under one step size a mask
    the strongest element of 16 would move ``4 · lr`` in the first step; capped at 0.25 it moves
    ``0.25 · lr``, while an element with a hundredth of its gradient still moves ``0.04 · lr`` (its
    share of the mask's root mean square), below the cap and unchanged by it."""
    grad = torch.zeros(1, 4, 4)
    grad[0, 0, 0], grad[0, 1, 1] = 1.0, 0.01
    zeros = torch.zeros(1, 4, 4)

    def first_step(cap: float) -> Tensor:
        param, _, _ = adam_step(torch.full((1, 4, 4), 0.5), grad, zeros, zeros, torch.tensor([1]), 0.1,
                                scope="mask", cap=cap)
        return 0.5 - param[0]

    free, capped = first_step(0.0), first_step(0.25)
    assert free[0, 0] == pytest.approx(0.4, rel=1e-3)
    assert capped[0, 0] == pytest.approx(0.025, rel=1e-3)
    assert capped[1, 1] == pytest.approx(0.004, rel=1e-2)
    assert capped[1, 1] == free[1, 1]
    from hdm_lightning.module import MaskExplainer

    with pytest.raises(ValueError, match="model.step_cap"):
        MaskExplainer(SpotClassifier(), step_cap=-1)


def test_a_gated_backward_keeps_the_earlier_gradient_and_adds_only_the_strong_part_of_its_own():
    """``model.deletion_gate``: what the first pass left in a row stays whole; of what the gated
    backward brings, an element far below the row's strongest gets nothing."""
    pool = MaskPool([2], capacity=2, init_value=0.5)
    pool.admit(Item(0, 0, 0, 0), 2)
    mask = pool.masks["2"]
    (mask * torch.tensor([[[1.0, 1.0], [1.0, 1.0]]])).sum().backward()  # the first pass: 1 everywhere
    strong_then_faint = torch.tensor([[[4.0, 0.05], [-3.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    pool.gated_backward(lambda: (mask * strong_then_faint).sum().backward(), 0.2)
    expected = torch.tensor([[[5.0, 1.0], [-2.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]])
    torch.testing.assert_close(mask.grad, expected)
