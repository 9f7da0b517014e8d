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

from .calibration import run_layers
from .emulation import Arithmetic, exported_tables, emulated_layer
from .modeling.modeling_flatllm import rms_norm
from .modeling.qlinear import QuantLinear
from .modeling.streaming import layers_of

EXACT = Arithmetic()

LM_HEAD_ROWS = 8192  # lm_head rows widened to float64 at a time


class RMSNorm64(nn.Module):
    """RMSNorm in the input's own dtype (transformers' LlamaRMSNorm computes in float32 whatever it is given)."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(weight.detach().to(torch.float64), requires_grad=False), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, stats_dtype=x.dtype)


def _norm_eps(module: nn.Module) -> float:
    return float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)))


def _linear64(q: QuantLinear) -> nn.Linear:
    """A float64 linear with a QuantLinear's weight: its cached float32 dequantization is exact, widened."""
    lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
    lin.weight = nn.Parameter(q.weight.to(torch.float64), requires_grad=False)
    if q.bias is not None:
        lin.bias = nn.Parameter(q.bias.detach().to(torch.float64), requires_grad=False)
    return lin


def float64_layer(layer: nn.Module, arith: Arithmetic = EXACT) -> nn.Module:
    """A float64 copy of one decoder layer computing ``arith``: QuantLinears become plain linears with their exact
    dequantized weights (never copied packed), behind the arithmetic's activation quantization; RMSNorms compute
    in float64."""
    copy_ = emulated_layer(layer, arith, torch.float64, as_linear=_linear64)
    for name, mod in list(copy_.named_modules()):
        if type(mod).__name__.endswith("RMSNorm"):
            parent, _, child = name.rpartition(".")
            setattr(copy_.get_submodule(parent) if parent else copy_, child, RMSNorm64(mod.weight, _norm_eps(mod)))
    return copy_


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
def embeddings(model, ids: torch.Tensor, arith: Arithmetic, dtype: torch.dtype, batch_size: int = 8) -> torch.Tensor:
    """The embeddings (n, T, hidden) of ``ids`` in ``dtype`` from the table the export stores: the model's own
    (looked up in its dtype: a lookup is exact) or block-quantized (exact in float32 and float64)."""
    if arith.embedding == "float":
        table = model.model.embed_tokens
        return torch.cat([table(b.to(table.weight.device)).cpu() for b in ids.split(batch_size)]).to(dtype)
    return exported_tables(model, arith, dtype)[0](ids)


def _layer_device(model) -> torch.device | str:
    device = next(model.model.layers[0].parameters()).device
    return "cpu" if device.type == "meta" else device  # a streamed model's layers are read onto the host


@torch.no_grad()
def float64_hidden(model, ids: torch.Tensor, batch_size: int = 8, arith: Arithmetic = EXACT) -> torch.Tensor:
    """The final-norm hidden states (n, T, hidden) of token windows ids (n, T), in float64, on the host, of the
    model computing ``arith`` (an export's approximations; default: none)."""
    core = model.model
    emb = embeddings(model, ids, arith, torch.float64, batch_size)
    cos, sin = rotary64(model.config, core.rotary_emb, ids.shape[1], min(batch_size, ids.shape[0]))
    hidden = run_layers(layers_of(model), emb.to(torch.float64), cos, sin, None, _layer_device(model), batch_size,
                        desc="float64 reference", working_copy=lambda layer: float64_layer(layer, arith))
    return RMSNorm64(core.norm.weight.cpu(), _norm_eps(core.norm))(hidden)


@torch.no_grad()
def float64_project(model, hidden: torch.Tensor, arith: Arithmetic = EXACT) -> torch.Tensor:
    """Logits (..., vocab) in float64 from float64 final-norm hidden states (..., hidden)."""
    head = model.lm_head
    if arith.lm_head != "float" or (arith.activations and isinstance(head, QuantLinear)):
        return exported_tables(model, arith, torch.float64)[1](hidden)  # a quantized head: vocab x hidden once
    weight = head.weight.detach()
    out = torch.empty(*hidden.shape[:-1], weight.shape[0], dtype=torch.float64)
    for start in range(0, weight.shape[0], LM_HEAD_ROWS):
        rows = weight[start : start + LM_HEAD_ROWS].cpu().to(torch.float64)
        out[..., start : start + rows.shape[0]] = hidden @ rows.T
    if getattr(head, "bias", None) is not None:
        out += head.bias.detach().cpu().to(torch.float64)
    return out


def float64_logits(model, ids: torch.Tensor, batch_size: int = 8, arith: Arithmetic = EXACT) -> torch.Tensor:
    """Logits (n, T, vocab) of token windows ids (n, T) in float64: the reference every runtime is judged by."""
    return float64_project(model, float64_hidden(model, ids, batch_size, arith), arith)


def float64_logits_fn(model, batch_size: int = 8, arith: Arithmetic = EXACT):
    """A logits function (a runtime in validate.py's sense) for the float64 reference of ``model``."""
    return lambda ids: float64_logits(model, ids, batch_size, arith)


@torch.no_grad()
def emulated_logits(model, ids: torch.Tensor, arith: Arithmetic, dtype: torch.dtype = torch.float32,
                    batch_size: int = 8, perturb: int | None = None) -> torch.Tensor:
    """Logits (n, T, vocab), float32, of the model computing ``arith`` in PyTorch at precision ``dtype``, layer by
    layer: PyTorch's own noise floor for an export with these approximations. ``perturb``: the seed of a move of
    the embeddings by about one ulp (``perturbed``), for the floors of a discontinuous arithmetic."""
    core = model.model
    head = exported_tables(model, arith, dtype)[1]
    emb = perturbed(embeddings(model, ids, arith, torch.float64, batch_size), dtype, perturb)
    positions = torch.arange(ids.shape[1]).unsqueeze(0).expand(min(batch_size, ids.shape[0]), -1)
    cos, sin = core.rotary_emb(emb[:1].float().to(core.rotary_emb.inv_freq.device), positions)
    hidden = run_layers(layers_of(model), emb, cos.cpu().to(dtype), sin.cpu().to(dtype), None, _layer_device(model),
                        batch_size, desc=f"torch {str(dtype).removeprefix('torch.')} emulation",
                        working_copy=lambda layer: emulated_layer(layer, arith, dtype))
    norm = copy.deepcopy(core.norm).cpu().to(dtype)
    head = head if head is not model.lm_head else copy.deepcopy(head).cpu().to(dtype)
    return torch.cat([head.cpu().to(dtype)(norm(h)).float() for h in hidden.split(batch_size)])


def emulated_logits_fn(model, arith: Arithmetic, dtype: torch.dtype = torch.float32, batch_size: int = 8,
                       perturb: int | None = None):
    return lambda ids: emulated_logits(model, ids, arith, dtype, batch_size, perturb)


PERTURBED_RUNS = 4  # PyTorch runs on inputs moved by about one ulp, for an arithmetic with rounding of its own


def floor_perturbations(arith: Arithmetic) -> list[int | None]:
    """The runs PyTorch's floor of ``arith`` is the largest of: its own inputs (None), and, for an arithmetic that
    quantizes activations, ``PERTURBED_RUNS`` seeds of inputs moved by about one ulp. Such an arithmetic is
    discontinuous: where a value sits within noise of a rounding tie, any fp32 run may round it either way, and
    through attention one such jump reaches every later row (end to end, the jumps compound over layers). One
    PyTorch run may happen to round every tie as float64 does while the runtime does not; the perturbed runs
    sample the jumps fp32 noise can cause."""
    return [None] + (list(range(PERTURBED_RUNS)) if arith.activations else [])


def perturbed(x: torch.Tensor, dtype: torch.dtype, seed: int | None) -> torch.Tensor:
    """``x`` in ``dtype``, moved by about one ulp of ``dtype`` (relative Gaussian noise of seed ``seed``), or as it
    is for seed None."""
    if seed is None:
        return x.to(dtype)
    g = torch.Generator().manual_seed(seed)
    return (x * (1 + torch.finfo(dtype).eps * torch.randn(x.shape, generator=g, dtype=x.dtype))).to(dtype)


def with_dtype(model, dtype: torch.dtype):
    """A copy of ``model`` in another floating dtype (PyTorch's own low-precision noise floor)."""
    return copy.deepcopy(model).to(dtype)



@torch.no_grad()
def layer_deviations(model, ids, streams: list, logits, prefill: int, arith: Arithmetic = EXACT,
                     dtype: torch.dtype = torch.float32) -> list[dict]:
    """Layer by layer on a runtime's own residual streams (``streams[i]`` entering decoder layer i, float64 arrays
    (B, T, hidden), the last one leaving the last layer; the first ``prefill`` positions computed at once, the
    rest decoded one by one from the cache): each layer's float64 output under ``arith`` from the runtime's
    input, against the runtime's output and PyTorch's at ``dtype`` (same arithmetic, same input). Only one layer
    is between input and output, so an arithmetic that makes the whole model chaotic (int8 activations: near a
    rounding tie, fp32 noise moves a value by a whole step, and such jumps compound over layers) stays near the
    fp32 floor. Per layer and per part (prefill, decode): the median over token rows of each row's largest
    deviation (a rounding jump touches a few rows; a defect, every row of its part) for the runtime and PyTorch
    (the largest over ``_floor_inputs``), the runtime's largest deviation, and the output's magnitude. The last row ("layer": "head") is the final norm
    and the lm_head on the runtime's last stream, against its ``logits`` (B, T, vocab)."""
    store = layers_of(model)
    device = _layer_device(model)
    batch, seqlen, _ = streams[0].shape
    cos64, sin64 = rotary64(model.config, model.model.rotary_emb, seqlen, batch)
    positions = torch.arange(seqlen).unsqueeze(0).expand(batch, -1)
    probe = torch.zeros(1, dtype=torch.float32, device=model.model.rotary_emb.inv_freq.device)
    cos, sin = (t.cpu().to(dtype) for t in model.model.rotary_emb(probe, positions))
    parts = {"prefill": slice(0, prefill), "decode": slice(prefill, seqlen)}
    ids = torch.as_tensor(ids)
    out = [_row_stats("embedding", torch.from_numpy(streams[0]), [embeddings(model, ids, arith, dtype)],
                      embeddings(model, ids, arith, torch.float64), parts)]  # a lookup: exact in any precision
    for i in range(len(store)):
        layer = store.load(i)
        x = torch.from_numpy(streams[i])
        ref = float64_layer(layer, arith).to(device)(x.to(device), cos64.to(device), sin64.to(device)).cpu()
        low = emulated_layer(layer, arith, dtype).to(device)
        lows = [low(x32.to(device), cos.to(device), sin.to(device)).cpu() for x32 in _floor_inputs(x, arith, dtype)]
        store.release(i, layer)
        del layer, low
        out.append(_row_stats(i, torch.from_numpy(streams[i + 1]), lows, ref, parts))
    core, x = model.model, torch.from_numpy(streams[-1])
    ref = float64_project(model, RMSNorm64(core.norm.weight.cpu(), _norm_eps(core.norm))(x), arith)
    norm = copy.deepcopy(core.norm).cpu().to(dtype)
    head = exported_tables(model, arith, dtype)[1]
    head = copy.deepcopy(head).cpu().to(dtype) if head is model.lm_head else head
    lows = [head(norm(x32)) for x32 in _floor_inputs(x, arith, dtype)]
    out.append(_row_stats("head", torch.as_tensor(logits).double(), lows, ref, parts))
    return out


def _floor_inputs(x: torch.Tensor, arith: Arithmetic, dtype: torch.dtype) -> list[torch.Tensor]:
    """The inputs PyTorch's layer floor is measured on (``floor_perturbations``)."""
    return [perturbed(x, dtype, seed) for seed in floor_perturbations(arith)]


def _row_stats(layer, got: torch.Tensor, lows: list[torch.Tensor], ref: torch.Tensor, parts: dict) -> dict:
    dev = (got - ref).abs().amax(-1)  # (B, T): each row's largest deviation
    floors = [(low.double() - ref).abs().amax(-1) for low in lows]
    row = {"layer": layer, "max_deviation": dev.max().item(), "scale": ref.abs().max().item()}
    for name, cols in parts.items():
        if cols.stop > cols.start:
            row[name] = {"deviation": dev[:, cols].median().item(),
                         "floor": max(f[:, cols].median().item() for f in floors)}
    return row
