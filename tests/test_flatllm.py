import copy
import json
from dataclasses import replace

import pytest
import torch
from transformers import AutoTokenizer

from exporters import ExportContext, export
from flatllm_export import accounting, data
from flatllm_export.calibration import run_sequential
from flatllm_export.compress import CompressionError, compress_flatllm
from flatllm_export.compress.allocation import iprs, solve_mean_kept
from flatllm_export.compress.flatllm import VARIANTS, FlatLLMLayerMethod, plan_shapes
from flatllm_export.modeling import load_model

from .conftest import REF_MODELS, ref_path, run_python


def calib(name_or_path, n=16, seqlen=128):
    tok = AutoTokenizer.from_pretrained(ref_path("ref-llama") if "tiny" in str(name_or_path) else name_or_path)
    return data.calibration_windows(data.tokenize(tok, data.shakespeare_text("train")[:400_000]), n, seqlen, 0)


OPTION_SETS = {"paper": VARIANTS["paper"], "ablation": VARIANTS["ablation"],
               "attention-greedy-fp32": replace(VARIANTS["paper"], vo_basis="attention", mlp_select="greedy",
                                                stats_dtype="float32"),
               "weighted": replace(VARIANTS["paper"], vo_basis="weighted", o_proj="lstsq", ridge_scale="trace")}


@pytest.mark.parametrize("name", REF_MODELS)
@pytest.mark.parametrize("qk,options", [(False, "paper"), (True, "paper"), (False, "ablation"), (True, "ablation"),
                                        (False, "attention-greedy-fp32"), (False, "weighted")])
def test_full_rank_compression_reproduces_logits(name, qk, options):
    model = load_model(name)
    x = calib(ref_path(name))
    with torch.no_grad():
        ref = model(x[:4]).logits
    plan = [dict(s, qk_rank=model.config.head_dim if qk else None) for s in model.config.layer_shapes]
    method = FlatLLMLayerMethod(model.config, plan, OPTION_SETS[options], full_rank_too=True)
    run_sequential(model, x, method, batch_size=8)
    if qk:
        assert type(model.model.layers[0].self_attn.q_proj).__name__ == "HeadwiseLowRank"
    with torch.no_grad():
        got = model(x[:4]).logits
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 1e-4 and (got - ref).abs().max().item() < 1e-3


@pytest.mark.parametrize("name", REF_MODELS)
def test_ratio_is_met_within_half_a_percent(name):
    config = load_model(name).config
    before = accounting.decoder_linear_params(config)
    scores = [0.47, 0.2, 0.11, 0.14, 0.17, 0.09][: config.num_hidden_layers]
    for qk in (False, True):
        for ratio in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6):
            _, kept = solve_mean_kept(lambda r: iprs(scores, r),
                                      lambda k: accounting.decoder_linear_params(config, plan_shapes(config, k, qk)),
                                      round(before * (1 - ratio)))
            after = accounting.decoder_linear_params(config, plan_shapes(config, kept, qk))
            assert abs((1 - after / before) - ratio) < 0.005, (qk, ratio, after / before)


def _decoder_linear_weights(model) -> int:
    total = 0
    for layer in model.model.layers:
        for name, p in layer.named_parameters():
            if "layernorm" not in name and not name.endswith(".bias"):
                total += p.numel()
    return total


def test_compress_report_and_exact_accounting():
    model = load_model("ref-gqa")
    x = calib(ref_path("ref-gqa"))
    rep = compress_flatllm(model, x, 0.4, "iprs", qk=True, round_to=8, batch_size=8)
    assert abs(rep["achieved_ratio"] - 0.4) < 0.005
    assert rep["decoder_linear_params_after"] == accounting.decoder_linear_params(model.config)
    assert _decoder_linear_weights(model) == rep["decoder_linear_params_after"]
    dims = [r["v_head_dim"] for r in rep["layers"]]
    assert all(d % 8 == 0 for d in dims) and len(set(dims)) > 1  # per-layer shapes really differ
    imp = [r["importance"] for r in rep["layers"]]
    kept = [r["kept_ratio"] for r in rep["layers"]]
    assert kept[imp.index(max(imp))] == max(kept)


def test_save_reload_in_fresh_process_and_generate(tmp_path):
    model = load_model("ref-llama")
    tok = AutoTokenizer.from_pretrained(ref_path("ref-llama"))
    compress_flatllm(model, calib(ref_path("ref-llama")), 0.5, "iprs")
    prompt = tok("KING HENRY:\nOnce more unto the breach,", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(prompt).logits
    gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False)
    export("hf", model, tok, tmp_path / "hf", ExportContext(sample=prompt))
    torch.save({"prompt": prompt, "logits": logits, "gen": gen}, tmp_path / "want.pt")
    code = r'''
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
want = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    logits = m(want["prompt"]).logits
gen = m.generate(want["prompt"], attention_mask=torch.ones_like(want["prompt"]), max_new_tokens=24, do_sample=False)
assert "flatllm_export" not in sys.modules
print((logits - want["logits"]).abs().max().item(), bool(torch.equal(gen, want["gen"])), type(m).__name__,
      sorted({l.self_attn.v_head_dim for l in m.model.layers}))
'''
    diff, same_gen, cls, dims = run_python(code, str(tmp_path / "hf"), str(tmp_path / "want.pt")).split(maxsplit=3)
    assert float(diff) < 1e-5 and same_gen == "True" and cls == "FlatLlamaForCausalLM"
    assert len(json.loads(dims)) > 1
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]


def test_tiny_gqa_odd_layers_through_the_same_path(tiny_model_dir, tmp_path):
    model = load_model(str(tiny_model_dir))
    original = copy.deepcopy(model)
    x = calib(tiny_model_dir, n=8, seqlen=64)
    plan = [dict(s, qk_rank=16) for s in model.config.layer_shapes]
    run_sequential(model, x, FlatLLMLayerMethod(model.config, plan, full_rank_too=True))
    with torch.no_grad():
        torch.testing.assert_close(model(x[:2]).logits, original(x[:2]).logits, rtol=1e-4, atol=1e-4)
    rep = compress_flatllm(original, x, 0.3, "iprs", qk=False)
    assert abs(rep["achieved_ratio"] - 0.3) < 0.005 and rep["layers"][2]["v_head_dim"] <= 16
    export("hf", original, AutoTokenizer.from_pretrained(tiny_model_dir), tmp_path / "hf", ExportContext(sample=x[:2, :16]))
    reloaded = load_model(str(tmp_path / "hf"))
    assert reloaded.config.layer_shapes == original.config.layer_shapes


def test_nan_statistics_name_the_layer_and_module(tiny_model_dir):
    model = load_model(str(tiny_model_dir))
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[0, 0] = float("inf")
    with pytest.raises(CompressionError, match=r"layer 1 self_attn\.[vo]_proj.*NaN/Inf"):
        compress_flatllm(model, calib(tiny_model_dir, n=4, seqlen=32), 0.3, "uniform")
