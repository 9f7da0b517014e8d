import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flatllm_export import data
from flatllm_export.evaluate import perplexity, torch_logits_fn
from flatllm_export.modeling import ModelLoadError, load_model

from .conftest import REF_MODELS, ref_path


@pytest.mark.parametrize("name", REF_MODELS)
def test_reference_model_loads_offline_and_matches_transformers(name):
    path = ref_path(name)
    assert (path / "model.safetensors").stat().st_size < 30 * 2**20
    hf = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    ids = torch.tensor([tok("Now is the winter of our discontent")["input_ids"]])
    ours = load_model(name)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", REF_MODELS)
def test_perplexity_equals_the_models_own_loss(name):
    model = load_model(name)
    tok = AutoTokenizer.from_pretrained(ref_path(name))
    windows = data.evaluation_windows(data.tokenize(tok, data.shakespeare_text("test")), 128, max_windows=12)
    got = perplexity(torch_logits_fn(model), windows, batch_size=5)
    hf = AutoModelForCausalLM.from_pretrained(ref_path(name)).eval()
    with torch.no_grad():  # HF's loss is the mean over the window's predicted tokens; all windows are equal length
        direct = math.exp(sum(hf(input_ids=w[None], labels=w[None]).loss.item() for w in windows) / len(windows))
    assert got["tokens"] == 12 * 127
    assert abs(got["ppl"] - direct) / direct < 1e-5


@pytest.mark.parametrize("name", REF_MODELS)
def test_reference_model_is_trained(name):
    log = json.loads((ref_path(name) / "training_log.json").read_text())
    assert log["test_ppl"] < 120 and log["val_ppl"][-1] < log["val_ppl"][0]


def test_unsupported_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="'gpt2'.*supported: llama, mistral"):
        load_model(str(tmp_path))


def test_pickled_weights_are_refused(tiny_model_dir, tmp_path):
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match="pickled.*safetensors"):
        load_model(str(tmp_path))


def test_dtype_option(tiny_model_dir):
    assert next(load_model(str(tiny_model_dir), dtype="bfloat16").parameters()).dtype == torch.bfloat16
    with pytest.raises(ModelLoadError, match="model.dtype"):
        load_model(str(tiny_model_dir), dtype="int4")


def test_left_padding_and_cache_match_full_forward(tiny_model_dir):
    model = load_model(str(tiny_model_dir))
    ids = torch.randint(0, 4096, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :8], use_cache=True)
        step = model(ids[:, 8:], past_key_values=out.past_key_values, use_cache=True).logits
    torch.testing.assert_close(step, full[:, 8:], rtol=1e-5, atol=1e-5)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids[:1]], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], 1)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        got = model(padded, attention_mask=mask, position_ids=pos).logits[:, 3:]
    torch.testing.assert_close(got, full[:1], rtol=1e-5, atol=1e-5)
