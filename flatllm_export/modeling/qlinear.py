"""QuantLinear: a linear layer that holds GPTQ tensors (packed) and computes with the dequantized weight. The
in-memory quantized model and a reloaded checkpoint use this same module, so they agree bit for bit."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .packing import QuantizedWeight, pack_weight, unpack_weight


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool,
                 checkpoint_format: str = "gptq"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.checkpoint_format = bits, group_size, checkpoint_format
        groups = 1 if group_size == -1 else -(-in_features // group_size)
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, out_features * bits // 32, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._weight: torch.Tensor | None = None

    @classmethod
    def from_quantized(cls, q: QuantizedWeight, bias: torch.Tensor | None, checkpoint_format: str) -> "QuantLinear":
        out_f, in_f = q.codes.shape
        m = cls(in_f, out_f, q.bits, q.group_size, bias is not None, checkpoint_format)
        for k, v in pack_weight(q, checkpoint_format).items():
            getattr(m, k).copy_(v)
        if bias is not None:  # the checkpoint format stores biases in float16: compute with what it will hold
            m.bias.data = bias.detach().to(torch.float16).to(bias.dtype)
        return m

    def quantized(self) -> QuantizedWeight:
        return unpack_weight({"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales,
                              "g_idx": self.g_idx}, self.bits, self.group_size, self.checkpoint_format)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (out, in), float32, cached."""
        if self._weight is None or self._weight.device != self.qweight.device:
            self._weight = self.quantized().dequantize(torch.float32).to(self.qweight.device)
        return self._weight

    def _apply(self, fn, *args, **kwargs):
        self._weight = None
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"
