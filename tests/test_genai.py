"""onnxruntime-genai runs our exports: greedy tokens and perplexity against PyTorch, and a clear refusal of an
export it cannot hold (a value cache narrower than the key cache)."""

import json

import numpy as np
import pytest

from exporters import ExportContext, export
from flatllm_export.compress import compress, compress_flatllm
from flatllm_export.modeling import load_model, load_tokenizer
from flatllm_export.recipe import CompressionSection, ValidationSection
from flatllm_export.runtime.genai import CONFIG_FILE, GenaiDecoder
from flatllm_export.validate import genai_runtime, onnx_runtime, parity

from .test_onnx import windows

pytest.importorskip("onnxruntime_genai")


@pytest.fixture(scope="module")
def flap_export(tmp_path_factory):
    """ref-llama after FLAP 30%: layers with different KV head counts and MLP sizes."""
    model = load_model("ref-llama")
    compress(model, windows("ref-llama", split="train"), CompressionSection(method="flap", ratio=0.3))
    out = tmp_path_factory.mktemp("flap") / "onnx"
    export("onnx", model, load_tokenizer("ref-llama"), out, ExportContext())
    return model, out


def test_flap_export_in_genai_matches_pytorch(flap_export):
    model, out = flap_export
    heads = {m["num_kv_heads"] for m in json.loads((out / "flatllm_onnx.json").read_text())["layers"]}
    assert len(heads) > 1, "the fixture should have per-layer KV head counts"
    res = parity(model, [genai_runtime(out), onnx_runtime(out)],
                 {"test": windows("ref-llama", n=4)}, ValidationSection(generate_tokens=48), batch_size=4)
    assert res["passed"], res["failures"]
    for row in (r for r in res["rows"] if r["runtime"] in ("onnxruntime-genai", "onnxruntime") and r.get("ppl")):
        assert row["ok"] and "48/48 = torch" in row["greedy"], row
        assert abs(row["ppl_increase"]) < 1e-5 and row["logit_dev_f64"] <= row["logit_tol"], row
    cfg = json.loads((out / CONFIG_FILE).read_text())
    assert cfg["search"]["past_present_share_buffer"] is True and cfg["model"]["vocab_size"] == 4096


def test_genai_fixed_length_generation_ignores_eos(flap_export):
    _, out = flap_export
    ids = np.array([[5, 6, 7, 8]])
    dec = GenaiDecoder(out, threads=1)
    assert dec.generate(ids, 12, fixed_length=True).shape == (1, 16)


def test_flatllm_runs_in_genai_from_the_padded_export_only(tmp_path):
    model = load_model("ref-gqa")
    compress_flatllm(model, windows("ref-gqa", split="train"), 0.5, "uniform")
    export("onnx", model, None, tmp_path / "onnx", ExportContext(extra={"attention": "standard"}))
    with pytest.raises(ValueError, match="narrower than the key cache"):
        genai_runtime(tmp_path / "onnx")
    assert not (tmp_path / "onnx" / CONFIG_FILE).exists()
    export("genai", model, load_tokenizer("ref-gqa"), tmp_path / "genai", ExportContext())
    res = parity(model, [genai_runtime(tmp_path / "genai")],
                 {"test": windows("ref-gqa", n=2)}, ValidationSection(generate_tokens=32), batch_size=2)
    assert res["passed"], res["failures"]
    row = next(r for r in res["rows"] if r["runtime"] == "onnxruntime-genai")
    assert row["ok"] and "32/32 = torch" in row["greedy"] and abs(row["ppl_increase"]) < 1e-5, row
