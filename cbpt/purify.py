"""CBPT end to end on a loaded model: shots -> inverted trigger -> purified class embeddings.

`scan` stops after the inversion; `purify` goes on to prompt tuning and writes the output
folder atomically: `embeddings.safetensors`, `classes.txt`, `trigger.png`, `report.json`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from cbpt.data import LabelledImages, discover, load_batch, read_classes_file, sample_shots
from cbpt.inversion import DummyTrigger, InversionConfig, InversionResult, invert, probe_warps
from cbpt.model import LoadedClip
from cbpt.prompts import ClassPrompts
from cbpt.tuning import TuningConfig, TuningResult, cache_features, tune
from cbpt.zeroshot import zeroshot_weights
from cbpt_guard import __version__, atomic

# Scores at or above this read "backdoored" (calibrated on testbed models: backdoored 0.64-0.84,
# clean 0.17-0.42; see inversion.backdoor_score).
SCAN_THRESHOLD = 0.55
# A model whose masks read clean is still backdoored where an inverted warp (or additive
# trigger) over-aligns by at least this beyond masks pointing elsewhere (see
# InversionResult.over_aligned). Measured on the testbed (6 shot sets each): digits WaNet's
# best warp 0.69-1.42 (caught 6 of 6), shapes WaNet's 0.86-1.05 where caught (4 of 6; -0.2 and
# -0.55 on the others, tuned cautiously to ASR 0.021 and 0.007); no clean model's inverted
# trigger above -0.37, nor above +0.26 among 12 more random-start warps tried apart.
ALIGN_THRESHOLD = 0.5


@dataclass(frozen=True)
class Verdict:
    backdoored: bool
    # "mask": a small mask flips the shots (the score); "warp": an inverted warp or additive
    # trigger over-aligns; "": neither
    evidence: str
    target: int  # the backdoor's target, or the best mask's when none was found
    triggers: list[DummyTrigger]  # what a found backdoor is tuned against, each at `target`


def masks_found(inv: InversionResult) -> bool:
    """The mask score reads a backdoor: the first evidence, and then no warp is probed."""
    return inv.score >= SCAN_THRESHOLD


def read_scan(inv: InversionResult) -> Verdict:
    if masks_found(inv):
        return Verdict(True, "mask", inv.target, [replace(c, target=inv.target) for c in inv.patches()])
    aligned = inv.over_aligned(ALIGN_THRESHOLD)
    if aligned:  # every warp restart and probe then becomes a trigger for its target
        target = aligned[0].target
        return Verdict(True, "warp", target, [replace(c, target=target) for c in inv.others()])
    return Verdict(False, "", inv.target, [])


@dataclass(frozen=True)
class PurifyConfig:
    shots: int = 16
    seed: int = 0
    held_out: int = 8  # held-out shots per class for early stopping, when the data has them
    # tune as for a found backdoor even when the scan reads clean (every restart but the probes,
    # each at its own target). Measured on the clean digits model: -1.1 CA points
    force: bool = False
    inversion: InversionConfig = field(default_factory=InversionConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)


@dataclass
class Shots:
    x01: torch.Tensor  # [N, 3, H, W] in [0, 1], the model's resize + crop, not yet normalised
    labels: torch.Tensor
    classnames: tuple[str, ...]
    held_x01: torch.Tensor | None = None
    held_labels: torch.Tensor | None = None
    paths: tuple[str, ...] = ()


@dataclass
class Purified:
    classnames: tuple[str, ...]
    purified: torch.Tensor  # [C, D]
    original: torch.Tensor  # [C, D] the hand-crafted prompts' head
    logit_scale: float
    inversion: InversionResult
    tuning: TuningResult
    timings: dict
    alarm: dict = field(default_factory=dict)  # runtime trigger alarm, calibrated on clean shots
    # full (the scan found a backdoor, or --force), cautious (it did not: the original prompts
    # compete on held-out shots) or skipped (it did not, and no shots were held out)
    tuning_mode: str = "full"


def pixel_transform(clip: LoadedClip) -> Callable:
    """The model's eval transform without its final Normalize: triggers live in pixel space."""
    from torchvision.transforms import Compose, Normalize

    tf = clip.transform()
    return Compose([t for t in tf.transforms if not isinstance(t, Normalize)])


def load_shots(clip: LoadedClip, data: str | Path, classes: str | Path | None, shots: int, seed: int,
               held_out: int) -> Shots:
    names = read_classes_file(classes) if classes else None
    ds = discover(data, names)
    chosen, rest = sample_shots(ds, shots, seed)
    tf = pixel_transform(clip)
    x, y = load_batch(chosen, tf)
    held = _held_out(rest, held_out, seed)
    hx, hy = load_batch(held, tf) if held is not None else (None, None)
    return Shots(x, y, ds.classnames, hx, hy, tuple(str(p) for p in chosen.paths))


def _held_out(rest: LabelledImages, per_class: int, seed: int) -> LabelledImages | None:
    if per_class <= 0 or not len(rest) or min(rest.counts()) < 1:
        return None
    k = min(per_class, min(rest.counts()))
    return sample_shots(rest, k, seed + 1)[0]


def original_head(clip: LoadedClip, classnames: tuple[str, ...]) -> torch.Tensor:
    return zeroshot_weights(clip.model, clip.tokenizer(), classnames, clip.templates)


def run_scan(clip: LoadedClip, shots: Shots, cfg: InversionConfig,
             progress: Callable[[str, int, int], None] | None = None,
             weights: torch.Tensor | None = None) -> InversionResult:
    """Step 1 alone. `weights`: the original head, when the caller already has it."""
    weights = original_head(clip, shots.classnames) if weights is None else weights
    pp = clip.preprocess_cfg
    inv = invert(clip.model, shots.x01, shots.labels, weights, pp["mean"], pp["std"], cfg,
                 progress=(lambda d, t: progress("invert", d, t)) if progress else None)
    if masks_found(inv) or not cfg.warp_probes:
        return inv
    # the masks read clean: search for a warp backdoor's evidence (InversionConfig.warp_probes)
    return probe_warps(clip.model, shots.x01, shots.labels, weights, pp["mean"], pp["std"], inv, cfg,
                       progress=(lambda d, t: progress("probe", d, t)) if progress else None)


def run_purify(clip: LoadedClip, shots: Shots, cfg: PurifyConfig,
               progress: Callable[[str, int, int], None] | None = None) -> Purified:
    t0 = time.perf_counter()
    original = original_head(clip, shots.classnames)
    inversion = run_scan(clip, shots, cfg.inversion, progress, weights=original)
    t1 = time.perf_counter()
    verdict = read_scan(inversion)
    suspected = verdict.backdoored or cfg.force
    if not suspected and shots.held_x01 is None:
        # No backdoor found and no held-out shots to check a change against: what inversion
        # found is a natural feature, and tuning against it unchecked costs accuracy
        # (measured on the clean shapes model: CA 0.972 -> 0.854).
        return Purified(
            classnames=shots.classnames, purified=original.clone(), original=original, logit_scale=clip.logit_scale,
            inversion=inversion, tuning=TuningResult(text_features=original.clone(), original=original, best_step=-1,
                                                     history=[{"skipped": "scan found no backdoor, no held-out shots"}]),
            timings={"inversion_s": round(t1 - t0, 2), "tuning_s": 0.0, "total_s": round(t1 - t0, 2),
                     "image_encoder_passes_during_tuning": 0},
            alarm=alarm_threshold(_encode(clip, shots.x01), None, inversion.mean_feature), tuning_mode="skipped",
        )
    # A model that reads clean is still tuned, cautiously: the original head competes with the
    # tuned checkpoints on the held-out shots and is kept unless one keeps clean accuracy and
    # resists the inverted triggers better. Measured: the shapes WaNet shot sets the scan reads
    # clean go from ASR 0.929 to 0.007 and 0.021 (with the inverted warp), while clean models
    # keep CA within 0.6 points on every one of 6 shot sets.
    # Nor is its trigger loss escalated: a natural feature keeps held-out shots at its class
    # whatever the strength, so that evidence means nothing here. Measured on the clean digits
    # model (3 shot sets): escalating cost up to 1.8 test CA points, not escalating at most 0.4.
    tuning_cfg = cfg.tuning if suspected else replace(cfg.tuning, original_is_candidate=True, escalation=())
    # A backdoor the scan found is tuned against the kind of trigger that showed it, each as a
    # trigger for the one target the scan named: the mask restarts for a mask's evidence (adding
    # the inverted warp cost the shapes blended model 2-4 CA points for nothing), the warps and
    # probes for a warp's. One it did not find (tuned cautiously, or with --force) may still be a
    # warp: every restart is then used, each at its own target (the probes are left out).
    triggers = verdict.triggers if verdict.backdoored else inversion.restarts()
    pp = clip.preprocess_cfg
    cache = cache_features(clip.model, shots.x01, shots.labels, triggers, pp["mean"], pp["std"], tuning_cfg)
    held = None
    if shots.held_x01 is not None:
        held = cache_features(clip.model, shots.held_x01, shots.held_labels, triggers,
                              pp["mean"], pp["std"], TuningConfig(views=0, shifts=1, seed=cfg.seed + 2))
    t2 = time.perf_counter()
    prompts = ClassPrompts(clip.model, clip.tokenizer(), shots.classnames, n_ctx=cfg.tuning.n_ctx, seed=cfg.seed)
    result = tune(prompts, cache, clip.logit_scale, tuning_cfg, held, original,
                  progress=(lambda d, t: progress("tune", d, t)) if progress else None)
    t3 = time.perf_counter()
    return Purified(
        alarm=alarm_threshold(cache.clean, held.clean if held is not None else None, inversion.mean_feature),
        classnames=shots.classnames, purified=result.text_features, original=original, logit_scale=clip.logit_scale,
        inversion=inversion, tuning=result, tuning_mode="full" if suspected else "cautious",
        timings={"inversion_s": round(t1 - t0, 2), "feature_cache_s": round(t2 - t1, 2),
                 "tuning_s": round(t3 - t2, 2), "total_s": round(t3 - t0, 2),
                 "image_encoder_passes_cached": cache.encoder_passes,
                 # tune() is given cached features and no image model: zero by construction
                 "image_encoder_passes_during_tuning": 0},
    )


@torch.no_grad()
def _encode(clip: LoadedClip, x01: torch.Tensor) -> torch.Tensor:
    from cbpt.inversion import _normalise

    pp = clip.preprocess_cfg
    return clip.model.encode_image(_normalise(x01, pp["mean"], pp["std"]), normalize=True)


def alarm_threshold(clean: torch.Tensor, held: torch.Tensor | None, centroid: torch.Tensor,
                    fpr: float = 0.01) -> dict:
    """Cosine-to-the-backdoor-region threshold flagging at most `fpr` of clean images."""
    from cbpt.metrics import threshold_at_fpr

    feats = clean if held is None else torch.cat([clean, held])
    scores = (feats @ centroid).numpy()
    return {"threshold": threshold_at_fpr(scores, fpr), "fpr": fpr, "n_clean": int(scores.size),
            "clean_max": float(scores.max()), "clean_mean": float(scores.mean())}


def scan_summary(inv: InversionResult, classnames: tuple[str, ...]) -> dict:
    verdict = read_scan(inv)
    return {
        "backdoored": verdict.backdoored,
        "evidence": verdict.evidence or None,
        "target": classnames[verdict.target],
        "target_index": verdict.target,
        "score": round(inv.score, 4),
        "threshold": SCAN_THRESHOLD,
        "alignment_threshold": ALIGN_THRESHOLD,
        "flip_rate": round(inv.flip_rate, 4),
        "consistency": round(inv.consistency, 4),
        "clean_consistency": round(inv.clean_consistency, 4),
        "mask_l1": round(inv.mask_l1, 4),
        # every restart, best mask first: where each sends the shots, and how far past the
        # target's own shots it pulls them toward the target's text (a warp's evidence)
        "candidates": [{"kind": c.kind, "probe": c.probe,
                        "target": classnames[c.target] if c.target is not None else None,
                        "flip_rate": round(f, 4), "over_alignment": None if a is None else round(a, 3)}
                       for c, f, a in zip(inv.candidates, inv.candidate_flip_rates, inv.candidate_alignments)],
        "seconds": round(inv.seconds, 2),
    }


def report(clip: LoadedClip, shots: Shots, cfg: PurifyConfig, result: Purified) -> dict:
    return {
        "tool": f"cbpt-guard {__version__}",
        "model": clip.info.to_dict(),
        "checkpoint_sha256": clip.checkpoint_sha256,
        "classes": list(result.classnames),
        "scan": scan_summary(result.inversion, result.classnames),
        "tuning": {"best_step": result.tuning.best_step, "rung": result.tuning.rung,
                   "alpha": result.tuning.alpha, "margin": result.tuning.margin, "history": result.tuning.history,
                   "mode": result.tuning_mode,
                   # best step -1: no tuned checkpoint beat the original prompts, which are kept
                   "kept_original": result.tuning.best_step == -1},
        "timings": result.timings,
        "alarm": result.alarm,
        "settings": asdict(cfg),
        "shots": list(shots.paths),
        "held_out_per_class": None if shots.held_labels is None else int(len(shots.held_labels) // len(result.classnames)),
    }


def write_scan(out: Path, inv: InversionResult, shots: Shots, summary: dict) -> None:
    from cbpt.pictures import trigger_png

    with atomic.staged_dir(out) as stage:
        (stage / "trigger.png").write_bytes(trigger_png(inv.trigger, shots.x01, others=inv.others()))
        (stage / "scan.json").write_text(json.dumps(summary, indent=2))


def write_purified(out: Path, result: Purified, shots: Shots, rep: dict) -> None:
    """Everything lands at once or not at all."""
    from safetensors.torch import save

    from cbpt.pictures import trigger_png

    tensors = {
        "purified": result.purified.contiguous().float(),
        "original": result.original.contiguous().float(),
        "logit_scale": torch.tensor([result.logit_scale], dtype=torch.float32),
        "trigger_centroid": result.inversion.mean_feature.contiguous().float(),
    }
    meta = {"classes": json.dumps(list(result.classnames)), "tool": rep["tool"],
            "checkpoint_sha256": rep["checkpoint_sha256"], "architecture": rep["model"]["architecture"]}
    blob = save(tensors, metadata=meta)
    rep = {**rep, "embeddings_sha256": hashlib.sha256(blob).hexdigest()}
    with atomic.staged_dir(out) as stage:
        (stage / "embeddings.safetensors").write_bytes(blob)
        (stage / "classes.txt").write_text("\n".join(result.classnames) + "\n")
        (stage / "trigger.png").write_bytes(trigger_png(result.inversion.trigger, shots.x01,
                                                        others=result.inversion.others()))
        (stage / "report.json").write_text(json.dumps(rep, indent=2))


def write_original(clip: LoadedClip, classnames: tuple[str, ...], out: Path) -> None:
    """An export source for the original prompts' head alone (no purification, no trigger)."""
    from safetensors.torch import save

    original = original_head(clip, classnames).contiguous().float()
    blob = save({"purified": original, "original": original.clone(),
                 "logit_scale": torch.tensor([clip.logit_scale], dtype=torch.float32)})
    rep = {"tool": f"cbpt-guard {__version__}", "model": clip.info.to_dict(), "checkpoint_sha256": clip.checkpoint_sha256,
           "classes": list(classnames), "kind": "original", "embeddings_sha256": hashlib.sha256(blob).hexdigest()}
    with atomic.staged_dir(out) as stage:
        (stage / "embeddings.safetensors").write_bytes(blob)
        (stage / "classes.txt").write_text("\n".join(classnames) + "\n")
        (stage / "report.json").write_text(json.dumps(rep, indent=2))
