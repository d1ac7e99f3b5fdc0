"""Store weights the way the graph reads them: a transposed initializer instead of a `Transpose` node.

Why: the exporter writes `nn.Linear` as `MatMul(x, Transpose(W))` and its optimiser folds the
transpose into the stored weight only where `W` has one consumer. SASA's projected stream runs
layers s+1..L-1 a second time inside the probe's `If` branch, so those layers' weights have two
consumers and keep their `Transpose` nodes (and a tied lm_head, over 1 GiB at 3B, is never folded).
ONNX Runtime then folds each of them at session load into a heap copy (Qwen2.5-VL-3B: 17.7 GiB of
private memory for an 11.5 GiB decoder, on top of the mapped file) or, above its 1 GiB folding
limit, transposes the lm_head on every run. Storing `W^T` once, read by every consumer, keeps the
file the same size and lets ONNX Runtime map every weight from the file.
"""

from __future__ import annotations

import numpy as np


def _is_weight_transpose(node, weight) -> bool:
    """A 2-D transpose of `weight` (default or [1, 0] perm) whose result is not a graph output."""
    if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or node.inputs[0] is not weight:
        return False
    perm = node.attributes.get("perm")
    return (perm is None or list(perm.as_ints()) == [1, 0]) and not node.outputs[0].is_graph_output()


def _is_gemm_b(node, index: int) -> bool:
    """`weight` is a Gemm's B input: Gemm's transB flag reads it either way round."""
    return node.op_type == "Gemm" and node.domain in ("", "ai.onnx") and index == 1


def fold_weight_transposes(model) -> int:
    """Replace every 2-D initializer read only through Transposes (and Gemm B inputs) by its transpose.

    The transposed data is computed when the graph is saved (`onnx_ir.LazyTensor`), one weight at a
    time. Returns the number of weights replaced.
    """
    import onnx_ir

    graph = model.graph
    folded = 0
    for name, weight in list(graph.initializers.items()):
        source = weight.const_value
        if source is None or len(source.shape) != 2:
            continue
        uses = list(weight.uses())
        transposes = [use.node for use in uses if _is_weight_transpose(use.node, weight)]
        gemms = [(use.node, use.idx) for use in uses if _is_gemm_b(use.node, use.idx)]
        if not transposes or len(transposes) + len(gemms) != len(uses):
            continue
        rows, cols = source.shape
        stored = onnx_ir.LazyTensor(lambda tensor=source: onnx_ir.tensor(np.ascontiguousarray(tensor.numpy().T)),
                                    dtype=source.dtype, shape=onnx_ir.Shape([cols, rows]), name=f"{name}.T")
        transposed = onnx_ir.Value(name=f"{name}.T", shape=onnx_ir.Shape([cols, rows]),
                                   type=onnx_ir.TensorType(source.dtype), const_value=stored)
        graph.register_initializer(transposed)
        for node in transposes:
            node.outputs[0].replace_all_uses_with(transposed)
            node.graph.remove(node, safe=True)
        for node, index in gemms:
            flipped = 0 if node.attributes.get("transB") is not None and node.attributes["transB"].as_int() else 1
            node.attributes["transB"] = onnx_ir.AttrInt64("transB", flipped)
            node.replace_input_with(index, transposed)
        graph.initializers.pop(name)
        weight.const_value = None
        folded += 1
    return folded
