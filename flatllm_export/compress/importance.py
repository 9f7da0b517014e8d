"""Block influence: how much a decoder layer turns its input hidden states (angular distance)."""

from __future__ import annotations

import math

import torch


def angular_distance_sum(x: torch.Tensor, y: torch.Tensor, chunk: int = 65536) -> tuple[float, int]:
    """Sum over tokens of arccos(cos(x_t, y_t)) / pi, and the token count; x, y: (..., hidden)."""
    x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    total = 0.0
    for s in range(0, x.shape[0], chunk):
        a, b = x[s : s + chunk].double(), y[s : s + chunk].double()
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1.0, 1.0)
        total += (torch.arccos(cos) / math.pi).sum().item()
    return total, x.shape[0]


class BlockInfluence:
    """A calibration-engine method that changes nothing and records each layer's mean angular distance."""

    def __init__(self):
        self.scores: list[float] = []

    def process_layer(self, index, layer, run) -> bool:
        out = run.forward()
        total, n = angular_distance_sum(run.inputs, out)
        self.scores.append(total / n)
        return False
