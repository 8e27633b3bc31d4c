"""The artifact format: the files purify, export and the guard hand each other, and how they
are named, read, hashed and opened. One home, so a writer and its readers cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from cbpt_guard.errors import UsageError, UserError

# What `purify` writes (besides the exported heads) and `export` reads back.
EMBEDDINGS = "embeddings.safetensors"
CLASSES = "classes.txt"
TRIGGER_PNG = "trigger.png"
REPORT = "report.json"
SCAN = "scan.json"
SOURCE_FILES = (EMBEDDINGS, CLASSES, REPORT)

# What `export` writes and the guard reads.
HEAD = "head.onnx"
CLASSIFIER = "classifier.onnx"
PREPROCESS = "preprocess.json"
MANIFEST = "manifest.json"
HEADS_REQUIRED = (MANIFEST, CLASSIFIER, PREPROCESS)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})

# onnxruntime 1.31's CPU provider has few fp16 kernels and casts around them; its NCHWc layout
# pass then crashes (segfault) on the ViT fp16 graph. CPU sessions of fp16 graphs disable it.
CPU_FP16_DISABLED_OPTIMIZERS = ("NchwcTransformer",)


def fp16_name(graph: str) -> str:
    """`classifier.onnx` -> `classifier_fp16.onnx`: the half-precision twin's file name."""
    return graph.removesuffix(".onnx") + "_fp16.onnx"


def is_fp16(graph: str) -> bool:
    return graph.endswith("_fp16.onnx")


def int8_name(graph: str) -> str:
    """`classifier.onnx` -> `classifier_int8.onnx`: the quantised twin's file name."""
    return graph.removesuffix(".onnx") + "_int8.onnx"


def is_int8(graph: str) -> bool:
    return graph.endswith("_int8.onnx")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_safetensors(blob: bytes) -> bytes:
    """`blob` with its header's metadata in key order: safetensors keeps the metadata in a hash
    map whose order changes from process to process, so the same tensors and metadata would
    otherwise hash differently on every run (and so would the heads that record the hash). The
    tensors' bytes and offsets are untouched; the header is padded with spaces to 8 bytes, as
    safetensors itself pads it."""
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + blob[8 + n :]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def classes_text(names: list[str] | tuple[str, ...]) -> str:
    """classes.txt's content: one class name per line, in label order, newline-terminated."""
    return "".join(f"{n}\n" for n in names)


def read_classes(path: str | Path) -> list[str]:
    """Class names, one per line in label order; surrounding spaces and blank lines are
    ignored, a repeated name is refused (two labels cannot share a name)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"classes file not found: {path}", "pass a text file with one class name per line")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise UserError(f"classes file is empty: {path}", "write one class name per line")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"classes file {path} repeats {', '.join(map(repr, dupes))}", "list each class once")
    return names


def ort_session(
    model: str | Path | bytes, providers: list[str] | None = None, threads: int | None = None, fp16: bool = False
):
    """An onnxruntime session with our settings: quiet logs, `threads` intra-op threads (one
    inter-op), and the CPU fp16 workaround above."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    disabled = list(CPU_FP16_DISABLED_OPTIMIZERS) if fp16 else None
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(
        source, opts, providers=providers or ["CPUExecutionProvider"], disabled_optimizers=disabled
    )
