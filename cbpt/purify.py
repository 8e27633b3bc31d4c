"""CBPT end to end on a loaded model: scan -> verdict -> tuning plan -> feature cache -> tune.

`outputs` turns the result into files; the CLI stages them with the exported heads.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum

import numpy as np
import torch

from cbpt.data import ShotBudget, Shots
from cbpt.features import cache_features, partial_copies
from cbpt.inversion import Candidate, InversionConfig, InversionResult
from cbpt.metrics import threshold_at_fpr
from cbpt.model import LoadedClip
from cbpt.prompts import ClassPrompts
from cbpt.scan import MASK_EVIDENCE, Verdict, read_scan, run_scan
from cbpt.tuning import (
    Acceptance,
    CautiousAcceptance,
    FullAcceptance,
    Ladder,
    TuningConfig,
    TuningData,
    TuningResult,
    tune,
)
from cbpt.zeroshot import zeroshot_weights
from cbpt_guard.routing import (
    SIDE_REACH,
    Route,
    TargetGate,
    TriggerSide,
    calibrate_route,
    copies_apart,
    within_class_scatter,
)

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class PushOff:
    """Step 2 also pushes the triggered copies off their target (`losses.away_loss`, weighed by
    `TuningConfig.away`) where, on every found target, the copies stand at least `apart` spreads
    from the target's own clean shots (`copies_apart`). There the backdoor has collapsed its
    triggered images onto a region of the target's that its own images do not reach: a head that
    only sends the copies' remnants home need not hold a few degrees off, where the real trigger's
    images land, and the trigger side keeps the target's own images on the original embeddings,
    so pushing the target off that region costs them little. Nearer, the push takes the target's
    own images with it (docs/method.md#push-off)."""

    weight: float = 2.0
    apart: float = 6.5

    def tuning(self, tuning: TuningConfig, apart: np.ndarray) -> TuningConfig:
        """`tuning` with the push where the copies stand apart (a tuning that pushes already keeps its own weight)."""
        if tuning.away or not len(apart) or float(np.min(apart)) < self.apart:
            return tuning
        return replace(tuning, away=self.weight)


@dataclass(frozen=True)
class PurifyConfig:
    budget: ShotBudget = field(default_factory=ShotBudget)  # K per class, held-out ones among them
    seed: int = 0
    force: bool = False  # tune as for a found backdoor even when the scan reads clean (docs/method.md#force)
    # share of the clean shots routed to the purified embeddings; 1: they answer for every
    # image, as in the paper (cbpt_guard/routing.py, docs/method.md#routing)
    routed_share: float = 0.2
    target_gate: TargetGate = TargetGate.TRIGGER_SIDE  # which images given a found target are routed
    side_reach: float = SIDE_REACH  # the trigger side's reach, in spreads (`TriggerSide.calibrate`)
    # None: the copies are only sent home, never pushed (purify --no-push-off)
    push_off: PushOff | None = field(default_factory=PushOff)
    inversion: InversionConfig = field(default_factory=InversionConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)

    def seeded(self, seed: int) -> PurifyConfig:
        """This config as `purify --seed` runs it: the shot draw, the inversion and the tuning
        all seeded with `seed`, so one seed names one shot set's whole run."""
        return replace(
            self, seed=seed, inversion=replace(self.inversion, seed=seed), tuning=replace(self.tuning, seed=seed)
        )


class TuningMode(StrEnum):
    FULL = "full"  # a backdoor was found, or --force
    CAUTIOUS = "cautious"  # the scan read clean: the original prompts compete (docs/method.md#cautious-mode)
    SKIPPED = "skipped"  # the scan read clean and no shots were held out to check a change against


@dataclass(frozen=True)
class TuningPlan:
    """How a model is tuned, decided from its scan (docs/method.md#tuning-plan)."""

    mode: TuningMode
    triggers: list[Candidate]  # each aimed at the target it is tuned against
    acceptance: Acceptance
    tuning: TuningConfig  # with the ladder this mode may climb


def plan_tuning(verdict: Verdict, inversion: InversionResult, cfg: PurifyConfig, held_out: bool) -> TuningPlan:
    """A found backdoor is tuned against the triggers that showed it (or the compact masks that
    stand in for them) and the blends that pull as hard (docs/method.md#blend-probes), each aimed
    at its target; a model that reads clean (tuned cautiously, or with --force) against every restart but the
    probes, each at its own target. A model that reads clean is never escalated: a natural
    feature keeps held-out shots at its class whatever the strength; and its checkpoints are
    judged on every held-out shot, not as served (docs/method.md#served-reading: read as served,
    a clean model's tuned head lost 4.9 CA points). With no held-out shots the schedule is
    `TuningConfig.unchecked`'s."""
    tol, kl = cfg.tuning.clean_tolerance, cfg.tuning.max_clean_kl
    tuning = cfg.tuning if held_out else cfg.tuning.unchecked(cfg.budget.tuning())
    suspected = verdict.backdoored or cfg.force
    triggers = verdict.triggers if verdict.backdoored else inversion.restarts()
    if verdict.evidence in MASK_EVIDENCE:
        triggers = cfg.inversion.compact.tuned_against(triggers, inversion, verdict.target)
    if verdict.backdoored:
        triggers = triggers + cfg.inversion.blend.tuned_beside(inversion, verdict.target)
    if suspected:
        return TuningPlan(TuningMode.FULL, triggers, FullAcceptance(tol, kl), tuning)
    mode = TuningMode.CAUTIOUS if held_out else TuningMode.SKIPPED
    cautious = replace(tuning, ladder=Ladder.off(), served=None, partial=None)  # no found target: no trigger side
    return TuningPlan(mode, triggers, CautiousAcceptance(tol, max_clean_kl=kl), cautious)


@dataclass
class Purified:
    classnames: tuple[str, ...]
    purified: torch.Tensor  # [C, D]
    original: torch.Tensor  # [C, D] the original prompts' head
    logit_scale: float
    inversion: InversionResult
    plan: TuningPlan
    tuning: TuningResult | None  # None: tuning was skipped
    timings: dict
    alarm: dict  # the runtime trigger alarm, calibrated on clean shots
    alarm_centres: torch.Tensor  # [K, D] unit: the regions the alarm measures closeness to (`alarm_centres`)
    route: Route | None = None  # None: the purified embeddings answer everywhere (or equal the original)
    apart: tuple[float, ...] = ()  # the found targets' copies from their own shots, in spreads (`apart`)


def original_head(clip: LoadedClip, classnames: tuple[str, ...]) -> torch.Tensor:
    return zeroshot_weights(clip.model, clip.tokenizer(), classnames, clip.templates)


def tuning_data(
    clip: LoadedClip,
    shots: Shots,
    triggers: list[Candidate],
    tuning: TuningConfig,
    original: torch.Tensor,
    own: torch.Tensor | None = None,
) -> TuningData:
    """The feature caches of the tuning shots (with augmented views) and of the held-out ones,
    and the tuning shots' partial copies (`TuningConfig.partial`); `own`: the tuning shots'
    features, where the inversion has them already."""
    encoder = clip.encoder()
    cache = cache_features(
        encoder, shots.pixels, shots.labels, triggers, tuning.views, tuning.shifts, tuning.seed, tuning.strengths, own
    )
    held = None
    if shots.held_pixels is not None:
        held = cache_features(
            encoder, shots.held_pixels, shots.held_labels, triggers, 0, 1, tuning.seed, tuning.held_out_strengths
        )
    partial = None
    if tuning.partial is not None:
        partial = partial_copies(encoder, shots.pixels, shots.labels, triggers, tuning.partial, tuning.seed)
    return TuningData(cache, held, original, clip.logit_scale, partial=partial)


def tune_prompts(
    clip: LoadedClip,
    classnames: tuple[str, ...],
    data: TuningData,
    tuning: TuningConfig,
    acceptance: Acceptance,
    progress: Callable[[int, int], None] | None = None,
) -> TuningResult:
    prompts = ClassPrompts(
        clip.model, clip.tokenizer(), classnames, n_ctx=tuning.n_ctx, seed=tuning.seed, autocast=clip.runtime.autocast
    )
    return tune(prompts, data, tuning, acceptance, progress)


def calibration_features(data: TuningData) -> torch.Tensor:
    """The clean features the alarm and the route are calibrated on: the tuning shots, their
    views and the held-out shots."""
    return data.cache.clean if data.held_out is None else torch.cat([data.cache.clean, data.held_out.clean])


def calibration_labels(data: TuningData) -> torch.Tensor:
    """The classes of `calibration_features(data)`, row for row."""
    labels = data.cache.clean_labels
    return labels if data.held_out is None else torch.cat([labels, data.held_out.clean_labels])


@dataclass(frozen=True)
class SideEvidence:
    """What `TriggerSide.calibrate` reads, per found target (`side_evidence`)."""

    own: list[np.ndarray]  # its own clean calibration features
    copies: list[np.ndarray]  # the triggered copies aimed at it, as found
    scatter: np.ndarray  # the within-class scatter of every clean calibration feature
    partial: list[np.ndarray] | None = None  # the partial copies given it (None: none made)


def side_evidence(data: TuningData, targets: list[int]) -> SideEvidence:
    """Per target in `targets`: its own clean calibration features, the triggered copies aimed
    at it, as found (`TuningConfig.strengths` aside), and the partial copies the original
    embeddings give it (`TuningConfig.partial`); and the within-class scatter of every clean
    calibration feature."""
    c = data.cache
    labels, clean = calibration_labels(data).cpu(), calibration_features(data).float().cpu().numpy()
    aimed, copies = c.triggered_targets.cpu(), c.triggered.float().cpu().numpy()
    if c.triggered_strengths is not None and len(c.triggered_strengths):
        aimed = torch.where(c.triggered_strengths.cpu() == 1.0, aimed, -1)  # copies taken further aim nowhere
    own = [clean[(labels == t).numpy()] for t in targets]
    scatter = within_class_scatter(clean, labels.numpy())
    return SideEvidence(own, [copies[(aimed == t).numpy()] for t in targets], scatter, _given(data, targets))


def _given(data: TuningData, targets: list[int]) -> list[np.ndarray] | None:
    """Per target: the partial copies carrying a trigger aimed at it that the original embeddings
    give it, at every dose."""
    p = data.partial
    if p is None or not len(p.targets):
        return None
    feats, aimed = p.features.float().cpu(), p.targets.cpu()
    given = (feats @ data.original.float().cpu().T).argmax(1)
    return [feats[(aimed == t) & (given == t)].numpy() for t in targets]


def trigger_side(
    data: TuningData, targets: list[int], reach: float = SIDE_REACH, evidence: SideEvidence | None = None
) -> TriggerSide:
    """The gate's `TriggerSide`, a row per target in `targets`, calibrated on `evidence`
    (`side_evidence(data, targets)`, read here where None)."""
    e = side_evidence(data, targets) if evidence is None else evidence
    return TriggerSide.calibrate(e.own, e.copies, e.scatter, reach=reach, partial=e.partial)


def found_targets(plan: TuningPlan) -> list[int]:
    """The targets of a found backdoor's triggers (FULL mode); none for a model read clean."""
    return sorted({c.target for c in plan.triggers}) if plan.mode is TuningMode.FULL else []


def apart(data: TuningData, plan: TuningPlan, evidence: SideEvidence | None = None) -> np.ndarray:
    """[T] how far the copies aimed at each found target stand from its own clean calibration
    shots, in spreads (`copies_apart`, `found_targets`; empty for a model read clean), read from
    `evidence` (`side_evidence` of the found targets; read here where None)."""
    targets = found_targets(plan)
    if not targets:
        return np.zeros(0)
    e = side_evidence(data, targets) if evidence is None else evidence
    return copies_apart(e.own, e.copies, e.scatter)


def pushed_off(plan: TuningPlan, spreads: np.ndarray, push: PushOff | None) -> TuningPlan:
    """`plan` with step 2's push off the target where `push` says, the found targets' copies
    standing `spreads` apart (`apart`; `PushOff`; None: as it is)."""
    return plan if push is None else replace(plan, tuning=push.tuning(plan.tuning, spreads))


def route_for(
    data: TuningData,
    calibration: torch.Tensor,
    share: float,
    plan: TuningPlan,
    gate: TargetGate = TargetGate.TRIGGER_SIDE,
    reach: float = SIDE_REACH,
    evidence: SideEvidence | None = None,
) -> Route | None:
    """Where the tuned embeddings answer: `share` of the clean `calibration` features
    (`calibration_features(data)`) around the triggers tuned against, and, for a found
    backdoor (FULL mode), the images the original embeddings give its target that `gate`
    takes, its trigger side calibrated with `reach` on `evidence` (`side_evidence` of the found
    targets; None: read from `data`) (None at share 1: everywhere)."""
    if share >= 1 or not len(data.cache.centroids):
        return None
    clean, centroids, original = (t.float().cpu().numpy() for t in (calibration, data.cache.centroids, data.original))
    targets = found_targets(plan)
    side = trigger_side(data, targets, reach, evidence) if targets and gate is TargetGate.TRIGGER_SIDE else None
    return calibrate_route(clean, centroids, share, original, targets, side)


@dataclass
class Step2:
    """Step 2 as purify runs it on cached features (`tune_routed`)."""

    plan: TuningPlan  # as tuned: with the push off the target where the copies stand apart (`PushOff`)
    route: Route | None  # as calibrated for it; the head ships it unless the original prompts were kept
    spreads: np.ndarray  # [T] the found targets' copies from their own shots (`apart`)
    result: TuningResult

    @property
    def shipped_route(self) -> Route | None:
        return None if self.result.kept_original else self.route


def tune_routed(
    clip: LoadedClip,
    classnames: tuple[str, ...],
    data: TuningData,
    plan: TuningPlan,
    cfg: PurifyConfig,
    progress: Callable[[int, int], None] | None = None,
) -> Step2:
    """Step 2 of `plan` on `data`: the route calibrated (`route_for`), the checkpoints judged as
    it will serve them (`served_by`), the copies pushed off their target where `cfg.push_off`
    says."""
    targets = found_targets(plan)
    evidence = side_evidence(data, targets) if targets else None  # the gate and the push read the same
    route = route_for(
        data, calibration_features(data), cfg.routed_share, plan, cfg.target_gate, cfg.side_reach, evidence
    )
    return tune_on_route(clip, classnames, data, plan, cfg, route, evidence, progress)


def tune_on_route(
    clip: LoadedClip,
    classnames: tuple[str, ...],
    data: TuningData,
    plan: TuningPlan,
    cfg: PurifyConfig,
    route: Route | None,
    evidence: SideEvidence | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Step2:
    """Step 2 of `plan` on `data` to be served through `route`: the copies pushed off their target
    where `cfg.push_off` says (read from `evidence`, or from `data` where None), the checkpoints
    judged as `route` will serve them."""
    spreads = apart(data, plan, evidence)
    plan = pushed_off(plan, spreads, cfg.push_off)
    result = tune_prompts(clip, classnames, served_by(data, route), plan.tuning, plan.acceptance, progress)
    return Step2(plan, route, spreads, result)


def served_by(data: TuningData, route: Route | None) -> TuningData:
    """`data` with the held-out clean shots `route` sends to the tuned embeddings marked, so
    checkpoints are judged as the head will be served (docs/method.md#served-reading). Nothing
    held out, or no route (the tuned embeddings answer everywhere): `data` as it is."""
    if data.held_out is None or route is None:
        return data
    rows = route.routed(data.held_out.clean.float().cpu().numpy())
    return replace(data, served=torch.from_numpy(rows).to(data.held_out.clean.device))


def alarm_centres(inversion: InversionResult, verdict: Verdict, data: TuningData | None) -> torch.Tensor:
    """[K, D] where triggered images land (docs/method.md#trigger-alarm): the best mask's mean
    triggered feature, and where the scan found a backdoor, the mean triggered feature of every
    trigger the head was tuned against (compact stand-ins and the other masks need not land where
    the best mask does). A clean reading, tuned cautiously or with --force, keeps the best mask's
    alone: its other restarts aim at natural features, whose regions clean images share."""
    best = inversion.mean_feature[None]
    if not verdict.backdoored or data is None or not len(data.cache.centroids):
        return best
    return torch.cat([best, data.cache.centroids.to(best.device)])


def alarm_score(features: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """[N] the trigger score: the largest cosine of each unit feature to the alarm's centres."""
    return (features @ centres.to(features.device).T).max(1).values


def alarm_threshold(clean: torch.Tensor, centres: torch.Tensor, fpr: float = 0.01) -> dict:
    """Trigger-score threshold flagging at most `fpr` of the clean shots
    (docs/method.md#trigger-alarm)."""
    scores = alarm_score(clean, centres).cpu().numpy()
    return {
        "centres": int(centres.shape[0]),
        "threshold": threshold_at_fpr(scores, fpr),
        "fpr": fpr,
        "n_clean": int(scores.size),
        "clean_max": float(scores.max()),
        "clean_mean": float(scores.mean()),
    }


def run_purify(clip: LoadedClip, shots: Shots, cfg: PurifyConfig, progress: Progress | None = None) -> Purified:
    t0 = time.perf_counter()
    original = original_head(clip, shots.classnames)
    inversion = run_scan(clip, shots, cfg.inversion, original, progress)
    t1 = time.perf_counter()
    verdict = read_scan(inversion)
    plan = plan_tuning(verdict, inversion, cfg, shots.held_pixels is not None)
    done = dict(
        classnames=shots.classnames, original=original, logit_scale=clip.logit_scale, inversion=inversion, plan=plan
    )
    if plan.mode is TuningMode.SKIPPED:
        clean = inversion.clean_features(clip.encoder(), shots.pixels)
        centres = alarm_centres(inversion, verdict, None)
        return Purified(
            **done,
            purified=original.clone(),
            tuning=None,
            timings={
                "inversion_s": round(t1 - t0, 2),
                "tuning_s": 0.0,
                "total_s": round(t1 - t0, 2),
                "image_encoder_passes_during_tuning": 0,
            },
            alarm=alarm_threshold(clean, centres),
            alarm_centres=centres,
        )
    data = tuning_data(clip, shots, plan.triggers, plan.tuning, original, inversion.clean)
    t2 = time.perf_counter()
    step2 = tune_routed(
        clip, shots.classnames, data, plan, cfg, (lambda d, t: progress("tune", d, t)) if progress else None
    )
    result = step2.result
    t3 = time.perf_counter()
    centres = alarm_centres(inversion, verdict, data)
    return Purified(
        **done | {"plan": step2.plan},
        apart=tuple(round(float(a), 3) for a in step2.spreads),
        purified=result.text_features,
        tuning=result,
        timings={
            "inversion_s": round(t1 - t0, 2),
            "feature_cache_s": round(t2 - t1, 2),
            "tuning_s": round(t3 - t2, 2),
            "total_s": round(t3 - t0, 2),
            "image_encoder_passes_cached": data.cache.encoder_passes,
            # the partial copies that bar the trigger side (`TuningConfig.partial`)
            "image_encoder_passes_partial": 0 if data.partial is None else len(data.partial.targets),
            # tune() is given cached features and no image model: zero by construction
            "image_encoder_passes_during_tuning": 0,
        },
        alarm=alarm_threshold(calibration_features(data), centres),
        alarm_centres=centres,
        route=step2.shipped_route,
    )
