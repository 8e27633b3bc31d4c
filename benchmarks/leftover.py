"""Where the ASR CBPT leaves comes from: one purify of a testbed, its tuned head scored on the
test split three ways (routed as shipped, routed without the target gate, everywhere), and how
the real trigger's images lie against the inverted triggers (docs/results.md#target-gate-and-trigger-strength).

    python benchmarks/leftover.py TB/shapes-vit32-badnet-p30 TB/shapes-resnet64-badnet --seed 0 --out leftover.json
    python benchmarks/leftover.py ... --strengths 1 --out leftover.json   # as tuned before the stronger copies

Per testbed: CA / ASR of each head; the share of the real triggered (non-target) test images
inside the cosine route; and each image's margin toward the target under the original head
(cosine to the target's embedding minus the best other class's) for the real triggered images
(5th / 50th / 95th percentile) against the inverted triggers' centroids. A route that misses
the real images shows as a share under 1 with the ungated ASR above the everywhere one; an
inverted trigger weaker than the real one as centroid margins well under the real images'.
Resumable: testbeds already in --out are read back.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cbpt.data import ShotBudget
from cbpt.purify import PurifyConfig
from cbpt.runtime import Runtime
from testbed.bench import defend_on_testbed
from testbed.evaluate import score_head
from testbed.resumable import ResumableRows


def margins(unit: np.ndarray, original: np.ndarray, target: int) -> np.ndarray:
    """Cosine to the target's embedding minus the best other class's, per unit feature."""
    cos = unit @ original.T
    others = np.delete(cos, target, axis=1).max(axis=1)
    return cos[:, target] - others


def measure(tb: Path, seed: int, strengths: tuple[float, ...]) -> dict:
    cfg = PurifyConfig(budget=ShotBudget(16))
    cfg = replace(cfg, tuning=replace(cfg.tuning, strengths=strengths))
    on = defend_on_testbed(tb, "cbpt", 16, seed, cfg, runtime=Runtime.of("cpu"))
    feats, head, route = on.feats, on.head, on.route
    if feats.triggered is None:
        raise SystemExit(f"{tb} has no trigger: leftover ASR needs a backdoored testbed")
    scan = on.defended.info["scan"]
    out = {"seed": seed, "scan": {k: scan[k] for k in ("backdoored", "evidence", "target", "mask_l1")}}
    out["everywhere"] = score_head(feats, head).to_dict()
    if route is None:
        return out | {"route": None}
    ungated = route.ungated()
    out["routed"] = score_head(feats, head, route).to_dict()
    out["ungated"] = score_head(feats, head, ungated).to_dict()
    real = feats.triggered.float().cpu().numpy()[np.asarray(feats.labels) != feats.target]
    out["real_inside_cosine_route"] = round(float(ungated.routed(real).mean()), 4)
    pct = np.percentile(margins(real, route.original, feats.target), [5, 50, 95])
    out["real_margin_p5_p50_p95"] = [round(float(x), 3) for x in pct]
    out["inverted_centroid_margins"] = [
        round(float(x), 3) for x in margins(route.centroids, route.original, feats.target)
    ]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("testbeds", nargs="+", type=Path)
    ap.add_argument("--seed", type=int, default=0, help="the shot set")
    ap.add_argument(
        "--strengths", nargs="+", type=float, default=None, help="TuningConfig.strengths (default: purify's)"
    )
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    strengths = tuple(args.strengths) if args.strengths else PurifyConfig().tuning.strengths
    torch.set_num_threads(1)
    stored = ResumableRows.at(args.out)
    for tb in args.testbeds:
        key = f"{tb.name}/s{args.seed}/strengths{'-'.join(f'{x:g}' for x in strengths)}"
        stored.ensure(key, lambda tb=tb: measure(tb, args.seed, strengths))
    print(
        "| testbed | CA / ASR routed | ungated | everywhere | real inside the cosine route | "
        "real margin p5 / p50 / p95 | inverted centroids' margins |"
    )
    print("|---|---|---|---|---|---|---|")
    for key, r in stored.items():
        if r.get("route", 0) is None:
            continue

        def pair(e: dict) -> str:
            return f"{e['ca']:.3f} / {e['asr']:.3f}"

        print(
            f"| {key} | {pair(r['routed'])} | {pair(r['ungated'])} | {pair(r['everywhere'])} | "
            f"{r['real_inside_cosine_route']:.2f} | {' / '.join(f'{m:.3f}' for m in r['real_margin_p5_p50_p95'])} | "
            f"{', '.join(f'{m:.3f}' for m in r['inverted_centroid_margins'])} |"
        )


if __name__ == "__main__":
    main()
