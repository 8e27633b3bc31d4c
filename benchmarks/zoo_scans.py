"""The scan's candidates for zoo models whose stored record predates them (records written
since keep them, testbed/zoo.py), or predates a statistic they now carry. The scan alone, as
the zoo ran it (`scan_models.scan` at K = 16, shot set 0: the default inversion), on every taken
model in ZOO/runs without `scan.candidates`, or on the models named by `--models`; each scan's
mask score must equal the record's, so the candidates are those of the scan that was recorded.

    python benchmarks/zoo_scans.py zoo-out --out zoo-out/scans.json
    python benchmarks/zoo_scans.py zoo-out --models clean-shapes-s1-600 bd008-badnet-shapes-s2-600 --out typ.json

Resumable: models already in --out are skipped. About 1-2 minutes per model on one core.
benchmarks/zoo_refit.py reads the file beside the records, in preference to them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from scan_models import scan
from tqdm import tqdm

from testbed.resumable import ResumableRows


def to_scan(zoo: Path, names: list[str] | None = None) -> list[dict]:
    """The taken records without the scan's candidates, or those of `names`."""
    records = [json.loads(p.read_text()) for p in sorted((zoo / "runs").glob("*.json"))]
    if names is not None:
        unknown = set(names) - {r["name"] for r in records}
        if unknown:
            raise SystemExit(f"no record for {', '.join(sorted(unknown))} in {zoo / 'runs'}")
        return [r for r in records if r["taken"] and r["name"] in names]
    return [r for r in records if r["taken"] and "candidates" not in r["scan"]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("zoo", type=Path, help="the zoo's work folder (runs/, models/)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", nargs="+", default=None, help="scan these taken models again, candidates or not")
    args = ap.parse_args()
    torch.set_num_threads(1)
    stored = ResumableRows.at(args.out)
    todo = [r for r in to_scan(args.zoo, args.models) if r["name"] not in stored]
    for r in tqdm(todo, desc="scans"):
        summary = scan(args.zoo / "models" / r["name"], shots=16, seed=0)
        if abs(summary["score"] - r["scan"]["score"]) > 1e-3:  # the mask score: the same under any ScanRules
            raise SystemExit(f"{r['name']}: mask score {summary['score']} is not the record's {r['scan']['score']}")
        stored.ensure(r["name"], lambda summary=summary: summary)
    print(f"{len(stored)} scans in {args.out}")


if __name__ == "__main__":
    main()
