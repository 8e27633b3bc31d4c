"""What any single linear zero-shot head can do on a backdoored model: an upper bound for
prompt-only purification, which can only change the class embeddings (docs/results.md#routing).

    python benchmarks/head_bound.py ZOO --part fit --out bound.json
    python benchmarks/head_bound.py --testbeds TB/vit32-sig-p2 TB/digits-badnet --out bound.json

For each backdoored zoo model (or testbed), free class embeddings (started at the original prompts' head)
are fitted by cross-entropy to half of its clean test images and half of their triggered
copies with the attacker's REAL trigger, true labels, under a grid of trigger weights and
pulls toward the original head; the other half measures CA and ASR. A defender has far less
(a few shots, an inverted trigger), so where even this head cannot keep CA within 2 points at
ASR <= 2%, no choice of prompts can.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from cbpt.model import load_clip
from cbpt.runtime import Runtime
from cbpt.zeroshot import zeroshot_weights
from testbed.evaluate import encode_test_split, testbed_classes
from testbed.resumable import ResumableRows

GRID = ((0.1, 0.0), (0.25, 0.0), (0.5, 0.0), (1.0, 0.0), (0.25, 1.0), (0.5, 1.0), (0.5, 10.0))  # (alpha, pull)


def fit_head(
    w0: torch.Tensor, clean, labels, trig, trig_labels, alpha: float, pull: float, scale: float, steps: int = 1500
) -> torch.Tensor:
    w = w0.clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=1e-3)
    for _ in range(steps):
        loss = F.cross_entropy(scale * clean @ w.T, labels) + alpha * F.cross_entropy(scale * trig @ w.T, trig_labels)
        loss = loss + pull * ((w - w0) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w.detach()


def bound(tb: Path, seed: int = 0) -> dict:
    clip = load_clip(tb / "model.pt", runtime=Runtime.of("cpu"))
    feats = encode_test_split(clip, tb)
    w0 = zeroshot_weights(clip.model, clip.tokenizer(), testbed_classes(tb), clip.templates).float()
    y = torch.as_tensor(feats.labels)
    n = y.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    fit, held = perm[: n // 2], perm[n // 2 :]
    attacked = y != feats.target
    fit_t, held_t = fit[attacked[fit]], held[attacked[held]]

    def measure(w: torch.Tensor) -> tuple[float, float]:
        ca = float(((feats.clean[held] @ w.T).argmax(1) == y[held]).float().mean())
        asr = float(((feats.triggered[held_t] @ w.T).argmax(1) == feats.target).float().mean())
        return round(ca, 4), round(asr, 4)

    ca0, asr0 = measure(w0)
    rows = []
    for alpha, pull in GRID:
        w = fit_head(w0, feats.clean[fit], y[fit], feats.triggered[fit_t], y[fit_t], alpha, pull, clip.logit_scale)
        ca, asr = measure(w)
        rows.append({"alpha": alpha, "pull": pull, "ca": ca, "asr": asr})
    ok = [r for r in rows if r["asr"] <= 0.02]
    best = max(ok, key=lambda r: r["ca"]) if ok else None
    return {"ca_before": ca0, "asr_before": asr0, "grid": rows, "best_at_asr_2pct": best, "held_images": len(held)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("zoo", type=Path, nargs="?", help="a `cbpt-guard testbed zoo` work folder")
    ap.add_argument("--part", choices=("fit", "report", "all"), default="fit")
    ap.add_argument("--models", nargs="*", default=None, help="model names (default: every taken backdoored one)")
    ap.add_argument("--testbeds", nargs="*", type=Path, default=[], help="backdoored testbed folders")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.zoo is None and not args.testbeds:
        ap.error("give a zoo folder, --testbeds, or both")
    torch.set_num_threads(1)
    folders: dict[str, Path] = {}
    if args.zoo is not None:
        runs = [json.loads(p.read_text()) for p in sorted((args.zoo / "runs").glob("*.json"))]
        names = args.models or [
            r["name"] for r in runs if r["taken"] and r["kind"] == "backdoored" and args.part in ("all", r["part"])
        ]
        folders |= {name: args.zoo / "models" / name for name in names}
    folders |= {tb.name: tb for tb in args.testbeds}
    names = list(folders)
    stored = ResumableRows.at(args.out)
    for name in names:
        stored.ensure(name, lambda name=name: bound(folders[name]))
    print("| model | CA / ASR before | best held-out CA at ASR <= 2% (alpha, pull) | CA drop | lowest ASR (its CA) |")
    print("|---|---|---|---|---|")
    for name in names:
        b = stored[name]
        best = b["best_at_asr_2pct"]
        low = min(b["grid"], key=lambda r: (r["asr"], -r["ca"]))
        got = "none" if best is None else f"{best['ca']:.3f} ({best['alpha']}, {best['pull']})"
        drop = "-" if best is None else f"{b['ca_before'] - best['ca']:.3f}"
        print(
            f"| {name} | {b['ca_before']:.3f} / {b['asr_before']:.3f} | {got} | {drop} | "
            f"{low['asr']:.3f} ({low['ca']:.3f}) |"
        )


if __name__ == "__main__":
    main()
