"""The original prompts' zero-shot classifier: what a backdoored model is judged by, and what
CBPT's purified embeddings replace."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

# The seven templates OpenAI selected for ImageNet zero-shot, plus the plain CLIP prompt.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


@torch.no_grad()
def text_features(
    model: torch.nn.Module, tokenizer: Callable, texts: Sequence[str], batch_size: int = 256
) -> torch.Tensor:
    device = next(model.parameters()).device
    out = [
        _encode_tokens(model, tokenizer(list(texts[i : i + batch_size])).to(device))
        for i in range(0, len(texts), batch_size)
    ]
    return torch.cat(out)


def _encode_tokens(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's `encode_text`, cut at the longest caption's end token where the tower is
    open_clip's causal transformer pooling there (the same features; docs/scale.md#class-bounded-tuning,
    "Text length")."""
    from cbpt.prompts import encode_embedded, is_standard_text_tower

    if is_standard_text_tower(model) and getattr(model, "text_pool_type", "argmax") == "argmax":
        return encode_embedded(model, model.token_embedding(tokens), tokens.argmax(dim=-1))
    return model.encode_text(tokens, normalize=True)


@torch.no_grad()
def zeroshot_weights(
    model: torch.nn.Module, tokenizer: Callable, classnames: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES
) -> torch.Tensor:
    """C x D: per class, the normalised mean of its normalised template embeddings."""
    texts = [t.format(c) for c in classnames for t in templates]
    feats = text_features(model, tokenizer, texts).reshape(len(classnames), len(templates), -1)
    return F.normalize(feats.mean(dim=1), dim=-1)


@torch.no_grad()
def image_features(
    model: torch.nn.Module, images: torch.Tensor, batch_size: int = 64, progress: Callable[[int], None] | None = None
) -> torch.Tensor:
    out, device = [], next(model.parameters()).device
    for i in range(0, images.shape[0], batch_size):
        out.append(model.encode_image(images[i : i + batch_size].to(device), normalize=True))
        if progress:
            progress(min(batch_size, images.shape[0] - i))
    return torch.cat(out) if out else torch.empty(0)


def logits(features: torch.Tensor, weights: torch.Tensor, scale: float) -> torch.Tensor:
    return scale * F.normalize(features, dim=-1) @ weights.T
