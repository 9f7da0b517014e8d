"""The emulation of onnxruntime's int8 activations (MatMulNBits accuracy_level 4) against onnxruntime itself, one
node at a time: the emulation must sit at fp32 accumulation noise where plain float32 is a thousand times off."""

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from flatllm_export.emulation import Arithmetic, activation_block, mlas_int8
from flatllm_export.quantize.gptq import quantize_rtn
from flatllm_export.quantize.matmulnbits import to_matmulnbits

ort = pytest.importorskip("onnxruntime")


def matmulnbits(x: torch.Tensor, q, level: int) -> torch.Tensor:
    """One com.microsoft MatMulNBits node run by onnxruntime on x (M, K)."""
    t = to_matmulnbits(q)
    m, k = x.shape
    inits = [numpy_helper.from_array(t["B"], "B"), numpy_helper.from_array(t["scales"], "S"),
             numpy_helper.from_array(t["zero_points"], "Z")]
    node = helper.make_node("MatMulNBits", ["x", "B", "S", "Z"], ["y"], domain="com.microsoft", K=k, N=t["N"],
                            bits=t["bits"], block_size=t["block_size"], accuracy_level=level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, t["N"]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"x": x.numpy()})[0]).double()


@pytest.mark.parametrize("bits,group,k,m,sym", [
    (4, 32, 576, 1, True), (4, 32, 576, 7, True), (4, 32, 360, 5, True), (4, 128, 1000, 3, True),
    (8, 32, 576, 4, True), (8, 128, 360, 2, True), (4, 32, 576, 5, False), (4, 64, 576, 3, True),
    (4, -1, 576, 3, True), (4, 512, 1024, 2, True)])
def test_int8_activations_are_what_onnxruntime_computes(bits, group, k, m, sym):
    g = torch.Generator().manual_seed(k + m + bits)
    q = quantize_rtn(torch.randn(96, k, generator=g), bits, group, sym=sym)
    x = torch.randn(m, k, generator=g) * torch.rand(k, generator=g) * 3  # uneven magnitudes along K
    w = q.dequantize(torch.float32).double()
    got = matmulnbits(x, q, 4)
    scale = (x.double() @ w.T).abs().max().item()
    emulated = mlas_int8(x.double(), activation_block(q)) @ w.T
    assert (got - emulated).abs().max().item() < 5e-6 * scale  # fp32 accumulation noise
    assert (got - x.double() @ w.T).abs().max().item() > 1e-3 * scale  # plain float32 is not what it computes
    exact = matmulnbits(x, q, 0)  # accuracy_level 0: float32 activations, the plain product
    assert (exact - x.double() @ w.T).abs().max().item() < 5e-6 * scale


def test_quantizer_rounds_half_to_even_per_block():
    x = torch.tensor([[127.0, 0.5, 1.5, -2.5] + [0.0] * 28 + [2.0, 1.0] + [0.0] * 30], dtype=torch.float64)
    y = mlas_int8(x, 32)
    assert y[0, :4].tolist() == [127.0, 0.0, 2.0, -2.0]  # scale 1: ties to even
    # the second block has its own scale (2/127): 1.0 x 127/2 = 63.5 is a tie too, rounded to 64
    assert y[0, 32:34].tolist() == pytest.approx([2.0, 64 * 2 / 127], abs=1e-15)
    assert mlas_int8(torch.zeros(2, 40), 32).abs().max() == 0  # an all-zero block stays zero (no 0/0)


def test_arithmetic_of_an_onnx_export_and_its_parts():
    a = Arithmetic.of_onnx({"int4": True, "accuracy_level": 4, "embedding": "int4", "lm_head": "int4-gptq"})
    assert a.activations == "mlas-int8" and a.embedding == "int4" and a.lm_head == "float"  # GPTQ head: the model's
    assert set(a.approximations()) == {"mlas-int8 activations", "int4 embedding"}
    assert Arithmetic.of_onnx({"int4": True, "accuracy_level": 0, "embedding": "float", "lm_head": "float"}).exact
    with pytest.raises(ValueError, match="unknown activation arithmetic"):
        Arithmetic(activations="q9")
