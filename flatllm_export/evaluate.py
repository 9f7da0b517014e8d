"""Perplexity with the standard protocol: non-overlapping windows of seqlen tokens over the concatenated test
text, mean NLL over every predicted token (seqlen - 1 per window), exp. Any runtime that maps a batch of token
windows to logits can be measured on exactly the same windows."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def torch_logits_fn(model, device: str | None = None) -> LogitsFn:
    device = device or next(model.parameters()).device

    @torch.no_grad()
    def logits(batch: torch.Tensor) -> torch.Tensor:
        return model(input_ids=batch.to(device), use_cache=False).logits.float().cpu()

    return logits


def nll_sum(logits: torch.Tensor, batch: torch.Tensor) -> float:
    """Summed next-token NLL of (B, T, V) logits for (B, T) tokens, in float64."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), batch[:, 1:].reshape(-1),
                           reduction="sum").item()


def perplexity(logits_fn: LogitsFn, windows: torch.Tensor, batch_size: int = 8, desc: str = "perplexity") -> dict:
    """{'ppl', 'nll', 'tokens', 'windows'} over windows (n, seqlen)."""
    total, count = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc=desc, unit="batch", leave=False):
        total += nll_sum(logits_fn(batch), batch)
        count += batch.numel() - batch.shape[0]
    nll = total / count
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count, "windows": int(windows.shape[0])}
