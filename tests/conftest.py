import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
REF_MODELS = ["ref-llama", "ref-gqa"]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def ref_path(name: str) -> Path:
    return ROOT / "models" / name


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-weights Llama of another shape: 3 layers (odd), 8 query heads sharing 2 KV heads (groups of 4),
    head dim 16, MLP 96, saved in Hugging Face format with the ref-llama tokenizer."""
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=128, num_hidden_layers=3, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=16, intermediate_size=96, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    out = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(out, safe_serialization=True)
    PreTrainedTokenizerFast.from_pretrained(ref_path("ref-llama")).save_pretrained(out)
    return out


def run_python(code: str, *args: str, timeout: int = 300) -> str:
    """Run code in a fresh interpreter (no flatllm_export imported unless the code does); returns stdout."""
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                         env=env, cwd="/")
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout
