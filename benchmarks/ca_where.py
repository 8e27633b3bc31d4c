"""Where does the CA a purified head spends go, and could serving give it back?
(docs/results.md#where-the-ca-goes)

    python benchmarks/ca_where.py zoo-out/models/bd046-badnet-shapes-s2-1000 ... --out ca.json

Each backdoored testbed or zoo model is purified as the zoo does (K = 16, shot set 0, purify's
settings), and its clean test images the head serves wrong where the original prompts served
them right (net of those it gets right in their place) are counted by class, the found target's
own against the rest, and by how the route reached them (near a tuned trigger's centroid, by the
target gate alone, or not routed).

Then one serving alternative is scored on the same features: an image the original embeddings
give the found target keeps their answer where it is typical of the target's own shots (cosine
to their normalised mean feature at least the q-quantile of the shots' own cosines, q = 0, 0.1,
0.25), the route deciding elsewhere as now. It gives back CA only if the target's own images
and the triggered ones sit apart around the target. Resumable: models in --out are read back.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cbpt.data import load_shots
from cbpt.purify import PurifyConfig
from cbpt_guard.artifacts import CLASSES
from cbpt_guard.routing import Route
from testbed.bench import defend_on_testbed
from testbed.evaluate import head_predictions, testbed_classes
from testbed.resumable import ResumableRows

QUANTILES = (0.0, 0.1, 0.25)


def lost_by_route(p0: np.ndarray, p1: np.ndarray, labels: np.ndarray, target: int, how: np.ndarray) -> dict:
    """Net clean images lost (right before, wrong now, less the reverse), the target's own and
    the rest, per way the route reached them (`how`: near / gate / out per image)."""
    out = {}
    for own in (True, False):
        for way in ("near", "gate", "out"):
            m = (how == way) & ((labels == target) == own)
            lost = int(((p0 == labels) & (p1 != labels) & m).sum()) - int(((p0 != labels) & (p1 == labels) & m).sum())
            out[f"{'own' if own else 'other'}-{way}"] = {"images": int(m.sum()), "net_lost": lost}
    return out


def typical_served(unit: np.ndarray, route: Route, head: np.ndarray, target: int, centre: np.ndarray, tau: float):
    """Predictions with images the original gives `target` kept on the original where their
    cosine to `centre` is at least `tau`."""
    original = (unit @ route.original.T).argmax(1)
    routed = route.routed(unit) & ~((original == target) & (unit @ centre >= tau))
    return np.where(routed, (unit @ head.T).argmax(1), original)


def measure(tb: Path) -> dict:
    cfg = PurifyConfig()
    on = defend_on_testbed(tb, "cbpt", 16, 0, cfg)
    feats, route = on.feats, on.route
    labels, target = feats.labels, feats.target
    clean = feats.clean.float().cpu().numpy()
    head = on.head.float().cpu().numpy()
    row: dict = {"rung": on.defended.info["tuning"].get("rung")}
    if route is None or not len(route.targets):
        return row | {"skipped": "no route gated on a found target"}
    found = int(route.targets[0])
    p0 = (clean @ route.original.T).argmax(1)
    p1 = head_predictions(feats.clean, on.head, route)
    near = route.ungated().routed(clean)  # the cosines alone; the gate reaches the rest of the routed
    how = np.where(near, "near", np.where(route.routed(clean), "gate", "out"))
    keep = labels != target
    trig = feats.triggered.float().cpu().numpy()
    row |= {
        "found_is_target": found == target,
        "ca_before": round(float((p0 == labels).mean()), 4),
        "ca_after": round(float((p1 == labels).mean()), 4),
        "asr_after": round(float((head_predictions(feats.triggered, on.head, route)[keep] == target).mean()), 4),
        "own_images": int((labels == target).sum()),
        "lost": lost_by_route(p0, p1, labels, target, how),
    }
    # the found target's own shots (the defender's K of that class, as the shot set draws them)
    from cbpt.model import load_clip

    clip = load_clip(tb / "model.pt")
    shots = load_shots(clip, tb / "fewshot", tb / CLASSES, cfg.budget, cfg.seed)
    own_index = list(shots.classnames).index(testbed_classes(tb)[found])
    with torch.no_grad():
        own = F.normalize(clip.encoder().all(shots.pixels[shots.labels == own_index]).float(), dim=-1).cpu().numpy()
    centre = own.mean(0) / np.linalg.norm(own.mean(0))
    own_cos = own @ centre
    row["typical_kept"] = {}
    for q in QUANTILES:
        tau = float(np.quantile(own_cos, q))
        pc = typical_served(clean, route, head, found, centre, tau)
        pt = typical_served(trig, route, head, found, centre, tau)
        row["typical_kept"][f"q{q:g}"] = {
            "ca": round(float((pc == labels).mean()), 4),
            "asr": round(float((pt[keep] == target).mean()), 4),
        }
    spread = own_cos.std()
    row["triggered_median_spreads"] = round(float((np.median(trig[keep] @ centre) - own_cos.mean()) / spread), 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("testbeds", nargs="*", type=Path, help="backdoored testbed or zoo model folders; none: print --out")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    stored = ResumableRows.at(args.out)
    for tb in args.testbeds:
        stored.ensure(tb.name, lambda tb=tb: measure(tb))
    cols = " | ".join(f"kept typical q={q:g}" for q in QUANTILES)
    print(f"| model | CA before -> after (ASR after) | net lost: target's own / the rest | {cols} |")
    print("|---|---|---|" + "---|" * len(QUANTILES))
    for name, r in stored.items():
        if "lost" not in r:
            print(f"| {name} | {r.get('skipped')} | | " + " | " * len(QUANTILES))
            continue
        own = sum(v["net_lost"] for k, v in r["lost"].items() if k.startswith("own"))
        rest = sum(v["net_lost"] for k, v in r["lost"].items() if k.startswith("other"))
        kept = " | ".join(f"{v['ca']:.3f} / {v['asr']:.3f}" for v in r["typical_kept"].values())
        print(
            f"| {name} | {r['ca_before']:.3f} -> {r['ca_after']:.3f} ({r['asr_after']:.3f}) | "
            f"{own} of {r['own_images']} / {rest} | {kept} |"
        )


if __name__ == "__main__":
    main()
