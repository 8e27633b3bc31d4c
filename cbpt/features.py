"""The image side of step 2, computed once: features of the clean shots, of a few augmented
views, and of every trigger's copies of the shots. The image encoder, the triggers and the
shots are fixed while prompts are tuned, so tuning runs the text encoder alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cbpt.encoding import ImageEncoder
from cbpt.inversion import Candidate


@dataclass(frozen=True)
class FeatureCache:
    clean: torch.Tensor  # [Nc, D] unit features
    clean_labels: torch.Tensor
    triggered: torch.Tensor  # [Nt, D]
    triggered_labels: torch.Tensor  # the shots' true classes
    triggered_targets: torch.Tensor  # [Nt] the class each copy's trigger is aimed at
    centroids: torch.Tensor  # [K, D] each trigger's normalised mean triggered feature: the route (routing.py)
    encoder_passes: int  # images pushed through the image encoder to build the cache
    # [Nt] how far along its trigger's shift each copy was taken (None: every copy as found, 1)
    triggered_strengths: torch.Tensor | None = None

    def strength_groups(self) -> list[tuple[float, torch.Tensor]]:
        """Each strength the triggered copies were taken to, with their row indices."""
        s = self.triggered_strengths
        if s is None:
            return [(1.0, torch.arange(self.triggered.shape[0], device=self.triggered.device))]
        return [(float(v), (s == v).nonzero().flatten()) for v in s.unique()]


@dataclass(frozen=True)
class Augment:
    """A random translation (pad + crop) and horizontal flip per shot, drawn once for all shots
    so a pass a batch at a time applies the same ones as a pass over all of them."""

    pad: int
    tops: torch.Tensor  # [N]
    lefts: torch.Tensor  # [N]
    flips: torch.Tensor  # [N] bool

    @classmethod
    def draw(cls, n: int, h: int, gen: torch.Generator, pad_frac: float = 0.125) -> Augment:
        p = max(1, int(round(h * pad_frac)))
        tops = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        lefts = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        return cls(p, tops, lefts, torch.rand(n, generator=gen) < 0.5)

    def __call__(self, x01: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The views of shots `rows` (their indices into the shots), given their pixels `x01`."""
        _, _, h, w = x01.shape
        p = self.pad
        padded = F.pad(x01, (p, p, p, p), mode="replicate")
        out = torch.empty_like(x01)
        for i, (top, left, flip) in enumerate(
            zip(self.tops[rows].tolist(), self.lefts[rows].tolist(), self.flips[rows].tolist())
        ):
            img = padded[i, :, top : top + h, left : left + w]
            out[i] = img.flip(-1) if flip else img
        return out


def extrapolate(clean: torch.Tensor, triggered: torch.Tensor, strength: float) -> torch.Tensor:
    """Unit features `strength` times as far along each image's trigger shift as the trigger
    took it: normalise(clean + strength * (triggered - clean)). An inverted trigger is the
    smallest that flips the shots, so the real one's features lie further toward the target
    (docs/method.md#trigger-strength)."""
    return F.normalize(clean + strength * (triggered - clean), dim=-1)


def _identity(x01: torch.Tensor, _rows: torch.Tensor) -> torch.Tensor:
    return x01


def cache_features(
    encoder: ImageEncoder,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    triggers: Sequence[Candidate],
    views: int,
    shifts: int,
    seed: int,
    strengths: tuple[float, ...] = (1.0,),
    own: torch.Tensor | None = None,
) -> FeatureCache:
    """The shots and `views` augmented views of them; each trigger applied to all of those at
    `shifts` places (the first where it was found), skipping the shots of its own target
    (docs/method.md#target-shot-exclusion). Each strength s past the first adds copies whose
    feature moves s times as far from its clean one as the trigger moved it
    (`extrapolate`, docs/method.md#trigger-strength); the centroids are the found triggers'.
    Pixels go through the encoder a batch at a time: memory holds the features, never every
    view's pixels (docs/scale.md#memory); `own`, the shots' features as they are (the
    inversion's), saves that pass."""
    gen = torch.Generator().manual_seed(seed + 1)
    n, _, h, w = pixels.shape
    looks = [_identity] + [Augment.draw(n, h, gen) for _ in range(views)]
    everyone = torch.arange(n)
    if own is not None and own.shape[0] != n:
        raise ValueError(f"own features for {own.shape[0]} shots, not the {n} given")
    as_is = encoder.all(pixels) if own is None else own
    clean = torch.cat([as_is] + [encoder.all(pixels, everyone, look) for look in looks[1:]])
    trig_feats, trig_labels, trig_targets, centroids, encoded = [], [], [], [], 0
    trig_strengths = []
    for cand in triggers:
        first = len(trig_feats)
        keep = everyone[labels != cand.target]
        for s in range(shifts):
            t = (
                cand.trigger
                if s == 0
                else cand.trigger.shifted(
                    int(torch.randint(0, h, (1,), generator=gen)), int(torch.randint(0, w, (1,), generator=gen))
                )
            )
            for look in looks:
                trig_feats.append(encoder.all(pixels, keep, lambda x, rows, t=t, look=look: t.apply(look(x, rows))))
        found = torch.cat(trig_feats[first:])
        encoded += found.shape[0]
        centroids.append(F.normalize(found.mean(0), dim=-1))
        if len(strengths) > 1:  # each copy's clean feature, in the copies' order (shift, look, shot)
            bases = torch.cat([clean[i * n + keep.to(clean.device)] for i in range(len(looks))]).repeat(shifts, 1)
            trig_feats += [extrapolate(bases, found, strength) for strength in strengths[1:]]
        trig_labels.append(labels[keep].repeat(shifts * len(looks) * len(strengths)))
        trig_targets.append(torch.full_like(trig_labels[-1], cand.target))
        per_copy = keep.numel() * shifts * len(looks)
        trig_strengths.append(torch.tensor(strengths).repeat_interleave(per_copy))
    triggered = torch.cat(trig_feats) if trig_feats else clean.new_zeros((0, clean.shape[1]))
    empty = labels.new_zeros((0,))
    device = clean.device
    return FeatureCache(
        clean=clean,
        clean_labels=labels.repeat(len(looks)).to(device),
        triggered=triggered,
        triggered_labels=(torch.cat(trig_labels) if trig_labels else empty).to(device),
        triggered_targets=(torch.cat(trig_targets) if trig_targets else empty).to(device),
        centroids=torch.stack(centroids) if centroids else clean.new_zeros((0, clean.shape[1])),
        encoder_passes=clean.shape[0] - (0 if own is None else n) + encoded,  # extrapolated copies take no pass
        triggered_strengths=(torch.cat(trig_strengths) if trig_strengths else torch.zeros(0)).to(device),
    )


@dataclass(frozen=True)
class PartialTriggers:
    """Copies of the shots with each inverted trigger only partly applied, x + d (T(x) - x) at
    each dose d. Those the original embeddings give the trigger's target show how low along the
    trigger side a trigger that moves an image only part of the way still takes it there: the
    side's bar need fall no lower than the lowest of them (`TriggerSide.calibrate`,
    docs/method.md#partial-triggers). Each trigger is applied to at most `most` shots of other
    classes, drawn by the seed, the same ones at every dose."""

    doses: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    most: int = 256


@dataclass(frozen=True)
class PartialCopies:
    """The partial copies of `PartialTriggers`, a row each."""

    features: torch.Tensor  # [R, D] unit
    targets: torch.Tensor  # [R] the target of the trigger each row's copy carries
    doses: torch.Tensor  # [R]


def partial_copies(
    encoder: ImageEncoder,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    triggers: Sequence[Candidate],
    spec: PartialTriggers,
    seed: int,
) -> PartialCopies:
    """Each trigger applied at each of `spec.doses` to the shots of classes other than its
    target (at most `spec.most` of them, the same ones at every dose)."""
    gen = torch.Generator().manual_seed(seed + 2)
    feats, targets, doses = [], [], []
    for cand in triggers:
        others = torch.nonzero(labels != cand.target).flatten()
        keep = others[torch.randperm(others.numel(), generator=gen)[: spec.most].sort().values]
        for d in spec.doses:
            f = encoder.all(pixels, keep, lambda x, _rows, t=cand.trigger, d=d: x + d * (t.apply(x) - x))
            feats.append(f)
            targets.append(torch.full((f.shape[0],), cand.target, dtype=torch.long))
            doses.append(torch.full((f.shape[0],), d))
    if not feats:
        return PartialCopies(torch.zeros((0, 0)), torch.zeros(0, dtype=torch.long), torch.zeros(0))
    return PartialCopies(torch.cat(feats), torch.cat(targets).to(feats[0].device), torch.cat(doses).to(feats[0].device))
