"""CBPT on every testbed: CA / ASR / RA before and after, purify time, scan verdict.

    python benchmarks/cbpt_table.py bench-out/testbed/shapes-* --seeds 0 1 2 --shots 16 --out runs.json

`--shots K` is the whole budget per class (cbpt.data.ShotBudget: from K = 8 a quarter held out;
`--held-out N` to choose).

With --out the runs are stored as they finish and an interrupted table resumes.

Each testbed is purified from its own `fewshot/` with each seed (a different shot set) and
scored on its `test/` split with its own trigger: one `testbed.bench.measure` run per pair,
the same code as `cbpt-guard bench --method cbpt`.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict
from pathlib import Path

from cbpt.data import ShotBudget
from cbpt.purify import PurifyConfig
from cbpt.runtime import Runtime
from testbed.bench import Run, measure


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.mean(xs) if xs else float("nan")


def _f(v: float) -> str:
    return "-" if v != v else f"{v:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("testbeds", nargs="+", type=Path)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--shots", type=int, default=16, help="K: every clean image per class, held-out ones included")
    ap.add_argument("--held-out", type=int, default=None, help="of the K, held out per class (default: ShotBudget's)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", help="the frozen encoders' precision (cbpt.runtime.Precision)")
    args = ap.parse_args()
    runtime = Runtime.of(args.device, args.precision)
    purify = PurifyConfig(budget=ShotBudget(args.shots, args.held_out))
    # resumable: runs already in --out are read back, not re-measured; --out is rewritten after each run
    stored = json.loads(args.out.read_text()) if args.out and args.out.is_file() else []
    runs = [(d.pop("testbed"), Run(**d)) for d in stored]
    for tb in args.testbeds:
        meta = json.loads((tb / "metrics.json").read_text())
        for seed in args.seeds:
            if any(name == tb.name and r.seed == seed and r.shots == args.shots for name, r in runs):
                continue
            runs.append(
                (
                    tb.name,
                    measure(tb, meta["dataset"], meta["attack"], "cbpt", args.shots, seed, purify, runtime=runtime),
                )
            )
            print(json.dumps({"testbed": tb.name, **asdict(runs[-1][1])}), flush=True)
            if args.out:
                tmp = args.out.with_suffix(".tmp")
                tmp.write_text(json.dumps([{"testbed": n, **asdict(r)} for n, r in runs], indent=2))
                tmp.replace(args.out)
    runs = [(n, r) for n, r in runs if n in {tb.name for tb in args.testbeds} and r.shots == args.shots]
    budget = purify.budget
    print(
        f"\n| testbed (K={args.shots}: {budget.tuning()} tune + {budget.held()} held out, "
        f"{len(args.seeds)} shot sets) | CA before | ASR before | CA after | "
        "ASR after (max) | RA after | purify s | scan |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for tb in args.testbeds:
        r = [run for name, run in runs if name == tb.name]
        asr = [x.asr for x in r if x.asr == x.asr]
        flagged = [x for x in r if x.info["scan"]["backdoored"]]
        planted = json.loads((tb / "metrics.json").read_text())
        # the planted target only means something where a trigger was planted
        named = (
            ""
            if planted["attack"] == "none"
            else f", target named {sum(x.info['scan']['target_index'] == planted['target'] for x in flagged)}"
        )
        print(
            f"| {tb.name} | {_mean([x.ca_before for x in r]):.3f} | {_f(_mean([x.asr_before for x in r]))} | "
            f"{_mean([x.ca for x in r]):.3f} | {_f(_mean(asr))} ({_f(max(asr) if asr else float('nan'))}) | "
            f"{_f(_mean([x.ra for x in r]))} | {_mean([x.seconds for x in r]):.0f} | "
            f"{len(flagged)}/{len(r)} backdoored{named} |"
        )


if __name__ == "__main__":
    main()
