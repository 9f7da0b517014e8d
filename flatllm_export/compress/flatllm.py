"""FLAT-LLM (arXiv 2505.23966): head-wise PCA of V/O, ridge-leverage (Nystrom) MLP channel selection with a
closed-form down_proj correction, optional head-wise low-rank Q/K; ranks per layer from IPRS.

The math is in pure tensor functions (float64); ``FlatLLMLayerMethod`` is the thin glue that plugs them into
the shared calibration engine.
"""

from __future__ import annotations

import math
import time

import torch

from .. import accounting
from ..calibration import capture, run_sequential
from .allocation import ALLOCATORS, solve_mean_kept
from .importance import BlockInfluence
from .surgery import reshape_layer


class CompressionError(RuntimeError):
    """Compression cannot proceed; the message names the layer and module."""


# ----------------------------------------------------------------------------------------------- pure math
def accumulate_head_covariance(cov: torch.Tensor, y: torch.Tensor) -> None:
    """cov (heads, d, d) += sum over tokens of y_h y_h^T for y (tokens, heads*d)."""
    heads, d = cov.shape[0], cov.shape[1]
    yh = y.to(cov.dtype).view(-1, heads, d).transpose(0, 1)  # (heads, N, d)
    cov += yh.transpose(1, 2) @ yh


def top_eigenvectors(cov: torch.Tensor, rank: int) -> torch.Tensor:
    """Eigenvectors of symmetric cov (..., d, d) for the ``rank`` largest eigenvalues: (..., d, rank)."""
    _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    return vecs[..., :, -rank:].flip(-1)


def fold_value_basis(w_v: torch.Tensor, b_v: torch.Tensor | None, w_o: torch.Tensor, basis: torch.Tensor,
                     num_heads: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Fold per-KV-head bases Q_h (kv, dv, r) into v_proj rows (Q_h^T W_v,h) and o_proj columns (W_o,j Q_h for
    every query head j reading KV head h). Returns new (w_v (kv*r, hidden), b_v, w_o (hidden, heads*r))."""
    kv, dv, r = basis.shape
    hidden = w_v.shape[1]
    q = basis.to(torch.float64)
    new_v = (q.transpose(1, 2) @ w_v.to(torch.float64).view(kv, dv, hidden)).reshape(kv * r, hidden)
    new_b = None if b_v is None else (q.transpose(1, 2) @ b_v.to(torch.float64).view(kv, dv, 1)).reshape(kv * r)
    group = q.repeat_interleave(num_heads // kv, dim=0)  # (heads, dv, r): query head j uses KV head j // groups
    w_o_heads = w_o.to(torch.float64).view(w_o.shape[0], num_heads, dv).transpose(0, 1)  # (heads, hidden, dv)
    new_o = (w_o_heads @ group).transpose(0, 1).reshape(w_o.shape[0], num_heads * r)
    return new_v, new_b, new_o


def ridge_leverage_scores(cov: torch.Tensor, ridge: float = 1.0) -> torch.Tensor:
    """diag(C (C + ridge*I)^-1) for a PSD covariance C (n, n)."""
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    return torch.linalg.solve(cov + ridge * eye, cov).diagonal()  # C symmetric: (C+rI)^-1 C has the same diag


def damped_cholesky(a: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor of PSD a with the least diagonal damping (relative to mean diag) that makes it
    factorable. Returns the factor and the relative damping used (0.0 when none was needed)."""
    mean_diag = a.diagonal().mean().clamp_min(1e-300)
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    for damp in (0.0, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2):
        chol, info = torch.linalg.cholesky_ex(a + damp * mean_diag * eye)
        if int(info) == 0:
            return chol, damp
    raise CompressionError("covariance is not positive definite even with 1% damping")


def solve_psd(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, float]:
    """a^-1 b for PSD a (damped as little as needed); returns the solution and the relative damping used."""
    chol, damp = damped_cholesky(a)
    return torch.cholesky_solve(b, chol), damp


def nystrom_mlp(cov: torch.Tensor, w_down: torch.Tensor, keep: int, ridge: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Select ``keep`` intermediate channels by ridge leverage and solve down_proj in closed form:
    W_down' = W_down C[:, idx] C[idx, idx]^-1 (least squares from the kept channels). Returns (idx sorted,
    W_down' (hidden, keep), damping used)."""
    scores = ridge_leverage_scores(cov, ridge)
    idx = torch.topk(scores, keep).indices.sort().values
    x, damp = solve_psd(cov[idx][:, idx], cov[idx, :])  # (keep, n) = C_kk^-1 C_k:
    return idx, w_down.to(torch.float64) @ x.T, damp


def headwise_lowrank(w: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor W (heads*d, hidden) per head as P_h (P_h^T W_h) with P (heads, d, r): returns (down (heads*r,
    hidden), up (heads, d, r))."""
    heads, d, r = basis.shape
    p = basis.to(torch.float64)
    down = (p.transpose(1, 2) @ w.to(torch.float64).view(heads, d, -1)).reshape(heads * r, -1)
    return down, p


# ----------------------------------------------------------------------------------------------- planning
def _round_dim(x: float, full: int, multiple: int) -> int:
    step = min(multiple, full)
    return int(min(full, max(step, step * round(x / step))))


def plan_shapes(config, kept: list[float], qk: bool, round_to: int = 1, linear_multiple: int = 1) -> list[dict]:
    """Per-layer target shapes for kept ratios ``kept`` (one per layer) from the config's current shapes.
    ``round_to``: value head dims and MLP sizes are multiples of it. ``linear_multiple``: every linear's in/out
    features that compression changes (kv*dv, heads*dv, MLP size, heads*qk_rank) are multiples of it (GPTQ
    packing wants 32)."""
    shapes = []
    for s, w in zip(config.layer_shapes, kept):
        t = dict(s)
        per_head = linear_multiple // math.gcd(linear_multiple, s["num_kv_heads"])
        t["v_head_dim"] = _round_dim(w * s["v_head_dim"], s["v_head_dim"], math.lcm(round_to, per_head))
        t["intermediate_size"] = _round_dim(w * s["intermediate_size"], s["intermediate_size"],
                                            math.lcm(round_to, linear_multiple))
        if qk and s["qk_rank"] is None:
            d, hidden = config.head_dim, config.hidden_size
            r = _round_dim(w * d, d, per_head)
            t["qk_rank"] = r if r * (hidden + d) < hidden * d else None  # factorise only where it saves
        shapes.append(t)
    return shapes


# ----------------------------------------------------------------------------------------------- glue
def _check_finite(t: torch.Tensor, index: int, module: str) -> None:
    if not torch.isfinite(t).all():
        raise CompressionError(f"layer {index} {module}: calibration statistics contain NaN/Inf (the model "
                               "overflows on the calibration data: use model.dtype float32 or bfloat16)")


class FlatLLMLayerMethod:
    """Engine method: collect V (and Q/K) output and down_proj input covariances, then shrink the layer."""

    def __init__(self, config, plan: list[dict], ridge: float = 1.0, full_rank_too: bool = False):
        # full_rank_too: run PCA / Nystrom even where the plan keeps full size (exactness checks use it)
        self.config, self.plan, self.ridge, self.full_rank_too = config, plan, ridge, full_rank_too
        self.damping: dict[str, float] = {}

    def process_layer(self, index, layer, run) -> bool:
        cur, target = self.config.layer_shapes[index], self.plan[index]
        attn, mlp = layer.self_attn, layer.mlp
        dev = attn.v_proj.weight.device
        do_v = target["v_head_dim"] < cur["v_head_dim"] or self.full_rank_too
        do_mlp = target["intermediate_size"] < cur["intermediate_size"] or self.full_rank_too
        do_qk = target["qk_rank"] is not None and cur["qk_rank"] is None
        if not (do_v or do_mlp or do_qk):
            return False
        f64 = dict(dtype=torch.float64, device=dev)
        outs, ins = {}, {}
        if do_v:
            outs["self_attn.v_proj"] = (attn.v_proj, torch.zeros(attn.num_kv_heads, attn.v_head_dim, attn.v_head_dim, **f64))
        if do_qk:
            d = attn.head_dim
            outs["self_attn.q_proj"] = (attn.q_proj, torch.zeros(attn.num_heads, d, d, **f64))
            outs["self_attn.k_proj"] = (attn.k_proj, torch.zeros(attn.num_kv_heads, d, d, **f64))
        if do_mlp:
            n = mlp.down_proj.in_features
            ins["mlp.down_proj"] = (mlp.down_proj, torch.zeros(n, n, **f64))

        def on_out(name, y):
            accumulate_head_covariance(outs[name][1], y)

        def on_in(name, x):
            x = x.to(torch.float64)
            ins[name][1].addmm_(x.T, x)

        with capture({k: m for k, (m, _) in outs.items()}, on_out, "output"), \
                capture({k: m for k, (m, _) in ins.items()}, on_in, "input"):
            run.forward()
        for name, (_, cov) in {**outs, **ins}.items():
            _check_finite(cov, index, name)

        new: dict[str, torch.Tensor] = {}
        if do_v:
            basis = top_eigenvectors(outs["self_attn.v_proj"][1], target["v_head_dim"])
            b_v = attn.v_proj.bias
            w_v, b_v, w_o = fold_value_basis(attn.v_proj.weight, b_v, attn.o_proj.weight, basis, attn.num_heads)
            new.update({"self_attn.v_proj.weight": w_v, "self_attn.o_proj.weight": w_o})
            if b_v is not None:
                new["self_attn.v_proj.bias"] = b_v
        if do_qk:
            for name in ("q_proj", "k_proj"):
                proj = getattr(attn, name)
                basis = top_eigenvectors(outs[f"self_attn.{name}"][1], target["qk_rank"])
                down, up = headwise_lowrank(proj.weight, basis)
                new.update({f"self_attn.{name}.down.weight": down, f"self_attn.{name}.up": up})
                if proj.bias is not None:
                    new[f"self_attn.{name}.bias"] = proj.bias
        if do_mlp:
            idx, w_down, damp = nystrom_mlp(ins["mlp.down_proj"][1], mlp.down_proj.weight,
                                            target["intermediate_size"], self.ridge)
            if damp:
                self.damping[f"layer {index} mlp.down_proj"] = damp
            new.update({"mlp.gate_proj.weight": mlp.gate_proj.weight[idx], "mlp.up_proj.weight": mlp.up_proj.weight[idx],
                        "mlp.down_proj.weight": w_down})
        reshape_layer(layer, self.config, index, new, v_head_dim=target["v_head_dim"],
                      intermediate_size=target["intermediate_size"], qk_rank=target["qk_rank"])
        return True


def compress_flatllm(model, windows: torch.Tensor, ratio: float, allocation: str = "iprs", qk: bool = False,
                     round_to: int = 1, ridge: float = 1.0, device: str = "cpu", batch_size: int = 8,
                     linear_multiple: int = 1) -> dict:
    """Compress ``model`` in place so that ``ratio`` of the decoder's linear-weight parameters are removed.
    Returns the report section (requested / achieved ratio, parameters, per-layer importance, kept and ranks)."""
    config = model.config
    before = accounting.decoder_linear_params(config)
    t0 = time.time()
    importance = None
    if allocation == "iprs":
        influence = BlockInfluence()
        run_sequential(model, windows, influence, device, batch_size, desc="block influence")
        importance = influence.scores
    allocator = ALLOCATORS[allocation]
    scores = importance if importance is not None else [1.0] * config.num_hidden_layers
    target = round(before * (1.0 - ratio))

    def params_after(kept):
        return accounting.decoder_linear_params(config, plan_shapes(config, kept, qk, round_to, linear_multiple))

    mean_kept, kept = solve_mean_kept(lambda r: allocator(scores, r), params_after, target)
    plan = plan_shapes(config, kept, qk, round_to, linear_multiple)
    t1 = time.time()
    method = FlatLLMLayerMethod(config, plan, ridge)
    run_sequential(model, windows, method, device, batch_size, desc="flat-llm")
    after = accounting.decoder_linear_params(config)
    achieved = 1.0 - after / before
    return {
        "method": "flatllm", "allocation": allocation, "qk": qk, "round_to": round_to, "linear_multiple": linear_multiple,
        "requested_ratio": ratio, "achieved_ratio": round(achieved, 6),
        "decoder_linear_params_before": before, "decoder_linear_params_after": after,
        "mean_kept_ratio": round(mean_kept, 6),
        "importance_seconds": round(t1 - t0, 2), "compress_seconds": round(time.time() - t1, 2),
        "damping": method.damping,
        "layers": [
            {"layer": i, "importance": None if importance is None else round(importance[i], 6),
             "kept_ratio": round(kept[i], 6), **{k: s[k] for k in ("v_head_dim", "intermediate_size", "qk_rank")}}
            for i, s in enumerate(config.layer_shapes)
        ],
    }

