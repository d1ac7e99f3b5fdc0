"""The stored-transpose pass on a graph shaped like the SASA decoder: one weight read in the main graph and
inside an `If` branch (the projected stream), through Transposes and a Gemm."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from sasa_patcher.export.onnx_transposes import fold_weight_transposes

WEIGHT = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)  # nn.Linear(3, 5).weight
BIAS = np.random.default_rng(1).standard_normal(5).astype(np.float32)


def linear_twice_graph() -> onnx.ModelProto:
    """y0 = x W^T in the main graph; y1 = x W^T inside If (then: Transpose + MatMul, else: Gemm transB=1)."""
    out = helper.make_tensor_value_info("y1", TensorProto.FLOAT, [2, 5])
    then_branch = helper.make_graph(
        [helper.make_node("Transpose", ["W"], ["wt_then"], perm=[1, 0]),
         helper.make_node("MatMul", ["x", "wt_then"], ["y1"])],
        "then", [], [out])
    else_branch = helper.make_graph([helper.make_node("Gemm", ["x", "W", "b"], ["y1"], transB=1)], "else", [], [out])
    nodes = [
        helper.make_node("Transpose", ["W"], ["wt"]),
        helper.make_node("MatMul", ["x", "wt"], ["y0"]),
        helper.make_node("If", ["cond"], ["y1"], then_branch=then_branch, else_branch=else_branch),
    ]
    graph = helper.make_graph(
        nodes, "linear-twice",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y0", TensorProto.FLOAT, [2, 5]), out],
        initializer=[numpy_helper.from_array(WEIGHT, "W"), numpy_helper.from_array(BIAS, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def run(path, x, cond):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x, "cond": np.array(cond)})


def transposes(proto: onnx.ModelProto) -> int:
    count = 0
    for node in proto.graph.node:
        count += node.op_type == "Transpose"
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                count += sum(inner.op_type == "Transpose" for inner in attribute.g.node)
    return count


def test_weight_stored_transposed_gives_the_same_outputs(tmp_path):
    before, after = tmp_path / "before.onnx", tmp_path / "after.onnx"
    onnx.save(linear_twice_graph(), before)
    model = onnx_ir.load(before)
    assert fold_weight_transposes(model) == 1
    onnx_ir.save(model, after, external_data="after.onnx.data", size_threshold_bytes=0)

    saved = onnx.load(after)
    assert transposes(saved) == 0
    stored = {tensor.name: numpy_helper.to_array(tensor, base_dir=str(tmp_path)) for tensor in saved.graph.initializer}
    assert set(stored) == {"W.T", "b"} and np.array_equal(stored["W.T"], WEIGHT.T)  # same bytes, no second copy
    x = np.random.default_rng(2).standard_normal((2, 3)).astype(np.float32)
    for cond in (True, False):
        expected, got = run(before, x, cond), run(after, x, cond)
        for want, have in zip(expected, got, strict=True):
            np.testing.assert_array_equal(have, want)
        np.testing.assert_allclose(got[0], x @ WEIGHT.T, rtol=1e-6)


def test_weight_with_another_reader_is_left_alone(tmp_path):
    proto = linear_twice_graph()
    proto.graph.node.append(helper.make_node("Gather", ["W", "index"], ["row"]))
    proto.graph.input.append(helper.make_tensor_value_info("index", TensorProto.INT64, [1]))
    proto.graph.output.append(helper.make_tensor_value_info("row", TensorProto.FLOAT, [1, 3]))
    onnx.save(proto, tmp_path / "gather.onnx")
    model = onnx_ir.load(tmp_path / "gather.onnx")
    assert fold_weight_transposes(model) == 0
    assert "W" in model.graph.initializers and "W.T" not in model.graph.initializers
