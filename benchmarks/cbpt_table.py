"""CBPT on every testbed: CA / ASR / RA before and after, purify time, scan verdict.

    python benchmarks/cbpt_table.py bench-out/testbed/shapes-* --seeds 0 1 2 --shots 16 --out runs.json

`--pooled` adds a line over every testbed named, read as builds of one row (`testbed build
--poison-seed`): one build's three shot sets cannot settle a 2-point target
(docs/results.md#one-row-several-builds).

`--detail` prints the table the issue-19 rows are written up with
(docs/results.md#issue-19s-rows-again-push-off-the-default): CA after with its lowest shot set,
RA, attack success through a guard that rejects what the alarm flags, and the shot sets where
push-off opened with how far the found target's copies stood from its own shots.

`--shots K` is the whole budget per class (cbpt.data.ShotBudget: from K = 8 a quarter held out;
`--held-out N` to choose).

With --out the runs are stored as they finish (`testbed.resumable.ResumableRows`, by testbed,
K, held-out shots and shot set) and an interrupted table resumes; files written before the runs
were keyed (a list of runs) are read too.

Each testbed is purified from its own `fewshot/` with each seed (a different shot set) and
scored on its `test/` split with its own trigger: one `testbed.bench.measure` run per pair,
the same code as `cbpt-guard bench --method cbpt`.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict
from functools import partial
from itertools import product
from pathlib import Path

from cbpt.data import ShotBudget
from cbpt.purify import PurifyConfig
from cbpt.runtime import Runtime, set_torch_threads
from testbed.bench import Run, measure
from testbed.resumable import ResumableRows
from testbed.zoo import ASR_BAR, ASR_WORST_BAR, CA_BAR, at_most


def run_key(testbed: str, budget: ShotBudget, seed: int) -> str:
    return f"{testbed}/k{budget.shots}-h{budget.held()}-s{seed}"


def stored_runs(path: Path | None) -> ResumableRows:
    """The runs already in `path`, by `run_key`. A list of runs (how the table stored them
    before) is read as measured with the default held-out share; the file is rewritten keyed
    only when a new run is added."""
    if path is None or not path.is_file() or not isinstance(stored := json.loads(path.read_text()), list):
        return ResumableRows.at(path)
    return ResumableRows(path, {run_key(d["testbed"], ShotBudget(d["shots"]), d["seed"]): d for d in stored})


def _measured(tb: Path, seed: int, purify: PurifyConfig, runtime: Runtime) -> dict:
    """One purify of `tb`'s shot set `seed`, scored on its test split: a stored row."""
    meta = json.loads((tb / "metrics.json").read_text())
    run = measure(tb, meta["dataset"], meta["attack"], "cbpt", purify.budget.shots, seed, purify, runtime=runtime)
    return {"testbed": tb.name, **asdict(run)}


def _run(row: dict) -> Run:
    return Run(**{k: v for k, v in row.items() if k != "testbed"})


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.mean(xs) if xs else float("nan")


def _f(v: float) -> str:
    return "-" if v != v else f"{v:.3f}"


def scan_cell(runs: list[Run], planted: dict) -> str:
    """How many shot sets read backdoored, and on how many of those the scan named the planted
    target (`metrics.json`'s; said only where a trigger was planted)."""
    flagged = [x for x in runs if x.info["scan"]["backdoored"]]
    cell = f"{len(flagged)}/{len(runs)} backdoored"
    if planted["attack"] == "none":
        return cell
    return cell + f", target named {sum(x.info['scan']['target_index'] == planted['target'] for x in flagged)}"


def table(budget: ShotBudget, seeds: list[int]) -> list[str]:
    return [
        f"| testbed (K={budget.shots}: {budget.tuning()} tune + {budget.held()} held out, {len(seeds)} shot sets) | "
        "CA before | ASR before | CA after | ASR after (max) | RA after | purify s | scan |",
        "|---|---|---|---|---|---|---|---|",
    ]


def table_line(name: str, runs: list[Run], planted: dict) -> str:
    """A testbed's row over its shot sets: means, the worst ASR, the scan."""
    asr = [x.asr for x in runs if x.asr == x.asr]
    return (
        f"| {name} | {_mean([x.ca_before for x in runs]):.3f} | {_f(_mean([x.asr_before for x in runs]))} | "
        f"{_mean([x.ca for x in runs]):.3f} | {_f(_mean(asr))} ({_f(max(asr) if asr else float('nan'))}) | "
        f"{_f(_mean([x.ra for x in runs]))} | {_mean([x.seconds for x in runs]):.0f} | {scan_cell(runs, planted)} |"
    )


def detail_table() -> list[str]:
    return [
        "| testbed | CA before -> after (lowest) | ASR before -> after (worst) | RA after | "
        "through the guard (worst) | push-off opened (copies apart) | scan | purify s |",
        "|---|---|---|---|---|---|---|---|",
    ]


def detail_line(name: str, runs: list[Run], planted: dict) -> str:
    """`--detail`'s row: CA after as a mean and its lowest shot set; ASR, RA and attack success
    through a rejecting guard (`alarm_eval`; "-" where no trigger was planted or the run did not
    score the alarm); the shot sets where push-off opened (`tuning.away`) and the range of the
    found targets' copies' distance from their own shots (`tuning.apart`), purify's time range."""
    ca, secs = [x.ca for x in runs], [x.seconds for x in runs]
    asr, ra, guard = "–", "–", "–"
    if any(x.asr == x.asr for x in runs):  # a trigger was planted
        worst = max(x.asr for x in runs)
        asr = f"{_mean([x.asr_before for x in runs]):.3f} -> {_mean([x.asr for x in runs]):.3f} ({worst:.3f})"
        ra = _f(_mean([x.ra for x in runs]))
        through = [x.info.get("alarm_eval", {}).get("asr_through_guard") for x in runs]
        if all(t is not None for t in through):
            guard = f"{_mean(through):.3f} ({max(through):.3f})"
    tuning = [x.info.get("tuning") or {} for x in runs]
    apart = [a for t in tuning for a in t.get("apart", [])]
    opened = f"{sum(bool(t.get('away')) for t in tuning)} of {len(runs)}" + (
        f" ({min(apart):.1f}-{max(apart):.1f})" if apart else ""
    )
    return (
        f"| {name} | {_mean([x.ca_before for x in runs]):.3f} -> {_mean(ca):.3f} ({min(ca):.3f}) | {asr} | {ra} | "
        f"{guard} | {opened} | {scan_cell(runs, planted)} | {min(secs):.0f}-{max(secs):.0f} |"
    )


def pooled_line(builds: list[list[Run]]) -> str:
    """One row's figures over several builds of it (each a list of shot-set runs): ASR after over
    every purify and per build, the CA each purify cost, against issue 19's targets (a build's
    mean ASR <= 2%, every purify <= 5%, CA within 2 points: the zoo's bars, testbed.zoo)."""
    runs = [x for b in builds for x in b]
    asr = [x.asr for x in runs if x.asr == x.asr]
    per_build = [_mean([x.asr for x in b]) for b in builds]
    drop = [x.ca_before - x.ca for x in runs]
    return (
        f"| {len(builds)} builds x {len(runs) // len(builds)} shot sets | ASR after mean {_f(_mean(asr))}, "
        f"worst {_f(max(asr, default=float('nan')))}; "
        f"<= 5% on {sum(at_most(a, ASR_WORST_BAR) for a in asr)} of {len(asr)} | "
        f"builds' mean ASR <= 2% on {sum(at_most(a, ASR_BAR) for a in per_build)} of {len(builds)} | "
        f"CA cost mean {100 * _mean(drop):.1f}, worst {100 * max(drop):.1f} points; within 2 on "
        f"{sum(at_most(d, CA_BAR) for d in drop)} of {len(drop)} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("testbeds", nargs="+", type=Path)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--shots", type=int, default=16, help="K: every clean image per class, held-out ones included")
    ap.add_argument("--held-out", type=int, default=None, help="of the K, held out per class (default: ShotBudget's)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", help="the frozen encoders' precision (cbpt.runtime.Precision)")
    ap.add_argument("--detail", action="store_true", help="lowest CA, through the guard, push-off (docs/results.md)")
    ap.add_argument("--pooled", action="store_true", help="a last line over the testbeds as builds of one row")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: half the cores, as the CLI)")
    args = ap.parse_args()
    set_torch_threads(args.threads)
    runtime = Runtime.of(args.device, args.precision)
    purify = PurifyConfig(budget=ShotBudget(args.shots, args.held_out))
    budget = purify.budget
    runs = stored_runs(args.out)
    for tb, seed in product(args.testbeds, args.seeds):
        if (key := run_key(tb.name, budget, seed)) not in runs:
            print(json.dumps(runs.ensure(key, partial(_measured, tb, seed, purify, runtime))), flush=True)
    lines, line = (detail_table(), detail_line) if args.detail else (table(budget, args.seeds), table_line)
    for tb in args.testbeds:
        r = [_run(runs[run_key(tb.name, budget, seed)]) for seed in args.seeds]
        lines.append(line(tb.name, r, json.loads((tb / "metrics.json").read_text())))
    print("\n" + "\n".join(lines))
    if args.pooled:
        print(pooled_line([[_run(runs[run_key(tb.name, budget, s)]) for s in args.seeds] for tb in args.testbeds]))


if __name__ == "__main__":
    main()
