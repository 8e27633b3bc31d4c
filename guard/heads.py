"""Loading exported heads for serving: verified, configured, ready to run.

Reads only what `export` wrote: `manifest.json` (every file's sha256 is checked before
anything is used), `preprocess.json`, `classifier.onnx` (or `classifier_fp16.onnx`) and its
metadata.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cbpt_guard.errors import UsageError, UserError
from guard.preprocess import PreprocessSpec

REQUIRED = ("manifest.json", "classifier.onnx", "preprocess.json")


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
            raise UsageError("--device cuda: this onnxruntime has no CUDA provider",
                             "install onnxruntime-gpu, or use --device cpu")
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
    graph: str = "classifier.onnx"

    @property
    def has_trigger_score(self) -> bool:
        return any(o.name == "trigger_score" for o in self.session.get_outputs())

    def run(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(None, {"pixel_values": pixel_values.astype(np.float32, copy=False)})))


def verify(folder: Path) -> dict:
    if not folder.is_dir():
        raise UsageError(f"heads folder not found: {folder}", "pass a folder written by `cbpt-guard export` or `purify`")
    missing = [f for f in REQUIRED if not (folder / f).is_file()]
    if missing:
        raise UserError(f"{folder} is not an exported heads folder: missing {', '.join(missing)}",
                        "run `cbpt-guard export` into it")
    manifest = json.loads((folder / "manifest.json").read_text())
    for name, sha in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise UserError(f"{path} is listed in manifest.json but missing", "re-export the heads")
        if hashlib.sha256(path.read_bytes()).hexdigest() != sha:
            raise UserError(f"{path} does not match its sha256 in manifest.json: it was modified or corrupted",
                            "re-export the heads; do not serve tampered files")
    return manifest


def load_heads(folder: str | Path, device: str = "auto", threads: int | None = None, fp16: bool = False) -> Heads:
    import onnxruntime as ort

    folder = Path(folder)
    manifest = verify(folder)
    graph = "classifier_fp16.onnx" if fp16 else "classifier.onnx"
    if graph not in manifest.get("files", {}):
        raise UserError(f"{folder} has no {graph}", "re-export with `cbpt-guard export --fp16`")
    spec = PreprocessSpec.from_dict(json.loads((folder / "preprocess.json").read_text()))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    providers = choose_providers(device)
    # onnxruntime 1.31's CPU provider crashes in its NCHWc layout pass on some fp16 graphs
    # (export/fp16.py); the GPU providers do not run that pass.
    disabled = ["NchwcTransformer"] if fp16 else None
    session = ort.InferenceSession(str(folder / graph), opts, providers=providers, disabled_optimizers=disabled)
    meta = session.get_modelmeta().custom_metadata_map
    classes = json.loads(meta["classes"]) if "classes" in meta else manifest["classes"]
    threshold = manifest.get("trigger_alarm_threshold")
    return Heads(folder=folder, classes=classes, spec=spec, manifest=manifest, session=session,
                 providers=session.get_providers(), alarm_threshold=None if threshold is None else float(threshold),
                 graph=graph)
