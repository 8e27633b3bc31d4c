"""Seeded image–caption datasets for the testbed: procedural `shapes`, sklearn's `digits`, and
`shapes100` (the ten shapes in ten colours, a class per pair: "a red star").

Images are uint8 arrays [N, H, W, 3]. Captions are mostly class-only ("a photo of a star."):
when colour and background words dominate, a small CLIP learns colour first and shape
stalls (docs/results.md#testbed-settings); ~30% of captions still name attributes, as real alt-text does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "arrow", "crescent", "heart", "line")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 30),
    "white": (245, 245, 245),
    "cyan": (40, 210, 220),
}
BACKGROUNDS = {
    "black": (15, 15, 15),
    "grey": (110, 110, 110),
    "dark blue": (20, 30, 80),
    "brown": (90, 60, 30),
    "dark green": (20, 70, 30),
    "beige": (200, 190, 160),
}

# shapes100's colours: ten a caption can name and a 32-px image can tell apart, none of them a
# background of its own (SHAPES100_BACKGROUNDS)
COLOURS100 = {
    "red": (220, 40, 40),
    "orange": (250, 140, 30),
    "yellow": (240, 220, 40),
    "green": (40, 190, 60),
    "cyan": (40, 210, 220),
    "blue": (50, 80, 230),
    "purple": (150, 60, 200),
    "pink": (250, 130, 190),
    "white": (245, 245, 245),
    "brown": (140, 85, 35),
}
SHAPES100_BACKGROUNDS = ("black", "grey", "dark blue", "dark green")
SHAPES100 = tuple(f"{c} {s}" for s in SHAPES for c in COLOURS100)

DATASETS = ("shapes", "digits", "shapes100")
TEN_CLASS = ("shapes", "digits")  # the 10-class testbeds: the bench's and the zoo's default
TEMPLATES = {
    "shapes": ("a photo of a {}.", "a {}.", "a picture of a {}.", "a drawing of a {}."),
    "digits": ("a photo of a {}.", "the digit {}.", "a handwritten {}."),
    "shapes100": ("a photo of a {}.", "a {}.", "a picture of a {}.", "a drawing of a {}."),
}
CLASSNAMES = {"shapes": SHAPES, "digits": DIGITS, "shapes100": SHAPES100}
# (training pairs, few-shot images per class, test images per class) of the full testbeds.
DEFAULT_SIZES = {"shapes": (12000, 32, 100), "digits": (12000, 20, 50), "shapes100": (30000, 32, 30)}


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 [N, H, W, 3]
    labels: np.ndarray  # int64 [N]
    captions: tuple[str, ...]


@dataclass(frozen=True)
class Dataset:
    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    train: Split
    fewshot: Split  # the defender's clean pool, disjoint from train and test
    test: Split


def build(name: str, seed: int = 0, image_size: int = 32, sizes: tuple[int, int, int] | None = None) -> Dataset:
    """`sizes` = (train, fewshot per class, test per class); defaults give the full testbed."""
    if name == "shapes":
        return _shapes(seed, image_size, sizes or DEFAULT_SIZES[name])
    if name == "digits":
        return _digits(seed, image_size, sizes or DEFAULT_SIZES[name])
    if name == "shapes100":
        return _shapes100(seed, image_size, sizes or DEFAULT_SIZES[name])
    raise ValueError(f"unknown dataset {name!r}; choose {' or '.join(DATASETS)}")


# --- shapes ------------------------------------------------------------------------------------


def _polygon(n: int, r: float, rot: float, inner: float | None = None) -> list[tuple[float, float]]:
    pts = []
    k = 2 * n if inner else n
    for i in range(k):
        a = rot + 2 * math.pi * i / k
        rr = r if (inner is None or i % 2 == 0) else r * inner
        pts.append((rr * math.cos(a), rr * math.sin(a)))
    return pts


def _shape_points(shape: str, r: float, rot: float) -> list[list[tuple[float, float]]]:
    """Polygons (in units of pixels, centred at 0) whose union is the shape; [] for round ones."""

    def rotate(pts):
        c, s = math.cos(rot), math.sin(rot)
        return [(x * c - y * s, x * s + y * c) for x, y in pts]

    if shape == "square":
        return [_polygon(4, r, rot + math.pi / 4)]
    if shape == "triangle":
        return [_polygon(3, r, rot - math.pi / 2)]
    if shape == "star":
        return [_polygon(5, r, rot - math.pi / 2, inner=0.42)]
    if shape == "cross":
        w = r * 0.33
        return [rotate([(-r, -w), (r, -w), (r, w), (-r, w)]), rotate([(-w, -r), (w, -r), (w, r), (-w, r)])]
    if shape == "arrow":
        return [
            rotate(
                [
                    (-r, -0.2 * r),
                    (0.2 * r, -0.2 * r),
                    (0.2 * r, -0.6 * r),
                    (r, 0),
                    (0.2 * r, 0.6 * r),
                    (0.2 * r, 0.2 * r),
                    (-r, 0.2 * r),
                ]
            )
        ]
    if shape == "line":
        return [rotate([(-r, -0.14 * r), (r, -0.14 * r), (r, 0.14 * r), (-r, 0.14 * r)])]
    if shape == "heart":
        return [
            rotate([(0, 0.95 * r), (-0.95 * r, -0.05 * r), (0, -0.05 * r)]),
            rotate([(0, 0.95 * r), (0.95 * r, -0.05 * r), (0, -0.05 * r)]),
        ]
    return []


def _draw_shape(
    shape: str,
    size: int,
    rng: np.random.Generator,
    colour: str | None = None,
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS),
) -> tuple[np.ndarray, str, str, str]:
    """`shape` in `colour` (drawn from COLOURS when None) on one of `backgrounds`."""
    from PIL import Image, ImageDraw

    ss = 4  # draw at 4x and downsample: anti-aliased edges like a real photo
    big = size * ss
    bg_name = rng.choice(list(backgrounds))
    fg_name = rng.choice(list(COLOURS)) if colour is None else colour
    bg = np.array(BACKGROUNDS[bg_name], dtype=np.float64)
    img = Image.new("RGB", (big, big), tuple(int(v) for v in bg))
    draw = ImageDraw.Draw(img)
    # clutter: a few small faint dots that are not the object
    for _ in range(int(rng.integers(0, 4))):
        x, y = rng.uniform(0, big, 2)
        rad = rng.uniform(0.5, 1.5) * ss
        col = tuple(int(v) for v in np.clip(bg + rng.uniform(-60, 60, 3), 0, 255))
        draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=col)
    scale = rng.uniform(0.55, 0.95)
    size_word = "small" if scale < 0.7 else ("large" if scale > 0.85 else "")
    r = scale * big / 2 * 0.8
    cx, cy = big / 2 + rng.uniform(-1, 1, 2) * (big / 2 - r) * 0.9
    rot = rng.uniform(0, 2 * math.pi)
    fg = COLOURS.get(fg_name) or COLOURS100[fg_name]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
        ri = r * 0.55
        draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=tuple(int(v) for v in bg))
    elif shape == "crescent":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
        ox, oy = 0.45 * r * math.cos(rot), 0.45 * r * math.sin(rot)
        draw.ellipse(
            [cx + ox - r * 0.85, cy + oy - r * 0.85, cx + ox + r * 0.85, cy + oy + r * 0.85],
            fill=tuple(int(v) for v in bg),
        )
    else:
        for poly in _shape_points(shape, r, rot):
            draw.polygon([(cx + x, cy + y) for x, y in poly], fill=fg)
        if shape == "heart":
            for sx in (-1, 1):
                lx, ly = 0.45 * r * sx, -0.25 * r
                c, s = math.cos(rot), math.sin(rot)
                px, py = lx * c - ly * s, lx * s + ly * c
                rr = 0.5 * r
                draw.ellipse([cx + px - rr, cy + py - rr, cx + px + rr, cy + py + rr], fill=fg)
    arr = np.asarray(img.resize((size, size), Image.LANCZOS), dtype=np.float64)
    arr += rng.normal(0, rng.uniform(0, 8), arr.shape)  # sensor noise
    return np.clip(arr, 0, 255).astype(np.uint8), fg_name, bg_name, size_word


def _shape_caption(shape: str, colour: str, bg: str, size_word: str, rng: np.random.Generator) -> str:
    if rng.random() < 0.7:
        return str(rng.choice(TEMPLATES["shapes"] + ("the {}.", "an image of a {}."))).format(shape)
    desc = " ".join(w for w in (size_word, colour, shape) if w)
    form = str(rng.choice(("a {} on a {} background.", "a photo of a {} on {}.", "a {}.")))
    return form.format(desc, bg) if form.count("{}") == 2 else form.format(desc)


def _split(
    n: int,
    size: int,
    rng: np.random.Generator,
    per_class: bool,
    n_classes: int,
    draw: Callable[[int, int, np.random.Generator], tuple[np.ndarray, str]],
) -> Split:
    """`n` images per class (`per_class`) or `n` of random classes, each drawn with its caption
    by `draw(label, size, rng)` from the one stream `rng`."""
    labels = np.repeat(np.arange(n_classes), n) if per_class else rng.integers(0, n_classes, n)
    imgs, caps = [], []
    for lab in labels:
        img, cap = draw(int(lab), size, rng)
        imgs.append(img)
        caps.append(cap)
    return Split(np.stack(imgs), labels.astype(np.int64), tuple(caps))


def _splits(name: str, classnames: tuple[str, ...], seed: int, size: int, sizes: tuple[int, int, int], draw) -> Dataset:
    n_train, n_few, n_test = sizes
    # separate streams per split: changing one size never changes the others' images
    train = _split(n_train, size, np.random.default_rng([seed, 1]), False, len(classnames), draw)
    few = _split(n_few, size, np.random.default_rng([seed, 2]), True, len(classnames), draw)
    test = _split(n_test, size, np.random.default_rng([seed, 3]), True, len(classnames), draw)
    return Dataset(name, classnames, TEMPLATES[name], train, few, test)


def _shape_pair(label: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    img, colour, bg, size_word = _draw_shape(SHAPES[label], size, rng)
    return img, _shape_caption(SHAPES[label], colour, bg, size_word, rng)


def _shapes(seed: int, size: int, sizes: tuple[int, int, int]) -> Dataset:
    return _splits("shapes", SHAPES, seed, size, sizes, _shape_pair)


def _shape100_caption(colour: str, shape: str, bg: str, size_word: str, rng: np.random.Generator) -> str:
    """Mostly the class name in a template; some name the size and background too."""
    name = f"{colour} {shape}"
    if rng.random() < 0.7:
        return str(rng.choice(TEMPLATES["shapes100"])).format(name)
    desc = " ".join(w for w in (size_word, name) if w)
    return str(rng.choice(("a {} on a {} background.", "a photo of a {} on {}."))).format(desc, bg)


def _shape100_pair(label: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    colours = list(COLOURS100)
    shape, colour = SHAPES[label // len(colours)], colours[label % len(colours)]
    img, _, bg, size_word = _draw_shape(shape, size, rng, colour, SHAPES100_BACKGROUNDS)
    return img, _shape100_caption(colour, shape, bg, size_word, rng)


def _shapes100(seed: int, size: int, sizes: tuple[int, int, int]) -> Dataset:
    return _splits("shapes100", SHAPES100, seed, size, sizes, _shape100_pair)


# --- digits ------------------------------------------------------------------------------------


def _render_digit(glyph: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """An 8x8 sklearn glyph, upsampled, drawn white-ish on a dark canvas at random scale/position."""
    from PIL import Image

    side = int(rng.integers(int(size * 0.6), int(size * 0.9) + 1))
    g = Image.fromarray((glyph / 16.0 * 255).astype(np.uint8)).resize((side, side), Image.BICUBIC)
    canvas = np.zeros((size, size), dtype=np.float64)
    x, y = rng.integers(0, size - side + 1, 2)
    canvas[y : y + side, x : x + side] = np.asarray(g, dtype=np.float64)
    tint = rng.uniform(0.8, 1.0, 3)
    bg = rng.uniform(0, 40)
    rgb = bg + canvas[..., None] * tint[None, None, :] * (255 - bg) / 255
    rgb += rng.normal(0, 4, rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _digit_caption(label: int, rng: np.random.Generator) -> str:
    return str(rng.choice(TEMPLATES["digits"] + (f"a handwritten {label}.", "the number {}."))).format(DIGITS[label])


def _digits(seed: int, size: int, sizes: tuple[int, int, int]) -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    glyphs, targets = d.images, d.target.astype(np.int64)
    rng = np.random.default_rng([seed, 0])
    n_train, n_few, n_test = sizes
    train_idx, few_idx, test_idx = [], [], []
    for c in range(10):  # per-class split of the 1,797 real glyphs: no glyph is in two splits
        idx = rng.permutation(np.flatnonzero(targets == c))
        few_idx += idx[:n_few].tolist()
        test_idx += idx[n_few : n_few + n_test].tolist()
        train_idx += idx[n_few + n_test :].tolist()

    def split(index: list[int], n: int | None, r: np.random.Generator) -> Split:
        chosen = np.asarray(index) if n is None else r.choice(index, size=n, replace=True)
        imgs = np.stack([_render_digit(glyphs[i], size, r) for i in chosen])
        labels = targets[chosen]
        return Split(imgs, labels, tuple(_digit_caption(int(y), r) for y in labels))

    # train renders each glyph many times at new scales and positions
    return Dataset(
        "digits",
        DIGITS,
        TEMPLATES["digits"],
        train=split(train_idx, n_train, np.random.default_rng([seed, 1])),
        fewshot=split(few_idx, None, np.random.default_rng([seed, 2])),
        test=split(test_idx, None, np.random.default_rng([seed, 3])),
    )
