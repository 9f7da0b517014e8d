"""Give a decoder layer new shapes and weights in place (the layer object stays, its submodules are rebuilt)."""

from __future__ import annotations

import torch

from ..modeling.modeling_flatllm import FlatLlamaDecoderLayer


def reshape_layer(layer: FlatLlamaDecoderLayer, config, index: int, new_weights: dict[str, torch.Tensor],
                  **shape: object) -> None:
    """Set ``config.layer_shapes[index]`` keys from ``shape``, rebuild the layer's attention and MLP with those
    shapes, and fill them from the layer's current weights overridden by ``new_weights`` (state-dict names
    relative to the layer, e.g. 'self_attn.v_proj.weight'). Weights keep the layer's dtype and device."""
    ref = layer.input_layernorm.weight
    config.layer_shapes[index].update(shape)
    state = {k: v for k, v in layer.state_dict().items()}
    state.update({k: v.to(device=ref.device, dtype=ref.dtype) for k, v in new_weights.items()})
    with torch.device("meta"):
        fresh = FlatLlamaDecoderLayer(config, index)
    wanted = fresh.state_dict().keys()
    fresh.load_state_dict({k: state[k] for k in wanted}, strict=True, assign=True)
    layer.self_attn, layer.mlp = fresh.self_attn, fresh.mlp
