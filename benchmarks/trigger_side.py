"""The trigger side measured (docs/method.md#trigger-side, docs/results.md#the-trigger-side).

    python benchmarks/trigger_side.py TB1 TB2 ... --out side.json

Per backdoored testbed or zoo model, K = 16, shot set 0:
- What tells the target's own test images from the real trigger's (other classes' test images
  with the attacker's trigger), as AUROC: the cosine to the mean of the target's own test images,
  and the difference of the two means fitted on half of each and read on the other half (an
  oracle: no defender has the real trigger), and the defender's direction (the inverted copies'
  mean less the target's own shots', whitened by the clean shots' within-class scatter) read on
  every test image.
- How far the inverted copies stand from the own shots along the defender's direction (in the
  own shots' spreads), and how much wider the real trigger's images spread than the copies.
- One purify tuned with `--target-gate every` (or `--gate`), its head then served through the
  gate rules side by side: every image given the target, and the trigger side at several reaches
  (`TriggerSide.calibrate`; reach 0: the bar at the copies' mean at most), and purify's bar, the
  reach of 4 raised to where the partial copies reach (docs/method.md#partial-triggers). CA / ASR on
  the test split, the share of the target's own test images routed, and the share of the triggered
  images given the target that the bar lets by.

Resumable: models in --out are read back. About 2.5 minutes a model on one thread.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from cbpt.data import ShotBudget, load_shots
from cbpt.model import load_clip
from cbpt.purify import (
    PurifyConfig,
    TuningMode,
    found_targets,
    original_head,
    plan_tuning,
    side_evidence,
    tune_routed,
    tuning_data,
)
from cbpt.runtime import Runtime
from cbpt.scan import read_scan, run_scan
from cbpt_guard.artifacts import CLASSES
from cbpt_guard.routing import Route, TargetGate, TriggerSide
from testbed.evaluate import class_order, encode_test_split, score_head
from testbed.resumable import ResumableRows

REACHES = (0.0, 3.0, 3.5, 4.0, 4.5, 5.0)


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    truth = np.r_[np.ones(len(positive)), np.zeros(len(negative))]
    return round(float(roc_auc_score(truth, np.r_[positive, negative])), 4)


def separability(own: np.ndarray, triggered: np.ndarray, seed: int = 0) -> dict:
    """AUROC of the target's own test images [M, D] against triggered ones [P, D], fitted on
    half of each and read on the other half."""
    rng = np.random.default_rng(seed)
    io, it = rng.permutation(len(own)), rng.permutation(len(triggered))
    fit_own, read_own = own[io[: len(io) // 2]], own[io[len(io) // 2 :]]
    fit_trig, read_trig = triggered[it[: len(it) // 2]], triggered[it[len(it) // 2 :]]
    centre = fit_own.mean(0) / np.linalg.norm(fit_own.mean(0))
    w = fit_trig.mean(0) - fit_own.mean(0)
    return {
        "cosine_to_own": auroc(-(read_trig @ centre), -(read_own @ centre)),
        "difference_of_means": auroc(read_trig @ w, read_own @ w),
    }


def measure(tb: Path, gate: TargetGate) -> dict:
    t0 = time.perf_counter()
    clip = load_clip(tb / "model.pt", runtime=Runtime.of("cpu"))
    cfg = PurifyConfig(budget=ShotBudget(16), target_gate=gate)
    shots = load_shots(clip, tb / "fewshot", tb / CLASSES, cfg.budget, 0)
    original = original_head(clip, shots.classnames)
    inversion = run_scan(clip, shots, cfg.inversion, original)
    plan = plan_tuning(read_scan(inversion), inversion, cfg, shots.held_pixels is not None)
    feats = encode_test_split(clip, tb)
    rows = class_order(list(shots.classnames), tb)
    x, t = feats.clean.float().numpy(), feats.triggered.float().numpy()
    labels, target = feats.labels, feats.target
    own_test, real = x[labels == target], t[labels != target]
    out = {"mode": plan.mode.value, "oracle": separability(own_test, real)}
    if plan.mode is not TuningMode.FULL:
        return out | {"seconds": round(time.perf_counter() - t0, 1)}
    data = tuning_data(clip, shots, plan.triggers, plan.tuning, original)
    step2 = tune_routed(clip, shots.classnames, data, plan, cfg)  # as purify tunes
    shipped, result = step2.route, step2.result
    head = result.text_features[rows]
    found = found_targets(plan)
    ev = side_evidence(data, found)
    owns, aimed, scatter = ev.own, ev.copies, ev.scatter
    own, copies = owns[0], aimed[0]  # the found backdoor's one target
    w = TriggerSide.calibrate(owns[:1], aimed[:1], scatter).directions[0]
    w_real = real.mean(0) - own_test.mean(0)
    po, pc, pr = own @ w, copies @ w, real @ w
    out |= {
        "found": [shots.classnames[i] for i in found],
        "target": shots.classnames[rows[target]],
        "defender_direction": auroc(pr, own_test @ w),
        "copies_apart": round(float((pc.mean() - po.mean()) / po.std()), 2),  # in own-shot spreads
        "real_spread_over_copies": round(float(pr.std() / pc.std()), 2),
        "cosine_to_real_direction": round(float(w @ w_real / np.linalg.norm(w) / np.linalg.norm(w_real)), 2),
        "before": _score(feats, original[rows], None),
    }
    if shipped is None or result.kept_original:
        return out | {"kept_original": True, "seconds": round(time.perf_counter() - t0, 1)}
    every = shipped.every_assigned().reordered(rows)
    out["every"] = _score(feats, head, every)
    given = (real @ original[rows].float().numpy().T).argmax(1) == target  # the triggered images the gate reads

    def gated(side: TriggerSide) -> dict:
        return _score(feats, head, replace(every, side=side)) | {
            "own_test_routed": round(float((side.margins(own_test)[:, 0] > 0).mean()), 3),
            # of the triggered images, those given the target that the bar sends to the original embeddings
            "real_let_by": round(float((given & (side.margins(real)[:, 0] <= 0)).mean()), 4),
        }

    for reach in REACHES:
        out[f"reach{reach:g}"] = gated(TriggerSide.calibrate(owns, aimed, scatter, reach))
    if ev.partial is not None:  # purify's bar: the reach raised to where the partial copies reach
        out["partial"] = gated(TriggerSide.calibrate(owns, aimed, scatter, partial=ev.partial))
    return out | {"seconds": round(time.perf_counter() - t0, 1)}


def _score(feats, head, route: Route | None) -> dict:
    s = score_head(feats, head, route)
    return {"ca": round(s.ca, 4), "asr": round(s.asr, 4)}


def _cell(c: dict) -> str:
    """CA / ASR (own test images routed, triggered images let by; rows stored before it: no let by)."""
    let_by = f", {c['real_let_by']:.3f}" if "real_let_by" in c else ""
    return f"{c['ca']:.3f} / {c['asr']:.3f} ({c['own_test_routed']:.2f}{let_by})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("testbeds", nargs="*", type=Path, help="backdoored testbed or zoo model folders; none: print --out")
    ap.add_argument("--gate", type=TargetGate, default=TargetGate.EVERY, help="the gate the head is tuned under")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    stored = ResumableRows.at(args.out)
    for tb in args.testbeds:
        stored.ensure(tb.name, lambda tb=tb: measure(tb, args.gate))
    cols = " | ".join([*(f"reach {r:g}" for r in REACHES), "partial triggers"])
    print(
        "| model | AUROC own vs triggered: cosine to own / difference of means (oracle) / defender's | "
        f"copies apart (spreads) | real spread / copies' | every | {cols} |"
    )
    print("|---|---|---|---|---|" + "---|" * (len(REACHES) + 1))
    for name, r in stored.items():
        o = r["oracle"]
        if "every" not in r:
            print(f"| {name} | {o['cosine_to_own']:.3f} / {o['difference_of_means']:.3f} / - | {r['mode']} |")
            continue
        cells = [r[f"reach{x:g}"] for x in REACHES] + [r.get("partial")]
        reaches = " | ".join("-" if c is None else _cell(c) for c in cells)
        print(
            f"| {name} | {o['cosine_to_own']:.3f} / {o['difference_of_means']:.3f} / {r['defender_direction']:.3f} | "
            f"{r['copies_apart']:.1f} | {r['real_spread_over_copies']:.2f} | "
            f"{r['every']['ca']:.3f} / {r['every']['asr']:.3f} | {reaches} |"
        )


if __name__ == "__main__":
    main()
