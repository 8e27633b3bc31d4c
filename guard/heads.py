"""Loading exported heads for serving: verified, configured, ready to run.

Reads only what `export` wrote: `manifest.json` (every file's sha256 is checked before
anything is used), `preprocess.json`, `classifier.onnx` (or `classifier_fp16.onnx`) and its
metadata.
"""

from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cbpt_guard.artifacts import (
    CLASSIFIER,
    HEADS_REQUIRED,
    MANIFEST,
    PREPROCESS,
    fp16_name,
    int8_name,
    ort_session,
    sha256_file,
)
from cbpt_guard.errors import UsageError, UserError
from guard.preprocess import PreprocessSpec


def _cuda_device_present() -> bool:
    """True when the CUDA driver reports a device; asking onnxruntime for CUDA without one
    logs a loud load error on every start."""
    for lib in ("libcuda.so.1", "libcuda.so"):
        try:
            cuda = ctypes.CDLL(lib)
        except OSError:
            continue
        count = ctypes.c_int(0)
        return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    return False


def choose_providers(device: str = "auto") -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise UsageError(
                "--device cuda: this onnxruntime has no CUDA provider", "install onnxruntime-gpu, or use --device cpu"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device != "auto":
        raise UsageError(f"unknown --device '{device}'", "use auto, cpu or cuda")
    if "CUDAExecutionProvider" in available and _cuda_device_present():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


@dataclass
class Heads:
    folder: Path
    classes: list[str]
    spec: PreprocessSpec
    manifest: dict
    session: object  # onnxruntime.InferenceSession over classifier.onnx
    providers: list[str]
    alarm_threshold: float | None
    graph: str = CLASSIFIER

    @property
    def has_trigger_score(self) -> bool:
        return any(o.name == "trigger_score" for o in self.session.get_outputs())

    def run(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(None, {"pixel_values": pixel_values.astype(np.float32, copy=False)})))


def _json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})", "re-export the heads") from None


def verify(folder: Path) -> dict:
    """manifest.json, checked: it lists every file the runtime reads, inside the folder, and
    each file matches its sha256."""
    if not folder.is_dir():
        raise UsageError(
            f"heads folder not found: {folder}", "pass a folder written by `cbpt-guard export` or `purify`"
        )
    missing = [f for f in HEADS_REQUIRED if not (folder / f).is_file()]
    if missing:
        raise UserError(
            f"{folder} is not an exported heads folder: missing {', '.join(missing)}", "run `cbpt-guard export` into it"
        )
    manifest = _json(folder / MANIFEST)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise UserError(f"{folder / MANIFEST} lists no files", "re-export the heads")
    unlisted = [f for f in HEADS_REQUIRED if f != MANIFEST and f not in files]
    if unlisted:
        raise UserError(
            f"{folder / MANIFEST} does not list {', '.join(unlisted)}, so it cannot vouch for it",
            "re-export the heads; do not serve edited files",
        )
    for name, sha in files.items():
        if Path(name).name != name:
            raise UserError(f"{folder / MANIFEST} lists {name!r}, outside the heads folder", "re-export the heads")
        path = folder / name
        if not path.is_file():
            raise UserError(f"{path} is listed in manifest.json but missing", "re-export the heads")
        if sha256_file(path) != sha:
            raise UserError(
                f"{path} does not match its sha256 in manifest.json: it was modified or corrupted",
                "re-export the heads; do not serve tampered files",
            )
    return manifest


def _cross_check(folder: Path, graph: str, session, manifest: dict, spec: PreprocessSpec) -> list[str]:
    """The graph, its metadata, preprocess.json and the manifest must describe one model."""
    meta = session.get_modelmeta().custom_metadata_map
    classes = json.loads(meta["classes"]) if "classes" in meta else None
    problems = []
    if classes != manifest.get("classes"):
        problems.append("its classes differ from manifest.json's")
    if meta.get("embeddings_sha256") != manifest.get("embeddings_sha256"):
        problems.append("its embeddings hash differs from manifest.json's")
    if "image_size" in meta and tuple(json.loads(meta["image_size"])) != spec.size:
        problems.append(
            f"it was exported for {json.loads(meta['image_size'])} px, preprocess.json says {list(spec.size)}"
        )
    inputs = [i.name for i in session.get_inputs()]
    if inputs != ["pixel_values"]:
        problems.append(f"its inputs are {inputs}, not pixel_values (is it a head.onnx?)")
    return [f"{folder / graph}: {p}" for p in problems]


def _warm_up(heads: Heads) -> None:
    """One inference before serving: broken heads are refused, not answered with 503s for ever."""
    try:
        out = heads.run(np.zeros((1, 3, *heads.spec.size), np.float32))
    except Exception as e:  # onnxruntime raises its own types for a graph that cannot run
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{heads.folder / heads.graph} does not run: {first[:200]}", "re-export the heads") from None
    probs = out.get("probs")
    if probs is None or probs.shape != (1, len(heads.classes)) or not np.isfinite(probs).all():
        raise UserError(
            f"{heads.folder / heads.graph} gives no finite probabilities for its {len(heads.classes)} classes",
            "re-export the heads",
        )


def load_heads(
    folder: str | Path, device: str = "auto", threads: int | None = None, fp16: bool = False, int8: bool = False
) -> Heads:
    """Verified heads, ready to run: classifier.onnx, or its fp16 or int8 twin."""
    folder = Path(folder)
    if fp16 and int8:
        raise UsageError("--fp16 and --int8 name two different graphs", "pass one of them")
    manifest = verify(folder)
    graph = fp16_name(CLASSIFIER) if fp16 else int8_name(CLASSIFIER) if int8 else CLASSIFIER
    if graph not in manifest["files"]:
        flag = "--fp16" if fp16 else "--int8"
        raise UserError(f"{folder} has no {graph}", f"re-export with `cbpt-guard export {flag}`")
    spec = PreprocessSpec.from_dict(_json(folder / PREPROCESS))
    session = ort_session(folder / graph, choose_providers(device), threads, fp16)
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise UsageError(
            "--device cuda: onnxruntime could not use CUDA here (no GPU, or its CUDA libraries are "
            "missing) and would run on the CPU",
            "use --device cpu, or --device auto to take a GPU when present",
        )
    problems = _cross_check(folder, graph, session, manifest, spec)
    if problems:
        raise UserError("inconsistent heads: " + "; ".join(problems), "re-export the heads")
    threshold = manifest.get("trigger_alarm_threshold")
    heads = Heads(
        folder=folder,
        classes=list(manifest["classes"]),
        spec=spec,
        manifest=manifest,
        session=session,
        providers=session.get_providers(),
        alarm_threshold=None if threshold is None else float(threshold),
        graph=graph,
    )
    _warm_up(heads)
    return heads
