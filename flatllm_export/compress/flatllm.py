"""FLAT-LLM (arXiv 2505.23966): head-wise PCA of V/O, ridge-leverage (Nystrom) MLP channel selection with a
closed-form down_proj correction, optional head-wise low-rank Q/K; ranks per layer from IPRS.

The math is in pure tensor functions (float64); ``FlatLLMLayerMethod`` is the thin glue that plugs them into
the shared calibration engine.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace

import torch

from .. import accounting
from ..calibration import capture, run_sequential
from ..errors import UserError
from .allocation import ALLOCATORS, solve_mean_kept
from .importance import BlockInfluence
from .surgery import reshape_layer


class CompressionError(UserError, RuntimeError):
    """Compression cannot proceed; the message names the layer and module."""


# ----------------------------------------------------------------------------------------------- pure math
def accumulate_head_covariance(cov: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """cov (heads, d, d) += sum over tokens of y_h y_h^T for y (tokens, heads*d); products in ``dtype`` (default
    cov's), summed into cov."""
    heads, d = cov.shape[0], cov.shape[1]
    yh = y.to(dtype or cov.dtype).view(-1, heads, d).transpose(0, 1)  # (heads, N, d)
    cov += yh.transpose(1, 2) @ yh


def top_eigenvectors(cov: torch.Tensor, rank: int) -> torch.Tensor:
    """Eigenvectors of symmetric cov (..., d, d) for the ``rank`` largest eigenvalues: (..., d, rank)."""
    _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    return vecs[..., :, -rank:].flip(-1)


def fold_value_basis(w_v: torch.Tensor, b_v: torch.Tensor | None, w_o: torch.Tensor, basis: torch.Tensor,
                     num_heads: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Fold per-KV-head orthonormal bases Q_h (kv, dv, r) into v_proj rows (Q_h^T W_v,h) and o_proj columns
    (W_o,j Q_h for every query head j reading KV head h). Returns new (w_v (kv*r, hidden), b_v, w_o (hidden,
    heads*r))."""
    maps = basis.transpose(1, 2)
    return (*fold_value_down(w_v, b_v, maps), fold_output_columns(w_o, maps, num_heads))


def fold_output_columns(w_o: torch.Tensor, maps: torch.Tensor, num_heads: int) -> torch.Tensor:
    """o_proj columns of query head j become W_o,j B_h^T (B_h (r, dv) the map of the KV head j reads; the
    paper's W_o,j Q_h for an orthonormal B_h = Q_h^T): w_o (hidden, heads*dv) -> (hidden, heads*r)."""
    kv, r, dv = maps.shape
    group = maps.to(torch.float64).transpose(1, 2).repeat_interleave(num_heads // kv, dim=0)  # (heads, dv, r)
    w_o_heads = w_o.to(torch.float64).view(w_o.shape[0], num_heads, dv).transpose(0, 1)  # (heads, hidden, dv)
    return (w_o_heads @ group).transpose(0, 1).reshape(w_o.shape[0], num_heads * r)


def ridge_leverage_scores(cov: torch.Tensor, ridge: float = 1.0, block: int = 512) -> torch.Tensor:
    """diag(C (C + ridge*I)^-1) for a PSD covariance C (n, n): with C + ridge*I = L L^T, score i =
    (L^-1 e_i) . (L^-1 C e_i), ``block`` columns at a time. Work memory: L and two (n, block) blocks (the ridge
    is added to C's diagonal in place and the diagonal put back exactly)."""
    diag = cov.diagonal().clone()
    cov.diagonal().add_(ridge)
    try:
        chol = torch.linalg.cholesky(cov)
    finally:
        cov.diagonal().copy_(diag)
    n = cov.shape[0]
    scores = torch.empty(n, dtype=cov.dtype, device=cov.device)
    for j in range(0, n, block):
        cols = slice(j, min(n, j + block))
        e = torch.zeros(n, cols.stop - j, dtype=cov.dtype, device=cov.device)
        e[cols].diagonal().fill_(1.0)
        a = torch.linalg.solve_triangular(chol, e, upper=False)
        b = torch.linalg.solve_triangular(chol, cov[:, cols], upper=False)
        scores[cols] = (a * b).sum(0)
    return scores


def damped_cholesky(a: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor of PSD a with the least diagonal damping (relative to mean diag) that makes it
    factorable. Returns the factor and the relative damping used (0.0 when none was needed)."""
    mean_diag = a.diagonal().mean().clamp_min(1e-300)
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return chol, 0.0
    del chol
    damped = a.clone()
    added = 0.0
    for damp in (1e-10, 1e-8, 1e-6, 1e-4, 1e-2):
        damped.diagonal().add_((damp - added) * mean_diag)
        added = damp
        chol, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            return chol, damp
    raise CompressionError("covariance is not positive definite even with 1% damping")


def solve_psd(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, float]:
    """a^-1 b for PSD a (damped as little as needed); returns the solution and the relative damping used."""
    chol, damp = damped_cholesky(a)
    return torch.cholesky_solve(b, chol), damp


def greedy_output_channels(cov: torch.Tensor, w: torch.Tensor, keep: int, block: int = 16, dead: float = 1e-6
                           ) -> torch.Tensor:
    """Channels of an input x (covariance C = sum x x^T) that best predict the output W x when the weights on
    them are re-solved by least squares: greedy forward selection on the Schur complement S = C - C_:k C_kk^+
    C_k: (what the kept channels cannot explain). Adding channel j lowers the output error tr(W S W^T) by
    ||W S_:j||^2 / S_jj; ``block`` channels are added per step (block=1 is exact greedy). A channel whose
    unexplained variance S_jj fell below ``dead`` x C_jj adds nothing (the kept channels span it, e.g. once
    more channels are kept than C has rank, with fewer calibration tokens than channels): such channels are
    taken last, by their gain before any was kept. Returns idx sorted."""
    s = cov.to(torch.float64).clone()
    p = w.to(torch.float64) @ s  # (out, n) = W S
    n = s.shape[0]
    floor = s.diagonal().clamp_min(0) * dead + s.diagonal().abs().max().clamp_min(1e-300) * 1e-15
    d0 = s.diagonal().clamp_min(floor)
    first = (p * p).sum(0) / d0
    first = first / (first.max() * 2 + 1e-300)  # in [0, 1/2]: dead channels score -1 + this, below any live one
    free = torch.ones(n, dtype=torch.bool, device=s.device)
    chosen: list[torch.Tensor] = []
    left = keep
    while left > 0:
        d = s.diagonal()
        live = d > floor
        gain = torch.where(live, (p * p).sum(0) / d.clamp_min(1e-300), first - 1.0)
        gain[~free] = -2.0
        take = torch.topk(gain, min(block, left)).indices
        chosen.append(take)
        free[take] = False
        left -= take.numel()
        t = take[live[take]]
        if t.numel() and left > 0:
            # S_:J S_JJ^+ S_J: (pseudo-inverse: a block can be rank deficient though each channel is live)
            vals, vecs = torch.linalg.eigh(s[t][:, t])
            ok = vals > vals.max() * 1e-10
            half = vecs[:, ok] / vals[ok].sqrt()  # S_JJ^+ = half half^T
            sh = s[:, t] @ half  # (n, k)
            p.addmm_(p[:, t] @ half, sh.T, alpha=-1)  # in place: no second (n, n) matrix
            s.addmm_(sh, sh.T, alpha=-1)
    return torch.cat(chosen).sort().values


def mlp_channels(cov: torch.Tensor, w_down: torch.Tensor, keep: int, select: str = "leverage", ridge: float = 1.0,
                 ridge_scale: str = "absolute") -> torch.Tensor:
    """Kept intermediate channels: ``leverage`` = top ridge-leverage scores (the paper; ridge absolute, or
    ``ridge_scale='trace'``: ridge * trace(C)/n, independent of the number of calibration tokens), ``greedy`` =
    ``greedy_output_channels`` (the down_proj output error itself)."""
    if select == "greedy":
        return greedy_output_channels(cov, w_down, keep)
    lam = ridge * (cov.diagonal().mean().item() if ridge_scale == "trace" else 1.0)
    return torch.topk(ridge_leverage_scores(cov, lam), keep).indices.sort().values


def nystrom_mlp(cov: torch.Tensor, w_down: torch.Tensor, keep: int, ridge: float = 1.0, select: str = "leverage",
                ridge_scale: str = "absolute") -> tuple[torch.Tensor, torch.Tensor, float]:
    """Select ``keep`` intermediate channels (``mlp_channels``) and solve down_proj in closed form:
    W_down' = W_down C[:, idx] C[idx, idx]^-1 (least squares from the kept channels). Returns (idx sorted,
    W_down' (hidden, keep), damping used)."""
    idx = mlp_channels(cov, w_down, keep, select, ridge, ridge_scale)
    # W C_:k C_kk^-1 = (C_kk^-1 (W C)_:k^T)^T: work matrices of (keep, keep) and (hidden, n), never (keep, n)
    x, damp = solve_psd(cov[idx[:, None], idx], (w_down.to(torch.float64) @ cov)[:, idx].T)
    return idx, x.T, damp


def pooled_group_covariance(cov_o: torch.Tensor, num_heads: int, kv: int) -> torch.Tensor:
    """Per KV head, the sum over the query heads reading it of their o_proj-input covariance blocks:
    cov_o (heads*dv, heads*dv) -> (kv, dv, dv)."""
    dv = cov_o.shape[0] // num_heads
    blocks = cov_o.view(num_heads, dv, num_heads, dv).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (heads, dv, dv)
    return blocks.reshape(kv, num_heads // kv, dv, dv).sum(1)


def weighted_value_basis(cov: torch.Tensor, gram: torch.Tensor, rank: int) -> torch.Tensor:
    """Per KV head, the rank-r map B (r, dv) on the values that keeps most of o_proj's output energy:
    maximise tr(G C B^T (B C B^T)^-1 B C) for value covariance C and G = sum_j W_o,j^T W_o,j (the o_proj blocks
    reading the head). With C = L L^T: B = Y^T L^-1, Y = top-r eigenvectors of L^T G L. Rows unit-normed (any
    row scale is undone by the o_proj solve). cov, gram (kv, dv, dv) -> B (kv, r, dv)."""
    out = []
    for c, g in zip(cov.to(torch.float64), gram.to(torch.float64)):
        chol, _ = damped_cholesky(c)
        y = top_eigenvectors(chol.T @ g @ chol, rank)  # (dv, r)
        b = torch.linalg.solve_triangular(chol.T, y, upper=True).T  # B = (L^-T Y)^T = Y^T L^-1
        out.append(b / b.norm(dim=1, keepdim=True).clamp_min(1e-300))
    return torch.stack(out)


def fold_value_down(w_v: torch.Tensor, b_v: torch.Tensor | None, maps: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """v_proj rows of KV head h become B_h W_v,h: maps (kv, r, dv) -> (w_v (kv*r, hidden), b_v (kv*r))."""
    kv, r, dv = maps.shape
    m = maps.to(torch.float64)
    new_v = (m @ w_v.to(torch.float64).view(kv, dv, -1)).reshape(kv * r, -1)
    new_b = None if b_v is None else (m @ b_v.to(torch.float64).view(kv, dv, 1)).reshape(kv * r)
    return new_v, new_b


def solve_output_projection(cov_o: torch.Tensor, w_o: torch.Tensor, maps: torch.Tensor, num_heads: int
                            ) -> tuple[torch.Tensor, float]:
    """Least-squares o_proj for compressed values: with z the o_proj input (all heads, covariance cov_o) and
    D = blockdiag(B_h(j)) the map each query head's values went through, minimise sum ||W_o z - A D z||^2:
    A = W_o C D^T (D C D^T)^-1 (hidden, heads*r). Returns (A, damping used)."""
    kv, r, dv = maps.shape
    d = torch.block_diag(*maps.to(torch.float64).repeat_interleave(num_heads // kv, dim=0))  # (heads*r, heads*dv)
    c = cov_o.to(torch.float64)
    cd = c @ d.T
    x, damp = solve_psd(d @ cd, cd.T @ w_o.to(torch.float64).T)  # (heads*r, hidden)
    return x.T, damp


def headwise_lowrank(w: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor W (heads*d, hidden) per head as P_h (P_h^T W_h) with P (heads, d, r): returns (down (heads*r,
    hidden), up (heads, d, r))."""
    heads, d, r = basis.shape
    p = basis.to(torch.float64)
    down = (p.transpose(1, 2) @ w.to(torch.float64).view(heads, d, -1)).reshape(heads * r, -1)
    return down, p


# ----------------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class FlatLLMOptions:
    """The choices FLAT-LLM leaves open. A bare ``FlatLLMOptions()`` is the library's default, the variant
    'ablation' (``DEFAULT_VARIANT``: the changes that paid most alone in scripts/bench_ablation.py, measured best on
    SmolLM2-135M at 30% and 50%); the official code's behaviour is ``VARIANTS['paper']``, spelled out in full below.
    Each comment gives the paper's value."""

    vo_basis: str = "attention"   # values: PCA of v_proj outputs (the paper) | attention: PCA of o_proj's input per
    #                               head (attention-weighted values, pooled over the KV group) | weighted: whitened by
    #                               that covariance and weighted by o_proj (keeps o_proj's output energy)
    o_proj: str = "fold"          # fold: W_o,j Q_h (the paper) | lstsq: least-squares o_proj given the new values
    mlp_select: str = "greedy"    # leverage: ridge-leverage scores (the paper) | greedy: down_proj output error
    ridge: float = 1.0            # ridge of the leverage scores (the paper: 1)
    ridge_scale: str = "absolute"  # absolute (the paper) | trace: ridge * trace(C) / n
    vo_scale: float = 1.0         # V/O kept ratio = min(1, vo_scale * layer kept ratio); the MLP gives way (paper: 1)
    iprs_smoothing: float = 0.0   # IPRS on importance + smoothing * mean(importance) (0: the paper)
    importance_windows: int = 8   # calibration windows for block influence (0: all, the paper)
    stats_dtype: str = "float32"  # products per batch in float32 or float64 (always summed in float64; the paper:
    #                               float64)

    def __post_init__(self):
        allowed = {"vo_basis": ("values", "attention", "weighted"), "o_proj": ("fold", "lstsq"),
                   "mlp_select": ("leverage", "greedy"), "ridge_scale": ("absolute", "trace"),
                   "stats_dtype": ("float32", "float64")}
        for key, values in allowed.items():
            if getattr(self, key) not in values:
                raise ValueError(f"compression.{key}: '{getattr(self, key)}' is not one of {list(values)}")
        if self.vo_basis == "weighted" and self.o_proj != "lstsq":
            raise ValueError("compression.vo_basis 'weighted' needs compression.o_proj: lstsq (its basis is not "
                             "orthonormal, so o_proj cannot be folded)")
        if self.ridge <= 0 or self.vo_scale <= 0 or self.iprs_smoothing < 0 or self.importance_windows < 0:
            raise ValueError("compression: ridge and vo_scale must be > 0, iprs_smoothing and importance_windows "
                             ">= 0")


OPTION_KEYS = tuple(FlatLLMOptions.__dataclass_fields__)
# the default: each change measured alone on SmolLM2-135M at 30% (validation plays, README: FLAT-LLM ablations);
# the two that paid most, plus the speed-only statistics settings
DEFAULT_VARIANT = "ablation"  # the library's and the recipe's default (compression.variant)
VARIANTS = {"paper": FlatLLMOptions(vo_basis="values", o_proj="fold", mlp_select="leverage", ridge=1.0,
                                    ridge_scale="absolute", vo_scale=1.0, iprs_smoothing=0.0, importance_windows=0,
                                    stats_dtype="float64"),
            DEFAULT_VARIANT: FlatLLMOptions()}


def resolve_options(variant: str = DEFAULT_VARIANT, **overrides) -> FlatLLMOptions:
    """The options of ``variant`` with every override that is not None applied."""
    if variant not in VARIANTS:
        raise ValueError(f"compression.variant: '{variant}' is not one of {list(VARIANTS)}")
    return replace(VARIANTS[variant], **{k: v for k, v in overrides.items() if v is not None})


# ----------------------------------------------------------------------------------------------- planning
def _round_dim(x: float, full: int, multiple: int) -> int:
    step = min(multiple, full)
    return int(min(full, max(step, step * round(x / step))))


def plan_shapes(config, kept: list[float], qk: bool, round_to: int = 1, linear_multiple: int = 1,
                vo_scale: float = 1.0) -> list[dict]:
    """Per-layer target shapes for kept ratios ``kept`` (one per layer) from the config's current shapes; V/O
    keeps min(1, vo_scale * kept).
    ``round_to``: value head dims and MLP sizes are multiples of it. ``linear_multiple``: every linear's in/out
    features that compression changes (kv*dv, heads*dv, MLP size, heads*qk_rank) are multiples of it (GPTQ
    packing wants 32)."""
    shapes = []
    for s, w in zip(config.layer_shapes, kept):
        t = dict(s)
        per_head = linear_multiple // math.gcd(linear_multiple, s["num_kv_heads"])
        t["v_head_dim"] = _round_dim(min(1.0, w * vo_scale) * s["v_head_dim"], s["v_head_dim"], math.lcm(round_to, per_head))
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
    """Engine method: collect the layer's covariances (V or o_proj input, Q/K outputs, down_proj input), then
    shrink the layer as ``options`` say."""

    def __init__(self, config, plan: list[dict], options: FlatLLMOptions | None = None, full_rank_too: bool = False):
        # full_rank_too: run PCA / Nystrom even where the plan keeps full size (exactness checks use it)
        self.config, self.plan, self.full_rank_too = config, plan, full_rank_too
        self.opt = options or FlatLLMOptions()
        self.damping: dict[str, float] = {}

    def _damp(self, index: int, module: str, damp: float) -> None:
        if damp:
            self.damping[f"layer {index} {module}"] = damp

    def process_layer(self, index, layer, run) -> bool:
        cur, target, opt = self.config.layer_shapes[index], self.plan[index], self.opt
        attn, mlp = layer.self_attn, layer.mlp
        dev = attn.v_proj.weight.device
        do_v = target["v_head_dim"] < cur["v_head_dim"] or self.full_rank_too
        do_mlp = target["intermediate_size"] < cur["intermediate_size"] or self.full_rank_too
        do_qk = target["qk_rank"] is not None and cur["qk_rank"] is None
        if not (do_v or do_mlp or do_qk):
            return False
        f64 = dict(dtype=torch.float64, device=dev)
        heads, kv, dv = attn.num_heads, attn.num_kv_heads, attn.v_head_dim
        outs, ins = {}, {}
        if do_v and opt.vo_basis == "values":
            outs["self_attn.v_proj"] = (attn.v_proj, torch.zeros(kv, dv, dv, **f64))
        if do_v and (opt.vo_basis != "values" or opt.o_proj == "lstsq"):
            ins["self_attn.o_proj"] = (attn.o_proj, torch.zeros(heads * dv, heads * dv, **f64))
        if do_qk:
            d = attn.head_dim
            outs["self_attn.q_proj"] = (attn.q_proj, torch.zeros(heads, d, d, **f64))
            outs["self_attn.k_proj"] = (attn.k_proj, torch.zeros(kv, d, d, **f64))
        if do_mlp:
            n = mlp.down_proj.in_features
            ins["mlp.down_proj"] = (mlp.down_proj, torch.zeros(n, n, **f64))
        dt = torch.float32 if opt.stats_dtype == "float32" else torch.float64

        def on_out(name, y):
            accumulate_head_covariance(outs[name][1], y, dt)

        def on_in(name, x):
            x = x.to(dt)
            ins[name][1].add_(x.T @ x)

        with capture({k: m for k, (m, _) in outs.items()}, on_out, "output"), \
                capture({k: m for k, (m, _) in ins.items()}, on_in, "input"):
            run.forward()
        for name, (_, cov) in {**outs, **ins}.items():
            _check_finite(cov, index, name)

        new: dict[str, torch.Tensor] = {}
        if do_v:
            new.update(self._value_output(index, attn, target["v_head_dim"], outs, ins))
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
                                            target["intermediate_size"], opt.ridge, opt.mlp_select, opt.ridge_scale)
            self._damp(index, "mlp.down_proj", damp)
            new.update({"mlp.gate_proj.weight": mlp.gate_proj.weight[idx], "mlp.up_proj.weight": mlp.up_proj.weight[idx],
                        "mlp.down_proj.weight": w_down})
        reshape_layer(layer, self.config, index, new, v_head_dim=target["v_head_dim"],
                      intermediate_size=target["intermediate_size"], qk_rank=target["qk_rank"])
        return True

    def _value_output(self, index, attn, rank: int, outs: dict, ins: dict) -> dict[str, torch.Tensor]:
        """New v_proj / o_proj weights for value head dim ``rank``."""
        opt, heads, kv = self.opt, attn.num_heads, attn.num_kv_heads
        w_o = attn.o_proj.weight
        if opt.vo_basis == "values":
            maps = top_eigenvectors(outs["self_attn.v_proj"][1], rank).transpose(1, 2)  # (kv, r, dv)
        else:
            cov_o = ins["self_attn.o_proj"][1]
            pooled = pooled_group_covariance(cov_o, heads, kv)
            if opt.vo_basis == "attention":
                maps = top_eigenvectors(pooled, rank).transpose(1, 2)
            else:
                dv = attn.v_head_dim
                w_heads = w_o.to(torch.float64).view(-1, heads, dv).transpose(0, 1)  # (heads, hidden, dv)
                gram = (w_heads.transpose(1, 2) @ w_heads).view(kv, heads // kv, dv, dv).sum(1)
                maps = weighted_value_basis(pooled, gram, rank)
        w_v, b_v = fold_value_down(attn.v_proj.weight, attn.v_proj.bias, maps)
        if opt.o_proj == "lstsq":
            new_o, damp = solve_output_projection(ins["self_attn.o_proj"][1], w_o, maps, heads)
            self._damp(index, "self_attn.o_proj", damp)
        else:
            new_o = fold_output_columns(w_o, maps, heads)
        new = {"self_attn.v_proj.weight": w_v, "self_attn.o_proj.weight": new_o}
        if b_v is not None:
            new["self_attn.v_proj.bias"] = b_v
        return new


def compress_flatllm(model, windows: torch.Tensor, ratio: float, allocation: str = "iprs", qk: bool = False,
                     round_to: int = 1, device: str = "cpu", batch_size: int = 8, linear_multiple: int = 1,
                     options: FlatLLMOptions | None = None, importance: list[float] | None = None) -> dict:
    """Compress ``model`` in place so that ``ratio`` of the decoder's linear-weight parameters are removed, with
    ``options`` (default: ``FlatLLMOptions()``, the library's default). ``importance``: block influence already measured on the same
    model and windows (skips that pass). Returns the report section (requested / achieved ratio, parameters,
    per-layer importance, kept and ranks)."""
    opt = options or FlatLLMOptions()
    config = model.config
    before = accounting.decoder_linear_params(config)
    t0 = time.time()
    if allocation == "iprs" and importance is None:
        importance = block_influence(model, windows, opt.importance_windows, device, batch_size)
    allocator = ALLOCATORS[allocation]
    scores = importance if allocation == "iprs" else [1.0] * config.num_hidden_layers
    scores = smooth_importance(scores, opt.iprs_smoothing)
    target = round(before * (1.0 - ratio))

    def params_after(kept):
        return accounting.decoder_linear_params(config, plan_shapes(config, kept, qk, round_to, linear_multiple,
                                                                    opt.vo_scale))

    mean_kept, kept = solve_mean_kept(lambda r: allocator(scores, r), params_after, target)
    plan = plan_shapes(config, kept, qk, round_to, linear_multiple, opt.vo_scale)
    t1 = time.time()
    method = FlatLLMLayerMethod(config, plan, opt)
    run_sequential(model, windows, method, device, batch_size, desc="flat-llm")
    after = accounting.decoder_linear_params(config)
    achieved = 1.0 - after / before
    return {
        "method": "flatllm", "allocation": allocation, "qk": qk, "round_to": round_to, "linear_multiple": linear_multiple,
        "options": asdict(opt),
        "requested_ratio": ratio, "achieved_ratio": round(achieved, 6),
        "decoder_linear_params_before": before, "decoder_linear_params_after": after,
        "mean_kept_ratio": round(mean_kept, 6),
        "importance_seconds": round(t1 - t0, 2), "compress_seconds": round(time.time() - t1, 2),
        "damping": method.damping,
        "layers": [
            {"layer": i, "importance": None if allocation != "iprs" else round(importance[i], 6),
             "kept_ratio": round(kept[i], 6), **{k: s[k] for k in ("v_head_dim", "intermediate_size", "qk_rank")}}
            for i, s in enumerate(config.layer_shapes)
        ],
    }


def block_influence(model, windows: torch.Tensor, n_windows: int = 0, device: str = "cpu", batch_size: int = 8
                    ) -> list[float]:
    """Block influence of every layer on the first ``n_windows`` calibration windows (0: all)."""
    influence = BlockInfluence()
    run_sequential(model, windows[:n_windows] if n_windows else windows, influence, device, batch_size,
                   desc="block influence")
    return influence.scores


def smooth_importance(scores: list[float], smoothing: float) -> list[float]:
    """importance + smoothing * mean(importance): 0 leaves IPRS as in the paper, large values tend to uniform."""
    mean = sum(scores) / len(scores)
    return [s + smoothing * mean for s in scores]
