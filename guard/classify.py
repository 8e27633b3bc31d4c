"""Offline batch classification of image files and folders with exported heads.

Records stream out as JSON lines (or CSV) one image at a time, each written whole and
flushed, so an interrupted run leaves only complete records; `resume` skips the paths
already in the output (a torn last line is dropped first).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from cbpt_guard.artifacts import IMAGE_SUFFIXES
from cbpt_guard.images import decode
from guard.heads import Heads
from guard.preprocess import preprocess

MAX_PIXELS = 64_000_000


OUTPUT_SUFFIXES = (".jsonl", ".csv")


def check_output_file(out: Path, inputs: Iterable[Path]) -> None:
    """Refuse, before any work, an output that could destroy an input: records go only to a
    .jsonl or .csv file that is not an input itself."""
    from cbpt_guard.errors import UsageError

    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise UsageError(f"--out {out} must end in .jsonl or .csv", "pass e.g. --out results.jsonl")
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder", "pass a .jsonl or .csv file path")
    if out.exists() and out.resolve() in {p.resolve() for p in inputs}:
        raise UsageError(f"--out {out} is one of the inputs", "write the results to a new file")


def same_path_key(path: str | Path) -> str:
    """One spelling per file, so `--resume` recognises a path however it was typed."""
    return str(Path(path).resolve())


def iter_images(paths: Iterable[Path]) -> Iterator[Path]:
    for p in paths:
        if p.is_dir():
            yield from sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
        else:
            yield p  # named explicitly: classify it (or report why not), whatever its suffix


def make_record(heads: Heads, path: str, outputs: dict[str, np.ndarray], i: int, top_k: int | None) -> dict:
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


def classify_paths(
    heads: Heads,
    paths: Iterable[Path],
    batch_size: int = 32,
    top_k: int | None = None,
    skip: set[str] | frozenset = frozenset(),
) -> Iterator[dict]:
    """One record per image, in input order; unreadable files yield an error record."""
    batch: list[np.ndarray] = []
    names: list[str] = []
    for path in paths:
        if same_path_key(path) in skip:
            continue
        try:
            batch.append(preprocess(decode(path, MAX_PIXELS), heads.spec))
            names.append(str(path))
        except Exception as e:  # corrupt files raise many types; the run goes on
            yield from _flush(heads, batch, names, top_k)
            batch, names = [], []
            yield {"path": str(path), "error": f"{type(e).__name__}: {e}"}
            continue
        if len(batch) == batch_size:
            yield from _flush(heads, batch, names, top_k)
            batch, names = [], []
    yield from _flush(heads, batch, names, top_k)


def _flush(heads, batch, names, top_k) -> list[dict]:
    return classify_arrays(heads, batch, names, top_k) if batch else []


# --- output ------------------------------------------------------------------------------

CSV_FIELDS = ("path", "label", "index", "prob", "trigger_score", "trigger_alarm", "error")


def done_paths(out: Path) -> set[str]:
    """Paths already classified in `out` (as `same_path_key`s); a torn last line (an
    interrupted write) is cut off."""
    if not out.is_file():
        return set()
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(out, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    text = data.decode("utf-8")
    if out.suffix.lower() == ".csv":
        return {same_path_key(row["path"]) for row in csv.DictReader(io.StringIO(text)) if row.get("path")}
    done = set()
    for line in text.splitlines():
        try:
            done.add(same_path_key(json.loads(line)["path"]))
        except (ValueError, KeyError, TypeError):
            continue
    return done


class RecordWriter:
    """Appends whole records and flushes each, to a file or to stdout (out=None)."""

    def __init__(self, out: Path | None, append: bool):
        import sys

        self.csv = out is not None and out.suffix.lower() == ".csv"
        if out is None:
            self.f = sys.stdout
            self.own = False
        else:
            fresh = not (append and out.is_file() and out.stat().st_size > 0)
            out.parent.mkdir(parents=True, exist_ok=True)
            self.f = open(out, "a" if append else "w", encoding="utf-8", newline="")  # noqa: SIM115 (closed by close())
            self.own = True
            if self.csv and fresh:
                self._write(",".join(CSV_FIELDS) + "\n")

    def _write(self, text: str) -> None:
        self.f.write(text)
        self.f.flush()

    def write(self, rec: dict) -> None:
        if not self.csv:
            self._write(json.dumps(rec) + "\n")
            return
        prob = rec["top_k"][0]["prob"] if "top_k" in rec else (rec["probs"][rec["label"]] if "probs" in rec else "")
        row = {**{k: rec.get(k, "") for k in CSV_FIELDS}, "prob": prob}
        buf = io.StringIO()
        csv.DictWriter(buf, fieldnames=CSV_FIELDS).writerow(row)
        self._write(buf.getvalue())

    def close(self) -> None:
        if self.own:
            import os

            os.fsync(self.f.fileno())
            self.f.close()
