"""Push-off's gate replayed over `oracle_trigger.py` runs (docs/results.md#push-off-where-the-copies-stand-apart).

Each run of `oracle_trigger.py --levers base away2` (without `--push-off`) stores, per model and shot set,
step 2 without the push (`base`), with it (`away2`), and how far the copies stand from the
found target's own shots (`apart`). Step 2 is deterministic given the scan, so the gate's result
is one of the two: `away2` where every found target's copies stand at least `--apart` spreads
apart (`cbpt.purify.PushOff`), `base` elsewhere. The script prints each row and how many meet
ASR <= 2%, <= 5%, CA within 2 points of the model's own, and both.

    python benchmarks/push_off_replay.py docs/bench/push-off/report.json --apart 6.5
    python benchmarks/push_off_replay.py docs/bench/push-off/known*.json --by-model   # a line per model
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from oracle_trigger import row_key

from cbpt.purify import PushOff
from cbpt.tuning import TuningConfig
from testbed.zoo import ASR_BAR, ASR_WORST_BAR, CA_BAR, at_most

# the rows oracle_trigger.py stores for step 2 against the inverted triggers at purify's tolerance
BASE, PUSHED = (row_key("inverted", TuningConfig.clean_tolerance, lever) for lever in ("base", "away2"))


def gated(row: dict, apart: float) -> tuple[str, dict]:
    """Which run the gate keeps for `row`, and its figures."""
    spreads = row.get("apart") or []
    if spreads and min(spreads) >= apart:
        return "pushed", row[PUSHED]
    return "sent home", row[BASE]


def by_model(rows: dict[str, dict], apart: float) -> None:
    """One line per model over its shot sets (rows `name`, `name@1`, ...) as the README's rows read
    them: CA before, then for each branch the mean CA after, the most CA points one shot set lost,
    and the mean and worst ASR after."""
    models: dict[str, list[dict]] = {}
    for name, row in rows.items():
        models.setdefault(name.split("@")[0], []).append(row)
    print("\n| model | shot sets | gate opens on | CA before | sent home: CA after (most lost), ASR (worst) | gated |")
    print("|---|---|---|---|---|---|")
    for name, runs in models.items():
        cells = []
        for pick in (lambda r: r[BASE], lambda r: gated(r, apart)[1]):
            ca, asr = [pick(r)["ca"] for r in runs], [pick(r)["asr"] for r in runs]
            lost = max(r["before"]["ca"] - pick(r)["ca"] for r in runs)
            cells.append(f"{statistics.fmean(ca):.3f} ({100 * lost:.1f}), {statistics.fmean(asr):.3f} ({max(asr):.3f})")
        opened = sum(gated(r, apart)[0] == "pushed" for r in runs)
        before = runs[0]["before"]["ca"]
        print(f"| {name} | {len(runs)} | {opened} | {before:.3f} | {cells[0]} | {cells[1]} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path, help="oracle_trigger.py outputs with base and away2")
    ap.add_argument("--apart", type=float, default=PushOff().apart, help="the gate's distance, in spreads")
    ap.add_argument("--by-model", action="store_true", help="also one line per model over its shot sets")
    args = ap.parse_args()
    rows = {name: row for path in args.runs for name, row in json.loads(path.read_text()).items()}
    rows = {name: row for name, row in rows.items() if BASE in row and PUSHED in row}
    print("| model | apart (spreads) | CA / ASR before | sent home: CA / ASR | pushed: CA / ASR | gate keeps |")
    print("|---|---|---|---|---|---|")
    tallies = {"sent home": [], "gated": []}
    for name, row in rows.items():
        before, base, pushed = row["before"], row[BASE], row[PUSHED]
        which, kept = gated(row, args.apart)
        spreads = ", ".join(f"{a:.1f}" for a in row.get("apart") or []) or "- (read clean)"
        print(
            f"| {name} | {spreads} | {before['ca']:.3f} / {before['asr']:.3f} | {base['ca']:.3f} / {base['asr']:.3f} | "
            f"{pushed['ca']:.3f} / {pushed['asr']:.3f} | {which} |"
        )
        for key, r in (("sent home", base), ("gated", kept)):
            tallies[key].append((before["ca"] - r["ca"], r["asr"]))
    n = len(tallies["gated"])
    print(f"\n| of {n} | ASR <= 2% | ASR <= 5% | CA within 2 points | both | mean ASR |")
    print("|---|---|---|---|---|---|")
    for key, runs in tallies.items():
        low = sum(at_most(asr, ASR_BAR) for _, asr in runs)
        five = sum(at_most(asr, ASR_WORST_BAR) for _, asr in runs)
        ca = sum(at_most(cost, CA_BAR) for cost, _ in runs)
        both = sum(at_most(asr, ASR_BAR) and at_most(cost, CA_BAR) for cost, asr in runs)
        mean = statistics.fmean(asr for _, asr in runs) if runs else float("nan")
        print(f"| {key} | {low} | {five} | {ca} | {both} | {mean:.3f} |")
    if args.by_model:
        by_model(rows, args.apart)


if __name__ == "__main__":
    main()
