"""FLAP (An et al., AAAI 2024): fluctuation-based structured pruning of whole attention heads (KV groups under
GQA) and MLP channels, with bias compensation. Statistics (running mean and variance of the inputs of o_proj
and down_proj) come from one pass of the shared calibration engine over the dense model; selection is then
global (adaptive structures) or per layer (uniform ones), and bias compensation needs no second pass.
"""

from __future__ import annotations

import time

import torch

from .. import accounting
from ..calibration import capture, run_sequential
from ..modeling.streaming import layers_of
from .surgery import reshape_layer

METRICS = ("IFV", "WIFV", "WIFN")
STRUCTURES = ("UL-UM", "UL-MM", "AL-MM", "AL-AM")


# ----------------------------------------------------------------------------------------------- pure math
def channel_scores(mean: torch.Tensor, var: torch.Tensor, w: torch.Tensor, metric: str) -> torch.Tensor:
    """Per input channel j of a linear with weight w (out, in): IFV var_j; WIFV var_j * ||w_:,j||^2;
    WIFN sqrt(E[x_j^2]) * ||w_:,j||_1 / out (weighted input feature norm)."""
    w = w.to(torch.float64)
    if metric == "IFV":
        return var
    if metric == "WIFV":
        return var * w.pow(2).sum(0)
    if metric == "WIFN":
        return (var + mean.pow(2)).sqrt() * w.abs().mean(0)
    raise ValueError(f"unknown FLAP metric '{metric}'; use one of {METRICS}")


def standardize(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std().clamp_min(1e-12) if x.numel() > 1 else torch.zeros_like(x)


def select_removals(units: list[dict], target: int) -> set[int]:
    """Remove units (dicts with 'score', 'cost', 'protected') in ascending score while that brings the removed
    cost nearer to ``target`` parameters (a unit that would overshoot more than it helps is skipped, and
    cheaper ones after it may still fit); protected units are never removed. Returns the removed indices."""
    removed, total = set(), 0
    for i in sorted(range(len(units)), key=lambda i: units[i]["score"]):
        if units[i]["protected"]:
            continue
        if abs(total + units[i]["cost"] - target) < abs(total - target):
            removed.add(i)
            total += units[i]["cost"]
    return removed


def removed_cost(units: list[dict], removed: set[int]) -> int:
    return sum(units[i]["cost"] for i in removed)


# ----------------------------------------------------------------------------------------------- glue
class FlapStats:
    """Engine method: per layer, running sums of the inputs of o_proj and down_proj (float64), and each input
    channel's score under ``metric`` (read while the layer's weights are at hand: a streamed model holds one
    layer at a time)."""

    def __init__(self, metric: str = "WIFV"):
        self.metric = metric
        self.stats: list[dict] = []

    def process_layer(self, index, layer, run) -> bool:
        acc = {}
        mods = {"o": layer.self_attn.o_proj, "down": layer.mlp.down_proj}

        def on_in(name, x):
            x = x.to(torch.float64)
            s = acc.setdefault(name, [0, 0.0, 0.0])
            s[0] += x.shape[0]
            s[1] = s[1] + x.sum(0)
            s[2] = s[2] + x.pow(2).sum(0)

        with capture(mods, on_in, "input"):
            run.forward()
        out = {}
        for name, (n, s1, s2) in acc.items():
            mean = (s1 / n).cpu()
            var = (s2.cpu() / n - mean.pow(2)).clamp_min(0) * n / max(n - 1, 1)  # unbiased
            score = channel_scores(mean, var, mods[name].weight.detach().cpu(), self.metric)
            out[name] = {"mean": mean, "var": var, "score": score}
        self.stats.append(out)
        return False


def _units(model, stats) -> tuple[list[dict], list[dict]]:
    """Head-group units and MLP-channel units with raw scores and exact parameter costs."""
    cfg, hidden = model.config, model.config.hidden_size
    heads, chans = [], []
    for i, s in enumerate(cfg.layer_shapes):
        h, kv, dv, d = s["num_heads"], s["num_kv_heads"], s["v_head_dim"], cfg.head_dim
        groups = h // kv
        per_ch = stats[i]["o"]["score"]
        group_score = per_ch.view(kv, groups * dv).sum(1)  # a KV group = its query heads' o_proj columns
        cost = hidden * (groups * d + d + dv) + groups * dv * hidden  # q rows, k rows, v rows, o columns
        for g in range(kv):
            heads.append({"layer": i, "index": g, "raw": float(group_score[g]), "cost": cost})
        ch = stats[i]["down"]["score"]
        for c in range(ch.numel()):
            chans.append({"layer": i, "index": c, "raw": float(ch[c]), "cost": 3 * hidden})
    return heads, chans


def _score(units: list[dict], per_layer_standardize: bool) -> None:
    layers = sorted({u["layer"] for u in units})
    for layer in layers:
        idx = [k for k, u in enumerate(units) if u["layer"] == layer]
        raw = torch.tensor([units[k]["raw"] for k in idx], dtype=torch.float64)
        z = standardize(raw) if per_layer_standardize else raw
        for k, v in zip(idx, z.tolist()):
            units[k]["score"] = v


def _protect_best_head(heads: list[dict]) -> None:
    """No layer loses every head: its highest-scoring KV group is never removed."""
    best: dict[int, dict] = {}
    for u in heads:
        u["protected"] = False
        if u["layer"] not in best or u["raw"] > best[u["layer"]]["raw"]:
            best[u["layer"]] = u
    for u in best.values():
        u["protected"] = True


def plan_flap(model, stats, ratio: float, structure: str = "AL-AM") -> dict[int, dict]:
    """Removed head groups and channels per layer: {layer: {'groups': [...], 'channels': [...]}}."""
    if structure not in STRUCTURES:
        raise ValueError(f"unknown FLAP structure '{structure}'; use one of {STRUCTURES}")
    heads, chans = _units(model, stats)
    _protect_best_head(heads)
    for c in chans:
        c["protected"] = False
    total = accounting.decoder_linear_params(model.config)
    removed_h, removed_c = set(), set()
    n_layers = model.config.num_hidden_layers
    if structure == "AL-AM":  # heads and channels together, z-scored per layer and per module, one global cut
        _score(heads, True)
        _score(chans, True)
        units = heads + chans
        gone = select_removals(units, round(total * ratio))
        removed_h = {k for k in gone if k < len(heads)}
        removed_c = {k - len(heads) for k in gone if k >= len(heads)}
    elif structure == "AL-MM":  # adaptive across layers, each module type cut by the ratio separately
        _score(heads, True)
        _score(chans, True)
        removed_h = select_removals(heads, round(sum(u["cost"] for u in heads) * ratio))
        # heads come in coarse units: the channels make up the difference so the total meets the ratio
        removed_c = select_removals(chans, round(total * ratio) - removed_cost(heads, removed_h))
    else:  # uniform across layers
        for layer in range(n_layers):
            hi = [k for k, u in enumerate(heads) if u["layer"] == layer]
            ci = [k for k, u in enumerate(chans) if u["layer"] == layer]
            for k in hi:
                heads[k]["score"] = heads[k]["raw"]
            for k in ci:
                chans[k]["score"] = chans[k]["raw"]
            if structure == "UL-UM":
                sub_h = [heads[k] for k in hi]
                sub_c = [chans[k] for k in ci]
                gone_h = select_removals(sub_h, round(sum(u["cost"] for u in sub_h) * ratio))
                layer_target = round((sum(u["cost"] for u in sub_h) + sum(u["cost"] for u in sub_c)) * ratio)
                removed_h |= {hi[j] for j in gone_h}
                removed_c |= {ci[j] for j in select_removals(sub_c, layer_target - removed_cost(sub_h, gone_h))}
            else:  # UL-MM: each layer cut by the ratio, heads and channels compete within the layer (z-scored)
                sub = [heads[k] for k in hi] + [chans[k] for k in ci]
                _score(sub[: len(hi)], True)
                _score(sub[len(hi):], True)
                gone = select_removals(sub, round(sum(u["cost"] for u in sub) * ratio))
                removed_h |= {hi[j] for j in gone if j < len(hi)}
                removed_c |= {ci[j - len(hi)] for j in gone if j >= len(hi)}
    plan = {i: {"groups": [], "channels": []} for i in range(n_layers)}
    for k in removed_h:
        plan[heads[k]["layer"]]["groups"].append(heads[k]["index"])
    for k in removed_c:
        plan[chans[k]["layer"]]["channels"].append(chans[k]["index"])
    for layer in range(n_layers):  # keep at least one MLP channel
        n = model.config.layer_shapes[layer]["intermediate_size"]
        if len(plan[layer]["channels"]) >= n:
            plan[layer]["channels"] = sorted(plan[layer]["channels"])[1:]
    return plan


def align_channels(plan: dict[int, dict], chan_scores: dict[int, torch.Tensor], sizes: list[int], multiple: int) -> None:
    """Round each layer's kept MLP channels to a multiple (restoring the best removed, or removing the worst
    kept, whichever is nearer)."""
    for layer, p in plan.items():
        removed = set(p["channels"])
        kept = sizes[layer] - len(removed)
        target = max(multiple, multiple * round(kept / multiple))
        target = min(target, sizes[layer] - sizes[layer] % multiple if sizes[layer] >= multiple else sizes[layer])
        order = torch.argsort(chan_scores[layer], descending=True).tolist()
        keep = [c for c in order if c not in removed]
        back = [c for c in order if c in removed]
        keep = (keep + back)[:target] if target > len(keep) else keep[:target]
        p["channels"] = sorted(set(range(sizes[layer])) - set(keep))


def apply_flap(model, stats, plan: dict[int, dict]) -> None:
    """Remove the planned KV groups and channels, adding bias compensation W[:, pruned] @ mean[pruned] to the
    o_proj and down_proj biases."""
    cfg, store = model.config, layers_of(model)
    for i, s in enumerate(cfg.layer_shapes):
        kv, dv, d = s["num_kv_heads"], s["v_head_dim"], cfg.head_dim
        groups = s["num_heads"] // kv
        keep_g = [g for g in range(kv) if g not in set(plan[i]["groups"])]
        keep_c = [c for c in range(s["intermediate_size"]) if c not in set(plan[i]["channels"])]
        if len(keep_g) == kv and len(keep_c) == s["intermediate_size"]:
            continue
        layer = store.load(i)
        attn, mlp = layer.self_attn, layer.mlp
        ref = attn.o_proj.weight
        q_rows = torch.tensor([(g * groups + j) * d + e for g in keep_g for j in range(groups) for e in range(d)])
        k_rows = torch.tensor([g * d + e for g in keep_g for e in range(d)])
        v_rows = torch.tensor([g * dv + e for g in keep_g for e in range(dv)])
        o_cols = torch.tensor([(g * groups + j) * dv + e for g in keep_g for j in range(groups) for e in range(dv)])
        new = {}
        for name, rows in (("q_proj", q_rows), ("k_proj", k_rows), ("v_proj", v_rows)):
            proj = getattr(attn, name)
            new[f"self_attn.{name}.weight"] = proj.weight[rows]
            if proj.bias is not None:
                new[f"self_attn.{name}.bias"] = proj.bias[rows]
        o_pruned = torch.ones(ref.shape[1], dtype=torch.bool)
        o_pruned[o_cols] = False
        o_mean = stats[i]["o"]["mean"].to(ref.device, torch.float64)
        o_bias = (attn.o_proj.bias.double() if attn.o_proj.bias is not None else torch.zeros(ref.shape[0], dtype=torch.float64, device=ref.device))
        new["self_attn.o_proj.weight"] = ref[:, o_cols]
        new["self_attn.o_proj.bias"] = o_bias + ref.double()[:, o_pruned] @ o_mean[o_pruned]
        wd = mlp.down_proj.weight
        c_idx = torch.tensor(keep_c, dtype=torch.long)
        c_pruned = torch.ones(wd.shape[1], dtype=torch.bool)
        c_pruned[c_idx] = False
        d_mean = stats[i]["down"]["mean"].to(wd.device, torch.float64)
        d_bias = mlp.down_proj.bias.double() if mlp.down_proj.bias is not None else torch.zeros(wd.shape[0], dtype=torch.float64, device=wd.device)
        new.update({"mlp.gate_proj.weight": mlp.gate_proj.weight[c_idx], "mlp.up_proj.weight": mlp.up_proj.weight[c_idx],
                    "mlp.down_proj.weight": wd[:, c_idx],
                    "mlp.down_proj.bias": d_bias + wd.double()[:, c_pruned] @ d_mean[c_pruned]})
        reshape_layer(layer, cfg, i, new, num_heads=len(keep_g) * groups, num_kv_heads=len(keep_g),
                      intermediate_size=len(keep_c), o_bias=True, down_bias=True)
        store.release(i, layer, changed=True)
        del layer, attn, mlp, new


def compress_flap(model, windows: torch.Tensor, ratio: float, metric: str = "WIFV", structure: str = "AL-AM",
                  device: str = "cpu", batch_size: int = 8, linear_multiple: int = 1) -> dict:
    """FLAP in place; returns the report section (same keys as FLAT-LLM's where they mean the same)."""
    config = model.config
    before = accounting.decoder_linear_params(config)
    t0 = time.time()
    collector = FlapStats(metric)
    run_sequential(model, windows, collector, device, batch_size, desc="flap statistics")
    plan = plan_flap(model, collector.stats, ratio, structure)
    if linear_multiple > 1:
        scores = {i: st["down"]["score"] for i, st in enumerate(collector.stats)}
        align_channels(plan, scores, [s["intermediate_size"] for s in config.layer_shapes], linear_multiple)
    apply_flap(model, collector.stats, plan)
    after = accounting.decoder_linear_params(config)
    return {
        "method": "flap", "metric": metric, "structure": structure, "linear_multiple": linear_multiple,
        "requested_ratio": ratio, "achieved_ratio": round(1 - after / before, 6),
        "decoder_linear_params_before": before, "decoder_linear_params_after": after,
        "compress_seconds": round(time.time() - t0, 2),
        "layers": [{"layer": i, "num_heads": s["num_heads"], "num_kv_heads": s["num_kv_heads"],
                    "intermediate_size": s["intermediate_size"],
                    "kept_ratio": round(accounting.decoder_linear_params(config, [s]) /
                                        (before / config.num_hidden_layers), 4)}
                   for i, s in enumerate(config.layer_shapes)],
    }
