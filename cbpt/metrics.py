"""Backdoor metrics as pure functions over predictions (definitions: docs/method.md, docs/results.md).

ASR and RA are taken over the triggered images whose true class is not the attack target:
an image of the target class that lands in the target says nothing about the backdoor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


def _as_int(a) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise ValueError(f"predictions and labels must be 1-D, got shape {arr.shape}")
    return arr.astype(np.int64)


def clean_accuracy(pred, labels) -> float:
    pred, labels = _as_int(pred), _as_int(labels)
    if pred.shape != labels.shape:
        raise ValueError(f"{pred.shape[0]} predictions for {labels.shape[0]} labels")
    return float((pred == labels).mean()) if labels.size else float("nan")


def _non_target(pred, labels, target: int) -> tuple[np.ndarray, np.ndarray]:
    pred, labels = _as_int(pred), _as_int(labels)
    if pred.shape != labels.shape:
        raise ValueError(f"{pred.shape[0]} predictions for {labels.shape[0]} labels")
    keep = labels != target
    return pred[keep], labels[keep]


def attack_success_rate(pred_triggered, labels, target: int) -> float:
    """Share of triggered non-target images classified as the target."""
    pred, _ = _non_target(pred_triggered, labels, target)
    return float((pred == target).mean()) if pred.size else float("nan")


def robust_accuracy(pred_triggered, labels, target: int) -> float:
    """Share of triggered non-target images classified as their true class."""
    pred, labels = _non_target(pred_triggered, labels, target)
    return float((pred == labels).mean()) if pred.size else float("nan")


@dataclass(frozen=True)
class BackdoorEval:
    ca: float
    asr: float
    ra: float
    n_clean: int
    n_triggered: int  # triggered images whose true class is not the target

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_predictions(pred_clean, labels_clean, pred_triggered, labels_triggered, target: int) -> BackdoorEval:
    n_trig = int((_as_int(labels_triggered) != target).sum())
    return BackdoorEval(
        ca=clean_accuracy(pred_clean, labels_clean),
        asr=attack_success_rate(pred_triggered, labels_triggered, target),
        ra=robust_accuracy(pred_triggered, labels_triggered, target),
        n_clean=int(_as_int(labels_clean).size),
        n_triggered=n_trig,
    )


def auroc(scores_negative, scores_positive) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counted half."""
    neg = np.asarray(scores_negative, dtype=np.float64).ravel()
    pos = np.asarray(scores_positive, dtype=np.float64).ravel()
    if not neg.size or not pos.size:
        return float("nan")
    both = np.concatenate([neg, pos])
    order = both.argsort(kind="mergesort")
    ranks = np.empty_like(both)
    ranks[order] = np.arange(1, both.size + 1)
    # average ranks over ties
    _, inv, counts = np.unique(both, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    ranks = (sums / counts)[inv]
    return float((ranks[neg.size :].sum() - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))


def threshold_at_fpr(scores_negative, fpr: float = 0.01) -> float:
    """Smallest threshold t with P(negative score > t) <= fpr on the given negatives."""
    neg = np.sort(np.asarray(scores_negative, dtype=np.float64).ravel())
    if not neg.size:
        raise ValueError("no negative scores to calibrate on")
    k = int(np.floor(fpr * neg.size))  # number of negatives allowed above the threshold
    return float(neg[neg.size - 1 - k])


def tpr_at_threshold(scores_positive, threshold: float) -> float:
    pos = np.asarray(scores_positive, dtype=np.float64).ravel()
    return float((pos > threshold).mean()) if pos.size else float("nan")


@dataclass(frozen=True)
class AlarmEval:
    """How well the runtime trigger alarm flags a real trigger's images, and what the attack
    still achieves through a guard that rejects what it flags (docs/method.md#trigger-alarm)."""

    auroc: float  # clean test images vs their triggered versions, on the alarm's score
    threshold: float  # the stored one, calibrated on clean shots at 1% FPR
    tpr_at_threshold: float
    fpr_at_threshold: float  # on the clean test images: what the stored threshold really costs
    tpr_at_1pct_fpr: float  # at the threshold that flags 1% of the clean test images
    asr: float  # triggered non-target images given the target label
    asr_through_guard: float  # ... and not flagged: what `--on-alarm reject` lets through
    n_clean: int
    n_triggered: int


def alarm_evaluation(clean_scores, triggered_scores, triggered_hit, threshold: float) -> AlarmEval:
    """`triggered_hit`: whether each triggered (non-target) image got the target label."""
    clean = np.asarray(clean_scores, dtype=np.float64).ravel()
    trig = np.asarray(triggered_scores, dtype=np.float64).ravel()
    hit = np.asarray(triggered_hit, dtype=bool).ravel()
    return AlarmEval(
        auroc=round(auroc(clean, trig), 4),
        threshold=float(threshold),
        tpr_at_threshold=round(tpr_at_threshold(trig, threshold), 4),
        fpr_at_threshold=round(float((clean > threshold).mean()), 4),
        tpr_at_1pct_fpr=round(tpr_at_threshold(trig, threshold_at_fpr(clean, 0.01)), 4),
        asr=round(float(hit.mean()), 4),
        asr_through_guard=round(float((hit & (trig <= threshold)).mean()), 4),
        n_clean=int(clean.size),
        n_triggered=int(trig.size),
    )


def defense_effectiveness_rate(ca_before: float, asr_before: float, ca_after: float, asr_after: float) -> float:
    """DER = (max(0, ASR drop) - max(0, CA drop) + 1) / 2, in [0, 1]: 0.5 is no change, 1 is
    every triggered image rescued at no clean cost. Undefined (nan) without an attack."""
    if asr_before != asr_before or asr_after != asr_after:
        return float("nan")
    return (max(0.0, asr_before - asr_after) - max(0.0, ca_before - ca_after) + 1) / 2
