"""The items in flight: each (image, stage, chain, level) mask with its own optimiser state.

An :class:`Item` is the unit of optimisation (``HDM-METHOD.md`` section 2: one level of one chain
of one image in one stage). :class:`MaskPool` holds up to ``capacity`` items at once: one row of a
fixed-shape parameter tensor per mask size, the item's Adam moments and step count, its best loss
and patience counter. Every step the items in flight are packed into classifier batches
(:meth:`MaskPool.chunks`), and an item that has converged leaves at the next check, so it never
costs another pass. What follows an item (:func:`successors`) and when an image's stage is over is
decided from that image's items alone.

Pure torch: no Lightning, no files. Rows of different items never mix (the update is per row, the
loss a sum of per-item terms), so an item's arithmetic does not depend on which other items share
the pool, up to the float reassociation of a batched classifier pass.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from hdm_lightning.masks import Chain, chains_at_level, strong_part, upsample


@dataclass(frozen=True)
class Item:
    """One level optimisation: ``image`` (a key), ``stage`` ``t``, ``chain`` index and ``level`` ``l``."""

    image: int
    stage: int
    chain: int
    level: int


# ------------------------------------------------------------------------------- the plan
def first_items(chains: list[Chain], image: int, stage: int) -> list[Item]:
    """Level 0 of a stage: one item per benchmark size (chains of one ``s0`` share it).

    Example:
        >>> from hdm_lightning.masks import build_chains
        >>> first_items(build_chains([3, 4], [2, 3], 16), image=5, stage=1)
        [Item(image=5, stage=1, chain=0, level=0), Item(image=5, stage=1, chain=2, level=0)]
    """
    return [Item(image, stage, c, 0) for c in chains_at_level(chains, 0)]


def sharing(chains: list[Chain], item: Item) -> list[int]:
    """The chains whose level ``item.level`` is this item: all chains of its ``s0`` at level 0."""
    if item.level > 0:
        return [item.chain]
    return [i for i, c in enumerate(chains) if c.benchmark == chains[item.chain].benchmark]


def successors(chains: list[Chain], item: Item) -> list[Item]:
    """The items that start when ``item`` ends: the next level of every chain it guides.

    Example:
        >>> from hdm_lightning.masks import build_chains
        >>> chains = build_chains([3], [2, 3], 16)  # (3, 6, 12), (3, 9)
        >>> successors(chains, Item(0, 0, 0, 0))
        [Item(image=0, stage=0, chain=0, level=1), Item(image=0, stage=0, chain=1, level=1)]
        >>> successors(chains, Item(0, 0, 1, 1))
        []
    """
    following = [c for c in sharing(chains, item) if len(chains[c].sizes) > item.level + 1]
    return [Item(item.image, item.stage, c, item.level + 1) for c in following]


def item_size(chains: list[Chain], item: Item) -> int:
    return chains[item.chain].sizes[item.level]


# ------------------------------------------------------------------- per-item maths
def adam_step(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor, lr: Tensor | float,
    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, scope: str = "element", cap: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Adam (Kingma & Ba) with one step count (and optionally one learning rate) per item.

    Shapes: ``param``, ``grad`` and the moments ``(k, s, s)``; ``step`` ``(k,)``, the items' step
    numbers after this step (1 for the first); ``lr`` a float or ``(k,)``. ``scope="mask"`` divides
    every element's step by the root mean square of its whole mask's second moment instead of its own
    (one step size a mask, as Adafactor-like and normalised-gradient methods; the steps keep the
    gradient's proportions). ``cap > 0`` bounds every element's step by ``cap · lr`` (the mask-wide
    step's largest elements would otherwise jump to 0 or 1 at once). Returns the new parameter and
    moments; nothing is changed in place.

    Example:
        >>> p, m, v = adam_step(torch.ones(2, 1, 1), torch.tensor([[[1.]], [[-2.]]]), torch.zeros(2, 1, 1),
        ...                     torch.zeros(2, 1, 1), torch.tensor([1, 1]), lr=0.1)
        >>> p.flatten()  # the first Adam step moves each element by lr against the gradient's sign
        tensor([0.9000, 1.1000])
    """
    beta1, beta2 = betas
    step = step.double()[:, None, None]  # (k, 1, 1); bias corrections in float64, as torch.optim.Adam
    lr = per_item(lr, param, torch.float64)
    step_size = (lr / (1 - beta1**step)).to(param.dtype)
    correction2_sqrt = (1 - beta2**step).sqrt().to(param.dtype)
    exp_avg = exp_avg.lerp(grad, 1 - beta1)
    exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * grad * grad
    second = exp_avg_sq.mean((-2, -1), keepdim=True) if scope == "mask" else exp_avg_sq
    denominator = second.sqrt() / correction2_sqrt + eps
    update = step_size * (exp_avg / denominator)
    if cap:
        bound = (cap * lr).to(param.dtype)
        update = update.clamp(-bound, bound)
    return param - update, exp_avg, exp_avg_sq


def shrink_step(mask: Tensor, lr: Tensor | float, shrink: float) -> Tensor:
    """Every element lowered by ``shrink · lr`` (``lr`` a float or ``(k,)``, one per item): the
    proximal step of an L1 penalty on masks kept non-negative.

    Adam steps by the history of each element's gradients: after a few large upward gradients (the
    deletion term in its first steps, while the masks are still at their start) the momentum keeps
    raising the element for tens of steps against the small sparsity gradient, and the second moment
    makes that gradient's own steps tiny, so the raised elements stay as a faint haze over the
    image (issue 7, stop 26). This fall is outside Adam's scaling: the same in every step.

    Example:
        >>> shrink_step(torch.full((2, 1, 1), 0.5), torch.tensor([0.1, 0.2]), 0.5).flatten()
        tensor([0.4500, 0.4000])
    """
    return mask - shrink * per_item(lr, mask, mask.dtype)


def decay_step(new: Tensor, old: Tensor, lr: Tensor | float, decay: float) -> Tensor:
    """Adam's step ``new`` with the decoupled weight decay of AdamW (Loshchilov & Hutter): every element
    lowered by ``decay · lr`` times its value before the step (``lr`` a float or ``(k,)``, one per item).

    A fall in proportion to the value, outside Adam's per-element scaling: the faint values that the
    deletion term's first steps raise over the image (issue 7's haze) shrink geometrically, while their
    order, which ranks the background for the deletion AUC, stays (unlike :func:`shrink_step`, which
    sets them to 0 alike). An element that a gradient holds up rises by Adam's steps of about ``lr``
    against a fall of ``decay · lr · a``: at ``decay`` ≤ 1 it still nears 1 (0.94 after 43 steps at 1).

    Example:
        >>> decay_step(torch.full((2, 1, 1), 0.5), torch.full((2, 1, 1), 0.4), torch.tensor([0.1, 0.2]), 1.0).flatten()
        tensor([0.4600, 0.4200])
    """
    return new - decay * per_item(lr, old, old.dtype) * old


def restarted(exp_avg: Tensor, exp_avg_sq: Tensor, steps: Tensor, after: int) -> tuple[tuple[Tensor, Tensor], Tensor]:
    """Adam's moments and step counts for this step when Adam starts over after each item's step
    ``after`` (0: never): the moments of the items at step ``after + 1`` zeroed, and every later step
    counted from the restart, so that the bias correction starts over too. ``steps`` ``(k,)`` are the
    items' step numbers of this step.

    With the deletion term the masks' first steps see gradients far larger than any later: at their
    start (0.5 everywhere) the image without the kept regions still shows half the class, and every
    element whose removal lowers the class at all is raised. Adam's moments remember those steps (the
    momentum keeps raising the elements, the second moment makes the sparsity term's steps tiny), and
    the raised elements stay as a faint haze over the image (issue 7, stop 26). Starting over after
    those steps forgets them, and the sparsity term's own steps lower the haze (on the 224-px mosaics
    to about half; what is left is the deletion term's own balance against the sparsity term).

    Example:
        >>> (m, v), steps = restarted(torch.ones(3, 1, 1), torch.ones(3, 1, 1), torch.tensor([3, 4, 5]), 3)
        >>> m.flatten().tolist(), steps.tolist()
        ([1.0, 0.0, 1.0], [3, 1, 2])
    """
    if not after:
        return (exp_avg, exp_avg_sq), steps
    again = (steps == after + 1)[:, None, None]
    moments = (torch.where(again, 0.0, exp_avg), torch.where(again, 0.0, exp_avg_sq))
    return moments, torch.where(steps > after, steps - after, steps)


def per_item(value: Tensor | float, like: Tensor, dtype: torch.dtype) -> Tensor:
    """``value`` (one float, or one per item ``(k,)``) as a tensor that broadcasts over ``like``'s
    ``(k, s, s)`` rows."""
    value = torch.as_tensor(value, dtype=dtype, device=like.device)
    return value[:, None, None] if value.ndim else value


def cosine_lr(lr: float, step: Tensor, horizon: int, hold: float = 0.0) -> Tensor:
    """Per-item learning rate ``lr`` for the first ``H = hold · T`` item steps, then
    ``lr · (1 + cos(π (t − 1 − H) / (T − H))) / 2`` at item step ``t`` (1 for the first), flat at its
    last value after ``T = horizon``; ``(k,)`` steps -> ``(k,)`` rates.

    Adam moves every mask element by about ``lr`` a step whatever its gradient, so a constant rate
    leaves the masks wandering at the end of a level, and float noise (another batch, bf16, another
    device) sends them to different places; decaying the rate lets each mask settle (issue 7).

    Example:
        >>> cosine_lr(0.1, torch.tensor([1, 3, 5, 9]), 4)
        tensor([0.1000, 0.0500, 0.0000, 0.0000], dtype=torch.float64)
        >>> cosine_lr(0.1, torch.tensor([1, 3, 4, 5]), 4, hold=0.5)
        tensor([0.1000, 0.1000, 0.0500, 0.0000], dtype=torch.float64)
    """
    held = hold * horizon
    progress = (step.double() - 1 - held).clamp(0, horizon - held) / max(horizon - held, 1e-12)
    return lr * (1 + torch.cos(torch.pi * progress)) / 2


def constant_lr(lr: float, step: Tensor) -> float:
    """The rate ``lr`` at every item step (the reference's schedule)."""
    return lr


def update_patience(best: Tensor, since: Tensor, loss: Tensor, min_delta: float, elapsed: Tensor) -> tuple[Tensor, Tensor]:
    """Best loss so far and steps since it improved by more than ``min_delta`` (relative), per item.

    Example:
        >>> best, since = update_patience(torch.tensor([1.0, 1.0]), torch.tensor([0, 0]),
        ...                               torch.tensor([0.5, 0.9999]), 1e-3, torch.tensor([50, 50]))
        >>> best, since
        (tensor([0.5000, 1.0000]), tensor([ 0, 50]))
    """
    improved = loss < best * (1 - min_delta)
    return torch.where(improved, loss, best), torch.where(improved, torch.zeros_like(since), since + elapsed)


@dataclass(frozen=True)
class Convergence:
    """When an item stops: after ``min_steps`` once its loss has not improved by ``min_delta``
    (relative) for ``patience`` steps, or at ``max_steps``; checked every ``check_every`` of its steps."""

    min_steps: int
    max_steps: int
    patience: int
    min_delta: float
    check_every: int

    def due(self, steps: int) -> bool:
        """Whether an item that has taken ``steps`` steps is checked now."""
        return steps > 0 and (steps % self.check_every == 0 or steps >= self.max_steps)


@dataclass(frozen=True)
class Group:
    """Items of one mask size inside a chunk: their pool rows ``slots`` (a device tensor)."""

    size: int
    slots: Tensor


# ------------------------------------------------------------------------------ the pool
class MaskPool(nn.Module):
    """Up to ``capacity`` items, each a row of the parameter of its mask size.

    Args:
        sizes: every mask size an item can have.
        capacity: most items in flight (``engine.max_items``).
        init_value: initial value of every mask element.
        sigmoid: the parameter of a row is the mask's logit ``θ`` and the mask ``a = σ(θ)``
            (``model.mask_param: sigmoid``) rather than the mask itself.
    """

    def __init__(self, sizes: list[int], capacity: int, init_value: float, sigmoid: bool = False) -> None:
        super().__init__()
        if capacity < 1:
            raise ValueError(f"engine.max_items must be >= 1, got {capacity}")
        if sigmoid and not 0 < init_value < 1:
            raise ValueError(f"model.init_value must be in (0, 1) under model.mask_param sigmoid, got {init_value}")
        self.capacity, self.init_value, self.sigmoid = capacity, init_value, sigmoid
        self.start = float(torch.logit(torch.tensor(init_value))) if sigmoid else init_value  # a new row's parameter
        self.sizes = sorted(set(sizes))
        self.masks = nn.ParameterDict({str(s): nn.Parameter(torch.zeros(capacity, s, s)) for s in self.sizes})
        for s in self.sizes:  # R_b(P_{l-1}) of each row (ones at level 0) and its Adam moments
            for name in ("guide", "exp_avg", "exp_avg_sq"):
                self.register_buffer(f"{name}_{s}", torch.zeros(capacity, s, s))
        self.register_buffer("steps", torch.zeros(capacity, dtype=torch.long))
        self.register_buffer("loss", torch.zeros(capacity))
        self.register_buffer("best", torch.full((capacity,), float("inf")))
        self.register_buffer("since", torch.zeros(capacity, dtype=torch.long))
        self.register_buffer("checked", torch.zeros(capacity, dtype=torch.long))  # own step of the last check
        self.items: list[Item | None] = [None] * capacity
        self.admitted: list[int] = [0] * capacity  # value of ``clock`` when each row's item entered
        self.clock = 0  # optimiser steps taken by the pool
        self._packing: list[tuple[int, int]] | None = None  # (size, slot) of the items, in batch order
        self._chunks: dict = {}  # chunk_size -> chunks, and None -> rows per size: rebuilt when items change

    # ------------------------------------------------------------------ membership
    def __len__(self) -> int:
        return sum(item is not None for item in self.items)

    def free(self) -> int:
        return self.capacity - len(self)

    def in_flight(self) -> dict[int, Item]:
        return {slot: item for slot, item in enumerate(self.items) if item is not None}

    def own_steps(self, slot: int) -> int:
        """Steps the item in ``slot`` has taken (known on the host: every item steps every step)."""
        return self.clock - self.admitted[slot]

    @torch.no_grad()
    def admit(self, item: Item, size: int, guide: Tensor | None = None, start: Tensor | None = None) -> int:
        """Puts ``item`` (mask size ``size``; ``guide`` ``R_b(P_{l-1})``, None at level 0) in a free row,
        its mask at ``start`` ``(s, s)`` in ``[0, 1]`` (None: ``init_value`` everywhere)."""
        slot = self.items.index(None)
        if start is None:
            self.masks[str(size)][slot] = self.start
        else:
            self.masks[str(size)][slot] = torch.logit(start.clamp(1e-3, 1 - 1e-3)) if self.sigmoid else start
        getattr(self, f"guide_{size}")[slot] = 1.0 if guide is None else guide
        getattr(self, f"exp_avg_{size}")[slot] = 0.0
        getattr(self, f"exp_avg_sq_{size}")[slot] = 0.0
        for name, value in (("steps", 0), ("loss", 0.0), ("best", float("inf")), ("since", 0), ("checked", 0)):
            getattr(self, name)[slot] = value
        self.items[slot], self.admitted[slot] = item, self.clock
        self.changed()
        return slot

    def changed(self) -> None:
        """Forgets the packing: the items in flight changed (the only time index tensors are built)."""
        self._packing, self._chunks = None, {}

    @torch.no_grad()
    def retire(self, slot: int, size: int) -> tuple[Tensor, Tensor]:
        """Frees ``slot``; returns its trainable mask ``a_l`` and superimposed mask ``P_l``, ``(s, s)``."""
        mask = self.as_mask(self.masks[str(size)][slot].detach().clone())
        superimposed = getattr(self, f"guide_{size}")[slot] * mask
        self.items[slot] = None
        self.changed()
        return mask, superimposed

    # -------------------------------------------------------------------- packing
    def packing(self, size_of) -> list[tuple[int, int]]:
        """``(size, slot)`` of every item in flight, grouped by size: the batch order."""
        if self._packing is None:
            self._packing = sorted((size_of(item), slot) for slot, item in self.in_flight().items())
        return self._packing

    def chunks(self, size_of, chunk_size: int | None) -> list[list[Group]]:
        """The items in flight in classifier batches of at most ``chunk_size`` items (cached)."""
        if chunk_size not in self._chunks:
            self._chunks[chunk_size] = self.split(self.packing(size_of), chunk_size)
        return self._chunks[chunk_size]

    def split(self, order: list[tuple[int, int]], chunk_size: int | None) -> list[list[Group]]:
        per_chunk = chunk_size or max(1, len(order))
        device = self.steps.device
        chunks = []
        for start in range(0, len(order), per_chunk):
            part = order[start : start + per_chunk]
            sizes = sorted({s for s, _ in part})
            chunks.append([Group(s, torch.tensor([slot for size, slot in part if size == s], device=device))
                           for s in sizes])
        return chunks

    def trainable(self, group: Group) -> Tensor:
        """``a_l`` of the group's items, ``(k, s, s)`` (differentiable)."""
        return self.as_mask(self.masks[str(group.size)][group.slots])

    def as_mask(self, param: Tensor) -> Tensor:
        """The masks ``a`` that parameters are: themselves, or ``σ(θ)`` under ``sigmoid``."""
        return torch.sigmoid(param) if self.sigmoid else param

    def superimposed(self, group: Group) -> Tensor:
        """``P_l = R_b(P_{l-1}) ⊙ a_l`` of the group's items, ``(k, s, s)`` (``masks.superimpose``, with
        ``R_b(P_{l-1})`` replicated once when the item entered)."""
        return getattr(self, f"guide_{group.size}")[group.slots] * self.trainable(group)

    def kept(self, chunk: list[Group], size: tuple[int, int]) -> Tensor:
        """``Up(P_l)`` of the chunk's items in batch order, float32 ``(k, H, W)``."""
        return torch.cat([upsample(self.superimposed(group), size) for group in chunk])

    def gated_backward(self, backward: Callable[[], None], gate: float) -> None:
        """Runs ``backward`` and adds to each row's gradient only the strong part of what it brings
        (:func:`~hdm_lightning.masks.strong_part`: the deletion term's ``model.deletion_gate``)."""
        before = {size: mask.grad for size, mask in self.masks.items()}
        for mask in self.masks.values():
            mask.grad = None
        backward()
        for size, mask in self.masks.items():
            if mask.grad is None:
                mask.grad = before[size]
            else:
                mask.grad = strong_part(mask.grad, gate) + (0 if before[size] is None else before[size])

    @staticmethod
    def slots(chunk: list[Group]) -> Tensor:
        return torch.cat([group.slots for group in chunk])

    @torch.no_grad()
    def record(self, chunk: list[Group], losses: Tensor) -> None:
        self.loss[self.slots(chunk)] = losses.detach().float()

    # ------------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, size_of, lr: float, clamp: bool, rate: Callable[[float, Tensor], Tensor | float] = constant_lr,
             betas: tuple[float, float] = (0.9, 0.999), eps: float | Callable[[int], float] = 1e-8,
             shrink: float = 0.0, adam_restart: int = 0, decay: float = 0.0, scope: str = "element",
             cap: float = 0.0) -> None:
        """One Adam step of every item in flight (:func:`adam_step`; started over after each item's
        step ``adam_restart``, :func:`restarted`), a fall of every element by ``decay`` times the item's
        rate times its value (:func:`decay_step`) and by ``shrink`` times the rate (:func:`shrink_step`),
        then the projection onto [0, 1].

        ``rate(lr, steps)`` gives each item's rate from its own step count (:func:`constant_lr`,
        :func:`cosine_lr`); ``eps`` may depend on the mask size."""
        if "rows" not in self._chunks:
            self._chunks["rows"] = [(g.size, g.slots) for g in self.split(self.packing(size_of), None)[0]] \
                if len(self) else []
        for size, rows in self._chunks["rows"]:  # (k,) rows of each size
            mask = self.masks[str(size)]
            grad = mask.grad[rows] if mask.grad is not None else torch.zeros_like(mask[rows])
            self.steps[rows] += 1
            avg, avg_sq = getattr(self, f"exp_avg_{size}"), getattr(self, f"exp_avg_sq_{size}")
            steps = self.steps[rows]
            rates = rate(lr, steps)
            moments, steps = restarted(avg[rows], avg_sq[rows], steps, adam_restart)
            old = mask[rows]
            new, avg[rows], avg_sq[rows] = adam_step(old, grad, *moments, steps,
                                                     rates, betas, eps(size) if callable(eps) else eps, scope, cap)
            new = decay_step(new, old, rates, decay) if decay else new
            new = shrink_step(new, rates, shrink) if shrink else new
            mask[rows] = new.clamp(0, 1) if clamp else new
        self.clock += 1

    # ---------------------------------------------------------------- convergence
    def due(self, rule: Convergence) -> bool:
        """Whether any item is checked after this step (host arithmetic only: no device sync)."""
        return any(rule.due(self.own_steps(slot)) for slot in self.in_flight())

    @torch.no_grad()
    def converged(self, rule: Convergence) -> list[int]:
        """Rows whose item stops now (one host sync). Only items at their own check step are looked at."""
        slots = [slot for slot in self.in_flight() if rule.due(self.own_steps(slot))]
        if not slots:
            return []
        rows = torch.tensor(slots, device=self.steps.device)
        steps = self.steps[rows]
        elapsed = steps - self.checked[rows]
        best, since = update_patience(self.best[rows], self.since[rows], self.loss[rows], rule.min_delta, elapsed)
        self.best[rows], self.since[rows], self.checked[rows] = best, since, steps
        stop = ((steps >= rule.min_steps) & (since >= rule.patience)) | (steps >= rule.max_steps)
        return [slot for slot, done in zip(slots, stop.tolist()) if done]

    # ------------------------------------------------------------------ checkpoints
    def get_extra_state(self) -> dict:
        return {"items": [None if i is None else astuple(i) for i in self.items], "admitted": list(self.admitted),
                "clock": self.clock}

    def set_extra_state(self, state: dict) -> None:
        if len(state["items"]) != self.capacity:
            raise ValueError(f"the checkpoint's pool holds {len(state['items'])} rows, engine.max_items is "
                             f"{self.capacity}; resume with the run's engine.max_items")
        self.items = [None if i is None else Item(*i) for i in state["items"]]
        self.admitted, self.clock = list(state["admitted"]), state["clock"]
        self.changed()


class ItemAdam(torch.optim.Optimizer):
    """The optimiser Lightning drives: its step is :meth:`MaskPool.step` (per-item Adam).

    The moments live in the pool's rows, so the optimiser itself holds no state; being a real
    ``Optimizer`` lets the precision plugin unscale gradients (16-mixed) and Lightning count steps.
    """

    def __init__(self, pool: MaskPool, size_of, lr: float, clamp: bool,
                 rate: Callable[[float, Tensor], Tensor | float] = constant_lr,
                 eps: float | Callable[[int], float] = 1e-8, betas: tuple[float, float] = (0.9, 0.999),
                 shrink: float = 0.0, adam_restart: int = 0, decay: float = 0.0, scope: str = "element",
                 cap: float = 0.0) -> None:
        super().__init__(list(pool.masks.values()), {"lr": lr})
        self.pool, self.size_of, self.clamp, self.rate, self.eps, self.betas = pool, size_of, clamp, rate, eps, betas
        self.shrink, self.adam_restart, self.decay, self.scope, self.cap = shrink, adam_restart, decay, scope, cap

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.pool.step(self.size_of, self.param_groups[0]["lr"], self.clamp, self.rate, betas=self.betas, eps=self.eps,
                       shrink=self.shrink, adam_restart=self.adam_restart, decay=self.decay, scope=self.scope,
                       cap=self.cap)
        return loss
