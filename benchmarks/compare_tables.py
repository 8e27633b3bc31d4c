"""Two sets of `cbpt_table.py --out` runs side by side, per testbed: mean CA (lowest), mean ASR (worst
shot set), ASR through a guard that rejects flagged images (worst), and how many shot sets the scan flagged.

    python benchmarks/compare_tables.py before/*.json --against after/*.json --labels c45098e now

Runs are matched by testbed and seed; a testbed present in one set only is listed with a dash.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def _load(files: list[Path]) -> dict[str, list[dict]]:
    by_testbed: dict[str, list[dict]] = {}
    for f in files:
        for run in json.loads(f.read_text()):
            by_testbed.setdefault(run["testbed"], []).append(run)
    return by_testbed


def _cell(runs: list[dict] | None) -> str:
    if not runs:
        return "-"
    ca = [r["ca"] for r in runs]
    asr = [r["asr"] for r in runs if r["asr"] == r["asr"] and r["asr"] is not None]
    guard = [g for r in runs if (g := (r["info"].get("alarm_eval") or {}).get("asr_through_guard")) is not None]
    flagged = sum(bool(r["info"]["scan"]["backdoored"]) for r in runs)
    cell = f"{statistics.mean(ca):.3f} ({min(ca):.3f})"
    cell += f" / {statistics.mean(asr):.3f} ({max(asr):.3f})" if asr else " / -"
    cell += f" / {statistics.mean(guard):.3f} ({max(guard):.3f})" if asr and guard else " / -"
    return f"{cell}, {flagged}/{len(runs)} flagged"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("before", nargs="+", type=Path)
    ap.add_argument("--against", nargs="+", type=Path, required=True)
    ap.add_argument("--labels", nargs=2, default=["before", "after"])
    args = ap.parse_args()
    a, b = _load(args.before), _load(args.against)
    print(
        f"| testbed | CA before purify / ASR | {args.labels[0]}: CA (lowest) / ASR (worst) / guard (worst) | "
        f"{args.labels[1]}: CA (lowest) / ASR (worst) / guard (worst) |"
    )
    print("|---|---|---|---|")
    for name in sorted(set(a) | set(b), key=lambda n: (n.split("-")[0], n)):
        ref = (a.get(name) or b.get(name))[0]
        before = f"{ref['ca_before']:.3f} / " + (
            "-" if ref["asr_before"] != ref["asr_before"] else f"{ref['asr_before']:.3f}"
        )
        print(f"| {name} | {before} | {_cell(a.get(name))} | {_cell(b.get(name))} |")


if __name__ == "__main__":
    main()
