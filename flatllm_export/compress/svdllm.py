"""SVD-LLM (Wang et al. 2024) as the decomposition baseline: truncation-aware data whitening. With the
Cholesky factor S of a linear's input covariance (X^T X = S S^T), the truncated SVD of W S = U s V^T gives
two factors, up = U_r s_r (out x r) and down = V_r^T S^-1 (r x in), whose truncation loss on the calibration
data is exactly the dropped singular values. Every projection keeps the same share of its parameters; one
whose factorisation would be larger than the dense matrix stays dense (and the report says so)."""

from __future__ import annotations

import time

import torch

from .. import accounting
from ..calibration import capture, run_sequential
from .flatllm import CompressionError, damped_cholesky
from .surgery import reshape_layer

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

SHARED_INPUT = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
                "mlp.up_proj": "mlp.gate_proj"}


def whitened_factors(w: torch.Tensor, cov: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(up (out, r), down (r, in), damping) with up @ down ~ w, truncation-aware for inputs of covariance cov."""
    s, damp = damped_cholesky(cov.to(torch.float64))
    u, sv, vh = torch.linalg.svd(w.to(torch.float64) @ s, full_matrices=False)
    up = u[:, :rank] * sv[:rank]
    down = torch.linalg.solve_triangular(s.T, vh[:rank].T, upper=True).T  # V_r^T S^-1
    return up, down, damp


def svd_rank(in_f: int, out_f: int, keep: float, multiple: int = 1) -> int | None:
    """Rank keeping ``keep`` of the parameters, or None when factors would not be smaller than dense."""
    r = keep * in_f * out_f / (in_f + out_f)
    r = int(r) if multiple == 1 else max(multiple, multiple * round(r / multiple))
    return r if r * (in_f + out_f) < in_f * out_f else None


class SVDLLMLayerMethod:
    def __init__(self, config, keep: float, multiple: int = 1, full_rank_too: bool = False):
        self.config, self.keep, self.multiple, self.full_rank_too = config, keep, multiple, full_rank_too
        self.kept_dense: list[str] = []
        self.damping: dict[str, float] = {}

    def process_layer(self, index, layer, run) -> bool:
        shape = self.config.layer_shapes[index]
        dims = accounting.linear_dims(self.config.hidden_size, self.config.head_dim, shape)
        ranks = {}
        for name in PROJECTIONS:
            short = name.split(".")[1]
            i, o = dims[short]
            r = min(i, o) if self.full_rank_too else svd_rank(i, o, self.keep, self.multiple)
            if r is None or short in (shape.get("lowrank") or {}) or (short in ("q_proj", "k_proj") and shape["qk_rank"]):
                self.kept_dense.append(f"layer {index} {short}")
                continue
            ranks[name] = r
        if not ranks:
            return False
        # projections reading the same input (q/k/v, gate/up) share one covariance: a float64 sum of per-batch
        # float32 Gram matrices (fp32 rounding within one batch only), several times faster on a CPU than
        # float64 products
        readers = {n: SHARED_INPUT.get(n, n) for n in ranks}
        covs = {src: torch.zeros(dims[src.split(".")[1]][0], dims[src.split(".")[1]][0], dtype=torch.float64)
                for src in set(readers.values())}

        def on_in(name, x):
            x = x.float()
            covs[name].add_((x.T @ x).cpu().double())

        with capture({src: layer.get_submodule(src) for src in covs}, on_in, "input"):
            run.forward()
        covs = {n: covs[src] for n, src in readers.items()}
        new, lowrank = {}, dict(shape.get("lowrank") or {})
        for name, r in ranks.items():
            if not torch.isfinite(covs[name]).all():
                raise CompressionError(f"layer {index} {name}: calibration statistics contain NaN/Inf")
            mod = layer.get_submodule(name)
            up, down, damp = whitened_factors(mod.weight.detach().cpu(), covs[name], r)
            if damp:
                self.damping[f"layer {index} {name}"] = damp
            new[f"{name}.down.weight"] = down
            new[f"{name}.up.weight"] = up
            if mod.bias is not None:
                new[f"{name}.up.bias"] = mod.bias.detach()
            lowrank[name.split(".")[1]] = r
        reshape_layer(layer, self.config, index, new, lowrank=lowrank)
        return True


def compress_svdllm(model, windows: torch.Tensor, ratio: float, device: str = "cpu", batch_size: int = 8,
                    linear_multiple: int = 1) -> dict:
    config = model.config
    before = accounting.decoder_linear_params(config)
    t0 = time.time()
    method = SVDLLMLayerMethod(config, 1.0 - ratio, linear_multiple)
    run_sequential(model, windows, method, device, batch_size, desc="svd-llm")
    after = accounting.decoder_linear_params(config)
    return {"method": "svd-llm", "linear_multiple": linear_multiple, "requested_ratio": ratio,
            "achieved_ratio": round(1 - after / before, 6), "decoder_linear_params_before": before,
            "decoder_linear_params_after": after, "compress_seconds": round(time.time() - t0, 2),
            "kept_dense": method.kept_dense, "damping": method.damping,
            "layers": [{"layer": i, "kept_ratio": round(accounting.decoder_linear_params(config, [s]) /
                                                         (before / config.num_hidden_layers), 4),
                        **{k: v for k, v in sorted((s.get("lowrank") or {}).items())}}
                       for i, s in enumerate(config.layer_shapes)]}
