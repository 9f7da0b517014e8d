"""GPTQ (Frantar et al. 2022) as pure tensor functions: Hessian accumulation and column-by-column quantization
with blocked lazy updates, act-order, groups, symmetric or asymmetric grids. Scales are rounded to float16 at
the moment they are chosen, so the integers found here dequantize bit for bit like the packed checkpoint."""

from __future__ import annotations

import math

import torch

from ..errors import UserError
from ..modeling.packing import QuantizedWeight


class QuantizationError(UserError, RuntimeError):
    """GPTQ could not quantize a weight; the message names it."""


def accumulate_hessian(h: torch.Tensor, x: torch.Tensor, count: int) -> int:
    """Running mean of 2 x x^T over tokens: h (in, in) float64, x (tokens, in). Returns the new token count."""
    n = x.shape[0]
    total = count + n
    h.mul_(count / total)
    x = x.to(h.dtype) * math.sqrt(2.0 / total)
    h.addmm_(x.T, x)
    return total


def grid(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale (float16-exact, as float32) and integer zero for w (out, cols)."""
    maxq = 2**bits - 1
    lo = w.min(dim=1).values.clamp(max=0)
    hi = w.max(dim=1).values.clamp(min=0)
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = -hi
    scale = (hi - lo) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.half().float()  # the checkpoint stores float16 scales: choose codes against those
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 2.0**-24))
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def quantize_weight(w: torch.Tensor, h: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = True,
                    desc_act: bool = False, damp_percent: float = 0.01, block_size: int = 128, name: str = "weight"
                    ) -> tuple[QuantizedWeight, dict]:
    """GPTQ of w (out, in) with Hessian h (in, in). Returns the codes and a dict of diagnostics (damping used,
    retries, squared error weighted by H)."""
    out_f, in_f = w.shape
    h = h.to(torch.float32).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    perm = torch.argsort(torch.diagonal(h), descending=True) if desc_act else torch.arange(in_f)
    h = h[perm][:, perm]
    gs = in_f if group_size == -1 else group_size
    mean_diag = torch.mean(torch.diagonal(h).abs())
    damp, hinv, retries = damp_percent, None, 0
    while hinv is None:
        hd = h.clone()
        hd.diagonal().add_(damp * mean_diag)
        chol, info = torch.linalg.cholesky_ex(hd)
        del hd
        if int(info) == 0:
            chol, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
        if int(info) == 0:
            hinv = chol
        else:
            retries += 1
            damp *= 10
            if damp > 10:
                raise QuantizationError(f"{name}: Hessian not positive definite even with damping {damp:.3g}")
    inv, dead = torch.argsort(perm), dead[perm]
    n_groups = math.ceil(in_f / gs)
    scales, zeros = torch.zeros(n_groups, out_f), torch.zeros(n_groups, out_f, dtype=torch.int32)
    codes = torch.zeros(out_f, in_f, dtype=torch.uint8)
    loss = 0.0
    # rows are independent given H: a few at a time, so the float32 work copies of a wide weight (an lm_head)
    # stay small
    for r1 in range(0, out_f, max(1, ROW_CHUNK_ELEMENTS // in_f)):
        r2 = min(out_f, r1 + max(1, ROW_CHUNK_ELEMENTS // in_f))
        rows = w[r1:r2].detach().to(torch.float32)[:, perm]  # a copy
        rows[:, dead] = 0.0
        c, sc, z, lo = _quantize_rows(rows, hinv, bits, gs, sym, block_size)
        codes[r1:r2], scales[:, r1:r2], zeros[:, r1:r2] = c[:, inv], sc, z.to(torch.int32)
        loss += float(lo.sum())
    g_idx = (torch.arange(in_f) // gs)[inv].to(torch.int32)
    qw = QuantizedWeight(codes=codes, scales=scales.half(), zeros=zeros, g_idx=g_idx, bits=bits,
                         group_size=group_size)
    return qw, {"damp_percent": damp, "retries": retries, "loss": loss}


ROW_CHUNK_ELEMENTS = 1 << 22  # weight rows per GPTQ pass: about this many elements (16 MB of float32)


def _quantize_rows(w: torch.Tensor, hinv: torch.Tensor, bits: int, gs: int, sym: bool, block_size: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ of rows w (rows, in) (columns in processing order; modified) given the upper Cholesky factor of
    H^-1: returns codes (rows, in) uint8, scales and zeros (groups, rows), squared errors per row."""
    maxq = 2**bits - 1
    rows, in_f = w.shape
    n_groups = math.ceil(in_f / gs)
    scales, zeros = torch.zeros(n_groups, rows), torch.zeros(n_groups, rows)
    codes = torch.zeros(rows, in_f, dtype=torch.uint8)
    losses = torch.zeros(rows)
    scale = zero = None
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % gs == 0:  # a new group starts (in the processing order)
                group = w[:, col : col + gs] if i == 0 else torch.cat([w1[:, i:], w[:, i2 : col + gs]], 1)[:, :gs]
                scale, zero = grid(group, bits, sym)
                scales[col // gs], zeros[col // gs] = scale, zero
            x = w1[:, i]
            q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
            codes[:, col] = q.to(torch.uint8)
            deq = scale * (q - zero)
            d = hinv1[i, i]
            losses += (x - deq) ** 2 / d**2 / 2
            err = (x - deq) / d
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes, scales, zeros, losses


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int, sym: bool = True) -> QuantizedWeight:
    """Round-to-nearest on the same grid as GPTQ (float16 scales), group by group: for weights quantized without
    calibration data (an embedding table, an lm_head when the recipe does not GPTQ it)."""
    w = w.detach().to(torch.float32)
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    maxq = 2**bits - 1
    n_groups = math.ceil(in_f / gs)
    scales, zeros = torch.zeros(n_groups, out_f), torch.zeros(n_groups, out_f)
    codes = torch.zeros(out_f, in_f, dtype=torch.uint8)
    for g in range(n_groups):
        cols = slice(g * gs, min((g + 1) * gs, in_f))
        scale, zero = grid(w[:, cols], bits, sym)
        scales[g], zeros[g] = scale, zero
        codes[:, cols] = torch.clamp(torch.round(w[:, cols] / scale[:, None]) + zero[:, None], 0, maxq).to(torch.uint8)
    return QuantizedWeight(codes=codes, scales=scales.half(), zeros=zeros.to(torch.int32),
                           g_idx=(torch.arange(in_f) // gs).to(torch.int32), bits=bits, group_size=group_size)
