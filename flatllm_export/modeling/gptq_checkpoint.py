"""Write and read GPTQ-packed safetensors checkpoints of the per-layer-shaped model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .configuration_flatllm import FlatLlamaConfig
from .modeling_flatllm import FlatLlamaForCausalLM
from .qlinear import QuantLinear

QUANT_KEYS = ("qweight", "qzeros", "scales", "g_idx")


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())


def dequantized_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A plain state dict (weights, not GPTQ tensors) of a model that may hold QuantLinear modules."""
    state = {}
    quant = {name for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, m in model.named_modules():
        if name in quant:
            state[f"{name}.weight"] = m.weight.to(dtype)
            if m.bias is not None:
                state[f"{name}.bias"] = m.bias.detach().to(dtype)
    for k, v in model.state_dict().items():
        owner = k.rsplit(".", 1)[0]
        if owner not in quant:
            state[k] = v.to(dtype) if v.is_floating_point() else v
    return state


def gptq_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """GPTQ tensors as they are (scales float16, int32 packs), every other float tensor in ``dtype``; biases of
    quantized linears in float16 as the format has them."""
    quant = {name for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    out = {}
    for k, v in model.state_dict().items():
        owner, leaf = k.rsplit(".", 1)
        if owner in quant:
            out[k] = v.to(torch.float16) if leaf in ("scales", "bias") else v.contiguous()
        else:
            out[k] = v.to(dtype) if v.is_floating_point() else v
    return out


def quant_linear_shapes(config: FlatLlamaConfig, state: dict[str, torch.Tensor]) -> dict[str, tuple[int, int, bool]]:
    """name -> (in, out, has_bias) of every packed linear in a checkpoint state dict."""
    bits = config.quantization_config["bits"]
    shapes = {}
    for k, v in state.items():
        if k.endswith(".qweight"):
            name = k[: -len(".qweight")]
            shapes[name] = (v.shape[0] * 32 // bits, v.shape[1], f"{name}.bias" in state)
    return shapes


def build_quantized_model(config: FlatLlamaConfig, state: dict[str, torch.Tensor]) -> FlatLlamaForCausalLM:
    """A FlatLlamaForCausalLM whose packed linears are QuantLinear, filled from ``state`` (strictly)."""
    qc = config.quantization_config
    with torch.device("meta"):
        model = FlatLlamaForCausalLM(config)
    for name, (in_f, out_f, bias) in quant_linear_shapes(config, state).items():
        parent, _, child = name.rpartition(".")
        q = QuantLinear(in_f, out_f, qc["bits"], qc["group_size"], bias, qc.get("checkpoint_format", "gptq"))
        setattr(model.get_submodule(parent), child, q)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("inv_freq")]
    if missing or unexpected:
        raise ValueError(f"GPTQ checkpoint does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model


def write_quantize_config(out: Path, qc: dict, source: str) -> None:
    """AutoGPTQ-style quantize_config.json beside config.json's quantization_config."""
    body = {k: qc[k] for k in ("bits", "group_size", "damp_percent", "desc_act", "static_groups", "sym",
                               "true_sequential", "checkpoint_format")}
    body.update(quant_method="gptq", model_name_or_path=source, model_file_base_name="model")
    (out / "quantize_config.json").write_text(json.dumps(body, indent=2) + "\n")
