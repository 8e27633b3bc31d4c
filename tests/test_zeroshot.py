"""The original prompts' zero-shot classifier on a loaded model."""

from __future__ import annotations

import pytest
import torch

from cbpt.model import load_clip
from cbpt.zeroshot import image_features, logits, zeroshot_weights
from tests.helpers import save_tiny_model


def test_zeroshot_weights_average_templates_and_are_unit_norm(tmp_path):
    clip = load_clip(save_tiny_model(tmp_path / "m"))
    tok = clip.tokenizer()
    w = zeroshot_weights(clip.model, tok, ["circle", "square", "star"], ["a photo of a {}.", "a {}."])
    assert w.shape == (3, 32)
    assert torch.allclose(w.norm(dim=-1), torch.ones(3), atol=1e-6)
    one = zeroshot_weights(clip.model, tok, ["circle"], ["a photo of a {}."])
    direct = clip.model.encode_text(tok(["a photo of a circle."]), normalize=True)
    assert torch.allclose(one, direct, atol=1e-6)


def test_logits_use_the_models_scale(tmp_path):
    clip = load_clip(save_tiny_model(tmp_path / "m"))
    w = zeroshot_weights(clip.model, clip.tokenizer(), ["a", "b"], clip.templates)
    f = image_features(clip.model, torch.randn(5, 3, 32, 32), batch_size=2)
    out = logits(f, w, clip.logit_scale)
    assert out.shape == (5, 2) and clip.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)  # open_clip's init
    cos = torch.nn.functional.cosine_similarity(f[:, None, :], w[None, :, :], dim=-1)
    assert torch.allclose(out, clip.logit_scale * cos, atol=1e-4)
    assert torch.allclose(logits(f, w, 2.0), 2.0 * cos, atol=1e-6)
    assert clip.templates == ("a photo of a {}.",)  # from the sidecar
