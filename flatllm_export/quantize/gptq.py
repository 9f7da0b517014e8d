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


SCALES = ("minmax", "search")  # how a group's grid is chosen (grid's ``scale``)
SEARCH_STEPS = 9  # the search tries 2 * SEARCH_STEPS + 1 grids per group


def weight_first_tokens(x: torch.Tensor, seqlen: int, weight: float) -> torch.Tensor:
    """x (windows * seqlen, features), window-major, with each window's first token scaled by sqrt(weight), so it
    counts ``weight`` times in a Hessian. The first position is the attention sink: every later token reads its
    keys and values, and its activations are orders of magnitude larger, so an error there costs far more than
    at one ordinary token (measured on SmolLM2: docs/bench_gptq.md)."""
    if weight == 1:
        return x
    x = x.clone()
    x[::seqlen] *= math.sqrt(weight)
    return x


def grid(w: torch.Tensor, bits: int, sym: bool, scale: str = "minmax", importance: torch.Tensor | None = None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale (float16-exact, as float32) and integer zero for the group w (rows, cols).

    ``minmax``: GPTQ's own grid: the range [min, max] (symmetric: [-amax, amax]) spread over 2^bits - 1 steps,
    symmetric zero 2^(bits-1), so the largest positive weight lands half a step beyond the top code.
    ``search``: the grid that minimizes the importance-weighted squared rounding error of the group
    (``importance``: one weight per column, GPTQ passes H's diagonal, the mean squared input of each column, as
    llama.cpp's importance matrix does). Symmetric: the largest-magnitude weight w* sets the base step
    w* / -2^(bits-1) (negative when w* > 0, so w* is exactly the code 0, as llama.cpp's Q4_0 does), the step is
    tried at 2 * SEARCH_STEPS + 1 sizes around it, each candidate's codes then get their least-squares step, and
    the least error wins. Asymmetric: the range is shrunk by up to 30% toward its zero in 2 * SEARCH_STEPS + 1
    steps, zero re-rounded each time."""
    maxq = 2**bits - 1
    if scale == "search":
        return _search_grid(w, bits, sym, importance)
    if scale != "minmax":
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    lo = w.min(dim=1).values.clamp(max=0)
    hi = w.max(dim=1).values.clamp(min=0)
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = -hi
    step = (hi - lo) / maxq
    step = torch.where(step > 0, step, torch.ones_like(step))
    step = _fp16(step)  # the checkpoint stores float16 scales: choose codes against those
    zero = torch.full_like(step, (maxq + 1) / 2) if sym else torch.round(-lo / step).clamp(0, maxq)
    return step, zero


def _fp16(step: torch.Tensor) -> torch.Tensor:
    """float16-exact steps, none zero (a zero step would divide by zero; the smallest subnormal codes as zero)."""
    step = step.half().float()
    return torch.where(step != 0, step, torch.full_like(step, 2.0**-24))


def _search_grid(w: torch.Tensor, bits: int, sym: bool, importance: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    maxq = 2**bits - 1
    imp = torch.ones(w.shape[1]) if importance is None else importance.to(torch.float32).clamp(min=0)
    imp = imp.to(w.device)[None, None, :]  # (1, 1, cols)
    k = torch.arange(-SEARCH_STEPS, SEARCH_STEPS + 1, dtype=torch.float32, device=w.device)[:, None, None]
    x = w.unsqueeze(0)  # (1, rows, cols)
    if sym:
        half = 2 ** (bits - 1)
        extreme = w.gather(1, w.abs().argmax(dim=1, keepdim=True)).squeeze(1)  # signed
        extreme = torch.where(extreme != 0, extreme, torch.ones_like(extreme))
        inv = -(half + 0.1 * k) / extreme[None, :, None]  # (K, rows, 1): codes per unit of weight
        q = torch.clamp(torch.round(x * inv), -half, maxq - half)
        step = (imp * x * q).sum(-1) / (imp * q * q).sum(-1).clamp(min=1e-30)  # least squares per candidate
        step = _fp16(torch.where(step != 0, step, 1 / inv.squeeze(-1)))
        zero = torch.full_like(step, half)
    else:
        lo = w.min(dim=1).values.clamp(max=0)
        hi = w.max(dim=1).values.clamp(min=0)
        shrink = 1 - 0.3 * (k.squeeze(-1) + SEARCH_STEPS) / (2 * SEARCH_STEPS)  # (K, 1): 1.0 down to 0.7
        step = (hi - lo)[None, :] * shrink / maxq
        step = _fp16(torch.where(step > 0, step, torch.ones_like(step)))
        zero = torch.round(-lo[None, :] * shrink / step).clamp(0, maxq)
    deq = step[..., None] * (torch.clamp(torch.round(x / step[..., None]) + zero[..., None], 0, maxq) - zero[..., None])
    err = (imp * (x - deq) ** 2).sum(-1)  # (K, rows)
    best = err.argmin(dim=0, keepdim=True)
    return step.gather(0, best).squeeze(0), zero.gather(0, best).squeeze(0)


def quantize_weight(w: torch.Tensor, h: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = True,
                    desc_act: bool = False, damp_percent: float = 0.01, block_size: int = 128, name: str = "weight",
                    scale: str = "minmax", static_groups: bool = False) -> tuple[QuantizedWeight, dict]:
    """GPTQ of w (out, in) with Hessian h (in, in). Returns the codes and a dict of diagnostics (damping used,
    retries, squared error weighted by H).

    ``scale``: how each group's grid is chosen (``grid``; ``search`` weights columns by H's diagonal).
    ``static_groups``: every group's grid is chosen from the weights before any update, on consecutive columns,
    so with ``desc_act`` the columns are still processed in act order but the groups stay consecutive
    (g_idx = column // group_size): what MatMulNBits and GGUF blocks can hold. Without it, act-order groups
    are formed in processing order (permuted g_idx)."""
    out_f, in_f = w.shape
    h = h.to(torch.float32).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    importance = torch.diagonal(h).clone()  # (original column order)
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
    static = static_groups
    group_of = perm // gs  # each column's static group, in processing order
    for r1 in range(0, out_f, max(1, ROW_CHUNK_ELEMENTS // in_f)):
        r2 = min(out_f, r1 + max(1, ROW_CHUNK_ELEMENTS // in_f))
        rows = w[r1:r2].detach().to(torch.float32)
        if static:  # every group's grid from the weights as they are, consecutive columns
            fixed = [grid(rows[:, g * gs:(g + 1) * gs], bits, sym, scale, importance[g * gs:(g + 1) * gs])
                     for g in range(n_groups)]
        rows = rows[:, perm]  # a copy
        rows[:, dead] = 0.0
        c, sc, z, lo = _quantize_rows(rows, hinv, bits, gs, sym, block_size, scale, importance[perm],
                                      fixed if static else None, group_of)
        codes[r1:r2], scales[:, r1:r2], zeros[:, r1:r2] = c[:, inv], sc, z.to(torch.int32)
        loss += float(lo.sum())
    g_idx = (torch.arange(in_f) // gs if static else (torch.arange(in_f) // gs)[inv]).to(torch.int32)
    qw = QuantizedWeight(codes=codes, scales=scales.half(), zeros=zeros, g_idx=g_idx, bits=bits,
                         group_size=group_size)
    return qw, {"damp_percent": damp, "retries": retries, "loss": loss}


ROW_CHUNK_ELEMENTS = 1 << 22  # weight rows per GPTQ pass: about this many elements (16 MB of float32)


def _quantize_rows(w: torch.Tensor, hinv: torch.Tensor, bits: int, gs: int, sym: bool, block_size: int,
                   scale_rule: str, importance: torch.Tensor, fixed: list | None, group_of: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ of rows w (rows, in) (columns in processing order; modified) given the upper Cholesky factor of
    H^-1: returns codes (rows, in) uint8, scales and zeros (groups, rows), squared errors per row. ``fixed``:
    every group's (scale, zero) chosen beforehand (static groups; ``group_of`` = each column's group), else a
    group's grid is chosen from the updated weights when its first column comes (``importance``: H's diagonal
    in processing order)."""
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
            if fixed is not None:
                scale, zero = fixed[int(group_of[col])]
            elif col % gs == 0:  # a new group starts (in the processing order)
                group = w[:, col : col + gs] if i == 0 else torch.cat([w1[:, i:], w[:, i2 : col + gs]], 1)[:, :gs]
                scale, zero = grid(group, bits, sym, scale_rule, importance[col : col + gs])
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
    if fixed is not None:
        for g, (scale, zero) in enumerate(fixed):
            scales[g], zeros[g] = scale, zero
    return codes, scales, zeros, losses


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int, sym: bool = True, scale: str = "minmax",
                 importance: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest on the same grid as GPTQ (float16 scales), group by group: for weights quantized without
    calibration data (an embedding table, an lm_head when the recipe does not GPTQ it). ``scale``, ``importance``:
    as ``grid``'s (one importance per input column)."""
    w, scale_rule = w.detach().to(torch.float32), scale
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    maxq = 2**bits - 1
    n_groups = math.ceil(in_f / gs)
    scales, zeros = torch.zeros(n_groups, out_f), torch.zeros(n_groups, out_f)
    codes = torch.zeros(out_f, in_f, dtype=torch.uint8)
    for g in range(n_groups):
        cols = slice(g * gs, min((g + 1) * gs, in_f))
        scale, zero = grid(w[:, cols], bits, sym, scale_rule, None if importance is None else importance[cols])
        scales[g], zeros[g] = scale, zero
        codes[:, cols] = torch.clamp(torch.round(w[:, cols] / scale[:, None]) + zero[:, None], 0, maxq).to(torch.uint8)
    return QuantizedWeight(codes=codes, scales=scales.half(), zeros=zeros.to(torch.int32),
                           g_idx=(torch.arange(in_f) // gs).to(torch.int32), bits=bits, group_size=group_size)
