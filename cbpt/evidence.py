"""The statistics the scan reads off an inverted trigger: pure functions on unit features.

Each is measured per candidate by `inversion`; `scan` turns them into a verdict.
docs/method.md#mask-score and docs/method.md#over-alignment hold the evidence behind them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# A mask covering this share of the image or more scores 0: a clean model's natural features
# need far larger masks than a backdoor's shortcut (docs/method.md#mask-score).
MASK_SCALE = 0.08
# Fewer shots of the target class than this give no spread to measure over-alignment in.
MIN_ALIGNMENT_SHOTS = 8


def mean_pairwise_cos(features: torch.Tensor) -> float:
    """Mean cosine between distinct rows of unit features: 1 when they have collapsed to one point."""
    n = features.shape[0]
    if n < 2:
        return 1.0
    # sum over i != j of <f_i, f_j> = |sum_i f_i|^2 - sum_i |f_i|^2: linear in n, no n x n matrix
    f = features.double()
    total = f.sum(0)
    return float((total @ total - (f * f).sum()) / (n * (n - 1)))


def points_to(feats: torch.Tensor, class_weights: torch.Tensor) -> int:
    """The class whose text embedding is nearest the triggered shots' mean feature."""
    return int((F.normalize(feats.mean(0), dim=-1) @ class_weights.T).argmax())


def flip_rate(feats: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor, target: int) -> float:
    """The share of triggered shots outside `target` that the head sends to `target`."""
    keep = labels != target
    if not bool(keep.any()):
        return 0.0
    return float(((feats[keep] @ class_weights.T).argmax(1) == target).float().mean())


def backdoor_score(flip: float, mask_l1: float) -> float:
    """The mask score: the share of shots the inverted mask sends to one class, discounted by
    the share of the image it needs; 1 for a tiny mask that flips everything, 0 for one
    covering MASK_SCALE of the image or more."""
    return flip * max(0.0, 1.0 - mask_l1 / MASK_SCALE)


def _past_own(
    feats: torch.Tensor,
    clean: torch.Tensor,
    labels: torch.Tensor,
    target: int,
    min_shots: int,
    axis: Callable[[torch.Tensor], torch.Tensor],
) -> float | None:
    """How far the triggered shots of the other classes pass the target's own clean shots along
    `axis(own)`, in units of the own shots' spread there (None with fewer than `min_shots` of
    them): what over-alignment and typicality each read along their own axis."""
    own = clean[labels == target]
    others = labels != target
    if own.shape[0] < max(min_shots, 2) or not bool(others.any()):
        return None
    along = axis(own)
    near = own @ along
    return float(((feats[others] @ along).mean() - near.mean()) / near.std().clamp_min(1e-6))


def over_alignment(
    feats: torch.Tensor,
    clean: torch.Tensor,
    labels: torch.Tensor,
    class_weights: torch.Tensor,
    target: int,
    min_shots: int = MIN_ALIGNMENT_SHOTS,
) -> float | None:
    """How much closer the triggered shots of the other classes come to the target's text
    embedding than the target's own clean shots do, in units of the latter's spread (None with
    fewer than `min_shots` of them). A poisoned model was trained to pull triggered images onto
    the target's caption; a natural feature makes images look like the class, not more so."""
    return _past_own(feats, clean, labels, target, min_shots, lambda _own: class_weights[target])


def typicality(
    feats: torch.Tensor, clean: torch.Tensor, labels: torch.Tensor, target: int, min_shots: int = MIN_ALIGNMENT_SHOTS
) -> float | None:
    """How close the triggered shots of the other classes come to the centre of the target's own
    clean shots, beside those shots themselves, in units of their spread (None with fewer than
    `min_shots` of them). About 0 or above: the trigger makes images look like the class's own,
    as a natural feature drawn on them does (a ring around any shape); far below: it sends them
    where the class's own images are not, which only a learnt shortcut does
    (docs/method.md#typicality)."""
    return _past_own(feats, clean, labels, target, min_shots, lambda own: F.normalize(own.mean(0), dim=-1))
