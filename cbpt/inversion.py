"""Step 1 of CBPT: invert the trigger by contrastive learning, from clean shots only.

Dummy trigger `T(x) = clip((1 - m) * x + m * p + delta)`, m = sigmoid(a) [H, W],
p = sigmoid(b) [3, H, W], |delta|_inf <= eps (off by default), in pixel space before
normalisation. The loss pulls triggered features together and away from the clean ones
(`losses.contrastive_inversion_loss`), plus lambda * mean(m); lambda rises while the
triggered features are consistent and falls while they are not, so the final mask is about
as small as consistency allows. A backdoor is a shortcut: it needs a far smaller mask to
collapse the features than any natural feature of a clean model does.

Besides these mask-and-pattern restarts, inversion can search a smooth warp (WaNet-like) or a
bounded full-image perturbation, penalised by their own size; they feed prompt tuning as
further dummy triggers. The scan reads the best mask's score and every trigger's
`over_alignment`; where the masks read clean, `probe_warps` searches more warps from random
fields, for a warp backdoor's evidence.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial

import torch
import torch.nn.functional as F

from cbpt.losses import contrastive_inversion_loss


@dataclass(frozen=True)
class InversionConfig:
    steps: int = 200
    lr: float = 0.1
    tau: float = 0.1
    restarts: int = 3
    batch_size: int = 32
    # Measured on the testbed: starting at 1e-2 and adapting by 1.2 left masks of 10-25% on
    # backdoored AND clean models; 0.1 and 1.5 shrink a badnet's to 1.3% (the true patch is
    # 1.6%) while a clean model still needs 5.6%: the size is what tells them apart.
    lam: float = 0.1  # initial weight of the mask penalty
    lam_factor: float = 1.5  # multiplicative adaptation per check (every 10 steps)
    consistency: float = 0.85  # mean pairwise cos of triggered features counted as "collapsed"
    eps: float = 0.0  # bound of the additive perturbation (e.g. 8/255 for invisible triggers)
    # Restarts that invert a smooth warp instead of a mask and pattern (WaNet-like triggers,
    # which no small mask reproduces). They feed tuning, and the scan through their
    # over-alignment (its score is calibrated on masks); their penalty is the mean displacement
    # as a share of the image side.
    # Measured on shapes WaNet (3 shot sets): ASR after 0.051 -> 0.020 with one warp restart.
    # On digits its flip rate and size are no different on the clean model (both hit the
    # displacement bound); what tells them apart is its `over_alignment` (purify.read_scan).
    warp_restarts: int = 1
    # Warps searched from a random field (control grid ~ N(0, warp_spread^2)) where the masks
    # read clean (see purify.run_scan): evidence for a warp backdoor, and its triggers when a
    # warp's over-alignment shows one. The contrastive loss has many warp minima, and digits
    # WaNet's reach the planted target from either start but cover its basin only together
    # (measured, 3 shot sets: ASR after 0.069 / 0.118 / 0.022 with the identity-start warp alone,
    # 0.022 / 0.022 / 0.033 with the probes). Not fed to tuning otherwise: in cautious mode
    # they cost shapes WaNet's first shot set its purification (original prompts kept).
    warp_probes: int = 2
    warp_spread: float = 1.0
    warp_grid: int = 4  # control points per side of the warp field
    warp_max_shift: float = 0.25  # largest displacement, as a share of the image side
    # Restarts that invert a full-image additive perturbation alone (SIG, blended, SSBA-like
    # triggers), bounded by additive_eps; penalised by its mean magnitude over that bound.
    # Off: measured with a warp restart, it cost shapes blended 2.2 CA points and moved digits
    # ASR both ways (badnet 0.059 -> 0.084, blended 0.115 -> 0.125).
    additive_restarts: int = 0
    additive_eps: float = 0.1
    seed: int = 0


@dataclass
class DummyTrigger:
    mask: torch.Tensor  # [H, W] in [0, 1]
    pattern: torch.Tensor  # [3, H, W] in [0, 1]
    delta: torch.Tensor  # [3, H, W], |delta| <= eps
    flow: torch.Tensor | None = None  # [H, W, 2] (dy, dx) displacement in pixels, applied first
    kind: str = "patch"  # what inversion searched: "patch" (mask + pattern), "warp" or "additive"
    # the class its triggered shots point to (set by `invert`): restarts may find different
    # ones, e.g. a warp that reaches WaNet's target on a model whose best patch points elsewhere
    target: int | None = None
    probe: bool = False  # a random-start warp from `probe_warps`

    def apply(self, x01: torch.Tensor) -> torch.Tensor:
        if self.flow is not None:
            x01 = warp(x01, self.flow)
        return (x01 * (1 - self.mask) + self.mask * self.pattern + self.delta).clamp(0, 1)

    def shifted(self, dy: int, dx: int) -> DummyTrigger:
        """The same trigger rolled to another place: backdoor patches fire anywhere."""
        return replace(self, mask=torch.roll(self.mask, (dy, dx), (0, 1)), pattern=torch.roll(self.pattern, (dy, dx), (1, 2)),
                       flow=None if self.flow is None else torch.roll(self.flow, (dy, dx), (0, 1)))


def warp(x01: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Each output pixel (y, x) samples the input at (y + dy, x + dx), bilinearly."""
    n, _, h, w = x01.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=x01.dtype), torch.arange(w, dtype=x01.dtype), indexing="ij")
    gy = (ys + flow[..., 0]) * (2 / max(h - 1, 1)) - 1
    gx = (xs + flow[..., 1]) * (2 / max(w - 1, 1)) - 1
    grid = torch.stack([gx, gy], -1).expand(n, h, w, 2)  # grid_sample reads (x, y)
    return F.grid_sample(x01, grid, mode="bilinear", padding_mode="border", align_corners=True)


def smooth_flow(ctrl: torch.Tensor, h: int, w: int, max_shift: float) -> torch.Tensor:
    """A [2, k, k] control grid upsampled to a smooth [H, W, 2] field bounded by max_shift px."""
    up = F.interpolate(ctrl[None], size=(h, w), mode="bicubic", align_corners=True)[0]
    return (max_shift * torch.tanh(up)).permute(1, 2, 0)


@dataclass
class InversionResult:
    trigger: DummyTrigger
    candidates: list[DummyTrigger]  # every restart: the patches best first, then warps, then additive ones
    target: int  # suspected target class
    flip_rate: float  # share of non-target shots the trigger sends to `target`
    consistency: float  # mean pairwise cos of triggered shot features
    clean_consistency: float  # the same for the clean shots
    mask_l1: float  # mean(m): the share of the image the trigger needs
    score: float  # backdoor score (higher = more suspicious)
    mean_feature: torch.Tensor  # normalised mean triggered feature: the backdoor region's centre
    losses: list[float] = field(default_factory=list)
    # per candidate: the share of the shots outside its own target that it sends there
    candidate_flip_rates: list[float] = field(default_factory=list)
    # per candidate: its `over_alignment` (None where too few shots of its target)
    candidate_alignments: list[float | None] = field(default_factory=list)
    seconds: float = 0.0

    def patches(self) -> list[DummyTrigger]:
        """The mask-and-pattern candidates, best first."""
        return [c for c in self.candidates if c.kind == "patch"]

    def others(self) -> list[DummyTrigger]:
        """The warp and additive candidates, probes included."""
        return [c for c in self.candidates if c.kind != "patch"]

    def restarts(self) -> list[DummyTrigger]:
        """The candidates less the probes: what a model that reads clean is tuned against."""
        return [c for c in self.candidates if not c.probe]

    def over_aligned(self, threshold: float) -> list[DummyTrigger]:
        """The warp and additive candidates over-aligned by at least `threshold` beyond every
        mask restart pointing to another class (or beyond zero, where none of those
        over-aligns), toward the target of the most over-aligned one, most first: the evidence
        the mask score cannot give. Where masks over-align toward other classes, the model's
        clean shots are a poor reference: measured on the undertrained miniature models of the
        tests, whose natural features reach 0.6-1.3. A mask over-aligned toward the warp's own
        target corroborates it (digits WaNet, one of 6 shot sets: a mask at 0.66, the warp 0.77)."""
        pairs = list(zip(self.candidates, self.candidate_alignments))

        def bar(target: int | None) -> float:
            return threshold + max([0.0] + [a for c, a in pairs
                                            if c.kind == "patch" and a is not None and c.target != target])

        found = sorted(((a, c) for c, a in pairs if c.kind != "patch" and a is not None and a >= bar(c.target)),
                       key=lambda p: -p[0])
        return [c for _, c in found if c.target == found[0][1].target]


def _normalise(x01: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x01.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x01.dtype).view(1, 3, 1, 1)
    return (x01 - m) / s


def mean_pairwise_cos(features: torch.Tensor) -> float:
    n = features.shape[0]
    if n < 2:
        return 1.0
    sim = features @ features.T
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


def _init_patch(h: int, w: int, cfg: InversionConfig, gen: torch.Generator):
    a = torch.full((h, w), -3.0).add_(torch.randn(h, w, generator=gen) * 0.5).requires_grad_(True)
    b = torch.randn(3, h, w, generator=gen).requires_grad_(True)
    d = torch.zeros(3, h, w, requires_grad=cfg.eps > 0)

    def build() -> tuple[DummyTrigger, torch.Tensor]:
        mask = torch.sigmoid(a)
        delta = cfg.eps * torch.tanh(d) if cfg.eps > 0 else torch.zeros(3, h, w)
        return DummyTrigger(mask, torch.sigmoid(b), delta), mask.mean()

    return [a, b] + ([d] if cfg.eps > 0 else []), build


def _init_warp(h: int, w: int, cfg: InversionConfig, gen: torch.Generator, spread: float = 0.1):
    ctrl = (torch.randn(2, cfg.warp_grid, cfg.warp_grid, generator=gen) * spread).requires_grad_(True)
    side = float(max(h, w))

    def build() -> tuple[DummyTrigger, torch.Tensor]:
        flow = smooth_flow(ctrl, h, w, cfg.warp_max_shift * side)
        return DummyTrigger(torch.zeros(h, w), torch.zeros(3, h, w), torch.zeros(3, h, w), flow, "warp"), \
            flow.norm(dim=-1).mean() / side

    return [ctrl], build


def _init_additive(h: int, w: int, cfg: InversionConfig, gen: torch.Generator):
    d = (torch.randn(3, h, w, generator=gen) * 0.1).requires_grad_(True)

    def build() -> tuple[DummyTrigger, torch.Tensor]:
        delta = cfg.additive_eps * torch.tanh(d)
        return DummyTrigger(torch.zeros(h, w), torch.zeros(3, h, w), delta, kind="additive"), \
            delta.abs().mean() / cfg.additive_eps

    return [d], build


def _one_restart(encode: Callable[[torch.Tensor], torch.Tensor], x01: torch.Tensor, clean_all: torch.Tensor,
                 cfg: InversionConfig, gen: torch.Generator, progress: Callable[[], None] | None,
                 init: Callable = _init_patch) -> tuple[DummyTrigger, float, list[float], torch.Tensor]:
    """One inversion from a random start; `clean_all`: the shots' clean features. The penalty
    is the trigger's size: the mask's mean for a patch, the mean displacement over the image
    side for a warp, the mean magnitude over its bound for an additive perturbation. Also
    returns the triggered shots' features."""
    _, _, h, w = x01.shape
    params, build = init(h, w, cfg, gen)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    lam, history = cfg.lam, []
    for step in range(cfg.steps):
        idx = torch.randperm(x01.shape[0], generator=gen)[: cfg.batch_size]
        trigger, size = build()
        trig = encode(trigger.apply(x01[idx]))
        con = contrastive_inversion_loss(trig, clean_all[idx], cfg.tau)
        loss = con + lam * size
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(float(con.detach()))
        if step % 10 == 9:  # adapt lambda on how collapsed the triggered features are
            lam = lam * cfg.lam_factor if mean_pairwise_cos(trig.detach()) > cfg.consistency else lam / cfg.lam_factor
        if progress:
            progress()
    with torch.no_grad():  # built here, the trigger's tensors carry no graph
        trigger, size = build()
        feats = encode(trigger.apply(x01))
        final = float(contrastive_inversion_loss(feats, clean_all, cfg.tau)) + cfg.lam * float(size)
    return trigger, final, history, feats


def _points_to(feats: torch.Tensor, class_weights: torch.Tensor) -> int:
    return int((F.normalize(feats.mean(0), dim=-1) @ class_weights.T).argmax())


# Fewer shots of the target class than this give no spread to measure over-alignment in.
MIN_ALIGNMENT_SHOTS = 8


def over_alignment(feats: torch.Tensor, clean: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor,
                   target: int, min_shots: int = MIN_ALIGNMENT_SHOTS) -> float | None:
    """How much closer the triggered shots of the other classes come to the target's text
    embedding than the target's own clean shots do, in units of the latter's spread (None with
    fewer than `min_shots` of them). A poisoned model was trained to pull triggered images
    onto the target's caption; a natural feature makes images look like the class, not more so.
    Measured on the testbed (16 shots, 6 shot sets): triggers pointing to a planted target
    0.2 to 3.1; the clean models' masks, warps and probes -19 to -0.37, and 12 random-start
    warps tried apart at most +0.26. Undertrained models break the premise (see
    `InversionResult.over_aligned`)."""
    own = clean[labels == target] @ class_weights[target]
    others = labels != target
    if own.numel() < max(min_shots, 2) or not bool(others.any()):
        return None
    trig = feats[others] @ class_weights[target]
    return float((trig.mean() - own.mean()) / own.std().clamp_min(1e-6))


def _flip_rate(feats: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor, target: int) -> float:
    keep = labels != target
    if not bool(keep.any()):
        return 0.0
    return float(((feats[keep] @ class_weights.T).argmax(1) == target).float().mean())


def _describe(found: list, clean: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor):
    """Each restart's trigger with its target (the class its triggered shots' mean feature is
    nearest to), flip rate and over-alignment."""
    targets = [_points_to(f, class_weights) for *_, f in found]
    return ([replace(trig, target=t) for (trig, *_), t in zip(found, targets)],
            [_flip_rate(f, labels, class_weights, t) for (*_, f), t in zip(found, targets)],
            [over_alignment(f, clean, labels, class_weights, t) for (*_, f), t in zip(found, targets)])


def _ticker(progress: Callable[[int, int], None] | None, total: int) -> Callable[[], None]:
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress:
            progress(done[0], total)

    return tick


def _encoder(model: torch.nn.Module, mean: Sequence[float], std: Sequence[float]):
    return lambda x: model.encode_image(_normalise(x, mean, std), normalize=True)


def invert(model: torch.nn.Module, x01: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor,
           mean: Sequence[float], std: Sequence[float], cfg: InversionConfig = InversionConfig(),
           progress: Callable[[int, int], None] | None = None) -> InversionResult:
    """Invert the trigger on clean shots `x01` ([N, 3, H, W] in [0, 1], before normalisation).

    `class_weights` are the original prompts' class embeddings [C, D]: they name the class
    the triggered features point to."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)

    encode = _encoder(model, mean, std)
    tick = _ticker(progress, cfg.steps * (cfg.restarts + cfg.warp_restarts + cfg.additive_restarts))
    with torch.no_grad():  # once: every restart contrasts against the same clean features
        clean = encode(x01)
    runs = sorted((_one_restart(encode, x01, clean, cfg, gen, tick) for _ in range(cfg.restarts)), key=lambda r: r[1])
    others = [_one_restart(encode, x01, clean, cfg, gen, tick, init)
              for init, n in ((_init_warp, cfg.warp_restarts), (_init_additive, cfg.additive_restarts)) for _ in range(n)]
    candidates, flips, aligned = _describe(runs + others, clean, labels, class_weights)
    best, (_, _, history, feats), target, flip = candidates[0], runs[0], candidates[0].target, flips[0]
    centre = F.normalize(feats.mean(0), dim=-1)
    consistency, clean_consistency = mean_pairwise_cos(feats), mean_pairwise_cos(clean)
    mask_l1 = float(best.mask.mean())
    return InversionResult(
        trigger=best, candidates=candidates, target=target, flip_rate=flip,
        consistency=consistency, clean_consistency=clean_consistency, mask_l1=mask_l1,
        score=backdoor_score(flip, consistency, clean_consistency, mask_l1),
        mean_feature=centre, losses=history, candidate_flip_rates=flips, candidate_alignments=aligned,
        seconds=time.perf_counter() - t0,
    )


def probe_warps(model: torch.nn.Module, x01: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor,
                mean: Sequence[float], std: Sequence[float], result: InversionResult,
                cfg: InversionConfig = InversionConfig(),
                progress: Callable[[int, int], None] | None = None) -> InversionResult:
    """`result` with `cfg.warp_probes` random-start warps added to its candidates."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # its own stream: the restarts stay as they were
    encode = _encoder(model, mean, std)
    tick = _ticker(progress, cfg.steps * cfg.warp_probes)
    init = partial(_init_warp, spread=cfg.warp_spread)
    with torch.no_grad():
        clean = encode(x01)
    found = [_one_restart(encode, x01, clean, cfg, gen, tick, init) for _ in range(cfg.warp_probes)]
    probes, flips, aligned = _describe(found, clean, labels, class_weights)
    return replace(result, candidates=result.candidates + [replace(p, probe=True) for p in probes],
                   candidate_flip_rates=result.candidate_flip_rates + flips,
                   candidate_alignments=result.candidate_alignments + aligned,
                   seconds=result.seconds + time.perf_counter() - t0)


# A backdoor needs a far smaller trigger than any natural feature to collapse the shots into
# one class. Measured on the shapes testbed (3 shot sets each): badnet, blended, sig, ssba,
# trojvqa and badclip models flipped 97-100% of shots with masks of 1.3-2.9% of the image; a
# clean model flipped 69-83% with 3.9-6.0%. WaNet's warp (not a mask-and-pattern trigger)
# flipped 72-76% with 3.5-4.3%, like a clean model: the scan misses it.
MASK_SCALE = 0.08


def backdoor_score(flip_rate: float, consistency: float, clean_consistency: float, mask_l1: float) -> float:
    """The share of shots the inverted trigger sends to one class, discounted by the share
    of the image it needs: 1 for a tiny trigger that flips everything, 0 for one covering
    MASK_SCALE of the image or more. On the testbed: backdoored models 0.64-0.84, clean
    0.17-0.42, WaNet 0.35-0.42 (missed)."""
    return flip_rate * max(0.0, 1.0 - mask_l1 / MASK_SCALE)
