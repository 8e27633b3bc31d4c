"""A shots sweep from `cbpt_table.py --out` files: CA / ASR (worst shot set) per testbed and K.

    python benchmarks/sweep_table.py runs/sweep-*.json runs/k16-*.json

Runs are grouped by testbed and by K (`--shots`); each cell is the mean over the shot sets
found, with the number of shot sets.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--testbeds", nargs="*", default=None, help="only these testbeds (default: all found)")
    args = ap.parse_args()
    cells: dict[tuple[str, int], list[dict]] = {}
    for f in args.runs:
        for run in json.loads(f.read_text()):
            if args.testbeds is None or run["testbed"] in args.testbeds:
                cells.setdefault((run["testbed"], run["shots"]), []).append(run)
    testbeds = sorted({t for t, _ in cells})
    ks = sorted({k for _, k in cells})
    print("| testbed | " + " | ".join(f"K = {k}" for k in ks) + " |")
    print("|---" * (len(ks) + 1) + "|")
    for t in testbeds:
        row = []
        for k in ks:
            runs = cells.get((t, k))
            if not runs:
                row.append("-")
                continue
            ca = statistics.mean(r["ca"] for r in runs)
            asr = [r["asr"] for r in runs if r["asr"] is not None and r["asr"] == r["asr"]]
            tail = f" / {statistics.mean(asr):.3f} ({max(asr):.3f})" if asr else ""
            row.append(f"{ca:.3f}{tail} [{len(runs)}]")
        print(f"| {t} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
