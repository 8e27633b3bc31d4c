"""Half-precision graphs: weights and activations in fp16, numerically fragile ops in fp32.

A graph-level pass over what torch exported, so it holds for every architecture the export
handles. The interface is unchanged (float32 in, float32 out) and drops into any stack that
ran the fp32 graph. LayerNorm and softmax, and the reductions whose sums lose precision or
overflow in fp16, run in fp32 behind Cast nodes.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
KEEP_FP32 = frozenset({"LayerNormalization", "Softmax", "ReduceMean", "ReduceL2", "ReduceSumSquare", "Pow"})
# inputs the ONNX spec types as float32 whatever the data type (Resize's scales)
SPEC_FP32_INPUTS = frozenset({("Resize", 2), ("Upsample", 1)})


class Fp16Error(ValueError):
    pass


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.input, *g.output, *g.value_info]}
    types.update({t.name: t.data_type for t in g.initializer})
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = a.t.data_type
    return types


def _wanted(node: onnx.NodeProto, position: int, keep_fp32: frozenset[str]) -> int | None:
    """The precision a node wants a float input in; None when any will do (Cast)."""
    if node.op_type == "Cast":
        return None
    if node.op_type in keep_fp32 or (node.op_type, position) in SPEC_FP32_INPUTS:
        return F32
    return F16


def _half(t: onnx.TensorProto) -> onnx.TensorProto:
    arr = numpy_helper.to_array(t)
    if np.isfinite(arr).all() and np.abs(arr).max(initial=0) > np.finfo(np.float16).max:
        raise Fp16Error(f"tensor {t.name} holds values beyond fp16's range (max |x| {np.abs(arr).max():.3g})")
    return numpy_helper.from_array(arr.astype(np.float16), t.name)


def to_fp16(model: onnx.ModelProto, keep_fp32: frozenset[str] = KEEP_FP32) -> onnx.ModelProto:
    """A copy of `model` computing in fp16, with float32 inputs and outputs."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        raise Fp16Error("graphs with control flow (If/Loop/Scan) are not supported by the fp16 pass")
    types = _elem_types(model)

    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in g.node:
        for i, name in enumerate(node.input):
            if name:
                consumers.setdefault(name, []).append((node, i))

    def preferred(name: str) -> int:
        """Constants stay fp32 only when every consumer wants fp32; otherwise they are halved."""
        wants = [_wanted(n, i, keep_fp32) for n, i in consumers.get(name, [])]
        return F32 if wants and all(w == F32 for w in wants) else F16

    where: dict[str, int] = {}  # float tensor -> its precision after the pass
    for vi in g.input:
        if types.get(vi.name) == F32:
            where[vi.name] = F32
    for i, t in enumerate(g.initializer):
        if t.data_type == F32:
            where[t.name] = preferred(t.name)
            if where[t.name] == F16:
                g.initializer[i].CopyFrom(_half(t))

    new_nodes: list[onnx.NodeProto] = []
    casts: dict[tuple[str, int], str] = {}
    for node in g.node:
        for i, name in enumerate(node.input):
            if not name or types.get(name, -1) != F32:
                if name and name not in types:
                    raise Fp16Error(f"cannot tell the type of tensor '{name}' (input of {node.op_type})")
                continue
            want = _wanted(node, i, keep_fp32)
            if want is None or where[name] == want:
                continue
            key = (name, want)
            if key not in casts:
                casts[key] = f"{name}/as_{'fp32' if want == F32 else 'fp16'}"
                new_nodes.append(helper.make_node("Cast", [name], [casts[key]], to=want))
            node.input[i] = casts[key]
        if node.op_type == "Constant" and types.get(node.output[0]) == F32:
            precision = preferred(node.output[0])
            if precision == F16:
                for a in node.attribute:
                    if a.name == "value":
                        a.t.CopyFrom(_half(a.t))
            where[node.output[0]] = precision
        elif node.op_type == "Cast":
            to = next(a for a in node.attribute if a.name == "to")
            if to.i == F32:
                to.i = F16
                where[node.output[0]] = F16
        else:
            if node.op_type == "ConstantOfShape":
                for a in node.attribute:
                    if a.name == "value" and a.t.data_type == F32:
                        a.t.CopyFrom(_half(a.t))
            precision = F32 if node.op_type in keep_fp32 else F16
            for name in node.output:
                if types.get(name) == F32:
                    where[name] = precision
        new_nodes.append(node)

    # the interface stays float32
    for vi in g.output:
        if where.get(vi.name) == F16:
            inner = f"{vi.name}/fp16"
            for node in new_nodes:
                node.output[:] = [inner if o == vi.name else o for o in node.output]
                node.input[:] = [inner if x == vi.name else x for x in node.input]
            new_nodes.append(helper.make_node("Cast", [inner], [vi.name], to=F32))
    del g.node[:]
    g.node.extend(new_nodes)
    del g.value_info[:]  # stale float32 annotations; runtimes infer them again
    return out
