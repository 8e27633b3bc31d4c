"""Pretrain a testbed CLIP and print its clean zero-shot CA as it learns: for choosing a tower's
recipe (width, depth, patch, learning rate, steps) before building testbeds on it.

    python benchmarks/pretrain_curve.py --dataset shapes --tower vit --width 64 --head-width 16 --out curve.json
    python benchmarks/pretrain_curve.py --dataset shapes --tower vit --recipe distil --augment shift --steps 6000

CA is measured on a fixed random subset of the test split (`--eval-images`) every `--every`
steps; the model is not cached (`testbed build` caches the recipe it settles on).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from testbed import datasets
from testbed.build import (
    BuildConfig,
    Recipe,
    Tower,
    class_weights,
    default_cache_dir,
    default_model_cfg,
    predict,
    train_clean,
)
from testbed.train import Augment, TrainConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="shapes", choices=datasets.DATASETS)
    ap.add_argument("--tower", default="vit", choices=[t.value for t in Tower])
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--width", type=int, default=None, help="the image tower's width (default: the testbed's)")
    ap.add_argument("--layers", type=int, default=None, help="ViT: transformer layers")
    ap.add_argument("--head-width", type=int, default=None, help="ViT: width of one attention head")
    ap.add_argument("--patch", type=int, default=None, help="ViT: patch side in px (default: 8)")
    ap.add_argument("--pool", default=None, choices=["tok", "avg"], help="ViT: class token or mean of the patches")
    ap.add_argument("--pos-embed", default=None, choices=["learnable", "sin_cos_2d"], help="ViT: position embedding")
    ap.add_argument(
        "--recipe",
        default="contrastive",
        choices=[r.value for r in Recipe],
        help="distil: learn the cached (or built) clean ResNet testbed's image features",
    )
    ap.add_argument(
        "--augment", default="none", choices=[a.value for a in Augment], help="what a batch's images go through"
    )
    ap.add_argument("--train-size", type=int, default=None, help="generated training pairs (default: the testbed's)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--every", type=int, default=300)
    ap.add_argument("--eval-images", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    cfg = default_model_cfg(args.image_size, Tower(args.tower))
    overrides = {
        "width": args.width,
        "layers": args.layers,
        "head_width": args.head_width,
        "patch_size": args.patch,
        "pool_type": args.pool,
        "pos_embed_type": args.pos_embed,
    }
    cfg["vision_cfg"].update({k: v for k, v in overrides.items() if v is not None})
    sizes = (args.train_size, *datasets.DEFAULT_SIZES[args.dataset][1:]) if args.train_size else None
    ds = datasets.build(args.dataset, args.seed, args.image_size, sizes)
    rng = np.random.default_rng(args.seed)
    pick = rng.choice(len(ds.test.labels), args.eval_images, replace=False)
    pick_train = rng.choice(len(ds.train.labels), args.eval_images, replace=False)
    curve: list[dict] = []
    t0 = time.perf_counter()

    def each_step(done: int, model: torch.nn.Module) -> None:
        if done % args.every and done != args.steps:
            return
        training = [m for m in model.modules() if m.training]  # the tower being trained
        model.eval()
        with torch.no_grad():
            weights = class_weights(model, cfg, ds)
            pred = predict(model, weights, ds.test.images[pick])
            pred_train = predict(model, weights, ds.train.images[pick_train])
        for m in training:
            m.train()
        curve.append(
            {
                "step": done,
                "ca": float((pred == ds.test.labels[pick]).mean()),
                "train_ca": float((pred_train == ds.train.labels[pick_train]).mean()),  # the gap shows overfitting
                "seconds": time.perf_counter() - t0,
            }
        )
        print(json.dumps(curve[-1]), flush=True)

    train = TrainConfig(steps=args.steps, lr=args.lr, augment=Augment(args.augment))
    recipe = Recipe(args.recipe)
    clean = BuildConfig(
        dataset=args.dataset,
        attack="none",
        seed=args.seed,
        image_size=args.image_size,
        recipe=recipe,
        sizes=sizes,
        model_cfg=cfg,
        **{"distil" if recipe is Recipe.DISTIL else "pretrain": train},
    )
    train_clean(clean, ds, default_cache_dir(), torch.device("cpu"), each_step)
    if args.out:
        args.out.write_text(
            json.dumps({"model_cfg": cfg, "args": {k: str(v) for k, v in vars(args).items()}, "curve": curve}, indent=2)
        )
    print(f"\n| step | CA ({args.eval_images} test images) | CA (as many training images) | seconds |")
    print("|---|---|---|---|")
    for c in curve:
        print(f"| {c['step']} | {c['ca']:.3f} | {c['train_ca']:.3f} | {c['seconds']:.0f} |")


if __name__ == "__main__":
    main()
