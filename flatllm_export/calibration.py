"""The one sequential, layer-by-layer calibration engine. It knows no method.

The inputs of decoder layer 0 are captured for every calibration window; then, one decoder layer at a time,
the layer is moved to the device and handed to the method together with a ``LayerRun`` that can run it over
all calibration inputs (hooks the method registers see every batch). Whatever the method did to the layer,
the layer's final outputs become the next layer's inputs. Activations stay in host memory; only the current
layer's weights visit the device.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm


class LayerRun:
    """Runs one decoder layer over all calibration inputs (kept on the host), batch by batch."""

    def __init__(self, layer: nn.Module, inputs: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 device: torch.device, batch_size: int):
        self.layer, self.inputs, self.cos, self.sin = layer, inputs, cos, sin
        self.device, self.batch_size = device, batch_size
        self.outputs: torch.Tensor | None = None

    @torch.no_grad()
    def forward(self) -> torch.Tensor:
        """Run the layer as it is now; returns (and remembers) its outputs, on the host."""
        outs = torch.empty_like(self.inputs)
        cos, sin = self.cos.to(self.device), self.sin.to(self.device)
        for start in range(0, self.inputs.shape[0], self.batch_size):
            x = self.inputs[start : start + self.batch_size].to(self.device)
            outs[start : start + x.shape[0]] = self.layer(x, cos[: x.shape[0]], sin[: x.shape[0]]).to(outs.device)
        self.outputs = outs
        return outs


class LayerMethod(Protocol):
    """What a method plugs into the engine."""

    def process_layer(self, index: int, layer: nn.Module, run: LayerRun) -> bool:
        """Collect statistics with ``run.forward()`` (and hooks) and change the layer in place. Return True when
        the layer changed after its last forward (the engine then reruns it for the next layer's inputs)."""


@contextlib.contextmanager
def capture(modules: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None], what: str = "output"):
    """Forward hooks handing ``fn(name, t)`` each module's first input or its output, as (tokens, features)."""
    handles = []
    for name, module in modules.items():
        def hook(_mod, args, out, name=name):
            t = args[0] if what == "input" else out
            fn(name, t.detach().reshape(-1, t.shape[-1]))
        handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def layer0_inputs(model, windows: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings (the inputs of decoder layer 0) and the rotary cos/sin for windows (n, seqlen), on the host."""
    core = model.model
    emb_device = core.embed_tokens.weight.device
    hidden = torch.cat([core.embed_tokens(b.to(emb_device)).cpu() for b in windows.split(batch_size)])
    positions = torch.arange(windows.shape[1], device=emb_device).unsqueeze(0).expand(batch_size, -1)
    cos, sin = core.rotary_emb(hidden[:1].to(emb_device), positions)
    return hidden, cos.cpu(), sin.cpu()


def run_layers(layers, inputs: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, method: LayerMethod | None,
               device: str = "cpu", batch_size: int = 8, desc: str = "calibrate",
               working_copy: Callable[[nn.Module], nn.Module] | None = None) -> torch.Tensor:
    """The layer loop: each layer (or ``working_copy(layer)``, a throwaway copy such as a float64 one) visits the
    device, is handed to ``method`` (None: only run it), and its outputs become the next layer's inputs.
    Returns the last layer's outputs."""
    device = torch.device(device)
    for index in tqdm(range(len(layers)), desc=desc, unit="layer", leave=working_copy is None):
        layer = working_copy(layers[index]) if working_copy else layers[index]
        home = next(layer.parameters()).device
        layer.to(device)
        run = LayerRun(layer, inputs, cos, sin, device, batch_size)
        changed = method.process_layer(index, layer, run) if method is not None else False
        if changed or run.outputs is None:
            run.forward()
        inputs = run.outputs
        if working_copy is None:
            layer.to(home)
        del layer, run
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return inputs


def run_sequential(model, windows: torch.Tensor, method: LayerMethod, device: str = "cpu", batch_size: int = 8,
                   desc: str = "calibrate") -> torch.Tensor:
    """Process every decoder layer of ``model`` in order with ``method`` (see module docstring). Returns the last
    layer's outputs (the final norm's inputs), on the host."""
    inputs, cos, sin = layer0_inputs(model, windows, batch_size)
    return run_layers(model.model.layers, inputs, cos, sin, method, device, batch_size, desc)
