"""A suspicious CLIP, ready to use: weights loaded into the right open_clip model, frozen,
with its tokenizer and its own eval preprocessing."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cbpt.architecture import ArchSpec, build_model, resolve
from cbpt.checkpoint import Checkpoint, read_checkpoint
from cbpt.encoding import ImageEncoder
from cbpt.runtime import Runtime
from cbpt_guard.artifacts import sha256_file
from cbpt_guard.errors import UserError


@dataclass(frozen=True)
class ModelInfo:
    """What `cbpt-guard info` prints."""

    path: str
    format: str
    architecture: str
    arch_source: str
    candidates: tuple[str, ...]
    num_params: int
    embed_dim: int
    image_size: int
    context_length: int
    preprocess: dict

    def to_dict(self) -> dict:
        d = asdict(self)
        d["candidates"] = list(self.candidates)
        return d


@dataclass
class LoadedClip:
    model: torch.nn.Module  # eval mode, requires_grad False everywhere
    spec: ArchSpec
    info: ModelInfo
    checkpoint_sha256: str
    runtime: Runtime = Runtime()  # the model lives on runtime.device

    @property
    def preprocess_cfg(self) -> dict:
        return self.info.preprocess

    @property
    def templates(self) -> tuple[str, ...]:
        from cbpt.zeroshot import DEFAULT_TEMPLATES

        return self.spec.templates or DEFAULT_TEMPLATES

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().item())

    def tokenizer(self) -> Callable[[list[str]], torch.Tensor]:
        from open_clip.tokenizer import SimpleTokenizer

        return SimpleTokenizer(context_length=self.info.context_length)

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    def encode_pixels(self, x01: torch.Tensor) -> torch.Tensor:
        """Unit fp32 image features of pixels in [0, 1] ([N, 3, H, W] on the model's device,
        already at the model's size), the tower under the run's precision."""
        pp = self.preprocess_cfg
        with self.runtime.autocast():
            feats = encode_pixels(self.model, x01, pp["mean"], pp["std"])
        return feats.float()

    def encoder(self) -> ImageEncoder:
        """The image tower for passes over the shots, `runtime.encode_batch` images at a time."""
        return ImageEncoder(self.encode_pixels, self.device, self.runtime.encode_batch)

    def transform(self) -> Callable:
        """open_clip's own eval transform for this model (PIL image -> normalised tensor)."""
        from open_clip.transform import image_transform

        pp = self.preprocess_cfg
        return image_transform(
            pp["size"],
            is_train=False,
            mean=pp["mean"],
            std=pp["std"],
            resize_mode=pp["resize_mode"],
            interpolation=pp["interpolation"],
            fill_color=pp["fill_color"],
        )


def normalise_pixels(x01: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The last step of open_clip's eval transform: per-channel (x - mean) / std on [0, 1] pixels.
    Triggers live in pixel space, so every encoder call on a triggered image goes through here."""
    m = torch.tensor(mean, dtype=x01.dtype, device=x01.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x01.dtype, device=x01.device).view(1, 3, 1, 1)
    return (x01 - m) / s


def encode_pixels(
    model: torch.nn.Module, x01: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Unit image features of [0, 1] pixels, for a bare open_clip model (the testbed's training)."""
    return model.encode_image(normalise_pixels(x01, mean, std), normalize=True)


def inspect(path: str | Path, arch: str | None = None) -> ModelInfo:
    """Identify a checkpoint without materialising the model."""
    ckpt = read_checkpoint(path)
    info, _ = _identify(ckpt, arch)
    return info


def load_clip(path: str | Path, arch: str | None = None, runtime: Runtime | None = None) -> LoadedClip:
    """The checkpoint's model, frozen, on `runtime.device` (the CPU when None)."""
    runtime = runtime or Runtime()
    ckpt = read_checkpoint(path)
    info, spec = _identify(ckpt, arch)
    _require_finite(ckpt)
    model = build_model(spec)
    state = dict(ckpt.state_dict)
    if "logit_scale" in state:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:  # resolve() matched shapes, so this is a bug, not bad input
        raise UserError(f"internal: weights did not load cleanly (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.eval().requires_grad_(False).to(runtime.device)
    return LoadedClip(model=model, spec=spec, info=info, checkpoint_sha256=sha256_file(ckpt.path), runtime=runtime)


def _require_finite(ckpt: Checkpoint) -> None:
    """NaN or inf weights make every feature non-finite; refused before any work, they never
    reach the trigger inversion (where a NaN warp field crashed grid_sample's backward)."""
    bad = [k for k, v in ckpt.state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise UserError(
            f"{ckpt.path} holds non-finite weights (NaN or inf) in {len(bad)} tensor(s), first {bad[0]}",
            "the file is corrupt or the training diverged: re-export or re-download the checkpoint",
        )


def _identify(ckpt: Checkpoint, arch: str | None) -> tuple[ModelInfo, ArchSpec]:
    det = resolve(ckpt.state_dict, ckpt.path, ckpt.format, arch)
    meta = build_model(det.spec, device="meta")
    from open_clip import get_model_preprocess_cfg

    pp = dict(get_model_preprocess_cfg(meta))
    pp["mean"], pp["std"] = list(pp["mean"]), list(pp["std"])
    size = meta.visual.image_size
    info = ModelInfo(
        path=str(ckpt.path),
        format=ckpt.format,
        architecture=det.spec.name,
        arch_source="detected" if det.spec.source == "registry" else det.spec.source,
        candidates=det.candidates,
        num_params=sum(p.numel() for p in meta.parameters()),
        embed_dim=int(meta.visual.output_dim),
        image_size=int(size[0] if isinstance(size, (tuple, list)) else size),
        context_length=int(getattr(meta, "context_length", None) or meta.text.context_length),
        preprocess=pp,
    )
    return info, det.spec
