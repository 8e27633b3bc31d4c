"""Routing measured: one CBPT run per model, its tuned head scored on the test split as the
paper ships it (the purified embeddings answer for every image) and routed at several shares
(docs/method.md#routing, docs/results.md#routing).

    python benchmarks/routing.py --zoo ZOO --part fit --out routing.json
    python benchmarks/routing.py --testbed TB1 TB2 --out routing.json

Models: the taken ones of a zoo part (read from ZOO/runs-noroute/ or ZOO/runs/), or testbed
folders. K = 16, shot set 0, default settings otherwise: the tuning is the same at every share
(the route is calibrated after it), so each share is read from the same run. Resumable: runs
are stored in --out as they finish.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cbpt.data import ShotBudget, load_shots
from cbpt.model import load_clip
from cbpt.purify import (
    PurifyConfig,
    calibration_features,
    original_head,
    plan_tuning,
    route_for,
    tune_routed,
    tuning_data,
)
from cbpt.runtime import Runtime
from cbpt.scan import read_scan, run_scan
from cbpt_guard.artifacts import CLASSES
from testbed.evaluate import class_order, encode_test_split, score_head
from testbed.resumable import ResumableRows

SHARES = (0.1, 0.2, 0.3)


def measure(tb: Path) -> dict:
    t0 = time.perf_counter()
    clip = load_clip(tb / "model.pt", runtime=Runtime.of("cpu"))
    cfg = PurifyConfig(budget=ShotBudget(16))
    shots = load_shots(clip, tb / "fewshot", tb / CLASSES, cfg.budget, 0)
    original = original_head(clip, shots.classnames)
    inversion = run_scan(clip, shots, cfg.inversion, original)
    plan = plan_tuning(read_scan(inversion), inversion, cfg, shots.held_pixels is not None)
    rows = class_order(list(shots.classnames), tb)
    feats = encode_test_split(clip, tb)
    before = score_head(feats, original[rows])
    out = {"mode": plan.mode.value, "ca_before": before.ca, "asr_before": _asr(feats, before.asr)}
    if plan.mode == "skipped":
        return {**out, "kept_original": True, "seconds": round(time.perf_counter() - t0, 1)}
    data = tuning_data(clip, shots, plan.triggers, plan.tuning, original)
    calibration = calibration_features(data)
    result = tune_routed(clip, shots.classnames, data, plan, cfg).result  # as purify tunes
    head = result.text_features[rows]
    plain = score_head(feats, head)
    out |= {"kept_original": result.kept_original, "ca_plain": plain.ca, "asr_plain": _asr(feats, plain.asr)}
    clean = feats.clean.float().numpy()
    triggered = None if feats.triggered is None else feats.triggered.float().numpy()
    for share in SHARES:
        gated = route_for(data, calibration, share, plan, cfg.target_gate, cfg.side_reach)
        # the same route without the target gate (docs/method.md#target-gate), side by side
        for key, route in ((f"share{share}", gated), (f"share{share}-nogate", gated.ungated())):
            routed = score_head(feats, head, None if result.kept_original else route.reordered(rows))
            out[key] = {
                "ca": routed.ca,
                "asr": _asr(feats, routed.asr),
                "clean_test_routed": round(float(route.routed(clean).mean()), 4),
                "triggered_test_routed": None if triggered is None else round(float(route.routed(triggered).mean()), 4),
            }
    return {**out, "seconds": round(time.perf_counter() - t0, 1)}


def _asr(feats, asr: float) -> float | None:
    return None if feats.triggered is None else asr


def _models(args) -> dict[str, Path]:
    if args.testbed:
        return {p.name: p for p in args.testbed}
    runs = args.zoo / "runs-noroute"
    runs = runs if runs.is_dir() else args.zoo / "runs"
    records = [json.loads(p.read_text()) for p in sorted(runs.glob("*.json"))]
    return {
        r["name"]: args.zoo / "models" / r["name"] for r in records if r["taken"] and args.part in ("all", r["part"])
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", type=Path)
    ap.add_argument("--part", choices=("fit", "report", "all"), default="fit")
    ap.add_argument("--testbed", type=Path, nargs="*")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if not (args.zoo or args.testbed):
        ap.error("pass --zoo or --testbed")
    torch.set_num_threads(1)
    stored = ResumableRows.at(args.out)
    models = _models(args)
    for name, tb in models.items():
        stored.ensure(name, lambda tb=tb: measure(tb))
    keys = [k for s in SHARES for k in (f"share{s}-nogate", f"share{s}")]
    cols = " | ".join(f"share {k.removeprefix('share').replace('-nogate', ', no gate')}: CA / ASR" for k in keys)
    print(f"| model | mode | CA / ASR before | purified everywhere: CA / ASR | {cols} |")
    print("|---|---|---|---|" + "---|" * len(keys))
    for name in models:
        r = stored[name]

        def pair(ca, asr) -> str:
            return f"{ca:.3f} / " + ("-" if asr is None else f"{asr:.3f}")

        if r.get("ca_plain") is None:
            unchanged = " (unchanged) |" * (1 + len(keys))
            print(f"| {name} | {r['mode']} | {pair(r['ca_before'], r['asr_before'])} |{unchanged}")
            continue
        shares = " | ".join(pair(r[k]["ca"], r[k]["asr"]) if k in r else "-" for k in keys)
        print(
            f"| {name} | {r['mode']} | {pair(r['ca_before'], r['asr_before'])} | "
            f"{pair(r['ca_plain'], r['asr_plain'])} | {shares} |"
        )


if __name__ == "__main__":
    main()
