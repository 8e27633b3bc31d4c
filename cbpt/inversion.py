"""Step 1 of CBPT: invert the trigger by contrastive learning, from clean shots only.

Dummy trigger `T(x) = clip((1 - m) * x + m * p + delta)`, m = sigmoid(a) [H, W],
p = sigmoid(b) [3, H, W], |delta|_inf <= eps (off by default), in pixel space before
normalisation. The loss pulls triggered features together and away from the clean ones
(`losses.contrastive_inversion_loss`), plus lambda * mean(m); lambda rises while the
triggered features are consistent and falls while they are not, so the final mask is about
as small as consistency allows. A backdoor is a shortcut: it needs a far smaller mask to
collapse the features than any natural feature of a clean model does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

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
    seed: int = 0


@dataclass
class DummyTrigger:
    mask: torch.Tensor  # [H, W] in [0, 1]
    pattern: torch.Tensor  # [3, H, W] in [0, 1]
    delta: torch.Tensor  # [3, H, W], |delta| <= eps

    def apply(self, x01: torch.Tensor) -> torch.Tensor:
        return (x01 * (1 - self.mask) + self.mask * self.pattern + self.delta).clamp(0, 1)

    def shifted(self, dy: int, dx: int) -> DummyTrigger:
        """The same trigger rolled to another place: backdoor patches fire anywhere."""
        return DummyTrigger(torch.roll(self.mask, (dy, dx), (0, 1)), torch.roll(self.pattern, (dy, dx), (1, 2)),
                            self.delta)


@dataclass
class InversionResult:
    trigger: DummyTrigger
    candidates: list[DummyTrigger]  # every restart, best first
    target: int  # suspected target class
    flip_rate: float  # share of non-target shots the trigger sends to `target`
    consistency: float  # mean pairwise cos of triggered shot features
    clean_consistency: float  # the same for the clean shots
    mask_l1: float  # mean(m): the share of the image the trigger needs
    score: float  # backdoor score (higher = more suspicious)
    mean_feature: torch.Tensor  # normalised mean triggered feature: the backdoor region's centre
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


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


def _one_restart(encode: Callable[[torch.Tensor], torch.Tensor], x01: torch.Tensor, cfg: InversionConfig,
                 gen: torch.Generator, progress: Callable[[], None] | None) -> tuple[DummyTrigger, float, list[float]]:
    _, _, h, w = x01.shape
    a = torch.full((h, w), -3.0).add_(torch.randn(h, w, generator=gen) * 0.5).requires_grad_(True)
    b = torch.randn(3, h, w, generator=gen).requires_grad_(True)
    d = torch.zeros(3, h, w, requires_grad=cfg.eps > 0)
    params = [a, b] + ([d] if cfg.eps > 0 else [])
    opt = torch.optim.Adam(params, lr=cfg.lr)
    lam, history = cfg.lam, []
    with torch.no_grad():
        clean_all = encode(x01)
    for step in range(cfg.steps):
        idx = torch.randperm(x01.shape[0], generator=gen)[: cfg.batch_size]
        mask, pattern = torch.sigmoid(a), torch.sigmoid(b)
        delta = cfg.eps * torch.tanh(d) if cfg.eps > 0 else torch.zeros(())
        trig = encode((x01[idx] * (1 - mask) + mask * pattern + delta).clamp(0, 1))
        con = contrastive_inversion_loss(trig, clean_all[idx], cfg.tau)
        loss = con + lam * mask.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(float(con.detach()))
        if step % 10 == 9:  # adapt lambda on how collapsed the triggered features are
            lam = lam * cfg.lam_factor if mean_pairwise_cos(trig.detach()) > cfg.consistency else lam / cfg.lam_factor
        if progress:
            progress()
    with torch.no_grad():
        trig = DummyTrigger(torch.sigmoid(a).detach(), torch.sigmoid(b).detach(),
                            (cfg.eps * torch.tanh(d)).detach() if cfg.eps > 0 else torch.zeros(3, h, w))
        feats = encode(trig.apply(x01))
        final = float(contrastive_inversion_loss(feats, clean_all, cfg.tau)) + cfg.lam * float(trig.mask.mean())
    return trig, final, history


def invert(model: torch.nn.Module, x01: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor,
           mean: Sequence[float], std: Sequence[float], cfg: InversionConfig = InversionConfig(),
           progress: Callable[[int, int], None] | None = None) -> InversionResult:
    """Invert the trigger on clean shots `x01` ([N, 3, H, W] in [0, 1], before normalisation).

    `class_weights` are the original prompts' class embeddings [C, D]: they name the class
    the triggered features point to."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)

    def encode(x: torch.Tensor) -> torch.Tensor:
        return model.encode_image(_normalise(x, mean, std), normalize=True)

    done = [0]
    total = cfg.steps * cfg.restarts

    def tick() -> None:
        done[0] += 1
        if progress:
            progress(done[0], total)

    runs = [_one_restart(encode, x01, cfg, gen, tick) for _ in range(cfg.restarts)]
    runs.sort(key=lambda r: r[1])
    best, _, history = runs[0]
    with torch.no_grad():
        clean = encode(x01)
        feats = encode(best.apply(x01))
        pred = (feats @ class_weights.T).argmax(1)
        centre = F.normalize(feats.mean(0), dim=-1)
        target = int((centre @ class_weights.T).argmax())
    keep = labels != target
    flip = float((pred[keep] == target).float().mean()) if bool(keep.any()) else 0.0
    consistency, clean_consistency = mean_pairwise_cos(feats), mean_pairwise_cos(clean)
    mask_l1 = float(best.mask.mean())
    return InversionResult(
        trigger=best, candidates=[r[0] for r in runs], target=target, flip_rate=flip,
        consistency=consistency, clean_consistency=clean_consistency, mask_l1=mask_l1,
        score=backdoor_score(flip, consistency, clean_consistency, mask_l1),
        mean_feature=centre, losses=history, seconds=time.perf_counter() - t0,
    )


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
