"""Exporter ``gguf``: ``gguf/model.gguf`` for llama.cpp, written with the ``gguf`` package's writer one decoder
layer at a time, then loaded in llama.cpp and judged against the float64 reference before success is reported.

- Architecture ``llama`` when every layer has the same head counts and MLP width, else ``deci`` (llama.cpp builds
  each of its layers with its own ``attention.head_count``, ``head_count_kv`` and ``feed_forward_length``).
- llama.cpp has one value head size, the key's: value heads narrowed by FLAT-LLM are padded back with exactly zero
  rows in ``attn_v`` and zero input columns in ``attn_output`` (the output is unchanged; the V/O savings are not).
- Q / K rows in the order llama.cpp's rotary expects (``rope_row_order``, as its converter permutes them).
- GPTQ weights (4 or 8 bits, symmetric, group 32, no act-order) become Q4_0 / Q8_0 blocks holding the GPTQ
  integers and float16 scales unchanged (``quantize/ggml.py``); float weights F32 or F16 by ``export.dtype``;
  norms F32. The embedding and output tables are what ``export.embedding`` / ``export.lm_head`` ask
  (``emulation.head_tables``, shared with the ONNX export and the float64 reference): a GPTQ head as it is; a float
  head rounded to Q8_0 (``int8``) or Q4_0 (``int4``) blocks of 32; a tied pair of one format written once
  (``token_embd``: llama.cpp reads the output from it), else both. The formats are recorded in the file
  (``flatllm_export.embedding`` / ``flatllm_export.lm_head``) for the validation's reference.
- What llama.cpp cannot represent is refused (``gguf_blocker``): SVD-LLM factor pairs, low-rank Q/K, biases it
  does not read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from flatllm_export.emulation import head_label, head_tables, table_formats
from flatllm_export.modeling.modeling_flatllm import HeadwiseLowRank, LowRankLinear
from flatllm_export.modeling.streaming import layers_of
from flatllm_export.quantize.ggml import BLOCK, GGML_TYPES, ggml_blocker, ggml_blocks, pad_heads, rope_row_order
from flatllm_export.modeling.packing import QuantizedWeight
from flatllm_export.modeling.qlinear import QuantLinear

from . import ExportContext, ExportError, register

FILE = "model.gguf"
FLOAT_TYPES = {"float32": np.float32}  # F16 weights would round activations to fp16: not emulated yet
FILE_TYPES = {"float32": 0, "float16": 1, "Q4_0": 2, "Q8_0": 7}  # llama.cpp's llama_ftype (general.file_type)
# llama.cpp's llama / deci graphs read these optional biases; any other is refused
READ_BIASES = {"q_proj", "k_proj", "v_proj", "o_proj", "down_proj"}


def gguf_blocker(config) -> str | None:
    """Why llama.cpp cannot run a model of this config as written by this exporter, or None."""
    for i, s in enumerate(config.layer_shapes):
        if s.get("lowrank"):
            return (f"layer {i} stores {sorted(s['lowrank'])} as two low-rank factors (SVD-LLM), which llama.cpp "
                    "cannot represent: use compression.method flatllm or flap, or the onnx/hf targets")
        if s.get("qk_rank") is not None:
            return (f"layer {i} has low-rank Q/K (qk_rank {s['qk_rank']}), which llama.cpp cannot represent: set "
                    "compression.qk: false, or use the onnx/hf targets")
        if s["intermediate_size"] < 1:  # llama.cpp's deci would drop the layer's attention output too
            return f"layer {i} has no MLP channels left, which llama.cpp's deci layers cannot hold: lower the ratio"
        if s["v_head_dim"] > config.head_dim:
            return f"layer {i} has value heads wider ({s['v_head_dim']}) than the key head dim {config.head_dim}"
    qc = getattr(config, "quantization_config", None)
    if qc:
        reason = ggml_blocker(qc["bits"], qc["group_size"], qc.get("sym", True),
                              qc.get("desc_act", False) and not qc.get("static_groups", False))
        if reason:
            return f"the gguf target writes GPTQ weights as Q4_0 / Q8_0 unchanged, which cannot hold {reason}"
    return None


def architecture(config) -> str:
    keys = {(s["num_heads"], s["num_kv_heads"], s["intermediate_size"]) for s in config.layer_shapes}
    return "llama" if len(keys) == 1 else "deci"


def _float(t: torch.Tensor, dtype) -> np.ndarray:
    return np.ascontiguousarray(t.detach().float().cpu().numpy().astype(dtype))


class Tensors:
    """Encodes the model's weights as GGUF tensors and hands each to the writer as soon as it exists."""

    def __init__(self, writer, dtype: str):
        self.writer, self.float = writer, FLOAT_TYPES[dtype]
        self.types: dict[str, int] = {}
        self.bytes = 0

    def add(self, name: str, array: np.ndarray, ggml_type: str | None = None):
        import gguf

        raw = None if ggml_type is None else gguf.GGMLQuantizationType[ggml_type]
        self.writer.add_tensor(name, array, raw_dtype=raw)
        kind = ggml_type or {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}[array.dtype]
        self.types[kind] = self.types.get(kind, 0) + 1
        self.bytes += array.nbytes

    def norm(self, name: str, weight: torch.Tensor):
        self.add(name, _float(weight, np.float32))

    def table(self, name: str, table):
        """An embedding / output table: float, or a QuantizedWeight (sym, blocks of 32) as Q4_0 / Q8_0 blocks."""
        if isinstance(table, QuantizedWeight):
            self.add(f"{name}.weight", *ggml_blocks(table, name))
        else:
            self.add(f"{name}.weight", _float(table, self.float))

    def linear(self, name: str, module, rows: torch.Tensor | None = None, pad: tuple | None = None):
        """One linear: ``rows``, an output-row order; ``pad`` (axis, heads, width, to), value heads to pad."""
        if isinstance(module, (LowRankLinear, HeadwiseLowRank)):
            raise ExportError(f"{name} is a low-rank factor pair, which llama.cpp cannot represent")
        if isinstance(module, QuantLinear):
            q = module.quantized()
            if rows is not None:
                q = QuantizedWeight(q.codes[rows], q.scales[:, rows], q.zeros[:, rows], q.g_idx, q.bits,
                                    q.group_size)
            if pad is not None:
                q = pad_heads(q, *pad)
            self.add(f"{name}.weight", *ggml_blocks(q, name))
        else:
            w = module.weight.detach().float()
            w = w[rows] if rows is not None else w
            if pad is not None:
                axis, heads, width, to = pad
                if axis == 0:
                    w = torch.nn.functional.pad(w.reshape(heads, width, -1), (0, 0, 0, to - width)).flatten(0, 1)
                else:
                    w = torch.nn.functional.pad(w.reshape(w.shape[0], heads, width), (0, to - width)).flatten(1)
            self.add(f"{name}.weight", _float(w, self.float))
        bias = getattr(module, "bias", None)
        if bias is not None:
            b = bias.detach().float()
            b = b[rows] if rows is not None else b
            if pad is not None and pad[0] == 0:
                b = torch.nn.functional.pad(b.reshape(pad[1], pad[2]), (0, pad[3] - pad[2])).flatten()
            self.add(f"{name}.bias", _float(b, np.float32))


def write_layer(t: Tensors, i: int, layer, config) -> None:
    s, hd = config.layer_shape(i), config.head_dim
    a, m, p = layer.self_attn, layer.mlp, f"blk.{i}"
    t.norm(f"{p}.attn_norm.weight", layer.input_layernorm.weight)
    t.linear(f"{p}.attn_q", a.q_proj, rope_row_order(s["num_heads"], hd))
    t.linear(f"{p}.attn_k", a.k_proj, rope_row_order(s["num_kv_heads"], hd))
    narrow = s["v_head_dim"] < hd
    t.linear(f"{p}.attn_v", a.v_proj, pad=(0, s["num_kv_heads"], s["v_head_dim"], hd) if narrow else None)
    t.linear(f"{p}.attn_output", a.o_proj, pad=(1, s["num_heads"], s["v_head_dim"], hd) if narrow else None)
    t.norm(f"{p}.ffn_norm.weight", layer.post_attention_layernorm.weight)
    t.linear(f"{p}.ffn_gate", m.gate_proj)
    t.linear(f"{p}.ffn_up", m.up_proj)
    t.linear(f"{p}.ffn_down", m.down_proj)


def rope_factors(model) -> torch.Tensor | None:
    """llama.cpp's ``rope_freqs`` (a divisor per frequency) for a scaled rope (e.g. Llama-3's), None if plain."""
    cfg = model.config
    inv = model.model.rotary_emb.inv_freq.detach().double().cpu()
    plain = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
    if getattr(model.model.rotary_emb, "attention_scaling", 1.0) != 1.0:
        raise ExportError(f"rope_scaling {cfg.rope_scaling} scales attention, which this exporter does not write")
    factors = plain / inv
    return None if torch.allclose(factors, torch.ones_like(factors), rtol=1e-6) else factors.float()


def write_metadata(writer, model, arch: str, file_type: str) -> None:
    cfg = model.config
    shapes = cfg.layer_shapes

    def per_layer(key):
        values = [int(s[key]) for s in shapes]
        return values[0] if arch == "llama" else values

    writer.add_name(Path(str(getattr(model, "name_or_path", "") or "model")).name or "model")
    writer.add_context_length(int(cfg.max_position_embeddings))
    writer.add_embedding_length(int(cfg.hidden_size))
    writer.add_block_count(int(cfg.num_hidden_layers))
    writer.add_feed_forward_length(per_layer("intermediate_size"))
    writer.add_head_count(per_layer("num_heads"))
    writer.add_head_count_kv(per_layer("num_kv_heads"))
    writer.add_key_length(int(cfg.head_dim))
    writer.add_value_length(int(cfg.head_dim))
    writer.add_rope_dimension_count(int(cfg.head_dim))
    writer.add_rope_freq_base(float(cfg.rope_theta))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(int(cfg.vocab_size))
    writer.add_file_type(FILE_TYPES[file_type])
    if file_type in GGML_TYPES.values():
        writer.add_quantization_version(2)


def write_gguf(model, tokenizer, path: Path, dtype: str, embedding: str = "auto", lm_head: str = "float") -> dict:
    """Write ``path`` with the embedding / lm_head formats asked (``emulation.table_formats``); returns what was
    written (architecture, tensor types, bytes, tokenizer)."""
    import gguf

    from .gguf_vocab import write_tokenizer

    cfg = model.config
    reason = gguf_blocker(cfg)
    if reason:
        raise ExportError(reason)
    if dtype not in FLOAT_TYPES:
        raise ExportError(f"export.dtype {dtype} is not written by the gguf target; use one of {list(FLOAT_TYPES)}")
    arch = architecture(cfg)
    qc = getattr(cfg, "quantization_config", None)
    file_type = GGML_TYPES[qc["bits"]] if qc else dtype
    writer = gguf.GGUFWriter(path, arch, use_temp_file=True)  # tensors spill to a temporary file as they come
    try:
        write_metadata(writer, model, arch, file_type)
        vocab = write_tokenizer(writer, tokenizer, int(cfg.vocab_size))
        t = Tensors(writer, dtype)
        emb_format, head_format = table_formats(model, embedding, lm_head)
        table, head = head_tables(model, emb_format, head_format, BLOCK)
        one_table = bool(cfg.tie_word_embeddings) and emb_format == head_format  # llama.cpp reads output from it
        writer.add_string("flatllm_export.embedding", emb_format)
        writer.add_string("flatllm_export.lm_head", head_label(model, head_format))
        t.table("token_embd", table)
        factors = rope_factors(model)
        if factors is not None:
            t.add("rope_freqs.weight", factors.numpy())
        store = layers_of(model)
        for i in range(len(store)):
            layer = store.load(i)
            try:
                write_layer(t, i, layer, cfg)
            finally:
                store.release(i, layer)
        t.norm("output_norm.weight", model.model.norm.weight)
        if not one_table:
            if isinstance(head, QuantizedWeight):
                t.table("output", head)
            else:
                t.linear("output", head)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return {"architecture": arch, "file_type": file_type, "tensor_types": t.types, "bytes": path.stat().st_size,
            "tokenizer": vocab, "value_heads_padded": any(s["v_head_dim"] < cfg.head_dim for s in cfg.layer_shapes)}


@register("gguf")
def export_gguf(model, tokenizer, out: Path, ctx: ExportContext) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    path = out / FILE
    report = {"path": f"{out.name}/{FILE}", **write_gguf(model, tokenizer, path, ctx.dtype,
                                                         ctx.extra.get("embedding", "auto"),
                                                         ctx.extra.get("lm_head", "float"))}
    report.update(self_check(model, path, ctx))
    return report


def self_check(model, path: Path, ctx: ExportContext) -> dict:
    """Load the written file in llama.cpp and judge its prefill logits against the float64 reference computing the
    export's arithmetic (``Arithmetic.of_gguf``), with PyTorch's fp32 floor of that arithmetic."""
    from flatllm_export.emulation import Arithmetic
    from flatllm_export.parity import judge_logits
    from flatllm_export.runtime.llamacpp import LlamaCppDecoder, gguf_traits

    ids = ctx.sample if ctx.sample is not None else torch.randint(
        0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    ids = ids[:2, :64]
    arith = Arithmetic.of_gguf(gguf_traits(path))
    dec = LlamaCppDecoder(path, n_ctx=max(64, ids.shape[1]))
    try:
        got = dec.logits_fn()(ids)
    finally:
        dec.close()
    v = judge_logits("llama.cpp", got, model, ids, "fp32", ctx.noise_k, arith=arith)
    if not v.ok:
        raise ExportError(f"gguf export at {path} does not compute the model in llama.cpp: {v.message}")
    return {"figure": v.figure, "max_abs_logit_diff": v.deviation, "tolerance": v.tolerance, "noise_floor": v.floor,
            "arithmetic": arith.describe(), "sample": list(ids.shape)}
