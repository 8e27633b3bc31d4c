"""CBPT on every testbed: CA / ASR / RA before and after, purify time, scan verdict.

    python benchmarks/cbpt_table.py bench-out/testbed/shapes-* --seeds 0 1 2 --shots 16

Each testbed is purified from its own `fewshot/` with each seed (a different shot set), and
evaluated on its `test/` split with its own trigger, by the same code as `testbed eval`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from cbpt.inversion import InversionConfig
from cbpt.model import load_clip
from cbpt.purify import PurifyConfig, load_shots, original_head, run_purify, scan_summary
from cbpt.tuning import TuningConfig
from testbed.evaluate import align_classes, evaluate_weights


def purify_and_eval(tb: Path, seed: int, shots: int, cfg: PurifyConfig) -> dict:
    clip = load_clip(tb / "model.pt")
    shot_set = load_shots(clip, tb / "fewshot", tb / "classes.txt", shots, seed, cfg.held_out)
    t0 = time.perf_counter()
    result = run_purify(clip, shot_set, replace(cfg, seed=seed, inversion=replace(cfg.inversion, seed=seed),
                                                tuning=replace(cfg.tuning, seed=seed)))
    seconds = time.perf_counter() - t0
    before = evaluate_weights(clip, align_classes(original_head(clip, shot_set.classnames), list(shot_set.classnames), tb), tb)
    after = evaluate_weights(clip, align_classes(result.purified, list(shot_set.classnames), tb), tb)
    scan = scan_summary(result.inversion, shot_set.classnames)
    return {"testbed": tb.name, "seed": seed, "shots": shots, "before": before.to_dict(), "after": after.to_dict(),
            "purify_s": round(seconds, 1), "scan": scan}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("testbeds", nargs="+", type=Path)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    cfg = PurifyConfig(shots=args.shots, inversion=InversionConfig(), tuning=TuningConfig())
    rows = []
    for tb in args.testbeds:
        for seed in args.seeds:
            rows.append(purify_and_eval(tb, seed, args.shots, cfg))
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    mean = lambda xs: statistics.mean(xs) if xs else float("nan")
    print(f"\n| testbed (k={args.shots}, {len(args.seeds)} shot sets) | CA before | ASR before | RA before | "
          "CA after | ASR after (max) | RA after | purify s | scan |")
    print("|---|---|---|---|---|---|---|---|---|")
    for tb in args.testbeds:
        r = [x for x in rows if x["testbed"] == tb.name]
        b, a = [x["before"] for x in r], [x["after"] for x in r]
        asr_b = [x["asr"] for x in b if x["asr"] == x["asr"]]
        asr_a = [x["asr"] for x in a if x["asr"] == x["asr"]]
        verdicts = sum(x["scan"]["backdoored"] for x in r)
        fmt = lambda v: "-" if v != v else f"{v:.3f}"
        print(f"| {tb.name} | {mean([x['ca'] for x in b]):.3f} | {fmt(mean(asr_b))} | {fmt(mean([x['ra'] for x in b]))} | "
              f"{mean([x['ca'] for x in a]):.3f} | {fmt(mean(asr_a))} ({fmt(max(asr_a) if asr_a else float('nan'))}) | "
              f"{fmt(mean([x['ra'] for x in a]))} | {mean([x['purify_s'] for x in r]):.0f} | "
              f"{verdicts}/{len(r)} backdoored |")


if __name__ == "__main__":
    main()
