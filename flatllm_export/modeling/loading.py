"""Load a supported model (local folder or hub id) into the per-layer-shaped architecture.

Weights are read only from safetensors; no code from the input model is executed. Supported source
architectures are listed in SUPPORTED; anything else is refused by name.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

from ..dtypes import DTYPES
from ..errors import UserError
from ..files import read_json
from .configuration_flatllm import FlatLlamaConfig
from .gguf_import import gguf_folder, smollm2_dir, smollm2_folder
from .gptq_checkpoint import build_quantized_model
from .modeling_flatllm import FlatLlamaForCausalLM
from .streaming import LAYER_PREFIX, DiskLayers, StreamError, meta_tensors, read_tensors, tensor_files

SUPPORTED = ("llama", "mistral", FlatLlamaConfig.model_type)
REPO_ROOT = Path(__file__).resolve().parents[2]
# short name -> its folder; the names in BUILDERS are built there on first use (smollm2-135m from a PyPI wheel,
# into a cache outside the repo)
SHORT_NAMES = {"ref-llama": lambda: REPO_ROOT / "models" / "ref-llama",
               "ref-gqa": lambda: REPO_ROOT / "models" / "ref-gqa",
               "smollm2-135m": smollm2_dir}
BUILDERS = {"smollm2-135m": smollm2_folder}


class ModelLoadError(UserError, ValueError):
    """The model cannot be loaded as asked; the message names the path and the fix."""


def resolve_model_path(path: str) -> str:
    """A short name, a local folder, a .gguf file (converted once into the cache), or a hub id (downloaded,
    safetensors only)."""
    if path in SHORT_NAMES:
        return str(BUILDERS.get(path, SHORT_NAMES[path])())
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        return expanded
    if expanded.endswith(".gguf") and os.path.isfile(expanded):
        return str(gguf_folder(expanded))
    if os.path.exists(expanded) or path.startswith((".", "/")) or path.count("/") != 1:
        raise ModelLoadError(f"model.path '{path}' is not a model folder, a .gguf file, a short name "
                             f"({', '.join(SHORT_NAMES)}) or a hub id like 'meta-llama/Llama-2-7b-hf'")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"])
    except Exception as exc:
        raise ModelLoadError(f"could not download '{path}' from the Hugging Face hub ({type(exc).__name__}: {exc}); "
                             "give a local folder in model.path") from exc


def model_context(path: str) -> int | None:
    """max_position_embeddings of a model that is already on disk (None when it must first be fetched or built),
    so recipes can be checked against it before any work."""
    # a short name not built yet, a hub id or a .gguf file has no config.json here
    folder = SHORT_NAMES[path]() if path in SHORT_NAMES else Path(os.path.expanduser(path))
    try:
        return int(json.loads((Path(folder) / "config.json").read_text())["max_position_embeddings"])
    except (TypeError, OSError, KeyError, ValueError):
        return None


def read_safetensors(folder: str) -> dict[str, torch.Tensor]:
    """The whole state dict from model.safetensors or a sharded index; refuses pickled checkpoints."""
    folder = Path(folder)
    if not any((folder / f).exists() for f in ("model.safetensors", "model.safetensors.index.json")):
        raise ModelLoadError(_no_weights(folder))
    try:
        shards = sorted(set(tensor_files(folder).values()))  # the index read and its shards checked once, there
    except StreamError as exc:
        raise ModelLoadError(str(exc)) from None
    state: dict[str, torch.Tensor] = {}
    for path in shards:
        state.update(_load_checked(path))
    return state


def _no_weights(folder) -> str:
    pickled = [p.name for p in Path(folder).glob("*.bin")] + [p.name for p in Path(folder).glob("*.pt")]
    hint = f" (found pickled {pickled}: convert them to safetensors first)" if pickled else ""
    return f"no model.safetensors or model.safetensors.index.json in {folder}{hint}"


def read_config(folder) -> dict:
    """config.json of a model folder, with a supported model_type."""
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"no config.json in {folder}: model.path must be a Hugging Face model folder")
    raw = read_json(config_file, ModelLoadError, "restore the model's config.json")
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED:
        what = "has no model_type" if model_type is None else f"has model_type '{model_type}', which is not supported"
        raise ModelLoadError(f"{config_file} {what}; supported: {', '.join(SUPPORTED)}")
    return raw


def check_model_folder(folder) -> None:
    """What can be checked of a local model folder before any work: its config and that it has weights."""
    read_config(folder)
    if not any((Path(folder) / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        raise ModelLoadError(_no_weights(folder))


def _load_checked(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own errors on a cut or overwritten header / data
        raise ModelLoadError(f"{path} is truncated or corrupt ({exc}); download or copy the model again") from None


def flat_config_from_hf(cfg) -> FlatLlamaConfig:
    """Dense per-layer shapes from a Llama / Mistral config."""
    heads = cfg.num_attention_heads
    return FlatLlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=heads, num_key_value_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        intermediate_size=cfg.intermediate_size, hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=getattr(cfg, "rope_theta", 10000.0), rope_scaling=getattr(cfg, "rope_scaling", None),
        attention_bias=getattr(cfg, "attention_bias", False), tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
        source_model_type=cfg.model_type,
    )


def load_model(path: str, dtype: str = "float32", device: str = "cpu", stream: bool = False,
               work_dir: str | Path | None = None) -> FlatLlamaForCausalLM:
    """Any supported checkpoint as a FlatLlamaForCausalLM (dense ones get uniform per-layer shapes). ``stream``:
    decoder layers stay on disk (meta skeletons in the model, read one at a time through ``model.layer_store``;
    layers a method changes are written to ``work_dir``); embeddings, final norm and lm_head are loaded."""
    if dtype not in DTYPES:
        raise ModelLoadError(f"model.dtype '{dtype}' is not supported; use one of {list(DTYPES)}")
    folder = resolve_model_path(path)
    config_file = Path(folder) / "config.json"
    raw = read_config(folder)
    model_type = raw["model_type"]
    if model_type == FlatLlamaConfig.model_type:
        config = FlatLlamaConfig.from_pretrained(folder)
    else:
        hf_config = AutoConfig.from_pretrained(folder)  # built-in classes only: no remote code
        window = getattr(hf_config, "sliding_window", None)
        if window is not None and window < hf_config.max_position_embeddings:
            print(f"note: {path} uses a sliding window of {window} tokens; flatllm-export attends to the whole "
                  f"sequence, which is the same only for sequences of at most {window} tokens", file=sys.stderr)
        config = flat_config_from_hf(hf_config)
    if stream:
        files = tensor_files(Path(folder))
        names = sorted(files)
        state = {**read_tensors(files, [n for n in names if not n.startswith(LAYER_PREFIX)]),
                 **meta_tensors(files, [n for n in names if n.startswith(LAYER_PREFIX)])}
    else:
        state = read_safetensors(folder)
    quant = raw.get("quantization_config")
    # a GPTQ-quantized lm_head is its own tensor: the float embedding is not tied to it (the config keeps
    # tie_word_embeddings, so an ONNX export still writes one quantized table for both)
    tied = config.tie_word_embeddings and not (quant or {}).get("lm_head")
    if tied:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    if quant is not None:
        if quant.get("quant_method") != "gptq":
            raise ModelLoadError(f"{config_file} is quantized with '{quant.get('quant_method')}'; only gptq "
                                 "checkpoints are supported")
        config.quantization_config = quant
        try:
            model = build_quantized_model(config, state)
        except ValueError as exc:
            raise ModelLoadError(f"{folder}: {exc}") from exc
    else:
        with torch.device("meta"):
            model = FlatLlamaForCausalLM(config)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
        if missing or unexpected:
            raise ModelLoadError(f"weights in {folder} do not match its config.json: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # rebuild buffers off the meta device
    if tied:
        model.tie_weights()
    try:
        if stream:  # the layers' meta skeletons take the dtype; their data is read (and converted) per layer
            layers, model.model.layers = model.model.layers, torch.nn.ModuleList()
            model.to(device=device, dtype=DTYPES[dtype])
            model.model.layers = layers.to(dtype=DTYPES[dtype])
        else:
            model.to(device=device, dtype=DTYPES[dtype])
    except (RuntimeError, AssertionError) as exc:
        raise ModelLoadError(f"model.device '{device}' is not usable here ({exc}); use cpu") from exc
    model.eval()
    model.name_or_path = folder
    if stream:
        model.layer_store = DiskLayers(model, files, work_dir)
    return model


def load_tokenizer(path: str):
    folder = resolve_model_path(path)
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise ModelLoadError(f"could not load a tokenizer from {folder} ({type(exc).__name__}: {exc})") from exc
