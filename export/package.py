"""`cbpt-guard export`: bake class embeddings into ONNX heads, check parity, write atomically.

Reads what `purify` wrote (`embeddings.safetensors`, `classes.txt`, `report.json`) and the
checkpoint that report names; writes `head.onnx`, `classifier.onnx`, `preprocess.json` and
`manifest.json` (sha256 of every file), and optionally a Triton repository.
The export fails, leaving nothing, if onnxruntime's outputs differ from PyTorch's.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cbpt_guard import __version__, atomic
from cbpt_guard.errors import UsageError, UserError

SOURCE_FILES = ("embeddings.safetensors", "classes.txt", "report.json")


@dataclass
class Source:
    folder: Path
    classes: list[str]
    weights: np.ndarray  # [C, D] the head's class embeddings
    original: np.ndarray
    logit_scale: float
    centroid: np.ndarray | None
    report: dict
    embeddings_sha256: str


@dataclass
class ExportResult:
    out: Path
    files: dict[str, str]
    parity: dict = field(default_factory=dict)
    seconds: float = 0.0


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_source(folder: Path, which: str = "purified") -> Source:
    """A purify output folder, checked: complete, consistent, and unmodified."""
    from safetensors import safe_open

    if not folder.is_dir():
        raise UsageError(f"export source not found: {folder}", "pass a folder written by `cbpt-guard purify`")
    missing = [f for f in SOURCE_FILES if not (folder / f).is_file()]
    if missing:
        raise UserError(f"{folder} is not a complete purify output: missing {', '.join(missing)}",
                        "re-run `cbpt-guard purify`, or pass --model and --classes for the original head")
    raw = (folder / "embeddings.safetensors").read_bytes()
    report = json.loads((folder / "report.json").read_text())
    expected = report.get("embeddings_sha256")
    if expected and expected != sha256_bytes(raw):
        raise UserError(f"hash mismatch: {folder / 'embeddings.safetensors'} was modified after purify "
                        f"(sha256 {sha256_bytes(raw)[:12]}..., report says {expected[:12]}...)",
                        "re-run `cbpt-guard purify` to regenerate it")
    with safe_open(str(folder / "embeddings.safetensors"), framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for key in ("purified", "original", "logit_scale"):
        if key not in tensors:
            raise UserError(f"{folder / 'embeddings.safetensors'} has no '{key}' tensor", "re-run `cbpt-guard purify`")
    classes = [c for c in (folder / "classes.txt").read_text(encoding="utf-8").split("\n") if c]
    weights = tensors[which]
    if weights.shape[0] != len(classes):
        raise UserError(f"classes.txt lists {len(classes)} classes but the embeddings have {weights.shape[0]} rows",
                        "re-run `cbpt-guard purify`")
    return Source(folder=folder, classes=classes, weights=weights.astype(np.float32),
                  original=tensors["original"].astype(np.float32), logit_scale=float(tensors["logit_scale"].ravel()[0]),
                  centroid=tensors.get("trigger_centroid"), report=report, embeddings_sha256=sha256_bytes(raw))


def preprocess_spec(pp: dict) -> dict:
    """What the runtime needs to reproduce open_clip's eval transform exactly."""
    size = pp["size"]
    size = list(size) if isinstance(size, (list, tuple)) else [size, size]
    return {"size": size, "resize_mode": pp["resize_mode"], "interpolation": pp["interpolation"],
            "mean": [float(m) for m in pp["mean"]], "std": [float(s) for s in pp["std"]],
            "fill_color": int(pp.get("fill_color", 0)), "mode": "RGB", "layout": "NCHW", "scale": 1 / 255}


def export_heads(source: Source, out: Path, clip=None, triton: Path | None = None,
                 alarm_threshold: float | None = None, fp16: bool = False) -> ExportResult:
    """Write the heads folder. `clip` is the loaded model (loaded from the report when None);
    `fp16` adds a half-precision twin of each graph (`head_fp16.onnx`, `classifier_fp16.onnx`)."""
    import onnx

    from export.fp16 import Fp16Error, to_fp16
    from export.graphs import build_head, set_metadata
    from export.onnx_encoder import export_classifier
    from export.parity import check_parity

    t0 = time.perf_counter()
    if clip is None:
        from cbpt.model import load_clip

        model_path = Path(source.report["model"]["path"])
        if not model_path.is_file():
            raise UserError(f"the purified model's checkpoint is gone: {model_path}",
                            "restore it, or re-run purify with the checkpoint's new path")
        clip = load_clip(model_path, arch=source.report["model"]["architecture"])
    expected_sha = source.report.get("checkpoint_sha256")
    if expected_sha and expected_sha != clip.checkpoint_sha256:
        raise UserError(f"hash mismatch: the checkpoint {clip.info.path} changed since purify "
                        f"(sha256 {clip.checkpoint_sha256[:12]}..., report says {expected_sha[:12]}...)",
                        "re-run `cbpt-guard purify` on the current checkpoint")
    pre = preprocess_spec(clip.preprocess_cfg)
    centroid = None if source.centroid is None else source.centroid.astype(np.float32)
    meta = {
        "classes": json.dumps(source.classes), "embed_dim": str(source.weights.shape[1]),
        "image_size": json.dumps(pre["size"]), "mean": json.dumps(pre["mean"]), "std": json.dumps(pre["std"]),
        "resize_mode": pre["resize_mode"], "interpolation": pre["interpolation"],
        "source_checkpoint_sha256": clip.checkpoint_sha256, "embeddings_sha256": source.embeddings_sha256,
        "logit_scale": repr(source.logit_scale), "tool_version": f"cbpt-guard {__version__}",
        "architecture": clip.info.architecture,
    }
    if alarm_threshold is not None:
        meta["trigger_alarm_threshold"] = repr(alarm_threshold)
    head = build_head(source.weights, source.logit_scale, centroid)
    graphs = {"head.onnx": head, "classifier.onnx": export_classifier(clip, source.weights, source.logit_scale, centroid)}
    if fp16:
        try:
            graphs.update({f"{name[:-5]}_fp16.onnx": to_fp16(g) for name, g in list(graphs.items())})
        except Fp16Error as e:
            raise UserError(f"cannot make the fp16 graphs: {e}; nothing was written", "export without --fp16") from None
        meta_fp16 = {**meta, "precision": "fp16 (LayerNorm, softmax and reductions in fp32; float32 inputs and outputs)"}
    for name, graph in graphs.items():
        set_metadata(graph, meta_fp16 if name.endswith("_fp16.onnx") else {**meta, "precision": "fp32"})
        onnx.checker.check_model(graph, full_check=True)
    blobs = {name: g.SerializeToString() for name, g in graphs.items()}
    parity = check_parity(clip, blobs, source.weights, source.logit_scale, centroid)
    with atomic.staged_dir(out) as stage:
        files: dict[str, str] = {}
        for name, blob in blobs.items():
            (stage / name).write_bytes(blob)
            files[name] = sha256_bytes(blob)
        extra = {
            "preprocess.json": json.dumps(pre, indent=2).encode(),
            "classes.txt": ("\n".join(source.classes) + "\n").encode(),
        }
        for name, data in extra.items():
            (stage / name).write_bytes(data)
            files[name] = sha256_bytes(data)
        manifest = {"tool": f"cbpt-guard {__version__}", "files": files, "classes": source.classes,
                    "embed_dim": int(source.weights.shape[1]), "image_size": pre["size"],
                    "source_checkpoint_sha256": clip.checkpoint_sha256, "embeddings_sha256": source.embeddings_sha256,
                    "architecture": clip.info.architecture, "trigger_score": centroid is not None,
                    "trigger_alarm_threshold": alarm_threshold, "parity": parity}
        (stage / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if triton is not None:
        from export.triton import triton_repository

        with atomic.staged_dir(triton) as stage:
            for rel, data in triton_repository(blobs, source.classes, pre, source.weights.shape[1],
                                               centroid is not None).items():
                (stage / rel).parent.mkdir(parents=True, exist_ok=True)
                (stage / rel).write_bytes(data)
    return ExportResult(out=out, files=files, parity=parity, seconds=time.perf_counter() - t0)
