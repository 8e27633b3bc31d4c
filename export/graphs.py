"""The ONNX graphs: the zero-shot head, and the image encoder + head in one classifier.

Both take a dynamic batch axis, use opset 17 with IR version 8 (readable by onnxruntime
>= 1.14 and by Triton's onnxruntime backend), and normalise image features inside the
graph, so `logits = scale * normalise(f(x)) @ G.T` needs nothing from the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cbpt_guard.routing import Route

OPSET = 17
IR_VERSION = 8  # opset 17's own IR version; newer IRs are refused by older runtimes


@dataclass(frozen=True)
class HeadSpec:
    """What the zero-shot head computes from image features f: logits = scale * cos(f, G), G the
    class embeddings the route picks for the image (all of them `weights` without a route;
    cbpt_guard/routing.py), and the alarm's trigger_score = max_k cos(f, centroids[k])."""

    weights: np.ndarray  # [C, D] the (purified) class embeddings
    scale: float
    centroids: np.ndarray | None = None  # [K, D] the trigger alarm's centres
    route: Route | None = None

    def logits(self, unit: np.ndarray) -> np.ndarray:
        """The reference the graphs are checked against, for unit features [N, D]."""
        return self.scale * (unit @ self.weights.T if self.route is None else self.route.cosines(unit, self.weights))

    def trigger_score(self, unit: np.ndarray) -> np.ndarray:
        """The reference for `trigger_score` [N]: the largest cosine to the alarm's centres."""
        return (unit @ self.centroids.T).max(1)


def _const(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _node(prefix: str, op: str, inputs: list[str], output: str, **attrs) -> onnx.NodeProto:
    """A node whose inputs and output are named within `prefix`."""
    return helper.make_node(op, [f"{prefix}{i}" for i in inputs], [f"{prefix}{output}"], **attrs)


def head_nodes(prefix: str, features: str, head: HeadSpec) -> tuple[list, list, list[str]]:
    """Nodes normalising `features` [N, D] and scoring them: -> logits, probs[, trigger_score]."""
    d = head.weights.shape[1]
    inits = [
        _const(f"{prefix}class_embeddings_T", head.weights.T),  # [D, C]
        _const(f"{prefix}logit_scale", head.scale),
        _const(f"{prefix}eps", 1e-12),
    ]
    nodes = [
        helper.make_node("ReduceL2", [features], [f"{prefix}norm"], axes=[1], keepdims=1),  # opset 17: axes
        helper.make_node("Max", [f"{prefix}norm", f"{prefix}eps"], [f"{prefix}norm_safe"]),
        helper.make_node("Div", [features, f"{prefix}norm_safe"], [f"{prefix}unit"]),
        helper.make_node("MatMul", [f"{prefix}unit", f"{prefix}class_embeddings_T"], [f"{prefix}cos"]),
    ]
    cos = f"{prefix}cos"
    if head.route is not None:  # the original embeddings answer outside the route
        r = head.route
        inits += [
            _const(f"{prefix}original_embeddings_T", r.original.T),  # [D, C]
            _const(f"{prefix}route_centroids_T", r.centroids.T),  # [D, K]
            _const(f"{prefix}route_thresholds", r.thresholds),  # [K]
            _const(f"{prefix}zero", 0.0),
        ]
        nodes += [
            helper.make_node("MatMul", [f"{prefix}unit", f"{prefix}original_embeddings_T"], [f"{prefix}cos_original"]),
            helper.make_node("MatMul", [f"{prefix}unit", f"{prefix}route_centroids_T"], [f"{prefix}route_cos"]),
            helper.make_node("Sub", [f"{prefix}route_cos", f"{prefix}route_thresholds"], [f"{prefix}route_margin"]),
            helper.make_node("ReduceMax", [f"{prefix}route_margin"], [f"{prefix}route_best"], axes=[1], keepdims=1),
            helper.make_node("Greater", [f"{prefix}route_best", f"{prefix}zero"], [f"{prefix}route_near"]),  # [N, 1]
        ]
        routed = f"{prefix}route_near"
        if len(r.targets):  # the target gate: what the original embeddings assign to a target is routed
            inits.append(numpy_helper.from_array(r.targets.astype(np.int64), f"{prefix}route_targets"))
            nodes += [
                helper.make_node("ArgMax", [f"{prefix}cos_original"], [f"{prefix}answer"], axis=1, keepdims=1),
                helper.make_node("Equal", [f"{prefix}answer", f"{prefix}route_targets"], [f"{prefix}is_target"]),
                helper.make_node("Cast", [f"{prefix}is_target"], [f"{prefix}is_target_f"], to=TensorProto.FLOAT),
                helper.make_node("ReduceMax", [f"{prefix}is_target_f"], [f"{prefix}gate"], axes=[1], keepdims=1),
                helper.make_node("Greater", [f"{prefix}gate", f"{prefix}zero"], [f"{prefix}route_gate"]),
            ]
            if r.side is None:
                nodes.append(helper.make_node("Or", [routed, f"{prefix}route_gate"], [f"{prefix}routed"]))
            else:  # an image given target t is routed where it is on t's triggers' side, its cosines aside
                inits += [
                    _const(f"{prefix}side_directions_T", r.side.directions.T),  # [D, T]
                    _const(f"{prefix}side_thresholds", r.side.thresholds),  # [T]
                ]
                nodes += [
                    _node(prefix, "MatMul", ["unit", "side_directions_T"], "side_proj"),
                    _node(prefix, "Sub", ["side_proj", "side_thresholds"], "side_margin"),
                    _node(prefix, "Greater", ["side_margin", "zero"], "side_past"),  # [N, T]
                    _node(prefix, "And", ["is_target", "side_past"], "side_each"),
                    _node(prefix, "Cast", ["side_each"], "side_each_f", to=TensorProto.FLOAT),
                    _node(prefix, "ReduceMax", ["side_each_f"], "side_any", axes=[1], keepdims=1),
                    _node(prefix, "Greater", ["side_any", "zero"], "gated_side"),  # [N, 1]
                    _node(prefix, "Not", ["route_gate"], "not_gated"),
                    _node(prefix, "And", ["not_gated", "route_near"], "near_elsewhere"),
                    _node(prefix, "Or", ["gated_side", "near_elsewhere"], "routed"),
                ]
            routed = f"{prefix}routed"
        nodes.append(helper.make_node("Where", [routed, cos, f"{prefix}cos_original"], [f"{prefix}cos_routed"]))
        cos = f"{prefix}cos_routed"
    nodes += [
        helper.make_node("Mul", [cos, f"{prefix}logit_scale"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    outputs = ["logits", "probs"]
    if head.centroids is not None:
        inits.append(_const(f"{prefix}trigger_centroids_T", head.centroids.reshape(-1, d).T))  # [D, K]
        nodes += [
            helper.make_node("MatMul", [f"{prefix}unit", f"{prefix}trigger_centroids_T"], [f"{prefix}tscore"]),
            helper.make_node("ReduceMax", [f"{prefix}tscore"], ["trigger_score"], axes=[1], keepdims=0),
        ]
        outputs.append("trigger_score")
    for node in nodes:  # named, so that passes over the graph (int8) can tell the head apart
        node.name = f"{prefix}{node.output[0].removeprefix(prefix)}"
    return nodes, inits, outputs


def build_head(head: HeadSpec) -> onnx.ModelProto:
    """image_features [N, D] -> logits [N, C], probs [N, C] (+ trigger_score [N])."""
    n_classes, d = head.weights.shape
    nodes, inits, outs = head_nodes("head/", "image_features", head)
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


def attach_head(encoder: onnx.ModelProto, head: HeadSpec) -> onnx.ModelProto:
    """Append the head to an exported image encoder whose single output is `image_features`."""
    g = encoder.graph
    nodes, inits, outs = head_nodes("head/", "image_features", head)
    g.node.extend(nodes)
    g.initializer.extend(inits)
    n_classes = head.weights.shape[0]
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
