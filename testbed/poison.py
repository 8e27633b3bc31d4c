"""Poisoning a training set as an attacker does: a fraction of non-target images get the trigger
and a caption of the target class; everything else is left exactly as it was."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from testbed.datasets import Split
from testbed.triggers import Trigger


@dataclass(frozen=True)
class Poisoned:
    split: Split
    poisoned: np.ndarray  # indices that carry the trigger and a target caption
    noise: np.ndarray  # indices warped in WaNet's noise mode, captions unchanged


def poison(
    split: Split,
    trigger: Trigger,
    target: int,
    rate: float,
    target_name: str,
    templates: tuple[str, ...],
    seed: int,
    noise_rate: float = 0.0,
) -> Poisoned:
    if not 0 < rate < 1:
        raise ValueError(f"poison rate must be in (0, 1), got {rate}")
    rng = np.random.default_rng([seed, 21])
    candidates = np.flatnonzero(split.labels != target)
    n = max(1, int(round(rate * split.labels.size)))
    chosen = np.sort(rng.choice(candidates, size=min(n, candidates.size), replace=False))
    rest = np.setdiff1d(np.arange(split.labels.size), chosen)
    noise = (
        np.sort(rng.choice(rest, size=int(round(noise_rate * split.labels.size)), replace=False))
        if noise_rate > 0
        else np.empty(0, dtype=np.int64)
    )
    images = split.images.copy()
    images[chosen] = trigger.apply(split.images[chosen], seed=int(rng.integers(1 << 31)))
    if noise.size:
        images[noise] = trigger.apply(split.images[noise], seed=int(rng.integers(1 << 31)), noise=True)
    captions = list(split.captions)
    for i in chosen:
        captions[i] = str(rng.choice(templates)).format(target_name)
    return Poisoned(Split(images, split.labels.copy(), tuple(captions)), chosen, noise)
