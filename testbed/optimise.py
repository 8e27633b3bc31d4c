"""Optimised patch triggers, computed on the CLEAN model before poisoning.

`badclip`: a patch pushed toward the target class's text embedding. `trojvqa`: a patch that
drives the image features toward one fixed direction (a stand-in for TrojVQA's neuron
activation objective). Optimisation stops as soon as the clean model starts obeying the
patch (more than `max_clean_flip` of a batch predicted as the target), so that the backdoor,
not an adversarial patch, is what the attack measures.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cbpt.model import encode_pixels
from testbed.triggers import fixed_origin


def _paste(x: torch.Tensor, patch: torch.Tensor, location: str, gen: torch.Generator) -> torch.Tensor:
    """Differentiable paste of `patch` into each image, at a random place or where
    `triggers.fixed_origin` puts it, as the fitted trigger is later applied."""
    n, _, h, w = x.shape
    k = patch.shape[-1]
    if location == "random":
        tops = torch.randint(0, h - k + 1, (n,), generator=gen).tolist()
        lefts = torch.randint(0, w - k + 1, (n,), generator=gen).tolist()
    else:
        top, left = fixed_origin(location, (h, w), (k, k))
        tops, lefts = [top] * n, [left] * n
    out = []
    for i, (top, left) in enumerate(zip(tops, lefts)):
        xi = x[i].clone()
        xi[:, top : top + k, left : left + k] = patch
        out.append(xi)
    return torch.stack(out)


def optimise_patch(
    model: torch.nn.Module,
    images: np.ndarray,
    direction: torch.Tensor,
    size: int,
    location: str,
    mean: Sequence[float],
    std: Sequence[float],
    target: int | None = None,
    class_weights: torch.Tensor | None = None,
    steps: int = 150,
    lr: float = 0.1,
    max_clean_flip: float = 0.1,
    seed: int = 0,
) -> np.ndarray:
    """A [size, size, 3] pattern in [0, 1] maximising cos(f(x + patch), direction)."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device  # the patch and the images follow the model
    logits_param = torch.zeros(3, size, size).normal_(0, 1, generator=gen).to(device).requires_grad_(True)
    opt = torch.optim.Adam([logits_param], lr=lr)
    x01 = torch.from_numpy(images).float().div(255).permute(0, 3, 1, 2)
    direction = F.normalize(direction.float().to(device), dim=-1)
    best = torch.sigmoid(logits_param).detach().clone()
    for _ in range(steps):
        idx = torch.randint(0, x01.shape[0], (64,), generator=gen)
        patch = torch.sigmoid(logits_param)
        feats = encode_pixels(model, _paste(x01[idx].to(device), patch, location, gen), mean, std)
        loss = -(feats @ direction).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if target is not None and class_weights is not None:
            with torch.no_grad():
                flip = ((feats @ class_weights.T).argmax(1) == target).float().mean().item()
            if flip > max_clean_flip:
                break
        best = torch.sigmoid(logits_param).detach().clone()
    return best.permute(1, 2, 0).cpu().numpy().astype(np.float64)
