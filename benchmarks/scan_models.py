"""The scan alone on testbed models at chosen shot sets, as `purify` runs it there (the shot
set's seed also seeds the inversion, as in `benchmarks/cbpt_table.py`): to measure a statistic
of the scan's candidates on models whose stored runs predate it, without purifying again.

    python benchmarks/scan_models.py TB/shapes-vit64-none@0 TB/shapes-vit64-none@5 --shots 16 --out scans.json

Writes {"NAME K=K sSEED": scan_summary} (what `scan --json` prints), resumable: specs already
in --out are skipped. `benchmarks/reread_scans.py` reads the file under each rule set.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from cbpt.data import load_shots
from cbpt.model import load_clip
from cbpt.purify import PurifyConfig, original_head
from cbpt.scan import run_scan, scan_summary
from cbpt_guard.artifacts import CLASSES
from testbed.resumable import ResumableRows


def scan(model: Path, shots: int, seed: int) -> dict:
    cfg = PurifyConfig()
    clip = load_clip(model / "model.pt")
    shot_set = load_shots(clip, model / "fewshot", model / CLASSES, replace(cfg.budget, shots=shots), seed)
    inv = run_scan(clip, shot_set, replace(cfg.inversion, seed=seed), original_head(clip, shot_set.classnames))
    return scan_summary(inv, shot_set.classnames)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("specs", nargs="+", help="MODEL_DIR@SEED")
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    stored = ResumableRows.at(args.out)
    for spec in args.specs:
        path, seed = spec.rsplit("@", 1)
        key = f"{Path(path).name} K={args.shots} s{seed}"
        if key in stored:
            continue
        t0 = time.perf_counter()
        s = stored.ensure(key, lambda path=path, seed=seed: scan(Path(path), args.shots, int(seed)))
        print(
            f"{key}: {s['evidence'] or 'clean'} -> {s['target']}, suspicion {s['suspicion']}, "
            f"{time.perf_counter() - t0:.0f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
