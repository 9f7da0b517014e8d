"""The lean decoder graph: the model rebuilt from the export-time stand-ins of ``onnx_ops`` (one node each), and
the post-processing of the written proto (opset 23, constants as initializers, one copy of each tensor).

Per decoder layer the graph has: SkipSimplifiedLayerNormalization (residual add + RMSNorm), one matmul for
Q/K/V and one for gate/up (concatenated N, then Split) when the projections are plain or share one quantization
grid, then by default com.microsoft GroupQueryAttention with the layer's own heads and KV heads, rotary inside
and a KV cache a runtime may keep as one max-length buffer updated in place (the value cache is padded to the
key head dim where FLAT-LLM narrowed it: GroupQueryAttention takes one head dim); or, with
``attention="standard"``, RotaryEmbedding on q and k and the opset-23 Attention op, which keeps each layer's own
value head dim in the cache but concatenates past and new every step. Then the o_proj / down_proj matmuls and
SiLU. The sequence lengths (or the causal + padding mask) are computed once per call and shared by every layer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

from flatllm_export.modeling.modeling_flatllm import LowRankLinear, attention_mask_4d
from flatllm_export.quantize.gptq import quantize_rtn
from flatllm_export.quantize.qlinear import QuantLinear

from .onnx_ops import (TMP_DOMAIN, FusedNorm, MatMulNBitsLinear, QuantEmbedding, RotaryCache, attention,
                       concat_quantized, gqa_lengths, group_query_attention, pad_last, reshape_bt)

OPSET = 23
HEAD_BITS = {"float": None, "int8": 8, "int4": 4}


@dataclass
class GraphOptions:
    dtype: torch.dtype = torch.float32
    accuracy_level: int = 0
    embedding: str = "float"  # float | int8 | int4 (symmetric RTN, GatherBlockQuantized)
    lm_head: str = "float"  # float | int8 | int4 (MatMulNBits; a GPTQ-quantized lm_head is written as it is)
    block_size: int = 32  # block of the RTN-quantized embedding / lm_head
    pad_value_cache: bool = False  # value cache as wide as the key's (onnxruntime-genai allocates both alike)
    attention: str = "gqa"  # gqa: GroupQueryAttention (rotary inside, shared KV buffer; needs the padded value
    #                          cache) | standard: opset-23 Attention (any value head dim; past + new concatenated)

    def __post_init__(self):
        if self.attention == "gqa":
            self.pad_value_cache = True  # GroupQueryAttention takes one head dim for keys and values


def as_graph_linear(mod: nn.Module, o: GraphOptions) -> nn.Module:
    """A projection as graph modules: QuantLinear -> MatMulNBits, low-rank factors each, plain Linear as is."""
    if isinstance(mod, QuantLinear):
        return MatMulNBitsLinear(mod.quantized(), mod.bias, o.dtype, o.accuracy_level)
    for name, child in list(mod.named_children()):
        setattr(mod, name, as_graph_linear(child, o))
    return mod


def fused_linear(mods: list[nn.Module], o: GraphOptions) -> nn.Module | None:
    """One matmul for projections reading the same input (concatenated outputs), or None when they cannot
    share one: low-rank factors, or quantized with different grids."""
    def bias(m):
        return m.bias.detach() if m.bias is not None else torch.zeros(m.out_features)

    has_bias = any(getattr(m, "bias", None) is not None for m in mods)
    if all(type(m) is nn.Linear for m in mods):
        lin = nn.Linear(mods[0].in_features, sum(m.out_features for m in mods), bias=has_bias)
        lin.weight.data = torch.cat([m.weight.detach() for m in mods])
        if has_bias:
            lin.bias.data = torch.cat([bias(m) for m in mods])
        return lin.to(o.dtype)
    if all(isinstance(m, QuantLinear) for m in mods):
        qs = [m.quantized() for m in mods]
        if len({(q.bits, q.group_size) for q in qs}) == 1 and all(torch.equal(q.g_idx, qs[0].g_idx) for q in qs):
            return MatMulNBitsLinear(concat_quantized(qs), torch.cat([bias(m) for m in mods]) if has_bias else None,
                                     o.dtype, o.accuracy_level)
    return None


class Projections(nn.Module):
    """Projections of one input: fused into one matmul + Split when possible, else one matmul each."""

    def __init__(self, mods: list[nn.Module], o: GraphOptions):
        super().__init__()
        # HeadwiseLowRank (low-rank Q/K) has no out_features: heads * head_dim
        self.sizes = [getattr(m, "out_features", None) or m.heads * m.head_dim for m in mods]
        self.fused = fused_linear(mods, o)
        self.parts = None if self.fused is not None else nn.ModuleList(as_graph_linear(m, o) for m in mods)

    def forward(self, x):
        if self.fused is not None:
            return self.fused(x).split(self.sizes, -1)
        return [p(x) for p in self.parts]


class GraphLayer(nn.Module):
    def __init__(self, layer: nn.Module, rotary: RotaryCache, o: GraphOptions):
        super().__init__()
        att, mlp = layer.self_attn, layer.mlp
        self.heads, self.kv_heads, self.dim, self.v_dim = att.num_heads, att.num_kv_heads, att.head_dim, att.v_head_dim
        self.pad = o.pad_value_cache and self.v_dim < self.dim
        self.gqa = o.attention == "gqa"
        self.rotary = rotary
        self.input_norm, self.post_norm = FusedNorm(layer.input_layernorm), FusedNorm(layer.post_attention_layernorm)
        self.qkv = Projections([att.q_proj, att.k_proj, att.v_proj], o)
        self.o_proj = as_graph_linear(att.o_proj, o)
        self.gate_up = Projections([mlp.gate_proj, mlp.up_proj], o)
        self.down = as_graph_linear(mlp.down_proj, o)
        if mlp.act_fn.__class__.__name__ not in ("SiLU", "SiLUActivation"):
            raise ValueError(f"the ONNX graph writes SiLU; this model's MLP uses {mlp.act_fn.__class__.__name__}")

    def forward(self, x, residual, lengths, past_k, past_v):
        """``lengths``: (seqlens_k, total) for GroupQueryAttention, (position_ids, 4-D mask) for Attention."""
        if residual is None:  # first layer: nothing to add yet
            h, residual = self.input_norm(x), x
        else:
            h, residual = self.input_norm(x, residual)
        q, k, v = self.qkv(h)
        if not self.gqa:
            q, k = self.rotary(q, lengths[0], self.heads), self.rotary(k, lengths[0], self.kv_heads)
        if self.pad:  # zero columns up to the key head dim: o_proj then reads the first v_dim of each head
            v = reshape_bt(pad_last(reshape_bt(v, self.kv_heads, self.v_dim), self.dim - self.v_dim),
                           self.kv_heads * self.dim)
        if self.gqa:
            y, pk, pv = group_query_attention(q, k, v, *lengths, past_k, past_v, self.rotary, self.heads,
                                              self.kv_heads, self.dim**-0.5)
        else:
            y, pk, pv = attention(q, k, v, lengths[1], past_k, past_v, self.heads, self.kv_heads, self.dim**-0.5)
        if self.pad:
            y = reshape_bt(reshape_bt(y, self.heads, self.dim)[..., : self.v_dim], self.heads * self.v_dim)
        h, residual = self.post_norm(self.o_proj(y), residual)
        gate, up = self.gate_up(h)
        return self.down(F.silu(gate) * up), residual, pk, pv


def head_weights(model, o: GraphOptions) -> tuple[nn.Module, nn.Module]:
    """(embedding, lm_head) as graph modules. A tied, equally quantized pair shares one quantized weight, which
    the post-processing writes once (GatherBlockQuantized reads the lm_head's MatMulNBits data)."""
    emb_w = model.model.embed_tokens.weight.detach().float()
    head = model.lm_head
    tied = bool(model.config.tie_word_embeddings)
    if isinstance(head, QuantLinear):
        head_q = head.quantized()
        lm_head = MatMulNBitsLinear(head_q, head.bias, o.dtype, o.accuracy_level)
    elif HEAD_BITS[o.lm_head]:
        head_q = quantize_rtn(head.weight, HEAD_BITS[o.lm_head], o.block_size)
        lm_head = MatMulNBitsLinear(head_q, head.bias, o.dtype, o.accuracy_level)
    else:
        head_q, lm_head = None, copy.deepcopy(head).to(o.dtype)
    bits = HEAD_BITS[o.embedding]
    if bits is None:
        embed = nn.Embedding.from_pretrained(emb_w.to(o.dtype))
    elif tied and head_q is not None and head_q.bits == bits:
        embed = QuantEmbedding(head_q, o.dtype)
    else:
        embed = QuantEmbedding(quantize_rtn(emb_w, bits, o.block_size), o.dtype)
    return embed, lm_head


class GraphDecoder(nn.Module):
    """What the graph computes: (input_ids, attention_mask, [position_ids,] *past) -> (logits, *presents);
    position_ids only with the standard Attention op (GroupQueryAttention derives positions from the mask)."""

    def __init__(self, model, o: GraphOptions):
        super().__init__()
        cfg = model.config
        model = copy.deepcopy(model).to(o.dtype).eval()
        self.embed, self.lm_head = head_weights(model, o)
        self.rotary = RotaryCache(model.model.rotary_emb, cfg.max_position_embeddings, cfg.head_dim, o.dtype)
        self.layers = nn.ModuleList(GraphLayer(layer, self.rotary, o) for layer in model.model.layers)
        self.norm = FusedNorm(model.model.norm)
        self.takes_positions = o.attention != "gqa"

    def forward(self, input_ids, attention_mask, *rest):
        x = self.embed(input_ids)
        if self.takes_positions:
            position_ids, *past = rest
            lengths = (position_ids, attention_mask_4d(attention_mask, input_ids.shape[1], past[0].shape[2],
                                                       x.dtype, x.device))
        else:
            past, lengths = rest, gqa_lengths(attention_mask)
        residual, presents = None, []
        for i, layer in enumerate(self.layers):
            x, residual, pk, pv = layer(x, residual, lengths, past[2 * i], past[2 * i + 1])
            presents += [pk, pv]
        h, _ = self.norm(x, residual)
        return (self.lm_head(h), *presents)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits of a whole batch (no past) in PyTorch: the reference the written graph must match."""
        empty = []
        for layer in self.layers:
            dv = layer.dim if layer.pad else layer.v_dim
            shape = (ids.shape[0], layer.kv_heads, 0)
            empty += [torch.zeros(*shape, layer.dim, dtype=self.rotary.cos.dtype),
                      torch.zeros(*shape, dv, dtype=self.rotary.cos.dtype)]
        positions = [torch.arange(ids.shape[1]).expand_as(ids)] if self.takes_positions else []
        return self(ids, torch.ones_like(ids), *positions, *empty)[0]


def finalize(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Placeholder-domain ops to the default domain at opset 23; Constant nodes become initializers; identical
    initializers are kept once; a quantized embedding reads the tied lm_head's MatMulNBits data."""
    g = proto.graph
    for node in g.node:
        if node.domain == TMP_DOMAIN:
            node.domain = ""
    imports = [op for op in proto.opset_import if op.domain not in ("", TMP_DOMAIN)]
    del proto.opset_import[:]
    proto.opset_import.extend([helper.make_opsetid("", OPSET), *imports])
    consts = [n for n in g.node if n.op_type == "Constant" and n.attribute[0].name == "value"]
    for n in consts:
        t = copy.deepcopy(n.attribute[0].t)
        t.name = n.output[0]
        g.initializer.append(t)
        g.node.remove(n)
    _tie_embedding(g)
    _dedupe_initializers(g)
    return proto


def _rename_inputs(g, renames: dict[str, str]) -> None:
    for node in g.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]


def _dedupe_initializers(g) -> None:
    seen, renames, keep = {}, {}, []
    for t in g.initializer:
        key = (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes())
        if key in seen:
            renames[t.name] = seen[key]
        else:
            seen[key] = t.name
            keep.append(t)
    del g.initializer[:]
    g.initializer.extend(keep)
    _rename_inputs(g, renames)


def _tie_embedding(g) -> None:
    inits = {t.name: t for t in g.initializer}
    gathers = [n for n in g.node if n.op_type == "GatherBlockQuantized"]
    heads = [n for n in g.node if n.op_type == "MatMulNBits"]
    if not gathers or not heads:
        return
    gather, head = gathers[0], heads[-1]  # the lm_head is the last matmul
    data, b = inits.get(gather.input[0]), inits.get(head.input[1])
    if data is None or b is None or numpy_helper.to_array(data).tobytes() != numpy_helper.to_array(b).tobytes():
        return
    shape = numpy_helper.from_array(np.array(list(data.dims), dtype=np.int64), "embedding_data_shape")
    g.initializer.remove(data)
    g.initializer.append(shape)
    view = helper.make_node("Reshape", [b.name, shape.name], ["embedding_data"], name="embedding_data_view")
    g.node.insert(0, view)
    gather.input[0] = "embedding_data"
