"""Do the scan's rules hold on the zoo? Reads every stored model's scan candidates (the record's
own, or `benchmarks/zoo_scans.py`'s where it holds the model: for records that predate the
candidates or a statistic they now carry), reads each model again under four rule sets
(`cbpt.scan.ScanRules`: the mask score and warp over-alignment; with over-aligned masks too,
docs/method.md#aligned-masks; those masks only where atypical, docs/method.md#typicality; and
discounted by the shape flip, docs/method.md#shape-flip; a statistic a stored scan
predates bounds nothing), and prints per rule set and
part the scan's AUROC, TPR at 5% FPR, verdict TPR / FPR at the bar (suspicion >= 1) and how
often the target is named. Then it picks the bar again on the fit part and reads it on the
report part, which was never looked at while choosing.

    python benchmarks/zoo_refit.py zoo-out --scans zoo-out/scans.json --out refit.json

The new bar is the one that, on the fit part, makes the fewest errors (clean models flagged plus
backdoored models missed), the lowest such bar on ties, kept only where it flags at most 5% of
the fit part's clean models.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from cbpt.inversion import Candidate, InversionResult, Search
from cbpt.scan import Evidence, ScanRules, read_scan, suspicion
from cbpt.trigger import DummyTrigger, TriggerKind
from cbpt_guard import atomic
from cbpt_guard.artifacts import CLASSES
from testbed.zoo import stored_records, summarise

ALIGNED = (Evidence.MASK, Evidence.WARP, Evidence.ALIGNED_MASK)  # the rules before patch probes
RULES = {
    "mask score, warps (as the zoo ran)": ScanRules((Evidence.MASK, Evidence.WARP), atypical=None, shape_flip=None),
    "with over-aligned masks (as the zoo ran)": ScanRules(ALIGNED, atypical=None, shape_flip=None),
    "over-aligned masks only where atypical": ScanRules(ALIGNED, shape_flip=None),
    "... discounted by the shape flip": ScanRules(ALIGNED),
    "... and patch probes, where searched (today)": ScanRules(),
}


def stored_search(c: dict) -> Search:
    """Which search found a stored candidate: its `search`, or for scans stored before it, what
    its `probe` flag and kind then meant (a probed warp or a compact mask)."""
    if "search" in c:
        return Search(c["search"])
    if not c["probe"]:
        return Search.RESTART
    return Search.WARP if c["kind"] == TriggerKind.WARP else Search.COMPACT


def inversion(scan: dict, classes: list[str]) -> InversionResult:
    """The stored scan as an InversionResult holding what the rules read: each candidate's kind,
    target, flip rate, over-alignment and mask area (a 1-px mask of that mean), and the mask score."""

    def trigger(c: dict) -> DummyTrigger:
        blank = DummyTrigger.blank(1, 1, TriggerKind(c["kind"]))
        return blank if c["mask_l1"] is None else replace(blank, mask=torch.full((1, 1), c["mask_l1"]))

    cands = [
        Candidate(
            trigger(c),
            classes.index(c["target"]),
            c["flip_rate"],
            c["over_alignment"],
            stored_search(c),
            c.get("typicality"),  # None in scans stored before it: it then bounds nothing
            c.get("shape_flip"),  # the same
        )
        for c in scan["candidates"]
    ]
    one = torch.ones(1)
    return InversionResult(cands, one, 0.0, 0.0, scan["mask_l1"], scan["score"])


def rescored(record: dict, scan: dict, classes: list[str], rules: ScanRules) -> dict:
    """The record with its verdict read again under `rules`."""
    inv = inversion(scan, classes)
    verdict = read_scan(inv, rules)
    out = {
        **record,
        "scan": {
            "backdoored": verdict.backdoored,
            "evidence": verdict.evidence,
            "suspicion": round(suspicion(inv, rules), 4),
            "target_index": verdict.target,
        },
    }
    if record["attack"] is not None:
        out["target_named"] = verdict.target == record["attack"]["target"]
    return out


def counts(records: list[dict], bar: float) -> dict:
    clean = [r["scan"]["suspicion"] for r in records if r["kind"] == "clean"]
    bd = [r["scan"]["suspicion"] for r in records if r["kind"] == "backdoored"]
    fp, tp = sum(s >= bar for s in clean), sum(s >= bar for s in bd)
    return {
        "bar": round(bar, 4),
        "fpr": round(fp / len(clean), 4) if clean else None,
        "tpr": round(tp / len(bd), 4) if bd else None,
        "errors": fp + len(bd) - tp,
    }


def refit(fit: list[dict], max_fpr: float = 0.05) -> float:
    """The fit part's best bar: a midpoint between neighbouring scores (or 1.0 where none beats it;
    a bar above every score always qualifies)."""
    scores = sorted({r["scan"]["suspicion"] for r in fit})
    bars = [1.0, scores[-1] + 1e-6] + [(a + b) / 2 for a, b in zip(scores, scores[1:])]  # one above all: FPR 0
    allowed = [b for b in bars if (counts(fit, b)["fpr"] or 0) <= max_fpr]
    return min(allowed, key=lambda b: (counts(fit, b)["errors"], b))


def load(zoo: Path, scans: Path | None, runs: str = "runs") -> tuple[list[tuple[dict, dict, list[str]]], list[str]]:
    """(record, its scan with candidates, the model's class names) per taken model; and the
    names of those with no candidates to read."""
    extra = json.loads(scans.read_text()) if scans and scans.is_file() else {}
    rows, lacking = [], []
    for r in stored_records(zoo / runs):
        if not r["taken"]:
            continue
        scan = extra.get(r["name"]) or (r["scan"] if "candidates" in r["scan"] else None)
        if scan is None:
            lacking.append(r["name"])
            continue
        classes = (zoo / "models" / r["name"] / CLASSES).read_text().split("\n")
        rows.append((r, scan, [c for c in classes if c]))
    return rows, lacking


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("zoo", type=Path, help="the zoo's work folder (runs/, models/)")
    ap.add_argument("--scans", type=Path, default=None, help="benchmarks/zoo_scans.py's output")
    ap.add_argument("--runs", default="runs", help="the records' folder in the zoo (a run moved aside: runs-OLD)")
    ap.add_argument("--out", type=Path, default=None, help="the figures as JSON")
    args = ap.parse_args()
    rows, lacking = load(args.zoo, args.scans, args.runs)
    print(f"{len(rows)} taken models read ({len(lacking)} without stored candidates left out: {', '.join(lacking)})")
    out: dict = {"models": len(rows), "left_out": lacking, "rules": {}}
    print(
        "| rules | part | clean | backdoored | AUROC | TPR at 5% FPR | verdict TPR / FPR | target named | "
        "bar refitted on fit: TPR / FPR |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, rules in RULES.items():
        records = [rescored(r, scan, classes, rules) for r, scan, classes in rows]
        bar = refit([r for r in records if r["part"] == "fit"])
        out["rules"][name] = {"evidence": list(rules.evidence), "refitted_bar": round(bar, 4), "parts": {}}
        for part in ("fit", "report", "all"):
            s = summarise(records, part)
            part_records = [r for r in records if part == "all" or r["part"] == part]
            c = counts(part_records, bar)
            out["rules"][name]["parts"][part] = {**s, "refitted": c}
            print(
                f"| {name} | {part} | {s['clean']} | {s['backdoored']} | {s['auroc']} | {s['tpr_at_5pct_fpr']} | "
                f"{s['verdict_tpr']} / {s['verdict_fpr']} | {s['target_accuracy']} | "
                f"{c['tpr']} / {c['fpr']} (bar {c['bar']}) |"
            )
        out["rules"][name]["suspicion"] = {r["name"]: r["scan"]["suspicion"] for r in records}
    if args.out:
        atomic.write_text(args.out, json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
