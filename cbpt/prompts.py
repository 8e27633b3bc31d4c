"""Class-wise prompts over open_clip's text tower: `[v_c1 .. v_cM] [name of c] .`

Prompt assembly happens in one place (as CoOp's PromptLearner): each class's tokenised
"a photo of a {name}." is split into the start token, M context slots and the rest (name,
full stop, end token, padding). Only the context vectors are learned, one set per class;
initialised from the embedding of "a photo of a", they reproduce the original prompt's text
feature exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from cbpt_guard.errors import UserError

INIT_PHRASE = "a photo of a"
_TEXT_PARTS = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection", "attn_mask")


def is_standard_text_tower(model: nn.Module) -> bool:
    """open_clip's built-in text transformer, with a causal mask: what prompts can drive."""
    return all(getattr(model, p, None) is not None for p in _TEXT_PARTS)


def check_text_tower(model: nn.Module) -> None:
    """Fail at once, with the reason, for a model whose text tower prompts cannot drive."""
    missing = [p for p in _TEXT_PARTS if getattr(model, p, None) is None]
    if missing:
        raise UserError(
            f"this model's text tower is not open_clip's standard transformer (no {', '.join(missing)})",
            "CBPT needs a CLIP with open_clip's built-in text encoder (ViT-*, RN*, testbed models)",
        )
    pool = getattr(model, "text_pool_type", "argmax")
    if pool not in ("argmax", "last"):
        raise UserError(
            f"text pooling '{pool}' is not supported by the prompt learner",
            "use a CLIP whose text tower pools at the end token",
        )


def encode_embedded(model: nn.Module, x: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
    """Unit text features of token embeddings `x` [B, L, W] pooled at `eot` [B]. The tower is
    causal and pools at the end token, so everything after the longest prompt's end token is
    cut off first: padding to the full context is work whose result no one reads."""
    if getattr(model, "text_pool_type", "argmax") == "argmax" and model.attn_mask is not None:
        length = int(eot.max()) + 1
        x, mask = x[:, :length], model.attn_mask[:length, :length]
    else:
        mask = model.attn_mask
    x = x + model.positional_embedding[: x.shape[1]].to(x.dtype)
    x = model.transformer(x, attn_mask=mask)
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), eot]
    x = model.text_projection(x) if isinstance(model.text_projection, nn.Linear) else x @ model.text_projection
    return F.normalize(x.float(), dim=-1)


class ClassPrompts(nn.Module):
    """One learned context per class; `forward(classes=S)` runs the text tower on those
    classes alone, so a tuning step costs what its classes cost, not what the label set does
    (docs/scale.md#class-bounded-tuning). Each class's context is its own parameter: an
    optimiser leaves a class no step reached exactly as it was."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Callable,
        classnames: Sequence[str],
        n_ctx: int = 4,
        init: str = INIT_PHRASE,
        seed: int = 0,
        autocast: Callable[[], AbstractContextManager] = nullcontext,
    ):
        super().__init__()
        check_text_tower(model)
        # Held outside nn.Module's registry: the frozen CLIP is not part of the learner, so
        # parameters() and state_dict() hold the context vectors alone.
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "autocast", autocast)
        device = model.token_embedding.weight.device
        init_len = len(tokenizer.encode(init)) if hasattr(tokenizer, "encode") else n_ctx
        tokens = tokenizer([f"{init} {c}." for c in classnames])  # [C, L]
        eot = tokens.argmax(dim=-1)  # the end token has the largest id
        if bool((tokens[:, -1] != 0).any()):
            raise UserError("a class name is too long for the model's context length", "shorten the class names")
        with torch.no_grad():
            emb = model.token_embedding(tokens.to(device)).float()  # [C, L, W]
        width = emb.shape[-1]
        if n_ctx == init_len:
            ctx = emb[:, 1 : 1 + n_ctx].clone()
        else:  # the init phrase does not fit: start from small random vectors (CoOp's choice)
            gen = torch.Generator().manual_seed(seed)
            ctx = (torch.randn(len(classnames), n_ctx, width, generator=gen) * 0.02).to(device)
        self.n_ctx = n_ctx
        self.vectors = nn.ParameterList([nn.Parameter(c) for c in ctx])  # C x [M, W]
        self.register_buffer("prefix", emb[:, :1].clone(), persistent=False)
        # The suffix always starts right after the init phrase's tokens.
        suffix = emb[:, 1 + init_len :]
        self.register_buffer("suffix", suffix.clone(), persistent=False)
        # Re-tokenised positions: the end token shifts by (n_ctx - init_len).
        self.register_buffer("eot", (eot + (n_ctx - init_len)).to(device), persistent=False)
        self.context_length = tokens.shape[1]
        if int(self.eot.max()) >= self.context_length:
            raise UserError(
                f"{n_ctx} context vectors and the longest class name exceed the model's "
                f"{self.context_length}-token context",
                "use fewer context vectors or shorter names",
            )

    @property
    def num_classes(self) -> int:
        return len(self.vectors)

    def snapshot(self) -> torch.Tensor:
        """Every class's context [C, M, W], detached: a checkpoint."""
        return torch.stack([v.detach() for v in self.vectors]).clone()

    @torch.no_grad()
    def restore(self, ctx: torch.Tensor) -> None:
        for v, c in zip(self.vectors, ctx):
            v.copy_(c)

    def forward(self, ctx: torch.Tensor | None = None, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised text features [len(classes), D] of `classes` (all when None) for the given
        context [C, M, W] (a checkpoint) or the learned one."""
        rows = torch.arange(self.num_classes) if classes is None else classes.cpu()
        if ctx is None:
            picked = torch.stack([self.vectors[i] for i in rows.tolist()])
        else:
            picked = ctx[rows.to(ctx.device)]
        on = rows.to(self.prefix.device)
        x = torch.cat([self.prefix[on], picked, self.suffix[on]], dim=1)[:, : self.context_length]
        if x.shape[1] < self.context_length:  # fewer context vectors than the init phrase: pad
            pad = self.suffix[on][:, -1:].expand(-1, self.context_length - x.shape[1], -1)
            x = torch.cat([x, pad], dim=1)
        with self.autocast():
            return encode_embedded(self.model, x, self.eot[on])

    @torch.no_grad()
    def features(self, ctx: torch.Tensor | None = None, chunk: int = 256) -> torch.Tensor:
        """Every class's feature [C, D], `chunk` classes through the text tower at a time."""
        return torch.cat(
            [self(ctx, torch.arange(i, min(i + chunk, self.num_classes))) for i in range(0, self.num_classes, chunk)]
        )
