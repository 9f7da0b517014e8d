"""The GPTQ checkpoint format: a linear's integer codes and grid (QuantizedWeight), and their packing. Integers
are packed LSB-first into int32 words as one continuous bit stream
(for 2/4/8 bits value j of a word sits at bit offset bits*j; 3-bit values straddle words, as AutoGPTQ packs
them). qweight packs along in_features, qzeros along out_features."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError


class PackingError(UserError, ValueError):
    """A shape the GPTQ format cannot hold."""


DEQUANT_CHUNK_ELEMENTS = 1 << 22  # dequantize this many weights at a time (float32 work copies of 16 MB)
CHUNK_VALUES = 1 << 21  # values packed or unpacked per step: int64 work copies of about 16 MB, any weight size


@dataclass
class QuantizedWeight:
    """Integer codes and grid of one linear's weight (out, in), in the original column order."""

    codes: torch.Tensor  # (out, in), values in [0, 2^bits - 1]: uint8 as quantized, int32 as unpacked
    scales: torch.Tensor  # float16 (groups, out)
    zeros: torch.Tensor  # int32 (groups, out), the true zero point (not v1's zero - 1)
    g_idx: torch.Tensor  # int32 (in,), group of each input column
    bits: int
    group_size: int  # -1: one group per row

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out = torch.empty(self.codes.shape, dtype=dtype, device=self.codes.device)
        g = self.g_idx.long()
        step = max(1, DEQUANT_CHUNK_ELEMENTS // max(1, self.codes.shape[1]))  # rows at a time
        for r in range(0, out.shape[0], step):
            s = self.scales[g, r : r + step].float().T  # (rows, in)
            z = self.zeros[g, r : r + step].float().T
            out[r : r + step] = s * (self.codes[r : r + step].float() - z)
        return out


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """int (n, m) with values < 2^bits -> int32 (n*bits/32, m), packed along dim 0. n must be a multiple of 32.
    ``values`` may be a strided view (a transpose): it is read 32 * k rows at a time."""
    n, m = values.shape
    if n % 32:
        raise PackingError(f"cannot pack {n} values along a dimension that is not a multiple of 32")
    out = torch.empty(n * bits // 32, m, dtype=torch.int32)
    step = 32 * max(1, CHUNK_VALUES // (32 * max(m, 1)))
    for r in range(0, n, step):
        c = min(step, n - r)
        v = values[r : r + c].to(torch.int64).reshape(c // 32, 32, m)
        words = torch.zeros(c // 32, bits, m, dtype=torch.int64)
        for k in range(32):
            off = k * bits
            w0, sh = off // 32, off % 32
            words[:, w0] |= (v[:, k] << sh) & 0xFFFFFFFF
            if sh + bits > 32:
                words[:, w0 + 1] |= v[:, k] >> (32 - sh)
        words = words.view(c * bits // 32, m)
        out[r * bits // 32 : (r + c) * bits // 32] = words - ((words >> 31) << 32)  # uint32 read as int32
    return out


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_rows: int32 (n*bits/32, m) -> int32 (n, m)."""
    rows, m = words.shape
    n = rows * 32 // bits
    result = torch.empty(n, m, dtype=torch.int32)
    mask = 2**bits - 1
    step = 32 * max(1, CHUNK_VALUES // (32 * max(m, 1)))
    for r in range(0, n, step):
        c = min(step, n - r)
        w = (words[r * bits // 32 : (r + c) * bits // 32].to(torch.int64) & 0xFFFFFFFF).view(c // 32, bits, m)
        out = torch.zeros(c // 32, 32, m, dtype=torch.int64)
        for k in range(32):
            off = k * bits
            w0, sh = off // 32, off % 32
            val = w[:, w0] >> sh
            if sh + bits > 32:
                val = val | (w[:, w0 + 1] << (32 - sh))
            out[:, k] = val & mask
        result[r : r + c] = out.view(c, m)
    return result


def pack_weight(q: QuantizedWeight, checkpoint_format: str) -> dict[str, torch.Tensor]:
    """qweight, qzeros, scales, g_idx of one linear. ``gptq`` (v1) stores zero - 1; ``gptq_v2`` the zero."""
    zeros = q.zeros - 1 if checkpoint_format == "gptq" else q.zeros
    if (zeros < 0).any():
        raise PackingError("a zero point of 0 cannot be stored in checkpoint_format 'gptq' (v1): use gptq_v2")
    return {"qweight": pack_rows(q.codes.T, q.bits),
            "qzeros": pack_rows(zeros.T.contiguous(), q.bits).T.contiguous(),
            "scales": q.scales.to(torch.float16), "g_idx": q.g_idx.to(torch.int32)}


def unpack_weight(t: dict[str, torch.Tensor], bits: int, group_size: int, checkpoint_format: str) -> QuantizedWeight:
    codes = unpack_rows(t["qweight"], bits).T.contiguous()
    zeros = unpack_rows(t["qzeros"].T.contiguous(), bits).T.contiguous()
    zeros = zeros + 1 if checkpoint_format == "gptq" else zeros
    return QuantizedWeight(codes=codes, scales=t["scales"], zeros=zeros, g_idx=t["g_idx"], bits=bits,
                           group_size=group_size)
