"""A zoo run's models beside one rule of a selection replay: what purify keeps now against what
the replayed rule kept over the checkpoints recorded before (docs/results.md#the-report-part-with-blend-probes).

    python benchmarks/zoo_vs_replay.py zoo-out/runs docs/bench/served-reading/replay-served-fit.md --part fit

Reads the zoo's records (`testbed.zoo.stored_records`: a runs/ folder, a zoo folder, or a committed
results.json standing for a run whose folder is gone) and the replay's markdown
table (`selection_replay.py replay` writes one row per run, one column per rule); prints one row
per model: CA / ASR before, the rule's CA / ASR (rung), this run's, and how many blend probes
the plan tuned against.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from testbed.zoo import stored_records


def replay_column(path: Path, rule: str) -> dict[str, str]:
    """Model name -> the cell of `rule`'s column in a replay table."""
    out: dict[str, str] = {}
    header: list[str] | None = None
    for line in path.read_text().splitlines():
        if not line.startswith("|") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
            continue
        out[cells[0].split("/")[0]] = cells[header.index(rule)]
    return out


def row(r: dict, replayed: dict[str, str]) -> str:
    if not r["taken"]:
        return f"| {r['name']} | not taken | | | |"
    t = r["tuning"]
    asr = "" if r["asr_after"] is None else f" / {r['asr_after']:.3f}"
    before = f"{r['ca_before']:.3f}" + ("" if r["asr_before"] is None else f" / {r['asr_before']:.3f}")
    blends = sum(1 for x in t.get("triggers", []) if x.get("search") == "blend")
    rung = "orig" if t.get("kept_original") else t.get("rung")
    return f"| {r['name']} | {before} | {replayed.get(r['name'], '-')} | {r['ca_after']:.3f}{asr} ({rung}) | {blends} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, help="the zoo's runs/ folder, its work folder or a results.json")
    ap.add_argument("replay", type=Path, help="a selection_replay.py replay table (markdown)")
    ap.add_argument("--rule", default="today")
    ap.add_argument("--part", choices=("fit", "report"), default=None)
    args = ap.parse_args()
    replayed = replay_column(args.replay, args.rule)
    print(f"| model | CA / ASR before | {args.rule} (replayed) | this run (rung) | blends tuned against |")
    print("|---|---|---|---|---|")
    for r in stored_records(args.runs):
        if args.part is None or r["part"] == args.part:
            print(row(r, replayed))


if __name__ == "__main__":
    main()
