import numpy as np
import pytest
import torch

from flatllm_export.compress.allocation import iprs, solve_mean_kept, uniform
from flatllm_export.compress.flatllm import (accumulate_head_covariance, fold_value_basis, headwise_lowrank,
                                             nystrom_mlp, ridge_leverage_scores, top_eigenvectors)


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
