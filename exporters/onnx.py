"""Exporter ``onnx``: one decoder graph with KV cache whose layers each keep their own cache shape.

I/O names are the conventional ones (input_ids, attention_mask, position_ids, past_key_values.{i}.key/.value ->
logits, present.{i}.key/.value); batch, sequence and past lengths are dynamic. Attention is written with plain
ops (MatMul / Softmax), which onnxruntime runs with a value head dim different from the key head dim.
GPTQ-quantized linears become com.microsoft MatMulNBits nodes carrying the GPTQ integers, scales and zero
points unchanged. ``flatllm_onnx.json`` beside the graph lists every layer's cache shape, so a runtime can
allocate the past without guessing. The exporter runs the written graph in onnxruntime against PyTorch (a
prefill and a decode step) before it reports success.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from flatllm_export.modeling.modeling_flatllm import attention_mask_4d
from flatllm_export.parity import DEFAULT_K, judge_logits, onnx_floor_kind
from flatllm_export.quantize.matmulnbits import to_matmulnbits
from flatllm_export.quantize.qlinear import QuantLinear
from flatllm_export.runtime.ort import META_FILE

from . import ExportContext, ExportError, register

OPSET = 17


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def cache_layout(config) -> list[dict]:
    """Per-layer KV cache shapes: [batch, num_kv_heads, past, key_dim] and [..., value_dim]."""
    return [{"num_kv_heads": s["num_kv_heads"], "key_dim": config.head_dim, "value_dim": s["v_head_dim"]}
            for s in config.layer_shapes]


class ExplicitCacheDecoder(nn.Module):
    """The model with its KV cache as explicit tensors in and out (what the graph computes)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        core = self.model.model
        x = core.embed_tokens(input_ids)
        cos, sin = core.rotary_emb(x, position_ids)
        mask = attention_mask_4d(attention_mask, input_ids.shape[1], past[0].shape[2], x.dtype, x.device)
        presents = []
        for i, layer in enumerate(core.layers):
            def update(k, v, pk=past[2 * i], pv=past[2 * i + 1]):
                k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
                presents.extend([k, v])
                return k, v

            x = layer(x, cos, sin, mask, update)
        return (self.model.lm_head(core.norm(x)), *presents)


class _MatMulNBits(torch.autograd.Function):
    """Computes x @ W^T in PyTorch; exports as one com.microsoft MatMulNBits node."""

    @staticmethod
    def forward(ctx, x, b, scales, zeros, weight, k, n, bits, block_size, accuracy_level):
        return x @ weight.to(x.dtype).T

    @staticmethod
    def symbolic(g, x, b, scales, zeros, weight, k, n, bits, block_size, accuracy_level):
        y = g.op("com.microsoft::MatMulNBits", x, b, scales, zeros, K_i=k, N_i=n, bits_i=bits,
                 block_size_i=block_size, accuracy_level_i=accuracy_level)
        sizes = x.type().varyingSizes()
        if sizes is not None:  # tell the exporter the output shape: x's with the last dim N
            y.setType(x.type().with_sizes(list(sizes[:-1]) + [n]))
        return y


class MatMulNBitsLinear(nn.Module):
    """Export-time stand-in for a QuantLinear."""

    def __init__(self, q: QuantLinear, float_dtype: torch.dtype, accuracy_level: int):
        super().__init__()
        np_dtype = np.float16 if float_dtype == torch.float16 else np.float32
        t = to_matmulnbits(q.quantized(), np_dtype)
        self.k, self.n, self.bits, self.block_size = t["K"], t["N"], t["bits"], t["block_size"]
        self.accuracy_level = accuracy_level
        self.register_buffer("b", torch.from_numpy(t["B"]))
        self.register_buffer("scales", torch.from_numpy(t["scales"]))
        self.register_buffer("zeros", torch.from_numpy(t["zero_points"]))
        self.register_buffer("weight", q.weight.to(float_dtype))
        self.bias = None if q.bias is None else nn.Parameter(q.bias.detach().to(float_dtype))

    def forward(self, x):
        y = _MatMulNBits.apply(x, self.b, self.scales, self.zeros, self.weight, self.k, self.n, self.bits,
                               self.block_size, self.accuracy_level)
        return y + self.bias if self.bias is not None else y


def export_graph(model, path: Path, dtype: torch.dtype, accuracy_level: int = 0) -> bool:
    """Write the graph; returns True when it has MatMulNBits (int4) linears."""
    m = copy.deepcopy(model).to(dtype).eval()
    quant = [(n, mod) for n, mod in m.named_modules() if isinstance(mod, QuantLinear)]
    for name, mod in quant:
        parent, _, child = name.rpartition(".")
        setattr(m.get_submodule(parent), child, MatMulNBitsLinear(mod, dtype, accuracy_level))
    n_layers = m.config.num_hidden_layers
    inputs, outputs = io_names(n_layers)
    batch, seq, past_len = 2, 3, 4  # >= 2 so no dynamic dim is specialised
    ids = torch.randint(0, m.config.vocab_size, (batch, seq))
    past = []
    for c in cache_layout(m.config):
        past += [torch.randn(batch, c["num_kv_heads"], past_len, c["key_dim"], dtype=dtype),
                 torch.randn(batch, c["num_kv_heads"], past_len, c["value_dim"], dtype=dtype)]
    args = (ids, torch.ones(batch, past_len + seq, dtype=torch.long),
            torch.arange(past_len, past_len + seq).expand(batch, -1), *past)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
            "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    for name in inputs[3:]:
        axes[name] = {0: "batch", 2: "past_sequence"}
    for name in outputs[1:]:
        axes[name] = {0: "batch", 2: "total_sequence"}
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # over 2 GB the exporter scatters one external file per tensor: write to a scratch folder, then gather
        # everything into model.onnx (+ model.onnx.data when large)
        scratch = Path(tmp) / "model.onnx"
        torch.onnx.export(ExplicitCacheDecoder(m), args, str(scratch), input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False, do_constant_folding=True,
                          custom_opsets={"com.microsoft": 1} if quant else None)
        if len(list(Path(tmp).iterdir())) == 1:
            shutil.move(str(scratch), str(path))
        else:
            proto = onnx.load(str(scratch), load_external_data=True)
            onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=path.name + ".data", size_threshold=1024)
    return bool(quant)


def write_metadata(model, out: Path, dtype: str, int4: bool, accuracy_level: int) -> dict:
    cfg = model.config
    inputs, outputs = io_names(cfg.num_hidden_layers)
    meta = {
        "format": "flatllm-onnx/1",
        "model_type": cfg.model_type, "filename": "model.onnx", "dtype": dtype,
        "vocab_size": cfg.vocab_size, "context_length": cfg.max_position_embeddings,
        "eos_token_id": cfg.eos_token_id, "bos_token_id": cfg.bos_token_id,
        "num_hidden_layers": cfg.num_hidden_layers,
        "inputs": inputs, "outputs": outputs,
        "kv_cache_shape": "[batch, num_kv_heads, sequence, dim]",
        "layers": cache_layout(cfg),
        "int4": int4, "accuracy_level": accuracy_level if int4 else None,
        "quantization_config": getattr(cfg, "quantization_config", None) if int4 else None,
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def self_check(model, out: Path, dtype: str, int4: bool, accuracy_level: int, noise_k: float = DEFAULT_K) -> dict:
    """Prefill 2x12 tokens, then decode 1 token, in onnxruntime; judge the logits against the float64 reference
    of ``model`` with the shared parity verdict (PyTorch's own deviation at the graph's precision is the floor)."""
    from flatllm_export.runtime.ort import OrtDecoder

    dec = OrtDecoder(out)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 13), generator=g)
    got_prefill, past = dec.forward(ids[:, :12].numpy(), past=None)
    got_step, _ = dec.forward(ids[:, 12:].numpy(), past=past)
    got = torch.from_numpy(np.concatenate([got_prefill, got_step], axis=1).astype(np.float32))
    kind = onnx_floor_kind(dtype, int4, accuracy_level)
    v = judge_logits("onnxruntime", got, model, ids, kind, noise_k)
    if not v.ok:
        raise ExportError(f"onnx export at {out} fails its parity check (prefill 12 + decode 1 token): {v.message}")
    return {"max_abs_logit_diff": v.deviation, "tolerance": v.tolerance, "noise_floor": v.floor, "floor_kind": kind}


@register("onnx")
def export_onnx(model, tokenizer, out: Path, ctx: ExportContext) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    dtype = {"float32": torch.float32, "float16": torch.float16}[ctx.dtype]
    accuracy_level = int(ctx.extra.get("accuracy_level", 0))
    int4 = export_graph(model, out / "model.onnx", dtype, accuracy_level)
    write_metadata(model, out, ctx.dtype, int4, accuracy_level)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    report = {"path": out.name, "dtype": ctx.dtype, "int4": int4,
              "bytes": sum(f.stat().st_size for f in out.iterdir() if f.name.startswith("model.onnx"))}
    report.update(self_check(model, out, ctx.dtype, int4, accuracy_level, ctx.noise_k))
    return report
