"""Build the testbed for every attack and print CA / ASR / RA and build time.

    python benchmarks/testbed_table.py --dataset shapes --out bench-out/testbed
    python benchmarks/testbed_table.py --dataset shapes100 --tower vit --image-size 64 --out bench-out/testbed

The clean model is pretrained once per dataset (cached); each attack then poisons and
fine-tunes its own copy. Writes `<out>/<dataset>-<attack>/` testbeds and `<out>/table-<dataset>.json`.
Resumable: a testbed already in `--out` with the same configuration is read back, not rebuilt.
The table is written after each attack and keeps the rows of attacks not named this time, so
subsets can be built one by one and a stopped run keeps what it built.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cbpt_guard import atomic
from testbed.build import BuildConfig, Tower, build, config_dict, default_cache_dir, write
from testbed.datasets import DATASETS
from testbed.triggers import ATTACKS


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def stored(folder: Path, cfg: BuildConfig) -> dict | None:
    """The metrics of the testbed in `folder` if it was built with `cfg` (None: build it)."""
    path = folder / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    saved = metrics.get("config")
    if saved is None:
        return None
    want = json.loads(json.dumps(config_dict(cfg)))
    # a setting added after the folder was built reads as its default there
    defaults = json.loads(json.dumps(config_dict(BuildConfig())))
    return metrics if {k: saved.get(k, defaults[k]) for k in want} == want else None


def store(table: Path, rows: list[dict]) -> list[dict]:
    """Merge `rows` into the table file (a row per attack; these replace the stored ones), write it
    atomically, and return the merged rows."""
    named = {r["attack"] for r in rows}
    kept = [r for r in json.loads(table.read_text()) if r["attack"] not in named] if table.is_file() else []
    merged = kept + rows
    atomic.write_text(table, json.dumps(merged, indent=2))
    return merged


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="shapes", choices=DATASETS)
    ap.add_argument("--out", type=Path, default=Path("bench-out/testbed"))
    ap.add_argument("--attacks", nargs="*", default=["none", *ATTACKS])
    ap.add_argument("--target", type=int, default=0)
    ap.add_argument("--tower", default="resnet", choices=[t.value for t in Tower])
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--patch-size", type=int, default=None, help="vit: patch side (default: a 4 x 4 grid)")
    args = ap.parse_args()
    # the 32-px ResNet testbeds keep their old names; others say their tower and size
    default = (args.tower, args.image_size) == ("resnet", 32)
    prefix = args.dataset if default else f"{args.dataset}-{args.tower}{args.image_size}"
    prefix += f"-p{args.patch_size}" if args.patch_size else ""
    built_now: list[dict] = []  # this call's rows; the table keeps other attacks' stored rows
    rows: list[dict] = []
    for attack in args.attacks:
        cfg = BuildConfig(
            dataset=args.dataset,
            attack=attack,
            target=args.target,
            tower=Tower(args.tower),
            image_size=args.image_size,
            patch_size=args.patch_size,
        )
        folder = args.out / f"{prefix}-{attack}"
        t0 = time.perf_counter()
        m = stored(folder, cfg)
        if m is None:
            built = build(cfg, cache=default_cache_dir())
            write(built, cfg, folder)
            m, seconds = built.metrics, time.perf_counter() - t0  # the folder's writing included
        else:
            seconds = m["seconds"]["total"]
        built_now.append(
            {
                "attack": attack,
                "ca": m["ca"],
                "asr": m["asr"],
                "ra": m["ra"],
                "clean_ca": m["clean_model"]["ca"],
                "clean_asr": m["clean_model"]["asr"],
                "seconds": round(seconds, 1),
                "finetune_s": m["seconds"]["finetune"],
            }
        )
        print(json.dumps(built_now[-1]), flush=True)
        rows = store(args.out / f"table-{prefix}.json", built_now)  # after each attack: a stopped run keeps its rows
    print(f"\n| {prefix} attack | CA | ASR | RA | clean-model CA | clean-model ASR | build s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['attack']} | {fmt(r['ca'])} | {fmt(r['asr'])} | {fmt(r['ra'])} | {fmt(r['clean_ca'])} | "
            f"{fmt(r['clean_asr'])} | {r['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
