"""The float64 reference: the model as exported, computed in float64, one decoder layer at a time.

It is the truth every parity check measures against (``flatllm_export.parity``). The model is never converted as a
whole: the calibration engine's layer loop (``calibration.run_layers``) hands each decoder layer over as a
throwaway float64 copy (GPTQ weights dequantized exactly: fp16 scale x small integer is exact), runs it over the
inputs and drops it. Embeddings are looked up in the model's own dtype (a lookup is exact) and widened; rotary
cos/sin, RMSNorm, attention, the final norm and the lm_head (a slice of its rows at a time) are computed in
float64. Only the hidden states of the inputs and one layer are ever held in float64.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .calibration import layer0_inputs, run_layers
from .modeling.streaming import layers_of
from .quantize.qlinear import QuantLinear

LM_HEAD_ROWS = 8192  # lm_head rows widened to float64 at a time


class RMSNorm64(nn.Module):
    """RMSNorm in the input's own dtype (transformers' LlamaRMSNorm computes in float32 whatever it is given)."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(weight.detach().to(torch.float64), requires_grad=False), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def _norm_eps(module: nn.Module) -> float:
    return float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)))


def _linear64(q: QuantLinear) -> nn.Linear:
    """A float64 linear with a QuantLinear's weight: its cached float32 dequantization is exact, widened."""
    lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
    lin.weight = nn.Parameter(q.weight.to(torch.float64), requires_grad=False)
    if q.bias is not None:
        lin.bias = nn.Parameter(q.bias.detach().to(torch.float64), requires_grad=False)
    return lin


def float64_layer(layer: nn.Module) -> nn.Module:
    """A float64 copy of one decoder layer: QuantLinears become plain linears with their exact dequantized
    weights (never copied packed), RMSNorms compute in float64."""
    memo = {id(m): _linear64(m) for m in layer.modules() if isinstance(m, QuantLinear)}
    copy_ = copy.deepcopy(layer, memo)
    for name, mod in list(copy_.named_modules()):
        if type(mod).__name__.endswith("RMSNorm"):
            parent, _, child = name.rpartition(".")
            setattr(copy_.get_submodule(parent) if parent else copy_, child, RMSNorm64(mod.weight, _norm_eps(mod)))
    return copy_.to(torch.float64)


def rotary64(config, rotary: nn.Module, seqlen: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (batch, seqlen, head_dim) in float64. Default RoPE: inverse frequencies from rope_theta in float64;
    scaled variants: the module's (float32) inverse frequencies, widened, and its attention scaling."""
    dim = config.head_dim
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        factor = 1.0
    else:
        inv_freq = rotary.inv_freq.detach().cpu().to(torch.float64)
        factor = float(getattr(rotary, "attention_scaling", 1.0))
    freqs = torch.arange(seqlen, dtype=torch.float64)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return ((emb.cos() * factor)[None].expand(batch, -1, -1).contiguous(),
            (emb.sin() * factor)[None].expand(batch, -1, -1).contiguous())


@torch.no_grad()
def float64_hidden(model, ids: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """The final-norm hidden states (n, T, hidden) of token windows ids (n, T), in float64, on the host."""
    core = model.model
    emb, _, _ = layer0_inputs(model, ids, batch_size)
    cos, sin = rotary64(model.config, core.rotary_emb, ids.shape[1], min(batch_size, ids.shape[0]))
    device = next(core.layers[0].parameters()).device
    device = "cpu" if device.type == "meta" else device  # a streamed model's layers are read onto the host
    hidden = run_layers(layers_of(model), emb.to(torch.float64), cos, sin, None, device, batch_size,
                        desc="float64 reference", working_copy=float64_layer)
    return RMSNorm64(core.norm.weight.cpu(), _norm_eps(core.norm))(hidden)


@torch.no_grad()
def float64_project(model, hidden: torch.Tensor) -> torch.Tensor:
    """Logits (..., vocab) in float64 from float64 final-norm hidden states (..., hidden)."""
    head = model.lm_head
    weight = head.weight.detach()
    out = torch.empty(*hidden.shape[:-1], weight.shape[0], dtype=torch.float64)
    for start in range(0, weight.shape[0], LM_HEAD_ROWS):
        rows = weight[start : start + LM_HEAD_ROWS].cpu().to(torch.float64)
        out[..., start : start + rows.shape[0]] = hidden @ rows.T
    if getattr(head, "bias", None) is not None:
        out += head.bias.detach().cpu().to(torch.float64)
    return out


def float64_logits(model, ids: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Logits (n, T, vocab) of token windows ids (n, T) in float64: the reference every runtime is judged by."""
    return float64_project(model, float64_hidden(model, ids, batch_size))


def float64_logits_fn(model, batch_size: int = 8):
    """A logits function (a runtime in validate.py's sense) for the float64 reference of ``model``."""
    return lambda ids: float64_logits(model, ids, batch_size)


def with_dtype(model, dtype: torch.dtype):
    """A copy of ``model`` in another floating dtype (PyTorch's own low-precision noise floor)."""
    return copy.deepcopy(model).to(dtype)

