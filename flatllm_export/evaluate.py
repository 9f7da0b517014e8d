"""Perplexity with the standard protocol: non-overlapping windows of seqlen tokens over the concatenated test
text, mean NLL over every predicted token (seqlen - 1 per window), exp. Any runtime that maps a batch of token
windows to logits can be measured on exactly the same windows.

The PyTorch model itself is measured layer by layer (``model_perplexity``): every window goes through decoder
layer i before layer i+1 is loaded (the calibration engine's loop, so a streamed model holds one layer), and
the loss is computed ``LOSS_TOKENS`` tokens at a time, so full-vocabulary logits of a whole batch never exist:
peak memory is the hidden states of the windows plus one chunk's logits."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .calibration import layer0_inputs, run_layers
from .modeling.streaming import is_streamed, layers_of

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


LOSS_TOKENS = 256  # tokens whose logits exist at once when the PyTorch model's loss is computed


def torch_logits_fn(model, device: str | None = None) -> LogitsFn:
    """Logits of a batch of windows; a streamed model's are computed layer by layer (one layer in memory)."""
    if is_streamed(model):
        return lambda batch: layerwise_logits(model, batch, device or "cpu")
    device = device or next(model.parameters()).device

    @torch.no_grad()
    def logits(batch: torch.Tensor) -> torch.Tensor:
        return model(input_ids=batch.to(device), use_cache=False).logits.float().cpu()

    return logits


@torch.no_grad()
def final_hidden(model, windows: torch.Tensor, device: str = "cpu", batch_size: int = 8,
                 desc: str = "layers") -> torch.Tensor:
    """The final norm's inputs (n, T, hidden) for windows (n, T): every window through one layer at a time."""
    inputs, cos, sin = layer0_inputs(model, windows, batch_size)
    return run_layers(layers_of(model), inputs, cos, sin, None, device, batch_size, desc)


@torch.no_grad()
def _head(model, hidden: torch.Tensor) -> torch.Tensor:
    device = model.lm_head.weight.device
    return model.lm_head(model.model.norm(hidden.to(device))).float().cpu()


def layerwise_logits(model, windows: torch.Tensor, device: str = "cpu", batch_size: int = 8) -> torch.Tensor:
    """Logits (n, T, vocab) of windows computed layer by layer (for small samples: all logits are returned)."""
    return _head(model, final_hidden(model, windows, device, batch_size))


def nll_sum(logits: torch.Tensor, batch: torch.Tensor) -> float:
    """Summed next-token NLL of (B, T, V) logits for (B, T) tokens, in float64, LOSS_TOKENS rows at a time."""
    flat, target = logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
    return sum(F.cross_entropy(flat[s : s + LOSS_TOKENS].double(), target[s : s + LOSS_TOKENS], reduction="sum").item()
               for s in range(0, flat.shape[0], LOSS_TOKENS))


@torch.no_grad()
def model_perplexity(model, windows: torch.Tensor, batch_size: int = 8, device: str = "cpu",
                     desc: str = "perplexity") -> dict:
    """Perplexity of the PyTorch model (see the module docstring): {'ppl', 'nll', 'tokens', 'windows'}."""
    hidden = final_hidden(model, windows, device, batch_size, desc)
    total = 0.0
    for w in range(windows.shape[0]):  # each window's predicted tokens, LOSS_TOKENS at a time
        for s in range(0, windows.shape[1] - 1, LOSS_TOKENS):
            e = min(s + LOSS_TOKENS, windows.shape[1] - 1)
            logits = _head(model, hidden[w, s:e])
            total += F.cross_entropy(logits.double(), windows[w, s + 1 : e + 1], reduction="sum").item()
    count = windows.numel() - windows.shape[0]
    nll = total / count
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count, "windows": int(windows.shape[0])}


def perplexity(logits_fn: LogitsFn, windows: torch.Tensor, batch_size: int = 8, desc: str = "perplexity") -> dict:
    """{'ppl', 'nll', 'tokens', 'windows'} over windows (n, seqlen)."""
    total, count = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc=desc, unit="batch", leave=False):
        total += nll_sum(logits_fn(batch), batch)
        count += batch.numel() - batch.shape[0]
    nll = total / count
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count, "windows": int(windows.shape[0])}
