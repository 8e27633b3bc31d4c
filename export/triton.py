"""A Triton model repository for both graphs (onnxruntime backend, dynamic batching,
labels for the classification extension)."""

from __future__ import annotations

from cbpt_guard.artifacts import CLASSIFIER, HEAD, classes_text, fp16_name, int8_name

MAX_BATCH = 64
# Every model an export may write: the repository's folders of these names are ours to replace.
MODEL_NAMES = ("cbpt_head", "cbpt_classifier", "cbpt_head_fp16", "cbpt_classifier_fp16", "cbpt_classifier_int8")


def _tensor(name: str, dims: list[int], labels: bool = False, reshape_scalar: bool = False) -> str:
    parts = [f'name: "{name}"', "data_type: TYPE_FP32", f"dims: [ {', '.join(map(str, dims))} ]"]
    if reshape_scalar:  # an [N] output: Triton wants a non-batch dim, reshaped away
        parts.append("reshape: { shape: [ ] }")
    if labels:
        parts.append('label_filename: "labels.txt"')
    return "  {\n    " + "\n    ".join(parts) + "\n  }"


def config_pbtxt(
    name: str,
    inputs: list[tuple[str, list[int]]],
    n_classes: int,
    embed_dim: int,
    feature_output: bool,
    trigger_score: bool,
) -> str:
    outs = [_tensor("logits", [n_classes], labels=True), _tensor("probs", [n_classes], labels=True)]
    if trigger_score:
        outs.append(_tensor("trigger_score", [1], reshape_scalar=True))
    if feature_output:
        outs.append(_tensor("image_features", [embed_dim]))
    ins = ",\n".join(_tensor(n, d) for n, d in inputs)
    outputs = ",\n".join(outs)
    return (
        f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {MAX_BATCH}\n'
        f"input [\n{ins}\n]\noutput [\n{outputs}\n]\n"
        "dynamic_batching {\n  max_queue_delay_microseconds: 2000\n}\n"
        "instance_group [ { kind: KIND_AUTO } ]\n"
    )


def triton_repository(
    blobs: dict[str, bytes], classes: list[str], pre: dict, embed_dim: int, trigger_score: bool
) -> dict[str, bytes]:
    """Relative path -> file content."""
    labels = classes_text(classes).encode()
    h, w = pre["size"]
    specs = {
        "cbpt_head": (HEAD, [("image_features", [embed_dim])], False),
        "cbpt_classifier": (CLASSIFIER, [("pixel_values", [3, h, w])], True),
    }
    # half-precision twins keep float32 inputs and outputs, so their configs are the same
    specs.update(
        {f"{model}_fp16": (fp16_name(graph), inputs, feats) for model, (graph, inputs, feats) in specs.items()}
    )
    specs["cbpt_classifier_int8"] = (int8_name(CLASSIFIER), specs["cbpt_classifier"][1], True)
    files: dict[str, bytes] = {}
    for model, (graph, inputs, feats) in specs.items():
        if graph not in blobs:
            continue
        files[f"{model}/config.pbtxt"] = config_pbtxt(
            model, inputs, len(classes), embed_dim, feats, trigger_score
        ).encode()
        files[f"{model}/labels.txt"] = labels
        files[f"{model}/1/model.onnx"] = blobs[graph]
    return files
