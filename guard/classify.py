"""Offline batch classification of image files and folders with exported heads.

Images are decoded ahead of the model by `guard.loading` and classified in batches; one
record per image comes out in input order, an unreadable file giving a record with an
error. `guard.results` writes them; `guard.distributed` runs the same on Ray Data.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from guard.heads import Heads
from guard.loading import Loaded, load_images


def make_record(heads: Heads, path: str, outputs: dict[str, np.ndarray], i: int, top_k: int | None) -> dict:
    """The answer for image `i` of a batch: label, top-k or all probabilities, trigger score
    and alarm. The server, the local engine and the Ray engine all answer with it."""
    probs = outputs["probs"][i]
    idx = int(probs.argmax())
    rec: dict = {"path": path, "label": heads.classes[idx], "index": idx}
    if top_k:
        order = np.argsort(-probs)[:top_k]
        rec["top_k"] = [{"label": heads.classes[j], "index": int(j), "prob": float(probs[j])} for j in order]
    else:
        rec["probs"] = {c: float(p) for c, p in zip(heads.classes, probs)}
    if "trigger_score" in outputs:
        score = float(outputs["trigger_score"][i])
        rec["trigger_score"] = score
        rec["trigger_alarm"] = bool(heads.alarm_threshold is not None and score > heads.alarm_threshold)
    return rec


def classify_arrays(heads: Heads, arrays: list[np.ndarray], names: list[str], top_k: int | None) -> list[dict]:
    outputs = heads.run(np.stack(arrays))
    return [make_record(heads, n, outputs, i, top_k) for i, n in enumerate(names)]


def classify_loaded(heads: Heads, loaded: Iterable[Loaded], batch_size: int, top_k: int | None) -> Iterator[dict]:
    """Records for already-loaded images, in input order, `batch_size` per model call."""
    batch: list[Loaded] = []
    for item in loaded:
        if item.error is not None:
            yield from _flush(heads, batch, top_k)
            batch = []
            yield {"path": item.path, "error": item.error}
            continue
        batch.append(item)
        if len(batch) == batch_size:
            yield from _flush(heads, batch, top_k)
            batch = []
    yield from _flush(heads, batch, top_k)


def _flush(heads: Heads, batch: list[Loaded], top_k: int | None) -> list[dict]:
    if not batch:
        return []
    return classify_arrays(heads, [b.pixels for b in batch], [b.path for b in batch], top_k)


def classify_paths(
    heads: Heads,
    paths: Iterable[str | Path],
    batch_size: int = 32,
    top_k: int | None = None,
    workers: int = 0,
) -> Iterator[dict]:
    """One record per image, in input order; `workers` threads decode ahead of the model
    (0: decode inline). Unreadable files yield an error record."""
    loaded = load_images(paths, heads.spec, workers, chunk=batch_size)
    yield from classify_loaded(heads, loaded, batch_size, top_k)
