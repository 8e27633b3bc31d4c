"""`cbpt-guard testbed eval`: CA, ASR and RA of a checkpoint (its original prompts) on a
testbed's test split, with the testbed's own trigger applied exactly as `build` defined it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cbpt.metrics import AlarmEval, BackdoorEval, alarm_evaluation, evaluate_predictions
from cbpt_guard.artifacts import CLASSES, EMBEDDINGS, REPORT, read_classes
from cbpt_guard.errors import UsageError, UserError
from cbpt_guard.routing import Route
from testbed.triggers import Trigger

if TYPE_CHECKING:
    import torch

    from cbpt.runtime import Runtime


def load_test_split(testbed: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """The test images as uint8 [N, H, W, 3], their labels, and the class names in label order."""
    from PIL import Image

    classnames = testbed_classes(testbed)
    images, labels = [], []
    for label, name in enumerate(classnames):
        for p in sorted((testbed / "test" / name.replace(" ", "_")).glob("*.png")):
            with Image.open(p) as img:
                images.append(np.asarray(img.convert("RGB")))
            labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64), classnames


def testbed_classes(testbed: Path) -> tuple[str, ...]:
    """The class names in label order."""
    return tuple(read_classes(testbed / CLASSES))


def check_testbed(testbed: Path) -> dict:
    if not testbed.is_dir():
        raise UsageError(f"testbed not found: {testbed}", "pass a folder written by `cbpt-guard testbed build`")
    missing = [n for n in ("metrics.json", CLASSES, "test") if not (testbed / n).exists()]
    if missing:
        raise UserError(
            f"{testbed} is not a complete testbed: missing {', '.join(missing)}",
            "rebuild it with `cbpt-guard testbed build`",
        )
    return json.loads((testbed / "metrics.json").read_text())


def evaluate_checkpoint(model_path: Path, testbed: Path, runtime: Runtime | None = None) -> BackdoorEval:
    """The original prompts' head of a checkpoint."""
    from cbpt.model import load_clip
    from cbpt.zeroshot import zeroshot_weights

    clip = load_clip(model_path, runtime=runtime)
    weights = zeroshot_weights(clip.model, clip.tokenizer(), testbed_classes(testbed), clip.templates)
    return evaluate_weights(clip, weights, testbed)


def evaluate_purified(folder: Path, testbed: Path, runtime: Runtime | None = None) -> BackdoorEval:
    """The purified class embeddings of a `purify` output folder, on the model it purified."""
    from safetensors.torch import load_file

    from cbpt.model import load_clip

    rep = json.loads((folder / REPORT).read_text())
    clip = load_clip(
        rep["model"]["path"],
        arch=rep["model"]["architecture"] if rep["model"]["arch_source"] == "--arch" else None,
        runtime=runtime,
    )
    tensors = load_file(str(folder / EMBEDDINGS))
    rows = class_order(rep["classes"], testbed)
    route = Route.from_tensors({k: v.numpy() for k, v in tensors.items()}, tensors["original"].numpy())
    return score_head(
        encode_test_split(clip, testbed), tensors["purified"][rows], None if route is None else route.reordered(rows)
    )


def class_order(names: list[str], testbed: Path) -> list[int]:
    """For each of the testbed's classes in its order, its row among `names`."""
    test_names = testbed_classes(testbed)
    if sorted(names) != sorted(test_names):
        raise UserError(
            f"the classes ({', '.join(names[:4])}, ...) are not the testbed's ({', '.join(test_names[:4])}, ...)",
            "purify with the testbed's fewshot/ folder",
        )
    return [names.index(n) for n in test_names]


def align_classes(weights, names: list[str], testbed: Path):
    """Rows of `weights` reordered to the testbed's class order, matched by name."""
    return weights[class_order(names, testbed)]


def _score(predict, testbed: Path) -> BackdoorEval:
    """Run `predict` (uint8 images -> class indices in the testbed's order) on the clean test
    split and on its triggered version (the testbed's own trigger and placement seed)."""
    meta = check_testbed(testbed)
    images, labels, _ = load_test_split(testbed)
    trigger_dir = testbed / "trigger"
    pred = predict(images)
    if not (trigger_dir / "trigger.json").is_file():  # a clean testbed: nothing to trigger
        return evaluate_predictions(pred, labels, pred, labels, -1)
    triggered = Trigger.load(trigger_dir).apply(images, seed=meta["eval_seed"])
    return evaluate_predictions(pred, labels, predict(triggered), labels, int(meta["target"]))


@dataclass(frozen=True)
class SplitFeatures:
    """One model's normalised image features of a testbed's test split and of its triggered
    version (the testbed's own trigger and placement seed; None on a clean testbed): encoded
    once, then every head and the alarm are scored on them."""

    clean: torch.Tensor
    triggered: torch.Tensor | None
    labels: np.ndarray
    target: int  # -1 on a clean testbed


def encode_test_split(clip, testbed: Path, batch_size: int = 256) -> SplitFeatures:
    import torch
    from PIL import Image

    from cbpt.zeroshot import image_features

    meta = check_testbed(testbed)
    images, labels, _ = load_test_split(testbed)
    transform = clip.transform()

    def encode(batch: np.ndarray) -> torch.Tensor:
        return image_features(clip.model, torch.stack([transform(Image.fromarray(im)) for im in batch]), batch_size)

    if not (testbed / "trigger" / "trigger.json").is_file():  # a clean testbed: nothing to trigger
        return SplitFeatures(encode(images), None, labels, -1)
    triggered = Trigger.load(testbed / "trigger").apply(images, seed=meta["eval_seed"])
    return SplitFeatures(encode(images), encode(triggered), labels, int(meta["target"]))


def head_predictions(features, weights, route: Route | None = None) -> np.ndarray:
    """Class indices the zero-shot head `weights` [C, D] gives unit image features [N, D]; with
    a route, the original embeddings answer for the images outside it (cbpt_guard/routing.py)."""
    if route is None:
        return (features @ weights.to(features.device).T).argmax(1).cpu().numpy()
    unit = features.float().cpu().numpy()
    return route.cosines(unit, weights.float().cpu().numpy()).argmax(1)


def score_head(feats: SplitFeatures, weights, route: Route | None = None) -> BackdoorEval:
    """CA, ASR, RA of the zero-shot head `weights` ([C, D], the testbed's class order; the route's
    original embeddings in that order too)."""
    pred = head_predictions(feats.clean, weights, route)
    if feats.triggered is None:
        return evaluate_predictions(pred, feats.labels, pred, feats.labels, -1)
    pred_t = head_predictions(feats.triggered, weights, route)
    return evaluate_predictions(pred, feats.labels, pred_t, feats.labels, feats.target)


def evaluate_weights(clip, weights, testbed: Path, batch_size: int = 256) -> BackdoorEval:
    """CA, ASR, RA of the zero-shot head `weights` ([C, D], the testbed's class order)."""
    return score_head(encode_test_split(clip, testbed, batch_size), weights)


def evaluate_alarm(
    feats: SplitFeatures, weights, centres, threshold: float, route: Route | None = None
) -> AlarmEval | None:
    """The trigger alarm (the largest cosine to `centres` [K, D], flagged over `threshold`) on the test split and
    its triggered non-target images, with the head `weights` ([C, D], the testbed's class
    order) deciding which triggered images the attack won. None on a clean testbed. The torch
    twin of `benchmarks/alarm_quality.py`, which runs the exported heads."""
    if feats.triggered is None:
        return None
    import torch

    from cbpt.purify import alarm_score

    trig = feats.triggered[torch.as_tensor(feats.labels != feats.target, device=feats.triggered.device)]
    hit = head_predictions(trig, weights, route) == feats.target
    scores = [alarm_score(f, centres).cpu().numpy() for f in (feats.clean, trig)]
    return alarm_evaluation(*scores, hit, threshold)


def evaluate_heads(heads_dir: Path, testbed: Path, batch_size: int = 256, int8: bool = False) -> BackdoorEval:
    """Exported heads served by the runtime guard (onnxruntime, no torch in the loop); `int8`:
    their classifier_int8.onnx."""
    from PIL import Image

    from guard.heads import load_heads
    from guard.preprocess import preprocess

    check_testbed(testbed)
    test_names = testbed_classes(testbed)
    heads = load_heads(heads_dir, int8=int8)
    if sorted(heads.classes) != sorted(test_names):
        raise UserError("the heads' classes are not the testbed's", "export heads for this testbed's classes")
    to_testbed = np.argsort([heads.classes.index(n) for n in test_names])  # head index -> testbed index

    def predict(batch: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(batch), batch_size):
            x = np.stack([preprocess(Image.fromarray(im), heads.spec) for im in batch[i : i + batch_size]])
            out.append(heads.run(x)["probs"].argmax(1))
        return to_testbed[np.concatenate(out)]

    return _score(predict, testbed)
