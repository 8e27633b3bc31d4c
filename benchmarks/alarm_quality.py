"""The runtime trigger alarm on a testbed: AUROC and TPR at the stored 1%-FPR threshold,
clean test images vs their triggered versions (non-target classes), through the guard; and
the attack's success through the guard under `--on-alarm reject|abstain`: triggered images
that get the target label and are not flagged, beside the plain ASR of the same heads.

    python benchmarks/alarm_quality.py HEADS --testbed TESTBED
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from cbpt.metrics import alarm_evaluation
from guard.heads import load_heads
from guard.preprocess import preprocess
from testbed.evaluate import check_testbed, load_test_split
from testbed.triggers import Trigger


def run(heads, images: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(predicted labels, trigger scores) of `images` through the heads."""
    labels, scores = [], []
    for i in range(0, len(images), batch):
        x = np.stack([preprocess(Image.fromarray(im), heads.spec) for im in images[i : i + batch]])
        out = heads.run(x)
        labels.append(out["probs"].argmax(1))
        scores.append(out["trigger_score"])
    return np.concatenate(labels), np.concatenate(scores)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("heads", type=Path)
    ap.add_argument("--testbed", type=Path, required=True)
    ap.add_argument("--int8", action="store_true", help="score with classifier_int8.onnx")
    args = ap.parse_args()
    meta = check_testbed(args.testbed)
    images, labels, names = load_test_split(args.testbed)
    heads = load_heads(args.heads, int8=args.int8)
    keep = labels != meta["target"]
    # placed as `testbed eval` places it: over the whole split, then the non-target images kept
    triggered = Trigger.load(args.testbed / "trigger").apply(images, seed=meta["eval_seed"])[keep]
    (_, clean_s), (trig_pred, trig_s) = run(heads, images), run(heads, triggered)
    hit = trig_pred == heads.classes.index(names[meta["target"]])  # the heads' label order, not the testbed's
    # the same figures as every bench run's `alarm_eval`, here through the exported heads
    print(json.dumps(asdict(alarm_evaluation(clean_s, trig_s, hit, heads.alarm_threshold))))


if __name__ == "__main__":
    main()
