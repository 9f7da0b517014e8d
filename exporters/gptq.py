"""Exporter ``gptq``: GPTQ-packed safetensors in the standard layout (qweight, qzeros, scales, g_idx, bias per
linear), config.json with quantization_config, quantize_config.json, the modeling files and the tokenizer.
It re-reads what it wrote and checks the integers and scales against the in-memory model bit for bit."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from flatllm_export.modeling import configuration_flatllm, modeling_flatllm
from flatllm_export.modeling.loading import DTYPES, load_model
from flatllm_export.quantize.checkpoint import gptq_state_dict, is_quantized, write_quantize_config
from flatllm_export.quantize.qlinear import QuantLinear

from . import ExportContext, ExportError, check_reload, register
from .hf import AUTO_MAP


@register("gptq")
def export_gptq(model, tokenizer, out: Path, ctx: ExportContext) -> dict:
    if not is_quantized(model):
        raise ExportError("export target 'gptq' needs a GPTQ-quantized model: add a quantization section")
    out.mkdir(parents=True, exist_ok=True)
    state = gptq_state_dict(model, DTYPES[ctx.dtype])
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    config.auto_map = dict(AUTO_MAP)
    config.torch_dtype = DTYPES[ctx.dtype]
    config.save_pretrained(out)
    write_quantize_config(out, config.quantization_config, str(getattr(model, "name_or_path", "")))
    for module in (configuration_flatllm, modeling_flatllm):
        shutil.copy(module.__file__, out / Path(module.__file__).name)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    # self-check: every packed tensor on disk equals the in-memory one bit for bit
    written = load_file(str(out / "model.safetensors"))
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            for key in ("qweight", "qzeros", "g_idx"):
                if not torch.equal(written[f"{name}.{key}"], getattr(m, key).cpu()):
                    raise ExportError(f"{out}: {name}.{key} on disk differs from the quantized model")
            if not torch.equal(written[f"{name}.scales"], m.scales.cpu().to(torch.float16)):
                raise ExportError(f"{out}: {name}.scales on disk differ from the quantized model")
    report = {"path": out.name, "dtype": ctx.dtype, "bytes": (out / "model.safetensors").stat().st_size,
              "checkpoint_format": config.quantization_config["checkpoint_format"]}
    # and the reloaded checkpoint (config, per-layer shapes, tied weights, modeling code) computes the model
    report.update(check_reload("gptq", model, load_model(str(out)), out, ctx))
    return report
