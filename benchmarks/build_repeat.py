"""Does this machine build the same testbed weights? Pretrain one of the zoo's bases (as
`testbed.zoo` does) to `--steps`, once per entry of `--threads`, and print each run's weights'
sha256 and clean CA beside what it was trained with (docs/results.md#what-a-build-rests-on).

    python benchmarks/build_repeat.py --dataset shapes --seed 2 --steps 800 --threads 1 1 2 --out repeat.json

Two runs at one thread count must print the same hash; a zoo base stored by `testbed zoo`
(`ZOO/bases/shapes-s2-800.pt`) can be compared with `--against`. A run is the pretraining's
first `--steps` steps of its full schedule, so its snapshot is the base's own.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import tempfile
from pathlib import Path

import torch

from cbpt_guard.artifacts import sha256_file
from testbed import datasets
from testbed.build import default_model_cfg, load_state, measure, pretrain, state_bytes
from testbed.train import trained_with
from testbed.zoo import ZooConfig


class _Reached(Exception):
    """Raised from the step hook to stop the pretraining at the snapshot asked for."""


def snapshot_at(cfg: ZooConfig, dataset: str, seed: int, steps: int, threads: int) -> dict:
    """`cfg`'s zoo base `dataset`-s`seed`-`steps`, pretrained here with `threads` torch threads
    (left set): its weights' sha256, its clean CA, and what it was trained with."""
    if not 0 < steps <= cfg.pretrain_steps:
        raise ValueError(f"--steps must be 1..{cfg.pretrain_steps}, got {steps}")
    torch.set_num_threads(threads)
    ds = datasets.build(dataset, seed, 32, cfg.sizes)
    model_cfg = cfg.model_cfg or default_model_cfg(32)
    got: dict = {}

    def hook(done: int, model: torch.nn.Module) -> None:
        if done == steps:
            got["bytes"] = state_bytes(model)
            raise _Reached

    made = trained_with(torch.device("cpu"))
    with contextlib.suppress(_Reached):
        pretrain(model_cfg, seed, ds, cfg.base_steps(), torch.device("cpu"), hook)
    with tempfile.TemporaryDirectory() as tmp:  # measured as the zoo loads it: saved, then in eval mode
        path = Path(tmp) / "base.pt"
        path.write_bytes(got["bytes"])
        ca = measure(load_state(model_cfg, seed, path, torch.device("cpu")), model_cfg, ds, None, 0)["ca"]
    return {"sha256": hashlib.sha256(got["bytes"]).hexdigest(), "ca": ca, "trained_with": made}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="shapes", choices=("shapes", "digits"))
    ap.add_argument("--seed", type=int, default=2, help="the pretraining run's seed (the zoo's are 1 and 2)")
    ap.add_argument("--steps", type=int, default=800, help="the snapshot (the zoo keeps 600, 800, 1000, 1200)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 1, 2], help="one run per entry")
    ap.add_argument("--against", type=Path, default=None, help="a stored base to compare hashes with")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    stored = sha256_file(args.against) if args.against else None
    cfg = ZooConfig(work=Path("unused"))  # the zoo's defaults: its bases' recipe
    rows = []
    print("| threads | sha256 (first 8) | clean CA | same as the stored base |")
    print("|---|---|---|---|")
    for threads in args.threads:
        row = {"threads": threads, **snapshot_at(cfg, args.dataset, args.seed, args.steps, threads)}
        rows.append(row)
        same = "-" if stored is None else ("yes" if row["sha256"] == stored else "no")
        print(f"| {threads} | {row['sha256'][:8]} | {row['ca']:.3f} | {same} |", flush=True)
    if args.out:
        out = {"dataset": args.dataset, "seed": args.seed, "steps": args.steps, "against": stored, "runs": rows}
        args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
