"""The GPTQ checkpoint format: integers packed LSB-first into int32 words as one continuous bit stream
(for 2/4/8 bits value j of a word sits at bit offset bits*j; 3-bit values straddle words, as AutoGPTQ packs
them). qweight packs along in_features, qzeros along out_features."""

from __future__ import annotations

import torch

from .gptq import QuantizedWeight


class PackingError(ValueError):
    """A shape the GPTQ format cannot hold."""


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """int (n, m) with values < 2^bits -> int32 (n*bits/32, m), packed along dim 0. n must be a multiple of 32."""
    n, m = values.shape
    if n % 32:
        raise PackingError(f"cannot pack {n} values along a dimension that is not a multiple of 32")
    v = values.to(torch.int64).view(n // 32, 32, m)
    words = torch.zeros(n // 32, bits, m, dtype=torch.int64)
    for k in range(32):
        off = k * bits
        w0, sh = off // 32, off % 32
        words[:, w0] |= (v[:, k] << sh) & 0xFFFFFFFF
        if sh + bits > 32:
            words[:, w0 + 1] |= v[:, k] >> (32 - sh)
    words = words.view(n * bits // 32, m)
    return (words - ((words >> 31) << 32)).to(torch.int32)  # reinterpret uint32 as int32


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_rows: int32 (n*bits/32, m) -> int32 (n, m)."""
    rows, m = words.shape
    n = rows * 32 // bits
    w = (words.to(torch.int64) & 0xFFFFFFFF).view(n // 32, bits, m)
    out = torch.zeros(n // 32, 32, m, dtype=torch.int64)
    mask = 2**bits - 1
    for k in range(32):
        off = k * bits
        w0, sh = off // 32, off % 32
        val = w[:, w0] >> sh
        if sh + bits > 32:
            val = val | (w[:, w0 + 1] << (32 - sh))
        out[:, k] = val & mask
    return out.view(n, m).to(torch.int32)


def pack_weight(q: QuantizedWeight, checkpoint_format: str) -> dict[str, torch.Tensor]:
    """qweight, qzeros, scales, g_idx of one linear. ``gptq`` (v1) stores zero - 1; ``gptq_v2`` the zero."""
    zeros = q.zeros - 1 if checkpoint_format == "gptq" else q.zeros
    if (zeros < 0).any():
        raise PackingError("a zero point of 0 cannot be stored in checkpoint_format 'gptq' (v1): use gptq_v2")
    return {"qweight": pack_rows(q.codes.T.contiguous(), q.bits),
            "qzeros": pack_rows(zeros.T.contiguous(), q.bits).T.contiguous(),
            "scales": q.scales.to(torch.float16), "g_idx": q.g_idx.to(torch.int32)}


def unpack_weight(t: dict[str, torch.Tensor], bits: int, group_size: int, checkpoint_format: str) -> QuantizedWeight:
    codes = unpack_rows(t["qweight"], bits).T.contiguous()
    zeros = unpack_rows(t["qzeros"].T.contiguous(), bits).T.contiguous()
    zeros = zeros + 1 if checkpoint_format == "gptq" else zeros
    return QuantizedWeight(codes=codes, scales=t["scales"], zeros=zeros, g_idx=t["g_idx"], bits=bits,
                           group_size=group_size)
