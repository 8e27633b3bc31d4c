"""The image encoder as ONNX (torch's exporter), with the zero-shot head appended."""

from __future__ import annotations

import io
import warnings

import onnx
import torch

from export.graphs import OPSET, HeadSpec, attach_head


class _Encoder(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)


def export_encoder(clip) -> onnx.ModelProto:
    """pixel_values [N, 3, H, W] (preprocessed) -> image_features [N, D] (open_clip's
    `encode_image`, before normalisation)."""
    size = clip.info.image_size
    dummy = torch.zeros(2, 3, size, size, device=next(clip.model.parameters()).device)
    buf = io.BytesIO()
    # With no gradients anywhere, torch routes attention pooling (RN50's attnpool) to a fused
    # kernel that has no ONNX export; tracing with gradients on keeps the exportable path.
    params = list(clip.model.parameters())
    was = [p.requires_grad for p in params]
    with warnings.catch_warnings(), torch.enable_grad():
        warnings.simplefilter("ignore")
        clip.model.requires_grad_(True)
        try:
            torch.onnx.export(
                _Encoder(clip.model).eval(),
                (dummy,),
                buf,
                input_names=["pixel_values"],
                output_names=["image_features"],
                dynamic_axes={"pixel_values": {0: "batch"}, "image_features": {0: "batch"}},
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        finally:
            for p, w in zip(params, was):
                p.requires_grad_(w)
    return onnx.load_from_string(buf.getvalue())


def export_classifier(clip, head: HeadSpec) -> onnx.ModelProto:
    return attach_head(export_encoder(clip), head)
