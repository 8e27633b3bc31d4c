"""Atomic outputs: a reader never sees a half-written file, and a failed run leaves nothing.

Files are written to a temporary sibling and renamed into place (rename is atomic on one
file system). A folder of outputs is assembled in a staging folder beside the target and
moved in only once every file is complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide outputs from other users (Triton, services)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def staged_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder; on success its files replace those in `target`.

    A new `target` appears in one rename. An existing one keeps any unrelated files, and each
    of ours replaces its old version by rename, so no file in it is ever half-written. On any
    error (Ctrl-C included) the staging folder is removed and `target` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".staging", dir=target.parent))
    try:
        yield stage
        # mkdtemp's 0700 would hide the folder from other users (a Triton server, a service account)
        mask = _umask()
        for p in [stage, *stage.rglob("*")]:
            if p.is_dir():
                os.chmod(p, 0o777 & ~mask)
        if not target.exists():
            os.replace(stage, target)
            return
        if not target.is_dir():
            raise NotADirectoryError(target)
        for src in sorted(stage.rglob("*"), key=lambda p: len(p.parts)):
            dst = target / src.relative_to(stage)
            if src.is_dir():
                dst.mkdir(exist_ok=True)
            else:
                os.replace(src, dst)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
