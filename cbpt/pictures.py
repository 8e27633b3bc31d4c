"""Pictures a user looks at: the inverted trigger (mask, pattern, what it adds) and shots
with the trigger applied."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch

from cbpt.trigger import DummyTrigger


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """[3, H, W] or [H, W] in [0, 1] -> uint8 HxWx3."""
    arr = x.detach().clamp(0, 1).cpu().numpy()
    if arr.ndim == 2:
        arr = np.repeat(arr[None], 3, axis=0)
    return np.rint(arr.transpose(1, 2, 0) * 255).astype(np.uint8)


def trigger_png(
    trigger: DummyTrigger, shots: torch.Tensor, n_shots: int = 8, tile: int = 96, others: Sequence[DummyTrigger] = ()
) -> bytes:
    """One PNG: [mask | pattern | mask*pattern (both scaled to the mask's peak) | delta (if
    any)] above a row of clean shots and a row of the same shots with the trigger applied;
    then, for each of `others` (inverted warps, compact masks, blends, perturbations), its
    displacement, mask, blended pattern or perturbation and the shots with it applied."""
    from PIL import Image

    from cbpt.encoding import to_x01

    trigger, others = trigger.to("cpu"), [o.to("cpu") for o in others]
    # A backdoor's mask covers ~1-3% of the image at low opacity: scaled to its own maximum,
    # the user sees where it sits; the third tile shows what it really adds.
    peak = float(trigger.mask.max()) or 1.0
    top = [trigger.mask / peak, trigger.pattern, trigger.mask * trigger.pattern / peak]
    if float(trigger.delta.abs().max()) > 0:
        d = trigger.delta
        top.append(0.5 + d / (2 * float(d.abs().max())))
    idx = torch.linspace(0, shots.shape[0] - 1, min(n_shots, shots.shape[0])).round().long()
    clean = to_x01(shots[idx])
    rows = [top, list(clean), list(trigger.apply(clean))]
    for other in others:
        if other.flow is not None:  # displacement magnitude, scaled to its peak
            mag = other.flow.norm(dim=-1)
            first = mag / (float(mag.max()) or 1.0)
        elif float(other.mask.max() - other.mask.min()) > 1e-6:  # a mask, scaled to its peak like the first row's
            first = other.mask / float(other.mask.max())
        elif float(other.mask.max()) > 0:  # a blend, one opacity everywhere: what it adds
            first = other.mask * other.pattern / float(other.mask.max())
        else:
            first = 0.5 + other.delta / (2 * (float(other.delta.abs().max()) or 1.0))
        rows.append([first] + list(other.apply(clean))[: n_shots - 1])
    cols = max(len(r) for r in rows)
    canvas = Image.new("RGB", (cols * (tile + 4) + 4, len(rows) * (tile + 4) + 4), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            pic = Image.fromarray(_to_uint8(img)).resize((tile, tile), Image.NEAREST)
            canvas.paste(pic, (4 + c * (tile + 4), 4 + r * (tile + 4)))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()
