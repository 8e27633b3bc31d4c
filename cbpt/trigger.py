"""The dummy trigger CBPT inverts: a mask and pattern (with an optional bounded additive
perturbation), or a smooth warp. Pure tensor functions in pixel space, before normalisation.

    T(x) = clip((1 - m) * warp(x) + m * p + delta, 0, 1)

docs/method.md#the-dummy-trigger
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

import torch
import torch.nn.functional as F


class TriggerKind(StrEnum):
    """What an inversion restart searched: a mask and pattern, or a smooth warp."""

    MASK = "mask"
    WARP = "warp"


@dataclass(frozen=True)
class DummyTrigger:
    mask: torch.Tensor  # [H, W] in [0, 1]
    pattern: torch.Tensor  # [3, H, W] in [0, 1]
    delta: torch.Tensor  # [3, H, W], |delta| <= eps
    flow: torch.Tensor | None = None  # [H, W, 2] (dy, dx) displacement in pixels, applied first
    kind: TriggerKind = TriggerKind.MASK

    @classmethod
    def blank(
        cls,
        h: int,
        w: int,
        kind: TriggerKind = TriggerKind.MASK,
        flow: torch.Tensor | None = None,
        delta: torch.Tensor | None = None,
    ) -> DummyTrigger:
        """No mask, no pattern: the identity unless `flow` or `delta` says otherwise."""
        dev = flow.device if flow is not None else delta.device if delta is not None else None
        return cls(
            torch.zeros(h, w, device=dev),
            torch.zeros(3, h, w, device=dev),
            torch.zeros(3, h, w, device=dev) if delta is None else delta,
            flow,
            kind,
        )

    def to(self, device: torch.device | str) -> DummyTrigger:
        """The same trigger, its tensors on `device` (detached: a finished trigger)."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().to(device)

        return replace(
            self, mask=move(self.mask), pattern=move(self.pattern), delta=move(self.delta), flow=move(self.flow)
        )

    def apply(self, x01: torch.Tensor) -> torch.Tensor:
        if self.flow is not None:
            x01 = warp(x01, self.flow)
        return (x01 * (1 - self.mask) + self.mask * self.pattern + self.delta).clamp(0, 1)

    def greyed(self) -> DummyTrigger:
        """The same mask filled with mid-grey, no perturbation: what its shape alone does. A mask
        that draws a class (a ring) still flips shots so; a planted patch's region is nothing
        without its pattern (docs/method.md#shape-flip)."""
        return replace(self, pattern=torch.full_like(self.pattern, 0.5), delta=torch.zeros_like(self.delta))

    def shifted(self, dy: int, dx: int) -> DummyTrigger:
        """The same trigger rolled to another place: backdoor patches fire anywhere."""
        return replace(
            self,
            mask=torch.roll(self.mask, (dy, dx), (0, 1)),
            pattern=torch.roll(self.pattern, (dy, dx), (1, 2)),
            flow=None if self.flow is None else torch.roll(self.flow, (dy, dx), (0, 1)),
        )


def warp(x01: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Each output pixel (y, x) samples the input at (y + dy, x + dx), bilinearly."""
    if not bool(torch.isfinite(flow).all()):  # grid_sample's backward reads out of bounds on NaN
        raise FloatingPointError("the warp field is not finite")
    n, _, h, w = x01.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=x01.dtype, device=x01.device),
        torch.arange(w, dtype=x01.dtype, device=x01.device),
        indexing="ij",
    )
    gy = (ys + flow[..., 0]) * (2 / max(h - 1, 1)) - 1
    gx = (xs + flow[..., 1]) * (2 / max(w - 1, 1)) - 1
    grid = torch.stack([gx, gy], -1).expand(n, h, w, 2)  # grid_sample reads (x, y)
    return F.grid_sample(x01, grid, mode="bilinear", padding_mode="border", align_corners=True)


def smooth_flow(ctrl: torch.Tensor, h: int, w: int, max_shift: float) -> torch.Tensor:
    """A [2, k, k] control grid upsampled to a smooth [H, W, 2] field bounded by max_shift px."""
    up = F.interpolate(ctrl[None], size=(h, w), mode="bicubic", align_corners=True)[0]
    return (max_shift * torch.tanh(up)).permute(1, 2, 0)
