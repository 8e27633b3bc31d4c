"""The purify pipeline shared by `purify` and `demo`: CBPT, then the heads, in one folder.

It lives here, in the orchestration layer, because `cbpt` must not import `export`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class PurifyRun:
    report: dict
    result: object  # cbpt.purify.Purified
    export_seconds: float


def purify_to_folder(clip, shots, cfg, out: Path,
                     progress: Callable[[str, int, int], None] | None = None) -> PurifyRun:
    """Run CBPT and write embeddings, report, trigger picture and exported heads to `out`:
    all of them land together, or nothing does."""
    from cbpt.purify import report, run_purify, write_purified
    from cbpt_guard import atomic
    from export.package import export_heads, read_source

    result = run_purify(clip, shots, cfg, progress)
    rep = report(clip, shots, cfg, result)
    with atomic.staged_dir(out) as stage:
        write_purified(stage, result, shots, rep)
        exported = export_heads(read_source(stage), stage, clip=clip, alarm_threshold=result.alarm["threshold"])
    return PurifyRun(report=rep, result=result, export_seconds=exported.seconds)
