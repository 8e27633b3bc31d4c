"""Advisory file locks, so that several workers (processes, or machines sharing a folder whose
file system honours `flock`) can fill one resumable work folder without doing a step twice.

`claim` is for work any worker may take: it answers at once whether this worker holds it.
`hold` waits its turn: for a step every worker needs and only one should do (a shared base).
A lock dies with its process, so a killed worker never leaves a step stuck.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


def _open(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)


@contextlib.contextmanager
def claim(path: str | Path) -> Iterator[bool]:
    """Try to take `path`'s lock without waiting: yields True when this worker holds it."""
    fd = _open(Path(path))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def hold(path: str | Path) -> Iterator[None]:
    """Take `path`'s lock, waiting while another worker holds it."""
    fd = _open(Path(path))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
