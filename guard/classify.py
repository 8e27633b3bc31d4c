"""Offline batch classification of image files and folders with exported heads.

Images are decoded ahead of the model by `guard.loading` and classified in batches; one
record per image comes out in input order, an unreadable file giving a record with an
error. `guard.results` writes them; `guard.distributed` runs the same on Ray Data.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from enum import StrEnum
from pathlib import Path

import numpy as np

from cbpt_guard.errors import UsageError
from guard.heads import Heads
from guard.loading import Loaded, load_images


class OnAlarm(StrEnum):
    """What the guard does with an image whose trigger score raises the alarm (docs/serving.md#alarms)."""

    FLAG = "flag"  # answer as usual; trigger_alarm says so
    REJECT = "reject"  # refuse the image: the server answers 422, classify writes an error record
    ABSTAIN = "abstain"  # answer without a label


def check_on_alarm(heads: Heads, on_alarm: OnAlarm) -> None:
    """Rejecting or abstaining needs heads that raise alarms: refuse the option up front."""
    if on_alarm is not OnAlarm.FLAG and (not heads.has_trigger_score or heads.alarm_threshold is None):
        raise UsageError(
            f"--on-alarm {on_alarm.value}: {heads.folder} has no trigger score or alarm threshold",
            "serve heads written by `cbpt-guard purify` on a backdoored model, or use --on-alarm flag",
        )


def make_record(
    heads: Heads,
    path: str,
    outputs: dict[str, np.ndarray],
    i: int,
    top_k: int | None,
    on_alarm: OnAlarm = OnAlarm.FLAG,
) -> dict:
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
    if "trigger_score" not in outputs:
        return rec
    score = float(outputs["trigger_score"][i])
    alarm = bool(heads.alarm_threshold is not None and score > heads.alarm_threshold)
    rec.update(trigger_score=score, trigger_alarm=alarm)
    if not alarm or on_alarm is OnAlarm.FLAG:
        return rec
    kept = {"path": path, "trigger_score": score, "trigger_alarm": True}
    if on_alarm is OnAlarm.REJECT:
        kept["error"] = f"rejected: trigger alarm (trigger_score {score:.4f} > threshold {heads.alarm_threshold:.4f})"
    return kept


def is_unreadable(rec: dict) -> bool:
    """An error record for an image that could not be read (not one the alarm rejected)."""
    return "error" in rec and not rec.get("trigger_alarm")


def classify_arrays(
    heads: Heads, arrays: list[np.ndarray], names: list[str], top_k: int | None, on_alarm: OnAlarm = OnAlarm.FLAG
) -> list[dict]:
    outputs = heads.run(np.stack(arrays))
    return [make_record(heads, n, outputs, i, top_k, on_alarm) for i, n in enumerate(names)]


def classify_loaded(
    heads: Heads, loaded: Iterable[Loaded], batch_size: int, top_k: int | None, on_alarm: OnAlarm = OnAlarm.FLAG
) -> Iterator[dict]:
    """Records for already-loaded images, in input order, `batch_size` per model call."""
    batch: list[Loaded] = []
    for item in loaded:
        if item.error is not None:
            yield from _flush(heads, batch, top_k, on_alarm)
            batch = []
            yield {"path": item.path, "error": item.error}
            continue
        batch.append(item)
        if len(batch) == batch_size:
            yield from _flush(heads, batch, top_k, on_alarm)
            batch = []
    yield from _flush(heads, batch, top_k, on_alarm)


def _flush(heads: Heads, batch: list[Loaded], top_k: int | None, on_alarm: OnAlarm) -> list[dict]:
    if not batch:
        return []
    return classify_arrays(heads, [b.pixels for b in batch], [b.path for b in batch], top_k, on_alarm)


def classify_paths(
    heads: Heads,
    paths: Iterable[str | Path],
    batch_size: int = 32,
    top_k: int | None = None,
    workers: int = 0,
    on_alarm: OnAlarm = OnAlarm.FLAG,
) -> Iterator[dict]:
    """One record per image, in input order; `workers` threads decode ahead of the model
    (0: decode inline). Unreadable files yield an error record."""
    loaded = load_images(paths, heads.spec, workers, chunk=batch_size)
    yield from classify_loaded(heads, loaded, batch_size, top_k, on_alarm)
