"""GPTQ integers -> llama.cpp's Q4_0 / Q8_0 blocks, unchanged (no re-rounding).

A Q4_0 block (ggml ``block_q4_0``) is 32 weights along the input dim: ``d`` (float16) then 16 bytes, byte j holding
weight j in its low nibble and weight j + 16 in its high nibble; value = d x (q - 8). A symmetric 4-bit GPTQ group
of 32 (zero 8, float16 scale) is exactly one block with d = the scale. Q8_0: ``d`` then 32 int8, value = d x q: a
symmetric 8-bit group of 32 (zero 128) with q = code - 128. Rows of a tensor are its output features; a row holds
in / 32 blocks, as the ``gguf`` package's reader expects (uint8 (rows, blocks x bytes)).
"""

from __future__ import annotations

import numpy as np
import torch

from ..modeling.packing import QuantizedWeight
from ..errors import UserError

BLOCK = 32
GGML_TYPES = {4: "Q4_0", 8: "Q8_0"}  # GPTQ bits -> the llama.cpp type that holds them exactly


class GGMLBlockError(UserError, ValueError):
    """GPTQ weights that Q4_0 / Q8_0 cannot hold without re-rounding; the message names the setting and the fix."""


def ggml_blocker(bits: int, group_size: int, sym: bool, permuted_groups: bool) -> str | None:
    """Why GPTQ weights of these settings cannot be written as Q4_0 / Q8_0 unchanged, or None."""
    if bits not in GGML_TYPES:
        return f"{bits}-bit GPTQ weights (Q4_0 holds 4 bits and Q8_0 8 bits exactly): use quantization.bits: 4 or 8"
    if group_size != BLOCK:
        return (f"quantization.group_size {group_size} (a Q4_0 / Q8_0 block is a group of {BLOCK}): use "
                f"quantization.group_size: {BLOCK}")
    if not sym:
        return "asymmetric GPTQ (Q4_0 / Q8_0 have an implied zero point): use quantization.sym: true"
    if permuted_groups:
        return ("act-order GPTQ with permuted groups (blocks are consecutive): use quantization.static_groups: true "
                "or quantization.desc_act: false")
    return None


def check_blocks(q: QuantizedWeight, name: str) -> None:
    reason = ggml_blocker(q.bits, q.group_size, True, False)
    in_f = q.codes.shape[1]
    if reason is None and in_f % BLOCK:
        reason = f"{name} has {in_f} input features, not a multiple of {BLOCK}"
    if reason is None and not torch.equal(q.g_idx.long(), torch.arange(in_f) // BLOCK):
        reason = (f"{name} has permuted groups (act-order): use quantization.static_groups: true or "
                  "quantization.desc_act: false")
    if reason is None and not bool((q.zeros == 2 ** (q.bits - 1)).all()):
        reason = f"{name} has zero points other than {2 ** (q.bits - 1)} (asymmetric): use quantization.sym: true"
    if reason:
        raise GGMLBlockError(f"cannot write {name} as {GGML_TYPES.get(q.bits, 'Q4_0/Q8_0')} unchanged: {reason}")


def ggml_blocks(q: QuantizedWeight, name: str = "weight") -> tuple[np.ndarray, str]:
    """(uint8 (out, in / 32 x bytes per block), type name) of one GPTQ weight, its integers and scales as they are."""
    check_blocks(q, name)
    out_f, in_f = q.codes.shape
    nb = in_f // BLOCK
    codes = q.codes.numpy().astype(np.int16).reshape(out_f, nb, BLOCK)
    d = np.ascontiguousarray(q.scales.to(torch.float16).numpy().T).view(np.uint8).reshape(out_f, nb, 2)
    if q.bits == 4:
        qs = (codes[..., :16] | (codes[..., 16:] << 4)).astype(np.uint8)
    else:
        qs = (codes - 128).astype(np.int8).view(np.uint8)
    return np.concatenate([d, qs], axis=-1).reshape(out_f, -1), GGML_TYPES[q.bits]


def pad_heads(q: QuantizedWeight, axis: int, heads: int, width: int, to: int) -> QuantizedWeight:
    """``q`` with each of ``heads`` runs of ``width`` rows (axis 0) or input columns (axis 1) widened to ``to`` by
    weights that are exactly zero (code = the zero point): the value heads of an attention padded to the key head
    dim, as llama.cpp's single head size needs. Padded columns come out in blocks of 32 (``to`` a multiple of 32),
    each block holding columns of one GPTQ group of 32 and zeros, with that group's scale: every weight keeps its
    integer and scale."""
    zero = 2 ** (q.bits - 1)
    codes, scales, zeros = q.codes, q.scales, q.zeros
    if axis == 0:
        c = codes.reshape(heads, width, -1)
        codes = torch.cat([c, torch.full((heads, to - width, c.shape[2]), zero, dtype=c.dtype)], 1).flatten(0, 1)
        s, z = scales.reshape(scales.shape[0], heads, width), zeros.reshape(zeros.shape[0], heads, width)
        scales = torch.cat([s, s.new_zeros(s.shape[0], heads, to - width)], 2).flatten(1)
        zeros = torch.cat([z, torch.full((z.shape[0], heads, to - width), zero, dtype=z.dtype)], 2).flatten(1)
        return QuantizedWeight(codes, scales, zeros, q.g_idx, q.bits, q.group_size)
    # columns: each head's ``width`` real columns then zeros; a new block takes the scale of the one GPTQ group its
    # real columns come from (blocks of zeros get scale 0), which must be one group
    n_out, g = codes.shape[0], q.group_size
    c = codes.reshape(n_out, heads, width)
    codes = torch.cat([c, torch.full((n_out, heads, to - width), zero, dtype=c.dtype)], 2).flatten(1)
    offset = torch.arange(heads * to) % to
    source = (torch.arange(heads * to) // to) * width + offset  # original column of each padded column
    real = offset < width
    group = torch.where(real, q.g_idx.long()[source.clamp(max=heads * width - 1)], -1).reshape(-1, BLOCK)
    first = group.max(1).values  # the group of a block's real columns (-1: none)
    if bool(((group != first[:, None]) & (group >= 0)).any()):
        raise GGMLBlockError(f"value heads of width {width} cannot be padded to {to} without splitting a GPTQ group "
                             f"of {g} across blocks of {BLOCK}")
    scales = torch.where((first >= 0)[:, None], q.scales[first.clamp(min=0)], q.scales.new_zeros(()))
    zeros = torch.full((first.shape[0], n_out), zero, dtype=q.zeros.dtype)
    g_idx = (torch.arange(codes.shape[1]) // BLOCK).to(q.g_idx.dtype)
    return QuantizedWeight(codes, scales, zeros, g_idx, q.bits, BLOCK)


def rope_row_order(heads: int, head_dim: int) -> torch.Tensor:
    """The row order llama.cpp's rotary expects for Q / K (its converter's permute): in each head, the rows of the
    two rotate-half halves interleaved (row 2i from i, row 2i + 1 from i + head_dim / 2)."""
    idx = torch.arange(heads * head_dim).reshape(heads, 2, head_dim // 2)
    return idx.transpose(1, 2).reshape(-1)
