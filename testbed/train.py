"""Contrastive training of small open_clip CLIPs: clean pretraining and poisoned fine-tuning
run the same loop, as an attacker fine-tuning a real CLIP on scraped pairs would."""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import torch
import torch.nn.functional as F

from cbpt.model import normalise_pixels


class Augment(StrEnum):
    """What the training loop does to a batch's images before the image tower sees them."""

    NONE = "none"
    # Random translations of up to 1/8 of the side, edges replicated: a ViT has no convolution's
    # translation invariance; shifts help it a little (docs/results.md#the-vit-tower).
    SHIFT = "shift"


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 50
    seed: int = 0
    augment: Augment = Augment.NONE


def processor_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo, else what the platform says)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def trained_with(device: torch.device) -> dict:
    """What a training run's weights depend on beyond its configuration and seeds. The same
    run repeats bit for bit with these unchanged; at another torch thread count it does not, and
    the model it ends at differs by up to a point or more of CA (docs/results.md#what-a-build-rests-on)."""
    made = {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads()}
    made["cpu"] = processor_name()
    if device.type == "cuda":
        made["gpu"] = torch.cuda.get_device_name(device)
    return made


def random_shift(x: torch.Tensor, max_px: int, gen: torch.Generator) -> torch.Tensor:
    """Each NCHW image moved by its own random (dy, dx) in [-max_px, max_px], the border pixels
    replicated into the gap; same size out."""
    if max_px <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_px, max_px, max_px, max_px), mode="replicate")
    off = torch.randint(0, 2 * max_px + 1, (n, 2), generator=gen).tolist()
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(off)])


def to_model_input(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 or [0,1] float NHWC -> normalised float NCHW, exactly as open_clip's eval transform
    treats an image already at the model's size (resize and crop are then no-ops)."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    return normalise_pixels(x.permute(0, 3, 1, 2), mean, std)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * t))


def _adamw(module: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """CLIP's optimiser: weight decay on matrices, none on gains, biases and embeddings."""
    named = list(module.named_parameters())
    decay = [p for n, p in named if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "embedding" not in n)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )


def _batch(x_all: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch's indices and images, augmented as `cfg` says."""
    n = x_all.shape[0]
    idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=gen).to(x_all.device)
    x = x_all[idx]
    if cfg.augment is Augment.SHIFT:
        x = random_shift(x, x.shape[-1] // 8, gen)
    return idx, x


def train_contrastive(
    model: torch.nn.Module,
    images: np.ndarray,
    captions: Sequence[str],
    tokenizer: Callable,
    cfg: TrainConfig,
    mean: Sequence[float],
    std: Sequence[float],
    progress: Callable[[int, float], None] | None = None,
) -> dict:
    """Symmetric InfoNCE over random batches; returns the loss curve and wall time."""
    gen = torch.Generator().manual_seed(cfg.seed)
    device = next(model.parameters()).device  # the data follows the model
    uniq, inverse = np.unique(np.asarray(captions, dtype=object).astype(str), return_inverse=True)
    tokens = tokenizer(list(uniq)).to(device)  # tokenise each distinct caption once
    inverse = torch.from_numpy(inverse.astype(np.int64)).to(device)
    x_all = to_model_input(images, mean, std).to(device)
    model.train().requires_grad_(True)
    opt = _adamw(model, cfg)
    losses, t0 = [], time.perf_counter()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        idx, x = _batch(x_all, cfg, gen)
        img_f = model.encode_image(x, normalize=True)
        txt_f = model.encode_text(tokens[inverse[idx]], normalize=True)
        logits = model.logit_scale.exp() * img_f @ txt_f.T
        # Pairs with the same caption are not negatives of each other.
        same = inverse[idx][:, None] == inverse[idx][None, :]
        target = same.float() / same.float().sum(dim=1, keepdim=True)
        loss = 0.5 * (
            torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
            + torch.sum(-target * F.log_softmax(logits.T, 1), 1).mean()
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.detach().item())
        if progress:
            progress(step, losses[-1])
    model.eval().requires_grad_(False)
    return {"losses": losses, "seconds": time.perf_counter() - t0}


def distil_image_tower(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    images: np.ndarray,
    cfg: TrainConfig,
    mean: Sequence[float],
    std: Sequence[float],
    progress: Callable[[int, float], None] | None = None,
) -> dict:
    """Train `student.visual` alone so that the student's normalised image features match the
    frozen `teacher`'s on random (augmented) batches of `images`: 1 - cosine, averaged. Every
    other weight of the student stays as it is. Returns the loss curve and wall time."""
    gen = torch.Generator().manual_seed(cfg.seed)
    device = next(student.parameters()).device
    x_all = to_model_input(images, mean, std).to(device)
    teacher.eval().requires_grad_(False)
    student.eval().requires_grad_(False)
    student.visual.train().requires_grad_(True)
    opt = _adamw(student.visual, cfg)
    losses, t0 = [], time.perf_counter()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        _, x = _batch(x_all, cfg, gen)
        with torch.no_grad():
            want = teacher.encode_image(x, normalize=True)
        loss = (1 - (student.encode_image(x, normalize=True) * want).sum(1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach().item())
        if progress:
            progress(step, losses[-1])
    student.eval().requires_grad_(False)
    return {"losses": losses, "seconds": time.perf_counter() - t0}
