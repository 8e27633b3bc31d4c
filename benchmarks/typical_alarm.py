"""Could an alarm that needs no inverted trigger catch what the scan misses?
(docs/results.md#a-class-typicality-alarm-not-kept)

    python benchmarks/typical_alarm.py zoo-out/models/bd035-badnet-shapes-s1-1200 ... --out typical.json

For each backdoored testbed or zoo model, with the original prompts' head: an image is flagged
when its feature sits far from the clean shots of the class the head gives it. Two scores, each
calibrated to flag 1% of the K = 16 shots a class (shot set 0; every shot scored against its
class's centroid without itself): the cosine to the predicted class's shot centroid ("raw"), and
the same in units of that class's own spread ("z"). Reported on the model's test split: AUROC
of triggered non-target images against clean ones, the shares flagged at the shots' threshold,
TPR at 1% FPR of the clean test images, and the attack's success through a guard that rejects
what it flags. Resumable: models in --out are read back.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from cbpt.data import load_shots
from cbpt.model import load_clip
from cbpt.purify import PurifyConfig
from cbpt_guard.artifacts import CLASSES
from testbed.baselines import defend
from testbed.evaluate import align_classes, encode_test_split, testbed_classes
from testbed.resumable import ResumableRows


def leave_one_out(f: np.ndarray, y: np.ndarray, classes: int) -> np.ndarray:
    """Each shot's cosine to the normalised mean of its class's other shots."""
    sums = np.stack([f[y == c].sum(0) for c in range(classes)])
    rest = sums[y] - f
    return (f * rest).sum(1) / np.linalg.norm(rest, axis=1)


def measure(tb: Path) -> dict:
    clip = load_clip(tb / "model.pt")
    shots = load_shots(clip, tb / "fewshot", tb / CLASSES, replace(PurifyConfig().budget, shots=16), 0)
    enc = clip.encoder()
    f = torch.cat([enc.all(shots.pixels), enc.all(shots.held_pixels)]).numpy()
    order = testbed_classes(tb)  # the test split's class order, which the head is aligned to
    y = np.array([order.index(shots.classnames[i]) for i in torch.cat([shots.labels, shots.held_labels]).tolist()])
    head = align_classes(defend("none", clip, shots, 0).weights, list(shots.classnames), tb).float().numpy()
    c = len(order)
    centre = np.stack([f[y == k].mean(0) for k in range(c)])
    centre /= np.linalg.norm(centre, axis=1, keepdims=True)
    loo = leave_one_out(f, y, c)
    mean = np.array([loo[y == k].mean() for k in range(c)])
    spread = np.array([loo[y == k].std() for k in range(c)]) + 1e-6
    calib = {"raw": loo, "z": (loo - mean[y]) / spread[y]}
    feats = encode_test_split(clip, tb)
    target, labels = feats.target, feats.labels

    def scores(x: np.ndarray) -> tuple[np.ndarray, dict]:
        p = (x @ head.T).argmax(1)
        cos = (x * centre[p]).sum(1)
        return p, {"raw": cos, "z": (cos - mean[p]) / spread[p]}

    pc, sc = scores(feats.clean.float().numpy())
    pt, st = scores(feats.triggered.float().numpy())
    keep = labels != target
    hit = (pt == target) & keep
    row = {"ca": round(float((pc == labels).mean()), 4), "asr": round(float(hit.sum() / keep.sum()), 4)}
    for name in ("raw", "z"):
        thr = np.quantile(calib[name], 0.01)
        flagged = st[name] < thr
        truth = np.r_[np.zeros(len(sc[name])), np.ones(int(keep.sum()))]
        row[name] = {
            "auroc": round(float(roc_auc_score(truth, -np.r_[sc[name], st[name][keep]])), 4),
            "clean_flagged": round(float((sc[name] < thr).mean()), 4),
            "triggered_flagged": round(float(flagged[keep].mean()), 4),
            "tpr_at_1pct_fpr": round(float((st[name][keep] < np.quantile(sc[name], 0.01)).mean()), 4),
            "through_guard": round(float((hit & ~flagged).sum() / keep.sum()), 4),
        }
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    stored = ResumableRows.at(args.out)
    for tb in args.models:
        if tb.name not in stored:
            print(tb.name, json.dumps(stored.ensure(tb.name, lambda tb=tb: measure(tb))), flush=True)


if __name__ == "__main__":
    main()
