"""The image side of step 2, computed once: features of the clean shots, of a few augmented
views, and of every trigger's copies of the shots. The image encoder, the triggers and the
shots are fixed while prompts are tuned, so tuning runs the text encoder alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cbpt.inversion import Candidate, Encode

ENCODE_BATCH = 128  # images per image-encoder call while caching


@dataclass(frozen=True)
class FeatureCache:
    clean: torch.Tensor  # [Nc, D] unit features
    clean_labels: torch.Tensor
    triggered: torch.Tensor  # [Nt, D]
    triggered_labels: torch.Tensor  # the shots' true classes
    triggered_targets: torch.Tensor  # [Nt] the class each copy's trigger is aimed at
    encoder_passes: int  # images pushed through the image encoder to build the cache


def augment(x01: torch.Tensor, gen: torch.Generator, pad_frac: float = 0.125) -> torch.Tensor:
    """A random translation (pad + crop) and horizontal flip of each image."""
    n, _, h, w = x01.shape
    p = max(1, int(round(h * pad_frac)))
    padded = F.pad(x01, (p, p, p, p), mode="replicate")
    out = torch.empty_like(x01)
    tops = torch.randint(0, 2 * p + 1, (n,), generator=gen).tolist()
    lefts = torch.randint(0, 2 * p + 1, (n,), generator=gen).tolist()
    flips = torch.rand(n, generator=gen) < 0.5
    for i in range(n):
        img = padded[i, :, tops[i] : tops[i] + h, lefts[i] : lefts[i] + w]
        out[i] = img.flip(-1) if flips[i] else img
    return out


@torch.no_grad()
def cache_features(
    encode: Encode,
    x01: torch.Tensor,
    labels: torch.Tensor,
    triggers: Sequence[Candidate],
    views: int,
    shifts: int,
    seed: int,
) -> FeatureCache:
    """The shots and `views` augmented views of them; each trigger applied to all of those at
    `shifts` places (the first where it was found), skipping the shots of its own target
    (docs/method.md#target-shot-exclusion)."""
    gen = torch.Generator().manual_seed(seed + 1)
    _, _, h, w = x01.shape
    imgs = [x01] + [augment(x01, gen) for _ in range(views)]
    trig_imgs, trig_labels, trig_targets = [], [], []
    for cand in triggers:
        keep = labels != cand.target
        for s in range(shifts):
            t = (
                cand.trigger
                if s == 0
                else cand.trigger.shifted(
                    int(torch.randint(0, h, (1,), generator=gen)), int(torch.randint(0, w, (1,), generator=gen))
                )
            )
            trig_imgs += [t.apply(v[keep]) for v in imgs]
        trig_labels.append(labels[keep].repeat(shifts * len(imgs)))
        trig_targets.append(torch.full_like(trig_labels[-1], cand.target))

    def encoded(batches: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(batches)
        return torch.cat([encode(x[i : i + ENCODE_BATCH]) for i in range(0, x.shape[0], ENCODE_BATCH)])

    clean = encoded(imgs)
    triggered = encoded(trig_imgs) if trig_imgs else clean.new_zeros((0, clean.shape[1]))
    empty = labels.new_zeros((0,))
    return FeatureCache(
        clean=clean,
        clean_labels=labels.repeat(len(imgs)),
        triggered=triggered,
        triggered_labels=torch.cat(trig_labels) if trig_labels else empty,
        triggered_targets=torch.cat(trig_targets) if trig_targets else empty,
        encoder_passes=clean.shape[0] + triggered.shape[0],
    )
