"""The one sequential, layer-by-layer calibration engine. It knows no method.

The inputs of decoder layer 0 are captured for every calibration window; then, one decoder layer at a time,
the layer is moved to the device and handed to the method together with a ``LayerRun`` that can run it over
all calibration inputs (hooks the method registers see every batch). Whatever the method did to the layer,
the layer's final outputs become the next layer's inputs. Activations stay in host memory (or, under
``activation_storage(spill_dir=...)``, in memory-mapped files there); only the current layer's weights visit
the device. Layers come from the model's layer store (``modeling.streaming``): its own layers, or one at a
time from disk, where a layer the method changed is written back before the next is read.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from .modeling.streaming import StreamError, layers_of


class Activations:
    """Where calibration activations live: memory, or memory-mapped files in ``spill_dir`` (the kernel pages
    them out when memory is short); stored in ``dtype`` (None: as computed), computed in the model's dtype."""

    def __init__(self, dtype: torch.dtype | None = None, spill_dir: str | Path | None = None):
        self.dtype, self.spill_dir = dtype, Path(spill_dir) if spill_dir else None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._ids = itertools.count()

    def new(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        dtype = self.dtype or dtype
        if self.spill_dir is None:
            return torch.empty(shape, dtype=dtype)
        if self._tmp is None:
            try:
                self.spill_dir.mkdir(parents=True, exist_ok=True)
                self._tmp = tempfile.TemporaryDirectory(prefix="flatllm-activations-", dir=self.spill_dir)
            except OSError as exc:
                raise StreamError(f"calibration.spill_dir {self.spill_dir} is not writable ({exc.strerror}); "
                                  "choose a folder you can write to") from None
        path = Path(self._tmp.name) / f"{next(self._ids)}.bin"
        numel = int(torch.Size(shape).numel())
        try:
            t = torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)
        except RuntimeError as exc:
            raise StreamError(f"could not map {path} for calibration activations ({exc}); free space in "
                              "calibration.spill_dir or choose another folder") from None
        os.unlink(path)  # the mapping keeps the pages; nothing is left behind whatever happens next
        return t

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` moved into this storage."""
        out = self.new(t.shape, t.dtype)
        out.copy_(t)
        return out

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


_STORAGE: list[Activations] = [Activations()]


@contextlib.contextmanager
def activation_storage(dtype: torch.dtype | None = None, spill_dir: str | Path | None = None):
    """Calibration inside this block keeps activations in ``dtype`` and/or in files in ``spill_dir``."""
    storage = Activations(dtype, spill_dir)
    _STORAGE.append(storage)
    try:
        yield storage
    finally:
        _STORAGE.pop()
        storage.close()


class LayerRun:
    """Runs one decoder layer over all calibration inputs (kept on the host), batch by batch."""

    def __init__(self, layer: nn.Module, inputs: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 device: torch.device, batch_size: int, compute_dtype: torch.dtype | None = None,
                 storage: Activations | None = None):
        self.layer, self.inputs, self.cos, self.sin = layer, inputs, cos, sin
        self.device, self.batch_size = device, batch_size
        self.compute_dtype = compute_dtype or inputs.dtype
        self.storage = storage or Activations()
        self.outputs: torch.Tensor | None = None

    @torch.no_grad()
    def forward(self) -> torch.Tensor:
        """Run the layer as it is now; returns (and remembers) its outputs, on the host."""
        outs = self.storage.new(self.inputs.shape, self.compute_dtype)
        cos, sin = self.cos.to(self.device), self.sin.to(self.device)
        for start in range(0, self.inputs.shape[0], self.batch_size):
            x = self.inputs[start : start + self.batch_size].to(self.device, self.compute_dtype)
            y = self.layer(x, cos[: x.shape[0]], sin[: x.shape[0]])
            outs[start : start + x.shape[0]] = y.to(outs.device, outs.dtype)
        self.outputs = outs
        return outs


class LayerMethod(Protocol):
    """What a method plugs into the engine."""

    def process_layer(self, index: int, layer: nn.Module, run: LayerRun) -> bool:
        """Collect statistics with ``run.forward()`` (and hooks) and change the layer in place. Return True when
        the layer changed (the engine then reruns it for the next layer's inputs, and a streamed store writes
        it out)."""


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


def run_layers(store, inputs: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, method: LayerMethod | None,
               device: str = "cpu", batch_size: int = 8, desc: str = "calibrate",
               working_copy: Callable[[nn.Module], nn.Module] | None = None) -> torch.Tensor:
    """The layer loop over a layer store (``modeling.streaming``): each layer (or ``working_copy(layer)``, a
    throwaway copy such as a float64 one) visits the device, is handed to ``method`` (None: only run it), goes
    back to the store (written out if it changed), and its outputs become the next layer's inputs. Activations
    are stored as the innermost ``activation_storage`` says. Returns the last layer's outputs."""
    device = torch.device(device)
    storage, compute = _STORAGE[-1], inputs.dtype
    inputs = storage.keep(inputs) if storage.dtype or storage.spill_dir else inputs
    for index in tqdm(range(len(store)), desc=desc, unit="layer", leave=working_copy is None):
        original = store.load(index)
        layer = working_copy(original) if working_copy else original
        home = next(layer.parameters()).device
        layer.to(device)
        run = LayerRun(layer, inputs, cos, sin, device, batch_size, compute, storage)
        changed = method.process_layer(index, layer, run) if method is not None else False
        if changed or run.outputs is None:
            run.forward()
        inputs = run.outputs
        if working_copy is None:
            layer.to(home)
        store.release(index, original, changed=bool(changed) and working_copy is None)
        del layer, original, run
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return inputs


def run_sequential(model, windows: torch.Tensor, method: LayerMethod, device: str = "cpu", batch_size: int = 8,
                   desc: str = "calibrate") -> torch.Tensor:
    """Process every decoder layer of ``model`` in order with ``method`` (see module docstring). Returns the last
    layer's outputs (the final norm's inputs), on the host."""
    inputs, cos, sin = layer0_inputs(model, windows, batch_size)
    return run_layers(layers_of(model), inputs, cos, sin, method, device, batch_size, desc)
