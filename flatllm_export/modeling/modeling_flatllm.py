"""A Llama-family decoder whose layers each have their own shape (see configuration_flatllm.py).

Shipped beside exported weights (``trust_remote_code``): imports nothing but torch and transformers.
Weight names are Llama's, so a dense Llama / Mistral state dict loads unchanged.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from .configuration_flatllm import FlatLlamaConfig

KVUpdate = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class HeadwiseLowRank(nn.Module):
    """Per-head low-rank projection x -> [B_h (A_h x)]_h: ``down`` maps hidden to heads*rank (one rank-r block per
    head), ``up`` (heads, head_dim, rank) lifts each head back to head_dim. Used for low-rank Q/K."""

    def __init__(self, in_features: int, heads: int, head_dim: int, rank: int, bias: bool = False):
        super().__init__()
        self.heads, self.head_dim, self.rank = heads, head_dim, rank
        self.down = nn.Linear(in_features, heads * rank, bias=False)
        self.up = nn.Parameter(torch.empty(heads, head_dim, rank))
        self.bias = nn.Parameter(torch.zeros(heads * head_dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.down(x).unflatten(-1, (self.heads, self.rank))  # (B, T, h, r)
        y = torch.einsum("bthr,hdr->bthd", z, self.up).flatten(-2)  # (B, T, h*d)
        return y + self.bias if self.bias is not None else y


class LowRankLinear(nn.Module):
    """W ~ up @ down with rank r: x -> up(down(x)). Used for SVD-LLM's two factors."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def projection(shape: dict, name: str, in_features: int, out_features: int, bias: bool) -> nn.Module:
    """A dense linear, or two low-rank factors when ``shape['lowrank']`` names this projection."""
    rank = (shape.get("lowrank") or {}).get(name)
    if rank is None:
        return nn.Linear(in_features, out_features, bias=bias)
    return LowRankLinear(in_features, out_features, rank, bias=bias)


def qk_projection(shape: dict, name: str, hidden: int, heads: int, head_dim: int, bias: bool) -> nn.Module:
    if shape["qk_rank"] is None:
        return projection(shape, name, hidden, heads * head_dim, bias)
    return HeadwiseLowRank(hidden, heads, head_dim, shape["qk_rank"], bias=bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, stats_dtype: torch.dtype = torch.float32
             ) -> torch.Tensor:
    """Llama's RMSNorm as a function: LlamaRMSNorm's arithmetic (statistics and scaling in float32, the weight
    applied in the input's dtype) for the ONNX graph's fused norms; the float64 reference passes float64."""
    dtype = x.dtype
    x = x.to(stats_dtype)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def attention_mask_4d(attention_mask: torch.Tensor | None, q_len: int, past_len: int, dtype: torch.dtype,
                      device: torch.device) -> torch.Tensor:
    """Additive mask (B or 1, 1, q_len, past_len + q_len): causal, plus padding from a (B, S) 0/1 mask. Masked
    entries get the dtype's minimum rather than -inf, so a fully padded row yields no NaN."""
    kv_len = past_len + q_len
    q_pos = torch.arange(q_len, device=device) + past_len
    allowed = torch.arange(kv_len, device=device)[None, :] <= q_pos[:, None]  # (q, kv)
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, -kv_len:].to(torch.bool)
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device))


class FlatLlamaAttention(nn.Module):
    def __init__(self, config: FlatLlamaConfig, layer_idx: int):
        super().__init__()
        s = config.layer_shape(layer_idx)
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = s["num_heads"], s["num_kv_heads"]
        self.head_dim, self.v_head_dim = config.head_dim, s["v_head_dim"]
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = qk_projection(s, "q_proj", hidden, self.num_heads, self.head_dim, bias)
        self.k_proj = qk_projection(s, "k_proj", hidden, self.num_kv_heads, self.head_dim, bias)
        self.v_proj = projection(s, "v_proj", hidden, self.num_kv_heads * self.v_head_dim, bias)
        self.o_proj = projection(s, "o_proj", self.num_heads * self.v_head_dim, hidden, s["o_bias"])

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                kv_update: KVUpdate | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, T, d)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, kv, T, d)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.v_head_dim).transpose(1, 2)  # (B, kv, T, dv)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if kv_update is not None:
            k, v = kv_update(k, v)  # (B, kv, past+T, d), (B, kv, past+T, dv)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        # SDPA accepts a value head dim different from the query/key head dim
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                             scale=self.head_dim**-0.5)  # (B, h, T, dv)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.v_head_dim))


class FlatLlamaMLP(nn.Module):
    def __init__(self, config: FlatLlamaConfig, layer_idx: int):
        super().__init__()
        s = config.layer_shape(layer_idx)
        hidden, inter = config.hidden_size, s["intermediate_size"]
        self.gate_proj = projection(s, "gate_proj", hidden, inter, False)
        self.up_proj = projection(s, "up_proj", hidden, inter, False)
        self.down_proj = projection(s, "down_proj", inter, hidden, s["down_bias"])
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class FlatLlamaDecoderLayer(nn.Module):
    def __init__(self, config: FlatLlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = FlatLlamaAttention(config, layer_idx)
        self.mlp = FlatLlamaMLP(config, layer_idx)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
                kv_update: KVUpdate | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_update)
        return x + self.mlp(self.post_attention_layernorm(x))


class FlatLlamaPreTrainedModel(PreTrainedModel):
    config_class = FlatLlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["FlatLlamaDecoderLayer"]

    def _init_weights(self, module):
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, std)
        elif isinstance(module, HeadwiseLowRank):
            module.up.data.normal_(0.0, std)
        elif isinstance(module, LlamaRMSNorm):
            module.weight.data.fill_(1.0)


class FlatLlamaModel(FlatLlamaPreTrainedModel):
    def __init__(self, config: FlatLlamaConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(FlatLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values: Cache | None = None,
                inputs_embeds=None, use_cache: bool | None = None, cache_position=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        B, T, _ = inputs_embeds.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            base = cache_position if cache_position is not None else torch.arange(past_len, past_len + T,
                                                                                   device=inputs_embeds.device)
            position_ids = base.unsqueeze(0).expand(B, -1)
        cos, sin = self.rotary_emb(inputs_embeds, position_ids)
        needs_mask = past_len > 0 or (attention_mask is not None and not bool(attention_mask.all()))
        mask = attention_mask_4d(attention_mask, T, past_len, inputs_embeds.dtype, inputs_embeds.device) \
            if needs_mask else None
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            update = (lambda k, v, i=i: past_key_values.update(k, v, i)) if past_key_values is not None else None
            x = layer(x, cos, sin, mask, update)
        return self.norm(x), past_key_values


class FlatLlamaForCausalLM(FlatLlamaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config: FlatLlamaConfig):
        super().__init__(config)
        self.model = FlatLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, cache_position=None, logits_to_keep: int = 0,
                **kwargs) -> CausalLMOutputWithPast:
        hidden, cache = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                                   use_cache=use_cache, cache_position=cache_position)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)
