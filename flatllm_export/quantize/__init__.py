"""GPTQ after (or without) compression, through the shared calibration engine.

The math is in gptq.py, the format in packing.py; this module is the glue: true-sequential groups of linears
inside each decoder layer (q/k/v, then o, then gate/up, then down), each group's inputs captured with the
previous groups already quantized, every linear replaced by a QuantLinear holding its GPTQ tensors."""

from __future__ import annotations

import time

import torch
from torch import nn

from ..calibration import capture, run_sequential
from .gptq import QuantizationError, accumulate_hessian, quantize_weight, weight_first_tokens
from ..modeling.qlinear import QuantLinear

SEQUENTIAL_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                     ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def linear_names(layer: nn.Module, name: str) -> list[str]:
    """The nn.Linear(s) behind a projection: itself, the ``down`` factor of a head-wise low-rank Q/K (its
    per-head ``up`` stays in float), or both factors of a low-rank (SVD-LLM) projection."""
    mod = layer.get_submodule(name)
    if isinstance(mod, (nn.Linear, QuantLinear)):
        return [name]
    if isinstance(mod.up, nn.Parameter):
        return [f"{name}.down"]
    return [f"{name}.down", f"{name}.up"]


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def checkpoint_format(sym: bool) -> str:
    # v1 ('gptq') stores zero - 1, which cannot hold an asymmetric zero of 0: asymmetric is written as gptq_v2
    return "gptq" if sym else "gptq_v2"


class GPTQLayerMethod:
    def __init__(self, section):
        self.s = section
        self.fmt = checkpoint_format(section.sym)
        self.modules: dict[str, dict] = {}

    def process_layer(self, index, layer, run) -> bool:
        for group in SEQUENTIAL_GROUPS:
            names = [ln for n in group for ln in linear_names(layer, n)]
            mods = {n: layer.get_submodule(n) for n in names}
            mods = {n: m for n, m in mods.items() if m.in_features > 0 and m.out_features > 0}
            if not mods:
                continue
            dev = next(iter(mods.values())).weight.device
            hess, counts, same_as, last = {}, {n: 0 for n in mods}, {}, [None, None]

            def on_in(name, x):
                prev, prev_name = last  # kept alive, so an equal data pointer is the very same tensor
                if prev is not None and x.data_ptr() == prev.data_ptr() and x.shape == prev.shape:
                    same_as[name] = prev_name  # q/k/v and gate/up read one tensor: one Hessian
                    return
                last[:] = x, name
                x = weight_first_tokens(x, run.inputs.shape[1], self.s.first_token_weight)
                h = hess.setdefault(name, torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=dev))
                counts[name] = accumulate_hessian(h, x, counts[name])

            with capture(mods, on_in, "input"):
                run.forward()
            last[:] = None, None
            if same_as.keys() & hess.keys():
                raise QuantizationError(f"model.layers.{index}: inputs shared by {sorted(same_as)} in some batches only")
            hess.update({n: hess[src] for n, src in same_as.items()})
            for n, m in mods.items():
                full = f"model.layers.{index}.{n}"
                if not torch.isfinite(hess[n]).all():
                    raise QuantizationError(f"{full}: calibration inputs contain NaN/Inf")
                q, diag = quantize_weight(m.weight, hess[n], self.s.bits, self.s.group_size, self.s.sym,
                                          self.s.desc_act, self.s.damp_percent, self.s.block_size, name=full,
                                          scale=self.s.scale, static_groups=self.s.static_groups)
                new = QuantLinear.from_quantized(q, m.bias, self.fmt).to(dev)
                set_submodule(layer, n, new)
                self.modules[full] = {"shape": [m.out_features, m.in_features], **diag}
        return True


def check_packable(model) -> None:
    """Refuse, before any work, linears whose in/out features are not multiples of 32 (GPTQ packs along both)."""
    bad = []
    for i, layer in enumerate(model.model.layers):
        for group in SEQUENTIAL_GROUPS:
            for n in (ln for g in group for ln in linear_names(layer, g)):
                m = layer.get_submodule(n)
                if m.in_features % 32 or m.out_features % 32:
                    bad.append(f"model.layers.{i}.{n} ({m.out_features}x{m.in_features})")
    if bad:
        raise QuantizationError(f"GPTQ packing needs in/out features that are multiples of 32; not so: "
                                f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}. Compress in the same recipe "
                                "as the quantization (ranks are then aligned to 32) or set compression.round_to: 32")


@torch.no_grad()
def quantize_lm_head(model, hidden: torch.Tensor, section, bits: int, device: str, batch_size: int) -> dict:
    """GPTQ of the lm_head with ``bits``, its Hessian from the final-norm outputs of the calibration windows
    (``hidden``: the last decoder layer's outputs). The embedding stays float in PyTorch; with tied embeddings the
    ONNX exporter may read it from this quantized weight."""
    head, norm = model.lm_head, model.model.norm
    home = head.weight.device
    head.to(device), norm.to(device)
    hess = torch.zeros(head.in_features, head.in_features, dtype=torch.float64, device=device)
    count = 0
    for batch in hidden.split(batch_size):
        x = norm(batch.to(device, norm.weight.dtype))
        count = accumulate_hessian(hess, x.reshape(-1, x.shape[-1]), count)
    q, diag = quantize_weight(head.weight, hess, bits, section.group_size, section.sym, section.desc_act,
                              section.damp_percent, section.block_size, name="lm_head", scale=section.scale,
                              static_groups=section.static_groups)
    model.lm_head = QuantLinear.from_quantized(q, head.bias, checkpoint_format(section.sym)).to(home)
    norm.to(home)
    return {"shape": [head.out_features, head.in_features], "bits": bits, **diag}


def quantize_model(model, windows: torch.Tensor, section, device: str = "cpu", batch_size: int = 8,
                   lm_head_bits: int | None = None) -> dict:
    """GPTQ every decoder linear of ``model`` in place, and the lm_head with ``lm_head_bits`` when given.
    Returns the report section."""
    check_packable(model)
    t0 = time.time()
    method = GPTQLayerMethod(section)
    hidden = run_sequential(model, windows, method, device, batch_size, desc=f"gptq {section.bits}-bit")
    if lm_head_bits:
        method.modules["lm_head"] = quantize_lm_head(model, hidden, section, lm_head_bits, device, batch_size)
    model.config.quantization_config = quantization_config(section, lm_head=bool(lm_head_bits))
    retried = {k: v["damp_percent"] for k, v in method.modules.items() if v["retries"]}
    return {"method": "gptq", "bits": section.bits, "group_size": section.group_size, "sym": section.sym,
            "desc_act": section.desc_act, "static_groups": section.static_groups, "scale": section.scale,
            "first_token_weight": section.first_token_weight,
            "damp_percent": section.damp_percent, "checkpoint_format": method.fmt,
            "quantized_linears": len(method.modules), "damping_raised": retried,
            "quantize_seconds": round(time.time() - t0, 2), "layers": method.modules}


def quantization_config(section, lm_head: bool = False) -> dict:
    return {"quant_method": "gptq", "bits": section.bits, "group_size": section.group_size,
            "desc_act": section.desc_act, "sym": section.sym, "damp_percent": section.damp_percent,
            "true_sequential": True, "static_groups": section.static_groups, "lm_head": lm_head,
            "checkpoint_format": checkpoint_format(section.sym), "pack_dtype": "int32"}


__all__ = ["QuantLinear", "QuantizationError", "quantize_model", "quantization_config"]
