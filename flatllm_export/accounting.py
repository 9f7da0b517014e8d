"""One parameter accounting for every method: linear weights of the decoder stack, from per-layer shapes.

"Compression ratio" everywhere in flatllm-export means the fraction of these parameters removed (embeddings,
norms, lm_head and biases are not counted), so "30%" means the same for FLAT-LLM, FLAP and GPTQ reports.
"""

from __future__ import annotations


def _qk_params(hidden: int, heads: int, head_dim: int, rank: int | None) -> int:
    if rank is None:
        return hidden * heads * head_dim
    return hidden * heads * rank + heads * head_dim * rank  # per-head down (r x hidden) and up (d x r)


def layer_linear_params(hidden: int, head_dim: int, shape: dict) -> dict[str, int]:
    """Weight parameters of each linear of one decoder layer with the given shape dict."""
    h, kv, dv, inter = shape["num_heads"], shape["num_kv_heads"], shape["v_head_dim"], shape["intermediate_size"]
    dims = linear_dims(hidden, head_dim, shape)
    params = {name: i * o for name, (i, o) in dims.items()}
    params["q_proj"] = _qk_params(hidden, h, head_dim, shape.get("qk_rank"))
    params["k_proj"] = _qk_params(hidden, kv, head_dim, shape.get("qk_rank"))
    for name, rank in (shape.get("lowrank") or {}).items():  # two factors: rank x in + out x rank
        i, o = dims[name]
        params[name] = rank * (i + o)
    return params


def linear_dims(hidden: int, head_dim: int, shape: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each projection of a layer with this shape, as a dense matrix."""
    h, kv, dv, inter = shape["num_heads"], shape["num_kv_heads"], shape["v_head_dim"], shape["intermediate_size"]
    return {"q_proj": (hidden, h * head_dim), "k_proj": (hidden, kv * head_dim), "v_proj": (hidden, kv * dv),
            "o_proj": (h * dv, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
            "down_proj": (inter, hidden)}


def decoder_linear_params(config, shapes: list[dict] | None = None) -> int:
    """Total linear-weight parameters of the decoder stack (of ``shapes`` if given, else of the config's)."""
    shapes = config.layer_shapes if shapes is None else shapes
    return sum(sum(layer_linear_params(config.hidden_size, config.head_dim, s).values()) for s in shapes)


def model_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
