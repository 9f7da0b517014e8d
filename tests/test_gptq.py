import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as np_load_file

from exporters import ExportContext, ExportError, export
from flatllm_export.api import evaluation_windows, run
from flatllm_export.compress import compress_flatllm
from flatllm_export.evaluate import model_perplexity
from flatllm_export.modeling import load_model
from flatllm_export.quantize import QuantizationError, quantize_model
from flatllm_export.quantize.gptq import accumulate_hessian, grid, quantize_weight, weight_first_tokens
from flatllm_export.modeling.packing import pack_rows, unpack_rows
from flatllm_export.recipe import QuantizationSection, parse_recipe


def problem(out_f=64, in_f=128, n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_f, generator=g) @ torch.randn(in_f, in_f, generator=g) * 0.3  # correlated inputs
    w = torch.randn(out_f, in_f, generator=g)
    return w, x, 2 * x.T.double() @ x.double() / n


def rtn(w, bits, group, sym):
    out = torch.empty_like(w)
    for s in range(0, w.shape[1], group):
        scale, zero = grid(w[:, s : s + group], bits, sym)
        q = torch.clamp(torch.round(w[:, s : s + group] / scale[:, None]) + zero[:, None], 0, 2**bits - 1)
        out[:, s : s + group] = scale[:, None] * (q - zero[:, None])
    return out


@pytest.mark.parametrize("bits,group,sym,act", [(4, 32, True, False), (3, 64, False, True), (2, -1, True, True),
                                                (8, 128, False, False)])
def test_gptq_beats_round_to_nearest_on_the_layer_output(bits, group, sym, act):
    w, x, h = problem()
    q, diag = quantize_weight(w, h, bits, group, sym, act, block_size=32)
    assert q.codes.min() >= 0 and q.codes.max() <= 2**bits - 1 and diag["retries"] == 0
    assert q.scales.dtype == torch.float16 and q.scales.shape[0] == (1 if group == -1 else 128 // group)
    err_gptq = (x @ (q.dequantize() - w).T).pow(2).mean()
    err_rtn = (x @ (rtn(w, bits, 128 if group == -1 else group, sym) - w).T).pow(2).mean()
    assert err_gptq < err_rtn
    if act and group != -1:
        assert not torch.equal(q.g_idx, torch.sort(q.g_idx).values)  # act-order permutes groups


def weighted_rounding_error(w, scale, zero, bits, importance):
    q = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, 2**bits - 1)
    return ((scale[:, None] * (q - zero[:, None]) - w) ** 2 * importance).sum(1)


@pytest.mark.parametrize("bits,sym", [(4, True), (3, True), (4, False), (2, False)])
def test_scale_search_lowers_the_weighted_rounding_error(bits, sym):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(512, 32, generator=g) * torch.rand(512, 1, generator=g)
    importance = torch.rand(32, generator=g) ** 4 * 10  # a few columns matter most, as in real activations
    s0, z0 = grid(w, bits, sym)
    s1, z1 = grid(w, bits, sym, "search", importance)
    assert torch.equal(s1.half().float(), s1)  # float16-exact, as the checkpoint stores it
    e0, e1 = weighted_rounding_error(w, s0, z0, bits, importance), weighted_rounding_error(w, s1, z1, bits, importance)
    assert (e1 <= e0 * 1.0001).float().mean() > 0.97 and e1.mean() < 0.9 * e0.mean()
    # the importance is what it minimizes: searched with uniform weights, the weighted error is higher
    s2, z2 = grid(w, bits, sym, "search")
    assert weighted_rounding_error(w, s2, z2, bits, importance).mean() > e1.mean()
    if sym:  # the largest-magnitude weight of a row is exactly a code (llama.cpp's Q4_0 rule) for most rows
        assert (z1 == 2 ** (bits - 1)).all()


def test_first_token_weight_counts_each_windows_first_token_that_many_times():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3 * 8, 16, generator=g)  # 3 windows of 8 tokens, window-major
    h = torch.zeros(16, 16, dtype=torch.float64)
    accumulate_hessian(h, weight_first_tokens(x, 8, 5.0), 0)
    repeated = torch.cat([x] + [x[::8]] * 4)  # each first token 4 more times
    want = 2 * repeated.double().T @ repeated.double() / x.shape[0]
    assert torch.allclose(h, want)
    assert weight_first_tokens(x, 8, 1.0) is x


def test_static_groups_keep_act_order_groups_consecutive():
    """desc_act with static_groups: columns in act order, groups consecutive (g_idx = column // group), so ONNX
    int4 and GGUF can hold them; still better than rounding on the layer output."""
    w, x, h = problem()
    q, _ = quantize_weight(w, h, 4, 32, True, True, block_size=32, static_groups=True, scale="search")
    assert torch.equal(q.g_idx.long(), torch.arange(128) // 32)
    plain, _ = quantize_weight(w, h, 4, 32, True, False, block_size=32, scale="search")
    assert not torch.equal(q.codes, plain.codes)  # act order changed the work
    err = (x @ (q.dequantize() - w).T).pow(2).mean()
    assert err < (x @ (rtn(w, 4, 32, True) - w).T).pow(2).mean()
    permuted, _ = quantize_weight(w, h, 4, 32, True, True, block_size=32)
    assert not torch.equal(permuted.g_idx, torch.sort(permuted.g_idx).values)


def test_cholesky_failure_raises_damping_and_says_so():
    w, _, _ = problem(16, 32)
    x = torch.randn(8, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    h = x.T @ x  # rank 8 of 32
    h -= 0.05 * h.diagonal().mean() * torch.eye(32, dtype=torch.float64)  # indefinite: 1% damping cannot fix it
    q, diag = quantize_weight(w, h, 4, 32, True, damp_percent=0.01)
    assert diag["retries"] > 0 and diag["damp_percent"] > 0.01


def read_gptq_tensor_from_spec(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Independent reader: the format spec read literally, one value at a time, as a bit stream: value j of a
    column occupies bits [j*bits, (j+1)*bits) of the column's int32 words taken LSB first."""
    u = words.astype(np.int64) & 0xFFFFFFFF
    out = np.zeros((n, words.shape[1]), dtype=np.int64)
    for j in range(n):
        for b in range(bits):
            pos = j * bits + b
            out[j] |= ((u[pos // 32] >> (pos % 32)) & 1) << b
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_matches_an_independent_reader(bits):
    g = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 2**bits, (64, 5), generator=g, dtype=torch.int32)
    packed = pack_rows(values, bits)
    assert packed.dtype == torch.int32 and packed.shape == (64 * bits // 32, 5)
    assert np.array_equal(read_gptq_tensor_from_spec(packed.numpy(), bits, 64), values.numpy())
    assert torch.equal(unpack_rows(packed, bits), values)


@pytest.mark.parametrize("bits", [3, 4])
def test_work_in_chunks_gives_the_same_bits(bits, monkeypatch):
    """GPTQ rows, packing, unpacking and dequantization walk a weight a few rows at a time (bounded memory for
    an lm_head): with chunks of a few rows the results equal those of one chunk, bit for bit."""
    import flatllm_export.quantize.gptq as gptq_mod
    import flatllm_export.modeling.packing as packing_mod

    w, x, h = problem(out_f=96, in_f=128)
    h[5, :] = h[:, 5] = 0  # a dead input column, zeroed in every chunk
    whole, whole_diag = quantize_weight(w, h, bits, 32, True, True, block_size=32)
    values = whole.codes.T
    packed, deq = pack_rows(values, bits), whole.dequantize()
    monkeypatch.setattr(gptq_mod, "ROW_CHUNK_ELEMENTS", 5 * 128)  # 5 rows: chunks that do not divide 96
    monkeypatch.setattr(packing_mod, "CHUNK_VALUES", 40 * 96)  # one group of 32 values a step
    chunked, diag = quantize_weight(w, h, bits, 32, True, True, block_size=32)
    for name in ("codes", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(chunked, name), getattr(whole, name)), name
    assert diag["loss"] == pytest.approx(whole_diag["loss"], rel=1e-6)
    assert torch.equal(pack_rows(values, bits), packed)  # a transposed view, read 32 rows at a time
    assert torch.equal(unpack_rows(packed, bits), values.to(torch.int32))
    monkeypatch.setattr(packing_mod, "DEQUANT_CHUNK_ELEMENTS", 3 * 128)
    assert torch.equal(chunked.dequantize(), deq)


def test_symmetric_4bit_v1_zeros_are_0x77777777(tmp_path):
    model = load_model("ref-llama")
    x = torch.randint(0, 4096, (4, 64), generator=torch.Generator().manual_seed(0))
    quantize_model(model, x, QuantizationSection(bits=4, group_size=64, sym=True))
    export("gptq", model, None, tmp_path / "g", ExportContext())
    t = np_load_file(str(tmp_path / "g" / "model.safetensors"))
    z = t["model.layers.0.self_attn.q_proj.qzeros"]
    assert z.dtype == np.int32 and (z.view(np.uint32) == 0x77777777).all()
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert cfg["checkpoint_format"] == "gptq" and cfg["bits"] == 4 and cfg["group_size"] == 64
    # independent read of one linear: dequantize from the spec and compare with the in-memory weight
    name = "model.layers.2.mlp.down_proj"
    qweight, scales, g_idx = t[f"{name}.qweight"], t[f"{name}.scales"], t[f"{name}.g_idx"]
    codes = read_gptq_tensor_from_spec(qweight, 4, qweight.shape[0] * 8)  # (in, out)
    zeros = read_gptq_tensor_from_spec(t[f"{name}.qzeros"].T.copy(), 4,
                                       t[f"{name}.qzeros"].shape[1] * 8).T + 1  # v1 stores zero - 1
    w = scales.astype(np.float32)[g_idx] * (codes - zeros[g_idx])
    assert np.array_equal(w.T, model.get_submodule(name).weight.numpy())


def test_asymmetric_is_written_as_gptq_v2(tmp_path):
    model = load_model("ref-gqa")
    x = torch.randint(0, 4096, (4, 64), generator=torch.Generator().manual_seed(0))
    quantize_model(model, x, QuantizationSection(bits=3, group_size=32, sym=False, desc_act=True))
    export("gptq", model, None, tmp_path / "g", ExportContext())
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert cfg["checkpoint_format"] == "gptq_v2" and cfg["desc_act"] is True
    reloaded = load_model(str(tmp_path / "g"))
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)


def test_shapes_gptq_cannot_hold_are_refused(tiny_model_dir, tmp_path):
    model = load_model(str(tiny_model_dir))
    x = torch.randint(0, 4096, (4, 32), generator=torch.Generator().manual_seed(0))
    compress_flatllm(model, x, 0.37, "uniform")  # no linear_multiple: value dims end up off the 32 grid
    with pytest.raises(QuantizationError, match=r"multiples of 32.*model.layers.0.self_attn.v_proj.*round_to: 32"):
        quantize_model(model, x, QuantizationSection(bits=4, group_size=32))
    with pytest.raises(ExportError, match="needs a GPTQ-quantized model"):
        export("gptq", model, None, tmp_path / "g", ExportContext())


def test_compress_quantize_export_reload_is_exact(tmp_path):
    recipe = parse_recipe({
        "model": {"path": "ref-llama"}, "calibration": {"dataset": "shakespeare", "nsamples": 16, "seqlen": 128},
        "evaluation": {"dataset": "shakespeare", "seqlen": 128, "max_windows": 24},
        "compression": {"ratio": 0.3}, "quantization": {"bits": 4, "group_size": 32},
        "export": {"targets": ["hf", "gptq"]}})
    rep = run(recipe, tmp_path / "out")
    assert rep["compression"]["linear_multiple"] == 32
    reloaded = load_model(str(tmp_path / "out" / "gptq"))
    windows = evaluation_windows(recipe, __import__("transformers").AutoTokenizer.from_pretrained(
        str(tmp_path / "out" / "gptq")))
    got = model_perplexity(reloaded, windows, recipe.evaluation.batch_size)["ppl"]
    assert got == rep["perplexity"]["quantized"]
    assert rep["perplexity"]["quantized"] < rep["perplexity"]["dense"] * 1.5
    assert rep["exports"]["gptq"]["bytes"] < rep["exports"]["hf"]["bytes"] / 2


def test_quantized_linear_computes_with_the_float16_bias_the_checkpoint_holds():
    """FLAP's compensated biases are float32 in memory but float16 in a GPTQ checkpoint: a QuantLinear rounds its
    bias when built, so the in-memory model and the reloaded checkpoint are the same model (the gptq exporter's
    reload check found the difference: 0.14 in SmolLM2's logits after FLAP 30%)."""
    from flatllm_export.modeling.qlinear import QuantLinear

    w, _, h = problem()
    q, _ = quantize_weight(w, h, 4, 32, True, False, block_size=32)
    bias = torch.randn(w.shape[0], generator=torch.Generator().manual_seed(0)) * 3
    m = QuantLinear.from_quantized(q, bias, "gptq")
    assert torch.equal(m.bias.data, bias.half().float()) and not torch.equal(m.bias.data, bias)
