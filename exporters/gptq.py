"""Exporter ``gptq``: GPTQ-packed safetensors in the standard layout (qweight, qzeros, scales, g_idx, bias per
linear), config.json with quantization_config, quantize_config.json, the modeling files and the tokenizer.
Shards are written one decoder layer at a time (a streamed model is never whole in memory); each is re-read and
its integers and scales checked against the model's bit for bit."""

from __future__ import annotations

from pathlib import Path

from flatllm_export.dtypes import DTYPES
from flatllm_export.modeling.loading import load_model
from flatllm_export.modeling.streaming import is_streamed
from flatllm_export.modeling.gptq_checkpoint import gptq_state_dict, is_quantized, write_quantize_config

from . import ExportContext, ExportError, check_reload, register
from .hf import write_model_files


@register("gptq")
def export_gptq(model, tokenizer, out: Path, ctx: ExportContext) -> dict:
    if not is_quantized(model):
        raise ExportError("export target 'gptq' needs a GPTQ-quantized model: add a quantization section")
    # every shard is read back and compared with the model's packed tensors bit for bit as it is written
    written = write_model_files(model, tokenizer, out, lambda m: gptq_state_dict(m, DTYPES[ctx.dtype]),
                                {"torch_dtype": DTYPES[ctx.dtype]})
    qc = model.config.quantization_config
    write_quantize_config(out, qc, str(getattr(model, "name_or_path", "")))
    report = {"path": out.name, "dtype": ctx.dtype, "bytes": written["bytes"], "shards": len(written["files"]),
              "checkpoint_format": qc["checkpoint_format"]}
    # and the reloaded checkpoint (config, per-layer shapes, tied weights, modeling code) computes the model
    ctx.opened["gptq"] = load_model(str(out), stream=is_streamed(model))
    report.update(check_reload("gptq", model, ctx.opened["gptq"], out, ctx))
    return report
