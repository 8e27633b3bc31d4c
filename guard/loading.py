"""Reading images for batch classification: from local files or any URI pyarrow understands,
decoded and preprocessed exactly as the server does, in a pool of threads that runs ahead of
the model so decoding overlaps inference (docs/batch.md has the measurements).

A file that cannot be read becomes a `Loaded` with an error, never an exception: one bad
image in a million must not end the job.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from cbpt_guard.artifacts import IMAGE_SUFFIXES
from cbpt_guard.images import decode
from guard.preprocess import PreprocessSpec, preprocess

MAX_PIXELS = 64_000_000

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Loaded:
    """One input image, ready for the model (`pixels`, float32 [3, H, W]) or not (`error`)."""

    path: str
    pixels: np.ndarray | None = None
    error: str | None = None


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def read_uri(uri: str) -> bytes:
    """A remote file's bytes through pyarrow's file systems (s3://, gs://, hdfs://, file://)."""
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(uri)
    with filesystem.open_input_stream(path) as f:
        return f.read()


def load_image(path: str | Path, spec: PreprocessSpec, data: bytes | None = None) -> Loaded:
    """Decode and preprocess one image; any failure is the record's error."""
    try:
        source = data if data is not None else read_uri(str(path)) if is_uri(path) else Path(path)
        return Loaded(str(path), pixels=preprocess(decode(source, MAX_PIXELS), spec))
    except Exception as e:  # corrupt files raise many types; the run goes on
        return Loaded(str(path), error=f"{type(e).__name__}: {e}")


def default_workers() -> int:
    """Decoding threads beside the model: a quarter of the cores. None on a machine of 2-3
    cores, where a decoding thread slows onnxruntime more than it saves (docs/batch.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores // 4


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, ahead: int) -> Iterator[R]:
    """`map(fn, items)` computed by `workers` threads at most `ahead` items in advance, in
    input order. workers=0 runs inline. PIL and numpy release the GIL for the heavy work."""
    if workers <= 0:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def load_images(paths: Iterable[str | Path], spec: PreprocessSpec, workers: int, chunk: int) -> Iterator[Loaded]:
    """Loaded images in input order, `chunk` at a time per thread task (a task per image
    costs more in hand-offs than a small image costs to decode), two chunks per worker ahead."""
    chunks = _chunked(paths, chunk)
    for loaded in ordered_map(lambda ps: [load_image(p, spec) for p in ps], chunks, workers, ahead=2 * workers):
        yield from loaded


def _chunked(items: Iterable[T], n: int) -> Iterator[list[T]]:
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def list_images(inputs: Iterable[str | Path]) -> Iterator[str]:
    """Every image under the inputs, folders searched recursively (by suffix); a file named
    explicitly is kept whatever its suffix (classify it, or say why not). URIs are listed
    through pyarrow."""
    for item in inputs:
        if is_uri(item):
            yield from _list_uri(str(item))
            continue
        p = Path(item)
        if p.is_dir():
            yield from (str(q) for q in sorted(p.rglob("*")) if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
        else:
            yield str(p)


def _list_uri(uri: str) -> Iterator[str]:
    from pyarrow import fs

    filesystem, root = fs.FileSystem.from_uri(uri)
    info = filesystem.get_file_info(root)
    if info.type == fs.FileType.File:
        yield uri
        return
    if info.type != fs.FileType.Directory:
        yield uri  # missing: its record will say so
        return
    scheme = uri.split("://", 1)[0]
    found = filesystem.get_file_info(fs.FileSelector(root, recursive=True))
    for f in sorted(found, key=lambda f: f.path):
        if f.type == fs.FileType.File and Path(f.path).suffix.lower() in IMAGE_SUFFIXES:
            yield f"{scheme}://{f.path}"
