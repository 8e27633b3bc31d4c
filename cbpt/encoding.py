"""The frozen image tower as the method drives it: uint8 or [0, 1] pixels in, unit fp32
features out on the model's device, never more than `batch` images through it at once.

Shots are kept as uint8 pixels on the host (the model's resize and crop, as PIL leaves them)
and turned into floats one batch at a time, so a pass over 1,000 classes of shots costs a
batch of activations, not the whole set (docs/scale.md#memory).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Encode = Callable[[torch.Tensor], torch.Tensor]  # [0, 1] pixels on the device -> unit features
# (a batch of [0, 1] pixels on the device, the batch's row indices into the shots) -> pixels to encode
View = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def to_x01(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels to floats in [0, 1]: the very numbers torchvision's ToTensor gives. Float
    pixels are taken to be in [0, 1] already."""
    return pixels.to(torch.float32).div(255) if pixels.dtype == torch.uint8 else pixels


@dataclass(frozen=True)
class ImageEncoder:
    """`encode` with the batching and the device move done once, here."""

    encode: Encode
    device: torch.device = torch.device("cpu")
    batch: int = 128

    def load(self, pixels: torch.Tensor) -> torch.Tensor:
        """A batch of shots on the device, as [0, 1] floats."""
        return to_x01(pixels.to(self.device))

    def __call__(self, x01: torch.Tensor) -> torch.Tensor:
        """One batch, with gradients: the caller keeps it small (trigger inversion's steps)."""
        return self.encode(x01.to(self.device))

    @torch.no_grad()
    def all(self, pixels: torch.Tensor, rows: torch.Tensor | None = None, view: View | None = None) -> torch.Tensor:
        """Features of `pixels[rows]` (every row when None) in order, `view` applied to each
        batch first (a trigger, an augmentation), `batch` images at a time."""
        rows = torch.arange(pixels.shape[0]) if rows is None else rows
        out = []
        for i in range(0, rows.shape[0], self.batch):
            idx = rows[i : i + self.batch]
            x = self.load(pixels[idx])
            out.append(self.encode(view(x, idx) if view is not None else x))
        return torch.cat(out)
