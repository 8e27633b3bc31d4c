"""Class-wise prompts over open_clip's text tower: `[v_c1 .. v_cM] [name of c] .`

Prompt assembly happens in one place (as CoOp's PromptLearner): each class's tokenised
"a photo of a {name}." is split into the start token, M context slots and the rest (name,
full stop, end token, padding). Only the context vectors are learned, one set per class;
initialised from the embedding of "a photo of a", they reproduce the original prompt's text
feature exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cbpt_guard.errors import UserError

INIT_PHRASE = "a photo of a"
_TEXT_PARTS = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection", "attn_mask")


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


class ClassPrompts(nn.Module):
    def __init__(
        self,
        model: nn.Module,
        tokenizer: Callable,
        classnames: Sequence[str],
        n_ctx: int = 4,
        init: str = INIT_PHRASE,
        seed: int = 0,
    ):
        super().__init__()
        check_text_tower(model)
        # Held outside nn.Module's registry: the frozen CLIP is not part of the learner, so
        # parameters() and state_dict() hold the context vectors alone.
        object.__setattr__(self, "model", model)
        init_len = len(tokenizer.encode(init)) if hasattr(tokenizer, "encode") else n_ctx
        tokens = tokenizer([f"{init} {c}." for c in classnames])  # [C, L]
        eot = tokens.argmax(dim=-1)  # the end token has the largest id
        if bool((tokens[:, -1] != 0).any()):
            raise UserError("a class name is too long for the model's context length", "shorten the class names")
        with torch.no_grad():
            emb = model.token_embedding(tokens).float()  # [C, L, W]
        width = emb.shape[-1]
        if n_ctx == init_len:
            ctx = emb[:, 1 : 1 + n_ctx].clone()
        else:  # the init phrase does not fit: start from small random vectors (CoOp's choice)
            gen = torch.Generator().manual_seed(seed)
            ctx = torch.randn(len(classnames), n_ctx, width, generator=gen) * 0.02
        self.n_ctx = n_ctx
        self.ctx = nn.Parameter(ctx)  # [C, M, W]: one set per class
        self.register_buffer("prefix", emb[:, :1].clone(), persistent=False)
        # The suffix always starts right after the init phrase's tokens.
        suffix = emb[:, 1 + init_len :]
        self.register_buffer("suffix", suffix.clone(), persistent=False)
        # Re-tokenised positions: the end token shifts by (n_ctx - init_len).
        self.register_buffer("eot", (eot + (n_ctx - init_len)).clone(), persistent=False)
        self.context_length = tokens.shape[1]
        if int(self.eot.max()) >= self.context_length:
            raise UserError(
                f"{n_ctx} context vectors and the longest class name exceed the model's "
                f"{self.context_length}-token context",
                "use fewer context vectors or shorter names",
            )

    def forward(self, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised class text features [C, D] for the given (or learned) context."""
        m = self.model
        ctx = self.ctx if ctx is None else ctx
        x = torch.cat([self.prefix, ctx, self.suffix], dim=1)[:, : self.context_length]
        if x.shape[1] < self.context_length:  # fewer context vectors than the init phrase: pad
            pad = self.suffix[:, -1:].expand(-1, self.context_length - x.shape[1], -1)
            x = torch.cat([x, pad], dim=1)
        x = x + m.positional_embedding.to(x.dtype)
        x = m.transformer(x, attn_mask=m.attn_mask)
        x = m.ln_final(x)
        x = x[torch.arange(x.shape[0]), self.eot]
        x = m.text_projection(x) if isinstance(m.text_projection, nn.Linear) else x @ m.text_projection
        return F.normalize(x, dim=-1)
