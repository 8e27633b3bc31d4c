"""The ONNX graphs: the zero-shot head, and the image encoder + head in one classifier.

Both take a dynamic batch axis, use opset 17 with IR version 8 (readable by onnxruntime
>= 1.14 and by Triton's onnxruntime backend), and normalise image features inside the
graph, so `logits = scale * normalise(f(x)) @ G.T` needs nothing from the caller.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # opset 17's own IR version; newer IRs are refused by older runtimes


def head_nodes(
    prefix: str, features: str, weights: np.ndarray, scale: float, centroid: np.ndarray | None
) -> tuple[list, list, list[str]]:
    """Nodes normalising `features` [N, D] and scoring them: -> logits, probs[, trigger_score]."""
    d = weights.shape[1]
    inits = [
        numpy_helper.from_array(weights.T.astype(np.float32), f"{prefix}class_embeddings_T"),  # [D, C]
        numpy_helper.from_array(np.array(scale, dtype=np.float32), f"{prefix}logit_scale"),
        numpy_helper.from_array(np.array(1e-12, dtype=np.float32), f"{prefix}eps"),
    ]
    nodes = [
        helper.make_node("ReduceL2", [features], [f"{prefix}norm"], axes=[1], keepdims=1),  # opset 17: axes
        helper.make_node("Max", [f"{prefix}norm", f"{prefix}eps"], [f"{prefix}norm_safe"]),
        helper.make_node("Div", [features, f"{prefix}norm_safe"], [f"{prefix}unit"]),
        helper.make_node("MatMul", [f"{prefix}unit", f"{prefix}class_embeddings_T"], [f"{prefix}cos"]),
        helper.make_node("Mul", [f"{prefix}cos", f"{prefix}logit_scale"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    outputs = ["logits", "probs"]
    if centroid is not None:
        inits += [
            numpy_helper.from_array(centroid.reshape(d, 1).astype(np.float32), f"{prefix}trigger_centroid"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), f"{prefix}axis1"),
        ]
        nodes += [
            helper.make_node("MatMul", [f"{prefix}unit", f"{prefix}trigger_centroid"], [f"{prefix}tscore"]),
            helper.make_node("Squeeze", [f"{prefix}tscore", f"{prefix}axis1"], ["trigger_score"]),
        ]
        outputs.append("trigger_score")
    for node in nodes:  # named, so that passes over the graph (int8) can tell the head apart
        node.name = f"{prefix}{node.output[0].removeprefix(prefix)}"
    return nodes, inits, outputs


def build_head(weights: np.ndarray, scale: float, centroid: np.ndarray | None = None) -> onnx.ModelProto:
    """image_features [N, D] -> logits [N, C], probs [N, C] (+ trigger_score [N])."""
    n_classes, d = weights.shape
    nodes, inits, outs = head_nodes("head/", "image_features", weights, scale, centroid)
    value_infos = {
        "logits": helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_classes]),
        "probs": helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", n_classes]),
        "trigger_score": helper.make_tensor_value_info("trigger_score", TensorProto.FLOAT, ["batch"]),
    }
    graph = helper.make_graph(
        nodes,
        "cbpt_head",
        [helper.make_tensor_value_info("image_features", TensorProto.FLOAT, ["batch", d])],
        [value_infos[o] for o in outs],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="cbpt-guard")
    model.ir_version = IR_VERSION
    return model


def attach_head(
    encoder: onnx.ModelProto, weights: np.ndarray, scale: float, centroid: np.ndarray | None
) -> onnx.ModelProto:
    """Append the head to an exported image encoder whose single output is `image_features`."""
    g = encoder.graph
    nodes, inits, outs = head_nodes("head/", "image_features", weights, scale, centroid)
    g.node.extend(nodes)
    g.initializer.extend(inits)
    n_classes = weights.shape[0]
    batch = g.input[0].type.tensor_type.shape.dim[0].dim_param or "batch"
    for name in outs:
        shape = [batch] if name == "trigger_score" else [batch, n_classes]
        g.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
    # keep image_features as an output too, after the scores
    feats = [o for o in g.output if o.name == "image_features"]
    rest = [o for o in g.output if o.name != "image_features"]
    del g.output[:]
    g.output.extend(rest + feats)
    encoder.ir_version = IR_VERSION
    return encoder


def set_metadata(model: onnx.ModelProto, meta: dict[str, str]) -> None:
    del model.metadata_props[:]
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, str(v)
