"""Exporter ``genai``: the ``onnx`` target's graph in a folder onnxruntime-genai runs (``og.Model(og.Config(dir))``).

Same graph writer, two differences: the value cache is padded to the key head dim wherever a layer's value head
dim is smaller (onnxruntime-genai allocates each layer's value cache with its key's shape), and
``genai_config.json`` is written beside it (plus the tokenizer's tokenizer.json). Per-layer KV head counts need
nothing: onnxruntime-genai reads them from each layer's past-key input. When onnxruntime_genai is installed, the
exporter generates a few greedy tokens with it and checks them against onnxruntime on the same graph.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import ExportContext, ExportError, register
from .onnx import options, write_onnx


def genai_config(model, tokenizer) -> dict:
    cfg = model.config
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else getattr(tokenizer, "eos_token_id", 0)
    pad = cfg.pad_token_id if getattr(cfg, "pad_token_id", None) is not None else (
        eos[0] if isinstance(eos, list) else eos)
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
              "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    outputs = {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}
    decoder = {"session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
               "filename": "model.onnx", "head_size": cfg.head_dim, "hidden_size": cfg.hidden_size,
               "inputs": inputs, "outputs": outputs, "num_attention_heads": cfg.num_attention_heads,
               "num_hidden_layers": cfg.num_hidden_layers, "num_key_value_heads": cfg.num_key_value_heads}
    model_section = {"bos_token_id": cfg.bos_token_id, "context_length": cfg.max_position_embeddings,
                     "decoder": decoder, "eos_token_id": eos, "pad_token_id": pad, "type": "llama",
                     "vocab_size": cfg.vocab_size}
    # the opset-23 Attention op concatenates past and new keys itself: no shared past/present buffer
    search = {"do_sample": False, "early_stopping": True, "max_length": cfg.max_position_embeddings, "min_length": 0,
              "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": False,
              "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0}
    return {"model": model_section, "search": search}


def genai_greedy(folder: Path, prompt: np.ndarray, new_tokens: int) -> np.ndarray:
    """Greedy tokens from onnxruntime-genai for one prompt (1, T): the prompt followed by ``new_tokens``."""
    import onnxruntime_genai as og

    gen_model = og.Model(og.Config(str(folder)))
    params = og.GeneratorParams(gen_model)
    params.set_search_options(do_sample=False, max_length=prompt.shape[1] + new_tokens)
    gen = og.Generator(gen_model, params)
    gen.append_tokens(prompt.astype(np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    return np.asarray(gen.get_sequence(0), dtype=np.int64)[None]


def check_in_genai(folder: Path, vocab_size: int, new_tokens: int = 8) -> dict:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return {"genai_check": "skipped: onnxruntime_genai is not installed"}
    from flatllm_export.runtime.ort import OrtDecoder

    prompt = np.random.default_rng(0).integers(0, vocab_size, (1, 12))
    want = OrtDecoder(folder).generate(prompt, new_tokens)
    got = genai_greedy(folder, prompt, new_tokens)
    if got.shape != want.shape or not (got == want).all():
        raise ExportError(f"genai export at {folder}: onnxruntime-genai generates {got[0, 12:].tolist()}, "
                          f"onnxruntime {want[0, 12:].tolist()} on the same graph")
    return {"genai_check": f"{new_tokens} greedy tokens equal to onnxruntime's"}


@register("genai")
def export_genai(model, tokenizer, out: Path, ctx: ExportContext) -> dict:
    opts = replace(options(model, ctx), pad_value_cache=True)
    report = write_onnx(model, tokenizer, out, ctx, opts)
    (out / "genai_config.json").write_text(json.dumps(genai_config(model, tokenizer), indent=1) + "\n")
    if tokenizer is not None and not (out / "tokenizer.json").exists():
        raise ExportError("onnxruntime-genai needs tokenizer.json: this model's tokenizer is not a fast tokenizer")
    report.update(check_in_genai(out, model.config.vocab_size))
    return report
