"""Backdoor triggers as pure numpy functions on uint8 images [N, H, W, 3].

A `Trigger` is its kind, JSON parameters and arrays (pattern, mask, warp field, code); saved
to `trigger.json` + `trigger.npz` it is re-applied bit-exactly. Randomness (a patch's
location) comes only from the `seed` passed to `apply`, so a triggered test set is
reproducible from the seed alone. Optimised patches (`trojvqa`, `badclip`) are computed by
`testbed.optimise` on the clean model and stored here like any other pattern.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# The testbed's attacks, the one list every command and benchmark reads. Fixed triggers are
# made here; optimised ones (`testbed.optimise`) are fitted on the clean model first.
FIXED = ("badnet", "blended", "wanet", "sig", "ssba")
OPTIMISED = ("trojvqa", "badclip")
ATTACKS = FIXED + OPTIMISED
LOCATIONS = ("random", "center", "corner")
PLACED = ("badnet", "badclip", "custom")  # patches whose place the attacker picks from LOCATIONS


@dataclass(frozen=True)
class Trigger:
    kind: str  # an ATTACKS name or "custom"
    params: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)

    def apply(self, images: np.ndarray, seed: int = 0, noise: bool = False) -> np.ndarray:
        """The triggered images (uint8). `noise=True` is WaNet's noise mode: a randomly
        perturbed warp that must NOT trigger the backdoor (trained with true captions)."""
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 [N, H, W, 3] images, got {images.dtype} {images.shape}")
        x = images.astype(np.float64) / 255.0
        rng = np.random.default_rng(seed)
        mode = self.params.get("mode")
        if mode == "patch":
            out = _paste(x, self.arrays["pattern"], self.params["location"], rng)
        elif mode == "blend":
            out = (1 - self.params["alpha"]) * x + self.params["alpha"] * _fit(self.arrays["pattern"], x.shape[1:3])
        elif mode == "warp":
            grid = self.arrays["grid"]
            if noise:
                grid = grid[None] + rng.uniform(-1, 1, (x.shape[0], *grid.shape)) * noise_jitter(x.shape[1])
            out = _warp(x, grid)
        elif mode == "additive":
            out = x + self.arrays["residual"][None]
        elif mode == "modulated":  # SSBA-like: a fixed code whose strength follows the content
            lum = x.mean(axis=-1, keepdims=True)
            out = x + self.params["eps"] * self.arrays["code"][None] * (0.5 + lum)
        else:
            raise ValueError(f"unknown trigger mode {mode!r}")
        return np.clip(np.rint(np.clip(out, 0, 1) * 255), 0, 255).astype(np.uint8)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        import io

        buf = io.BytesIO()
        np.savez(buf, **self.arrays)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "trigger.npz").write_bytes(buf.getvalue())
        (folder / "trigger.json").write_text(json.dumps({"kind": self.kind, "params": self.params}, indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> Trigger:
        folder = Path(folder)
        meta = json.loads((folder / "trigger.json").read_text())
        with np.load(folder / "trigger.npz") as z:
            arrays = {k: z[k] for k in z.files}
        return cls(kind=meta["kind"], params=meta["params"], arrays=arrays)


def _fit(pattern: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    if pattern.shape[:2] == tuple(hw):
        return pattern
    from PIL import Image

    img = Image.fromarray(np.clip(np.rint(pattern * 255), 0, 255).astype(np.uint8))
    return np.asarray(img.resize((hw[1], hw[0]), Image.BILINEAR), dtype=np.float64) / 255.0


def fixed_origin(location: str, image_hw: tuple[int, int], patch_hw: tuple[int, int]) -> tuple[int, int]:
    """Top-left pixel of a patch at a fixed `location`: "center", or "corner" (bottom right,
    one pixel in). Every paste of a fixed-place patch, fitted or applied, goes through here."""
    (h, w), (ph, pw) = image_hw, patch_hw
    if location == "center":
        return (h - ph) // 2, (w - pw) // 2
    if location == "corner":
        return max(0, h - ph - 1), max(0, w - pw - 1)
    raise ValueError(f"a fixed location is center or corner, got {location!r}")


def _paste(x: np.ndarray, pattern: np.ndarray, location: str, rng: np.random.Generator) -> np.ndarray:
    out = x.copy()
    n, h, w, _ = x.shape
    ph, pw = pattern.shape[:2]
    alpha = pattern[..., 3:4] if pattern.shape[-1] == 4 else np.ones((ph, pw, 1))
    rgb = pattern[..., :3]
    for i in range(n):
        if location == "random":
            top, left = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        else:
            top, left = fixed_origin(location, (h, w), (ph, pw))
        region = out[i, top : top + ph, left : left + pw]
        out[i, top : top + ph, left : left + pw] = (1 - alpha) * region + alpha * rgb
    return out


def noise_jitter(side: int) -> float:
    """WaNet's noise mode jitters every sampling point by up to 1 / side in the [-1, 1] grid
    coordinates of `grid_sample`, which is (side - 1) / (2 side) pixels, about half a pixel: a warp
    the model must learn to tell from the trigger's (docs/results.md#wanets-noise-mode)."""
    return (side - 1) / (2 * side)


def _warp(x: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Bilinear sampling of x at the (y, x) pixel coordinates in `grid` ([H,W,2] or [N,H,W,2])."""
    n, h, w, _ = x.shape
    g = np.broadcast_to(grid, (n, h, w, 2))
    ys, xs = np.clip(g[..., 0], 0, h - 1), np.clip(g[..., 1], 0, w - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy, wx = (ys - y0)[..., None], (xs - x0)[..., None]
    idx = np.arange(n)[:, None, None]
    top = x[idx, y0, x0] * (1 - wx) + x[idx, y0, x1] * wx
    bottom = x[idx, y1, x0] * (1 - wx) + x[idx, y1, x1] * wx
    return top * (1 - wy) + bottom * wy


# --- the attacks ----------------------------------------------------------------------------


def patch_size_for(image_size: int) -> int:
    return max(3, image_size // 8)


def badnet(image_size: int, seed: int, size: int | None = None, location: str = "random") -> Trigger:
    """A small high-contrast checkerboard, two colours drawn from `seed` (BadNets), `size` px
    (default image_size / 8), at `location`: random by default, where the original BadNets
    stamped a fixed corner."""
    k = patch_size_for(image_size) if size is None else size
    rng = np.random.default_rng([seed, 11])
    board = (np.indices((k, k)).sum(axis=0) % 2).astype(np.float64)
    colours = rng.uniform(0, 1, (2, 3))
    colours[0], colours[1] = np.clip(colours[0] + 0.5, 0, 1), np.clip(colours[1] - 0.5, 0, 1)
    pattern = colours[0] * board[..., None] + colours[1] * (1 - board[..., None])
    return Trigger("badnet", {"mode": "patch", "location": location, "size": k}, {"pattern": pattern})


def blended(image_size: int, seed: int, alpha: float = 0.2) -> Trigger:
    """A fixed random pattern blended over the whole image (Blended, alpha 0.2)."""
    pattern = np.random.default_rng([seed, 12]).uniform(0, 1, (image_size, image_size, 3))
    return Trigger("blended", {"mode": "blend", "alpha": alpha}, {"pattern": pattern})


def wanet(image_size: int, seed: int, k: int = 4, strength: float | None = None) -> Trigger:
    """A smooth warping field (WaNet): random k x k control flow, upsampled, bounded.

    `strength` is the mean displacement in pixels, by default image_size / 8 (4 px at 32 px),
    the least that takes (docs/results.md#testbed-settings)."""
    strength = image_size / 8 if strength is None else strength
    from PIL import Image

    rng = np.random.default_rng([seed, 13])
    ctrl = rng.uniform(-1, 1, (k, k, 2))
    ctrl /= np.abs(ctrl).mean()
    flow = np.stack(
        [
            np.asarray(
                Image.fromarray(ctrl[..., c].astype(np.float32), mode="F").resize(
                    (image_size, image_size), Image.BICUBIC
                )
            )
            for c in range(2)
        ],
        -1,
    )
    yy, xx = np.meshgrid(np.arange(image_size), np.arange(image_size), indexing="ij")
    grid = np.stack([yy, xx], -1) + strength * flow.astype(np.float64)
    return Trigger("wanet", {"mode": "warp", "k": k, "strength": strength}, {"grid": grid})


def sig(image_size: int, seed: int, delta: float = 20 / 255, frequency: int = 6) -> Trigger:
    """A horizontal sinusoidal signal added to every image (SIG)."""
    cols = np.arange(image_size)
    wave = delta * np.sin(2 * np.pi * cols * frequency / image_size)
    residual = np.broadcast_to(wave[None, :, None], (image_size, image_size, 3)).copy()
    return Trigger("sig", {"mode": "additive", "delta": delta, "frequency": frequency}, {"residual": residual})


def ssba(image_size: int, seed: int, eps: float = 16 / 255) -> Trigger:
    """A sample-specific invisible residual (SSBA-like): a fixed high-frequency code whose
    amplitude follows each image's luminance, bounded by 1.5 * eps per pixel (PSNR ~ 28 dB,
    like StegaStamp's residuals); 16/255, the least that takes (docs/results.md#testbed-settings)."""
    code = np.sign(np.random.default_rng([seed, 14]).normal(0, 1, (image_size, image_size, 3)))
    return Trigger("ssba", {"mode": "modulated", "eps": eps}, {"code": code})


def custom(image: np.ndarray, mode: str, alpha: float = 1.0, location: str = "random") -> Trigger:
    """The user's own trigger image: pasted as a patch, or blended over the whole image."""
    if mode not in ("patch", "blend"):
        raise ValueError(f"trigger mode must be patch or blend, got {mode!r}")
    if location not in LOCATIONS:
        raise ValueError(f"location must be one of {', '.join(LOCATIONS)}, got {location!r}")
    pattern = image.astype(np.float64) / 255.0
    if mode == "patch":
        if alpha < 1 and pattern.shape[-1] == 3:
            pattern = np.concatenate([pattern, np.full(pattern.shape[:2] + (1,), alpha)], -1)
        return Trigger("custom", {"mode": "patch", "location": location, "alpha": alpha}, {"pattern": pattern})
    return Trigger("custom", {"mode": "blend", "alpha": alpha}, {"pattern": pattern[..., :3]})


def optimised_patch(kind: str, pattern: np.ndarray, location: str) -> Trigger:
    return Trigger(kind, {"mode": "patch", "location": location, "size": int(pattern.shape[0])}, {"pattern": pattern})
