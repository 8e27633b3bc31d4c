"""Stored scans read again under each rule set of `benchmarks/zoo_refit.py`: the verdict and
suspicion every rule set gives, from the candidates a run stored, without scanning again.

    python benchmarks/reread_scans.py docs/bench/typicality/*.json docs/bench/typicality/scans/*.json
    python benchmarks/reread_scans.py docs/bench/shape-flip/scans-*.json --margin aligned-mask

With `--margin EVIDENCE`, each cell is that rule's margin alone (`cbpt.scan.evidence_margin`: at
least 1 where it shows a backdoor), as if the rules before it had read nothing.

Takes `benchmarks/cbpt_table.py`'s run files (a list of runs, each with `info.scan`), `cbpt-guard
scan --json` outputs, and files of named scans (`benchmarks/scan_models.py`, `zoo_scans.py`). A
rule a stored scan has no statistic for bounds nothing (typicality or the shape flip in scans
stored before them), as in `zoo_refit.py`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from zoo_refit import RULES, inversion

from cbpt.scan import Evidence, evidence_margin, read_scan, suspicion


def scans(path: Path) -> list[tuple[str, dict]]:
    """(a name, the stored scan) per scan in a run file, a `scan --json` output or a file of named
    scans."""
    data = json.loads(path.read_text())
    if isinstance(data, dict):
        return [(path.stem, data)] if "candidates" in data else list(data.items())
    return [(f"{Path(r['testbed']).name} K={r['shots']} s{r['seed']}", r["info"]["scan"]) for r in data]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", type=Path, nargs="+")
    ap.add_argument("--margin", type=Evidence, choices=list(Evidence), help="print this rule's margin alone")
    args = ap.parse_args()
    print("| scan | " + " | ".join(RULES) + " |")
    print("|---|" + "---|" * len(RULES))
    for path in args.files:
        for name, scan in scans(path):
            # class indices only need to agree within one scan
            classes = sorted({c["target"] for c in scan["candidates"]} | {scan["target"]})
            inv = inversion(scan, classes)
            if args.margin is None:
                cells = [f"{read_scan(inv, r).evidence or 'clean'}, {suspicion(inv, r):.2f}" for r in RULES.values()]
            else:
                cells = [f"{evidence_margin(inv, args.margin, r):.2f}" for r in RULES.values()]
            print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
