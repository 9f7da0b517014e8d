"""Exporter ``genai``: the ``onnx`` target's graph in a folder onnxruntime-genai runs (``og.Model(og.Config(dir))``).

Same graph writer, two differences: the value cache is padded to the key head dim wherever a layer's value head
dim is smaller (onnxruntime-genai allocates each layer's value cache with its key's shape), and
``genai_config.json`` is written beside it (plus the tokenizer's tokenizer.json). Per-layer KV head counts need
nothing: onnxruntime-genai reads them from each layer's past-key input. When onnxruntime_genai is installed, the
exporter generates a few greedy tokens with it and checks them against onnxruntime on the same graph.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from flatllm_export.runtime.genai import write_genai_config

from . import ExportContext, ExportError, register
from .onnx import options, write_onnx


def check_in_genai(folder: Path, vocab_size: int, new_tokens: int = 8) -> dict:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return {"genai_check": "skipped: onnxruntime_genai is not installed"}
    from flatllm_export.runtime.genai import GenaiDecoder
    from flatllm_export.runtime.ort import OrtDecoder

    prompt = np.random.default_rng(0).integers(0, vocab_size, (1, 12))
    want = OrtDecoder(folder).generate(prompt, new_tokens)
    got = GenaiDecoder(folder).generate(prompt, new_tokens)  # shorter when it stops at EOS
    if not (got == want[:, : got.shape[1]]).all():
        raise ExportError(f"genai export at {folder}: onnxruntime-genai generates {got[0, 12:].tolist()}, "
                          f"onnxruntime {want[0, 12:].tolist()} on the same graph")
    return {"genai_check": f"{new_tokens} greedy tokens equal to onnxruntime's"}


@register("genai")
def export_genai(model, tokenizer, out: Path, ctx: ExportContext) -> dict:
    opts = replace(options(model, ctx), pad_value_cache=True)
    report, _ = write_onnx(model, tokenizer, out, ctx, opts)
    cfg = model.config  # a GroupQueryAttention graph shares past and present (metadata: shared_kv_buffer)
    write_genai_config(out, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads)
    if tokenizer is not None and not (out / "tokenizer.json").exists():
        raise ExportError("onnxruntime-genai needs tokenizer.json: this model's tokenizer is not a fast tokenizer")
    report.update(check_in_genai(out, model.config.vocab_size))
    return report
