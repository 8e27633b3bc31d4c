"""CBPT on every testbed: CA / ASR / RA before and after, purify time, scan verdict.

    python benchmarks/cbpt_table.py bench-out/testbed/shapes-* --seeds 0 1 2 --shots 16

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

from testbed.bench import measure


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.mean(xs) if xs else float("nan")


def _f(v: float) -> str:
    return "-" if v != v else f"{v:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("testbeds", nargs="+", type=Path)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    runs = []
    for tb in args.testbeds:
        meta = json.loads((tb / "metrics.json").read_text())
        for seed in args.seeds:
            runs.append((tb.name, measure(tb, meta["dataset"], meta["attack"], "cbpt", args.shots, seed)))
            print(json.dumps({"testbed": tb.name, **asdict(runs[-1][1])}), flush=True)
    if args.out:
        args.out.write_text(json.dumps([{"testbed": n, **asdict(r)} for n, r in runs], indent=2))
    print(
        f"\n| testbed (k={args.shots}, {len(args.seeds)} shot sets) | CA before | ASR before | CA after | "
        "ASR after (max) | RA after | purify s | scan |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for tb in args.testbeds:
        r = [run for name, run in runs if name == tb.name]
        asr = [x.asr for x in r if x.asr == x.asr]
        flagged = sum(x.info["scan"]["backdoored"] for x in r)
        print(
            f"| {tb.name} | {_mean([x.ca_before for x in r]):.3f} | {_f(_mean([x.asr_before for x in r]))} | "
            f"{_mean([x.ca for x in r]):.3f} | {_f(_mean(asr))} ({_f(max(asr) if asr else float('nan'))}) | "
            f"{_f(_mean([x.ra for x in r]))} | {_mean([x.seconds for x in r]):.0f} | {flagged}/{len(r)} backdoored |"
        )


if __name__ == "__main__":
    main()
