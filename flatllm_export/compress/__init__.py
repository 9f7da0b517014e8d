"""Compression methods. Each is math in pure functions plus a thin method for the shared calibration engine;
``compress`` dispatches on the recipe's ``compression.method``."""

from __future__ import annotations

from .flap import compress_flap
from .flatllm import OPTION_KEYS, CompressionError, compress_flatllm, resolve_options


def flatllm_options(section):
    """FLAT-LLM options of a recipe's compression section: its ``variant`` with every option key it sets."""
    try:
        return resolve_options(section.variant, **{k: getattr(section, k) for k in OPTION_KEYS})
    except ValueError as exc:
        raise CompressionError(str(exc)) from None
from .svdllm import compress_svdllm


def compress(model, windows, section, device: str = "cpu", batch_size: int = 8, linear_multiple: int = 1) -> dict:
    if section.method == "flatllm":
        return compress_flatllm(model, windows, section.ratio, section.allocation, section.qk, section.round_to,
                                device, batch_size, linear_multiple, options=flatllm_options(section))
    if section.method == "flap":
        return compress_flap(model, windows, section.ratio, section.metric, section.structure, device, batch_size,
                             max(linear_multiple, section.round_to))
    if section.method == "svd-llm":
        return compress_svdllm(model, windows, section.ratio, device, batch_size, max(linear_multiple, section.round_to))
    raise CompressionError(f"compression.method '{section.method}' is not implemented")


__all__ = ["CompressionError", "compress", "compress_flap", "compress_flatllm", "compress_svdllm"]
