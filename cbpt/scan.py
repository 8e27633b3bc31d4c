"""The scan: is the model backdoored, toward which class, and shown by which evidence.

Two rules, in order (docs/method.md#the-scan):
1. the mask score: a small inverted mask that flips the shots into one class
   (docs/method.md#mask-score);
2. where the masks read clean, over-alignment: an inverted warp whose triggered shots come
   closer to the target's text than the target's own shots do (docs/method.md#over-alignment).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum

import torch

from cbpt.data import Shots
from cbpt.inversion import Candidate, InversionConfig, InversionResult, invert, probe
from cbpt.model import LoadedClip
from cbpt.trigger import TriggerKind

# Mask scores at or above this read "backdoored" (docs/method.md#mask-score).
SCAN_THRESHOLD = 0.55
# A warp over-aligned by this much beyond the masks that point elsewhere shows a backdoor
# (docs/method.md#over-alignment).
ALIGN_THRESHOLD = 0.5


class Evidence(StrEnum):
    """What showed the backdoor."""

    MASK = "mask"  # the mask score
    WARP = "warp"  # an over-aligned warp


@dataclass(frozen=True)
class Verdict:
    evidence: Evidence | None  # None: the scan reads clean
    target: int  # the backdoor's target, or the best mask's when none was found
    # the candidates that showed a found backdoor, each aimed at `target`; plan_tuning picks those tuned against
    triggers: list[Candidate]

    @property
    def backdoored(self) -> bool:
        return self.evidence is not None


def masks_found(inv: InversionResult) -> bool:
    """The mask score reads a backdoor: the first evidence, and then no warp is probed."""
    return inv.score >= SCAN_THRESHOLD


def _warp_margins(inv: InversionResult, threshold: float) -> list[tuple[float, Candidate]]:
    """Each warp's over-alignment beyond the masks that point to another class (or beyond
    zero, where none of those over-aligns), in units of `threshold`: 1 is the bar. A mask
    over-aligned toward the warp's own target corroborates it rather than raising its bar
    (docs/method.md#over-alignment)."""

    def others(target: int) -> float:
        return max(
            [0.0] + [m.over_alignment for m in inv.masks() if m.over_alignment is not None and m.target != target]
        )

    return [((w.over_alignment - others(w.target)) / threshold, w) for w in inv.warps() if w.over_alignment is not None]


def over_aligned(inv: InversionResult, threshold: float = ALIGN_THRESHOLD) -> list[Candidate]:
    """The warps over-aligned past their bar, toward the target of the most over-aligned one,
    most first."""
    found = sorted((w for m, w in _warp_margins(inv, threshold) if m >= 1), key=lambda w: -w.over_alignment)
    return [w for w in found if w.target == found[0].target]


def suspicion(inv: InversionResult) -> float:
    """Both rules as one continuous score: the larger of the mask score over SCAN_THRESHOLD
    and the best warp's over-alignment margin over ALIGN_THRESHOLD. It is at least 1 exactly
    where `read_scan` finds a backdoor, so a threshold on it is the verdict's ROC
    (docs/method.md#suspicion)."""
    margins = [m for m, _ in _warp_margins(inv, ALIGN_THRESHOLD)]
    return max([inv.score / SCAN_THRESHOLD, *margins])


def read_scan(inv: InversionResult) -> Verdict:
    if masks_found(inv):
        return Verdict(Evidence.MASK, inv.target, [replace(c, target=inv.target) for c in inv.masks()])
    aligned = over_aligned(inv)
    if aligned:  # every warp restart and probe then becomes a trigger for that target
        target = aligned[0].target
        return Verdict(Evidence.WARP, target, [replace(c, target=target) for c in inv.warps()])
    return Verdict(None, inv.target, [])


def run_scan(
    clip: LoadedClip,
    shots: Shots,
    cfg: InversionConfig,
    original: torch.Tensor,
    progress: Callable[[str, int, int], None] | None = None,
) -> InversionResult:
    """Step 1: invert; where the masks found a backdoor, search the compact masks asked for
    (docs/method.md#compact-probes); where they read clean, probe for a warp's evidence.
    `original`: the original prompts' head [C, D]."""

    def stage(name: str):
        return (lambda d, t: progress(name, d, t)) if progress else None

    encoder = clip.encoder()
    inv = invert(encoder, shots.pixels, shots.labels, original, cfg, stage("invert"))
    found = masks_found(inv)
    if not (cfg.compact.restarts if found else cfg.warp.probes):
        return inv
    kind, name = (TriggerKind.MASK, "compact") if found else (TriggerKind.WARP, "probe")
    return probe(encoder, shots.pixels, shots.labels, original, inv, kind, cfg, stage(name))


def scan_summary(inv: InversionResult, classnames: tuple[str, ...]) -> dict:
    """What `scan --json` prints and report.json's `scan` holds."""
    verdict = read_scan(inv)
    return {
        "backdoored": verdict.backdoored,
        "evidence": verdict.evidence,
        "target": classnames[verdict.target],
        "target_index": verdict.target,
        "score": round(inv.score, 4),
        "threshold": SCAN_THRESHOLD,
        "suspicion": round(suspicion(inv), 4),
        "alignment_threshold": ALIGN_THRESHOLD,
        "flip_rate": round(inv.flip_rate, 4),
        "consistency": round(inv.consistency, 4),
        "clean_consistency": round(inv.clean_consistency, 4),
        "mask_l1": round(inv.mask_l1, 4),
        # every restart, best mask first: where each sends the shots, and how far past the
        # target's own shots it pulls them toward the target's text
        "candidates": [
            {
                "kind": c.kind,
                "probe": c.probe,
                "target": classnames[c.target],
                "flip_rate": round(c.flip_rate, 4),
                "mask_l1": round(float(c.trigger.mask.mean()), 4) if c.kind is TriggerKind.MASK else None,
                "over_alignment": None if c.over_alignment is None else round(c.over_alignment, 3),
            }
            for c in inv.candidates
        ],
        "seconds": round(inv.seconds, 2),
    }
