"""The gguf target: GPTQ integers written into llama.cpp's Q4_0 / Q8_0 blocks unchanged (read back bit for bit
with the ``gguf`` package's reader), per-layer shapes through the ``deci`` architecture, and the real llama.cpp
(llama-cpp-python) running every export with parity against the float64 reference; every refusal."""

import copy

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import gguf
from exporters import ExportContext, ExportError, export
from exporters.gguf import FILE
from flatllm_export import data
from flatllm_export.compress import compress
from flatllm_export.modeling import load_model
from flatllm_export.modeling.packing import QuantizedWeight
from flatllm_export.modeling.qlinear import QuantLinear
from flatllm_export.preflight import preflight
from flatllm_export.quantize import quantize_model
from flatllm_export.quantize.ggml import GGMLBlockError, ggml_blocks, pad_heads, rope_row_order
from flatllm_export.quantize.gptq import quantize_rtn
from flatllm_export.recipe import CompressionSection, QuantizationSection, RecipeError, ValidationSection, \
    parse_recipe
from flatllm_export.runtime.llamacpp import LlamaCppDecoder, LlamaCppError
from flatllm_export.validate import llamacpp_runtime, parity

from .conftest import ref_path

SETTINGS = ValidationSection(generate_tokens=24, sample_windows=2)


def tokens(name, split, n, seqlen):
    tok = AutoTokenizer.from_pretrained(ref_path(name))
    ids = data.tokenize(tok, data.shakespeare_text(split)[:200_000])
    if split == "train":
        return data.calibration_windows(ids, n, seqlen, 0)
    return data.evaluation_windows(ids, seqlen, n)


def build(name, method=None, bits=None, tied=False):
    model = load_model(name)
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    calib = tokens(name, "train", 8, 128)
    if method:
        compress(model, calib, CompressionSection(method=method, ratio=0.3), linear_multiple=32 if bits else 1)
    if bits:
        quantize_model(model, calib, QuantizationSection(bits=bits, group_size=32), lm_head_bits=bits)
    return model, AutoTokenizer.from_pretrained(ref_path(name))


def test_q4_0_and_q8_0_blocks_hold_gptq_weights_bit_for_bit():
    torch.manual_seed(0)
    w = torch.randn(48, 96)
    for bits in (4, 8):
        q = quantize_rtn(w, bits, 32)
        blocks, kind = ggml_blocks(q)
        back = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[kind])
        assert np.array_equal(back, q.dequantize(torch.float32).numpy()), kind
    with pytest.raises(GGMLBlockError, match="group_size 64"):
        ggml_blocks(quantize_rtn(w, 4, 64))
    with pytest.raises(GGMLBlockError, match="asymmetric"):
        ggml_blocks(quantize_rtn(w, 4, 32, sym=False))


def test_padded_value_heads_are_exact_zeros():
    torch.manual_seed(0)
    heads, width, to = 3, 32, 64
    for axis, shape in ((0, (heads * width, 64)), (1, (40, heads * width))):
        q = quantize_rtn(torch.randn(*shape), 4, 32)
        padded = pad_heads(q, axis, heads, width, to).dequantize(torch.float32)
        w = q.dequantize(torch.float32)
        want = (torch.nn.functional.pad(w.reshape(heads, width, -1), (0, 0, 0, to - width)).flatten(0, 1) if axis == 0
                else torch.nn.functional.pad(w.reshape(w.shape[0], heads, width), (0, to - width)).flatten(1))
        assert torch.equal(padded, want)
    assert rope_row_order(1, 8).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_flatllm_gptq_file_reads_back_as_the_checkpoint(tmp_path):
    """FLAT-LLM on ref-gqa (value dims differ per layer) + GPTQ 4-bit g32 with a tied GPTQ head: every Q4_0
    tensor dequantizes bit for bit to the model's weights (Q/K rows in llama.cpp's order, value heads padded)."""
    model, tok = build("ref-gqa", "flatllm", 4, tied=True)
    rep = export("gguf", model, tok, tmp_path / "gguf", ExportContext())
    assert rep["architecture"] == "deci" and rep["value_heads_padded"] and rep["tensor_types"]["Q4_0"] > 0
    cfg = model.config
    reader = gguf.GGUFReader(tmp_path / "gguf" / FILE)
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied: the head's table is written once
    fields = reader.fields
    assert list(fields["deci.feed_forward_length"].contents()) == [s["intermediate_size"] for s in cfg.layer_shapes]

    def back(name):
        t = tensors[name]
        return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())

    assert torch.equal(back("token_embd.weight"), model.lm_head.weight)
    for i, layer in enumerate(model.model.layers):
        s, a = cfg.layer_shape(i), layer.self_attn
        assert torch.equal(back(f"blk.{i}.attn_q.weight"), a.q_proj.weight[rope_row_order(s["num_heads"], cfg.head_dim)])
        assert torch.equal(back(f"blk.{i}.ffn_down.weight"), layer.mlp.down_proj.weight)
        v = back(f"blk.{i}.attn_v.weight").reshape(s["num_kv_heads"], cfg.head_dim, -1)
        assert torch.equal(v[:, : s["v_head_dim"]].flatten(0, 1), a.v_proj.weight)
        assert not v[:, s["v_head_dim"]:].any()


@pytest.mark.parametrize("name,method,bits", [("ref-llama", None, None), ("ref-llama", None, 4),
                                              ("ref-gqa", "flatllm", None), ("ref-gqa", "flatllm", 4),
                                              ("ref-gqa", "flap", None), ("ref-gqa", "flap", 8)])
def test_llama_cpp_runs_the_export_with_parity(tmp_path, name, method, bits):
    """Dense, FLAT-LLM (per-layer value dims and MLP widths) and FLAP (per-layer head counts), float and GPTQ:
    the self-check and the validation verdict (llama.cpp against the float64 reference of its arithmetic)."""
    model, tok = build(name, method, bits)
    rep = export("gguf", model, tok, tmp_path / "gguf", ExportContext())
    assert rep["architecture"] == ("llama" if method is None else "deci")
    assert rep["max_abs_logit_diff"] <= rep["tolerance"]
    test = tokens(name, "test", 3, 96)
    res = parity(model, [llamacpp_runtime(tmp_path / "gguf", 128)], {"test": test}, SETTINGS)
    row = next(r for r in res["rows"] if r["runtime"] == "llama.cpp")
    assert res["passed"], res["failures"]
    assert abs(row["ppl"] / next(r for r in res["rows"] if r["runtime"] == "torch")["ppl"] - 1) < 0.02


@pytest.mark.parametrize("bits,tied,embedding,lm_head,types", [
    (None, True, "auto", "int8", {"token_embd": "Q8_0"}),  # one Q8_0 table, read by the lookup and the output
    (4, True, "float", "int4", {"token_embd": "F32", "output": "Q4_0"}),  # the GPTQ head, a float lookup
    (None, False, "int8", "int4", {"token_embd": "Q8_0", "output": "Q4_0"}),  # both rounded at export
])
def test_embedding_and_output_tables_as_the_recipe_asks(tmp_path, bits, tied, embedding, lm_head, types):
    """export.embedding / export.lm_head in the gguf target: the tables written are emulation.head_tables' bit for
    bit (the float64 reference's), and llama.cpp passes the self-check and the validation with them."""
    from flatllm_export.emulation import head_tables, table_formats
    from flatllm_export.runtime.llamacpp import gguf_traits

    model, tok = build("ref-llama", None, bits, tied=tied)
    ctx = ExportContext(extra={"embedding": embedding, "lm_head": lm_head})
    export("gguf", model, tok, tmp_path / "gguf", ctx)
    path = tmp_path / "gguf" / FILE
    found = {t.name.removesuffix(".weight"): t for t in gguf.GGUFReader(path).tensors
             if t.name in ("token_embd.weight", "output.weight")}
    assert {k: t.tensor_type.name for k, t in found.items()} == types
    emb_format, head_format = table_formats(model, embedding, lm_head)
    table, head = head_tables(model, emb_format, head_format, 32)
    want = {"token_embd": table, "output": head}
    for name, t in found.items():
        w = want[name]
        w = w.quantized() if isinstance(w, QuantLinear) else w  # the GPTQ head, as it is
        w = w.dequantize(torch.float32) if isinstance(w, QuantizedWeight) else getattr(w, "weight", w).detach()
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(w.shape)
        assert torch.equal(got, w.float()), name
    traits = gguf_traits(path)
    assert traits["embedding"] == emb_format and traits["lm_head"].split("-")[0] == head_format
    res = parity(model, [llamacpp_runtime(tmp_path / "gguf", 128)], {"test": tokens("ref-llama", "test", 2, 96)},
                 SETTINGS)
    assert res["passed"], res["failures"]


def test_self_check_refuses_a_broken_file(tmp_path, monkeypatch):
    """Q/K rows left in Hugging Face's order (rotary pairs wrong): llama.cpp runs the file, the self-check refuses
    it, and no complete-looking output is left; a cut file is refused with llama.cpp's own message."""
    import exporters.gguf as g

    model, tok = build("ref-llama", None, 4)
    monkeypatch.setattr(g, "rope_row_order", lambda heads, dim: torch.arange(heads * dim))
    with pytest.raises(ExportError, match="does not compute the model in llama.cpp"):
        export("gguf", model, tok, tmp_path / "bad", ExportContext())
    monkeypatch.undo()
    export("gguf", model, tok, tmp_path / "good", ExportContext())
    path = tmp_path / "good" / FILE
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(LlamaCppError, match="llama.cpp could not load .*cut.gguf"):
        LlamaCppDecoder(cut)


def test_generation_in_llama_cpp_matches_greedy_pytorch(tmp_path):
    from flatllm_export.validate import greedy_torch

    model, tok = build("ref-llama")
    export("gguf", model, tok, tmp_path / "gguf", ExportContext())
    dec = LlamaCppDecoder(tmp_path / "gguf" / FILE, n_ctx=128)
    prompt = tokens("ref-llama", "test", 1, 16)
    assert np.array_equal(dec.generate(prompt.numpy(), 24), greedy_torch(model, prompt, 24))
    assert dec.tokenize("ROMEO: good night") == tok("ROMEO: good night")["input_ids"]


BASE = {"model": {"path": "ref-llama"}, "evaluation": {"dataset": "shakespeare", "split": "test", "seqlen": 128},
        "export": {"targets": ["gguf"]}}


@pytest.mark.parametrize("changes,message", [
    ({"quantization": {"bits": 4, "group_size": 128}}, "quantization.group_size 128 .*group_size: 32"),
    ({"quantization": {"bits": 4, "group_size": 32, "sym": False}}, "asymmetric"),
    ({"quantization": {"bits": 3, "group_size": 32}}, "3-bit"),
    ({"quantization": {"bits": 4, "group_size": 32, "desc_act": True, "static_groups": False}}, "act-order"),
    ({"compression": {"method": "svd-llm", "ratio": 0.2}}, "SVD-LLM"),
    ({"compression": {"method": "flatllm", "ratio": 0.2, "qk": True}}, "compression.qk: false"),
    ({"export": {"targets": ["gguf"], "dtype": "float16"}}, "export.dtype: float32"),
    ({"export": {"targets": ["hf"]}, "validation": {"runtimes": ["torch", "llama.cpp"]}},
     "'llama.cpp' but export.targets lacks 'gguf'"),
])
def test_recipe_refuses_what_gguf_cannot_hold(changes, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe({**copy.deepcopy(BASE), **changes})


def test_act_order_with_static_groups_is_accepted():
    """Static groups keep act-order's groups consecutive: gguf (and onnx) take them."""
    raw = {**copy.deepcopy(BASE), "quantization": {"bits": 4, "group_size": 32, "desc_act": True,
                                                     "static_groups": True}}
    raw["export"]["targets"] = ["gguf", "onnx"]
    assert parse_recipe(raw).quantization.static_groups


def test_missing_binding_is_refused_with_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llama_cpp" else real(n, *a))
    with pytest.raises(RecipeError, match=r"pip install 'flatllm-export\[llamacpp\]'"):
        preflight(parse_recipe(copy.deepcopy(BASE)))


def test_imported_model_keeps_its_gguf_tokenizer_metadata(tmp_path):
    """A model imported from a GGUF is exported with its source's tokenizer.* keys unchanged (here the test
    writer's, which names no pre-tokenizer, where the Hugging Face path would write 'gpt-2')."""
    from flatllm_export.modeling import load_tokenizer
    from flatllm_export.modeling.gguf_import import import_gguf

    from .gguf_writer import write_gguf

    source = write_gguf(ref_path("ref-llama"), tmp_path / "src.gguf")
    import_gguf(source, tmp_path / "imported")
    model, tok = load_model(str(tmp_path / "imported")), load_tokenizer(str(tmp_path / "imported"))
    export("gguf", model, tok, tmp_path / "gguf", ExportContext())

    def fields(path):
        r = gguf.GGUFReader(path)
        return {k: f.contents() for k, f in r.fields.items() if k.startswith("tokenizer.")}

    assert fields(tmp_path / "gguf" / FILE) == fields(source)
