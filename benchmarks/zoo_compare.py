"""Two zoo runs of the same models side by side: what a change of the method did, model by model.

    python benchmarks/zoo_compare.py ZOO/runs-noroute ZOO/runs --names "paper's head" routed
    python benchmarks/zoo_compare.py docs/bench/zoo/results.json ZOO/runs --names ungated gated

Reads the per-model records of both sides (`testbed zoo` writes one JSON per model under
runs/, and all of them into results.json, so a committed results.json stands for a run whose
folder is gone), keeps the taken models measured in both, and prints per part the CA drop and the ASR
after of each, then one row per model (before -> after on each side) (docs/results.md#routing).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from testbed.zoo import CA_BAR, at_most, quantiles, stored_records


def _records(path: Path) -> dict[str, dict]:
    return {r["name"]: r for r in stored_records(path)}


def _q(xs: list[float]) -> str:
    d = quantiles(xs)
    return "-" if not d["n"] else f"{d['median']:.3f} / {d['p95']:.3f} / {d['worst']:.3f}"


def _within(drops: list[float]) -> str:
    return f"{np.mean([at_most(d, CA_BAR) for d in drops]):.2f}"


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def table(a: dict[str, dict], b: dict[str, dict], names: tuple[str, str]) -> str:
    both = sorted(k for k in b if k in a and b[k]["taken"] and a[k]["taken"])
    na, nb = names
    lines = [
        f"{len(both)} taken models measured both ways.",
        "",
        f"| part | models (backdoored) | CA drop, {na}: median / p95 / worst | within 2 pt | CA drop, {nb} | "
        f"within 2 pt | ASR after, {na}: median / p95 / worst | ASR after, {nb} | "
        f"through the guard worst, {na} / {nb} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for part in ("report", "fit", "all"):
        ks = [k for k in both if part == "all" or b[k]["part"] == part]
        if not ks:
            continue
        da = [a[k]["ca_before"] - a[k]["ca_after"] for k in ks]
        db = [b[k]["ca_before"] - b[k]["ca_after"] for k in ks]
        bd = [k for k in ks if b[k]["kind"] == "backdoored"]
        guard = [
            _f(max((r[k]["alarm"] or {}).get("asr_through_guard", 0.0) for k in bd)) if bd else "-" for r in (a, b)
        ]
        lines.append(
            f"| {part} | {len(ks)} ({len(bd)}) | {_q(da)} | {_within(da)} | {_q(db)} | {_within(db)} | "
            f"{_q([a[k]['asr_after'] for k in bd])} | {_q([b[k]['asr_after'] for k in bd])} | {guard[0]} / {guard[1]} |"
        )
    # before and after on each side: a zoo rebuilt on another machine has its own "before"
    lines += [
        "",
        f"| model | part | CA, {na} | CA, {nb} | ASR, {na} | ASR, {nb} |",
        "|---|---|---|---|---|---|",
    ]
    for k in both:
        lines.append(
            f"| {k} | {b[k]['part']} | {_move(a[k], 'ca')} | {_move(b[k], 'ca')} | {_move(a[k], 'asr')} | "
            f"{_move(b[k], 'asr')} |"
        )
    return "\n".join(lines)


def _move(record: dict, figure: str) -> str:
    before, after = record[f"{figure}_before"], record[f"{figure}_after"]
    return "-" if before is None else f"{before:.3f} -> {after:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("before", type=Path, help="a zoo runs/ folder or results.json")
    ap.add_argument("after", type=Path, help="another runs/ folder (or results.json) of the same zoo")
    ap.add_argument("--names", nargs=2, default=("before", "after"))
    args = ap.parse_args()
    print(table(_records(args.before), _records(args.after), tuple(args.names)))


if __name__ == "__main__":
    main()
