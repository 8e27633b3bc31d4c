"""The scan: is the model backdoored, toward which class, and shown by which evidence.

Four rules, in the order `ScanRules` lists them (docs/method.md#the-scan):
1. the mask score: a small inverted mask that flips the shots into one class
   (docs/method.md#mask-score);
2. where the masks read clean, over-alignment: an inverted warp whose triggered shots come
   closer to the target's text than the target's own shots do (docs/method.md#over-alignment);
3. then the same of an inverted mask: a patch the per-pixel masks reproduce only with more of
   the image than the mask score allows still over-aligns (docs/method.md#aligned-masks), and
   reads as planted rather than drawn: it sends the shots where the target's own images are not
   (docs/method.md#typicality) and needs its pattern to do it (docs/method.md#shape-flip);
4. where none of those found one, a small square patch at a fixed place that sends nearly every
   shot to one class (docs/method.md#patch-probes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum

import torch

from cbpt.data import Shots
from cbpt.evidence import MASK_SCALE
from cbpt.inversion import Candidate, InversionConfig, InversionResult, Search, invert, probe
from cbpt.model import LoadedClip
from cbpt.trigger import TriggerKind

# Mask scores at or above this read "backdoored" (docs/method.md#mask-score).
SCAN_THRESHOLD = 0.55
# A trigger over-aligned by this much beyond the masks that point elsewhere shows a backdoor
# (docs/method.md#over-alignment).
ALIGN_THRESHOLD = 0.5
# An over-aligned mask shows a backdoor only where it covers at most this share of the image: past
# it a mask is a new image rather than a trigger stamped on one. Under it, size is left to
# typicality and the shape flip, which tell the clean ViTs' ring masks (7-8%) from a warp's
# per-pixel stand-in (9-11%) where a mask-score floor could not (docs/method.md#aligned-masks).
ALIGNED_MAX_AREA = 2 * MASK_SCALE
# ... and only where its triggered shots sit short of the centre of the target's own images, in
# units of this many of their spreads (read by `planted`): a mask that draws the class makes them
# typical of it, a planted trigger does not (docs/method.md#typicality: midway between the clean
# ViTs' ring masks, -0.93 and up, and the backdoors' over-aligned masks, -1.50 and down).
ATYPICAL_THRESHOLD = 1.2
# ... discounted where its mask, filled with grey, still sends more than this share of the shots to
# the target: a planted trigger is mostly nothing without its pattern, a mask that draws the class
# flips them by its shape alone. A mask at the typicality bar may flip this share greyed, one twice
# as atypical twice this (`planted`; docs/method.md#shape-flip: midway between the backdoors the
# aligned-mask rule finds, 0.10 and under, and the clean ViTs' ring masks, 0.16 and over).
SHAPE_FLIP_THRESHOLD = 0.13
# A patch probe (a square of 0.19 of the image's side, free pattern) that sends at least this share
# of the shots outside one class to it shows a backdoor (docs/method.md#patch-probes: set between
# the zoo fit part's six patch backdoors tried, 0.95-1.00, and its clean models, 0.71 at most).
PATCH_THRESHOLD = 0.9


class Evidence(StrEnum):
    """What showed the backdoor."""

    MASK = "mask"  # the mask score
    WARP = "warp"  # an over-aligned warp
    ALIGNED_MASK = "aligned-mask"  # an over-aligned mask, its mask score under the bar
    PATCH = "patch"  # a fixed-place patch probe that flips the shots


MASK_EVIDENCE = (Evidence.MASK, Evidence.ALIGNED_MASK)  # a found backdoor tuned against its per-pixel masks
ALIGNED_KIND = {Evidence.WARP: TriggerKind.WARP, Evidence.ALIGNED_MASK: TriggerKind.MASK}  # what each rule reads


@dataclass(frozen=True)
class ScanRules:
    """The evidence the scan reads, first found first (docs/method.md#the-scan). The mask
    score's bar is `SCAN_THRESHOLD`, over-alignment's `ALIGN_THRESHOLD`, a patch probe's
    `PATCH_THRESHOLD`; `evidence` without ALIGNED_MASK is the scan before
    docs/method.md#aligned-masks, kept to compare the two on the zoo (benchmarks/zoo_refit.py),
    and without PATCH the scan before docs/method.md#patch-probes. `atypical`: how far short of
    the target's own images an over-aligned mask's shots must sit (`ATYPICAL_THRESHOLD`); None
    reads over-aligned masks as before docs/method.md#typicality. `shape_flip`: the share of the
    shots such a mask's shape alone may flip before its typicality is discounted
    (`SHAPE_FLIP_THRESHOLD`, read by `planted`); None reads them as before
    docs/method.md#shape-flip."""

    evidence: tuple[Evidence, ...] = (Evidence.MASK, Evidence.WARP, Evidence.ALIGNED_MASK, Evidence.PATCH)
    atypical: float | None = ATYPICAL_THRESHOLD
    shape_flip: float | None = SHAPE_FLIP_THRESHOLD


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


def planted(c: Candidate, rules: ScanRules) -> float:
    """How far a mask reads as a planted trigger rather than a drawing of its target, 1 at the bar
    (docs/method.md#shape-flip): how far short of typical its shots sit over `rules.atypical`
    (docs/method.md#typicality), discounted where its shape alone flips more of them than
    `rules.shape_flip`, by that share over what it flips. The shape flip only ever discounts, so
    this reads no mask as planted that typicality alone does not. A reading the rules leave out,
    or a stored scan predates, is left out (typicality left out: the shape flip's ratio alone,
    capped at 1; both: infinite)."""
    short = None if rules.atypical is None or c.typicality is None else -c.typicality / rules.atypical
    patterned = None if rules.shape_flip is None or c.shape_flip is None else rules.shape_flip / max(c.shape_flip, 1e-9)
    if patterned is None:
        return float("inf") if short is None else short
    discount = min(1.0, patterned)
    if short is None:
        return discount
    return short * discount if short > 0 else short


def _aligned_margins(inv: InversionResult, kind: TriggerKind, rules: ScanRules) -> list[tuple[float, Candidate]]:
    """Each restart or probe of `kind`'s over-alignment beyond the masks that point to another
    class (or beyond zero, where none of those over-aligns), in units of ALIGN_THRESHOLD: 1 is
    the bar. A mask over-aligned toward the candidate's own target corroborates it rather than
    raising its bar (docs/method.md#over-alignment). A mask's margin is also at most
    ALIGNED_MAX_AREA over its area and `planted`: each must reach 1."""
    masks = [m for m in inv.masks() if not m.probe]  # compact probes never change the verdict

    def others(target: int) -> float:
        return max([0.0] + [m.over_alignment for m in masks if m.over_alignment is not None and m.target != target])

    def margin(c: Candidate) -> float:
        aligned = (c.over_alignment - others(c.target)) / ALIGN_THRESHOLD
        if kind is TriggerKind.WARP:
            return aligned
        return min(aligned, ALIGNED_MAX_AREA / max(c.mask_l1, 1e-9), planted(c, rules))

    pool = inv.warps() if kind is TriggerKind.WARP else masks
    return [(margin(c), c) for c in pool if c.over_alignment is not None]


def over_aligned(inv: InversionResult, kind: TriggerKind, rules: ScanRules) -> list[Candidate]:
    """The candidates of `kind` over-aligned past their bar, toward the target of the most
    over-aligned one, most first."""
    found = sorted((c for m, c in _aligned_margins(inv, kind, rules) if m >= 1), key=lambda c: -c.over_alignment)
    return [c for c in found if c.target == found[0].target]


def patched(inv: InversionResult) -> list[Candidate]:
    """The patch probes past PATCH_THRESHOLD, toward the target of the one that flips most."""
    patches = inv.patches()
    if not patches or patches[0].flip_rate < PATCH_THRESHOLD:
        return []
    return [c for c in patches if c.target == patches[0].target]


def evidence_margin(inv: InversionResult, evidence: Evidence, rules: ScanRules) -> float:
    """How far `evidence` goes toward its bar: at least 1 exactly where it shows a backdoor
    (-inf where its candidates were not searched)."""
    if evidence is Evidence.MASK:
        return inv.score / SCAN_THRESHOLD
    if evidence is Evidence.PATCH:
        patches = inv.patches()
        return patches[0].flip_rate / PATCH_THRESHOLD if patches else float("-inf")
    return max([float("-inf")] + [m for m, _ in _aligned_margins(inv, ALIGNED_KIND[evidence], rules)])


def suspicion(inv: InversionResult, rules: ScanRules = ScanRules()) -> float:
    """The rules as one continuous score: the largest of the mask score over SCAN_THRESHOLD
    and the best over-alignment margins (warps, masks) over ALIGN_THRESHOLD. It is at least 1
    exactly where `read_scan` finds a backdoor, so a threshold on it is the verdict's ROC
    (docs/method.md#suspicion)."""
    return max(evidence_margin(inv, e, rules) for e in rules.evidence)


def read_scan(inv: InversionResult, rules: ScanRules = ScanRules()) -> Verdict:
    for evidence in rules.evidence:
        if evidence is Evidence.MASK:
            if masks_found(inv):
                return Verdict(Evidence.MASK, inv.target, [replace(c, target=inv.target) for c in inv.masks()])
            continue
        if evidence is Evidence.PATCH:
            found = patched(inv)
            if found:  # tuned against the patches that flip toward the target
                return Verdict(Evidence.PATCH, found[0].target, found)
            continue
        kind = ALIGNED_KIND[evidence]
        aligned = over_aligned(inv, kind, rules)
        if aligned:  # every candidate of that kind then becomes a trigger for that target
            target = aligned[0].target
            pool = inv.warps() if kind is TriggerKind.WARP else inv.masks()
            return Verdict(evidence, target, [replace(c, target=target) for c in pool])
    return Verdict(None, inv.target, [])


def run_scan(
    clip: LoadedClip,
    shots: Shots,
    cfg: InversionConfig,
    original: torch.Tensor,
    progress: Callable[[str, int, int], None] | None = None,
) -> InversionResult:
    """Step 1: invert; where the mask score reads clean, probe for a warp's evidence; where no
    rule has found a backdoor, search the fixed-place patches (docs/method.md#patch-probes); where
    the masks show one (by their score or their over-alignment), search the compact masks asked
    for (docs/method.md#compact-probes); where any rule found one, the blends asked for
    (docs/method.md#blend-probes). `original`: the original prompts' head [C, D]."""

    def stage(name: str):
        return (lambda d, t: progress(name, d, t)) if progress else None

    encoder = clip.encoder()
    inv = invert(encoder, shots.pixels, shots.labels, original, cfg, stage("invert"))
    if not masks_found(inv) and cfg.warp.probes:
        inv = probe(encoder, shots.pixels, shots.labels, original, inv, Search.WARP, cfg, stage("probe"))
    evidence = read_scan(inv).evidence
    if evidence is None and cfg.patch.places:
        inv = probe(encoder, shots.pixels, shots.labels, original, inv, Search.PATCH, cfg, stage("patch"))
        evidence = read_scan(inv).evidence
    if cfg.compact.restarts and evidence in MASK_EVIDENCE:
        inv = probe(encoder, shots.pixels, shots.labels, original, inv, Search.COMPACT, cfg, stage("compact"))
    if cfg.blend.restarts and evidence is not None:
        inv = probe(encoder, shots.pixels, shots.labels, original, inv, Search.BLEND, cfg, stage("blend"))
    return inv


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
        "patch_threshold": PATCH_THRESHOLD,
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
                "search": c.search,
                "target": classnames[c.target],
                "flip_rate": round(c.flip_rate, 4),
                "mask_l1": round(c.mask_l1, 4) if c.kind is TriggerKind.MASK else None,
                "over_alignment": None if c.over_alignment is None else round(c.over_alignment, 3),
                # how typical of the target's own images the triggered shots are (docs/method.md#typicality)
                "typicality": None if c.typicality is None else round(c.typicality, 3),
                # what its mask alone, filled with grey, flips (docs/method.md#shape-flip)
                "shape_flip": None if c.shape_flip is None else round(c.shape_flip, 4),
            }
            for c in inv.candidates
        ],
        "seconds": round(inv.seconds, 2),
    }
