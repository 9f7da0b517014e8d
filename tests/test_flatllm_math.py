import numpy as np
import pytest
import torch

from flatllm_export.compress.allocation import iprs, solve_mean_kept, uniform
from flatllm_export.compress.flatllm import (DEFAULT_VARIANT, VARIANTS, FlatLLMOptions, accumulate_head_covariance,
                                             fold_output_columns, fold_value_basis, greedy_output_channels,
                                             headwise_lowrank, mlp_channels,
                                             nystrom_mlp, pooled_group_covariance, resolve_options,
                                             ridge_leverage_scores, smooth_importance, solve_output_projection,
                                             top_eigenvectors, weighted_value_basis)


def test_fold_value_basis_full_rank_is_exact_with_gqa():
    torch.manual_seed(0)
    hidden, heads, kv, dv = 24, 8, 2, 6
    w_v, w_o = torch.randn(kv * dv, hidden, dtype=torch.float64), torch.randn(hidden, heads * dv, dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(kv, dv, dv, dtype=torch.float64)).Q
    new_v, _, new_o = fold_value_basis(w_v, None, w_o, basis, heads)
    x = torch.randn(5, hidden, dtype=torch.float64)
    v = (x @ w_v.T).view(5, kv, dv).repeat_interleave(heads // kv, 1).reshape(5, -1)
    v2 = (x @ new_v.T).view(5, kv, dv).repeat_interleave(heads // kv, 1).reshape(5, -1)
    torch.testing.assert_close(v2 @ new_o.T, v @ w_o.T)


def test_pca_keeps_the_subspace_of_low_rank_values():
    torch.manual_seed(0)
    y = torch.randn(500, 2, dtype=torch.float64) @ torch.randn(2, 8, dtype=torch.float64)  # rank-2 per "head"
    cov = torch.zeros(1, 8, 8, dtype=torch.float64)
    accumulate_head_covariance(cov, y)
    q = top_eigenvectors(cov, 2)[0]
    torch.testing.assert_close(y @ q @ q.T, y)


def test_nystrom_full_keep_reproduces_and_drops_dead_channels():
    torch.manual_seed(0)
    x = torch.randn(400, 10, dtype=torch.float64)
    x[:, 3] = 0.0  # a dead channel
    cov = x.T @ x
    w = torch.randn(6, 10, dtype=torch.float64)
    idx, w2, _ = nystrom_mlp(cov, w, 9)
    assert 3 not in idx.tolist()
    torch.testing.assert_close(x[:, idx] @ w2.T, x @ w.T)
    scores = ridge_leverage_scores(cov)
    assert scores[3] == 0 and ((scores > 0.9) | (scores == 0)).all()


def test_headwise_lowrank_full_rank_is_exact():
    w = torch.randn(4 * 6, 20, dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(4, 6, 6, dtype=torch.float64)).Q
    down, up = headwise_lowrank(w, basis)
    x = torch.randn(3, 20, dtype=torch.float64)
    y = torch.einsum("thr,hdr->thd", (x @ down.T).view(3, 4, 6), up).reshape(3, -1)
    torch.testing.assert_close(y, x @ w.T)


@pytest.mark.parametrize("seed", range(5))
def test_iprs_invariants(seed):
    rng = np.random.default_rng(seed)
    imp = rng.random(12).tolist()
    imp[0] = 20.0  # one dominant layer must be capped
    for r in (0.2, 0.5, 0.8):
        w = iprs(imp, r)
        assert abs(sum(w) - r * 12) < 1e-9 and max(w) <= 1.0 + 1e-12 and w[0] == 1.0
        order = np.argsort(imp)
        assert all(np.diff(np.array(w)[order]) >= -1e-12)  # monotone in importance
    assert iprs(imp, 1.0) == [1.0] * 12 and uniform(imp, 0.3) == [0.3] * 12


def test_solve_mean_kept_hits_integer_target():
    sizes = [100, 300, 50]
    r, kept = solve_mean_kept(lambda r: iprs([1, 2, 3], r), lambda k: sum(round(a * s) for a, s in zip(k, sizes)), 300)
    assert abs(sum(round(a * s) for a, s in zip(kept, sizes)) - 300) <= 2


# ----------------------------------------------------------------------------------------------- beyond the paper
def _ls_output_error(x, w, idx):
    """Output error ||X W^T - X_k W'^T||^2 with W' the least-squares weights on the kept channels idx."""
    sol = torch.linalg.lstsq(x[:, idx], x @ w.T).solution
    return ((x[:, idx] @ sol - x @ w.T) ** 2).sum().item()


@pytest.mark.parametrize("block", [1, 4])
def test_greedy_channels_full_keep_is_exact_and_block1_matches_brute_force_greedy(block):
    torch.manual_seed(0)
    x = torch.randn(300, 9, dtype=torch.float64) @ torch.randn(9, 9, dtype=torch.float64)
    w = torch.randn(5, 9, dtype=torch.float64)
    idx, w2, _ = nystrom_mlp(x.T @ x, w, 9, select="greedy")
    torch.testing.assert_close(x[:, idx] @ w2.T, x @ w.T)
    if block == 1:  # each step adds the channel that lowers the least-squares output error most
        chosen = []
        for _ in range(4):
            rest = [j for j in range(9) if j not in chosen]
            chosen.append(min(rest, key=lambda j: _ls_output_error(x, w, sorted(chosen + [j]))))
        assert greedy_output_channels(x.T @ x, w, 4, block=1).tolist() == sorted(chosen)


def test_greedy_keeps_more_channels_than_calibration_tokens():
    """More channels kept than the covariance has rank (fewer tokens than channels, float32 products as the
    default variant accumulates them): once the kept channels span every token the rest add nothing; the selection
    still ends, picks a spanning set first, and the closed-form down_proj reproduces the output on those tokens."""
    torch.manual_seed(0)
    x = torch.randn(100, 512) * torch.rand(512) * 3
    cov = sum((b.T @ b).double() for b in x.split(32))
    w = torch.randn(16, 512)
    idx, w2, _ = nystrom_mlp(cov, w, 200, select="greedy")
    assert idx.numel() == 200 and idx.unique().numel() == 200
    xd, ref = x.double(), x.double() @ w.double().T
    assert ((xd[:, idx] @ w2.T - ref) ** 2).sum() < 1e-8 * (ref ** 2).sum()
    first = greedy_output_channels(cov, w, 100)  # the first 100 already span the 100 tokens
    assert torch.linalg.matrix_rank(xd[:, first]) == 100


def test_greedy_beats_ridge_leverage_when_loud_channels_do_not_reach_the_output():
    torch.manual_seed(0)
    x = torch.randn(400, 12, dtype=torch.float64)
    x[:, :6] *= 10.0  # loud channels ...
    w = torch.randn(4, 12, dtype=torch.float64)
    w[:, :6] *= 1e-3  # ... that down_proj barely reads
    cov = x.T @ x
    lev, _, _ = nystrom_mlp(cov, w, 6)  # the paper: picks the loud ones
    for scale in ("absolute", "trace"):
        assert mlp_channels(cov, w, 6, ridge_scale=scale).tolist() == list(range(6)) or scale == "trace"
    greedy, _, _ = nystrom_mlp(cov, w, 6, select="greedy")
    assert greedy.tolist() == list(range(6, 12))
    assert _ls_output_error(x, w, greedy) < 0.01 * _ls_output_error(x, w, lev)


def test_ridge_scale_trace_does_not_depend_on_the_token_count():
    torch.manual_seed(0)
    x = torch.randn(200, 8, dtype=torch.float64) * torch.logspace(-2, 1, 8, dtype=torch.float64)
    cov = x.T @ x
    a = ridge_leverage_scores(cov, cov.diagonal().mean().item())
    b = ridge_leverage_scores(100 * cov, (100 * cov).diagonal().mean().item())  # 100x the tokens, same statistics
    torch.testing.assert_close(a, b)
    assert not torch.allclose(ridge_leverage_scores(cov, 1.0), ridge_leverage_scores(100 * cov, 1.0))


def _attention_outputs(v, heads, kv, seq=64):
    """o_proj input of a mean attention: z (tokens, heads*dv) for values v (tokens, kv*dv); each query head of a
    group averages its KV head's values over blocks of a different length (16, 32, 64)."""
    t, dv = v.shape[0], v.shape[1] // kv
    vs = v.view(t // seq, seq, kv, dv)
    z = []
    for j in range(heads):
        span = 16 * 2 ** (j % (heads // kv))
        a = torch.block_diag(*[torch.full((span, span), 1.0 / span, dtype=v.dtype)] * (seq // span))
        z.append(torch.einsum("st,btd->bsd", a, vs[:, :, j // (heads // kv)]))
    return torch.stack(z, 2).reshape(t, heads * dv)


def _vo_error(z_of, v, w_o, maps, new_o, heads, kv):
    t, dv = v.shape[0], v.shape[1] // kv
    v2 = torch.einsum("hrd,thd->thr", maps, v.view(t, kv, dv)).reshape(t, -1)
    return ((z_of(v2) @ new_o.T - z_of(v) @ w_o.T) ** 2).sum().item()


def test_o_proj_solve_full_rank_exact_and_never_worse_than_folding():
    torch.manual_seed(0)
    heads, kv, dv, hidden = 6, 2, 5, 16
    v = torch.randn(64 * 32, kv * dv, dtype=torch.float64)
    z = _attention_outputs(v, heads, kv)
    w_o = torch.randn(hidden, heads * dv, dtype=torch.float64)
    z_of = lambda vv: _attention_outputs(vv, heads, kv)  # noqa: E731
    maps = torch.randn(kv, dv, dv, dtype=torch.float64)  # any invertible maps
    new_o, _ = solve_output_projection(z.T @ z, w_o, maps, heads)
    assert _vo_error(z_of, v, w_o, maps, new_o, heads, kv) < 1e-14 * (z @ w_o.T).pow(2).sum().item()
    cov = torch.zeros(kv, dv, dv, dtype=torch.float64)
    accumulate_head_covariance(cov, v)
    q = top_eigenvectors(cov, 2).transpose(1, 2)
    lstsq = _vo_error(z_of, v, w_o, q, solve_output_projection(z.T @ z, w_o, q, heads)[0], heads, kv)
    fold = _vo_error(z_of, v, w_o, q, fold_output_columns(w_o, q, heads), heads, kv)
    assert lstsq <= fold * (1 + 1e-12)


def test_pooled_group_covariance_sums_the_query_heads_of_each_group():
    torch.manual_seed(0)
    z = torch.randn(50, 6 * 4, dtype=torch.float64)
    per_head = torch.zeros(6, 4, 4, dtype=torch.float64)
    accumulate_head_covariance(per_head, z)
    torch.testing.assert_close(pooled_group_covariance(z.T @ z, 6, 2), per_head.view(2, 3, 4, 4).sum(1))


def test_attention_and_weighted_bases_beat_value_pca_where_they_should():
    """Values whose loudest direction is token noise (averaged away by attention) and whose steady direction,
    which survives attention, is the one o_proj reads: PCA of the values keeps the noise."""
    torch.manual_seed(0)
    heads, kv, dv, hidden, t = 4, 2, 4, 12, 64 * 32
    v = torch.zeros(t, kv, dv, dtype=torch.float64)
    v[:, :, 0] = 2.0 * torch.randn(t, kv, dtype=torch.float64)  # loud token noise
    v[:, :, 1] = torch.randn(t // 32, 1, kv, dtype=torch.float64).expand(-1, 32, -1).reshape(t, kv)  # steady
    v[:, :, 2:] = 0.05 * torch.randn(t, kv, 2, dtype=torch.float64)
    v = v.reshape(t, kv * dv)
    w_o = torch.randn(hidden, heads * dv, dtype=torch.float64)
    z_of = lambda vv: _attention_outputs(vv, heads, kv)  # noqa: E731
    z = z_of(v)
    cov_v = torch.zeros(kv, dv, dv, dtype=torch.float64)
    accumulate_head_covariance(cov_v, v)
    pooled = pooled_group_covariance(z.T @ z, heads, kv)
    w_heads = w_o.view(hidden, heads, dv).transpose(0, 1)
    gram = (w_heads.transpose(1, 2) @ w_heads).view(kv, heads // kv, dv, dv).sum(1)
    err = {}
    for name, maps in (("values", top_eigenvectors(cov_v, 1).transpose(1, 2)),
                       ("attention", top_eigenvectors(pooled, 1).transpose(1, 2)),
                       ("weighted", weighted_value_basis(pooled, gram, 1))):
        err[name] = _vo_error(z_of, v, w_o, maps, solve_output_projection(z.T @ z, w_o, maps, heads)[0], heads, kv)
    assert err["attention"] < 0.5 * err["values"] and err["weighted"] <= err["attention"] * 1.01
    full = weighted_value_basis(pooled, gram, dv)  # full rank: exact
    assert _vo_error(z_of, v, w_o, full, solve_output_projection(z.T @ z, w_o, full, heads)[0], heads, kv) < 1e-12 * (
        z @ w_o.T).pow(2).sum().item()


def test_importance_smoothing_moves_iprs_towards_uniform():
    imp = [0.5, 0.2, 0.08, 0.07, 0.1, 0.26]
    assert smooth_importance(imp, 0.0) == imp
    spread = [np.ptp(iprs(smooth_importance(imp, s), 0.5)) for s in (0.0, 0.5, 2.0, 1000.0)]
    assert spread == sorted(spread, reverse=True) and spread[-1] < 0.01


def test_options_validate_and_resolve():
    # a bare FlatLLMOptions() is the library's default; 'paper' is the official code's algorithm, every choice
    assert FlatLLMOptions() == resolve_options() == VARIANTS[DEFAULT_VARIANT]
    assert vars(resolve_options("paper")) == {
        "vo_basis": "values", "o_proj": "fold", "mlp_select": "leverage", "ridge": 1.0, "ridge_scale": "absolute",
        "vo_scale": 1.0, "iprs_smoothing": 0.0, "importance_windows": 0, "stats_dtype": "float64"}
    assert resolve_options("paper", vo_scale=2.0, ridge=None).vo_scale == 2.0
    with pytest.raises(ValueError, match="compression.vo_basis"):
        FlatLLMOptions(vo_basis="keys")
    with pytest.raises(ValueError, match="o_proj: lstsq"):
        resolve_options("paper", vo_basis="weighted")
    with pytest.raises(ValueError, match="compression.variant"):
        resolve_options("best")
