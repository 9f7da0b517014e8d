"""The per-layer-shaped architecture: config, modeling, and loading supported checkpoints into it."""

from .configuration_flatllm import FlatLlamaConfig
from .loading import ModelLoadError, load_model, load_tokenizer
from .modeling_flatllm import FlatLlamaForCausalLM

__all__ = ["FlatLlamaConfig", "FlatLlamaForCausalLM", "ModelLoadError", "load_model", "load_tokenizer"]
