"""Other trigger scores for the runtime alarm, compared post hoc on purify's own features
(docs/results.md#other-alarm-scores-not-kept).

    python benchmarks/alarm_scores.py TB/digits-wanet TB/digits-badclip --seeds 0 1 2 --out alarm-scores.json

Per testbed and shot set: one purify as `cbpt_table.py` runs it (`testbed.bench.defend_on_testbed`),
with step 2's tuning data kept (`kept_step2`), then the test split's clean images and the real
trigger's non-target images scored by each of `SCORES`. Each score is read twice: with its
threshold calibrated as purify calibrates the shipped alarm (1% of the clean calibration
features; a score that subtracts the nearest clean shot is calibrated on the held-out shots,
which the bank of shots does not hold), and with an oracle threshold flagging 1% of the clean
test images, which compares the scores' shape whatever their calibration. "through" is the
share of triggered images the purified head gives the target and the alarm lets by: what a
guard with `--on-alarm reject` lets through. Resumable: rows already in --out are kept.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import cbpt.purify
from cbpt.data import ShotBudget
from cbpt.metrics import alarm_evaluation, threshold_at_fpr
from cbpt.purify import PurifyConfig, calibration_features
from cbpt.runtime import set_torch_threads
from cbpt.tuning import TuningData
from testbed.bench import defend_on_testbed
from testbed.evaluate import head_predictions
from testbed.resumable import ResumableRows


@dataclass(frozen=True)
class Bank:
    """What a score may compare an image with, all unit features."""

    centres: np.ndarray  # [K, D] the shipped alarm's centres (cbpt.purify.alarm_centres)
    copies: np.ndarray  # [M, D] every tuned trigger applied to the shots and their views, as found
    shots: np.ndarray  # [N, D] the tuning shots and their views


def nearest(x: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """[len(x)] the largest cosine of each row of `x` to `bank`."""
    return (x @ bank.T).max(1)


SCORES: dict[str, Callable[[Bank, np.ndarray], np.ndarray]] = {
    "centres": lambda b, x: nearest(x, b.centres),  # the shipped alarm
    "nearest-copy": lambda b, x: nearest(x, b.copies),
    "copy-minus-shot": lambda b, x: nearest(x, b.copies) - nearest(x, b.shots),
    "centres-minus-shot": lambda b, x: nearest(x, b.centres) - nearest(x, b.shots),
}
SHOT_RELATIVE = {"copy-minus-shot", "centres-minus-shot"}  # calibrated on the held-out shots


def read_score(clean: np.ndarray, triggered: np.ndarray, hit: np.ndarray, calibration: np.ndarray) -> dict:
    """One score's figures: AUROC, the test FPR and the attack's success through the guard at the
    calibrated threshold, and TPR and success through the guard at the test's own 1% FPR."""
    calibrated = alarm_evaluation(clean, triggered, hit, threshold_at_fpr(calibration, 0.01))
    oracle = alarm_evaluation(clean, triggered, hit, threshold_at_fpr(clean, 0.01))
    return {
        "auroc": calibrated.auroc,
        "fpr": calibrated.fpr_at_threshold,
        "through": calibrated.asr_through_guard,
        "tpr_at_1pct": calibrated.tpr_at_1pct_fpr,
        "through_at_1pct": oracle.asr_through_guard,
    }


@contextmanager
def kept_step2() -> Iterator[dict]:
    """Within it, each purify's step-2 `TuningData` is kept in the yielded dict under "data";
    purify does not return it, and scanning again to rebuild it would cost a scan a row."""
    kept: dict = {}
    tune = cbpt.purify.tune_routed

    def keeping(clip, classnames, data: TuningData, plan, cfg, progress=None):
        kept["data"] = data
        return tune(clip, classnames, data, plan, cfg, progress)

    cbpt.purify.tune_routed = keeping
    try:
        yield kept
    finally:
        cbpt.purify.tune_routed = tune


def unit(t: torch.Tensor) -> np.ndarray:
    return t.float().cpu().numpy()


def measure(tb: Path, seed: int) -> dict:
    with kept_step2() as kept:
        on = defend_on_testbed(tb, "cbpt", 16, seed, PurifyConfig(budget=ShotBudget(16)))
    feats, data = on.feats, kept.get("data")
    if data is None or feats.triggered is None or not on.defended.info["scan"]["backdoored"]:
        return {"skipped": "no found backdoor to tune against, or no trigger planted"}
    c = data.cache
    as_found = dict(c.strength_groups())[1.0]  # the copies as the triggers made them, not taken further
    bank = Bank(unit(on.defended.alarm_centres), unit(c.triggered[as_found]), unit(c.clean))
    others = torch.as_tensor(feats.labels != feats.target, device=feats.triggered.device)
    hit = head_predictions(feats.triggered[others], on.head, on.route) == feats.target
    clean, triggered = unit(feats.clean), unit(feats.triggered[others])
    row: dict = {"asr": round(float(hit.mean()), 4), "copies": int(as_found.numel())}
    for name, score in SCORES.items():
        cal = unit(data.held_out.clean) if name in SHOT_RELATIVE else unit(calibration_features(data))
        row[name] = read_score(score(bank, clean), score(bank, triggered), hit, score(bank, cal))
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("testbeds", nargs="+", type=Path)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    set_torch_threads(args.threads)
    rows = ResumableRows.at(args.out)
    for tb in args.testbeds:
        for seed in args.seeds:
            rows.ensure(f"{tb.name}@{seed}", lambda tb=tb, seed=seed: measure(tb, seed))
    print("\n| testbed @ shot set | ASR after | " + " | ".join(SCORES) + " |")
    print("|---|---|" + "---|" * len(SCORES))
    print("(each cell: AUROC / through the guard, calibrated as shipped / through the guard at 1% test FPR)")
    for key, row in rows.items():
        if "skipped" in row:
            print(f"| {key} | {row['skipped']} |")
            continue
        cells = [f"{row[n]['auroc']:.3f} / {row[n]['through']:.3f} / {row[n]['through_at_1pct']:.3f}" for n in SCORES]
        print(f"| {key} | {row['asr']:.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
