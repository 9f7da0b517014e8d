"""Exporter plugins, registered by name. Each writes one target folder and validates what it wrote before it
reports success; ``flatllm_export.api`` calls them for ``export.targets``."""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from flatllm_export.errors import UserError
from flatllm_export.parity import DEFAULT_K

# MatMulNBits accuracy_level of int4 ONNX graphs (4: int8 activations, measured faster for +0.4% ppl on SmolLM2:
# docs/bench_validation.md); the recipe's export.accuracy_level and the graph options default to it
DEFAULT_ACCURACY_LEVEL = 4
EXPORTERS: dict[str, Callable] = {}  # filled as target modules are imported (each registers itself)
# target -> (module, the packages it imports, the extra that installs them): a target is imported only when used,
# so a missing optional extra affects only its own targets
TARGETS = {"hf": ("hf", (), None), "gptq": ("gptq", (), None),
           "onnx": ("onnx", ("onnx", "onnxruntime"), "onnx"),
           "genai": ("genai", ("onnx", "onnxruntime", "onnxruntime_genai"), "onnx,genai"),
           "gguf": ("gguf", ("gguf", "llama_cpp"), "llamacpp")}


@dataclass
class ExportContext:
    """What every exporter gets besides the model: options and sample inputs for its self-check."""

    dtype: str = "float32"
    sample: torch.Tensor | None = None  # (B, T) token ids for validating the written files
    noise_k: float = DEFAULT_K  # parity tolerance: k x PyTorch's own deviation from float64 (flatllm_export.parity)
    extra: dict = field(default_factory=dict)
    # what self-checks loaded, by target ('gptq': the reloaded model, 'onnx': its OrtDecoder): the run's validation
    # reuses them rather than loading the same files again
    opened: dict = field(default_factory=dict)


class ExportError(UserError, RuntimeError):
    """An exporter could not write, or its output failed its own validation."""


def check_reload(target: str, model, reloaded, out: Path, ctx: ExportContext) -> dict:
    """The self-check of a PyTorch-loadable export: the reloaded files' logits on ``ctx.sample``, judged against the
    float64 reference of ``model`` by the shared parity verdict (floor: PyTorch at the export's dtype)."""
    from flatllm_export.evaluate import torch_logits_fn
    from flatllm_export.parity import judge_logits

    ids = ctx.sample if ctx.sample is not None else torch.randint(
        0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    kind = "fp16" if ctx.dtype == "float16" or next(model.parameters()).dtype == torch.float16 else "fp32"
    v = judge_logits(f"reloaded {target}/", torch_logits_fn(reloaded)(ids), model, ids, kind, ctx.noise_k)
    if not v.ok:
        raise ExportError(f"{target} export at {out} does not reproduce the model: {v.message}")
    return {"max_abs_logit_diff": v.deviation, "tolerance": v.tolerance, "noise_floor": v.floor, "floor_kind": kind}


def register(name: str):
    def wrap(fn):
        EXPORTERS[name] = fn
        return fn

    return wrap


def missing_requirement(target: str) -> str | None:
    """Why ``target`` cannot run here (its packages are not installed, with the pip command), or None."""
    _, packages, extra = TARGETS[target]
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        return (f"export target '{target}' needs {missing}, which are not installed: "
                f"pip install 'flatllm-export[{extra}]'")
    return None


def export(name: str, model, tokenizer, out: Path, ctx: ExportContext) -> dict:
    from flatllm_export.files import write_errors

    if name not in EXPORTERS:
        importlib.import_module(f"{__name__}.{TARGETS[name][0]}")
    with write_errors(Path(out)):
        return EXPORTERS[name](model, tokenizer, Path(out), ctx)
