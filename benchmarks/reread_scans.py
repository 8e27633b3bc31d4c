"""Stored scans read again under each rule set of `benchmarks/zoo_refit.py`: the verdict and
suspicion every rule set gives, from the candidates a run stored, without scanning again.

    python benchmarks/reread_scans.py docs/bench/typicality/*.json docs/bench/typicality/scans/*.json
    python benchmarks/reread_scans.py docs/bench/shape-flip/scans-*.json --margin aligned-mask
    python benchmarks/reread_scans.py docs/bench/**/*.json --today --measured > today.md  # every stored scan

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

from cbpt.scan import Evidence, ScanRules, evidence_margin, read_scan, suspicion

FIELDS = ("kind", "target", "flip_rate", "mask_l1", "over_alignment", "probe")  # what `inversion` reads


def readable(scan: object) -> bool:
    """A stored scan whose candidates carry what the rules read (older records may not)."""
    if not isinstance(scan, dict):
        return False
    cands = scan.get("candidates")
    return isinstance(cands, list) and all(isinstance(c, dict) and all(k in c for k in FIELDS) for c in cands)


def measured(scan: dict) -> bool:
    """Every per-pixel mask restart carries the typicality and shape flip today's rules read: a scan
    stored before them is read with those rules left out, which no scan run today is."""
    cands = scan["candidates"]
    masks = [c for c in cands if c["kind"] == "mask" and not c["probe"] and c["over_alignment"] is not None]
    return all(c.get("typicality") is not None and c.get("shape_flip") is not None for c in masks)


def scans(path: Path) -> list[tuple[str, dict]]:
    """(a name, the stored scan) per readable scan in a run file, a `scan --json` output, a file
    of named scans or a zoo's results; none from any other JSON, so a whole folder can be given."""
    data = json.loads(path.read_text())
    if isinstance(data, dict) and isinstance(data.get("records"), list):  # a zoo's results.json
        named = [(r["name"], r.get("scan")) for r in data["records"] if isinstance(r, dict) and "name" in r]
    elif isinstance(data, dict):
        named = [(path.stem, data)] if "candidates" in data else list(data.items())
    elif isinstance(data, list):
        named = [
            (f"{Path(r['testbed']).name} K={r['shots']} s{r['seed']}", r["info"].get("scan"))
            for r in data
            if isinstance(r, dict) and isinstance(r.get("info"), dict) and "testbed" in r
        ]
    else:
        named = []
    return [(name, scan) for name, scan in named if readable(scan)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", type=Path, nargs="+")
    ap.add_argument("--margin", type=Evidence, choices=list(Evidence), help="print this rule's margin alone")
    ap.add_argument(
        "--today", action="store_true", help="only today's rules, with the target named: diff two versions' outputs"
    )
    ap.add_argument("--measured", action="store_true", help="only scans that carry every statistic the rules read")
    args = ap.parse_args()
    rules = {"today": ScanRules()} if args.today else RULES
    print("| file | scan | " + " | ".join(rules) + " |")
    print("|---|---|" + "---|" * len(rules))
    for path in args.files:
        for name, scan in scans(path):
            if args.measured and not measured(scan):
                continue
            # class indices only need to agree within one scan
            classes = sorted({c["target"] for c in scan["candidates"]} | ({scan.get("target")} - {None}))
            inv = inversion(scan, classes)
            if args.margin is not None:
                cells = [f"{evidence_margin(inv, args.margin, r):.2f}" for r in rules.values()]
            else:
                verdicts = [(read_scan(inv, r), suspicion(inv, r)) for r in rules.values()]
                named = [f" ({classes[v.target]})" if args.today and v.backdoored else "" for v, _ in verdicts]
                cells = [f"{v.evidence or 'clean'}{t}, {s:.2f}" for (v, s), t in zip(verdicts, named, strict=True)]
            print(f"| {path.name} | {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
