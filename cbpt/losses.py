"""CBPT's losses as pure functions on tensors (docs/method.md#trigger-inversion, #prompt-tuning)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def class_logits(image_features: torch.Tensor, text_features: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * <f(x), g_c> for normalised image features [N, D] and class features [C, D]."""
    return scale * image_features @ text_features.T


def clean_loss(image_features, text_features, labels, scale: float) -> torch.Tensor:
    """L_clean: cross-entropy of the clean shots: keeps the model useful."""
    return F.cross_entropy(class_logits(image_features, text_features, scale), labels)


def trigger_loss(triggered_features, text_features, labels, scale: float, margin: float = 0.0) -> torch.Tensor:
    """L_trig: cross-entropy of the triggered shots against their TRUE labels: moves the
    decision boundary so that the backdoor region is classified correctly again. `margin`
    (in logits) is taken off the true class, so a shot keeps pulling until it wins by that
    much: the few shots' triggered features then clear the boundary with room to spare."""
    logits = class_logits(triggered_features, text_features, scale)
    if margin:
        logits = logits - margin * F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    return F.cross_entropy(logits, labels)


def away_loss(triggered_features, text_features, targets, scale: float, margin: float = 0.0) -> torch.Tensor:
    """L_away: -log(1 - p_target) of the triggered shots, the target's logit raised by `margin`:
    the copies pushed off their trigger's target, to whichever other class. A backdoor collapses
    every triggered image to one region of feature space, so sending each copy to its own class
    asks the head to separate classes by what is left of the image there; keeping the target
    from winning anywhere near that region asks one thing of one class (docs/method.md#prompt-tuning).
    Off unless push-off's gate opens (docs/method.md#push-off): elsewhere it settles the
    held-out check early (docs/results.md#pushed-off-the-target)."""
    logits = class_logits(triggered_features, text_features, scale)
    own = F.one_hot(targets, logits.shape[1]).bool()
    target = logits.gather(1, targets[:, None])[:, 0]
    others = logits.masked_fill(own, float("-inf")).logsumexp(1)
    return F.softplus(target + margin - others).mean()


def keep_loss(text_features: torch.Tensor, original_features: torch.Tensor) -> torch.Tensor:
    """L_keep: mean over classes of 1 - cos(g_c, g_c^0): stay near the hand-crafted prompts."""
    return (1 - (F.normalize(text_features, dim=-1) * F.normalize(original_features, dim=-1)).sum(-1)).mean()


def total_variation(mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels of a [H, W] mask, across and down:
    about (perimeter / area) times the mask's mean, so scattered pixels cost far more than one
    compact region of the same area (docs/method.md#mask-prior)."""
    return (mask[1:, :] - mask[:-1, :]).abs().mean() + (mask[:, 1:] - mask[:, :-1]).abs().mean()


def contrastive_inversion_loss(
    triggered: torch.Tensor, clean: torch.Tensor, tau: float, rows: int = 1024
) -> torch.Tensor:
    """InfoNCE for trigger inversion. Anchor i = f(T(x_i)); positives: the other triggered
    features f(T(x_j)), j != i (a backdoor maps every triggered image to one region);
    negatives: the clean features f(x_k) of the batch (the trigger must leave the clean
    manifold). Inputs are L2-normalised [B, D]; B >= 2. Anchors are taken `rows` at a time,
    so memory grows with B, not B^2 (a pass over every shot of 1,000 classes)."""
    b = triggered.shape[0]
    if b < 2:
        raise ValueError("contrastive inversion needs at least 2 images per batch")
    per_anchor = []
    for r0 in range(0, b, rows):
        anchors = triggered[r0 : r0 + rows]
        pos = anchors @ triggered.T / tau  # [R, B]
        neg = anchors @ clean.T / tau  # [R, B]
        own = torch.arange(r0, r0 + anchors.shape[0], device=triggered.device)
        eye = own[:, None] == torch.arange(b, device=triggered.device)[None, :]
        pos = pos.masked_fill(eye, float("-inf"))
        denom = torch.logsumexp(torch.cat([pos, neg], dim=1), dim=1, keepdim=True)  # [R, 1]
        log_prob = (pos - denom).masked_fill(eye, 0.0)
        per_anchor.append(-(log_prob.sum(dim=1) / (b - 1)))
    return torch.cat(per_anchor).mean()


def decision_kl(logits: torch.Tensor, original_logits: torch.Tensor, reduction: str = "batchmean") -> torch.Tensor:
    """KL(original predictions || current ones) from the two heads' logits [N, C]."""
    target = F.log_softmax(original_logits, dim=-1)
    return F.kl_div(F.log_softmax(logits, dim=-1), target, log_target=True, reduction=reduction)


def keep_kl_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, original_features: torch.Tensor, scale: float
) -> torch.Tensor:
    """L_keep, decision form: KL(original zero-shot predictions || current ones) on clean image
    features: keeps what the hand-crafted prompts decide, not merely where they point."""
    return decision_kl(
        class_logits(image_features, text_features, scale), class_logits(image_features, original_features, scale)
    )
