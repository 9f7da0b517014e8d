"""Exporter plugins, registered by name. Each writes one target folder and validates what it wrote before it
reports success; ``flatllm_export.api`` calls them for ``export.targets``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

EXPORTERS: dict[str, Callable] = {}


@dataclass
class ExportContext:
    """What every exporter gets besides the model: options and sample inputs for its self-check."""

    dtype: str = "float32"
    sample: torch.Tensor | None = None  # (B, T) token ids for validating the written files
    extra: dict = field(default_factory=dict)


class ExportError(RuntimeError):
    """An exporter could not write, or its output failed its own validation."""


def register(name: str):
    def wrap(fn):
        EXPORTERS[name] = fn
        return fn

    return wrap


def export(name: str, model, tokenizer, out: Path, ctx: ExportContext) -> dict:
    return EXPORTERS[name](model, tokenizer, Path(out), ctx)


from . import genai, gptq, hf, onnx  # noqa: E402,F401  (register themselves)
