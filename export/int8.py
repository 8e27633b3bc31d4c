"""int8 twins of the classifier for CPU fleets: static QDQ quantisation with onnxruntime's own
tools, calibrated on the defender's clean shots and their triggered copies (so the trigger
alarm's region stays resolved), checked against the fp32 graph on other images.

Only the matrix products and convolutions are quantised (int8 weights per channel, uint8
activations); LayerNorm, softmax, the feature normalisation and the zero-shot head itself stay
in float. A graph under `AGREEMENT_BAR` top-1 agreement with fp32 is refused (docs/export.md#int8---int8).
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from cbpt.metrics import auroc
from cbpt_guard.artifacts import ort_session
from cbpt_guard.errors import UserError

CALIBRATION_LIMIT = 512  # shots per role (calibrate, check): a sample, spread over the classes
AGREEMENT_BAR = 0.99
QUANTISED_OPS = ("MatMul", "Gemm", "Conv")
OP_SETS = (QUANTISED_OPS, ("MatMul", "Gemm"))  # tried in turn: the first that keeps the bar is written
CALIBRATION_BATCH = 16


@dataclass(frozen=True)
class Int8Inputs:
    """Preprocessed pixel_values: what calibrates the graph, and what checks it (never the same images)."""

    calibration: np.ndarray  # clean shots and their triggered copies
    clean: np.ndarray  # other clean images
    triggered: np.ndarray  # the same images with the inverted trigger


@dataclass(frozen=True)
class Int8Check:
    top1_agreement: float  # on the clean check images, against the fp32 graph
    max_abs_probs: float
    trigger_auroc_int8: float  # clean vs triggered check images, by trigger score
    trigger_auroc_fp32: float
    n_clean: int
    n_triggered: int
    n_calibration: int


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over an array."""

    def __init__(self, x: np.ndarray):
        self.batches = iter([x[i : i + CALIBRATION_BATCH] for i in range(0, len(x), CALIBRATION_BATCH)])

    def get_next(self) -> dict | None:
        batch = next(self.batches, None)
        return None if batch is None else {"pixel_values": batch}

    def rewind(self) -> None:  # part of the protocol; one pass is all quantize_static needs
        pass


def quantise(fp32: bytes, calibration: np.ndarray, ops: tuple[str, ...] = QUANTISED_OPS) -> bytes:
    """The classifier with `ops` quantised, calibrated on `calibration` (min-max)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = onnx.load_from_string(fp32)
    head = [n.name for n in model.graph.node if n.name.startswith("head/")]  # the zero-shot head stays float
    with tempfile.TemporaryDirectory(prefix="cbpt-int8-") as tmp:
        raw, src, dst = Path(tmp) / "raw.onnx", Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        raw.write_bytes(fp32)
        # onnxruntime's own pre-pass (shape inference, fusions): +13% int8 speed on ViT-B-32 here
        quant_pre_process(str(raw), str(src), skip_symbolic_shape=True)
        quantize_static(
            str(src),
            str(dst),
            _Reader(calibration),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(ops),
            nodes_to_exclude=head,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        return dst.read_bytes()


def _run(session, x: np.ndarray) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    outs = [session.run(None, {"pixel_values": x[i : i + 32]}) for i in range(0, len(x), 32)]
    return {n: np.concatenate([o[k] for o in outs]) for k, n in enumerate(names)}


def check(fp32: bytes, int8: bytes, inputs: Int8Inputs) -> Int8Check:
    a, b = ort_session(fp32), ort_session(int8)
    clean32, clean8 = _run(a, inputs.clean), _run(b, inputs.clean)
    trig32, trig8 = _run(a, inputs.triggered), _run(b, inputs.triggered)
    scores = "trigger_score" in clean32
    return Int8Check(
        top1_agreement=float((clean32["probs"].argmax(1) == clean8["probs"].argmax(1)).mean()),
        max_abs_probs=float(np.abs(clean32["probs"] - clean8["probs"]).max()),
        trigger_auroc_int8=auroc(clean8["trigger_score"], trig8["trigger_score"]) if scores else float("nan"),
        trigger_auroc_fp32=auroc(clean32["trigger_score"], trig32["trigger_score"]) if scores else float("nan"),
        n_clean=len(inputs.clean),
        n_triggered=len(inputs.triggered),
        n_calibration=len(inputs.calibration),
    )


def int8_twin(fp32: bytes, inputs: Int8Inputs) -> tuple[bytes, dict]:
    """The quantised classifier and its check. The convolutions (a ResNet's whole tower, a
    ViT's patch embedding) are quantised only where that keeps the bar; otherwise they stay in
    float (docs/export.md#int8---int8). Refused, nothing written, when neither keeps it."""
    tried = []
    for ops in OP_SETS:
        int8 = quantise(fp32, inputs.calibration, ops)
        result = check(fp32, int8, inputs)
        if result.top1_agreement >= AGREEMENT_BAR:
            return int8, {**asdict(result), "agreement_bar": AGREEMENT_BAR, "quantised_ops": list(ops)}
        tried.append(f"{result.top1_agreement:.1%} with {', '.join(ops)} in int8")
    raise UserError(
        f"the int8 classifier agrees with fp32 on {' and '.join(tried)} of {result.n_clean} held-out "
        f"images, under the {AGREEMENT_BAR:.0%} bar; nothing was written",
        "export without --int8 (this model does not quantise well)",
    )


def int8_inputs(clip, pixels, trigger, held_pixels=None, limit: int = CALIBRATION_LIMIT) -> Int8Inputs:
    """From the defender's shots (`pixels`, [N, 3, H, W], uint8 or [0, 1]) and the inverted
    trigger: every other shot and its triggered copy calibrate; the rest, and any held-out
    shots, check (clean and triggered). At most `limit` shots of each, spread over the set:
    calibration needs a sample, not 1,000 classes of shots in memory."""
    import torch

    from cbpt.encoding import to_x01
    from cbpt.model import normalise_pixels

    pp = clip.preprocess_cfg
    trigger = trigger.to("cpu")

    def spread(n: int) -> torch.Tensor:
        """At most `limit` of n rows, evenly spread."""
        return torch.arange(n) if n <= limit else torch.linspace(0, n - 1, limit).round().long()

    def normalised(x: torch.Tensor) -> np.ndarray:
        return normalise_pixels(x, pp["mean"], pp["std"]).numpy().astype(np.float32)

    n = pixels.shape[0]
    even, odd = torch.arange(0, n, 2), torch.arange(1, n, 2)
    n_held = 0 if held_pixels is None else held_pixels.shape[0]
    pick = spread(len(odd) + n_held)  # over the odd shots, then the held-out ones
    with torch.no_grad():
        fit = to_x01(pixels[even[spread(len(even))]])
        parts = [pixels[odd[pick[pick < len(odd)]]]]
        if n_held:
            parts.append(held_pixels[pick[pick >= len(odd)] - len(odd)])
        check = to_x01(torch.cat(parts))
        return Int8Inputs(
            calibration=normalised(torch.cat([fit, trigger.apply(fit)])),
            clean=normalised(check),
            triggered=normalised(trigger.apply(check)),
        )
