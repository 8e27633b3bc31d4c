"""`cbpt-guard export`: bake class embeddings into ONNX heads and check their parity.

Reads what `purify` wrote (embeddings, classes, report) and the checkpoint the report names;
builds `head.onnx`, `classifier.onnx` (and fp16 twins), which must match PyTorch
(`parity.check_parity`), then writes them with `preprocess.json` and `manifest.json` (sha256
of every file) into a folder the caller stages, and optionally a Triton repository.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cbpt_guard import TOOL
from cbpt_guard.artifacts import (
    CLASSES,
    CLASSIFIER,
    EMBEDDINGS,
    HEAD,
    MANIFEST,
    PREPROCESS,
    REPORT,
    SOURCE_FILES,
    classes_text,
    fp16_name,
    int8_name,
    is_fp16,
    read_classes,
    sha256_bytes,
)
from cbpt_guard.errors import UsageError, UserError
from cbpt_guard.routing import Route
from export.int8 import Int8Inputs, int8_twin

if TYPE_CHECKING:
    from export.graphs import HeadSpec


@dataclass
class Source:
    folder: Path
    classes: list[str]
    weights: np.ndarray  # [C, D] the head's class embeddings
    original: np.ndarray
    logit_scale: float
    centroids: np.ndarray | None  # [K, D] the trigger alarm's centres
    report: dict
    embeddings_sha256: str
    trigger: dict[str, np.ndarray] | None = None  # the best inverted mask: mask, pattern, delta
    route: Route | None = None  # where the weights answer; the original embeddings elsewhere

    def head(self) -> HeadSpec:
        from export.graphs import HeadSpec

        centroids = None if self.centroids is None else self.centroids.astype(np.float32)
        return HeadSpec(self.weights, self.logit_scale, centroids, self.route)

    @property
    def alarm_threshold(self) -> float | None:
        return (self.report.get("alarm") or {}).get("threshold")


@dataclass
class Exported:
    """The heads, built and checked in memory: graphs by file name, and what describes them."""

    blobs: dict[str, bytes]
    classes: list[str]
    preprocess: dict
    manifest: dict  # everything but the file hashes, which `write_heads` adds
    parity: dict
    seconds: float


def _alarm_centres(tensors: dict[str, np.ndarray], dim: int) -> np.ndarray | None:
    """[K, D] the alarm's centres; folders purified before the alarm had several hold one
    (`trigger_centroid`, [D])."""
    centres = tensors.get("trigger_centroids", tensors.get("trigger_centroid"))
    if centres is None:
        return None
    if centres.ndim not in (1, 2) or centres.shape[-1] != dim:
        raise UserError(
            f"the trigger alarm's centres have shape {list(centres.shape)}; the embeddings have {dim} dimensions",
            "re-run `cbpt-guard purify`",
        )
    return centres.reshape(-1, dim)


def read_source(folder: Path, which: str = "purified") -> Source:
    """A purify output folder, checked: complete, consistent, and unmodified."""
    from safetensors import safe_open

    if not folder.is_dir():
        raise UsageError(f"export source not found: {folder}", "pass a folder written by `cbpt-guard purify`")
    missing = [f for f in SOURCE_FILES if not (folder / f).is_file()]
    if missing:
        raise UserError(
            f"{folder} is not a complete purify output: missing {', '.join(missing)}",
            "re-run `cbpt-guard purify`, or pass --model and --classes for the original head",
        )
    raw = (folder / EMBEDDINGS).read_bytes()
    report = json.loads((folder / REPORT).read_text())
    expected, actual = report.get("embeddings_sha256"), sha256_bytes(raw)
    if expected and expected != actual:
        raise UserError(
            f"hash mismatch: {folder / EMBEDDINGS} was modified after purify "
            f"(sha256 {actual[:12]}..., report says {expected[:12]}...)",
            "re-run `cbpt-guard purify` to regenerate it",
        )
    with safe_open(str(folder / EMBEDDINGS), framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    for key in ("purified", "original", "logit_scale"):
        if key not in tensors:
            raise UserError(f"{folder / EMBEDDINGS} has no '{key}' tensor", "re-run `cbpt-guard purify`")
    classes = read_classes(folder / CLASSES)
    weights = tensors[which]
    if weights.shape[0] != len(classes):
        raise UserError(
            f"{CLASSES} lists {len(classes)} classes but the embeddings have {weights.shape[0]} rows",
            "re-run `cbpt-guard purify`",
        )
    return Source(
        folder=folder,
        classes=classes,
        weights=weights.astype(np.float32),
        original=tensors["original"].astype(np.float32),
        logit_scale=float(tensors["logit_scale"].ravel()[0]),
        centroids=_alarm_centres(tensors, weights.shape[1]),
        trigger={k: tensors[f"trigger_{k}"] for k in ("mask", "pattern", "delta")}
        if "trigger_mask" in tensors
        else None,
        report=report,
        embeddings_sha256=actual,
        # the original head answers everywhere by itself
        route=None if which == "original" else Route.from_tensors(tensors, tensors["original"]),
    )


def preprocess_spec(pp: dict) -> dict:
    """What the runtime needs to reproduce open_clip's eval transform exactly."""
    size = pp["size"]
    size = list(size) if isinstance(size, (list, tuple)) else [size, size]
    return {
        "size": size,
        "resize_mode": pp["resize_mode"],
        "interpolation": pp["interpolation"],
        "mean": [float(m) for m in pp["mean"]],
        "std": [float(s) for s in pp["std"]],
        "fill_color": int(pp.get("fill_color", 0)),
        "mode": "RGB",
        "layout": "NCHW",
        "scale": 1 / 255,
    }


def source_model(source: Source, runtime=None):
    """The checkpoint a purify output was made from, loaded (on `runtime`'s device) and checked
    against its hash."""
    from cbpt.model import load_clip

    model_path = Path(source.report["model"]["path"])
    if not model_path.is_file():
        raise UserError(
            f"the purified model's checkpoint is gone: {model_path}",
            "restore it, or re-run purify with the checkpoint's new path",
        )
    return load_clip(model_path, arch=source.report["model"]["architecture"], runtime=runtime)


def source_int8_inputs(source: Source, clip) -> Int8Inputs:
    """What `export --int8` calibrates and checks on: the shots purify drew, held-out ones
    among the checks as in `purify --int8` (their paths are in report.json), and the inverted
    mask kept with the embeddings."""
    import torch

    from cbpt.data import load_pixels
    from cbpt.trigger import DummyTrigger
    from export.int8 import CALIBRATION_LIMIT, int8_inputs

    paths = [Path(p) for p in source.report.get("shots", [])]
    held = [Path(p) for p in source.report.get("held_out", [])]
    if source.trigger is None or len(paths) < 2:
        raise UsageError(
            f"{source.folder} keeps no shots or inverted trigger to calibrate int8 on",
            "export --int8 from a folder written by `cbpt-guard purify` (0.2 or later)",
        )
    gone = [str(p) for p in paths + held if not p.is_file()]
    if gone:
        raise UserError(
            f"{len(gone)} of the shots purify used are gone, e.g. {gone[0]}",
            "restore them, or re-run `cbpt-guard purify --int8`",
        )
    trigger = DummyTrigger(*(torch.from_numpy(np.asarray(source.trigger[k])) for k in ("mask", "pattern", "delta")))
    paths, held = _spread(paths, 2 * CALIBRATION_LIMIT), _spread(held, CALIBRATION_LIMIT)
    return int8_inputs(clip, load_pixels(clip, paths), trigger, load_pixels(clip, held) if held else None)


def _spread(paths: list[Path], limit: int) -> list[Path]:
    """At most `limit` of `paths`, spread over them (over the classes): the sample
    `int8_inputs` would take, read alone."""
    if len(paths) <= limit:
        return paths
    return [paths[int(i)] for i in np.linspace(0, len(paths) - 1, limit).round()]


def _metadata(source: Source, clip, pre: dict, alarm_threshold: float | None) -> dict[str, str]:
    meta = {
        "classes": json.dumps(source.classes),
        "embed_dim": str(source.weights.shape[1]),
        "image_size": json.dumps(pre["size"]),
        "mean": json.dumps(pre["mean"]),
        "std": json.dumps(pre["std"]),
        "resize_mode": pre["resize_mode"],
        "interpolation": pre["interpolation"],
        "source_checkpoint_sha256": clip.checkpoint_sha256,
        "embeddings_sha256": source.embeddings_sha256,
        "logit_scale": repr(source.logit_scale),
        "tool_version": TOOL,
        "architecture": clip.info.architecture,
    }
    if alarm_threshold is not None:
        meta["trigger_alarm_threshold"] = repr(alarm_threshold)
    return meta


def _graphs(head: HeadSpec, clip, fp16: bool) -> dict:
    from export.fp16 import Fp16Error, to_fp16
    from export.graphs import build_head
    from export.onnx_encoder import export_classifier

    graphs = {HEAD: build_head(head), CLASSIFIER: export_classifier(clip, head)}
    if fp16:
        try:
            graphs.update({fp16_name(name): to_fp16(g) for name, g in list(graphs.items())})
        except Fp16Error as e:
            raise UserError(f"cannot make the fp16 graphs: {e}; nothing was written", "export without --fp16") from None
    return graphs


def build_heads(
    source: Source, clip, alarm_threshold: float | None = None, fp16: bool = False, int8: Int8Inputs | None = None
) -> Exported:
    """The heads for `source` on `clip` (the model it was purified from), parity-checked.
    `fp16` adds a half-precision twin of each graph; `int8` an int8 classifier, calibrated and
    checked on those images (export/int8.py)."""
    import onnx

    from export.graphs import set_metadata
    from export.parity import check_parity

    t0 = time.perf_counter()
    expected_sha = source.report.get("checkpoint_sha256")
    if expected_sha and expected_sha != clip.checkpoint_sha256:
        raise UserError(
            f"hash mismatch: the checkpoint {clip.info.path} changed since purify "
            f"(sha256 {clip.checkpoint_sha256[:12]}..., report says {expected_sha[:12]}...)",
            "re-run `cbpt-guard purify` on the current checkpoint",
        )
    pre = preprocess_spec(clip.preprocess_cfg)
    meta = _metadata(source, clip, pre, alarm_threshold)
    head = source.head()
    graphs = _graphs(head, clip, fp16)
    half = "fp16 (LayerNorm, softmax and reductions in fp32; float32 inputs and outputs)"
    for name, graph in graphs.items():
        set_metadata(graph, {**meta, "precision": half if is_fp16(name) else "fp32"})
        onnx.checker.check_model(graph, full_check=True)
    blobs = {name: g.SerializeToString() for name, g in graphs.items()}
    parity = check_parity(clip, blobs, head)
    if int8 is not None:
        blob, parity[int8_name(CLASSIFIER)] = int8_twin(blobs[CLASSIFIER], int8)
        graph = onnx.load_from_string(blob)
        set_metadata(graph, {**meta, "precision": "int8 (QDQ: matrix products and convolutions; the rest float)"})
        blobs[int8_name(CLASSIFIER)] = graph.SerializeToString()
    manifest = {
        "tool": TOOL,
        "classes": source.classes,
        "embed_dim": int(source.weights.shape[1]),
        "image_size": pre["size"],
        "source_checkpoint_sha256": clip.checkpoint_sha256,
        "embeddings_sha256": source.embeddings_sha256,
        "architecture": clip.info.architecture,
        "trigger_score": source.centroids is not None,
        "trigger_alarm_threshold": alarm_threshold,
        "route": None if source.route is None else source.route.describe(),
        "parity": parity,
    }
    return Exported(blobs, source.classes, pre, manifest, parity, time.perf_counter() - t0)


def write_heads(folder: Path, exported: Exported) -> dict[str, str]:
    """The graphs, preprocess.json, classes.txt and manifest.json; returns file -> sha256."""
    files = {
        **exported.blobs,
        PREPROCESS: json.dumps(exported.preprocess, indent=2).encode(),
        CLASSES: classes_text(exported.classes).encode(),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    hashes = {name: sha256_bytes(data) for name, data in files.items()}
    (folder / MANIFEST).write_text(json.dumps({**exported.manifest, "files": hashes}, indent=2))
    return hashes


def write_triton(folder: Path, exported: Exported) -> None:
    from export.triton import triton_repository

    repo = triton_repository(
        exported.blobs,
        exported.classes,
        exported.preprocess,
        int(exported.manifest["embed_dim"]),
        bool(exported.manifest["trigger_score"]),
    )
    for rel, data in repo.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
