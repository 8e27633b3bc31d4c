"""The defender's few clean labelled images: found, checked, sampled and preprocessed.

A data source is an ImageFolder-style directory (one sub-folder per class) or a CSV file of
`path,label` rows (paths relative to the CSV; labels are class names or 0-based indices).
Class names come from `--classes FILE` (one per line, in label order) or the folder names.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cbpt_guard.artifacts import IMAGE_SUFFIXES, read_classes
from cbpt_guard.errors import UsageError, UserError
from cbpt_guard.images import decode

if TYPE_CHECKING:
    import torch

    from cbpt.model import LoadedClip


@dataclass(frozen=True)
class LabelledImages:
    paths: tuple[Path, ...]
    labels: tuple[int, ...]
    classnames: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, index: Sequence[int]) -> LabelledImages:
        return LabelledImages(
            paths=tuple(self.paths[i] for i in index),
            labels=tuple(self.labels[i] for i in index),
            classnames=self.classnames,
        )

    def counts(self) -> list[int]:
        return np.bincount(np.asarray(self.labels, dtype=np.int64), minlength=len(self.classnames)).tolist()


def _folder_key(name: str) -> str:
    return name.strip().lower().replace("_", " ")


def discover(source: str | Path, classes: Sequence[str] | None = None) -> LabelledImages:
    source = Path(source)
    if not source.exists():
        raise UsageError(f"data not found: {source}", "pass an image folder (one sub-folder per class) or a CSV")
    if source.is_dir():
        return _discover_folder(source, classes)
    if source.suffix.lower() in (".csv", ".tsv"):
        return _discover_csv(source, classes)
    raise UsageError(
        f"data must be a folder or a .csv file, got {source}", "pass an image folder or a CSV of path,label"
    )


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _discover_folder(root: Path, classes: Sequence[str] | None) -> LabelledImages:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise UserError(f"no class folders in {root}", "put each class's images in a sub-folder named after it")
    if classes is None:
        names = [f.name.replace("_", " ") for f in folders]
        chosen = folders
    else:
        by_key = {_folder_key(f.name): f for f in folders}
        missing = [c for c in classes if _folder_key(c) not in by_key]
        extra = sorted(f.name for f in folders if _folder_key(f.name) not in {_folder_key(c) for c in classes})
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"no folder for class(es) {', '.join(map(repr, missing[:5]))}")
            if extra:
                parts.append(f"folder(s) {', '.join(map(repr, extra[:5]))} not in the classes file")
            raise UserError(
                f"class names do not match {root}: " + "; ".join(parts),
                "make the folder names and the classes file agree",
            )
        names = list(classes)
        chosen = [by_key[_folder_key(c)] for c in classes]
    paths: list[Path] = []
    labels: list[int] = []
    for label, folder in enumerate(chosen):
        imgs = _images_in(folder)
        if not imgs:
            raise UserError(
                f"class '{names[label]}' has no images (folder {folder})",
                f"add images ({', '.join(sorted(IMAGE_SUFFIXES))}) or remove the folder",
            )
        paths += imgs
        labels += [label] * len(imgs)
    return LabelledImages(tuple(paths), tuple(labels), tuple(names))


def _discover_csv(path: Path, classes: Sequence[str] | None) -> LabelledImages:
    delim = "\t" if path.suffix.lower() == ".tsv" else ","
    try:  # utf-8-sig: Excel starts its CSVs with a byte-order mark
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f, delimiter=delim) if r and any(c.strip() for c in r)]
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start})", "save the CSV as UTF-8") from None
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
    if not rows:
        raise UserError(f"CSV has no rows: {path}", "write one `path,label` row per image")
    bad = [i + 1 for i, r in enumerate(rows) if len(r) < 2]
    if bad:
        raise UserError(f"CSV rows {bad[:5]} of {path} do not have two columns", "write `path,label` rows")
    raw_labels = [r[1].strip() for r in rows]
    if classes is None and all(lab.isdigit() for lab in raw_labels):
        raise UsageError(
            f"the labels in {path} are numbers, so they name no class a prompt could carry",
            "pass --classes FILE with the class names in label order",
        )
    names = list(classes) if classes is not None else sorted(set(raw_labels), key=_natural)
    index = {n: i for i, n in enumerate(names)}
    labels: list[int] = []
    unknown: list[str] = []
    for lab in raw_labels:
        if lab in index:
            labels.append(index[lab])
        elif classes is not None and lab.isdigit() and int(lab) < len(names):
            labels.append(int(lab))
        else:
            unknown.append(lab)
    if unknown:
        raise UserError(
            f"class names do not match: CSV label(s) {sorted(set(unknown))[:5]} are not in the classes",
            "use names from the classes file or 0-based indices",
        )
    paths = [(path.parent / r[0].strip()) for r in rows]
    twice = sorted(str(p) for p, n in Counter(paths).items() if n > 1)
    if twice:
        raise UserError(
            f"{path} lists {len(twice)} image(s) more than once, e.g. {twice[0]}",
            "list each image once: a repeated shot would count twice",
        )
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise UserError(
            f"{len(missing)} image(s) listed in {path} do not exist: {', '.join(missing[:3])}",
            "fix the paths (relative to the CSV's folder)",
        )
    ds = LabelledImages(tuple(paths), tuple(labels), tuple(names))
    empty = [names[i] for i, n in enumerate(ds.counts()) if n == 0]
    if empty:
        raise UserError(
            f"class(es) {', '.join(map(repr, empty[:5]))} have no images in {path}",
            "add rows for every class, or drop the class from the classes file",
        )
    return ds


def _natural(s: str):
    return (0, int(s)) if s.isdigit() else (1, s)


def sample_shots(ds: LabelledImages, shots: int, seed: int = 0) -> tuple[LabelledImages, LabelledImages]:
    """K images per class, drawn with `seed`; returns (the shots, the rest)."""
    if len(ds.classnames) < 2:
        raise UserError(
            f"the data has one class ({ds.classnames[0]!r}): a classifier needs at least two",
            "add the other classes' images",
        )
    if shots < 1:
        raise UsageError(f"--shots must be at least 1, got {shots}", "pass --shots 16, for example")
    labels = np.asarray(ds.labels)
    short = [(ds.classnames[c], int(n)) for c, n in enumerate(ds.counts()) if n < shots]
    if short:
        listed = ", ".join(f"'{c}' has {n}" for c, n in short[:4])
        raise UserError(
            f"too few images for --shots {shots}: {listed}",
            f"lower --shots to {min(n for _, n in short)} or add images",
        )
    rng = np.random.default_rng(seed)
    picked: list[int] = []
    for c in range(len(ds.classnames)):
        idx = np.flatnonzero(labels == c)
        picked += sorted(rng.choice(idx, size=shots, replace=False).tolist())
    rest = sorted(set(range(len(ds))) - set(picked))
    return ds.subset(picked), ds.subset(rest)


@dataclass(frozen=True)
class ShotBudget:
    """K = `shots` labelled clean images per class is everything the defender touches: the
    held-out images that decide early stopping, escalation and the alarm's threshold come out
    of those K, not on top of them. `held_out` per class; None takes a quarter of K from
    MIN_SPLIT shots up and none below, where a one- or two-image check per class decides
    nothing and the tuning runs its fixed schedule instead (docs/method.md#shot-budget)."""

    shots: int = 16
    held_out: int | None = None

    MIN_SPLIT = 8  # from here a quarter of K is held out: 2 per class at K = 8, 4 at 16
    SHARE = 4  # one image in SHARE is held out

    def held(self) -> int:
        if self.held_out is not None:
            return self.held_out
        return self.shots // self.SHARE if self.shots >= self.MIN_SPLIT else 0

    def tuning(self) -> int:
        return self.shots - self.held()

    def check(self) -> None:
        if self.shots < 1:
            raise UsageError(f"--shots must be at least 1, got {self.shots}", "pass --shots 16, for example")
        if self.held_out is not None and not 0 <= self.held_out < self.shots:
            raise UsageError(
                f"--held-out must be between 0 and --shots - 1 ({self.shots - 1}), got {self.held_out}",
                "held-out shots come out of --shots; leave --held-out out for a quarter of them",
            )

    def describe(self) -> dict:
        return {"shots_per_class": self.shots, "tuning_per_class": self.tuning(), "held_out_per_class": self.held()}


def split_held_out(chosen: LabelledImages, per_class: int, seed: int) -> tuple[LabelledImages, LabelledImages]:
    """(tuning, held-out): `per_class` of each class's images held out, drawn with `seed`;
    no image is in both."""
    labels = np.asarray(chosen.labels)
    rng = np.random.default_rng([seed, 1])
    held: list[int] = []
    for c in range(len(chosen.classnames)):
        idx = np.flatnonzero(labels == c)
        held += rng.choice(idx, size=per_class, replace=False).tolist()
    kept = sorted(set(range(len(chosen))) - set(held))
    return chosen.subset(kept), chosen.subset(sorted(held))


# uint8 shots larger than this are kept in a file and read a batch at a time (PixelStore)
SPILL_BYTES = 1 << 30


class PixelStore:
    """uint8 images [N, C, H, W] kept in an unlinked temporary file and read a batch at a time
    with pread: the process holds a batch, the kernel's page cache the rest
    (docs/scale.md#memory). Indexed like a tensor (an int, a slice, a list or a tensor of
    rows), it returns tensors."""

    def __init__(self, shape: tuple[int, int, int, int], folder: str | Path | None = None):
        import tempfile

        import torch

        self.shape = torch.Size(shape)
        self.dtype = torch.uint8
        self._row = int(np.prod(shape[1:]))
        fd, name = tempfile.mkstemp(prefix="cbpt-shots-", suffix=".u8", dir=folder)
        os.unlink(name)  # the data lives as long as the descriptor: nothing to clean up
        os.ftruncate(fd, shape[0] * self._row)
        self._fd = fd

    def __len__(self) -> int:
        return self.shape[0]

    def write(self, start: int, rows) -> None:
        """Rows `start`, `start + 1`, ... from a uint8 tensor [M, C, H, W]."""
        os.pwrite(self._fd, rows.contiguous().numpy().tobytes(), start * self._row)

    def __getitem__(self, index):
        import torch

        if isinstance(index, int):
            return self[[index]][0]
        rows = range(*index.indices(len(self))) if isinstance(index, slice) else np.asarray(index).reshape(-1)
        out = np.empty((len(rows), self._row), dtype=np.uint8)
        for j, r in enumerate(rows):
            out[j] = np.frombuffer(os.pread(self._fd, self._row, int(r) * self._row), dtype=np.uint8)
        return torch.from_numpy(out).view(len(rows), *self.shape[1:])

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None


def load_batch(ds: LabelledImages, transform: Callable, spill_bytes: int | None = None):
    """Preprocess every image with `transform` into one preallocated tensor (no second copy
    while stacking), or, past `spill_bytes` of uint8 pixels, into a `PixelStore`; name every
    unreadable file at once."""
    import torch

    out, bad = None, []
    for i, p in enumerate(ds.paths):
        try:
            x = transform(decode(p))
        except Exception as e:  # PIL raises many types for corrupt data; name the file, not the type
            bad.append(f"{p} ({type(e).__name__})")
            continue
        if out is None:
            spill = spill_bytes is not None and x.dtype == torch.uint8 and len(ds) * x.numel() > spill_bytes
            out = PixelStore((len(ds), *x.shape)) if spill else torch.empty((len(ds), *x.shape), dtype=x.dtype)
        if isinstance(out, PixelStore):
            out.write(i, x[None])
        else:
            out[i] = x
    if bad:
        raise UserError(
            f"{len(bad)} unreadable image(s): {'; '.join(bad[:3])}" + (" ..." if len(bad) > 3 else ""),
            "remove or replace them",
        )
    assert out is not None  # discover() and sample_shots() never give an empty set
    return out, torch.tensor(ds.labels, dtype=torch.long)


@dataclass
class Shots:
    """The defender's shots, loaded: uint8 pixels after the model's resize and crop, before its
    normalisation (triggers live in pixel space; `cbpt.encoding.to_x01` makes them floats a
    batch at a time), and the held-out ones, drawn from the same budget, when there are any."""

    pixels: torch.Tensor | PixelStore  # [N, 3, H, W] uint8
    labels: torch.Tensor
    classnames: tuple[str, ...]
    held_pixels: torch.Tensor | PixelStore | None = None
    held_labels: torch.Tensor | None = None
    paths: tuple[str, ...] = ()
    held_paths: tuple[str, ...] = ()
    budget: ShotBudget | None = None  # how they were drawn; None: built by hand


def pixel_transform(clip: LoadedClip) -> Callable:
    """The model's eval transform up to its pixels: uint8 [3, H, W], no division, no Normalize.
    uint8 / 255 is exactly what its ToTensor gives, so nothing is lost."""
    from torchvision.transforms import Compose, Normalize, PILToTensor, ToTensor

    tf = clip.transform()
    steps = [PILToTensor() if isinstance(t, ToTensor) else t for t in tf.transforms if not isinstance(t, Normalize)]
    return Compose(steps)


def load_pixels(clip: LoadedClip, paths: Sequence[Path]) -> torch.Tensor:
    """Images at the model's size, uint8, before normalisation."""
    x, _ = load_batch(LabelledImages(tuple(paths), (0,) * len(paths), ("",)), pixel_transform(clip))
    return x


def load_shots(
    clip: LoadedClip,
    data: str | Path,
    classes: str | Path | None,
    budget: ShotBudget,
    seed: int,
    spill_bytes: int | None = SPILL_BYTES,
) -> Shots:
    """`budget.shots` images per class drawn with `seed`, `budget.held()` of them held out;
    each set past `spill_bytes` is kept in a file."""
    budget.check()
    ds = discover(data, read_classes(classes) if classes else None)
    chosen, _ = sample_shots(ds, budget.shots, seed)
    tune, held = split_held_out(chosen, budget.held(), seed)
    tf = pixel_transform(clip)
    x, y = load_batch(tune, tf, spill_bytes)
    hx, hy = load_batch(held, tf, spill_bytes) if len(held) else (None, None)
    return Shots(
        x, y, ds.classnames, hx, hy, tuple(str(p) for p in tune.paths), tuple(str(p) for p in held.paths), budget
    )
