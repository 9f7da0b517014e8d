import copy

import pytest
import torch

from exporters import ExportContext, export
from flatllm_export.calibration import LayerRun, layer0_inputs
from flatllm_export.compress import compress_flap
from flatllm_export.compress.flap import FlapStats, apply_flap, select_removals
from flatllm_export.modeling import load_model
from flatllm_export.modeling.loading import resolve_model_path
from flatllm_export.validate import onnx_runtime, parity, torch_runtime
from flatllm_export.recipe import ValidationSection

from .test_onnx import check, windows
from .conftest import run_python


def test_flap_at_ratio_zero_reproduces_the_model():
    model = load_model("ref-llama")
    x = windows("ref-llama", split="train")
    with torch.no_grad():
        ref = model(x[:4]).logits
    rep = compress_flap(model, x, 0.0)
    assert rep["achieved_ratio"] == 0.0
    with torch.no_grad():
        torch.testing.assert_close(model(x[:4]).logits, ref, rtol=1e-4, atol=1e-4)


def test_bias_compensation_keeps_the_mean_output():
    """On the calibration data, the pruned o_proj / down_proj mean output equals the dense one."""
    model = load_model("ref-llama")
    x = windows("ref-llama", split="train")[:8]
    inputs, cos, sin = layer0_inputs(model, x, 8)
    layer = model.model.layers[0]
    stats = FlapStats()
    stats.process_layer(0, layer, LayerRun(layer, inputs, cos, sin, torch.device("cpu"), 8))
    captured = {}

    def grab(name):
        def hook(mod, args, out):
            captured[name] = out.detach().double().reshape(-1, out.shape[-1]).mean(0)
        return hook

    def mean_outputs(lyr):
        hs = [lyr.self_attn.o_proj.register_forward_hook(grab("o")), lyr.mlp.down_proj.register_forward_hook(grab("down"))]
        with torch.no_grad():
            lyr(inputs, cos, sin)
        for h in hs:
            h.remove()
        return dict(captured)

    dense = mean_outputs(layer)

    def prune(layer0_plan):
        shell = copy.deepcopy(model)
        plan = {i: {"groups": [], "channels": []} for i in range(model.config.num_hidden_layers)}
        plan[0] = layer0_plan
        apply_flap(shell, [stats.stats[0]] + [None] * (model.config.num_hidden_layers - 1), plan)
        return shell.config.layer_shapes[0], mean_outputs(shell.model.layers[0])

    # heads removed: the other heads' o_proj inputs are unchanged, so o_proj's mean output must be kept
    shape, pruned = prune({"groups": [1, 5], "channels": []})
    assert shape["num_heads"] == 6 and shape["o_bias"]
    assert torch.allclose(pruned["o"], dense["o"], atol=1e-5)
    # channels removed: down_proj's mean output must be kept
    shape, pruned = prune({"groups": [], "channels": list(range(0, 600, 3))})
    assert shape["intermediate_size"] == 640 - 200 and shape["down_bias"]
    assert torch.allclose(pruned["down"], dense["down"], atol=1e-5)


def test_select_removals_never_takes_protected_units():
    units = [{"score": s, "cost": 10, "protected": p} for s, p in [(0, True), (1, False), (2, False)]]
    assert select_removals(units, 16) == {1, 2}
    assert select_removals(units, 14) == {1}  # a second unit would overshoot more than it helps
    mixed = [{"score": 0, "cost": 50, "protected": False}] + [{"score": 1, "cost": 3, "protected": False}] * 5
    assert select_removals(mixed, 12) == {1, 2, 3, 4}  # the expensive unit is skipped, cheap ones fill in


@pytest.mark.parametrize("structure", ["AL-AM", "AL-MM", "UL-UM", "UL-MM"])
def test_structures_meet_ratio_and_keep_a_head(structure):
    model = load_model("ref-gqa")
    rep = compress_flap(model, windows("ref-gqa", split="train"), 0.3, structure=structure)
    assert abs(rep["achieved_ratio"] - 0.3) < 0.005
    assert all(layer["num_heads"] >= 4 and layer["num_kv_heads"] >= 1 for layer in rep["layers"])


def test_uneven_heads_save_reload_fresh_process_and_onnx_parity(tmp_path):
    model = load_model("ref-llama")
    compress_flap(model, windows("ref-llama", split="train"), 0.4)
    heads = [s["num_heads"] for s in model.config.layer_shapes]
    assert len(set(heads)) > 1
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path("ref-llama"))
    prompt = windows("ref-llama")[:1, :32]
    export("hf", model, tok, tmp_path / "hf", ExportContext(sample=prompt))
    with torch.no_grad():
        want = model(prompt).logits
    torch.save({"prompt": prompt, "logits": want}, tmp_path / "want.pt")
    code = r'''
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
w = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    print((m(w["prompt"]).logits - w["logits"]).abs().max().item())
'''
    assert float(run_python(code, str(tmp_path / "hf"), str(tmp_path / "want.pt"))) < 1e-5
    export("onnx", model, None, tmp_path / "onnx", ExportContext())
    res = parity(torch_runtime("torch", model), [onnx_runtime(tmp_path / "onnx")], {"test": windows("ref-llama")},
                 ValidationSection(generate_tokens=64))
    check(res["rows"])
