"""The export's own check: onnxruntime and PyTorch must agree on the same inputs."""

from __future__ import annotations

import numpy as np
import torch

from cbpt_guard.artifacts import is_fp16, ort_session
from cbpt_guard.errors import UserError
from export.graphs import HeadSpec

BATCHES = (1, 5)


def check_parity(clip, blobs: dict[str, bytes], head: HeadSpec, seed: int = 0) -> dict:
    """fp32 graphs: max |delta logits| <= 1e-4 x logit scale on random inputs at batch 1 and 5,
    else the export fails. fp16 graphs (`*_fp16.onnx`) have no such bound; their top-1
    agreement and max |delta probs| are reported, and only non-finite outputs fail them.
    """
    size = clip.info.image_size
    device = next(clip.model.parameters()).device  # the reference runs where the model is
    gen = torch.Generator().manual_seed(seed)
    scale = head.scale
    report: dict = {}
    for name, blob in blobs.items():
        half = is_fp16(name)
        sess = ort_session(blob, fp16=half)
        worst_logits, worst_probs, agree, n = 0.0, 0.0, 0, 0
        for batch in BATCHES:
            x = torch.randn(batch, 3, size, size, generator=gen)
            with torch.no_grad():
                f = clip.model.encode_image(x.to(device)).float().cpu()
            unit = torch.nn.functional.normalize(f, dim=-1).numpy()
            ref_logits = torch.from_numpy(head.logits(unit))
            ref_probs = ref_logits.softmax(-1).numpy()
            feed = {"pixel_values": x.numpy()} if name.startswith("classifier") else {"image_features": f.numpy()}
            out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
            if not all(np.isfinite(v).all() for v in out.values()):
                if half:
                    raise UserError(
                        f"parity check failed for {name}: non-finite outputs (fp16 overflow); nothing was written",
                        "export without --fp16",
                    )
                raise UserError(
                    f"parity check failed for {name}: non-finite outputs; nothing was written",
                    "check the model's weights and the class embeddings for NaN or inf",
                )
            worst_logits = max(worst_logits, float(np.abs(out["logits"] - ref_logits.numpy()).max()))
            worst_probs = max(worst_probs, float(np.abs(out["probs"] - ref_probs).max()))
            agree += int((out["logits"].argmax(1) == ref_logits.numpy().argmax(1)).sum())
            n += batch
            if head.centroids is not None:
                ref_t = head.trigger_score(unit)
                worst_logits = max(worst_logits, float(np.abs(out["trigger_score"] - ref_t).max()) * scale)
        entry = {
            "max_abs_logits": worst_logits,
            "max_abs_probs": worst_probs,
            "top1_agreement": agree / n,
            "tolerance": None if half else 1e-4 * scale,
            "batches": list(BATCHES),
            "inputs": n,
        }
        report[name] = entry
        if not half and worst_logits > 1e-4 * scale:
            raise UserError(
                f"parity check failed for {name}: max |delta logits| {worst_logits:.2e} exceeds "
                f"{1e-4 * scale:.2e} (1e-4 x logit scale); nothing was written",
                "report this model's architecture as a bug",
            )
    return report
