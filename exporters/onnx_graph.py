"""The lean decoder graph: the model rebuilt from the export-time stand-ins of ``onnx_ops`` (one node each), in
parts that are exported one at a time (``onnx_stitch.py`` merges them): ``GraphHead`` (embedding, and the lengths
or mask every layer shares), one ``GraphLayer`` per decoder layer (built from a copy of that layer only),
``GraphTail`` (final norm, lm_head). ``graph_logits`` runs the same parts in PyTorch, one layer at a time.

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

import torch
import torch.nn.functional as F
from torch import nn

from flatllm_export.modeling.modeling_flatllm import attention_mask_4d
from flatllm_export.emulation import head_tables
from flatllm_export.modeling.streaming import layers_of
from flatllm_export.modeling.packing import QuantizedWeight
from flatllm_export.modeling.qlinear import QuantLinear

from . import DEFAULT_ACCURACY_LEVEL, ExportError
from .onnx_ops import (FusedNorm, MatMulNBitsLinear, QuantEmbedding, RotaryCache, attention,
                       concat_quantized, gqa_lengths, group_query_attention, pad_last, reshape_bt)



@dataclass
class GraphOptions:
    dtype: torch.dtype = torch.float32
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL
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
            raise ExportError(f"the ONNX graph writes SiLU; this model's MLP uses {mlp.act_fn.__class__.__name__}")

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


def _as_dtype(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of one (small or single-layer) module in ``dtype``: the graph is built from copies, never from the
    model's own modules (the graph modules may rewrap their children)."""
    return copy.deepcopy(module).to(dtype).eval()


def head_weights(model, o: GraphOptions) -> tuple[nn.Module, nn.Module]:
    """(embedding, lm_head) as graph modules, from the tables ``emulation.head_tables`` says the export stores. A
    tied, equally quantized pair shares one quantized weight, which the stitching writes once (GatherBlockQuantized
    reads the lm_head's MatMulNBits data)."""
    table, head = head_tables(model, o.embedding, o.lm_head, o.block_size, o.dtype)
    bias = model.lm_head.bias
    if isinstance(head, QuantLinear):
        lm_head = MatMulNBitsLinear(head.quantized(), head.bias, o.dtype, o.accuracy_level)
    elif isinstance(head, QuantizedWeight):
        lm_head = MatMulNBitsLinear(head, bias, o.dtype, o.accuracy_level)
    else:  # the model's own weight when it is in the graph's dtype already (no copy of vocab x hidden)
        lm_head = nn.Linear(head.in_features, head.out_features, bias=bias is not None, device="meta")
        lm_head.weight = nn.Parameter(head.weight.detach().to(o.dtype), requires_grad=False)
        if bias is not None:
            lm_head.bias = nn.Parameter(bias.detach().to(o.dtype), requires_grad=False)
    embed = (QuantEmbedding(table, o.dtype) if isinstance(table, QuantizedWeight)
             else nn.Embedding.from_pretrained(table.to(o.dtype)))
    return embed, lm_head


class GraphHead(nn.Module):
    """What the graph computes before the first layer: the embedding lookup, and what every layer shares,
    computed once per call: (seqlens_k, total) for GroupQueryAttention, or the 4-D causal + padding mask for the
    standard Attention op (which also reads position_ids, a graph input)."""

    def __init__(self, embed: nn.Module, o: GraphOptions):
        super().__init__()
        self.embed = embed
        self.takes_positions = o.attention != "gqa"

    def forward(self, input_ids, attention_mask, past_key=None):
        """(embeddings, seqlens_k, total) or (embeddings, mask); ``past_key`` (layer 0's) only for the mask."""
        x = self.embed(input_ids)
        if self.takes_positions:
            return x, attention_mask_4d(attention_mask, input_ids.shape[1], past_key.shape[2], x.dtype, x.device)
        return (x, *gqa_lengths(attention_mask))


class GraphTail(nn.Module):
    """After the last layer: residual add + final RMSNorm, lm_head."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.norm, self.lm_head = FusedNorm(norm), lm_head

    def forward(self, x, residual):
        h, _ = self.norm(x, residual)
        return self.lm_head(h)


def graph_ends(model, o: GraphOptions) -> tuple[GraphHead, GraphTail, RotaryCache]:
    """The parts of the graph outside the decoder layers, and the rotary cache every layer shares."""
    cfg = model.config
    embed, lm_head = head_weights(model, o)
    rotary = RotaryCache(_as_dtype(model.model.rotary_emb, o.dtype), cfg.max_position_embeddings, cfg.head_dim,
                         o.dtype)
    return GraphHead(embed, o).eval(), GraphTail(_as_dtype(model.model.norm, o.dtype), lm_head).eval(), rotary


def graph_layer(layer: nn.Module, rotary: RotaryCache, o: GraphOptions) -> "GraphLayer":
    """One decoder layer as graph modules, built from a copy of it in the graph's dtype."""
    return GraphLayer(_as_dtype(layer, o.dtype), rotary, o).eval()


def empty_past(layer: "GraphLayer", batch: int, length: int = 0, generator=None) -> tuple[torch.Tensor, ...]:
    """A layer's past keys and values (batch, kv_heads, length, dim): zeros, or random with ``generator``."""
    dtype = layer.rotary.cos.dtype
    dims = (layer.dim, layer.dim if layer.pad else layer.v_dim)
    if generator is None:
        return tuple(torch.zeros(batch, layer.kv_heads, length, d, dtype=dtype) for d in dims)
    return tuple(torch.randn(batch, layer.kv_heads, length, d, generator=generator).to(dtype) for d in dims)


@torch.no_grad()
def graph_logits(model, o: GraphOptions, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a whole batch (no past) computed in PyTorch by the graph's own modules, one decoder layer at a
    time (each taken from the model's layer store and handed back): the reference the written graph must match."""
    head, tail, rotary = graph_ends(model, o)
    store = layers_of(model)
    x, *shared = head(ids, torch.ones_like(ids), torch.zeros(ids.shape[0], 1, 0, 1))
    lengths = (torch.arange(ids.shape[1]).expand_as(ids), *shared) if head.takes_positions else tuple(shared)
    residual = None
    for i in range(len(store)):
        layer = store.load(i)
        graph = graph_layer(layer, rotary, o)
        store.release(i, layer)
        del layer
        x, residual, _, _ = graph(x, residual, lengths, *empty_past(graph, ids.shape[0]))
    return tail(x, residual)
