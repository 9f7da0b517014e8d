"""Exporter ``hf``: safetensors (sharded when large) + config.json with auto_map + the modeling files +
tokenizer, so that ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads the
per-layer-shaped model without flatllm_export installed."""

from __future__ import annotations

import shutil
from pathlib import Path


from flatllm_export.modeling import configuration_flatllm, modeling_flatllm
from flatllm_export.modeling.loading import DTYPES, load_model
from flatllm_export.quantize.checkpoint import dequantized_state_dict
from flatllm_export.quantize.qlinear import QuantLinear

from . import ExportContext, check_reload, register

AUTO_MAP = {
    "AutoConfig": "configuration_flatllm.FlatLlamaConfig",
    "AutoModelForCausalLM": "modeling_flatllm.FlatLlamaForCausalLM",
}


def save_hf(model, tokenizer, out: Path, dtype: str = "float32", max_shard_size: str = "2GB") -> None:
    out.mkdir(parents=True, exist_ok=True)
    target = DTYPES[dtype]
    # a GPTQ model is written with its dequantized weights: loadable anywhere, same numbers as in memory
    state = dequantized_state_dict(model, target)
    model.config.auto_map = dict(AUTO_MAP)
    saved = {k: getattr(model.config, k, None) for k in ("torch_dtype", "quantization_config", "tie_word_embeddings")}
    model.config.torch_dtype = target
    if isinstance(model.lm_head, QuantLinear):  # a GPTQ lm_head is its own weight now: not tied on reload
        model.config.tie_word_embeddings = False
    if saved["quantization_config"] is not None:
        del model.config.quantization_config
    try:
        model.save_pretrained(out, state_dict=state, safe_serialization=True, max_shard_size=max_shard_size)
    finally:
        for k, v in saved.items():
            if v is not None:
                setattr(model.config, k, v)
    for module in (configuration_flatllm, modeling_flatllm):
        shutil.copy(module.__file__, out / Path(module.__file__).name)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


@register("hf")
def export_hf(model, tokenizer, out: Path, ctx: ExportContext) -> dict:
    save_hf(model, tokenizer, out, ctx.dtype)
    report = {"path": out.name, "dtype": ctx.dtype,
              "bytes": sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")}
    if ctx.sample is not None:
        report.update(check_reload("hf", model, load_model(str(out), dtype=ctx.dtype), out, ctx))
    return report
