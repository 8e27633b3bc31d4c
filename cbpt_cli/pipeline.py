"""The purify pipeline shared by `purify` and `demo`: CBPT, then the heads, in one folder.

It lives in the top layer because `cbpt` must not import `export`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cbpt.data import Shots
from cbpt.model import LoadedClip
from cbpt.outputs import report, write_purified
from cbpt.purify import Progress, Purified, PurifyConfig, run_purify
from cbpt_guard.atomic import staged_dir
from export.int8 import int8_inputs
from export.package import build_heads, read_source, write_heads


@dataclass
class PurifyRun:
    report: dict
    result: Purified
    files: list[str]  # every file written into the output folder
    export_seconds: float


def purify_to_folder(
    clip: LoadedClip,
    shots: Shots,
    cfg: PurifyConfig,
    out: Path,
    progress: Progress | None = None,
    overwrite: bool = False,
    int8: bool = False,
) -> PurifyRun:
    """Run CBPT and write embeddings, report, trigger picture and exported heads to `out`:
    all of them land together, or nothing does."""
    result = run_purify(clip, shots, cfg, progress)
    with staged_dir(out, "purify", overwrite) as stage:
        rep = write_purified(stage, result, shots, report(clip, shots, cfg, result))
        quantise = int8_inputs(clip, shots.pixels, result.inversion.trigger, shots.held_pixels) if int8 else None
        exported = build_heads(read_source(stage), clip, result.alarm["threshold"], int8=quantise)
        write_heads(stage, exported)
        files = sorted(p.name for p in stage.iterdir())
    return PurifyRun(report=rep, result=result, files=files, export_seconds=exported.seconds)
