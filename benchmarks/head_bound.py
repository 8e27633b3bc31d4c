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

`--routed` also bounds the head purify ships, a route plus tuned embeddings
(docs/method.md#routing): the same fitted embeddings answer only for the images the original
head gives the target that lie past a threshold along the trigger side's whitened direction,
here fitted to the fit half's real triggered and clean target images (a defender estimates it
from inverted copies and shots); the threshold is swept over low quantiles of the real
triggered images' projections. Where even this route cannot keep CA within 2 points at ASR <=
2%, the shipped head's family cannot either.
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
from cbpt_guard.routing import TriggerSide, within_class_scatter
from testbed.evaluate import encode_test_split, testbed_classes
from testbed.resumable import ResumableRows

# of the real triggered fit images' projections: the side's bar (-inf: every image given the target, the `every` gate)
QUANTILES = (-1.0, 0.0, 0.005, 0.01, 0.02, 0.05)
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


def side_direction(clean: torch.Tensor, labels: torch.Tensor, own: torch.Tensor, trig: torch.Tensor) -> torch.Tensor:
    """The trigger side's direction (`TriggerSide.calibrate`, whitened by `within_class_scatter`
    of `clean`) from the target's own clean images `own` to the triggered ones `trig`."""
    scatter = within_class_scatter(clean.numpy(), labels.numpy())
    side = TriggerSide.calibrate([own.numpy()], [trig.numpy()], scatter)
    return torch.from_numpy(side.directions[0])


def bound(tb: Path, seed: int = 0, routed: bool = False, fit_shots: int | None = None, check_shots: int = 0) -> dict:
    clip = load_clip(tb / "model.pt", runtime=Runtime.of("cpu"))
    feats = encode_test_split(clip, tb)
    w0 = zeroshot_weights(clip.model, clip.tokenizer(), testbed_classes(tb), clip.templates).float()
    y = torch.as_tensor(feats.labels)
    n = y.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    fit, held = perm[: n // 2], perm[n // 2 :]
    if fit_shots is not None:  # a defender's budget: the first `fit_shots` of each class in the fit half
        fit = torch.cat([fit[y[fit] == c][:fit_shots] for c in y.unique()])
    # a defender's held-out shots, as purify's check reads them: the first `check_shots` of each class
    check = torch.cat([held[y[held] == c][:check_shots] for c in y.unique()])
    held = held[~torch.isin(held, check)]
    t = feats.target
    attacked = y != t
    fit_t = fit[attacked[fit]]

    def scores(predict, rows: torch.Tensor) -> tuple[float, float]:
        """CA on the clean images `rows`, ASR on the triggered copies of those not of the target."""
        ca = float((predict(feats.clean[rows]) == y[rows]).float().mean())
        asr = float((predict(feats.triggered[rows[attacked[rows]]]) == t).float().mean())
        return round(ca, 4), round(asr, 4)

    side = side_direction(feats.clean[fit], y[fit], feats.clean[fit][y[fit] == t], feats.triggered[fit_t])
    trig_fit = feats.triggered[fit_t]
    reaching = trig_fit[(trig_fit @ w0.T).argmax(1) == t]  # the route only matters where the original gives t
    bars = [float(torch.quantile(reaching @ side, q)) if q >= 0 else float("-inf") for q in QUANTILES] if routed else []

    def single(w: torch.Tensor):
        return lambda x: (x @ w.T).argmax(1)

    def route(w: torch.Tensor, bar: float):
        def predict(x: torch.Tensor) -> torch.Tensor:
            pred = (x @ w0.T).argmax(1)
            return torch.where((pred == t) & (x @ side > bar), (x @ w.T).argmax(1), pred)

        return predict

    def row(predict, **setting) -> dict:
        ca, asr = scores(predict, held)
        out = setting | {"ca": ca, "asr": asr}
        if check_shots:
            out["check_ca"], out["check_asr"] = scores(predict, check)
        return out

    base = row(single(w0))
    rows, routed_rows = [], []
    for alpha, pull in GRID:
        w = fit_head(w0, feats.clean[fit], y[fit], feats.triggered[fit_t], y[fit_t], alpha, pull, clip.logit_scale)
        rows.append(row(single(w), alpha=alpha, pull=pull))
        for q, bar in zip(QUANTILES, bars):
            routed_rows.append(row(route(w, bar), alpha=alpha, pull=pull, quantile=q))
    out = {"ca_before": base["ca"], "asr_before": base["asr"], "grid": rows, "best_at_asr_2pct": best_at(rows)}
    out["held_images"] = len(held)
    if check_shots:
        out |= {"check_ca_before": base["check_ca"], "check_images": len(check)}
    if routed:
        out |= {"routed_grid": routed_rows, "routed_best_at_asr_2pct": best_at(routed_rows)}
    return out


def checked_pick(b: dict, rows: str = "routed_grid") -> dict | None:
    """The setting purify's held-out check would keep (docs/method.md#acceptance): fewest held-out
    triggered copies at the target among the settings whose held-out clean accuracy is within
    one image of the original's; ties to the higher clean accuracy, then the lighter trigger weight."""
    floor = b["check_ca_before"] - 1.0 / b["check_images"] - 1e-9
    ok = [r for r in b[rows] if r["check_ca"] >= floor]
    return min(ok, key=lambda r: (r["check_asr"], -r["check_ca"], r["alpha"])) if ok else None


def both_goals(b: dict, row: dict | None) -> bool:
    """ASR <= 2% with CA within 2 points of the model's own."""
    return row is not None and row["asr"] <= 0.02 and b["ca_before"] - row["ca"] <= 0.02


def best_at(rows: list[dict], asr: float = 0.02) -> dict | None:
    """The row of highest CA among those with ASR <= `asr`, or None."""
    ok = [r for r in rows if r["asr"] <= asr]
    return max(ok, key=lambda r: r["ca"]) if ok else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("zoo", type=Path, nargs="?", help="a `cbpt-guard testbed zoo` work folder")
    ap.add_argument("--part", choices=("fit", "report", "all"), default="fit")
    ap.add_argument("--models", nargs="*", default=None, help="model names (default: every taken backdoored one)")
    ap.add_argument("--testbeds", nargs="*", type=Path, default=[], help="backdoored testbed folders")
    ap.add_argument("--routed", action="store_true", help="also bound the routed head (a route plus tuned embeddings)")
    ap.add_argument("--fit-shots", type=int, default=None, help="fit on this many clean images a class (default: half)")
    ap.add_argument("--check-shots", type=int, default=0, help="also score each setting on this many held-out a class")
    ap.add_argument(
        "--out",
        type=Path,
        required=True,
        help="rows already here are read back as stored, whatever --routed, --fit-shots and --check-shots say: "
        "give each reading its own file",
    )
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
        stored.ensure(
            name,
            lambda name=name: bound(
                folders[name], routed=args.routed, fit_shots=args.fit_shots, check_shots=args.check_shots
            ),
        )
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
    routed = [name for name in names if "routed_grid" in stored[name]]
    if routed:
        print(
            "\n| model | CA before | single head: CA drop at ASR <= 2% "
            "| routed: best CA at ASR <= 2% (alpha, pull, quantile) | CA drop |"
        )
        print("|---|---|---|---|---|")
        for name in routed:
            b = stored[name]
            single, best = b["best_at_asr_2pct"], b["routed_best_at_asr_2pct"]
            got = "none" if best is None else f"{best['ca']:.3f} ({best['alpha']}, {best['pull']}, {best['quantile']})"
            s_drop = "-" if single is None else f"{b['ca_before'] - single['ca']:.3f}"
            drop = "-" if best is None else f"{b['ca_before'] - best['ca']:.3f}"
            print(f"| {name} | {b['ca_before']:.3f} | {s_drop} | {got} | {drop} |")
        summarise([stored[name] for name in routed])


def summarise(records: list[dict]) -> None:
    """How many models meet both goals under each way of choosing the setting."""
    n = len(records)
    settings = {tuple(r[k] for k in ("alpha", "pull", "quantile")) for r in records[0]["routed_grid"]}

    def fixed(setting: tuple) -> int:
        return sum(
            both_goals(b, next(r for r in b["routed_grid"] if (r["alpha"], r["pull"], r["quantile"]) == setting))
            for b in records
        )

    best_fixed = max(sorted(settings), key=fixed)
    single = sum(both_goals(b, b["best_at_asr_2pct"]) for b in records)
    routed = sum(both_goals(b, b["routed_best_at_asr_2pct"]) for b in records)
    print(f"\nboth goals (ASR <= 2%, CA within 2 points), of {n}:")
    print(f"- one linear head, setting chosen per model on the measured half: {single}")
    print(f"- routed, setting chosen per model on the measured half: {routed}")
    print(f"- routed, the best single setting for all models {best_fixed}: {fixed(best_fixed)}")
    if "check_images" in records[0]:
        picks = [(b, checked_pick(b)) for b in records]
        asr5 = sum(r is not None and r["asr"] <= 0.05 for _, r in picks)
        ca2 = sum(r is not None and b["ca_before"] - r["ca"] <= 0.02 for b, r in picks)
        print(
            f"- routed, chosen by the held-out check ({records[0]['check_images']} images): "
            f"{sum(both_goals(b, r) for b, r in picks)} (ASR <= 5%: {asr5}; CA within 2 points: {ca2})"
        )


if __name__ == "__main__":
    main()
