"""A graph input ``num_logits_to_keep`` (int64 scalar; 0 = every position, N = the last N): the lm_head runs on
the positions asked for only. A prefill that only needs the next token then skips the vocabulary projection of
the whole prompt (for SmolLM2, 49152 x 576 per prompt token: about a fifth of a 128-token prefill).

A rewrite of a finished graph, kept apart from the exporter's graph code: the input that feeds the node that
produces ``logits`` (walking back through element-wise nodes such as a bias Add or a Cast) is sliced along the
sequence axis. Our runtime (flatllm_export/runtime/ort.py) feeds it when the graph has it. onnxruntime-genai
feeds only the inputs it knows, and onnxruntime cannot bind an input that has a default through an IO binding,
so the input is required: apply this to graphs for our runtime, not to an onnxruntime-genai export.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT = "num_logits_to_keep"
_PASS_THROUGH = {"Add", "Cast", "Mul", "Identity"}  # element-wise nodes between the projection and the output
_PROJECTIONS = {"MatMul", "MatMulNBits", "Gemm"}


def add_logits_to_keep(model: onnx.ModelProto, logits: str = "logits") -> onnx.ModelProto:
    graph = model.graph
    if any(i.name == INPUT for i in graph.input):
        return model
    producer = {o: n for n in graph.node for o in n.output}
    node = producer.get(logits)
    while node is not None and node.op_type in _PASS_THROUGH:
        node = next((producer[i] for i in node.input if i in producer), None)
    if node is None or node.op_type not in _PROJECTIONS:
        raise ValueError(f"no MatMul / MatMulNBits / Gemm found producing '{logits}': cannot add {INPUT}")
    hidden = node.input[0]
    sliced = hidden + "_last_positions"
    graph.input.append(helper.make_tensor_value_info(INPUT, TensorProto.INT64, []))
    graph.initializer.extend([
        numpy_helper.from_array(np.array([1], np.int64), INPUT + "_axis"),
        numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), INPUT + "_end"),
        numpy_helper.from_array(np.array([1], np.int64), INPUT + "_shape")])
    at = list(graph.node).index(node)
    new = [helper.make_node("Neg", [INPUT], [INPUT + "_neg"]),
           helper.make_node("Reshape", [INPUT + "_neg", INPUT + "_shape"], [INPUT + "_start"]),
           helper.make_node("Slice", [hidden, INPUT + "_start", INPUT + "_end", INPUT + "_axis"], [sliced])]
    for offset, n in enumerate(new):
        graph.node.insert(at + offset, n)
    node.input[0] = sliced
    out = next(o for o in graph.output if o.name == logits)
    out.type.tensor_type.shape.dim[1].dim_param = "logits_sequence"
    return model


def add_logits_to_keep_file(path: str | Path) -> None:
    """Rewrite ``path`` in place (its external data file, if any, is left as it is)."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    onnx.save(add_logits_to_keep(model), str(path))
