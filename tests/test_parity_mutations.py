"""Exports broken in small ways are refused, by the exporter's own check and by ``validate``, each naming the
runtime and the figure; the unbroken export passes both. One quantized (int4 g32, GPTQ lm_head), tied-head ref-gqa
serves every case: each mutation changes a copy of it (or the graph's cache handling) and the check runs against
the original. Every case runs at the shipped default (MatMulNBits accuracy_level 4: int8 activations; the tied
embedding read from the int4 lm_head's table) and at accuracy_level 0 with a float embedding (exact arithmetic)."""

import copy
import dataclasses

import pytest
import torch
from transformers import AutoTokenizer
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import exporters.onnx as onnx_exporter
import exporters.onnx_graph as onnx_graph
import onnx
from exporters import ExportContext, ExportError, check_reload, export
from flatllm_export import data
from flatllm_export.modeling import load_model
from flatllm_export.quantize import quantize_model
from flatllm_export.modeling.qlinear import QuantLinear
from flatllm_export.runtime.ort import OrtDecoder
from flatllm_export.recipe import QuantizationSection, ValidationSection
from flatllm_export.validate import onnx_runtime, parity, torch_runtime

from .conftest import ref_path

SETTINGS = ValidationSection(generate_tokens=24, sample_windows=2)
LAYER = 3


@pytest.fixture(scope="module")
def base():
    """ref-gqa with its lm_head tied to the embedding, GPTQ int4 g32, the lm_head too (calibration 4 x 64 tokens:
    fast)."""
    tok = AutoTokenizer.from_pretrained(ref_path("ref-gqa"))
    model = load_model("ref-gqa")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    calib = data.calibration_windows(data.tokenize(tok, data.shakespeare_text("train")[:100_000]), 4, 64, 0)
    quantize_model(model, calib, QuantizationSection(bits=4, group_size=32), lm_head_bits=4)
    test = data.evaluation_windows(data.tokenize(tok, data.shakespeare_text("test")[:60_000]), 96, 3)
    return model, test


def requantized(q: QuantLinear, **changes) -> QuantLinear:
    w = q.quantized()
    return QuantLinear.from_quantized(dataclasses.replace(w, **changes), q.bias, q.checkpoint_format)


def scales_up(model):  # one linear's int4 scales x 1.01
    mlp = model.model.layers[LAYER].mlp
    mlp.down_proj = requantized(mlp.down_proj, scales=(mlp.down_proj.quantized().scales.float() * 1.01).half())


def swap_value_heads(model):  # KV heads 0 and 1 of one layer's v_proj exchange their rows
    attn = model.model.layers[LAYER].self_attn
    d = attn.v_head_dim
    perm = torch.cat([torch.arange(d, 2 * d), torch.arange(d), torch.arange(2 * d, attn.v_proj.out_features)])
    w = attn.v_proj.quantized()
    attn.v_proj = requantized(attn.v_proj, codes=w.codes[perm], scales=w.scales[:, perm], zeros=w.zeros[:, perm])


def rope_base(model):  # rotary base 1% off
    model.config.rope_theta *= 1.01
    model.model.rotary_emb = LlamaRotaryEmbedding(config=model.config)


def untie_head(model):  # a tied lm_head untied and perturbed (relative 1e-3 noise)
    w = model.model.embed_tokens.weight.detach()
    g = torch.Generator().manual_seed(0)
    model.lm_head = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    model.lm_head.weight.data = w + 1e-3 * w.std() * torch.randn(w.shape, generator=g)


class ValuesOneOff(onnx_graph.GraphLayer):
    """Every layer reads its past values one position off (past keys stay right): prefill is untouched."""

    def forward(self, x, residual, lengths, past_k, past_v):
        past_v = torch.cat([past_v[:, :, :1], past_v[:, :, :-1]], dim=2)
        return super().forward(x, residual, lengths, past_k, past_v)


LEVELS = {0: ExportContext(extra={"accuracy_level": 0}),  # float32 activations, float embedding: exact arithmetic
          4: ExportContext(extra={"accuracy_level": 4, "embedding": "auto"})}  # the shipped default
MUTATIONS = {"scales": scales_up, "value_heads": swap_value_heads, "rope_base": rope_base, "tied_head": untie_head,
             "kv_cache": None}


def write_onnx(model, out, level, monkeypatch=None, layer_class=None):
    out.mkdir(parents=True)
    if layer_class is not None:
        monkeypatch.setattr(onnx_graph, "GraphLayer", layer_class)
    opts = onnx_exporter.options(model, LEVELS[level])
    onnx_exporter.export_graph(model, out / "model.onnx", opts)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    int4 = any(n.op_type == "MatMulNBits" for n in graph.node)
    onnx_exporter.write_metadata(model, out, "float32", opts, int4)
    return int4


@pytest.mark.parametrize("level", list(LEVELS))
def test_unbroken_export_passes_both_checks(base, tmp_path, level):
    model, test = base
    rep = export("onnx", model, None, tmp_path / "onnx", LEVELS[level])
    assert rep["int4"] and rep["max_abs_logit_diff"] <= rep["tolerance"] and rep["floor_kind"] == "fp32"
    assert rep["arithmetic"] == ("exact" if level == 0 else "mlas-int8 activations, int4 embedding")
    res = parity(model, [onnx_runtime(tmp_path / "onnx")], {"test": test}, SETTINGS)
    assert res["passed"], res["failures"]
    one = parity(model, [onnx_runtime(tmp_path / "onnx")], {"test": test[:1]}, SETTINGS)  # the sample is all there is
    assert one["passed"] and one["sample"]["windows"] == 1, one["failures"]
    judged = {v["figure"] for v in res["verdicts"]["onnxruntime"] if v["judged"]}
    # int8 activations are discontinuous: the verdict rests on row medians, end to end and layer by layer
    assert judged == ({"logits", "ppl", "greedy", "layers"} if level == 0 else {"layers"})
    assert "torch" not in res["verdicts"]  # the in-memory model is the floor, not a judged runtime
    ort = next(r for r in res["rows"] if r["runtime"] == "onnxruntime")
    floor = res["floors"][ort["floor"]]
    if level == 0:
        assert ort["logit_dev_f64"] <= 2 * floor["logits"]  # ~ PyTorch's own distance from the same arithmetic
    else:
        assert ort["logit_tol"] == "reported" and ort["logit_rows_tol"] == "reported" and ort["ok"]
    if level == 4:  # the approximations and what each costs are reported, beside the runtime's own ppl
        cost = {c["approximation"]: c for c in res["accuracy_cost"]}
        assert set(cost) == {"mlas-int8 activations", "int4 embedding", "all together"}
        together = cost["all together"]
        assert abs(together["ppl_emulated"] / together["ppl_runtime"] - 1) < 1e-3  # the emulation is the runtime


@pytest.mark.parametrize("level", list(LEVELS))
@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_broken_onnx_export_is_refused(base, tmp_path, monkeypatch, mutation, level):
    model, test = base
    mutant = model
    if MUTATIONS[mutation] is not None:
        mutant = copy.deepcopy(model)
        MUTATIONS[mutation](mutant)
    out = tmp_path / "onnx"
    write_onnx(mutant, out, level, monkeypatch, ValuesOneOff if mutation == "kv_cache" else None)
    monkeypatch.undo()
    with pytest.raises(ExportError) as err:  # the exporter's own check, against the unbroken model
        onnx_exporter.self_check(model, OrtDecoder(out), "float32", True, level)
    assert "onnxruntime: " in str(err.value) and "noise floor" in str(err.value)
    res = parity(model, [onnx_runtime(out)], {"test": test}, SETTINGS)
    assert not res["passed"] and res["failures"]
    failed = {v["figure"] for v in res["verdicts"]["onnxruntime"] if v["judged"] and not v["ok"]}
    assert all(m.startswith("onnxruntime: ") for m in res["failures"])
    assert "layers" in failed, res["failures"]  # layer by layer, on onnxruntime's own inputs
    where = next(v["where"] for v in res["verdicts"]["onnxruntime"] if v["figure"] == "layers")
    if mutation == "kv_cache":  # prefill is right; only decoding reads the cache
        assert "(decode)" in where, where
    elif mutation == "tied_head":
        assert "at head" in where, where
    elif mutation in ("scales", "value_heads"):
        assert f"layer {LAYER} " in where, where


def test_broken_gptq_checkpoint_is_refused(base, tmp_path):
    """int4 scales x 1.01 written to the checkpoint: the gptq exporter's reload check and validate refuse it."""
    model, test = base
    mutant = copy.deepcopy(model)
    scales_up(mutant)
    export("gptq", mutant, None, tmp_path / "gptq", ExportContext())  # consistent with itself
    reloaded = load_model(str(tmp_path / "gptq"))
    with pytest.raises(ExportError, match=r"reloaded gptq/: max \|logit - float64\|"):
        check_reload("gptq", model, reloaded, tmp_path / "gptq", ExportContext())
    res = parity(model, [torch_runtime("gptq", reloaded, "reloaded")], {"test": test}, SETTINGS)
    assert not res["passed"] and any(m.startswith("gptq: max |logit - float64|") for m in res["failures"])


def test_gptq_export_that_drops_an_untied_head_is_refused(base, tmp_path):
    """The config still says tied, the in-memory head was untied and changed: the checkpoint (which stores no
    lm_head for a tied model) would silently lose it. The gptq exporter's own check refuses to report success."""
    model, _ = base
    mutant = copy.deepcopy(model)
    untie_head(mutant)  # a float head again: the checkpoint's config says so
    mutant.config.quantization_config = {**mutant.config.quantization_config, "lm_head": False}
    with pytest.raises(ExportError, match=r"gptq export .* reloaded gptq/: max \|logit - float64\|"):
        export("gptq", mutant, None, tmp_path / "gptq", ExportContext())
