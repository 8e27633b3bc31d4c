"""The zoo's records in the order they were measured: each part's figures beside the rules the
record added, and which builds it measured, so a reader sees what each kept lever did and which
rows may be compared (docs/results.md#the-zoos-history).

    python benchmarks/zoo_history.py                 # the committed records below
    python benchmarks/zoo_history.py --records docs/bench/zoo-s28/results.json ZOO/runs

Reads only committed `results.json` files (or a zoo's runs/ folder). Two rows measured the same
builds when their `builds` fingerprints match: a hash of each taken model's name and the CA and
ASR its build measured (older records name no sha256; a build that repeats gives these to the
digit). A zoo rebuilt from the same plan on another machine is another sample of backdoors
(docs/results.md#what-a-build-rests-on), so rows with different fingerprints differ by their
builds as well as by their rules.
"""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass
from pathlib import Path

from testbed.zoo import stored_records, summarise

BENCH = Path(__file__).resolve().parent.parent / "docs" / "bench"


@dataclass(frozen=True)
class Record:
    """One committed zoo measurement and the rules it was the first to measure."""

    folder: str  # under docs/bench/
    added: str  # what changed since the record before it (docs/results.md names each section)
    parts: tuple[str, ...] = ("report", "fit")  # the parts it was the first to measure this way


HISTORY = (
    Record("zoo", "the first 31 models; the paper's single prompt head"),
    Record("zoo-aligned", "routing, aligned masks, compact probes; the whole zoo (the record before Judging)"),
    Record("zoo-judging", "Judging: checkpoints judged beyond the inverted trigger"),
    Record("zoo-blend-probes", "served reading, typicality, shape flip, blend probes"),
    Record("zoo-patch-probes", "patch probes"),
    Record("whitened-side/zoo-report", "target gate on the whitened trigger side (report part rebuilt here)"),
    Record("zoo-s28", "push-off the default"),
    Record("zoo-s29/before-the-gate", "d5d9f0c, the rules before the target gate (fit part rebuilt here)", ("fit",)),
    Record("zoo-s29", "target gate, whitened side, push-off: this version's rules", ("fit",)),
    Record("partial-triggers/zoo-report", "partial triggers raise the trigger side's bar", ("report",)),
    Record("partial-triggers/zoo-fit", "partial triggers, fit part", ("fit",)),
)


def builds(records: list[dict]) -> str:
    """A short fingerprint of the builds measured: each taken model's name, CA and ASR as built."""
    seen = sorted(f"{r['name']}:{r['testbed']['ca']:.4f}:{r['testbed']['asr'] or 0:.4f}" for r in records if r["taken"])
    return hashlib.sha256("|".join(seen).encode()).hexdigest()[:6]


def row(label: str, added: str, records: list[dict], part: str) -> str | None:
    rs = [r for r in records if r["part"] == part]
    s = summarise(rs, part)
    n, c = s["backdoored"], s["clean"]
    if not n:
        return None

    def count(share: float | None, of: int) -> str:
        return "-" if share is None else f"{round(share * of)} of {of}"

    auroc = "-" if s["auroc"] is None else f"{s['auroc']:.3f}"
    return (
        f"| {label} | {added} | {part} | {builds(rs)} | {auroc} | {count(s['asr_after_le_2pct'], n)} | "
        f"{count(s['asr_after_le_5pct'], n)} | {count(s['ca_within_2pt'], n + c)} | "
        f"{count(s['through_guard_le_1pct'], n)} | {s['asr_after'].get('median', float('nan')):.3f} |"
    )


def table(entries: list[tuple[str, str, tuple[str, ...], Path]]) -> str:
    lines = [
        "| record | added | part | builds | scan AUROC | ASR after <= 2% | <= 5% | CA within 2 pt | "
        "through a rejecting guard <= 1% | ASR after, median |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    loaded = [(label, added, parts, stored_records(path)) for label, added, parts, path in entries]
    for part in ("report", "fit"):
        for label, added, parts, records in loaded:
            line = row(label, added, records, part) if part in parts else None
            if line:
                lines.append(line)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", nargs="+", type=Path, help="results.json files or zoo folders, in order")
    a = ap.parse_args()
    if a.records:
        entries = [(p.parent.name if p.is_file() else p.name, "", ("report", "fit"), p) for p in a.records]
    else:
        entries = [(h.folder, h.added, h.parts, BENCH / h.folder / "results.json") for h in HISTORY]
    print(table(entries))


if __name__ == "__main__":
    main()
