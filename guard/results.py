"""Where `classify` puts its records: JSON lines, CSV or Parquet, chosen by the output's suffix.

Every format keeps only whole records when a run is interrupted, and names the paths it
already holds, so `--resume` finishes a run without repeating or losing an image:
- JSON lines and CSV are appended a record at a time and flushed (a torn last line is cut).
- Parquet is a folder of part files (`results.parquet/part-000000.parquet`, ...) that pandas,
  pyarrow, DuckDB and Spark read as one table; each part is written whole (temp + rename),
  so a part is either complete or absent. The class names and the heads it was made with
  travel in the schema's metadata.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from cbpt_guard.atomic import mark_folder, write_bytes, written_by_us
from cbpt_guard.errors import UsageError, UserError

ROWS_PER_PART = 8192


class OutputFormat(StrEnum):
    JSONL = ".jsonl"
    CSV = ".csv"
    PARQUET = ".parquet"


def output_format(out: Path) -> OutputFormat:
    try:
        return OutputFormat(out.suffix.lower())
    except ValueError:
        raise UsageError(f"--out {out} must end in .jsonl, .csv or .parquet", "pass e.g. --out results.jsonl") from None


def same_path_key(path: str | Path) -> str:
    """One spelling per file, so `--resume` recognises a path however it was typed; a URI
    (`s3://bucket/key`) is its own key."""
    text = str(path)
    return text if "://" in text else str(Path(text).resolve())


def check_output(out: Path, inputs: Iterable[str | Path], resume: bool) -> OutputFormat:
    """Refuse, before any work, an output that could destroy an input or something that is not
    ours: records go to a .jsonl/.csv file that is not an input, or to a .parquet folder."""
    fmt = output_format(out)
    local = [Path(p).resolve() for p in map(str, inputs) if "://" not in p]
    if fmt is OutputFormat.PARQUET:
        if out.exists() and not out.is_dir():
            raise UsageError(
                f"--out {out} is a file; Parquet output is a folder of part files", "pass a new path ending in .parquet"
            )
        resolved = out.resolve()
        if any(p == resolved or resolved in p.parents or p in resolved.parents for p in local):
            raise UsageError(f"--out {out} overlaps the inputs", "write the results outside the image folders")
        if out.is_dir() and any(out.iterdir()) and not written_by_us(out):
            raise UsageError(
                f"--out {out} is a folder cbpt-guard did not write", "choose a new path ending in .parquet"
            )
        return fmt
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder", f"pass a {fmt.value} file path")
    if out.exists() and out.resolve() in local:
        raise UsageError(f"--out {out} is one of the inputs", "write the results to a new file")
    return fmt


# --- records as Arrow ---------------------------------------------------------------------


@dataclass(frozen=True)
class TableShape:
    """What a results table holds: the classes (label order), and either the top k or every
    probability. Two runs may share a Parquet output only with the same shape."""

    classes: tuple[str, ...]
    top_k: int | None
    heads_sha256: str | None = None

    def schema(self):
        import pyarrow as pa

        entry = pa.struct([("label", pa.string()), ("index", pa.int32()), ("prob", pa.float32())])
        scores = ("top_k", pa.list_(entry)) if self.top_k else ("probs", pa.list_(pa.float32()))
        fields = [
            ("path", pa.string()),
            ("label", pa.string()),
            ("index", pa.int32()),
            scores,
            ("trigger_score", pa.float32()),
            ("trigger_alarm", pa.bool_()),
            ("error", pa.string()),
        ]
        meta = {
            "cbpt_guard.classes": json.dumps(list(self.classes)),
            "cbpt_guard.top_k": json.dumps(self.top_k),
            "cbpt_guard.heads_sha256": json.dumps(self.heads_sha256),
        }
        return pa.schema(fields, metadata=meta)


def records_table(records: list[dict], shape: TableShape):
    """classify's records as one Arrow table (probabilities as a list in class order)."""
    import pyarrow as pa

    index = {c: i for i, c in enumerate(shape.classes)}
    columns: dict[str, list] = {name: [] for name in shape.schema().names}
    for rec in records:
        for name in ("path", "label", "index", "trigger_score", "trigger_alarm", "error"):
            columns[name].append(rec.get(name))
        if shape.top_k:
            columns["top_k"].append(rec.get("top_k"))
        else:
            probs = rec.get("probs")
            columns["probs"].append(None if probs is None else [probs[c] for c in sorted(probs, key=index.__getitem__)])
    return pa.table(columns, schema=shape.schema())


def table_records(table, classes: tuple[str, ...]) -> Iterator[dict]:
    """The inverse of `records_table`: records as the JSON and CSV outputs write them."""
    for row in table.to_pylist():
        rec = {k: v for k, v in row.items() if v is not None and k != "probs"}
        if row.get("probs") is not None:
            rec["probs"] = dict(zip(classes, row["probs"]))
        if "trigger_alarm" not in rec:
            rec.pop("trigger_score", None)
        yield rec


# --- sinks ----------------------------------------------------------------------------------

CSV_FIELDS = ("path", "label", "index", "prob", "trigger_score", "trigger_alarm", "error")


class LineSink:
    """JSON lines or CSV, appended a whole record at a time and flushed; stdout when out=None."""

    def __init__(self, out: Path | None, append: bool, classes: tuple[str, ...] = ()):
        self.classes = classes
        self.csv = out is not None and output_format(out) is OutputFormat.CSV
        if out is None:
            self.f, self.own = sys.stdout, False
            return
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

    def write_table(self, table) -> None:
        for rec in table_records(table, self.classes):
            self.write(rec)

    def close(self) -> None:
        if self.own:
            os.fsync(self.f.fileno())
            self.f.close()


def _parts(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise UsageError(
            "Parquet output needs pyarrow, which the base install leaves out",
            "pip install 'cbpt-guard[distributed]' (or pyarrow), or write --out results.jsonl",
        ) from None
    return pyarrow


class ParquetSink:
    """A Parquet folder written a whole part at a time: an interrupted run loses at most the
    records not yet in a part, and never leaves a part half-written."""

    def __init__(self, out: Path, shape: TableShape, append: bool, rows_per_part: int = ROWS_PER_PART):
        _pyarrow()
        self.out, self.shape, self.rows_per_part = out, shape, rows_per_part
        self.records: list[dict] = []
        self.tables: list = []
        self.rows = 0
        existing = _parts(out)
        if append and existing:
            _check_same_shape(existing[-1], shape)
        elif existing:  # a fresh run replaces an earlier output of ours
            for part in existing:
                part.unlink()
        out.mkdir(parents=True, exist_ok=True)
        mark_folder(out, "results")
        self.next_part = 1 + max((int(p.stem.split("-")[1]) for p in existing if append), default=-1)

    def write(self, rec: dict) -> None:
        self.records.append(rec)
        self._added(1)

    def write_table(self, table) -> None:
        self._pending()
        self.tables.append(table.replace_schema_metadata(self.shape.schema().metadata))
        self._added(table.num_rows)

    def _pending(self) -> None:
        if self.records:
            self.tables.append(records_table(self.records, self.shape))
            self.records = []

    def _added(self, n: int) -> None:
        self.rows += n
        while self.rows >= self.rows_per_part:
            self._write_part(self.rows_per_part)

    def _write_part(self, n: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._pending()
        table = pa.concat_tables(self.tables)
        sink = io.BytesIO()
        pq.write_table(table.slice(0, n), sink)
        write_bytes(self.out / f"part-{self.next_part:06d}.parquet", sink.getvalue())
        self.next_part += 1
        rest = table.slice(n)
        self.tables, self.rows = ([rest] if rest.num_rows else []), rest.num_rows

    def flush(self) -> None:
        if self.rows:
            self._write_part(self.rows)

    def close(self) -> None:
        self.flush()


def _check_same_shape(part: Path, shape: TableShape) -> None:
    import pyarrow.parquet as pq

    meta = pq.read_schema(part).metadata or {}
    classes = json.loads(meta.get(b"cbpt_guard.classes", b"null"))
    top_k = json.loads(meta.get(b"cbpt_guard.top_k", b"null"))
    if classes != list(shape.classes):
        raise UserError(
            f"{part.parent} was written with other classes than these heads'", "write to a new --out, or drop --resume"
        )
    if top_k != shape.top_k:
        raise UserError(
            f"{part.parent} was written with --top-k {top_k}, not {shape.top_k}", f"rerun with --top-k {top_k}"
        )


def open_sink(out: Path | None, append: bool, shape: TableShape, rows_per_part: int = ROWS_PER_PART):
    if out is not None and output_format(out) is OutputFormat.PARQUET:
        return ParquetSink(out, shape, append, rows_per_part)
    return LineSink(out, append, shape.classes)


# --- resuming --------------------------------------------------------------------------------


def done_paths(out: Path) -> set[str]:
    """Paths already classified in `out` (as `same_path_key`s). A torn last line of a JSON
    lines or CSV file (an interrupted write) is cut off first."""
    if output_format(out) is OutputFormat.PARQUET:
        parts = _parts(out)
        if not parts:
            return set()
        _pyarrow()
        import pyarrow.parquet as pq

        return {same_path_key(p) for part in parts for p in pq.read_table(part, columns=["path"])["path"].to_pylist()}
    if not out.is_file():
        return set()
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(out, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    text = data.decode("utf-8")
    if output_format(out) is OutputFormat.CSV:
        return {same_path_key(row["path"]) for row in csv.DictReader(io.StringIO(text)) if row.get("path")}
    done = set()
    for line in text.splitlines():
        try:
            done.add(same_path_key(json.loads(line)["path"]))
        except (ValueError, KeyError, TypeError):
            continue
    return done


def record_count(out: Path) -> int:
    """Rows in a finished output (for summaries and tests)."""
    if output_format(out) is OutputFormat.PARQUET:
        import pyarrow.parquet as pq

        return sum(pq.read_metadata(p).num_rows for p in _parts(out))
    lines = out.read_text(encoding="utf-8").splitlines()
    return len(lines) - (output_format(out) is OutputFormat.CSV)
