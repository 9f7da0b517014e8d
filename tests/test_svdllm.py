import torch

from exporters import ExportContext, export
from flatllm_export import accounting
from flatllm_export.calibration import run_sequential
from flatllm_export.compress import compress_svdllm
from flatllm_export.compress.svdllm import SVDLLMLayerMethod, svd_rank, whitened_factors
from flatllm_export.modeling import load_model
from flatllm_export.recipe import ValidationSection
from flatllm_export.validate import onnx_runtime, parity

from .test_onnx import check, windows


def test_whitening_is_truncation_aware():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 24, generator=g, dtype=torch.float64) @ torch.randn(24, 24, generator=g, dtype=torch.float64)
    w = torch.randn(16, 24, generator=g, dtype=torch.float64)
    up, down, _ = whitened_factors(w, x.T @ x, 6)
    plain_u, plain_s, plain_v = torch.linalg.svd(w, full_matrices=False)
    plain = (plain_u[:, :6] * plain_s[:6]) @ plain_v[:6]
    err_white = (x @ (up @ down - w).T).norm()
    assert err_white < (x @ (plain - w).T).norm()
    # the loss equals the dropped singular values of W S
    s = torch.linalg.cholesky(x.T @ x)
    sv = torch.linalg.svdvals(w @ s)
    assert torch.isclose(err_white, sv[6:].norm(), rtol=1e-6)


def test_svd_rank_keeps_dense_when_factors_are_larger():
    assert svd_rank(256, 256, 0.7) == 89 and svd_rank(256, 256, 1.0) is None


def test_svdllm_full_rank_reproduces_the_model():
    model = load_model("ref-gqa")
    x = windows("ref-gqa", split="train")
    with torch.no_grad():
        ref = model(x[:4]).logits
    run_sequential(model, x, SVDLLMLayerMethod(model.config, 1.0, full_rank_too=True))
    assert model.config.layer_shapes[0]["lowrank"]["up_proj"] == 256
    with torch.no_grad():
        got = model(x[:4]).logits
    assert ((got - ref).norm() / ref.norm()).item() < 1e-4


def test_svdllm_accounting_reload_and_onnx(tmp_path):
    model = load_model("ref-llama")
    rep = compress_svdllm(model, windows("ref-llama", split="train"), 0.3)
    assert abs(rep["achieved_ratio"] - 0.3) < 0.01 and rep["kept_dense"] == []
    total = sum(p.numel() for layer in model.model.layers for n, p in layer.named_parameters()
                if "layernorm" not in n and not n.endswith("bias"))
    assert total == accounting.decoder_linear_params(model.config) == rep["decoder_linear_params_after"]
    export("hf", model, None, tmp_path / "hf", ExportContext(sample=windows("ref-llama")[:1, :32]))
    assert load_model(str(tmp_path / "hf")).config.layer_shapes == model.config.layer_shapes
    export("onnx", model, None, tmp_path / "onnx", ExportContext())
    res = parity(model, [onnx_runtime(tmp_path / "onnx")], {"test": windows("ref-llama")},
                 ValidationSection(generate_tokens=64))
    check(res)
