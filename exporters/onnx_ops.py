"""Export-time stand-ins: each computes its reference result in PyTorch and exports as ONE onnxruntime node.

The ONNX exporter builds the graph's parts from them (``exporters/onnx_graph.py``) so the written graph is
lean: fused residual-add + RMSNorm, rotary with a cos/sin cache, the standard ``Attention`` op with the KV cache
inside, quantized matmuls and a quantized embedding lookup. Shapes are attributes or constants, never computed
per token: reshapes keep batch and sequence with Reshape's 0 ("copy this dim").

Ops of the default domain the TorchScript exporter does not know (the standard opset-23 ``Attention``; onnxruntime's
``SimplifiedLayerNormalization``, registered in the default domain) are emitted under the placeholder domain
``TMP_DOMAIN`` (the exporter stops at opset 20 and checks default-domain ops); the exporter then moves them to the
default domain and raises the opset to 23.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from flatllm_export.modeling.modeling_flatllm import attention_mask_4d, rms_norm
from flatllm_export.modeling.packing import QuantizedWeight
from flatllm_export.quantize.matmulnbits import to_matmulnbits

TMP_DOMAIN = "flatllm.opset23"


def _const(g, values):
    return g.op("Constant", value_t=torch.tensor(values, dtype=torch.int64))


def _typed(g, y, like, last: int):
    """Give an emitted node x's type with the last dim replaced (the exporter cannot infer contrib ops)."""
    sizes = like.type().varyingSizes()
    if sizes is not None:
        y.setType(like.type().with_sizes(list(sizes[:-1]) + [last]))
    return y


class _Reshape(torch.autograd.Function):
    """x (B, T, ...) -> (B, T, *tail) as one Reshape with a constant [0, 0, -1, *tail[1:]] (0 keeps a dim)."""

    @staticmethod
    def forward(ctx, x, tail):
        return x.reshape(*x.shape[:2], *tail)

    @staticmethod
    def symbolic(g, x, tail):
        return g.op("Reshape", x, _const(g, [0, 0, -1, *tail[1:]]))


def reshape_bt(x: torch.Tensor, *tail: int) -> torch.Tensor:
    return _Reshape.apply(x, tuple(tail))


class _PadLast(torch.autograd.Function):
    """Zero columns appended to the last dim of a 4-D x: one Pad with constant pads."""

    @staticmethod
    def forward(ctx, x, n):
        return F.pad(x, (0, n))

    @staticmethod
    def symbolic(g, x, n):
        return g.op("Pad", x, _const(g, [0, 0, 0, 0, 0, 0, 0, n]))


def pad_last(x: torch.Tensor, n: int) -> torch.Tensor:
    return _PadLast.apply(x, n)


class _MatMulNBits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b, scales, zeros, weight, k, n, bits, block_size, accuracy_level):
        return x @ weight.to(x.dtype).T

    @staticmethod
    def symbolic(g, x, b, scales, zeros, weight, k, n, bits, block_size, accuracy_level):
        inputs = [x, b, scales] + ([] if zeros is None else [zeros])
        y = g.op("com.microsoft::MatMulNBits", *inputs, K_i=k, N_i=n, bits_i=bits, block_size_i=block_size,
                 accuracy_level_i=accuracy_level)
        return _typed(g, y, x, n)


def concat_quantized(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Quantized weights of linears sharing their input, stacked along out_features (one matmul, then Split)."""
    first = parts[0]
    return QuantizedWeight(codes=torch.cat([p.codes for p in parts]), scales=torch.cat([p.scales for p in parts], 1),
                           zeros=torch.cat([p.zeros for p in parts], 1), g_idx=first.g_idx, bits=first.bits,
                           group_size=first.group_size)


def is_symmetric(q: QuantizedWeight) -> bool:
    return bool((q.zeros == 2 ** (q.bits - 1)).all())


class MatMulNBitsLinear(nn.Module):
    """x @ W^T (+ bias) for a block-quantized W: one com.microsoft MatMulNBits node. Symmetric weights omit the
    zero points (the op's default is the symmetric 2^(bits-1)), so a tied embedding can read the same tensors."""

    def __init__(self, q: QuantizedWeight, bias: torch.Tensor | None, float_dtype: torch.dtype, accuracy_level: int):
        super().__init__()
        np_dtype = np.float16 if float_dtype == torch.float16 else np.float32
        t = to_matmulnbits(q, np_dtype)
        self.k, self.n, self.bits, self.block_size = t["K"], t["N"], t["bits"], t["block_size"]
        self.accuracy_level = accuracy_level
        self.register_buffer("b", torch.from_numpy(t["B"]))
        self.register_buffer("scales", torch.from_numpy(t["scales"]))
        self.register_buffer("zeros", None if is_symmetric(q) else torch.from_numpy(t["zero_points"]))
        self.register_buffer("weight", q.dequantize(torch.float32).to(float_dtype))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(float_dtype), requires_grad=False)

    def forward(self, x):
        y = _MatMulNBits.apply(x, self.b, self.scales, self.zeros, self.weight, self.k, self.n, self.bits,
                               self.block_size, self.accuracy_level)
        return y + self.bias if self.bias is not None else y


class _GatherBlockQuantized(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, data, scales, weight, bits, block_size):
        return F.embedding(ids, weight)

    @staticmethod
    def symbolic(g, ids, data, scales, weight, bits, block_size):
        y = g.op("com.microsoft::GatherBlockQuantized", data, ids, scales, gather_axis_i=0, quantize_axis_i=1,
                 block_size_i=block_size, bits_i=bits)
        sizes = ids.type().varyingSizes()
        if sizes is not None:
            y.setType(scales.type().with_sizes(list(sizes) + [weight.type().varyingSizes()[-1]]))
        return y


class QuantEmbedding(nn.Module):
    """Embedding lookup of a symmetric block-quantized table (vocab, hidden): one GatherBlockQuantized node.
    ``data`` is the MatMulNBits B tensor of the same weight viewed (vocab, hidden*bits/8): when the lm_head is
    that weight (tied), the exporter keeps a single copy."""

    def __init__(self, q: QuantizedWeight, float_dtype: torch.dtype):
        super().__init__()
        if not is_symmetric(q):
            raise ValueError("the quantized embedding is written symmetric (GatherBlockQuantized's default zero)")
        np_dtype = np.float16 if float_dtype == torch.float16 else np.float32
        t = to_matmulnbits(q, np_dtype)
        self.bits, self.block_size = t["bits"], t["block_size"]
        self.register_buffer("data", torch.from_numpy(t["B"].reshape(t["N"], -1)))
        self.register_buffer("scales", torch.from_numpy(t["scales"]))
        self.register_buffer("weight", q.dequantize(torch.float32).to(float_dtype))

    def forward(self, ids):
        return _GatherBlockQuantized.apply(ids, self.data, self.scales, self.weight, self.bits, self.block_size)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        return rms_norm(x, weight, eps)

    @staticmethod
    def symbolic(g, x, weight, eps):
        y = g.op(f"{TMP_DOMAIN}::SimplifiedLayerNormalization", x, weight, axis_i=-1, epsilon_f=eps, stash_type_i=1)
        return _typed(g, y, x, x.type().varyingSizes()[-1] if x.type().varyingSizes() else 0)


class _SkipRMSNorm(torch.autograd.Function):
    """(normed, sum) of x + skip: one com.microsoft SkipSimplifiedLayerNormalization (output 0 and 3)."""

    @staticmethod
    def forward(ctx, x, skip, weight, eps):
        s = x + skip
        return rms_norm(s, weight, eps), s

    @staticmethod
    def symbolic(g, x, skip, weight, eps):
        out, _, _, total = g.op("com.microsoft::SkipSimplifiedLayerNormalization", x, skip, weight, epsilon_f=eps,
                                outputs=4)
        for t in (out, total):
            t.setType(x.type())
        return out, total


class FusedNorm(nn.Module):
    """An RMSNorm that may first add the residual: ``forward(x)`` or ``forward(x, residual) -> (normed, sum)``."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight = norm.weight
        self.eps = float(norm.variance_epsilon)

    def forward(self, x, residual=None):
        if residual is None:
            return _RMSNorm.apply(x, self.weight, self.eps)
        return _SkipRMSNorm.apply(x, residual, self.weight, self.eps)


def rotate(x, position_ids, cos_cache, sin_cache, heads: int) -> torch.Tensor:
    """Rotate-half RoPE of x (B, T, heads*dim) at position_ids (B, T), cos/sin gathered from (positions, dim/2)."""
    xs = x.unflatten(-1, (heads, -1))  # (B, T, h, d)
    cos = torch.cat([cos_cache[position_ids]] * 2, -1).unsqueeze(2).to(x.dtype)  # (B, T, 1, d)
    sin = torch.cat([sin_cache[position_ids]] * 2, -1).unsqueeze(2).to(x.dtype)
    return (xs * cos + rotate_half(xs) * sin).flatten(-2)


class _Rotary(torch.autograd.Function):
    """Rotate-half RoPE of x (B, T, heads*dim) at position_ids (B, T): one com.microsoft RotaryEmbedding."""

    @staticmethod
    def forward(ctx, x, position_ids, cos_cache, sin_cache, heads):
        return rotate(x, position_ids, cos_cache, sin_cache, heads)

    @staticmethod
    def symbolic(g, x, position_ids, cos_cache, sin_cache, heads):
        y = g.op("com.microsoft::RotaryEmbedding", x, position_ids, cos_cache, sin_cache, interleaved_i=0,
                 num_heads_i=heads)
        y.setType(x.type())
        return y


class RotaryCache(nn.Module):
    """cos/sin of every position up to the context length, (positions, dim/2), from the model's own rotary module
    (its scaling included), so the graph gathers them instead of computing them."""

    def __init__(self, rotary_emb: nn.Module, context: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        ref = torch.zeros(1, dtype=torch.float32)
        cos, sin = rotary_emb(ref, torch.arange(context)[None])  # (1, P, d), already times attention_scaling
        self.register_buffer("cos", cos[0, :, : head_dim // 2].to(dtype).contiguous())
        self.register_buffer("sin", sin[0, :, : head_dim // 2].to(dtype).contiguous())

    def forward(self, x, position_ids, heads: int):
        return _Rotary.apply(x, position_ids, self.cos, self.sin, heads)


class _Attention(torch.autograd.Function):
    """Scaled dot-product attention with the KV cache inside, GQA and a value head dim of its own; q/k/v are
    (B, T, heads*dim), the cache (B, kv_heads, past, dim). Exports as the standard opset-23 Attention op."""

    @staticmethod
    def forward(ctx, q, k, v, mask, past_k, past_v, heads, kv_heads, scale):
        q = q.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, h, T, d)
        k = torch.cat([past_k, k.unflatten(-1, (kv_heads, -1)).transpose(1, 2)], 2)  # (B, kv, P+T, d)
        v = torch.cat([past_v, v.unflatten(-1, (kv_heads, -1)).transpose(1, 2)], 2)  # (B, kv, P+T, dv)
        groups = heads // kv_heads
        kk, vv = (k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)) if groups > 1 else (k, v)
        y = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scale)  # (B, h, T, dv)
        return y.transpose(1, 2).flatten(-2), k, v

    @staticmethod
    def symbolic(g, q, k, v, mask, past_k, past_v, heads, kv_heads, scale):
        y, pk, pv = g.op(f"{TMP_DOMAIN}::Attention", q, k, v, mask, past_k, past_v, q_num_heads_i=heads,
                         kv_num_heads_i=kv_heads, scale_f=scale, outputs=3)
        v_dim = past_v.type().varyingSizes()[-1] if past_v.type().varyingSizes() else None
        if v_dim:
            _typed(g, y, q, heads * v_dim)
        pk.setType(past_k.type())
        pv.setType(past_v.type())
        return y, pk, pv


def attention(q, k, v, mask, past_k, past_v, heads: int, kv_heads: int, scale: float):
    return _Attention.apply(q, k, v, mask, past_k, past_v, heads, kv_heads, scale)


class _GroupQueryAttention(torch.autograd.Function):
    """Rotary + causal attention with the KV cache inside: one com.microsoft GroupQueryAttention (do_rotary), what
    onnxruntime-genai's own builder writes. q/k/v are (B, T, heads*dim) with one head dim for keys and values;
    ``seqlens_k`` (B,) int32 is each row's valid length - 1 and ``total`` the attention mask's length. In
    onnxruntime the past may be a max-length buffer bound as the present too (updated in place, no copy); here,
    the PyTorch side, the past is exactly the valid history and rows are unpadded."""

    @staticmethod
    def forward(ctx, q, k, v, seqlens_k, total, past_k, past_v, cos_cache, sin_cache, heads, kv_heads, scale):
        past, seq = past_k.shape[2], q.shape[1]
        pos = torch.arange(past, past + seq, device=q.device).expand(q.shape[0], -1)
        q, k = rotate(q, pos, cos_cache, sin_cache, heads), rotate(k, pos, cos_cache, sin_cache, kv_heads)
        mask = attention_mask_4d(None, seq, past, q.dtype, q.device)
        return _Attention.forward(ctx, q, k, v, mask, past_k, past_v, heads, kv_heads, scale)

    @staticmethod
    def symbolic(g, q, k, v, seqlens_k, total, past_k, past_v, cos_cache, sin_cache, heads, kv_heads, scale):
        y, pk, pv = g.op("com.microsoft::GroupQueryAttention", q, k, v, past_k, past_v, seqlens_k, total,
                         cos_cache, sin_cache, num_heads_i=heads, kv_num_heads_i=kv_heads, scale_f=scale,
                         do_rotary_i=1, rotary_interleaved_i=0, local_window_size_i=-1, outputs=3)
        y.setType(q.type())
        pk.setType(past_k.type())
        pv.setType(past_v.type())
        return y, pk, pv


def group_query_attention(q, k, v, seqlens_k, total, past_k, past_v, rotary: "RotaryCache", heads: int,
                          kv_heads: int, scale: float):
    return _GroupQueryAttention.apply(q, k, v, seqlens_k, total, past_k, past_v, rotary.cos, rotary.sin, heads,
                                      kv_heads, scale)


def gqa_lengths(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(seqlens_k, total_sequence_length) of GroupQueryAttention from a right-padded (B, S) 0/1 mask; computed
    once per call in the graph (ReduceSum, Sub, Cast; Shape, Gather, Cast)."""
    from torch.onnx import operators

    seqlens = (attention_mask.sum(1) - 1).to(torch.int32)
    return seqlens, operators.shape_as_tensor(attention_mask)[1].to(torch.int32)
