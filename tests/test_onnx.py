import json
import subprocess
import sys

import onnx
import pytest
import torch
from transformers import AutoTokenizer

from exporters import ExportContext, export
from flatllm_export import data
from flatllm_export.compress import compress, compress_flatllm
from flatllm_export.modeling import load_model
from flatllm_export.quantize import quantize_model
from flatllm_export.recipe import CompressionSection, QuantizationSection, ValidationSection
from flatllm_export.validate import onnx_runtime, parity

from .conftest import ROOT, ref_path

SETTINGS = ValidationSection(generate_tokens=64)


def windows(name, n=8, seqlen=128, split="test"):
    tok = AutoTokenizer.from_pretrained(ref_path(name))
    text = data.shakespeare_text(split)
    if split == "train":
        return data.calibration_windows(data.tokenize(tok, text[:400_000]), 16, seqlen, 0)
    return data.evaluation_windows(data.tokenize(tok, text), seqlen, n)


def rows_of(res) -> dict:
    return {r["runtime"]: r for r in res["rows"]}


def check(res, kind="fp32"):
    assert res["passed"], res["failures"]
    rows = {r["runtime"]: r for r in res["rows"]}
    ort = rows["onnxruntime"]
    assert ort["floor"] == kind and ort["ok"]
    if "int8" in kind:  # discontinuous arithmetic: judged by row medians (end to end and layer by layer)
        assert ort["logit_tol"] == ort["logit_rows_tol"] == "reported" and "<=" in ort["layers"]
        floor = rows["torch fp32 emulating onnxruntime"]  # PyTorch computing the same arithmetic, all windows
        assert abs(ort["ppl"] / floor["ppl"] - 1) < 2e-3 and abs(ort["ppl_increase"]) < 5e-2
        return
    assert ort["logit_dev_f64"] <= ort["logit_tol"] and ort["ppl_dev_f64"] <= ort["ppl_tol"]
    if kind == "fp32":  # fp32 onnxruntime sits at PyTorch's own distance from float64
        assert ort["logit_dev_f64"] <= 4 * rows["torch"]["logit_dev_f64"] and abs(ort["ppl_increase"]) < 1e-5
    else:
        assert abs(ort["ppl_increase"]) < 5e-3


@pytest.mark.parametrize("name", ["ref-llama", "ref-gqa"])
@pytest.mark.parametrize("ratio,attention", [(0.3, "gqa"), (0.5, "standard")])
def test_compressed_fp32_parity(tmp_path, name, ratio, attention):
    model = load_model(name)
    compress_flatllm(model, windows(name, split="train"), ratio, "iprs")
    rep = export("onnx", model, None, tmp_path / "onnx", ExportContext(extra={"attention": attention}))
    assert rep["max_abs_logit_diff"] <= rep["tolerance"] < 1e-3 and not rep["int4"]
    meta = json.loads((tmp_path / "onnx" / "flatllm_onnx.json").read_text())
    v_dims = [s["v_head_dim"] for s in model.config.layer_shapes]
    assert [m["v_head_dim"] for m in meta["layers"]] == v_dims and len(set(v_dims)) > 1
    # the standard Attention op keeps each layer's value head dim in the cache; GroupQueryAttention takes the key's
    want = v_dims if attention == "standard" else [model.config.head_dim] * len(v_dims)
    assert [m["value_dim"] for m in meta["layers"]] == want and meta["attention"] == attention
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False).graph
    dims = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input}
    for i, m in enumerate(meta["layers"]):
        assert dims[f"past_key_values.{i}.value"] == ["batch", m["num_kv_heads"], "past_sequence", m["value_dim"]]
    res = parity(model, [onnx_runtime(tmp_path / "onnx")], {"test": windows(name)}, SETTINGS)
    check(res)


@pytest.mark.parametrize("name,level", [("ref-llama", 0), ("ref-gqa", 4)])
def test_int4_matmulnbits_parity_with_the_gptq_model(tmp_path, name, level):
    # level 0: float32 activations, the exact twin of the GPTQ model; 4 (the default): int8 activations
    model = load_model(name)
    calib = windows(name, split="train")
    compress_flatllm(model, calib, 0.3, "iprs", linear_multiple=32)
    quantize_model(model, calib, QuantizationSection(bits=4, group_size=32))
    rep = export("onnx", model, None, tmp_path / "onnx", ExportContext(extra={"accuracy_level": level}))
    assert rep["int4"]
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph
    n_nbits = sum(n.op_type == "MatMulNBits" for n in graph.node)
    assert n_nbits == 4 * model.config.num_hidden_layers  # fused q/k/v and gate/up, o_proj, down_proj
    res = parity(model, [onnx_runtime(tmp_path / "onnx")], {"test": windows(name)}, SETTINGS)
    check(res, "fp32" if level == 0 else "fp32, mlas-int8 activations")
    if level == 4:  # int8 activations cost accuracy, which is reported apart from parity
        assert rows_of(res)["onnxruntime"]["ppl_increase"] != 0.0


def test_dense_reference_export_matches_pytorch_and_fp16_runs(tmp_path):
    model = load_model("ref-llama")
    export("onnx", model, None, tmp_path / "fp32", ExportContext())
    res = parity(model, [onnx_runtime(tmp_path / "fp32")], {"test": windows("ref-llama")}, SETTINGS)
    check(res)
    export("onnx", model, None, tmp_path / "fp16", ExportContext(dtype="float16"))
    res = parity(model, [onnx_runtime(tmp_path / "fp16")], {"test": windows("ref-llama")}, SETTINGS)
    check(res, kind="fp16")
    assert {"fp32", "fp16"} <= set(res["floors"]) and res["floors"]["fp16"]["logits"] > res["floors"]["fp32"]["logits"]


def test_full_recipe_generate_and_validate_commands(tmp_path):
    out = tmp_path / "run"

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "flatllm_export.cli", *args], capture_output=True, text=True,
                              cwd=ROOT)

    # accuracy_level 0: float32 activations, so onnxruntime's greedy text can be compared with PyTorch's exactly
    res = cli("run", "recipes/ref-gqa-full.yaml", "--output", str(out), "--set", "calibration.nsamples=32",
              "--set", "export.accuracy_level=0",
              "--set", "evaluation.max_windows=16", "--set", "validation.generate_tokens=32")
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["validation"]["passed"] and {r["runtime"] for r in rep["validation"]["rows"]} == {
        "torch", "gptq", "onnxruntime", "float64 reference"}
    assert sorted(p.name for p in out.iterdir()) == ["allocation.png", "gptq", "hf", "onnx", "recipe.yaml",
                                                     "report.json", "report.md"]
    gen_onnx = cli("generate", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "20")
    gen_torch = cli("generate", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--runtime", "torch")
    assert gen_onnx.returncode == 0 and gen_onnx.stdout.startswith("ROMEO:") and len(gen_onnx.stdout) > 20
    assert gen_onnx.stdout == gen_torch.stdout  # greedy: same text from onnxruntime and the GPTQ checkpoint
    for folder, runtime, has in ((out / "onnx", "torch", "onnxruntime, onnxruntime-genai"),
                                 (out / "hf", "onnxruntime", "torch")):  # never another runtime in silence
        wrong = cli("generate", str(folder), "--prompt", "ROMEO:", "--runtime", runtime)
        assert wrong.returncode == 2 and f"has no export for --runtime {runtime}: it can run with {has}" \
            in wrong.stderr, wrong.stderr
    val = cli("validate", str(out))
    assert val.returncode == 0 and "PASS" in val.stdout and (out / "validation.json").exists()


def test_runtime_keeps_the_cache_in_onnxruntime_and_checks_metadata(tmp_path):
    import numpy as np
    import onnxruntime as ort

    from flatllm_export.runtime.ort import OrtDecoder

    model = load_model("ref-gqa")
    compress_flatllm(model, windows("ref-gqa", split="train"), 0.3, "iprs")
    export("onnx", model, None, tmp_path / "onnx", ExportContext())
    dec = OrtDecoder(tmp_path / "onnx")
    ids = windows("ref-gqa", n=1)[:, :20].numpy()
    prefill = dec.logits_buffer(1, 19)
    past = dec.run(ids[:, :19], dec.empty_past(1), prefill)
    assert all(isinstance(p, ort.OrtValue) for p in past)
    assert [tuple(p.shape()) for p in past] == dec.cache_shapes(1, 19)
    step = dec.logits_buffer(1, 1)
    dec.run(ids[:, 19:], past, step)  # the presents fed back as they are
    numpy_past = dec.forward(ids[:, :19])[1]
    want = dec.forward(ids[:, 19:], numpy_past)[0]
    with torch.no_grad():
        full = model(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(step - want).max() == 0 and np.abs(step[0, 0] - full[0, -1]).max() < 1e-4
    assert np.abs(prefill - full[:, :19]).max() < 1e-4
    # GroupQueryAttention: one max-length buffer per layer, bound as past and present, written in place
    shared = dec.shared_past(1, 24)
    prefill_shared, step_shared = dec.logits_buffer(1, 19), dec.logits_buffer(1, 1)
    assert dec.run(ids[:, :19], shared, prefill_shared, past_len=0) is shared
    dec.run(ids[:, 19:], shared, step_shared, past_len=19)
    assert np.abs(prefill_shared - prefill).max() < 1e-5 and np.abs(step_shared - step).max() < 1e-5
    assert [tuple(p.shape()) for p in shared] == dec.cache_shapes(1, 24)
    assert np.abs(shared[0].numpy()[:, :, :20] - dec.forward(ids)[1][0]).max() < 1e-5  # the keys, in place
    assert (dec.generate(ids[:, :10], 12) == OrtDecoder(tmp_path / "onnx").generate(ids[:, :10], 12)).all()
    left_padded = np.concatenate([np.zeros((1, 1), np.int64), np.ones((1, 19), np.int64)], 1)
    with pytest.raises(ValueError, match="right-padded"):
        dec.forward(ids[:, :20], attention_mask=left_padded)
    meta_path = tmp_path / "onnx" / "flatllm_onnx.json"
    meta = json.loads(meta_path.read_text())
    meta["layers"][0]["num_kv_heads"] += 1  # the graph declares the real count
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="metadata and graph disagree"):
        OrtDecoder(tmp_path / "onnx")


def test_empty_input_is_refused_not_a_crash_inside_onnxruntime(tmp_path):
    from flatllm_export.runtime.ort import OrtDecoder

    model = load_model("ref-llama")
    export("onnx", model, None, tmp_path / "onnx", ExportContext())
    ids = windows("ref-llama", n=2)[:, :30].numpy()
    with pytest.raises(ValueError, match="hold no tokens"):  # onnxruntime's attention kernels divide by it
        OrtDecoder(tmp_path / "onnx").forward(ids[:0])


def op_counts(folder):
    model = onnx.load(str(folder / "model.onnx"))  # with the tensors of model.onnx.data
    counts = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return model, counts


@pytest.mark.parametrize("attention", ["gqa", "standard"])
def test_lean_graph_has_fused_ops_and_no_per_layer_shape_arithmetic(tmp_path, attention):
    model = load_model("ref-gqa")
    n = model.config.num_hidden_layers
    rep = export("onnx", model, None, tmp_path / "onnx", ExportContext(extra={"attention": attention}))
    assert rep["max_abs_logit_diff"] < 1e-4
    proto, ops = op_counts(tmp_path / "onnx")
    assert {o.domain: o.version for o in proto.opset_import}[""] == 23
    if attention == "gqa":  # rotary inside, no position_ids input, no mask: lengths from attention_mask
        assert ops["GroupQueryAttention"] == n and "RotaryEmbedding" not in ops and "Attention" not in ops
        assert "position_ids" not in {i.name for i in proto.graph.input} and "Where" not in ops
    else:
        assert ops["Attention"] == n and ops["RotaryEmbedding"] == 2 * n
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * n and ops["SimplifiedLayerNormalization"] == 1
    assert ops["MatMul"] == 4 * n + 1  # fused q/k/v, o_proj, fused gate/up, down_proj per layer; lm_head
    assert "Constant" not in ops and "ReduceMean" not in ops and "Softmax" not in ops
    # what is left besides those is the once-per-call mask and the MLP's SiLU: bounded, not per-layer chains
    assert sum(ops.values()) <= 18 * n + 30 and ops.get("Unsqueeze", 0) + ops.get("Concat", 0) <= 10, ops


@pytest.mark.parametrize("method,qk", [("flap", False), ("svd-llm", False), ("flatllm", True)])
def test_per_layer_shapes_of_every_method_match_pytorch(tmp_path, tiny_model_dir, method, qk):
    # SVD-LLM's whitened SVDs are slow on ref-gqa under a shared CPU: its factors are checked on the tiny model
    model = load_model(str(tiny_model_dir) if method == "svd-llm" else "ref-gqa")
    compress(model, windows("ref-gqa", split="train")[:8], CompressionSection(method=method, ratio=0.3, qk=qk))
    export("onnx", model, None, tmp_path / "onnx", ExportContext())
    if method == "svd-llm":
        assert any(s["lowrank"] for s in model.config.layer_shapes)
    res = parity(model, [onnx_runtime(tmp_path / "onnx")], {"test": windows("ref-gqa", n=4)},
                 SETTINGS)
    check(res)


def tie(model):
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_tied_embedding_and_lm_head_are_written_once(tmp_path, bits):
    model = tie(load_model("ref-llama"))
    vocab, hidden = model.model.embed_tokens.weight.shape
    fp = export("onnx", model, None, tmp_path / "fp", ExportContext())
    q = export("onnx", model, None, tmp_path / "q", ExportContext(extra={"embedding": f"int{bits}",
                                                                         "lm_head": f"int{bits}"}))
    proto, ops = op_counts(tmp_path / "q")
    assert ops["GatherBlockQuantized"] == 1 and ops["MatMulNBits"] == 1  # lm_head (the decoder stays float)
    table = vocab * hidden * bits // 8
    assert sum(t.raw_data.__len__() == table for t in proto.graph.initializer) == 1  # one copy, read by both
    gather = next(n for n in proto.graph.node if n.op_type == "GatherBlockQuantized")
    assert gather.input[0] not in {t.name for t in proto.graph.initializer}  # a view of the lm_head's data
    assert q["bytes"] < fp["bytes"] - 2 * vocab * hidden * 4 + table * 1.3
    res = parity(model, [onnx_runtime(tmp_path / "q")], {"test": windows("ref-llama", n=4)},
                 SETTINGS)
    ort = next(r for r in res["rows"] if r["runtime"] == "onnxruntime")
    assert ort["ok"] and abs(ort["ppl_increase"]) < (0.03 if bits == 4 else 0.002), res["rows"]


def test_flatllm_int4_with_padded_value_cache_generates_in_onnxruntime_genai(tmp_path):
    pytest.importorskip("onnxruntime_genai")
    from flatllm_export.runtime.genai import GenaiDecoder
    from flatllm_export.modeling import load_tokenizer
    from flatllm_export.validate import greedy_torch

    model = load_model("ref-gqa")
    calib = windows("ref-gqa", split="train")[:8]
    compress_flatllm(model, calib, 0.3, "iprs", linear_multiple=32)
    quantize_model(model, calib, QuantizationSection(bits=4, group_size=32))
    assert {s["v_head_dim"] for s in model.config.layer_shapes} != {model.config.head_dim}
    rep = export("genai", model, load_tokenizer("ref-gqa"), tmp_path / "genai",
                 ExportContext(extra={"accuracy_level": 0}))  # float32 activations: greedy equal to PyTorch's
    assert rep["int4"] and rep["genai_check"].startswith("8 greedy")
    meta = json.loads((tmp_path / "genai" / "flatllm_onnx.json").read_text())
    assert all(m["value_dim"] == m["key_dim"] for m in meta["layers"])
    assert [m["v_head_dim"] for m in meta["layers"]] == [s["v_head_dim"] for s in model.config.layer_shapes]
    config = json.loads((tmp_path / "genai" / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is True  # GroupQueryAttention: the cache updated in place
    prompt = windows("ref-gqa", n=1)[:1, :16]
    want = greedy_torch(model, prompt, 24)
    got = GenaiDecoder(tmp_path / "genai").generate(prompt.numpy(), 24)
    assert (got == want).all(), (got, want)


def test_gptq_lm_head_is_calibrated_reloads_and_exports_exactly(tmp_path):
    model = load_model("ref-gqa")
    calib = windows("ref-gqa", split="train")[:4]
    rep = quantize_model(model, calib, QuantizationSection(bits=4, group_size=32), lm_head_bits=4)
    assert rep["layers"]["lm_head"]["bits"] == 4 and model.config.quantization_config["lm_head"]
    export("gptq", model, None, tmp_path / "gptq", ExportContext())
    ids = windows("ref-gqa", n=1)[:1, :32]
    with torch.no_grad():
        assert torch.equal(load_model(str(tmp_path / "gptq"))(ids).logits, model(ids).logits)
    onnx_rep = export("onnx", model, None, tmp_path / "onnx",
                      ExportContext(extra={"lm_head": "int4", "accuracy_level": 0}))
    assert onnx_rep["lm_head"] == "int4-gptq" and onnx_rep["max_abs_logit_diff"] < 1e-4


def test_tied_model_with_gptq_lm_head_round_trips_and_exports_one_table(tmp_path):
    # a tied model whose lm_head is GPTQ'd: the checkpoint keeps the float embedding apart from the quantized head
    # (no tie on reload), and the ONNX export (embedding auto) reads the embedding from the head's int4 table
    model = tie(load_model("ref-gqa"))
    calib = windows("ref-gqa", split="train")[:4]
    quantize_model(model, calib, QuantizationSection(bits=4, group_size=32), lm_head_bits=4)
    export("gptq", model, None, tmp_path / "gptq", ExportContext())
    reloaded = load_model(str(tmp_path / "gptq"))
    assert reloaded.config.tie_word_embeddings and type(reloaded.lm_head).__name__ == "QuantLinear"
    ids = windows("ref-gqa", n=1)[:1, :32]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    rep = export("onnx", reloaded, None, tmp_path / "onnx", ExportContext(extra={"embedding": "auto"}))
    assert rep["embedding"] == "int4" and rep["lm_head"] == "int4-gptq"
    proto, ops = op_counts(tmp_path / "onnx")
    vocab, hidden = model.model.embed_tokens.weight.shape
    shapes = [(t.data_type, list(t.dims)) for t in proto.graph.initializer if t.dims and t.dims[0] == vocab]
    packed = [d for d in shapes if d[0] == onnx.TensorProto.UINT8]  # the int4 table, (vocab, blocks, 16)
    assert ops["GatherBlockQuantized"] == 1 and len(packed) == 1, shapes
    assert (onnx.TensorProto.FLOAT, [vocab, hidden]) not in shapes  # no float embedding table


@pytest.mark.parametrize("attention", ["gqa", "standard"])
def test_graph_is_built_one_decoder_layer_at_a_time(tmp_path, attention):
    import numpy as np

    from exporters import onnx as onnx_exporter
    from exporters.onnx_graph import graph_logits
    from flatllm_export.runtime.ort import OrtDecoder

    model = load_model("ref-gqa")  # FLAP: every layer its own KV heads and MLP size; int4 head: approximate head
    compress(model, windows("ref-gqa", split="train")[:4], CompressionSection(method="flap", ratio=0.3))
    export("hf", model, None, tmp_path / "hf", ExportContext())
    # streamed: the model holds meta skeletons, its store reads a layer from disk per load and counts the live ones
    streamed = load_model(str(tmp_path / "hf"), stream=True, work_dir=tmp_path / "work")
    assert all(p.is_meta for p in streamed.model.layers.parameters())
    opts = onnx_exporter.options(model, ExportContext(extra={"attention": attention, "lm_head": "int4",
                                                             "embedding": "int4"}))
    ids = windows("ref-gqa", n=2)[:, :24]
    got = {}
    for name, m in {"memory": model, "streamed": streamed}.items():
        folder = tmp_path / name
        folder.mkdir()
        onnx_exporter.export_graph(m, folder / "model.onnx", opts)
        onnx_exporter.write_metadata(m, folder, "float32", opts, False)
        proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
        assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer
                   if np.prod(t.dims) * 4 >= 4096)  # large tensors live in model.onnx.data only
        dec = OrtDecoder(folder)
        logits, past = dec.forward(ids[:, :20].numpy())
        got[name] = [proto.graph, (folder / "model.onnx.data").read_bytes(), logits,
                     dec.forward(ids[:, 20:21].numpy(), past)[0], graph_logits(m, opts, ids)]
    store = streamed.layer_store
    assert store.loads == 2 * len(store) and store.peak_live == 1 and store.live == 0  # graph, then reference
    (g1, *out1), (g2, *out2) = got.values()
    assert [n.op_type for n in g1.node] == [n.op_type for n in g2.node]
    assert all(np.array_equal(a, b) for a, b in zip(out1[:3], out2[:3])) and torch.equal(out1[3], out2[3])


def test_disk_full_while_writing_the_onnx_tensors(monkeypatch, tmp_path, tiny_model_dir):
    import errno
    import os

    from exporters import onnx_stitch
    from flatllm_export.files import OutputError

    def full(path, mode="r", *args, **kwargs):  # the tensors are appended to model.onnx.data part by part
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(onnx_stitch, "open", full, raising=False)
    with pytest.raises(OutputError) as err:
        export("onnx", load_model(str(tiny_model_dir)), None, tmp_path / "onnx", ExportContext())
    assert str(err.value) == (f"could not write {tmp_path / 'onnx' / 'model.onnx.data'} (No space left on device); "
                              "free disk space or choose another --output")


def test_hf_export_checks_itself_without_a_sample(tmp_path, monkeypatch):
    """No sample given: the hf exporter still reloads what it wrote and judges it (on random tokens)."""
    import exporters.hf as hf_exporter
    from exporters import ExportError

    model = load_model("ref-llama")
    rep = export("hf", model, None, tmp_path / "hf", ExportContext())
    assert rep["max_abs_logit_diff"] <= rep["tolerance"] and rep["floor_kind"] == "fp32"
    real_load = hf_exporter.load_model

    def broken_load(*args, **kwargs):  # what the files would give if a weight were written wrong
        m = real_load(*args, **kwargs)
        m.model.layers[0].mlp.down_proj.weight.data *= 1.01
        return m

    monkeypatch.setattr(hf_exporter, "load_model", broken_load)
    with pytest.raises(ExportError, match=r"hf export .* does not reproduce the model: reloaded hf/"):
        export("hf", model, None, tmp_path / "hf2", ExportContext())
