"""Step 1 of CBPT: invert the trigger by contrastive learning, from clean shots only.

Each restart optimises a dummy trigger (`cbpt.trigger`) from a random start. The loss pulls
the triggered features together and away from the clean ones
(`losses.contrastive_inversion_loss`), plus lambda times the trigger's size; lambda rises
while the triggered features are collapsed and falls while they are not, so the final
trigger is about as small as collapse allows (docs/method.md#trigger-inversion).

Mask restarts feed the mask score; warp restarts cover WaNet-like triggers no mask
reproduces (docs/method.md#warp-search); `probe` searches more warps from random
fields where the masks read clean (docs/method.md#warp-probes) and, where no rule has found a
backdoor, small patches at fixed places (docs/method.md#patch-probes); or, where the scan found a
backdoor, more masks under a compact prior (docs/method.md#compact-probes) and blend-shaped
triggers (docs/method.md#blend-probes). `Search` names which search found a candidate.
Every restart becomes a `Candidate` with the statistics the scan reads (`cbpt.evidence`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum

import torch
import torch.nn.functional as F

from cbpt.encoding import ImageEncoder
from cbpt.evidence import backdoor_score, flip_rate, mean_pairwise_cos, over_alignment, points_to, typicality
from cbpt.losses import contrastive_inversion_loss, total_variation
from cbpt.trigger import DummyTrigger, TriggerKind, smooth_flow
from cbpt_guard.errors import UserError

Tick = Callable[[], None]


class Search(StrEnum):
    """Which search found a candidate. The scan's verdict reads the restarts; the probes are
    searched after them, each from its own random stream."""

    RESTART = "restart"  # `invert`'s mask and warp restarts
    WARP = "warp-probe"  # random-start warps, where the masks read clean (docs/method.md#warp-probes)
    COMPACT = "compact"  # masks under a compact prior, once a backdoor is found (docs/method.md#compact-probes)
    BLEND = "blend"  # blend-shaped triggers, once a backdoor is found (docs/method.md#blend-probes)
    PATCH = "patch"  # small patches at fixed places, where no rule found one (docs/method.md#patch-probes)


@dataclass(frozen=True)
class WarpSearch:
    """Smooth-warp restarts (docs/method.md#warp-search) and the random-start probes searched
    where the masks read clean (docs/method.md#warp-probes)."""

    restarts: int = 1
    probes: int = 2
    probe_spread: float = 1.0  # a probe's control grid starts at N(0, probe_spread^2)
    grid: int = 4  # control points per side of the field
    max_shift: float = 0.25  # largest displacement, as a share of the image side


@dataclass(frozen=True)
class MaskPrior:
    """What an inverted mask may look like (docs/method.md#mask-prior). A backdoor's trigger is
    a region a poisoned model learnt to see, not single pixels: `cell` draws the mask on a grid
    of cell x cell pixel squares, and `tv` weighs its total variation beside its size, so
    compact regions win over scattered adversarial pixels. The defaults are the per-pixel mask
    with no such prior."""

    cell: int = 1
    tv: float = 0.0

    def __post_init__(self) -> None:
        if self.cell < 1 or self.tv < 0:
            raise ValueError("a mask prior needs cell >= 1 and tv >= 0")


@dataclass(frozen=True)
class CompactProbes:
    """Mask restarts under a compact prior, searched once the per-pixel masks have shown a
    backdoor (docs/method.md#compact-probes). A per-pixel mask stops at the
    cheapest trigger that collapses the shots, often scattered pixels weaker than a real patch;
    a compact one stands for the region such a backdoor learnt to see. They never enter the
    verdict: a compact prior cannot draw a blend, and on the zoo's fit part (first half) they did
    not tell a missed patch from clean models (docs/results.md#compact-probes-in-the-verdict).

    `stand_in`: a compact mask that reaches the found target, flips at least this share of what
    the best per-pixel mask flips, and over-aligns toward the target at least as far as every
    per-pixel mask does, stands in for the per-pixel masks, and the backdoor is tuned against
    the standing compact ones alone; where none stands in, against the per-pixel ones alone, as
    without probes; None: against both kinds. Over-alignment is the poisoned
    model's own pull toward the target's caption: a compact region that pulls less than the
    scattered pixels does not stand for a trigger spread over the image (SIG, blends)."""

    restarts: int = 3
    prior: MaskPrior = field(default_factory=lambda: MaskPrior(tv=1.0))
    stand_in: float | None = 0.9

    def tuned_against(self, found: list[Candidate], inv: InversionResult, target: int) -> list[Candidate]:
        """Of a found backdoor's masks `found` (each aimed at `target`), those it is tuned against."""
        if self.stand_in is None:
            return found
        bar = self.stand_in * inv.flip_rate
        standing = [c for c in inv.pulling(inv.compact(), target) if c.flip_rate >= bar]
        return [replace(c, target=target) for c in standing] or [c for c in found if not c.probe]


@dataclass(frozen=True)
class BlendProbes:
    """Blend-shaped triggers, searched once the scan has found a backdoor
    (docs/method.md#blend-probes): one opacity over the whole image and a free pattern, whose size
    is the opacity. A per-pixel mask pays for every pixel it covers, so it copies a trigger spread
    over the image (a blend, a SIG, a warp) with a small patch that collapses the shots by another
    route; a blend is the shape such a trigger has. They never enter the verdict.

    A blend is tuned against beside the triggers the plan picks where it reaches the found target
    and over-aligns toward it at least as far as every per-pixel mask does: the poisoned model's
    pull toward the target's caption, the condition a compact mask stands in under. One that pulls
    less stands for a natural feature (on patch backdoors they pull far less: the zoo's bd046 at
    -5.2), and tuning against it cost a badnet ASR (docs/results.md#coverage-levers)."""

    restarts: int = 2

    def tuned_beside(self, inv: InversionResult, target: int) -> list[Candidate]:
        """The blends a found backdoor aimed at `target` is also tuned against, aimed there."""
        return [replace(c, target=target) for c in inv.pulling(inv.blends(), target)]


class Place(StrEnum):
    """Where a patch probe sits: the centre or a corner, one pixel in from the border."""

    CENTRE = "centre"
    TOP_LEFT = "top-left"
    TOP_RIGHT = "top-right"
    BOTTOM_LEFT = "bottom-left"
    BOTTOM_RIGHT = "bottom-right"

    def corner(self, h: int, w: int, side: int) -> tuple[int, int]:
        """The (top, left) pixel of a `side`-pixel square here in an h x w image."""
        top = {"centre": (h - side) // 2, "top": 1, "bottom": h - side - 1}[self.value.split("-")[0]]
        left = {"centre": (w - side) // 2, "left": 1, "right": w - side - 1}[self.value.split("-")[-1]]
        return top, left


@dataclass(frozen=True)
class PatchProbes:
    """Square patches of a fixed size and place, each with a free pattern, searched where no
    rule has found a backdoor (docs/method.md#patch-probes): one restart per place, under the
    same contrastive loss, with nothing to shrink. A backdoor's trigger is a small region the
    model learnt to obey; a clean model's natural features need more of the image, and the
    per-pixel masks reach them with scattered pixels a square cannot copy. `side`: the patch's
    side as a share of the image's (0.19: 6 pixels of 32, 43 of 224)."""

    places: tuple[Place, ...] = tuple(Place)
    side: float = 0.19

    def pixels(self, h: int, w: int) -> int:
        """The patch's side in pixels in an h x w image."""
        return max(1, round(self.side * min(h, w)))


@dataclass(frozen=True)
class InversionConfig:
    steps: int = 200
    lr: float = 0.1
    tau: float = 0.1  # InfoNCE temperature
    mask_restarts: int = 3
    batch_size: int = 32
    lam: float = 0.1  # initial weight of the size penalty (docs/method.md#mask-penalty)
    lam_factor: float = 1.5  # its multiplicative adaptation, every 10 steps
    consistency: float = 0.85  # mean pairwise cos of triggered features counted as collapsed
    eps: float = 0.0  # bound of a mask restart's additive perturbation (0: none)
    prior: MaskPrior = field(default_factory=MaskPrior)
    warp: WarpSearch = field(default_factory=WarpSearch)
    compact: CompactProbes = field(default_factory=CompactProbes)
    blend: BlendProbes = field(default_factory=BlendProbes)
    patch: PatchProbes = field(default_factory=PatchProbes)
    seed: int = 0


@dataclass(frozen=True)
class Candidate:
    """One inverted trigger and what it does to the shots."""

    trigger: DummyTrigger
    target: int  # the class its triggered shots' mean feature is nearest to
    flip_rate: float  # the share of the shots outside `target` it sends there
    over_alignment: float | None  # `evidence.over_alignment` (None: too few shots of `target`)
    search: Search = Search.RESTART  # which search found it: the restarts, or one of `probe`'s
    typicality: float | None = None  # `evidence.typicality` (None: too few shots of `target`, or not measured)
    # the share of those shots its mask sends to `target` filled with grey (`DummyTrigger.greyed`;
    # measured on the mask restarts, the only masks a rule reads it on; None elsewhere)
    shape_flip: float | None = None

    @property
    def kind(self) -> TriggerKind:
        return self.trigger.kind

    @property
    def probe(self) -> bool:
        """Searched after the restarts by `probe`: read by no rule but the patch probes' own."""
        return self.search is not Search.RESTART

    @property
    def mask_l1(self) -> float:
        """mean(m): the share of the image its mask needs (0 for a warp, whose mask is blank)."""
        return float(self.trigger.mask.mean())

    @property
    def mask_score(self) -> float:
        """Its mask score (`evidence.backdoor_score`): the scan reads the best mask's."""
        return backdoor_score(self.flip_rate, self.mask_l1)


@dataclass(frozen=True)
class InversionResult:
    candidates: list[Candidate]  # the mask restarts best first, then the warps, then any probes
    mean_feature: torch.Tensor  # the best mask's normalised mean triggered feature: the alarm's centre
    consistency: float  # mean pairwise cos of the best mask's triggered shot features
    clean_consistency: float  # the same for the clean shots
    mask_l1: float  # mean(m) of the best mask: the share of the image it needs
    score: float  # the mask score (`evidence.backdoor_score`)
    losses: list[float] = field(default_factory=list)  # the best mask's loss curve
    seconds: float = 0.0
    # the clean shots' features the candidates were read against, kept so that `probe` on the
    # same shots does not encode them again (one pass over K x C shots; docs/scale.md#memory)
    clean: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def clean_features(self, encoder: ImageEncoder, pixels: torch.Tensor) -> torch.Tensor:
        """The clean features of `pixels`, the shots this result was inverted on: those kept,
        or encoded where it carries none (a result built without them)."""
        if self.clean is None:
            return encoder.all(pixels)
        if self.clean.shape[0] != pixels.shape[0]:
            raise ValueError(f"probe the shots {self.clean.shape[0]} inverted on, not {pixels.shape[0]} others")
        return self.clean

    @property
    def best(self) -> Candidate:
        """The lowest-loss mask restart: the scan's own figures are its."""
        return self.candidates[0]

    @property
    def trigger(self) -> DummyTrigger:
        return self.best.trigger

    @property
    def target(self) -> int:
        return self.best.target

    @property
    def flip_rate(self) -> float:
        return self.best.flip_rate

    def masks(self) -> list[Candidate]:
        """The mask restarts and the compact probes; the blends, masks of one opacity, are
        `blends`, and the fixed patches `patches`."""
        searched = (Search.RESTART, Search.COMPACT)
        return [c for c in self.candidates if c.kind is TriggerKind.MASK and c.search in searched]

    def warps(self) -> list[Candidate]:
        """The warp restarts and probes."""
        return [c for c in self.candidates if c.kind is TriggerKind.WARP]

    def compact(self) -> list[Candidate]:
        """The masks searched under the compact prior (`probe`)."""
        return [c for c in self.candidates if c.search is Search.COMPACT]

    def blends(self) -> list[Candidate]:
        """The blend-shaped triggers (`probe`)."""
        return [c for c in self.candidates if c.search is Search.BLEND]

    def patches(self) -> list[Candidate]:
        """The fixed-place patches (`probe`), most flipping first."""
        return sorted((c for c in self.candidates if c.search is Search.PATCH), key=lambda c: -c.flip_rate)

    def restarts(self) -> list[Candidate]:
        """Every candidate but the probes."""
        return [c for c in self.candidates if c.search is Search.RESTART]

    def pulling(self, probes: list[Candidate], target: int) -> list[Candidate]:
        """Of `probes`, those that reach `target` and over-align toward it at least as far as every
        per-pixel mask restart pointing there (all that reach it, where none does): the poisoned
        model's own pull, the condition a compact mask stands in under and a blend joins the
        tuning under (docs/method.md#compact-probes, docs/method.md#blend-probes)."""
        pulls = [c.over_alignment for c in self.restarts() if c.kind is TriggerKind.MASK and c.target == target]
        pull = max((p for p in pulls if p is not None), default=None)
        return [
            c
            for c in probes
            if c.target == target and (pull is None or (c.over_alignment is not None and c.over_alignment >= pull))
        ]


@dataclass
class _Restart:
    trigger: DummyTrigger
    loss: float  # final contrastive loss plus the initial lambda times the size
    history: list[float]
    feats: torch.Tensor  # the triggered shots' features
    greyed: torch.Tensor | None  # a restart mask's, its pattern greyed (`DummyTrigger.greyed`); else None


def _leaf(x: torch.Tensor, device: torch.device, grad: bool = True) -> torch.Tensor:
    """A parameter drawn on the host (the same numbers on every device) and moved to `device`."""
    return x.to(device).requires_grad_(grad)


def _init_mask(h: int, w: int, cfg: InversionConfig, gen: torch.Generator, device: torch.device):
    cell, tv = cfg.prior.cell, cfg.prior.tv
    gh, gw = -(-h // cell), -(-w // cell)  # the mask's grid; cell 1: one logit per pixel
    a = _leaf(torch.full((gh, gw), -3.0).add_(torch.randn(gh, gw, generator=gen) * 0.5), device)
    b = _leaf(torch.randn(3, h, w, generator=gen), device)
    d = _leaf(torch.zeros(3, h, w), device, cfg.eps > 0)

    def build() -> tuple[DummyTrigger, torch.Tensor]:
        mask = torch.sigmoid(a)
        if cell > 1:
            mask = mask.repeat_interleave(cell, 0).repeat_interleave(cell, 1)[:h, :w]
        delta = cfg.eps * torch.tanh(d) if cfg.eps > 0 else torch.zeros(3, h, w, device=device)
        size = mask.mean() + tv * total_variation(mask) if tv else mask.mean()
        return DummyTrigger(mask, torch.sigmoid(b), delta), size

    return [a, b] + ([d] if cfg.eps > 0 else []), build


def _warp_init(spread: float):
    def init(h: int, w: int, cfg: InversionConfig, gen: torch.Generator, device: torch.device):
        ctrl = _leaf(torch.randn(2, cfg.warp.grid, cfg.warp.grid, generator=gen) * spread, device)
        side = float(max(h, w))

        def build() -> tuple[DummyTrigger, torch.Tensor]:
            flow = smooth_flow(ctrl, h, w, cfg.warp.max_shift * side)
            return DummyTrigger.blank(h, w, TriggerKind.WARP, flow), flow.norm(dim=-1).mean() / side

        return [ctrl], build

    return init


def _blend_init(h: int, w: int, cfg: InversionConfig, gen: torch.Generator, device: torch.device):
    """A blend: one opacity over the whole image (starting near sigmoid(-2), 12%) and a free
    pattern; its size is the opacity."""
    logit = _leaf(torch.tensor(-2.0) + torch.randn((), generator=gen) * 0.3, device)
    pattern = _leaf(torch.randn(3, h, w, generator=gen), device)

    def build() -> tuple[DummyTrigger, torch.Tensor]:
        alpha = torch.sigmoid(logit)
        mask = alpha * torch.ones(h, w, device=device)
        return DummyTrigger(mask, torch.sigmoid(pattern), torch.zeros(3, h, w, device=device)), alpha

    return [logit, pattern], build


def _patch_init(place: Place, probes: PatchProbes):
    """A square of `probes.side` of the image's side at `place`, fully opaque, and a free
    pattern; its size is nothing (the square does not change)."""

    def init(h: int, w: int, cfg: InversionConfig, gen: torch.Generator, device: torch.device):
        s = probes.pixels(h, w)
        top, left = place.corner(h, w, s)
        mask = torch.zeros(h, w, device=device)
        mask[top : top + s, left : left + s] = 1.0
        pattern = _leaf(torch.randn(3, h, w, generator=gen), device)

        def build() -> tuple[DummyTrigger, torch.Tensor]:
            return DummyTrigger(mask, torch.sigmoid(pattern), torch.zeros(3, h, w, device=device)), mask.new_zeros(())

        return [pattern], build

    return init


def _one_restart(
    encoder: ImageEncoder,
    pixels: torch.Tensor,
    clean: torch.Tensor,
    cfg: InversionConfig,
    gen: torch.Generator,
    tick: Tick,
    init: Callable = _init_mask,
    grey: bool = True,
) -> _Restart:
    """One inversion from a random start; `clean`: the shots' clean features. The penalty is
    the trigger's size: the mask's mean, or a warp's mean displacement over the image side.
    Each step sees `cfg.batch_size` shots; the final figures are taken over all of them, a
    batch at a time, and with `grey` a mask's greyed shape too (one more pass)."""
    _, _, h, w = pixels.shape
    params, build = init(h, w, cfg, gen, encoder.device)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    lam, history = cfg.lam, []
    for step in range(cfg.steps):
        idx = torch.randperm(pixels.shape[0], generator=gen)[: cfg.batch_size]
        trigger, size = build()
        trig = encoder(trigger.apply(encoder.load(pixels[idx])))
        con = contrastive_inversion_loss(trig, clean[idx.to(clean.device)], cfg.tau)
        loss = con + lam * size
        if not bool(torch.isfinite(loss)):
            raise UserError(
                f"trigger inversion diverged: non-finite loss at step {step + 1}",
                "check the model (its features are not finite on these shots) or lower the inversion lr",
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(float(con.detach()))
        if step % 10 == 9:  # adapt lambda on how collapsed the triggered features are
            lam = lam * cfg.lam_factor if mean_pairwise_cos(trig.detach()) > cfg.consistency else lam / cfg.lam_factor
        tick()
    with torch.no_grad():  # built here, the trigger's tensors carry no graph
        trigger, size = build()
        feats = encoder.all(pixels, view=lambda x, _rows: trigger.apply(x))
        final = float(contrastive_inversion_loss(feats, clean, cfg.tau)) + cfg.lam * float(size)
        greyed = None
        if grey and trigger.kind is TriggerKind.MASK:  # a warp has no shape to grey
            shape = trigger.greyed()
            greyed = encoder.all(pixels, view=lambda x, _rows: shape.apply(x))
    return _Restart(trigger, final, history, feats, greyed)


def _describe(
    run: _Restart,
    clean: torch.Tensor,
    labels: torch.Tensor,
    class_weights: torch.Tensor,
    search: Search = Search.RESTART,
) -> Candidate:
    target = points_to(run.feats, class_weights)
    return Candidate(
        run.trigger,
        target,
        flip_rate(run.feats, labels, class_weights, target),
        over_alignment(run.feats, clean, labels, class_weights, target),
        search,
        typicality(run.feats, clean, labels, target),
        None if run.greyed is None else flip_rate(run.greyed, labels, class_weights, target),
    )


def _ticker(progress: Callable[[int, int], None] | None, total: int) -> Tick:
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress:
            progress(done[0], total)

    return tick


def invert(
    encoder: ImageEncoder,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    class_weights: torch.Tensor,
    cfg: InversionConfig = InversionConfig(),
    progress: Callable[[int, int], None] | None = None,
) -> InversionResult:
    """Invert the trigger on clean shots `pixels` ([N, 3, H, W], uint8 or [0, 1], on the host).
    `class_weights`: the original prompts' class embeddings [C, D] on the model's device, which
    name where triggered features point."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)
    tick = _ticker(progress, cfg.steps * (cfg.mask_restarts + cfg.warp.restarts))
    labels = labels.to(encoder.device)
    clean = encoder.all(pixels)  # once: every restart contrasts against the same clean features
    masks = sorted(
        (_one_restart(encoder, pixels, clean, cfg, gen, tick) for _ in range(cfg.mask_restarts)),
        key=lambda r: r.loss,
    )
    warps = [_one_restart(encoder, pixels, clean, cfg, gen, tick, _warp_init(0.1)) for _ in range(cfg.warp.restarts)]
    candidates = [_describe(r, clean, labels, class_weights) for r in masks + warps]
    best, feats = candidates[0], masks[0].feats
    return InversionResult(
        candidates=candidates,
        mean_feature=F.normalize(feats.mean(0), dim=-1),
        consistency=mean_pairwise_cos(feats),
        clean_consistency=mean_pairwise_cos(clean),
        mask_l1=best.mask_l1,
        score=best.mask_score,
        losses=masks[0].history,
        clean=clean,
        seconds=time.perf_counter() - t0,
    )


# each probe search's random stream, offset from the restarts' seed
_STREAMS = {Search.WARP: 1, Search.COMPACT: 2, Search.BLEND: 3, Search.PATCH: 4}


def _probe(
    encoder: ImageEncoder,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    class_weights: torch.Tensor,
    result: InversionResult,
    cfg: InversionConfig,
    inits: list[Callable],
    search: Search,
    progress: Callable[[int, int], None] | None,
) -> InversionResult:
    """`result` with one more restart from each of `inits` added to its candidates as `search`'s probes.
    Each search draws from its own stream (`cfg.seed + _STREAMS[search]`), so the restarts and
    the other searches stay as they were."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed + _STREAMS[search])
    tick = _ticker(progress, cfg.steps * len(inits))
    labels = labels.to(encoder.device)
    clean = result.clean_features(encoder, pixels)
    # the shape flip is read on the mask restarts alone (cbpt/scan.py: planted): no greyed pass here
    runs = [_one_restart(encoder, pixels, clean, cfg, gen, tick, init, grey=False) for init in inits]
    probes = [_describe(r, clean, labels, class_weights, search) for r in runs]
    return replace(result, candidates=result.candidates + probes, seconds=result.seconds + time.perf_counter() - t0)


def probe(
    encoder: ImageEncoder,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    class_weights: torch.Tensor,
    result: InversionResult,
    search: Search,
    cfg: InversionConfig = InversionConfig(),
    progress: Callable[[int, int], None] | None = None,
) -> InversionResult:
    """`result` with `search`'s probes added to its candidates: `cfg.warp.probes` random-start
    warps (where the masks read clean), a patch at each of `cfg.patch.places` (where no rule found
    a backdoor), `cfg.compact.restarts` masks under the compact prior or `cfg.blend.restarts`
    blends (where the scan found a backdoor). `pixels`: the shots `result` was inverted on, whose
    clean features it carries."""
    if search is Search.WARP:
        inits = [_warp_init(cfg.warp.probe_spread)] * cfg.warp.probes
    elif search is Search.PATCH:
        inits = [_patch_init(place, cfg.patch) for place in cfg.patch.places]
    elif search is Search.COMPACT:
        inits, cfg = [_init_mask] * cfg.compact.restarts, replace(cfg, prior=cfg.compact.prior)
    elif search is Search.BLEND:
        inits = [_blend_init] * cfg.blend.restarts
    else:
        raise ValueError(f"{search} is no probe")
    return _probe(encoder, pixels, labels, class_weights, result, cfg, inits, search, progress)
