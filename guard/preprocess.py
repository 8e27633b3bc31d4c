"""open_clip's eval transform in numpy and Pillow, reproduced step by step.

torchvision's Resize on a PIL image is Pillow's own resize (antialiased) to a size computed
as `short -> size, long -> int(size * long / short)`; CenterCrop takes
`int(round((H - h) / 2))` from the top and left (padding with 0 first if the image is
smaller); then RGB conversion, /255, and per-channel normalisation. The same calls give the
same bytes, so the runtime's inputs match the purification's to float precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from cbpt_guard.errors import UserError

_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


@dataclass(frozen=True)
class PreprocessSpec:
    size: tuple[int, int]  # (H, W)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"
    fill_color: int = 0

    @classmethod
    def from_dict(cls, d: object) -> PreprocessSpec:
        """preprocess.json, validated: a bad value would make every answer wrong, not fail."""
        try:
            return cls._parse(d)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise UserError(f"preprocess.json is invalid: {e}", "re-export the heads") from None

    @classmethod
    def _parse(cls, d: object) -> PreprocessSpec:
        if not isinstance(d, dict):
            raise TypeError("not a JSON object")
        size = d["size"]
        size = (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (int(size), int(size))
        mean, std = tuple(float(m) for m in d["mean"]), tuple(float(s) for s in d["std"])
        if min(size) < 1:
            raise ValueError(f"size {list(size)} is not positive")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError("mean and std need three values each (R, G, B)")
        if not all(np.isfinite(mean)) or not all(np.isfinite(std)) or min(std) <= 0:
            raise ValueError(f"mean {list(mean)} and std {list(std)} must be finite, std positive")
        if d.get("resize_mode", "shortest") not in ("shortest", "longest", "squash"):
            raise ValueError(f"unknown resize_mode {d.get('resize_mode')!r}")
        if d.get("interpolation", "bicubic") not in _RESAMPLE:
            raise ValueError(f"unknown interpolation {d.get('interpolation')!r}")
        return cls(
            size=size,
            mean=mean,
            std=std,
            resize_mode=d.get("resize_mode", "shortest"),
            interpolation=d.get("interpolation", "bicubic"),
            fill_color=int(d.get("fill_color", 0)),
        )


def _resize_shortest(img: Image.Image, size: tuple[int, int], resample: int) -> Image.Image:
    h, w = size
    if h == w:
        short, long = (img.width, img.height) if img.width <= img.height else (img.height, img.width)
        new_short, new_long = h, int(h * long / short)
        new_w, new_h = (new_short, new_long) if img.width <= img.height else (new_long, new_short)
    else:  # open_clip's ResizeKeepRatio for non-square targets
        ratio = min(img.height / h, img.width / w)
        new_h, new_w = round(img.height / ratio), round(img.width / ratio)
    if (new_h, new_w) == (img.height, img.width):
        return img
    return img.resize((new_w, new_h), resample)


def _center_crop(arr: np.ndarray, size: tuple[int, int], fill: int) -> np.ndarray:
    th, tw = size
    h, w = arr.shape[:2]
    if th > h or tw > w:
        top, left = (th - h) // 2 if th > h else 0, (tw - w) // 2 if tw > w else 0
        bottom, right = (th - h + 1) // 2 if th > h else 0, (tw - w + 1) // 2 if tw > w else 0
        arr = np.pad(arr, ((top, bottom), (left, right), (0, 0)), constant_values=fill)
        h, w = arr.shape[:2]
    top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
    return arr[top : top + th, left : left + tw]


def preprocess(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """PIL image -> float32 [3, H, W], exactly as open_clip's eval transform."""
    resample = _RESAMPLE[spec.interpolation]
    if spec.resize_mode == "squash":
        img = img.resize((spec.size[1], spec.size[0]), resample) if (img.height, img.width) != spec.size else img
    elif spec.resize_mode == "longest":
        scale = max(img.height / spec.size[0], img.width / spec.size[1])
        new = (round(img.width / scale), round(img.height / scale))
        img = img.resize(new, resample) if new != img.size else img
    else:
        img = _resize_shortest(img, spec.size, resample)
    if img.mode != "RGB":
        img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.uint8)
    arr = _center_crop(arr, spec.size, spec.fill_color if spec.resize_mode == "longest" else 0)
    x = arr.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))
