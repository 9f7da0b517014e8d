"""The float64 reference, the shared verdict and the recipe keys of parity."""

import math
import weakref

import pytest
import torch
from transformers.models.llama import modeling_llama

from flatllm_export import reference
from flatllm_export.emulation import Arithmetic, mlas_int8
from flatllm_export.quantize.gptq import quantize_rtn
from flatllm_export.modeling.qlinear import QuantLinear
from flatllm_export.modeling import load_model
from flatllm_export.parity import greedy_divergence, judge, onnx_floor_kind
from flatllm_export.quantize import quantize_model
from flatllm_export.recipe import QuantizationSection, RecipeError, parse_recipe


def rmsnorm_in_own_dtype(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def whole_model_float64(model, ids, monkeypatch, change=None) -> torch.Tensor:
    """Logits of the whole model converted to float64 with every op in float64 (transformers' RMSNorm and rotary
    compute in float32 whatever they are given: patched), after ``change(whole)`` if given."""
    whole = reference.with_dtype(model, torch.float64)
    if change is not None:
        change(whole)
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rmsnorm_in_own_dtype)
    monkeypatch.setattr(whole.model.rotary_emb, "forward",
                        lambda x, pos: reference.rotary64(model.config, None, pos.shape[1], pos.shape[0]))
    with torch.no_grad():
        return whole(ids, use_cache=False).logits


@pytest.fixture(scope="module")
def quantized_tiny(tiny_model_dir):
    model = load_model(str(tiny_model_dir))
    calib = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    quantize_model(model, calib, QuantizationSection(bits=4, group_size=32))
    return model


def test_float64_reference_equals_the_whole_model_in_float64(quantized_tiny, monkeypatch):
    """Layer by layer (GPTQ weights dequantized) == the whole model converted to float64 with every op in float64
    (transformers' RMSNorm and rotary compute in float32 whatever they are given: patched here)."""
    model = quantized_tiny
    ids = torch.randint(0, model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    got = reference.float64_logits(model, ids, batch_size=2)
    assert got.dtype == torch.float64 and next(model.parameters()).dtype == torch.float32  # model untouched
    assert torch.equal(got, whole_model_float64(model, ids, monkeypatch))
    fp32 = model(ids, use_cache=False).logits.double()
    assert 0 < (fp32 - got).abs().max() < 1e-3  # float32 is near, not equal


def test_float64_reference_holds_one_float64_layer_at_a_time(quantized_tiny, monkeypatch):
    alive, most = weakref.WeakSet(), []
    make = reference.float64_layer

    def tracked(layer, *args):
        copy_ = make(layer, *args)
        alive.add(copy_)
        most.append(len(alive))
        return copy_

    monkeypatch.setattr(reference, "float64_layer", tracked)
    reference.float64_logits(quantized_tiny, torch.zeros(1, 8, dtype=torch.long))
    assert len(most) == quantized_tiny.config.num_hidden_layers and max(most) == 1


def test_verdict_is_k_times_the_floor_plus_one_ulp():
    ulp = torch.finfo(torch.float32).eps * 10.0
    ok = judge("onnxruntime", "logits", 3.9e-4, 1e-4, "fp32", 4.0, scale=10.0)
    assert ok.ok and math.isclose(ok.tolerance, 4e-4 + ulp)
    bad = judge("onnxruntime", "logits", 4.1e-4, 1e-4, "fp32", 4.0, scale=10.0)
    assert not bad.ok
    assert bad.message.startswith("onnxruntime: max |logit - float64| 0.00041 > tolerance 0.000401")
    assert "4 x noise floor 0.0001 (fp32)" in bad.message
    assert not judge("x", "ppl", math.nan, 1.0, "fp32", 4.0, 1.0).ok
    assert judge("x", "logits", 0.0, 0.0, "fp32", 1.0, 0.0).ok  # identical to PyTorch, even with a zero floor
    with pytest.raises(ValueError, match="unknown parity figure"):
        judge("x", "bleu", 0.0, 0.0, "fp32", 1.0, 0.0)


def test_greedy_divergence_reports_step_and_float64_margin():
    truth = torch.zeros(1, 6, 5, dtype=torch.float64)  # prompt of 2 tokens, 4 generated; step s at position 1 + s
    for s, top in enumerate([1, 2, 3, 4]):
        truth[0, 1 + s, top] = 1.0
    truth[0, 3, 0] = 0.999  # step 2: runner-up 0 at margin 1e-3
    tokens = torch.tensor([[0, 0, 1, 2, 0, 0]])  # steps 2 and 3 take token 0
    g = greedy_divergence(tokens, truth[:, :-1], prompt_len=2)
    assert g["first"] == 2 and math.isclose(g["first_margin"], 1e-3) and g["diverged"] == [2, 3]
    assert g["worst"] == 3 and math.isclose(g["max_margin"], 1.0)
    same = greedy_divergence(torch.tensor([[0, 0, 1, 2, 3, 4]]), truth[:, :-1], 2)
    assert same["first"] is None and same["max_margin"] == 0.0


def test_floor_kinds_of_onnx_exports():
    assert onnx_floor_kind("float32", False, None) == "fp32"
    assert onnx_floor_kind("float32", True, 0) == "fp32"
    assert onnx_floor_kind("float16", False, None) == "fp16"
    assert onnx_floor_kind("float32", True, 4) == "fp32"  # int8 activations: an arithmetic, emulated at fp32


def test_recipe_refuses_the_removed_fixed_tolerances_and_a_k_below_one():
    base = {"model": {"path": "ref-llama"}, "evaluation": {}}
    with pytest.raises(RecipeError) as err:
        parse_recipe({**base, "validation": {"max_logit_diff": 1e-3, "max_ppl_rel_diff": 1e-4}})
    msg = str(err.value)
    assert "validation" in msg and "max_logit_diff" in msg and "noise_k" in msg and "float64" in msg
    with pytest.raises(RecipeError, match="validation.noise_k"):
        parse_recipe({**base, "validation": {"noise_k": 0.5}})
    assert parse_recipe({**base, "validation": {"noise_k": 8, "runtimes": ["torch"]}}).validation.noise_k == 8


def test_emulated_reference_is_the_whole_model_in_float64_with_quantized_inputs(quantized_tiny, monkeypatch):
    """float64 reference of an arithmetic with int8 activations and an int8 embedding == the whole model in
    float64 whose every quantized linear first quantizes its input as MLAS does, and whose embedding is the
    round-to-nearest table."""
    model = quantized_tiny
    arith = Arithmetic(activations="mlas-int8", embedding="int8", block_size=32)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    got = reference.float64_logits(model, ids, batch_size=2, arith=arith)
    def emulate(whole):
        table = quantize_rtn(model.model.embed_tokens.weight.detach().float(), 8, 32).dequantize(torch.float32)
        whole.model.embed_tokens.weight.data = table.double()
        for m in whole.modules():
            if isinstance(m, QuantLinear):
                m.register_forward_pre_hook(lambda mod, args: (mlas_int8(args[0], mod.group_size),))

    assert torch.equal(got, whole_model_float64(model, ids, monkeypatch, emulate))
    exact = reference.float64_logits(model, ids, batch_size=2)
    assert (exact - got).abs().max() > 1e-3  # the emulation is not the exact model
    floor = reference.emulated_logits(model, ids, arith).double()  # PyTorch fp32 of the same arithmetic
    assert 0 < (floor - got).abs().max() < (exact - got).abs().max()


def test_a_runtime_that_stops_early_at_eos_is_compared_as_far_as_it_went(quantized_tiny):
    from flatllm_export.recipe import ValidationSection
    from flatllm_export.validate import parity, torch_runtime

    model = quantized_tiny
    full = torch_runtime("stops early", model, "")
    full.generate_fn = (lambda gen: lambda ids, n: gen(ids, n)[:, : ids.shape[1] + 5])(full.generate_fn)
    windows = {"test": torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))}
    res = parity(model, [full], windows, ValidationSection(generate_tokens=12))
    row = next(r for r in res["rows"] if r["runtime"] == "stops early" and r["greedy"])
    assert "5/5 = torch" in row["greedy"] and "stopped after 5 of 12 tokens" in row["greedy"], row
    assert res["passed"], res["failures"]


def test_accuracy_budget_fails_the_validation_and_names_the_figures(quantized_tiny):
    from flatllm_export.recipe import ValidationSection
    from flatllm_export.validate import Runtime, parity, torch_runtime

    model = quantized_tiny
    windows = {"test": torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))}
    same = torch_runtime("copy", model, "")
    def noisy(ids):  # logits with noise on top: a higher perplexity
        g = torch.Generator().manual_seed(0)
        logits = same.logits_fn(ids)
        return logits + 5 * torch.randn(logits.shape, generator=g)

    worse = Runtime("worse", noisy, same.generate_fn)
    res = parity(model, [same], windows, ValidationSection(generate_tokens=4, max_ppl_increase=0.01))
    assert res["passed"] and res["max_ppl_increase"] == 0.01, res["failures"]
    res = parity(model, [same, worse], windows, ValidationSection(generate_tokens=4, max_ppl_increase=0.01))
    budget = [m for m in res["failures"] if "max_ppl_increase" in m]
    assert len(budget) == 1 and budget[0].startswith("worse: accuracy cost on test: ppl ") and "(+1.00%)" in budget[0]


def test_recipe_checks_the_accuracy_budget():
    base = {"model": {"path": "ref-llama"}, "evaluation": {}}
    for value in (0, -0.1, "a lot"):
        with pytest.raises(RecipeError, match="validation.max_ppl_increase"):
            parse_recipe({**base, "validation": {"max_ppl_increase": value}})
    with pytest.raises(RecipeError, match="validation.max_ppl_increase .* needs an evaluation section"):
        parse_recipe({"model": {"path": "ref-llama"}, "validation": {"max_ppl_increase": 0.02, "runtimes": ["torch"]}})
    good = {"max_ppl_increase": 0.02, "runtimes": ["torch"]}
    assert parse_recipe({**base, "validation": good}).validation.max_ppl_increase == 0.02
