"""Configuration of a Llama-family decoder whose layers may each have their own shape.

Shipped beside exported weights (``trust_remote_code``): imports nothing but transformers.

Every per-layer dimension is data in ``layer_shapes`` (one dict per decoder layer), read from here by the
model, the quantizer, the exporters and the runtimes alike:

- ``num_heads``, ``num_kv_heads``: query and key/value heads of the layer (FLAP removes whole heads)
- ``v_head_dim``: value head dim (FLAT-LLM's head-wise PCA shrinks it); key/query head dim is ``head_dim``
- ``qk_rank``: per-head rank of a low-rank Q/K factorisation, or null for dense Q/K
- ``intermediate_size``: MLP channels of the layer
- ``o_bias``, ``down_bias``: whether o_proj / down_proj carry a bias (FLAP's bias compensation)
- ``lowrank``: {projection name: rank} for projections stored as two factors (SVD-LLM), e.g. {"up_proj": 96}
"""

from __future__ import annotations

from transformers import PretrainedConfig

LAYER_KEYS = ("num_heads", "num_kv_heads", "v_head_dim", "qk_rank", "intermediate_size", "o_bias", "down_bias",
              "lowrank")


class FlatLlamaConfig(PretrainedConfig):
    model_type = "flatllm_llama"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        intermediate_size: int = 11008,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        rope_scaling: dict | None = None,
        attention_bias: bool = False,
        tie_word_embeddings: bool = False,
        layer_shapes: list[dict] | None = None,
        source_model_type: str = "llama",
        use_cache: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.attention_bias = attention_bias
        self.source_model_type = source_model_type
        self.use_cache = use_cache
        default = dict(num_heads=self.num_attention_heads, num_kv_heads=self.num_key_value_heads,
                       v_head_dim=self.head_dim, qk_rank=None, intermediate_size=intermediate_size,
                       o_bias=False, down_bias=False, lowrank={})
        shapes = layer_shapes if layer_shapes is not None else [dict(default) for _ in range(num_hidden_layers)]
        if len(shapes) != num_hidden_layers:
            raise ValueError(f"layer_shapes has {len(shapes)} entries but num_hidden_layers is {num_hidden_layers}")
        self.layer_shapes = [{**default, **dict(s)} for s in shapes]
        for i, s in enumerate(self.layer_shapes):
            unknown = set(s) - set(LAYER_KEYS)
            if unknown:
                raise ValueError(f"layer_shapes[{i}] has unknown keys {sorted(unknown)}; allowed: {list(LAYER_KEYS)}")
            if s["num_heads"] < 1 or s["num_kv_heads"] < 1 or s["num_heads"] % s["num_kv_heads"]:
                raise ValueError(f"layer_shapes[{i}]: num_heads={s['num_heads']} must be a positive multiple of "
                                 f"num_kv_heads={s['num_kv_heads']}")
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def layer_shape(self, i: int) -> dict:
        return self.layer_shapes[i]
