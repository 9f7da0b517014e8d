"""Exporter ``hf``: safetensors (sharded when large) + config.json with auto_map + the modeling files +
tokenizer, so that ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads the
per-layer-shaped model without flatllm_export installed."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

from flatllm_export.dtypes import DTYPES
from flatllm_export.modeling import configuration_flatllm, modeling_flatllm
from flatllm_export.modeling.loading import load_model
from flatllm_export.modeling.shards import model_parts, write_sharded
from flatllm_export.modeling.streaming import is_streamed
from flatllm_export.modeling.gptq_checkpoint import dequantized_state_dict
from flatllm_export.modeling.qlinear import QuantLinear

from . import ExportContext, check_reload, register

AUTO_MAP = {
    "AutoConfig": "configuration_flatllm.FlatLlamaConfig",
    "AutoModelForCausalLM": "modeling_flatllm.FlatLlamaForCausalLM",
}


def head_state(model, state_fn):
    """``state_fn`` for ``model_parts``: a tied float lm_head is the embedding, written once."""
    def fn(module):
        state = state_fn(module)
        if module is model and model.config.tie_word_embeddings and not isinstance(model.lm_head, QuantLinear):
            state.pop("lm_head.weight", None)
        return state
    return fn


def write_model_files(model, tokenizer, out: Path, state_fn, config_changes: dict) -> dict:
    """Shards (one decoder layer in memory at a time), config.json with ``config_changes`` and auto_map, the
    modeling files and the tokenizer: the part the hf and gptq exporters share."""
    written = write_sharded(out, model_parts(model, head_state(model, state_fn)))
    config = copy.deepcopy(model.config)
    config.auto_map = dict(AUTO_MAP)
    for k, v in config_changes.items():
        if v is None:
            config.__dict__.pop(k, None)
        else:
            setattr(config, k, v)
    config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(out)
    for module in (configuration_flatllm, modeling_flatllm):
        shutil.copy(module.__file__, out / Path(module.__file__).name)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return written


def save_hf(model, tokenizer, out: Path, dtype: str = "float32") -> dict:
    target = DTYPES[dtype]
    # a GPTQ model is written with its dequantized weights: loadable anywhere, same numbers as in memory; a GPTQ
    # lm_head is its own weight then, not tied on reload
    changes = {"torch_dtype": target, "quantization_config": None}
    if isinstance(model.lm_head, QuantLinear):
        changes["tie_word_embeddings"] = False
    return write_model_files(model, tokenizer, out, lambda m: dequantized_state_dict(m, target), changes)


@register("hf")
def export_hf(model, tokenizer, out: Path, ctx: ExportContext) -> dict:
    written = save_hf(model, tokenizer, out, ctx.dtype)
    report = {"path": out.name, "dtype": ctx.dtype, "bytes": written["bytes"], "shards": len(written["files"])}
    reloaded = load_model(str(out), dtype=ctx.dtype, stream=is_streamed(model))  # checked on ctx.sample, or on
    report.update(check_reload("hf", model, reloaded, out, ctx))                  # random tokens without one
    return report
