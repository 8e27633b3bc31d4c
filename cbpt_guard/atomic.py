"""Atomic outputs: a reader never sees a half-written file, a failed run leaves nothing, and
nothing a user wrote is overwritten by accident.

Files are written to a temporary sibling and renamed into place (rename is atomic on one file
system). A folder of outputs is assembled in a staging folder beside the target and moved in
only once every file is complete; it then replaces the target whole, never merging into it.
A target that holds files cbpt-guard did not write is refused unless the user says
`--overwrite`. Every folder cbpt-guard writes carries a `.cbpt-guard` marker saying so.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from cbpt_guard import TOOL
from cbpt_guard.errors import UsageError

MARKER = ".cbpt-guard"  # {"tool": ..., "kind": ...} in every folder cbpt-guard writes
# Outputs of cbpt-guard 0.1, written before the marker: their own files name the tool.
_LEGACY_SIGNS = ("manifest.json", "report.json", "scan.json")


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


def written_by_us(folder: Path) -> bool:
    if (folder / MARKER).is_file():
        return True
    for name in _LEGACY_SIGNS:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if str(json.loads((folder / name).read_text()).get("tool", "")).startswith("cbpt-guard"):
                return True
    return False


def check_target(target: str | Path, overwrite: bool = False, option: str = "--out") -> None:
    """Refuse, before any work, a target that is a file, or a non-empty folder cbpt-guard did
    not write (unless `overwrite`): replacing it would destroy what is there."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise UsageError(f"{option} {target} is a file, not a folder", f"pass a folder path to {option}")
    if not target.is_dir() or overwrite or written_by_us(target):
        return
    held = sorted(p.name for p in target.iterdir())
    if held:
        listed = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise UsageError(
            f"{option} {target} is not empty and was not written by cbpt-guard (it holds {listed})",
            f"choose a new folder, or pass --overwrite to replace {target} whole",
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(parent: Path, name: str) -> None:
    """Staging and replaced folders that a killed run (SIGKILL, power loss) left beside `name`."""
    for p in parent.glob(f".{name}.*"):
        parts = p.name[len(name) + 2 :].split(".")
        ours = p.is_dir() and len(parts) == 3 and parts[0].isdigit() and parts[2] in ("staging", "replaced")
        if ours and not _alive(int(parts[0])):
            shutil.rmtree(p, ignore_errors=True)


def _new_sibling(target: Path, suffix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=f".{suffix}", dir=target.parent))


def mark_folder(folder: Path, kind: str) -> None:
    """Say that cbpt-guard wrote `folder` (and may replace it)."""
    (folder / MARKER).write_text(json.dumps({"tool": TOOL, "kind": kind}) + "\n")


def _publish(stage: Path, kind: str) -> None:
    mark_folder(stage, kind)
    mask = _umask()  # mkdtemp's 0700 would hide the folder from other users (a Triton server, a service account)
    for p in [stage, *stage.rglob("*")]:
        if p.is_dir():
            os.chmod(p, 0o777 & ~mask)


def _swap_in(stage: Path, target: Path, aside: Path | None = None) -> None:
    """`stage` becomes `target`; an old `target` is moved aside first (beside `aside`, by
    default beside itself) and then deleted."""
    if not target.exists():
        os.replace(stage, target)
        return
    old = _new_sibling(aside or target, "replaced")
    os.replace(target, old / "old")
    os.replace(stage, target)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(target: str | Path, kind: str, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces `target` whole.

    `target` must be new, empty, written by cbpt-guard, or `overwrite` given (`check_target`).
    On any error (Ctrl-C included) the staging folder is removed and `target` is untouched."""
    target = Path(target)
    check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(target.parent, target.name)
    stage = _new_sibling(target, "staging")
    try:
        yield stage
        _publish(stage, kind)
        check_target(target, overwrite)  # something may have appeared there meanwhile
        _swap_in(stage, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def foreign_entries(repo: Path, names: Iterable[str]) -> list[str]:
    """Those of `names` that exist in `repo` and were not written by cbpt-guard."""
    return [n for n in names if (repo / n).exists() and not ((repo / n).is_dir() and written_by_us(repo / n))]


@contextlib.contextmanager
def staged_entries(repo: str | Path, kind: str, owned: Iterable[str], overwrite: bool = False) -> Iterator[Path]:
    """Stage folders for a repository others share (a Triton model repository). Each folder
    written to the stage replaces its namesake in `repo` whole; of `owned` (every name this
    kind of export may write), those cbpt-guard wrote before and this run does not are removed;
    a namesake cbpt-guard did not write is refused unless `overwrite`."""
    repo = Path(repo)
    owned = list(owned)
    if repo.exists() and not repo.is_dir():
        raise UsageError(f"--triton {repo} is a file, not a folder", "pass a folder path to --triton")
    clash = foreign_entries(repo, owned)
    if clash and not overwrite:
        raise UsageError(
            f"--triton {repo} holds {', '.join(clash)}, not written by cbpt-guard",
            "choose another repository, or pass --overwrite to replace them",
        )
    repo.mkdir(parents=True, exist_ok=True)
    _clean_stale(repo.parent, repo.name)
    stage = _new_sibling(repo, "staging")  # beside the repository: a server polling it never sees a half model
    try:
        yield stage
        written = sorted(p.name for p in stage.iterdir() if p.is_dir())
        for name in written:
            _publish(stage / name, kind)
        for name in owned:
            if name not in written and (repo / name).is_dir() and written_by_us(repo / name):
                shutil.rmtree(repo / name)  # ours, and stale: it would be served beside the new ones
        for name in written:
            _swap_in(stage / name, repo / name, aside=repo)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
