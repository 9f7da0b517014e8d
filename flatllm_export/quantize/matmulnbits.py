"""GPTQ integers -> onnxruntime's com.microsoft MatMulNBits tensors, unchanged (no re-rounding).

MatMulNBits (attrs K, N, bits, block_size): B uint8 [N, k_blocks, block_size*bits/8] with values packed low
bits first; scales [N, k_blocks] (A's float type); zero_points uint8 [N, ceil(k_blocks*bits/8)], packed the
same way. One GPTQ group is one block, so block_size = group_size (one block per row for group_size -1).
"""

from __future__ import annotations

import math

import numpy as np

from ..modeling.packing import QuantizedWeight
from ..errors import UserError

SUPPORTED_BITS = (2, 4, 8)


class MatMulNBitsError(UserError, ValueError):
    pass


def _pack_bytes(values: np.ndarray, bits: int) -> np.ndarray:
    """(rows, n) small ints -> (rows, ceil(n*bits/8)) uint8, value j at bit offset bits*j (LSB first)."""
    rows, n = values.shape
    per = 8 // bits
    padded = np.zeros((rows, math.ceil(n / per) * per), dtype=np.uint8)
    padded[:, :n] = values
    padded = padded.reshape(rows, -1, per)
    out = np.zeros(padded.shape[:2], dtype=np.uint8)
    for j in range(per):
        out |= (padded[:, :, j] << (bits * j)).astype(np.uint8)
    return out


def block_size_for(q: QuantizedWeight) -> int:
    in_f = q.codes.shape[1]
    return max(16, 1 << (in_f - 1).bit_length()) if q.group_size == -1 else q.group_size


def to_matmulnbits(q: QuantizedWeight, float_dtype=np.float32) -> dict:
    """{B, scales, zero_points, K, N, bits, block_size} for one quantized linear."""
    if q.bits not in SUPPORTED_BITS:
        raise MatMulNBitsError(f"MatMulNBits takes {SUPPORTED_BITS} bits; this model has {q.bits}-bit GPTQ weights")
    g_idx = q.g_idx.numpy()
    n_out, k_in = q.codes.shape
    block = block_size_for(q)
    if not np.array_equal(g_idx, np.arange(k_in) // (k_in if q.group_size == -1 else q.group_size)):
        raise MatMulNBitsError("act-order (desc_act) GPTQ weights have permuted groups, which MatMulNBits blocks "
                               "cannot hold; quantize with quantization.static_groups: true (or desc_act: false) "
                               "for ONNX int4")
    k_blocks = math.ceil(k_in / block)
    codes = np.zeros((n_out, k_blocks * block), dtype=np.uint8)
    codes[:, :k_in] = q.codes.numpy().astype(np.uint8)
    b = _pack_bytes(codes.reshape(n_out * k_blocks, block), q.bits).reshape(n_out, k_blocks, block * q.bits // 8)
    scales = q.scales.float().numpy().T.astype(float_dtype)  # (N, k_blocks)
    zeros = _pack_bytes(q.zeros.numpy().T.astype(np.uint8), q.bits)  # (N, ceil(k_blocks*bits/8))
    return {"B": b, "scales": np.ascontiguousarray(scales), "zero_points": zeros, "K": k_in, "N": n_out,
            "bits": q.bits, "block_size": block}
